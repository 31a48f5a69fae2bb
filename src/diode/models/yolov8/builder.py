"""Build a plain-torch model of the anchor-free YOLO family from an architecture spec.

A spec is the dictionary that Ultralytics checkpoints carry (their ``yaml``
attribute) and that the bundled ``specs/*.json`` files hold:

- ``nc``: number of classes;
- ``backbone`` and ``head``: lists of layers ``[from, repeats, block, args]``
  (``from`` is ``-1`` for the previous layer, a layer index, or a list of them);
- ``scales``: ``{scale: [depth, width, max_channels]}`` with ``scale`` naming the
  one to use, or the older ``depth_multiple`` / ``width_multiple`` keys.

Scaling, as the family applies it: a block repeated ``n > 1`` times gets
``max(round(n * depth), 1)`` repeats; a block's output channels ``c`` become
``ceil(min(c, max_channels) * width / 8) * 8``. Module and parameter names follow
the checkpoints (``model.<layer>.<attribute>...``) so their state dicts load
strictly.
"""

from __future__ import annotations

import ast
import copy
import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diode.models.yolov8 import blocks

logger = logging.getLogger(__name__)

#: Blocks whose first argument is the output width (scaled) and whose input width is inferred.
_CHANNEL_BLOCKS: dict[str, Callable[..., nn.Module]] = {
    "Conv": blocks.Conv,
    "DWConv": blocks.dw_conv,
    "Bottleneck": blocks.Bottleneck,
    "C2f": blocks.C2f,
    "C3": blocks.C3,
    "C3k": blocks.C3k,
    "C3k2": blocks.C3k2,
    "SPPF": blocks.SPPF,
    "SCDown": blocks.SCDown,
    "PSA": blocks.PSA,
    "C2PSA": blocks.C2PSA,
    "CIB": blocks.CIB,
    "C2fCIB": blocks.C2fCIB,
}
#: Channel blocks whose repeat count is an argument (``n``, third) rather than a stack of copies.
_REPEAT_BLOCKS = frozenset({"C2f", "C3", "C3k", "C3k2", "C2PSA", "C2fCIB"})
_HEADS: dict[str, type[blocks.Detect]] = {"Detect": blocks.Detect, "v10Detect": blocks.v10Detect}
_OTHER_BLOCKS = frozenset({"Concat", "Upsample", "nn.Upsample", "torch.nn.Upsample", "RepVGGDW"})
KNOWN_BLOCKS: tuple[str, ...] = (*_CHANNEL_BLOCKS, *_HEADS, *sorted(_OTHER_BLOCKS))

_BUNDLED = ("yolov8n", "yolov8s", "yolov10n", "yolov10s", "yolo11n", "yolo11s")
_STRIDE_PROBE = 256


def bundled_specs() -> tuple[str, ...]:
    """Names of the specs shipped with diode (``"yolov8n"``, ``"yolov10n"``, ``"yolo11n"``, ...)."""
    return _BUNDLED


def load_spec(spec: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, Any]:
    """A spec as a new dict: a bundled name, a ``.json`` file, or a mapping (deep-copied).

    Raises:
        ValueError: unknown name, unreadable file, or a spec without ``backbone`` / ``head``.
    """
    if isinstance(spec, Mapping):
        out = copy.deepcopy(dict(spec))
    elif isinstance(spec, str) and spec in _BUNDLED:
        text = resources.files("diode.models.yolov8").joinpath("specs", f"{spec}.json").read_text()
        out = json.loads(text)
    elif isinstance(spec, (str, os.PathLike)) and Path(spec).is_file():
        try:
            out = json.loads(Path(spec).read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"spec file {spec} is not JSON ({e}); convert a YAML spec to JSON first") from None
    else:
        raise ValueError(f"spec must be a dict, a .json file or a bundled name ({', '.join(_BUNDLED)}), got {spec!r}")
    if not isinstance(out, dict) or not isinstance(out.get("backbone"), list) or not isinstance(out.get("head"), list):
        raise ValueError("spec needs 'backbone' and 'head' lists of [from, repeats, block, args] layers")
    return out


def make_divisible(x: float, divisor: int = 8) -> int:
    """Smallest multiple of ``divisor`` that is ``>= x``."""
    return math.ceil(x / divisor) * divisor


def resolve_scale(spec: Mapping[str, Any], scale: str | None = None) -> tuple[str | None, float, float, float]:
    """``(scale, depth, width, max_channels)`` of a spec.

    The scale is ``scale`` if given, else the spec's ``scale`` key, else the letter
    after the version in ``yaml_file`` (``yolov8n.yaml`` -> ``n``), else the first
    of ``scales``. Specs without ``scales`` use ``depth_multiple`` / ``width_multiple``.
    """
    scales = spec.get("scales")
    if not scales:
        return None, float(spec.get("depth_multiple", 1.0)), float(spec.get("width_multiple", 1.0)), math.inf
    if scale is None:
        scale = spec.get("scale")
    if scale is None:
        match = re.search(r"yolo(?:v)?\d+([nslmx])", str(spec.get("yaml_file", "")))
        scale = match.group(1) if match else None
    if scale is None:
        scale = next(iter(scales))
        logger.warning("spec names no scale; using the first one, %r", scale)
    if scale not in scales:
        raise ValueError(f"scale {scale!r} is not in the spec's scales ({', '.join(scales)})")
    depth, width, max_channels = scales[scale]
    return scale, float(depth), float(width), float(max_channels)


def _literal(arg: Any, nc: int) -> Any:
    if not isinstance(arg, str):
        return arg
    if arg == "nc":
        return nc
    try:
        return ast.literal_eval(arg)
    except (ValueError, SyntaxError):
        return arg


class YOLOModel(nn.Module):
    """A YOLOv5u / YOLOv8 / YOLOv10 / YOLO11 detector built from an architecture spec.

    Args:
        spec: a spec mapping, a ``.json`` file or a bundled name (see :func:`load_spec`).
        num_classes: override the spec's ``nc`` (the head is sized for it).
        scale: the scale to build (``"n"``, ``"s"``, ...) when the spec has several.

    Attributes:
        model: the layers, ``nn.Sequential`` (its names give the checkpoint keys).
        spec: the spec as given, with ``nc`` and ``scale`` filled in.
        num_classes: classes of the head.
        strides: pixels per cell of each detection level, e.g. ``(8, 16, 32)``.

    The forward takes ``[B, C, H, W]`` images (``H``, ``W`` multiples of
    ``max(strides)``) and returns the raw head outputs described in
    :mod:`diode.models.yolov8`. A new model has the family's initialisation (PyTorch
    defaults, BN ``eps=1e-3, momentum=0.03``, head bias priors).

    Raises:
        ValueError: unknown block (naming it and its layer index), bad layer
            references, or a spec without a detection head as last layer.
    """

    def __init__(self, spec: str | os.PathLike[str] | Mapping[str, Any], *, num_classes: int | None = None,
                 scale: str | None = None) -> None:
        super().__init__()
        spec = load_spec(spec)
        if num_classes is not None:
            if num_classes < 1:
                raise ValueError(f"num_classes must be >= 1, got {num_classes}")
            spec["nc"] = num_classes
        nc = spec.get("nc")
        if not isinstance(nc, int) or nc < 1:
            raise ValueError(f"spec 'nc' must be a positive int, got {nc!r}; pass num_classes")
        resolved, depth, width, max_channels = resolve_scale(spec, scale)
        if resolved is not None:
            spec["scale"] = resolved
        self.spec = spec
        self.num_classes = nc
        in_channels = int(spec.get("channels", spec.get("ch", 3)))
        layers, froms, save = _build_layers(spec["backbone"] + spec["head"], nc, in_channels, resolved,
                                            depth, width, max_channels)
        self.model = nn.Sequential(*layers)
        self._froms = froms
        self._save = save
        if not isinstance(self.model[-1], blocks.Detect):
            raise ValueError(f"the last layer of a spec must be a detection head ({', '.join(_HEADS)}), "
                             f"got {type(self.model[-1]).__name__}")
        self.strides, self._bn_order = self._probe(in_channels)
        self.head.stride = tuple(float(s) for s in self.strides)
        self.head.bias_init()

    @property
    def head(self) -> blocks.Detect:
        """The detection head (last layer)."""
        head = self.model[-1]
        assert isinstance(head, blocks.Detect)
        return head

    @property
    def reg_max(self) -> int:
        """Distribution bins per box side."""
        return self.head.reg_max

    @property
    def end2end(self) -> bool:
        """``True`` for the YOLOv10 head (one-to-one branch, no NMS at inference)."""
        return self.head.end2end

    @property
    def max_stride(self) -> int:
        """The largest stride: input sizes must be multiples of it."""
        return max(self.strides)

    def forward(self, x: Tensor) -> list[Tensor] | dict[str, list[Tensor]]:
        outputs: list[Any] = []
        y: Any = x
        for i, (layer, f) in enumerate(zip(self.model, self._froms, strict=True)):
            if f != -1:
                y = outputs[f] if isinstance(f, int) else [y if j == -1 else outputs[j] for j in f]
            y = layer(y)
            outputs.append(y if i in self._save else None)
        return y

    def bn_layers(self) -> list[nn.BatchNorm2d]:
        """The BatchNorm layers in the order the forward first calls them.

        Registration order differs inside blocks (``C2f`` registers ``cv2`` before the
        bottlenecks it runs after), so the order is recorded when the model is built.
        """
        modules = dict(self.named_modules())
        return [modules[name] for name in self._bn_order]

    def _probe(self, in_channels: int) -> tuple[tuple[int, ...], list[str]]:
        """Strides (from the head's output sizes) and BN call order, from one forward of zeros."""
        order: list[str] = []
        handles = [m.register_forward_pre_hook(lambda mod, args, name=name: order.append(name))
                   for name, m in self.named_modules() if isinstance(m, nn.BatchNorm2d)]
        training = self.training
        self.eval()
        try:
            with torch.no_grad():
                raw = self(torch.zeros(1, in_channels, _STRIDE_PROBE, _STRIDE_PROBE))
        finally:
            self.train(training)
            for h in handles:
                h.remove()
        levels = raw["one2many"] if isinstance(raw, dict) else raw
        return tuple(_STRIDE_PROBE // level.shape[-1] for level in levels), list(dict.fromkeys(order))


def _build_layers(layers: Sequence[Any], nc: int, in_channels: int, scale: str | None, depth: float,
                  width: float, max_channels: float) -> tuple[list[nn.Module], list[int | list[int]], set[int]]:
    ch = [in_channels]
    modules: list[nn.Module] = []
    froms: list[int | list[int]] = []
    save: set[int] = set()
    legacy = not any(isinstance(layer, list | tuple) and len(layer) == 4 and layer[2] == "C3k2" for layer in layers)
    for i, layer in enumerate(layers):
        if not isinstance(layer, list | tuple) or len(layer) != 4:
            raise ValueError(f"layer {i}: expected [from, repeats, block, args], got {layer!r}")
        f, n, name, args = layer
        if not isinstance(name, str):
            raise ValueError(f"layer {i}: block name must be a string, got {name!r}")
        f = _check_from(f, i)
        srcs = [f] if isinstance(f, int) else f
        c_in = [ch[j] for j in srcs] if i else [in_channels]
        args = [_literal(a, nc) for a in (args or [])]
        n = max(round(n * depth), 1) if n > 1 else n
        if name in _CHANNEL_BLOCKS:
            c1 = c_in[0]
            c2 = args[0] if args else c1
            if c2 != nc:  # the family leaves a width equal to nc unscaled; checkpoints depend on it
                c2 = make_divisible(min(c2, max_channels) * width, 8)
            args = [c1, c2, *args[1:]]
            if name in _REPEAT_BLOCKS:
                args.insert(2, n)
                n = 1
            if name == "C3k2" and scale in ("m", "l", "x"):
                args = args + [True] if len(args) < 4 else [*args[:3], True, *args[4:]]
            build: Callable[..., nn.Module] = _CHANNEL_BLOCKS[name]
        elif name in _HEADS:
            head_args: list[Any] = [args[0] if args else nc, c_in]
            c2 = 0
            build = _HEADS[name]
            if name == "Detect":
                head_args.append(16)
                head_args.append(legacy)
            args = head_args
        elif name == "Concat":
            c2 = sum(c_in)
            build = blocks.Concat
        elif name in ("Upsample", "nn.Upsample", "torch.nn.Upsample"):
            c2 = c_in[0]
            build = nn.Upsample
        elif name == "RepVGGDW":
            c2 = c_in[0]
            args = [c2]
            build = blocks.RepVGGDW
        else:
            raise ValueError(f"layer {i}: unknown block {name!r}; diode builds {', '.join(KNOWN_BLOCKS)}")
        try:
            module = build(*args) if n == 1 else nn.Sequential(*(build(*args) for _ in range(n)))
        except (TypeError, ValueError) as e:
            raise ValueError(f"layer {i} ({name} with args {args}): {e}") from e
        modules.append(module)
        froms.append(f)
        save.update(j for j in srcs if j != -1)
        if i == 0:
            ch = []
        ch.append(c2)
    return modules, froms, save


def _check_from(f: Any, i: int) -> int | list[int]:
    srcs = [f] if isinstance(f, int) else list(f) if isinstance(f, list | tuple) else None
    if not srcs or not all(isinstance(j, int) for j in srcs):
        raise ValueError(f"layer {i}: 'from' must be an int or a list of ints, got {f!r}")
    if i == 0:
        if srcs != [-1]:
            raise ValueError(f"layer 0 can only read the input ('from' -1), got {f!r}")
        return -1
    for j in srcs:
        if j != -1 and not -i <= j < i:
            raise ValueError(f"layer {i}: 'from' refers to layer {j}, which is not an earlier layer")
    norm = [j if j == -1 else j % i for j in srcs]
    return norm[0] if isinstance(f, int) else norm
