"""The darknet YOLOv3 family as a PyTorch module, built from a darknet cfg.

Layer ``i`` of the cfg (counting from 0 after ``[net]``) is ``module_list[i]``,
and convolution blocks are ``nn.Sequential`` with children ``Conv2d``,
``BatchNorm2d`` (when the cfg asks for batch norm) and the activation, so state
dict keys read ``module_list.<i>.Conv2d.weight``,
``module_list.<i>.BatchNorm2d.running_mean``, ... (the Ultralytics archive
layout). Channel and size arithmetic follows darknet exactly.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cfg import parse_cfg

__all__ = ["Darknet"]

logger = logging.getLogger(__name__)

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "mish": nn.Mish,
    "logistic": nn.Sigmoid,
}


def _activation(name: str, where: str) -> nn.Module | None:
    """The activation module for a darknet activation name, ``None`` for linear."""
    if name == "linear":
        return None
    if name == "leaky":
        return nn.LeakyReLU(0.1, inplace=True)
    if name in _ACTIVATIONS:
        return _ACTIVATIONS[name]()
    raise ValueError(
        f"{where}: unsupported activation {name!r}; supported: leaky, linear, "
        + ", ".join(sorted(_ACTIVATIONS))
    )


class MaxPoolDarknet(nn.Module):
    """Darknet's max pooling: ``padding`` (default ``size - 1``) split as
    ``padding // 2`` before and the rest after, padded with ``-inf``.

    Output size is ``(H + padding - size) // stride + 1``, so ``size=2, stride=1``
    keeps the spatial size and ``size=5/9/13, stride=1`` (SPP) too.
    """

    def __init__(self, size: int, stride: int, padding: int) -> None:
        super().__init__()
        self.size, self.stride, self.padding = size, stride, padding
        before = padding // 2
        after = padding - before
        # nn.MaxPool2d pads symmetrically with -inf; only the odd case needs F.pad.
        self._symmetric = before == after
        self._pad = (before, after, before, after)

    def forward(self, x: Tensor) -> Tensor:
        if self._symmetric:
            return F.max_pool2d(x, self.size, self.stride, self.padding // 2)
        if self._pad[0] == 0 and all(self._tail_unused(n) for n in x.shape[-2:]):
            # e.g. size 2 stride 2 on an even map: no window reaches the padding, skip the copy
            return F.max_pool2d(x, self.size, self.stride)
        return F.max_pool2d(F.pad(x, self._pad, value=float("-inf")), self.size, self.stride)

    def _tail_unused(self, n: int) -> bool:
        after = self._pad[1]
        return n >= self.size and (n - self.size) // self.stride == (n + after - self.size) // self.stride

    def extra_repr(self) -> str:
        return f"size={self.size}, stride={self.stride}, padding={self.padding}"


class Route(nn.Module):
    """Concatenation of earlier layer outputs on the channel axis."""

    def __init__(self, layers: list[int]) -> None:
        super().__init__()
        self.layers = layers

    def forward(self, xs: list[Tensor]) -> Tensor:
        return xs[0] if len(xs) == 1 else torch.cat(xs, dim=1)

    def extra_repr(self) -> str:
        return f"layers={self.layers}"


class Shortcut(nn.Module):
    """Residual sum of the previous layer and layer ``source``, then an activation."""

    def __init__(self, source: int, activation: nn.Module | None) -> None:
        super().__init__()
        self.source = source
        self.activation = activation

    def forward(self, x: Tensor, other: Tensor) -> Tensor:
        out = x + other
        return out if self.activation is None else self.activation(out)

    def extra_repr(self) -> str:
        return f"source={self.source}"


class YOLOLayer(nn.Module):
    """A detection head: reshapes the previous conv's output, no activation.

    ``[B, A*(5+C), H, W]`` becomes ``[B, A, H, W, 5+C]`` raw logits, channel order
    per anchor ``tx, ty, tw, th, obj, cls_0..cls_{C-1}``.
    """

    anchors: Tensor

    def __init__(self, anchors: Tensor, num_classes: int, stride: int) -> None:
        super().__init__()
        self.register_buffer("anchors", anchors, persistent=False)
        self.num_anchors = int(anchors.shape[0])
        self.num_classes = num_classes
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        return x.view(b, self.num_anchors, 5 + self.num_classes, h, w).permute(0, 1, 3, 4, 2)

    def extra_repr(self) -> str:
        return (
            f"anchors={self.anchors.tolist()}, num_classes={self.num_classes}, stride={self.stride}"
        )


class Darknet(nn.Module):
    """A darknet YOLO detector (YOLOv3, YOLOv3-tiny, YOLOv3-SPP, ...) built from a cfg.

    Args:
        cfg: a bundled cfg name (``"yolov3-tiny"``), a path to a ``.cfg`` file,
            cfg text, or an already parsed cfg (see
            :func:`~diode.models.yolo.cfg.parse_cfg`; it is copied, not modified).
        num_classes: if given, overrides ``classes`` in every ``[yolo]`` section
            and sets the filters of the convolution right before each ``[yolo]``
            to ``A * (5 + num_classes)``.
        bn_eps: BatchNorm epsilon (darknet uses 1e-5).
        bn_momentum: BatchNorm running-statistics momentum (PyTorch convention).

    Attributes:
        module_list: ``nn.ModuleList``, entry ``i`` is cfg layer ``i``.
        module_defs: the parsed layer sections, entry ``i`` describes
            ``module_list[i]`` (the ``[net]`` section is :attr:`net_def`).
        net_def: the parsed ``[net]`` section.
        cfg_name: the bundled name or file stem of the cfg (used in messages).
        num_classes: number of classes of the ``[yolo]`` heads.
        strides: per head, the total downsampling factor at that head.
        input_size: ``(height, width)`` from ``[net]``.
        in_channels: input channels from ``[net]`` (3 for the bundled cfgs).
        max_stride: input height and width must be multiples of this.
    """

    def __init__(
        self,
        cfg: str | os.PathLike[str] | list[dict[str, Any]],
        *,
        num_classes: int | None = None,
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
    ) -> None:
        super().__init__()
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
        ):
            raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}")
        if isinstance(cfg, list):
            defs = copy.deepcopy(cfg)
            self.cfg_name = "<parsed cfg>"
        else:
            defs = parse_cfg(cfg)
            self.cfg_name = _cfg_name(cfg)
        if not defs or defs[0].get("type") != "net":
            raise ValueError("cfg must start with a [net] section")
        self.net_def: dict[str, Any] = defs[0]
        self.module_defs: list[dict[str, Any]] = defs[1:]
        if num_classes is not None:
            self._override_classes(num_classes)
        self.input_size = (
            int(self.net_def.get("height", 416)),
            int(self.net_def.get("width", 416)),
        )
        self.in_channels = int(self.net_def.get("channels", 3))
        self._build(bn_eps, bn_momentum)
        heads = self._heads()
        if not heads:
            raise ValueError(f"cfg {self.cfg_name!r} has no [yolo] layer")
        classes = {h.num_classes for h in heads}
        if len(classes) != 1:
            raise ValueError(
                f"cfg {self.cfg_name!r}: [yolo] layers disagree on classes {sorted(classes)}; "
                "pass num_classes= to set them all"
            )
        self.num_classes: int = classes.pop()
        self.strides: list[int] = [h.stride for h in heads]

    @property
    def anchors(self) -> list[Tensor]:
        """Per head, the anchors ``[A, 2]`` (w, h) in input pixels, on the model's device."""
        return [h.anchors for h in self._heads()]

    def conv_layers(self) -> list[tuple[nn.Conv2d, nn.BatchNorm2d | None]]:
        """Every convolution with its BatchNorm (or ``None``), in cfg order."""
        out: list[tuple[nn.Conv2d, nn.BatchNorm2d | None]] = []
        for kind, module in zip(self._kinds, self.module_list, strict=True):
            if kind == "convolutional":
                children = dict(module.named_children())
                out.append((children["Conv2d"], children.get("BatchNorm2d")))  # type: ignore[arg-type]
        return out

    def bn_layers(self) -> list[nn.BatchNorm2d]:
        """Every BatchNorm layer, in forward order."""
        return [bn for _, bn in self.conv_layers() if bn is not None]

    def forward(self, x: Tensor) -> list[Tensor]:
        """Raw head outputs.

        Args:
            x: images ``[B, C, H, W]`` (RGB in ``[0, 1]`` for the bundled cfgs), H
                and W multiples of :attr:`max_stride`.

        Returns:
            One tensor per ``[yolo]`` layer in cfg order, ``[B, A, H_i, W_i, 5 + C]``
            raw logits (no sigmoid/exp), ``H_i = H / strides[i]``.
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"x must be [B, {self.in_channels}, H, W] images, got shape {tuple(x.shape)}"
            )
        if x.shape[2] % self.max_stride or x.shape[3] % self.max_stride:
            raise ValueError(
                f"x height and width must be multiples of {self.max_stride}, got "
                f"{x.shape[2]}x{x.shape[3]}; resize or pad the images"
            )
        saved: dict[int, Tensor] = {}
        heads: list[Tensor] = []
        for i, (kind, sources, module) in enumerate(
            zip(self._kinds, self._sources, self.module_list, strict=True)
        ):
            if kind == "route":
                x = module([saved[j] for j in sources])
            elif kind == "shortcut":
                x = module(x, saved[sources[0]])
            elif kind == "yolo":
                heads.append(module(x))
            else:
                x = module(x)
            if i in self._keep:
                saved[i] = x
        return heads

    def _heads(self) -> list[YOLOLayer]:
        return [m for m in self.module_list if isinstance(m, YOLOLayer)]

    def _override_classes(self, num_classes: int) -> None:
        for i, d in enumerate(self.module_defs):
            if d["type"] != "yolo":
                continue
            prev = self.module_defs[i - 1] if i > 0 else None
            if prev is None or prev["type"] != "convolutional":
                raise ValueError(
                    f"cfg {self.cfg_name!r} layer {i}: num_classes needs a [convolutional] "
                    "right before each [yolo]"
                )
            d["classes"] = num_classes
            prev["filters"] = len(_yolo_mask(d)) * (5 + num_classes)

    def _build(self, bn_eps: float, bn_momentum: float) -> None:
        """Create ``module_list`` and the routing tables the forward loop reads."""
        self.module_list = nn.ModuleList()
        channels: list[int] = []
        strides: list[int] = []
        kinds: list[str] = []
        sources: list[tuple[int, ...]] = []
        c_in, stride = self.in_channels, 1
        for i, d in enumerate(self.module_defs):
            kind = d["type"]
            where = f"cfg {self.cfg_name!r} layer {i} [{kind}]"
            if i > 0 and kinds[-1] == "yolo" and kind != "route":
                raise ValueError(
                    f"{where}: a layer after [yolo] must be a [route] (the yolo output is not "
                    "a feature map)"
                )
            src: tuple[int, ...] = ()
            module: nn.Module
            if kind == "convolutional":
                module, c_out, s = _conv_block(d, c_in, bn_eps, bn_momentum, where)
                stride *= s
            elif kind == "maxpool":
                s = int(d.get("stride", 1))
                size = int(d.get("size", s))
                module = MaxPoolDarknet(size, s, int(d.get("padding", size - 1)))
                c_out = c_in
                stride *= s
            elif kind == "upsample":
                s = int(d.get("stride", 2))
                if s < 1 or stride % s:
                    raise ValueError(
                        f"{where}: stride must be a positive divisor of the current "
                        f"downsampling {stride}, got {s}"
                    )
                module = nn.Upsample(scale_factor=s, mode="nearest")
                c_out = c_in
                stride //= s
            elif kind == "route":
                src = tuple(_absolute(j, i, where) for j in _int_list(d, "layers", where))
                for j in src:
                    if kinds[j] == "yolo":
                        raise ValueError(f"{where}: cannot route to [yolo] layer {j}")
                if len({strides[j] for j in src}) != 1:
                    raise ValueError(
                        f"{where}: routed layers {list(src)} have different spatial sizes "
                        f"(downsampling {[strides[j] for j in src]})"
                    )
                module = Route(list(src))
                c_out = sum(channels[j] for j in src)
                stride = strides[src[0]]
            elif kind == "shortcut":
                src = (_absolute(int(d.get("from", -3)), i, where),)
                j = src[0]
                if kinds[j] == "yolo" or channels[j] != c_in or strides[j] != stride:
                    raise ValueError(
                        f"{where}: 'from' layer {j} ({channels[j]} channels, downsampling "
                        f"{strides[j]}) does not match the previous layer ({c_in} channels, "
                        f"downsampling {stride})"
                    )
                module = Shortcut(j, _activation(d.get("activation", "linear"), where))
                c_out = c_in
            else:
                module = _yolo_layer(d, c_in, stride, where)
                c_out = c_in
            self.module_list.append(module)
            channels.append(c_out)
            strides.append(stride)
            kinds.append(kind)
            sources.append(src)
            c_in = c_out
        self._kinds = tuple(kinds)
        self._sources = tuple(sources)
        self._keep = frozenset(j for src in sources for j in src)
        self.max_stride = max(strides, default=1)
        logger.debug(
            "built %s: %d layers, %d heads", self.cfg_name, len(kinds), kinds.count("yolo")
        )


def _cfg_name(cfg: str | os.PathLike[str]) -> str:
    if isinstance(cfg, str) and "\n" in cfg:
        return "<cfg text>"
    return Path(cfg).stem


def _absolute(j: int, i: int, where: str) -> int:
    """Darknet layer reference: negative is relative to layer ``i``, else absolute."""
    k = i + j if j < 0 else j
    if not 0 <= k < i:
        raise ValueError(
            f"{where}: layer reference {j} points to layer {k}, "
            f"must be an earlier layer (0..{i - 1})"
        )
    return k


def _int_list(d: dict[str, Any], key: str, where: str) -> list[int]:
    value = d.get(key)
    values: list[Any] = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, int) for v in values):
        raise ValueError(
            f"{where}: {key} must be a comma-separated list of integers, got {value!r}"
        )
    return values


def _yolo_mask(d: dict[str, Any]) -> list[int]:
    """Darknet's default mask is every anchor (``num`` of them)."""
    if "mask" in d:
        return list(d["mask"])
    return list(range(int(d.get("num", len(d.get("anchors", []))))))


def _conv_block(
    d: dict[str, Any], c_in: int, bn_eps: float, bn_momentum: float, where: str
) -> tuple[nn.Sequential, int, int]:
    if int(d.get("groups", 1)) != 1:
        raise ValueError(f"{where}: grouped convolutions (groups != 1) are not supported")
    bn = bool(d.get("batch_normalize", 0))
    filters = int(d.get("filters", 1))
    size = int(d.get("size", 1))
    stride = int(d.get("stride", 1))
    pad = size // 2 if d.get("pad", 0) else int(d.get("padding", 0))
    if filters < 1 or size < 1 or stride < 1:
        raise ValueError(
            f"{where}: filters, size and stride must be positive, got {filters}, {size}, {stride}"
        )
    block = nn.Sequential()
    block.add_module("Conv2d", nn.Conv2d(c_in, filters, size, stride, pad, bias=not bn))
    if bn:
        block.add_module("BatchNorm2d", nn.BatchNorm2d(filters, eps=bn_eps, momentum=bn_momentum))
    name = d.get("activation", "logistic")
    act = _activation(name, where)
    if act is not None:
        block.add_module(name, act)
    return block, filters, stride


def _yolo_layer(d: dict[str, Any], c_in: int, stride: int, where: str) -> YOLOLayer:
    all_anchors = d.get("anchors")
    if not all_anchors:
        raise ValueError(f"{where}: anchors are missing")
    mask = _yolo_mask(d)
    if not mask or any(not 0 <= m < len(all_anchors) for m in mask):
        raise ValueError(f"{where}: mask {mask} must index the {len(all_anchors)} anchors")
    classes = int(d.get("classes", 20))
    if c_in != len(mask) * (5 + classes):
        raise ValueError(
            f"{where}: the previous layer has {c_in} channels but {len(mask)} anchors x "
            f"(5 + {classes} classes) = {len(mask) * (5 + classes)} are needed; fix the "
            "filters of the conv before [yolo] or pass num_classes="
        )
    anchors = torch.tensor([all_anchors[m] for m in mask], dtype=torch.float32)
    return YOLOLayer(anchors, classes, stride)
