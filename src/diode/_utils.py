"""The single home of small helpers every part of diode needs: device lookup, seeds, validation.

One of each: a second copy elsewhere is a bug (``duplicates --change`` checks).
Atomic file writes live in :mod:`diode.data.io`; progress bars with their logging
redirection next to the job that shows them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch


def device_of(adapter: Any, name: str = "model") -> torch.device:
    """The device of ``adapter.model`` (or of a module given directly): its parameters', else its buffers'.

    Raises:
        ValueError: the model has neither parameters nor buffers (``name`` names it).
    """
    module = getattr(adapter, "model", adapter)
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    raise ValueError(f"{name} has no parameters or buffers, so it has no device; build it with its layers")


def derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from non-negative ints (e.g. ``(base_seed, batch_index)``).

    Depends only on the keys, never on the process count or any global state.
    """
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> 1)


def check_int(name: str, value: Any, minimum: int) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an ``int`` (not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_number(name: str, value: Any, low: float, high: float, *, open_low: bool = False,
                 open_high: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a finite number in the interval.

    ``open_low``/``open_high`` exclude the bounds: ``check_number("lr", lr, 0, inf, open_low=True)``.
    """
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok:
        ok = (value > low if open_low else value >= low) and (value < high if open_high else value <= high)
    if not ok:
        interval = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")
