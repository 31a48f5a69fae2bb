"""Reading and writing darknet ``.weights`` files and Ultralytics-archive checkpoints.

Darknet ``.weights`` layout (little endian): int32 ``major, minor, revision``,
then ``seen`` (images seen in training) as int64 when
``major * 10 + minor >= 2 and major < 1000 and minor < 1000``, else int32; then
float32 values for each ``[convolutional]`` layer in cfg order: with batch norm
``beta (bias), gamma (weight), running_mean, running_var``, without batch norm
the conv bias; then the conv weights ``[out, in, kh, kw]``.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .darknet import Darknet

__all__ = [
    "ULTRALYTICS_BN_EPS",
    "load_darknet_weights",
    "load_ultralytics_checkpoint",
    "read_darknet_header",
    "save_darknet_weights",
]

logger = logging.getLogger(__name__)

ULTRALYTICS_BN_EPS = 1e-4
"""BatchNorm epsilon the Ultralytics YOLOv3 archive trained with (darknet uses 1e-5)."""


def _header_size(major: int, minor: int) -> int:
    return 20 if major * 10 + minor >= 2 and major < 1000 and minor < 1000 else 16


def _conv_tensors(model: Darknet, cutoff: int | None) -> list[Tensor]:
    """The tensors of every conv layer before ``cutoff``, in darknet file order."""
    limit = len(model.module_defs) if cutoff is None else cutoff
    tensors: list[Tensor] = []
    convs = iter(model.conv_layers())
    for i, d in enumerate(model.module_defs[:limit]):
        if d["type"] != "convolutional":
            continue
        conv, bn = next(convs)
        if bn is not None:
            tensors += [bn.bias, bn.weight, bn.running_mean, bn.running_var]  # type: ignore[list-item]
        else:
            assert conv.bias is not None, f"layer {i}: a conv without batch norm has a bias"
            tensors.append(conv.bias)
        tensors.append(conv.weight)
    return tensors


def read_darknet_header(path: str | os.PathLike[str]) -> tuple[int, int, int, int]:
    """Return ``(major, minor, revision, seen)`` from a darknet ``.weights`` file.

    Raises:
        ValueError: the file is shorter than its header.
    """
    with open(path, "rb") as f:
        head = f.read(20)
    return _parse_header(head, Path(path).name)


def _parse_header(head: bytes, name: str) -> tuple[int, int, int, int]:
    if len(head) < 12:
        raise ValueError(f"{name} has {len(head)} bytes, too short for a darknet .weights header")
    major, minor, revision = (int(v) for v in np.frombuffer(head, "<i4", count=3))
    size = _header_size(major, minor)
    if len(head) < size:
        raise ValueError(
            f"{name} has {len(head)} bytes, too short for a darknet .weights header ({size})"
        )
    seen = int(np.frombuffer(head, "<i8" if size == 20 else "<i4", count=1, offset=12)[0])
    return major, minor, revision, seen


def load_darknet_weights(
    model: Darknet, path: str | os.PathLike[str], *, cutoff: int | None = None
) -> None:
    """Copy a darknet ``.weights`` file into ``model`` (in place).

    Args:
        model: a :class:`Darknet` built from the cfg the weights were trained with.
        path: the ``.weights`` file.
        cutoff: load only layers ``0 .. cutoff - 1`` (darknet's ``partial``); the
            file may then hold more values than needed, as darknet allows.

    Raises:
        ValueError: the file size does not match the cfg (wrong cfg or class count),
            or ``cutoff`` is out of range.
    """
    if cutoff is not None and not 0 <= cutoff <= len(model.module_defs):
        raise ValueError(
            f"cutoff must be in [0, {len(model.module_defs)}] (number of layers), got {cutoff}"
        )
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    raw = np.fromfile(path, dtype=np.uint8)
    major, minor, revision, _ = _parse_header(raw[:20].tobytes(), path.name)
    header = _header_size(major, minor)
    tensors = _conv_tensors(model, cutoff)
    needed = header + 4 * sum(t.numel() for t in tensors)
    if raw.size != needed and (cutoff is None or raw.size < needed):
        if not all(0 <= v < 1000 for v in (major, minor, revision)):
            raise ValueError(
                f"{path.name} is not a darknet .weights file: its header reads version "
                f"{major}.{minor}.{revision} (darknet writes 0.1.0 or 0.2.0){_text_hint(raw)}; give the "
                "darknet .weights file of the cfg, or an Ultralytics .pt checkpoint"
            )
        what = "exactly " if cutoff is None else "at least "
        raise ValueError(
            f"{path.name} has {raw.size:,} bytes but cfg {model.cfg_name!r} with "
            f"{model.num_classes} classes needs {what}{needed:,}: wrong cfg or class count?"
        )
    values = torch.from_numpy(raw[header:needed].view("<f4"))
    offset = 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel()
            t.copy_(values[offset : offset + n].view_as(t))
            offset += n
    logger.debug("loaded %s into %s (%d tensors)", path, model.cfg_name, len(tensors))
    _warn_if_bad_statistics(model, path.name)


def _text_hint(raw: np.ndarray) -> str:
    head = raw[:40].tobytes()
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return f"; it starts with text: {head.decode('ascii').splitlines()[0][:30]!r}"
    return ""


def _warn_if_bad_statistics(model: Darknet, name: str) -> None:
    """Warn when BatchNorm running variances are non-positive or non-finite: such a model detects nothing."""
    variances = [bn.running_var for bn in model.bn_layers() if isinstance(bn.running_var, Tensor)]
    bad = [i for i, var in enumerate(variances) if not bool((torch.isfinite(var) & (var > 0)).all())]
    if bad:
        logger.warning(
            "%s: %d of %d BatchNorm layers have non-positive or non-finite running variances (first: "
            "BatchNorm layer %d): the file does not match cfg %r or is damaged, and the model will not "
            "detect anything useful", name, len(bad), len(variances), bad[0], model.cfg_name)


def save_darknet_weights(
    model: Darknet,
    path: str | os.PathLike[str],
    *,
    version: tuple[int, int, int] = (0, 2, 0),
    seen: int = 0,
) -> None:
    """Write ``model``'s conv and BatchNorm tensors as a darknet ``.weights`` file.

    The file is written to a temporary file in the same folder and then renamed,
    so readers never see a partial file.

    Args:
        model: the model to save.
        path: destination ``.weights`` file.
        version: ``(major, minor, revision)``; ``seen`` is stored as int64 when
            ``major * 10 + minor >= 2`` (and both < 1000), else as int32.
        seen: number of training images seen, stored in the header.
    """
    if len(version) != 3 or not all(isinstance(v, int) and 0 <= v < 2**31 for v in version):
        raise ValueError(
            f"version must be three non-negative ints (major, minor, revision), got {version!r}"
        )
    size = _header_size(version[0], version[1])
    limit = 2**63 if size == 20 else 2**31
    if not isinstance(seen, int) or not 0 <= seen < limit:
        raise ValueError(f"seen must be an int in [0, {limit}) for version {version}, got {seen!r}")
    header = (
        np.array(version, "<i4").tobytes()
        + np.array([seen], "<i8" if size == 20 else "<i4").tobytes()
    )
    payload = torch.cat(
        [t.detach().reshape(-1).to("cpu", torch.float32) for t in _conv_tensors(model, None)]
    )
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            f.write(payload.numpy().astype("<f4", copy=False).tobytes())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    logger.info("saved %s weights to %s", model.cfg_name, path)


def _numpy_globals() -> list[Any]:
    """The numpy callables a weights-only unpickler may use for scalars and arrays (numpy 1 and 2 names)."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray  # type: ignore[no-redef]
    allowed: list[Any] = [np.ndarray, np.dtype, multiarray.scalar, multiarray._reconstruct]
    allowed += [type(np.dtype(t)) for t in ("f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "?")]
    # Files written under numpy 1 name these numpy.core.multiarray.*, under numpy 2 numpy._core.multiarray.*.
    allowed += [(multiarray.scalar, f"{m}.scalar") for m in ("numpy.core.multiarray", "numpy._core.multiarray")]
    allowed += [(multiarray._reconstruct, f"{m}._reconstruct")
                for m in ("numpy.core.multiarray", "numpy._core.multiarray")]
    return allowed


def _safe_load(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True`` (no code from the file runs), errors as ``ValueError``."""
    import pickle

    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"(?:unsupported|Unsupported) (?:GLOBAL|global):? *(?:GLOBAL )?([\w.]+)", str(e))
        what = f"e.g. {found.group(1)}" if found else "see torch.load"
        raise ValueError(
            f"{path.name} cannot be read safely: it holds pickled Python objects beyond tensors, plain "
            f"containers and numpy values ({what}); diode reads checkpoints with weights_only=True and never "
            "runs code from a file: re-save it as {'model': model.state_dict()}"
        ) from e
    except Exception as e:  # the weights-only unpickler fails on garbage with many exception types
        raise ValueError(f"{path.name} is not a PyTorch checkpoint ({type(e).__name__}: {str(e)[:80]}); give "
                         "an Ultralytics-archive .pt file, or a darknet .weights file with --cfg") from e


def load_ultralytics_checkpoint(
    model: Darknet, checkpoint: str | os.PathLike[str] | Mapping[str, Any]
) -> None:
    """Load an Ultralytics-archive YOLOv3 checkpoint into ``model`` (in place).

    The archive stores ``{"model": state_dict, "epoch": ..., ...}`` with keys
    ``module_list.<i>.Conv2d.weight`` (``.bias`` on the convs before ``[yolo]``)
    and ``module_list.<i>.BatchNorm2d.{weight,bias,running_mean,running_var,
    num_batches_tracked}``; a bare state dict is accepted too. That framework
    trained with BatchNorm eps 1e-4, so every BatchNorm's ``eps`` is set to
    :data:`ULTRALYTICS_BN_EPS` afterwards (momentum is left alone).

    Args:
        model: a :class:`Darknet` built from the checkpoint's cfg and class count.
        checkpoint: a ``.pt`` path or the loaded dict. A path is read with
            ``torch.load(..., weights_only=True)`` plus the numpy scalar and array
            types the archive's training metadata uses, so opening a file never
            runs code from it.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: not a PyTorch checkpoint, a checkpoint holding pickled Python
            objects other than tensors, containers and numpy values (e.g. a whole
            pickled model), or missing, unexpected or wrongly shaped keys (a few are listed).
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = _safe_load(Path(checkpoint))
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"checkpoint must be a path or a dict, got {type(checkpoint).__name__}")
    state = checkpoint.get("model", checkpoint)
    if isinstance(state, nn.Module):
        state = state.state_dict()
    if not isinstance(state, Mapping):
        raise ValueError(f"checkpoint['model'] must be a state dict, got {type(state).__name__}")
    own = model.state_dict()
    # Older PyTorch versions did not save BatchNorm's num_batches_tracked.
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    problems = [
        (name, keys)
        for name, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch", mismatched),
        )
        if keys
    ]
    if problems:
        detail = "; ".join(
            f"{name} ({len(keys)}): {', '.join(keys[:4])}" + (", ..." if len(keys) > 4 else "")
            for name, keys in problems
        )
        raise ValueError(
            f"checkpoint does not fit cfg {model.cfg_name!r} with {model.num_classes} classes: "
            f"{detail}"
        )
    model.load_state_dict(dict(state), strict=False)
    for bn in model.bn_layers():
        bn.eps = ULTRALYTICS_BN_EPS
    logger.debug(
        "loaded an Ultralytics checkpoint into %s (BatchNorm eps set to %g)",
        model.cfg_name,
        ULTRALYTICS_BN_EPS,
    )
