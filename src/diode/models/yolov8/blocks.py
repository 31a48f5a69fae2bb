"""Building blocks of the anchor-free YOLO family, written from the published architecture descriptions.

Attribute names (``conv``, ``bn``, ``cv1``, ``m``, ``one2one_cv2``, ...) follow the
layout of the family's checkpoints so that their state dicts load strictly. Every
block takes and returns ``[B, C, H, W]`` feature maps; the heads return the raw
outputs described in :mod:`diode.models.yolov8`.

BatchNorm layers use ``eps=1e-3, momentum=0.03``, the family's training settings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from diode.models.yolov8.boxes import dfl_expectation

BN_EPS = 1e-3
BN_MOMENTUM = 0.03


def autopad(k: int, p: int | None = None, d: int = 1) -> int:
    """'Same' padding of a ``k x k`` kernel with dilation ``d`` (``p`` when given)."""
    if p is not None:
        return p
    return (d * (k - 1) + 1) // 2


class Conv(nn.Module):
    """Convolution without bias, BatchNorm, then SiLU (or another activation, or none).

    Args:
        c1: input channels.
        c2: output channels.
        k: kernel size.
        s: stride.
        p: padding (default: 'same' for stride 1).
        g: groups.
        d: dilation.
        act: ``True`` for SiLU, ``False`` for none, or a module.
    """

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: int | None = None, g: int = 1, d: int = 1,
                 act: bool | nn.Module = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = nn.SiLU() if act is True else act if isinstance(act, nn.Module) else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


def dw_conv(c1: int, c2: int, k: int = 1, s: int = 1, act: bool | nn.Module = True) -> Conv:
    """Depthwise :class:`Conv` (groups = gcd of the channel counts)."""
    return Conv(c1, c2, k, s, g=math.gcd(c1, c2), act=act)


class Bottleneck(nn.Module):
    """Two convolutions ``k[0]`` then ``k[1]`` with hidden width ``int(c2 * e)``, residual when ``c1 == c2``."""

    def __init__(self, c1: int, c2: int, shortcut: bool = True, g: int = 1,
                 k: tuple[int, int] = (3, 3), e: float = 0.5) -> None:
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, k[0], 1)
        self.cv2 = Conv(c_, c2, k[1], 1, g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x: Tensor) -> Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """CSP block with two convolutions (YOLOv8): split, ``n`` bottlenecks chained on one half, concat all.

    ``cv1`` makes ``2c`` channels (``c = int(c2 * e)``) split into two halves; each
    bottleneck reads the last piece; ``cv2`` fuses the ``(2 + n) c`` concatenated channels.
    """

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = False, g: int = 1, e: float = 0.5) -> None:
        super().__init__()
        self.c = int(c2 * e)
        self.cv1 = Conv(c1, 2 * self.c, 1, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, self.c, shortcut, g, k=(3, 3), e=1.0) for _ in range(n))

    def forward(self, x: Tensor) -> Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class C3(nn.Module):
    """CSP block with three convolutions (YOLOv5): ``cv3(cat(m(cv1(x)), cv2(x)))``."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5) -> None:
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c1, c_, 1, 1)
        self.cv3 = Conv(2 * c_, c2, 1)
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, g, k=(1, 3), e=1.0) for _ in range(n)))

    def forward(self, x: Tensor) -> Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class C3k(C3):
    """:class:`C3` whose bottlenecks use ``k x k`` kernels in both convolutions (YOLO11)."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5,
                 k: int = 3) -> None:
        super().__init__(c1, c2, n, shortcut, g, e)
        c_ = int(c2 * e)
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, g, k=(k, k), e=1.0) for _ in range(n)))


class C3k2(C2f):
    """:class:`C2f` whose inner blocks are :class:`C3k` (``c3k``) or half-width bottlenecks (YOLO11)."""

    def __init__(self, c1: int, c2: int, n: int = 1, c3k: bool = False, e: float = 0.5, g: int = 1,
                 shortcut: bool = True) -> None:
        super().__init__(c1, c2, n, shortcut, g, e)
        self.m = nn.ModuleList(
            C3k(self.c, self.c, 2, shortcut, g) if c3k else Bottleneck(self.c, self.c, shortcut, g)
            for _ in range(n)
        )


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained ``k x k`` max-pools of a halved map, concatenated."""

    def __init__(self, c1: int, c2: int, k: int = 5) -> None:
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_ * 4, c2, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x: Tensor) -> Tensor:
        y = [self.cv1(x)]
        for _ in range(3):
            y.append(self.m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class SCDown(nn.Module):
    """Spatial-channel decoupled downsampling (YOLOv10): pointwise conv, then a depthwise strided conv."""

    def __init__(self, c1: int, c2: int, k: int, s: int) -> None:
        super().__init__()
        self.cv1 = Conv(c1, c2, 1, 1)
        self.cv2 = Conv(c2, c2, k, s, g=c2, act=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.cv2(self.cv1(x))


class Attention(nn.Module):
    """Multi-head self-attention over the ``H * W`` positions, plus a depthwise positional conv of the values.

    Per head: keys and queries of ``int(head_dim * attn_ratio)`` channels, values of
    ``head_dim = dim // num_heads`` channels, all from one pointwise ``qkv`` conv.
    """

    def __init__(self, dim: int, num_heads: int = 8, attn_ratio: float = 0.5) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"Attention needs dim divisible by num_heads >= 1, got dim={dim}, num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.key_dim = int(self.head_dim * attn_ratio)
        self.scale = self.key_dim**-0.5
        self.qkv = Conv(dim, dim + 2 * self.key_dim * num_heads, 1, act=False)
        self.proj = Conv(dim, dim, 1, act=False)
        self.pe = Conv(dim, dim, 3, 1, g=dim, act=False)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(x).view(b, self.num_heads, 2 * self.key_dim + self.head_dim, h * w)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.head_dim], dim=2)
        attn = ((q.transpose(-2, -1) @ k) * self.scale).softmax(dim=-1)
        out = (v @ attn.transpose(-2, -1)).view(b, c, h, w) + self.pe(v.reshape(b, c, h, w))
        return self.proj(out)


def _ffn(c: int) -> nn.Sequential:
    return nn.Sequential(Conv(c, 2 * c, 1), Conv(2 * c, c, 1, act=False))


class PSA(nn.Module):
    """Partial self-attention (YOLOv10): attention and a feed-forward on half the channels, residual."""

    def __init__(self, c1: int, c2: int, e: float = 0.5) -> None:
        super().__init__()
        if c1 != c2:
            raise ValueError(f"PSA keeps the channel count: got c1={c1}, c2={c2}")
        self.c = int(c1 * e)
        self.cv1 = Conv(c1, 2 * self.c, 1, 1)
        self.cv2 = Conv(2 * self.c, c1, 1)
        self.attn = Attention(self.c, attn_ratio=0.5, num_heads=max(1, self.c // 64))
        self.ffn = _ffn(self.c)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.cv1(x).split((self.c, self.c), dim=1)
        b = b + self.attn(b)
        b = b + self.ffn(b)
        return self.cv2(torch.cat((a, b), 1))


class PSABlock(nn.Module):
    """Attention then feed-forward, each with a residual when ``shortcut`` (the unit of :class:`C2PSA`)."""

    def __init__(self, c: int, attn_ratio: float = 0.5, num_heads: int = 4, shortcut: bool = True) -> None:
        super().__init__()
        self.attn = Attention(c, attn_ratio=attn_ratio, num_heads=num_heads)
        self.ffn = _ffn(c)
        self.add = shortcut

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(x) if self.add else self.attn(x)
        return x + self.ffn(x) if self.add else self.ffn(x)


class C2PSA(nn.Module):
    """CSP block of ``n`` :class:`PSABlock` on half the channels (YOLO11)."""

    def __init__(self, c1: int, c2: int, n: int = 1, e: float = 0.5) -> None:
        super().__init__()
        if c1 != c2:
            raise ValueError(f"C2PSA keeps the channel count: got c1={c1}, c2={c2}")
        self.c = int(c1 * e)
        self.cv1 = Conv(c1, 2 * self.c, 1, 1)
        self.cv2 = Conv(2 * self.c, c1, 1)
        self.m = nn.Sequential(*(PSABlock(self.c, attn_ratio=0.5, num_heads=max(1, self.c // 64))
                                 for _ in range(n)))

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.cv1(x).split((self.c, self.c), dim=1)
        return self.cv2(torch.cat((a, self.m(b)), 1))


class RepVGGDW(nn.Module):
    """Depthwise 7x7 and 3x3 convolutions (with BN) summed, then SiLU (YOLOv10's large-kernel unit)."""

    def __init__(self, ed: int) -> None:
        super().__init__()
        self.conv = Conv(ed, ed, 7, 1, 3, g=ed, act=False)
        self.conv1 = Conv(ed, ed, 3, 1, 1, g=ed, act=False)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv(x) + self.conv1(x))


class CIB(nn.Module):
    """Compact inverted block (YOLOv10): depthwise / pointwise convolutions, residual when ``c1 == c2``.

    ``lk`` swaps the middle depthwise 3x3 for a :class:`RepVGGDW` large kernel.
    """

    def __init__(self, c1: int, c2: int, shortcut: bool = True, e: float = 0.5, lk: bool = False) -> None:
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = nn.Sequential(
            Conv(c1, c1, 3, g=c1),
            Conv(c1, 2 * c_, 1),
            RepVGGDW(2 * c_) if lk else Conv(2 * c_, 2 * c_, 3, g=2 * c_),
            Conv(2 * c_, c2, 1),
            Conv(c2, c2, 3, g=c2),
        )
        self.add = shortcut and c1 == c2

    def forward(self, x: Tensor) -> Tensor:
        y = self.cv1(x)
        return x + y if self.add else y


class C2fCIB(C2f):
    """:class:`C2f` whose inner blocks are :class:`CIB` (YOLOv10)."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = False, lk: bool = False, g: int = 1,
                 e: float = 0.5) -> None:
        super().__init__(c1, c2, n, shortcut, g, e)
        self.m = nn.ModuleList(CIB(self.c, self.c, shortcut, e=1.0, lk=lk) for _ in range(n))


class Concat(nn.Module):
    """Concatenate a list of feature maps along ``dimension``."""

    def __init__(self, dimension: int = 1) -> None:
        super().__init__()
        self.d = dimension

    def forward(self, x: Sequence[Tensor]) -> Tensor:
        return torch.cat(list(x), self.d)


class DFL(nn.Module):
    """Distribution focal loss integral: expected side distances from ``reg_max``-bin logits.

    The family stores the bin positions ``0 .. reg_max - 1`` as the frozen weight of
    a 1x1 conv (kept here so checkpoints load strictly); the expectation itself is
    :func:`~diode.models.yolov8.boxes.dfl_expectation`.
    """

    def __init__(self, c1: int = 16) -> None:
        super().__init__()
        self.c1 = c1
        self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.arange(c1, dtype=torch.float32).view(1, c1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        """``[B, 4 * c1, A]`` logits -> ``[B, A, 4]`` distances in grid units."""
        return dfl_expectation(x, self.c1)


def _box_branch(c: int, c2: int, reg_max: int) -> nn.Sequential:
    return nn.Sequential(Conv(c, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, 4 * reg_max, 1))


def _cls_branch(c: int, c3: int, nc: int, legacy: bool) -> nn.Sequential:
    if legacy:
        return nn.Sequential(Conv(c, c3, 3), Conv(c3, c3, 3), nn.Conv2d(c3, nc, 1))
    return nn.Sequential(
        nn.Sequential(dw_conv(c, c, 3), Conv(c, c3, 1)),
        nn.Sequential(dw_conv(c3, c3, 3), Conv(c3, c3, 1)),
        nn.Conv2d(c3, nc, 1),
    )


def _output_bias(branch: nn.Module) -> Tensor:
    assert isinstance(branch, nn.Sequential)
    conv = branch[-1]
    assert isinstance(conv, nn.Conv2d) and conv.bias is not None
    return conv.bias


class Detect(nn.Module):
    """Decoupled anchor-free head: per level a box branch (``cv2``) and a class branch (``cv3``).

    Args:
        nc: number of classes.
        ch: input channels per level.
        reg_max: distribution bins per box side.
        legacy: the class branch of YOLOv5u/v8 (two 3x3 convs); ``False`` gives the
            lighter depthwise branch of YOLO11 and YOLOv10.

    The forward returns ``list[Tensor]``, one ``[B, 4 * reg_max + nc, H_i, W_i]`` per
    level (box-distribution logits then class logits); decoding lives in
    :mod:`diode.models.yolov8.decode`. ``stride`` is set by the model builder.
    """

    end2end = False

    def __init__(self, nc: int = 80, ch: Sequence[int] = (), reg_max: int = 16, legacy: bool = True) -> None:
        super().__init__()
        if not ch:
            raise ValueError("Detect needs the input channels of at least one level (ch)")
        self.nc = nc
        self.nl = len(ch)
        self.reg_max = reg_max
        self.no = nc + 4 * reg_max
        self.stride: tuple[float, ...] = ()
        c2 = max(16, ch[0] // 4, 4 * reg_max)
        c3 = max(ch[0], min(nc, 100))
        self.cv2 = nn.ModuleList(_box_branch(c, c2, reg_max) for c in ch)
        self.cv3 = nn.ModuleList(_cls_branch(c, c3, nc, legacy) for c in ch)
        self.dfl = DFL(reg_max) if reg_max > 1 else nn.Identity()

    def _levels(self, x: Sequence[Tensor], box: nn.ModuleList, cls: nn.ModuleList) -> list[Tensor]:
        return [torch.cat((box[i](xi), cls[i](xi)), 1) for i, xi in enumerate(x)]

    def forward(self, x: Sequence[Tensor]) -> list[Tensor] | dict[str, list[Tensor]]:
        return self._levels(x, self.cv2, self.cv3)

    def bias_init(self) -> None:
        """The family's prior for training from scratch: box logits 1, class logits ~ 5 objects per 640 image."""
        if not self.stride:
            raise ValueError("Detect.stride is not set; build the head through diode.models.yolov8.build_model")
        for branches in self._branches():
            for box, cls, s in zip(branches[0], branches[1], self.stride, strict=True):
                nn.init.constant_(_output_bias(box), 1.0)
                nn.init.constant_(_output_bias(cls), math.log(5 / self.nc / (640 / s) ** 2))

    def _branches(self) -> list[tuple[nn.ModuleList, nn.ModuleList]]:
        return [(self.cv2, self.cv3)]


class v10Detect(Detect):  # noqa: N801 - the family's block name, used verbatim in specs
    """YOLOv10 head: a one-to-many branch (``cv2``/``cv3``) and a one-to-one branch (``one2one_cv2``/``cv3``).

    Both branches have the same layout (the depthwise class branch). The forward
    returns ``{"one2many": [...], "one2one": [...]}``, each a list like
    :class:`Detect`'s. In training mode the one-to-one branch reads detached
    features, as the family trains it (its loss does not reach the shared
    layers); in eval mode both branches pass gradients, so image synthesis sees
    both.
    """

    end2end = True

    def __init__(self, nc: int = 80, ch: Sequence[int] = (), reg_max: int = 16) -> None:
        super().__init__(nc, ch, reg_max, legacy=False)
        c2 = max(16, ch[0] // 4, 4 * reg_max)
        c3 = max(ch[0], min(nc, 100))
        self.one2one_cv2 = nn.ModuleList(_box_branch(c, c2, reg_max) for c in ch)
        self.one2one_cv3 = nn.ModuleList(_cls_branch(c, c3, nc, legacy=False) for c in ch)

    def forward(self, x: Sequence[Tensor]) -> list[Tensor] | dict[str, list[Tensor]]:
        one2many = self._levels(x, self.cv2, self.cv3)
        x_o2o = [xi.detach() for xi in x] if self.training else list(x)
        return {"one2many": one2many, "one2one": self._levels(x_o2o, self.one2one_cv2, self.one2one_cv3)}

    def _branches(self) -> list[tuple[nn.ModuleList, nn.ModuleList]]:
        return [(self.cv2, self.cv3), (self.one2one_cv2, self.one2one_cv3)]
