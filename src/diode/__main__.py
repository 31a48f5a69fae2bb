"""``python -m diode``: the diode command line."""

import sys

from diode.cli import main

sys.exit(main())
