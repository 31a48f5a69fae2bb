"""The one tqdm bar of diode: synthesis iterations, job images and distillation steps.

While a bar is shown, the records of the given logger reach the console through
``tqdm.write`` (so they print above the bar instead of breaking it); only the loggers
of its chain that own a console handler are redirected, so nothing prints twice.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any


def console_loggers(logger: logging.Logger) -> list[logging.Logger]:
    """``logger`` and every ancestor its records reach that has a stdout/stderr handler."""
    chain: list[logging.Logger] = []
    current: logging.Logger | None = logger
    while current is not None:
        if any(isinstance(h, logging.StreamHandler) and h.stream in (sys.stdout, sys.stderr)
               for h in current.handlers):
            chain.append(current)
        current = current.parent if current.propagate else None
    return chain


@contextlib.contextmanager
def progress_bar(total: float, *, show: bool, logger: logging.Logger | None = None, initial: float = 0,
                 **tqdm_args: Any) -> Iterator[Any]:
    """A tqdm bar over ``total`` (``None`` unless ``show``), closed on exit.

    Args:
        total: the bar's length (iterations, images, steps).
        show: whether to show it; ``False`` yields ``None`` and imports nothing.
        logger: whose console records print above the bar while it is shown.
        initial: the count already done (a resumed run).
        **tqdm_args: ``desc``, ``unit``, ``leave``, ``bar_format``... passed to tqdm.
    """
    if not show:
        yield None
        return
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    bar = tqdm(total=total, initial=initial, dynamic_ncols=True, **tqdm_args)
    try:
        with logging_redirect_tqdm(loggers=console_loggers(logger)) if logger is not None else contextlib.nullcontext():
            yield bar
    finally:
        bar.close()
