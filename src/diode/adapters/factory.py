"""One entry point from a short spec string to an adapter: registry names and architecture specs.

Spec forms (the CLI's ``--teacher``, ``--student`` and ``--model`` take the same):

- ``NAME``: a registered detector (``diode weights list``), e.g. ``yolov3-tiny``, ``yolov10n``;
- ``tv:BUILDER``: a torchvision detection builder, e.g. ``tv:ssdlite320_mobilenet_v3_large``;
- ``yolov8:SPEC``: the anchor-free YOLO family from a bundled spec name (``yolov8n``, ``yolov10n``,
  ``yolo11n``, ...) or a spec JSON file;
- ``darknet:CFG``: a darknet cfg, bundled name (``yolov3-tiny``) or ``.cfg`` path;
- ``PATH.pt``: an Ultralytics checkpoint (read without running code from it).

``weights`` loads a file into an architecture spec: a state dict written by diode (``student.pt``),
a darknet ``.weights`` file for ``darknet:``, an Ultralytics checkpoint for ``yolov8:``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from diode import hub

PathLike = str | os.PathLike[str]

SPEC_FORMS = ("NAME (registered, see `diode weights list`)", "tv:BUILDER", "yolov8:SPEC", "darknet:CFG",
              "PATH.pt (Ultralytics checkpoint)")


def create_adapter(spec: str, *, weights: PathLike | None = None, num_classes: int | None = None,
                   class_names: Sequence[str] | None = None, device: Any = None, trainable: bool = False) -> Any:
    """Build a :class:`~diode.DetectorAdapter` from a spec string (see the module docstring).

    Args:
        spec: what to build.
        weights: a weights file for the architecture (for a registered name: a local copy of the
            registered file, verified by sha256).
        num_classes: the class count of an architecture built from scratch (registered names and
            checkpoints carry their own).
        class_names: names for the classes (their count sets ``num_classes`` when that is not given).
        device: where to put the model.
        trainable: a student (train mode, gradients on) instead of a frozen teacher.

    Raises:
        ValueError: an unknown spec (the message lists the forms), a missing file, or weights that
            do not fit the architecture.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"adapter spec must be a non-empty string, one of: {'; '.join(SPEC_FORMS)}")
    names = list(class_names) if class_names is not None else None
    if num_classes is None and names is not None:
        num_classes = len(names)
    kind, _, arch = spec.partition(":") if ":" in spec and not Path(spec).exists() else ("", "", spec)
    if kind == "" and spec in hub.REGISTRY:
        adapter = hub.load(spec, weights=weights, device=device)
    elif kind == "tv":
        from diode.adapters.torchvision import TorchvisionAdapter

        adapter = TorchvisionAdapter.from_name(arch, weights=weights, num_classes=num_classes, class_names=names)
    elif kind in ("yolov8", "ultralytics"):
        adapter = _anchor_free(arch, weights, num_classes, names)
    elif kind == "darknet":
        adapter = _darknet(arch, weights, num_classes, names)
    elif kind == "" and Path(spec).suffix in (".pt", ".pth"):
        if not Path(spec).is_file():
            raise ValueError(f"checkpoint {spec} does not exist")
        from diode.adapters.ultralytics import YOLOv8Adapter

        adapter = YOLOv8Adapter.from_ultralytics(spec, class_names=names)
    else:
        known = ", ".join(n for n, e in hub.REGISTRY.items() if e.format != "torchvision-backbone")
        raise ValueError(f"unknown model {spec!r}: give one of {'; '.join(SPEC_FORMS)} (registered: {known})")
    adapter.to(device)
    if trainable:
        adapter.model.train().requires_grad_(True)
    else:
        adapter.model.eval().requires_grad_(False)
    return adapter


def _state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """A plain state dict written by diode (``student.pt``), read with ``weights_only=True``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for foreign files
        raise ValueError(f"cannot read {path} as a state dict: {e}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state dict (a dict of tensors, as diode writes student.pt)")
    return state


def _anchor_free(arch: str, weights: PathLike | None, num_classes: int | None, names: list[str] | None) -> Any:
    from diode.adapters.ultralytics import YOLOv8Adapter

    if weights is not None and _is_plain_state_dict(weights) is False:
        return YOLOv8Adapter.from_ultralytics(weights, class_names=names)
    if num_classes is None:
        raise ValueError(f"yolov8:{arch} builds a model from scratch: give num_classes (--num-classes)")
    adapter = YOLOv8Adapter.from_spec(arch, num_classes=num_classes, class_names=names)
    if weights is not None:
        _load_strict(adapter.model, _state_dict(weights), weights)
    return adapter


def _darknet(cfg: str, weights: PathLike | None, num_classes: int | None, names: list[str] | None) -> Any:
    from diode.adapters.yolo import YOLOv3Adapter

    if weights is not None and Path(weights).suffix not in (".pt", ".pth"):
        return YOLOv3Adapter.from_darknet(cfg, weights, class_names=names)
    if weights is not None and _is_plain_state_dict(weights) is False:
        return YOLOv3Adapter.from_ultralytics(cfg, weights, class_names=names)
    if weights is not None and num_classes is None:
        num_classes = _darknet_classes(cfg, _state_dict(weights))
    adapter = YOLOv3Adapter.from_config(cfg, num_classes=num_classes, class_names=names)
    if weights is not None:
        _load_strict(adapter.model, _state_dict(weights), weights)
    return adapter


def _darknet_classes(cfg: str, state: dict[str, torch.Tensor]) -> int:
    """The class count a darknet state dict's first head implies."""
    from diode.models.yolo import Darknet

    probe = Darknet(cfg)
    heads = [i for i, d in enumerate(probe.module_defs) if d["type"] == "yolo"]
    key = f"module_list.{heads[0] - 1}.Conv2d.weight"
    if key not in state:
        raise ValueError(f"weights do not fit cfg {cfg!r}: no {key}")
    return int(state[key].shape[0]) // len(probe.anchors[0]) - 5


def _is_plain_state_dict(path: PathLike) -> bool:
    """Whether ``path`` loads with ``weights_only=True`` as a dict of tensors (else: a checkpoint)."""
    if not Path(path).is_file():
        raise ValueError(f"weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a pickled model object or a foreign file
        return False
    return isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())


def _load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], path: PathLike) -> None:
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"{path} does not fit the model: {e}") from e
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{path} does not fit the model: missing keys {result.missing_keys[:5]}, "
                         f"unexpected keys {result.unexpected_keys[:5]}")
