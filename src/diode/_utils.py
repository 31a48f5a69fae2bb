"""The single home of small helpers every part of diode needs: device lookup, seeds, validation.

One of each: a second copy elsewhere is a bug (``duplicates --change`` checks).
Atomic file writes live in :mod:`diode.data.io`, the progress bar in :mod:`diode._progress`.
"""

from __future__ import annotations

import math
import os
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


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised process group, else ``(0, 1)``.

    Raises:
        RuntimeError: ``WORLD_SIZE > 1`` (launched by torchrun) without an initialised group.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not initialized: call "
                           "torch.distributed.init_process_group() first (the diode CLI does it under torchrun)")
    return 0, 1


def barrier(world: int) -> None:
    """Wait for every rank (nothing to wait for in a single process)."""
    if world > 1:
        torch.distributed.barrier()
