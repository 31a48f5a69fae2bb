"""Darknet ``.cfg`` parsing and the bundled YOLOv3 cfgs.

A darknet cfg is a list of ``[section]`` blocks of ``key=value`` lines. The first
block is ``[net]`` (input size and training hyper-parameters); every later block
is one layer, numbered from 0 in file order (darknet's layer index).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["LAYER_TYPES", "available_cfgs", "bundled_cfg_path", "parse_cfg"]

_CFG_DIR = Path(__file__).resolve().parent / "cfgs"

LAYER_TYPES = frozenset({"convolutional", "maxpool", "upsample", "route", "shortcut", "yolo"})
"""The layer section types :class:`~diode.models.yolo.darknet.Darknet` builds."""

_INT_LIST_KEYS = frozenset({"layers", "mask"})


def available_cfgs() -> list[str]:
    """Names of the cfgs bundled with diode, e.g. ``["yolov3", "yolov3-spp", "yolov3-tiny"]``."""
    return sorted(p.stem for p in _CFG_DIR.glob("*.cfg"))


def bundled_cfg_path(name: str) -> Path:
    """Path of the bundled cfg called ``name`` (without ``.cfg``).

    Raises:
        ValueError: ``name`` is not bundled; the message lists the bundled names.
    """
    path = _CFG_DIR / f"{name}.cfg"
    if not path.is_file():
        raise ValueError(f"no bundled cfg named {name!r}; available: {', '.join(available_cfgs())}")
    return path


def parse_cfg(source: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Parse a darknet cfg into one dict per section.

    Args:
        source: a bundled cfg name (see :func:`available_cfgs`), a path to a
            ``.cfg`` file, or the cfg text itself (anything containing a newline).

    Returns:
        One dict per section in file order, the ``[net]`` section first. Each dict
        has ``"type"`` (the section name, ``"net"`` for ``[net]``/``[network]``)
        and the section's keys with typed values: ints, floats, strings,
        comma-separated numbers as lists, ``layers``/``mask`` always as
        ``list[int]`` and ``anchors`` as a list of ``(w, h)`` pairs in pixels.

    Raises:
        FileNotFoundError: ``source`` names a path that does not exist.
        ValueError: unknown bundled name, unknown section type, malformed line,
            or a cfg that does not start with ``[net]``.
    """
    text, origin = _read_source(source)
    sections: list[dict[str, Any]] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].split(";", 1)[0].strip()
        if not line:
            continue
        where = f"{origin}, line {lineno}"
        if line.startswith("["):
            if not line.endswith("]"):
                raise ValueError(
                    f"{where}: malformed section header {line!r}, expected e.g. [convolutional]"
                )
            kind = line[1:-1].strip().lower()
            if kind == "network":
                kind = "net"
            if kind != "net" and kind not in LAYER_TYPES:
                raise ValueError(
                    f"{where}: unknown section type [{kind}]; supported: [net], "
                    + ", ".join(f"[{t}]" for t in sorted(LAYER_TYPES))
                )
            if (kind == "net") != (not sections):
                raise ValueError(
                    f"{where}: a darknet cfg has exactly one [net] section, and it comes first"
                )
            sections.append({"type": kind})
            continue
        if not sections:
            raise ValueError(
                f"{where}: {line!r} comes before the first section; a cfg starts with [net]"
            )
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise ValueError(f"{where}: expected 'key=value', got {line!r}")
        try:
            sections[-1][key] = _typed_value(key, value)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
    if not sections:
        raise ValueError(f"{origin}: no sections found; a darknet cfg starts with [net]")
    return sections


def _read_source(source: str | os.PathLike[str]) -> tuple[str, str]:
    """Return the cfg text and a short description of where it came from."""
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"source must be a cfg name, a path or cfg text, got {type(source).__name__}"
        )
    if isinstance(source, str) and "\n" in source:
        return source, "<cfg text>"
    path = Path(source)
    if isinstance(source, str) and not path.exists() and source in available_cfgs():
        path = bundled_cfg_path(source)
    if path.is_file():
        return path.read_text(encoding="utf-8"), str(path)
    if isinstance(source, str) and path.suffix != ".cfg" and len(path.parts) == 1:
        raise ValueError(
            f"source {source!r} is neither a file nor a bundled cfg name; "
            f"bundled: {', '.join(available_cfgs())}"
        )
    raise FileNotFoundError(f"cfg file not found: {path}")


def _number(token: str) -> int | float:
    try:
        return int(token)
    except ValueError:
        return float(token)


def _typed_value(key: str, value: str) -> Any:
    if key in _INT_LIST_KEYS:
        try:
            return [int(t) for t in value.split(",") if t.strip()]
        except ValueError:
            raise ValueError(f"{key} must be comma-separated integers, got {value!r}") from None
    if key == "anchors":
        try:
            nums = [_number(t) for t in value.split(",") if t.strip()]
        except ValueError:
            raise ValueError(f"anchors must be comma-separated numbers, got {value!r}") from None
        if len(nums) % 2:
            raise ValueError(f"anchors must be (w, h) pairs, got an odd count {len(nums)}")
        return list(zip(nums[::2], nums[1::2], strict=True))
    tokens = [t.strip() for t in value.split(",")]
    try:
        nums = [_number(t) for t in tokens]
    except ValueError:
        return value
    return nums[0] if len(nums) == 1 else nums
