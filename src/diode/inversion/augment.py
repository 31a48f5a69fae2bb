"""Differentiable, box-aware, batched augmentations for the synthesis loop.

Every op exists as a function and as an ``nn.Module`` twin (kornia style) and works on
targets in packed form::

    images [B, C, H, W] float, boxes [M, 4] float xyxy pixels,
    batch_index [M] long (image of each box), valid [M] bool

and returns ``(images, boxes, batch_index, valid)`` so ops chain. Geometric ops move
the boxes with the same parameters as the pixels and clip them to the canvas; a box
left narrower/shorter than ``min_size`` pixels, or keeping less than ``min_visibility``
of its area, is marked invalid (``valid[m] = False``) instead of raising. Invalid
boxes keep their (clipped) coordinates; :class:`AugmentationPipeline` drops them once
at the end.

Random parameters are drawn per image on the images' device with
``torch.rand(..., generator=generator, device=images.device)``; a ``torch.Generator``
lives on one device, so pass one created on the images' device (for example
``torch.Generator(device=images.device).manual_seed(s)``), or ``None`` for the global
generator. The image path does no host synchronization (no ``.item()``, no
data-dependent shapes), so ops are cheap inside the optimization loop. Inputs are never
modified in place. Values are not clamped: brightness/contrast may leave ``[0, 1]``,
as in the reference DIODE recipe (the synthesizer clamps after each step).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diode._boxes import Target, pack_targets, unpack_targets, validate_targets

__all__ = [
    "AugmentationPipeline",
    "Brightness",
    "Contrast",
    "HFlip",
    "Jitter",
    "RandomErase",
    "RandomResizedCrop",
    "brightness",
    "contrast",
    "hflip",
    "jitter",
    "random_erase",
    "random_resized_crop",
]

OpOutput = tuple[Tensor, Tensor, Tensor, Tensor]


def _check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    """Raise ``ValueError`` if ``generator`` lives on another device than ``device``."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}"
        )
    gdev = torch.device(generator.device)
    same = gdev.type == device.type and (
        gdev.index is None or device.index is None or gdev.index == device.index
    )
    if not same:
        raise ValueError(
            f"generator lives on {gdev} but the tensors are on {device}: create it with "
            f"torch.Generator(device={str(device)!r})"
        )


def _check_inputs(
    images: Tensor, boxes: Tensor, batch_index: Tensor, valid: Tensor | None
) -> Tensor:
    """Check shapes (no host sync) and return ``valid`` (all ``True`` when ``None``)."""
    if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
        raise ValueError(
            f"images must be a float tensor [B, C, H, W], got "
            f"{tuple(getattr(images, 'shape', ()))} {getattr(images, 'dtype', type(images))}"
        )
    if not isinstance(boxes, Tensor) or boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(
            f"boxes must be a float tensor [M, 4] (xyxy pixels), got "
            f"{tuple(getattr(boxes, 'shape', ()))}"
        )
    m = boxes.shape[0]
    if not isinstance(batch_index, Tensor) or batch_index.shape != (m,):
        raise ValueError(f"batch_index must be a long tensor [M] = [{m}] matching boxes")
    if batch_index.dtype.is_floating_point or batch_index.dtype == torch.bool:
        raise ValueError(f"batch_index must hold integer image indices, got {batch_index.dtype}")
    if valid is None:
        return torch.ones(m, dtype=torch.bool, device=boxes.device)
    if not isinstance(valid, Tensor) or valid.shape != (m,) or valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool tensor [M] = [{m}] matching boxes, or None")
    return valid


def _check_prob(p: float, name: str) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    return float(p)


def _check_nonneg(x: float, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not (math.isfinite(x) and x >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {x!r}")
    return float(x)


def _check_range(r: Sequence[float], name: str) -> tuple[float, float]:
    if (
        not isinstance(r, Sequence)
        or len(r) != 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in r)
        or not (math.isfinite(r[0]) and math.isfinite(r[1]) and 0 < r[0] <= r[1])
    ):
        raise ValueError(f"{name} must be a pair (low, high) with 0 < low <= high, got {r!r}")
    return float(r[0]), float(r[1])


def _check_shift(max_shift: int) -> int:
    if isinstance(max_shift, bool) or not isinstance(max_shift, int) or max_shift < 0:
        raise ValueError(f"max_shift must be an int >= 0 (pixels), got {max_shift!r}")
    return max_shift


def _check_fill(fill: str) -> Literal["noise", "zero"]:
    if fill not in ("noise", "zero"):
        raise ValueError(f"fill must be 'noise' or 'zero', got {fill!r}")
    return fill  # type: ignore[return-value]


def _uniform(
    n: int, low: float, high: float, images: Tensor, generator: torch.Generator | None
) -> Tensor:
    """``[n]`` float32 samples of U[low, high) on the images' device."""
    u = torch.rand(n, generator=generator, device=images.device)
    return low + (high - low) * u


def _log_uniform(
    n: int, r: tuple[float, float], images: Tensor, gen: torch.Generator | None
) -> Tensor:
    """``[n]`` float32 samples log-uniform in ``r`` on the images' device."""
    return torch.exp(_uniform(n, math.log(r[0]), math.log(r[1]), images, gen))


def _clip_boxes(
    moved: Tensor, valid: Tensor, height: int, width: int, min_size: float, min_visibility: float
) -> tuple[Tensor, Tensor]:
    """Clip moved xyxy boxes to the canvas and mark too small or mostly hidden ones invalid."""
    lo = moved.new_zeros(4)
    hi = moved.new_tensor([width, height, width, height])
    clipped = torch.minimum(torch.maximum(moved, lo), hi)
    w = clipped[:, 2] - clipped[:, 0]
    h = clipped[:, 3] - clipped[:, 1]
    full = (moved[:, 2] - moved[:, 0]) * (moved[:, 3] - moved[:, 1])
    keep = (w >= min_size) & (h >= min_size) & (w * h >= min_visibility * full)
    return clipped, valid & keep


def jitter(
    images: Tensor,
    boxes: Tensor,
    batch_index: Tensor,
    valid: Tensor | None = None,
    *,
    max_shift: int = 20,
    per_sample: bool = False,
    min_size: float = 1.0,
    min_visibility: float = 0.1,
    generator: torch.Generator | None = None,
) -> OpOutput:
    """Randomly roll images by up to ``max_shift`` pixels in x and y.

    Pixels wrap around (``torch.roll`` semantics) while boxes are shifted by the same
    amount and clipped to the canvas, as the reference DIODE does; the wrapped part of
    an object is not labelled.

    Args:
        images: float ``[B, C, H, W]``.
        boxes: float ``[M, 4]`` xyxy pixels.
        batch_index: long ``[M]``, image of each box.
        valid: bool ``[M]`` or ``None`` (all valid).
        max_shift: largest shift in pixels; shifts are integers in
            ``[-max_shift, max_shift]``.
        per_sample: one shift per image (``True``) or one for the batch (``False``, the reference).
        min_size: boxes narrower or shorter than this many pixels after clipping
            become invalid.
        min_visibility: boxes keeping less than this fraction of their area
            after clipping become invalid.
        generator: ``torch.Generator`` on the images' device, or ``None``.

    Returns:
        ``(images, boxes, batch_index, valid)`` with the same shapes.
    """
    valid = _check_inputs(images, boxes, batch_index, valid)
    max_shift = _check_shift(max_shift)
    _check_generator(generator, images.device)
    b, c, h, w = images.shape
    sx, sy = _draw_shift(images, max_shift, per_sample, generator)
    ys, xs = _roll_index(sx, sy, h, w)
    out = _gather_pixels(images, ys, xs)
    new_boxes, valid = _shift_boxes(boxes, batch_index, valid, sx, sy, h, w, min_size, min_visibility)
    return out, new_boxes, batch_index, valid


def _draw_shift(images: Tensor, max_shift: int, per_sample: bool,
                generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Integer shifts ``(sx [B], sy [B])`` in ``[-max_shift, max_shift]``, one per image or one for all."""
    b = images.shape[0]
    n = b if per_sample else 1
    shift = torch.randint(-max_shift, max_shift + 1, (2, n), generator=generator, device=images.device)
    shift = shift.expand(2, b)
    return shift[0], shift[1]


def _roll_index(sx: Tensor, sy: Tensor, h: int, w: int) -> tuple[Tensor, Tensor]:
    """Source rows ``[B, H]`` and columns ``[B, W]`` of a roll: ``out[y, x] = in[(y - sy) % H, (x - sx) % W]``."""
    ys = (torch.arange(h, device=sx.device) - sy[:, None]) % h
    xs = (torch.arange(w, device=sx.device) - sx[:, None]) % w
    return ys, xs


def _gather_pixels(images: Tensor, ys: Tensor, xs: Tensor) -> Tensor:
    """``out[b, :, y, x] = images[b, :, ys[b, y], xs[b, x]]`` as one gather, keeping the memory format.

    A channels-last batch is gathered through its ``[B, H*W, C]`` view (no copy in, a
    channels-last result out), so the teacher gets it without a layout conversion.
    """
    b, c, h, w = images.shape
    flat = ys[:, :, None] * w + xs[:, None, :]
    if images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous():
        pixels = images.permute(0, 2, 3, 1).reshape(b, h * w, c)
        out = pixels.gather(1, flat.reshape(b, h * w, 1).expand(b, h * w, c))
        return out.view(b, h, w, c).permute(0, 3, 1, 2)
    index = flat.reshape(b, 1, h * w).expand(b, c, h * w)
    return images.reshape(b, c, h * w).gather(2, index).reshape(b, c, h, w)


def _shift_boxes(boxes: Tensor, batch_index: Tensor, valid: Tensor, sx: Tensor, sy: Tensor, h: int, w: int,
                 min_size: float, min_visibility: float) -> tuple[Tensor, Tensor]:
    delta = torch.stack((sx, sy, sx, sy), dim=1).to(boxes)[batch_index.to(boxes.device)]
    return _clip_boxes(boxes + delta, valid, h, w, min_size, min_visibility)


def _mirror_boxes(boxes: Tensor, batch_index: Tensor, flip: Tensor, w: int) -> Tensor:
    x1, y1, x2, y2 = boxes.unbind(-1)
    mirrored = torch.stack((w - x2, y1, w - x1, y2), dim=-1)
    return torch.where(flip.to(boxes.device)[batch_index][:, None], mirrored, boxes)


def hflip(
    images: Tensor,
    boxes: Tensor,
    batch_index: Tensor,
    valid: Tensor | None = None,
    *,
    p: float = 0.5,
    generator: torch.Generator | None = None,
) -> OpOutput:
    """Mirror each image left-right with probability ``p``; boxes become ``x1' = W - x2``.

    Args:
        images: float ``[B, C, H, W]``.
        boxes: float ``[M, 4]`` xyxy pixels.
        batch_index: long ``[M]``, image of each box.
        valid: bool ``[M]`` or ``None`` (all valid); unchanged by this op.
        p: probability that an image is flipped.
        generator: ``torch.Generator`` on the images' device, or ``None``.

    Returns:
        ``(images, boxes, batch_index, valid)`` with the same shapes.
    """
    valid = _check_inputs(images, boxes, batch_index, valid)
    p = _check_prob(p, "p")
    _check_generator(generator, images.device)
    b, w = images.shape[0], images.shape[-1]
    flip = torch.rand(b, generator=generator, device=images.device) < p
    out = torch.where(flip[:, None, None, None], images.flip(-1), images)
    return out, _mirror_boxes(boxes, batch_index, flip, w), batch_index, valid


def _jitter_then_flip(
    images: Tensor, boxes: Tensor, batch_index: Tensor, valid: Tensor, jitter_params: dict[str, Any],
    p: float, generator: torch.Generator | None,
) -> OpOutput:
    """:func:`jitter` followed by :func:`hflip` (same draws, same result) as a single gather."""
    b, _, h, w = images.shape
    _check_generator(generator, images.device)
    sx, sy = _draw_shift(images, jitter_params["max_shift"], jitter_params["per_sample"], generator)
    flip = torch.rand(b, generator=generator, device=images.device) < p
    ys, xs = _roll_index(sx, sy, h, w)
    xs = torch.where(flip[:, None], xs.flip(-1), xs)
    out = _gather_pixels(images, ys, xs)
    moved, valid = _shift_boxes(boxes, batch_index, valid, sx, sy, h, w, jitter_params["min_size"],
                                jitter_params["min_visibility"])
    return out, _mirror_boxes(moved, batch_index, flip, w), batch_index, valid


def random_resized_crop(
    images: Tensor,
    boxes: Tensor,
    batch_index: Tensor,
    valid: Tensor | None = None,
    *,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    min_size: float = 1.0,
    min_visibility: float = 0.1,
    generator: torch.Generator | None = None,
) -> OpOutput:
    """Crop a random window per image and resample it to the full canvas (zoom).

    The window covers ``s * H * W`` pixels with ``s ~ U[scale]`` and aspect ratio
    (width / height relative to the canvas) log-uniform in ``ratio``; with ``s <= 1``
    it is kept inside the image, with ``s > 1`` it is larger than the image and the
    op zooms out (padding with zeros). Resampling is bilinear through
    ``F.affine_grid`` + ``F.grid_sample``, so it is differentiable in the images.

    Args:
        images: float ``[B, C, H, W]``.
        boxes: float ``[M, 4]`` xyxy pixels.
        batch_index: long ``[M]``, image of each box.
        valid: bool ``[M]`` or ``None`` (all valid).
        scale: range of the window area as a fraction of the canvas, ``0 < low <= high``.
        ratio: range of the window aspect ratio, ``0 < low <= high``.
        min_size: boxes narrower or shorter than this many pixels after clipping
            become invalid.
        min_visibility: boxes keeping less than this fraction of their area
            after clipping become invalid.
        generator: ``torch.Generator`` on the images' device, or ``None``.

    Returns:
        ``(images, boxes, batch_index, valid)`` with the same shapes.
    """
    valid = _check_inputs(images, boxes, batch_index, valid)
    scale = _check_range(scale, "scale")
    ratio = _check_range(ratio, "ratio")
    _check_generator(generator, images.device)
    b, c, h, w = images.shape
    s = _uniform(b, scale[0], scale[1], images, generator)
    r = _log_uniform(b, ratio, images, generator)
    cw = w * torch.sqrt(s * r)
    ch = h * torch.sqrt(s / r)
    inside = s <= 1
    cw = torch.where(inside, cw.clamp(max=w), cw)
    ch = torch.where(inside, ch.clamp(max=h), ch)
    # window origin: uniform over [0, W - cw] (or [W - cw, 0] when zooming out)
    x0 = (w - cw) * torch.rand(b, generator=generator, device=images.device)
    y0 = (h - ch) * torch.rand(b, generator=generator, device=images.device)
    zero = torch.zeros_like(s)
    theta = torch.stack(
        (
            torch.stack((cw / w, zero, (2 * x0 + cw) / w - 1), dim=-1),
            torch.stack((zero, ch / h, (2 * y0 + ch) / h - 1), dim=-1),
        ),
        dim=1,
    ).to(images.dtype)
    grid = F.affine_grid(theta, [b, c, h, w], align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    origin = torch.stack((x0, y0, x0, y0), dim=1).to(boxes)
    gain = torch.stack((w / cw, h / ch, w / cw, h / ch), dim=1).to(boxes)
    bi = batch_index.to(boxes.device)
    moved = (boxes - origin[bi]) * gain[bi]
    new_boxes, valid = _clip_boxes(moved, valid, h, w, min_size, min_visibility)
    return out, new_boxes, batch_index, valid


def brightness(
    images: Tensor,
    boxes: Tensor,
    batch_index: Tensor,
    valid: Tensor | None = None,
    *,
    sigma: float = 0.2,
    generator: torch.Generator | None = None,
) -> OpOutput:
    """Add one ``N(0, sigma)`` offset per image (reference: sigma 0.2); no clamping.

    Args:
        images: float ``[B, C, H, W]``.
        boxes, batch_index, valid: packed targets, returned unchanged
            (``valid`` all ``True`` when ``None``).
        sigma: standard deviation of the offset, in image units.
        generator: ``torch.Generator`` on the images' device, or ``None``.

    Returns:
        ``(images, boxes, batch_index, valid)``.
    """
    valid = _check_inputs(images, boxes, batch_index, valid)
    sigma = _check_nonneg(sigma, "sigma")
    _check_generator(generator, images.device)
    noise = torch.randn(images.shape[0], 1, 1, 1, generator=generator, device=images.device)
    return images + (sigma * noise).to(images.dtype), boxes, batch_index, valid


def contrast(
    images: Tensor,
    boxes: Tensor,
    batch_index: Tensor,
    valid: Tensor | None = None,
    *,
    sigma: float = 0.1,
    generator: torch.Generator | None = None,
) -> OpOutput:
    """Multiply each image by ``1 + N(0, sigma)`` (reference: 0.1); no clamping.

    As in the reference recipe the scaling is about zero, not about the image's
    mean, so a contrast change also shifts the brightness.

    Args:
        images: float ``[B, C, H, W]``.
        boxes, batch_index, valid: packed targets, returned unchanged
            (``valid`` all ``True`` when ``None``).
        sigma: standard deviation of the relative contrast change.
        generator: ``torch.Generator`` on the images' device, or ``None``.

    Returns:
        ``(images, boxes, batch_index, valid)``.
    """
    valid = _check_inputs(images, boxes, batch_index, valid)
    sigma = _check_nonneg(sigma, "sigma")
    _check_generator(generator, images.device)
    noise = torch.randn(images.shape[0], 1, 1, 1, generator=generator, device=images.device)
    return images * (1 + sigma * noise).to(images.dtype), boxes, batch_index, valid


def _brightness_then_contrast(
    images: Tensor, boxes: Tensor, batch_index: Tensor, valid: Tensor, sigma_b: float, sigma_c: float,
    generator: torch.Generator | None,
) -> OpOutput:
    """:func:`brightness` followed by :func:`contrast` (same draws) as one pass:
    ``(x + o) g`` is ``g x + o g``, one multiply-add over the pixels."""
    _check_generator(generator, images.device)
    b = images.shape[0]
    offset = (sigma_b * torch.randn(b, 1, 1, 1, generator=generator, device=images.device)).to(images.dtype)
    gain = (1 + sigma_c * torch.randn(b, 1, 1, 1, generator=generator, device=images.device)).to(images.dtype)
    return torch.addcmul(offset * gain, images, gain), boxes, batch_index, valid


def random_erase(
    images: Tensor,
    boxes: Tensor,
    batch_index: Tensor,
    valid: Tensor | None = None,
    *,
    p: float = 0.5,
    scale: tuple[float, float] = (0.02, 0.2),
    ratio: tuple[float, float] = (0.3, 3.3),
    fill: Literal["noise", "zero"] = "zero",
    generator: torch.Generator | None = None,
) -> OpOutput:
    """With probability ``p`` per image, fill one random rectangle with noise or zeros.

    The rectangle covers ``s * H * W`` pixels, ``s ~ U[scale]``, with aspect ratio
    (height / width) log-uniform in ``ratio``, placed uniformly inside the image.
    Gradients flow to the kept pixels only. Boxes are untouched.

    Args:
        images: float ``[B, C, H, W]``.
        boxes, batch_index, valid: packed targets, returned unchanged
            (``valid`` all ``True`` when ``None``).
        p: probability that an image gets a rectangle.
        scale: range of the rectangle area as a fraction of the canvas, ``0 < low <= high``.
        ratio: range of the rectangle aspect ratio, ``0 < low <= high``.
        fill: ``"noise"`` (uniform ``[0, 1)`` per pixel) or ``"zero"``.
        generator: ``torch.Generator`` on the images' device, or ``None``.

    Returns:
        ``(images, boxes, batch_index, valid)``.
    """
    valid = _check_inputs(images, boxes, batch_index, valid)
    p = _check_prob(p, "p")
    scale = _check_range(scale, "scale")
    ratio = _check_range(ratio, "ratio")
    fill = _check_fill(fill)
    _check_generator(generator, images.device)
    b, c, h, w = images.shape
    dev = images.device
    apply = torch.rand(b, generator=generator, device=dev) < p
    area = _uniform(b, scale[0], scale[1], images, generator) * (h * w)
    r = _log_uniform(b, ratio, images, generator)
    eh = torch.sqrt(area * r).clamp(max=h)
    ew = torch.sqrt(area / r).clamp(max=w)
    y0 = (h - eh) * torch.rand(b, generator=generator, device=dev)
    x0 = (w - ew) * torch.rand(b, generator=generator, device=dev)
    yc = torch.arange(h, device=dev) + 0.5
    xc = torch.arange(w, device=dev) + 0.5
    in_y = (yc >= y0[:, None]) & (yc < (y0 + eh)[:, None])
    in_x = (xc >= x0[:, None]) & (xc < (x0 + ew)[:, None])
    if dev.type == "cpu":
        return _erase_rectangles(images, in_y & apply[:, None], in_x, fill, generator), boxes, batch_index, valid
    mask = (in_y[:, :, None] & in_x[:, None, :] & apply[:, None, None])[:, None]
    if fill == "noise":
        value = torch.empty_like(images).uniform_(0.0, 1.0, generator=generator)  # in the images' layout
    else:
        value = torch.zeros((), dtype=images.dtype, device=dev)
    return torch.where(mask, value, images), boxes, batch_index, valid


def _erase_rectangles(images: Tensor, rows: Tensor, cols: Tensor, fill: str,
                      generator: torch.Generator | None) -> Tensor:
    """CPU form of the erase: fill each image's rectangle (``rows [B, H]`` x ``cols [B, W]``
    masks, each one contiguous run) in place on a copy, drawing noise for the rectangle only.

    On CPU reading the rectangles costs no synchronization, and drawing noise for the
    whole batch (one mt19937 draw per pixel) would dominate the op; on accelerators the
    masked ``torch.where`` form is used instead.
    """
    out = images.clone()
    starts_y, counts_y = rows.int().argmax(dim=1).tolist(), rows.sum(dim=1).tolist()
    starts_x, counts_x = cols.int().argmax(dim=1).tolist(), cols.sum(dim=1).tolist()
    for i, (y0, nh, x0, nw) in enumerate(zip(starts_y, counts_y, starts_x, counts_x, strict=True)):
        if nh == 0 or nw == 0:
            continue
        region = out[i, :, y0:y0 + nh, x0:x0 + nw]
        if fill == "noise":
            region.copy_(torch.empty(region.shape, dtype=images.dtype).uniform_(0.0, 1.0, generator=generator))
        else:
            region.zero_()
    return out


class _Op(nn.Module):
    """Module twin of a functional op: validated keyword parameters plus ``forward``."""

    def __init__(self, fn: Callable[..., OpOutput], **params: Any) -> None:
        super().__init__()
        self._fn = fn
        self.params = params

    def forward(
        self,
        images: Tensor,
        boxes: Tensor,
        batch_index: Tensor,
        valid: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> OpOutput:
        """Apply the op ; returns ``(images, boxes, batch_index, valid)``."""
        return self._fn(images, boxes, batch_index, valid, generator=generator, **self.params)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.params.items())


class Jitter(_Op):
    """Module twin of :func:`jitter`."""

    def __init__(
        self,
        max_shift: int = 20,
        *,
        per_sample: bool = False,
        min_size: float = 1.0,
        min_visibility: float = 0.1,
    ) -> None:
        super().__init__(jitter, max_shift=_check_shift(max_shift), per_sample=bool(per_sample),
                         min_size=_check_nonneg(min_size, "min_size"),
                         min_visibility=_check_prob(min_visibility, "min_visibility"))


class HFlip(_Op):
    """Module twin of :func:`hflip`."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__(hflip, p=_check_prob(p, "p"))


class RandomResizedCrop(_Op):
    """Module twin of :func:`random_resized_crop`."""

    def __init__(
        self,
        scale: tuple[float, float] = (0.5, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        *,
        min_size: float = 1.0,
        min_visibility: float = 0.1,
    ) -> None:
        super().__init__(random_resized_crop, scale=_check_range(scale, "scale"),
                         ratio=_check_range(ratio, "ratio"),
                         min_size=_check_nonneg(min_size, "min_size"),
                         min_visibility=_check_prob(min_visibility, "min_visibility"))


class Brightness(_Op):
    """Module twin of :func:`brightness`."""

    def __init__(self, sigma: float = 0.2) -> None:
        super().__init__(brightness, sigma=_check_nonneg(sigma, "sigma"))


class Contrast(_Op):
    """Module twin of :func:`contrast`."""

    def __init__(self, sigma: float = 0.1) -> None:
        super().__init__(contrast, sigma=_check_nonneg(sigma, "sigma"))


class RandomErase(_Op):
    """Module twin of :func:`random_erase`."""

    def __init__(
        self,
        p: float = 0.5,
        *,
        scale: tuple[float, float] = (0.02, 0.2),
        ratio: tuple[float, float] = (0.3, 3.3),
        fill: Literal["noise", "zero"] = "zero",
    ) -> None:
        super().__init__(random_erase, p=_check_prob(p, "p"), scale=_check_range(scale, "scale"),
                         ratio=_check_range(ratio, "ratio"), fill=_check_fill(fill))


class AugmentationPipeline(nn.Module):
    """The box-aware augmentation applied to the synthesized batch every iteration.

    Order: random resized crop (if on), jitter, flip, brightness, contrast, erase.
    The defaults reproduce the reference DIODE stage-1 recipe (one jitter shift of up
    to 20 px for the batch, flip, brightness ``+N(0, 0.2)``, contrast ``x(1 + N(0, 0.1))``,
    random erase zeroing a rectangle of 2-20 % of the canvas in half of the images);
    stage 2 of the recipe uses ``jitter=40``. Set an op's knob to ``0`` (or ``crop=None``) to
    switch it off. Values are not clamped to ``[0, 1]``.

    Args:
        jitter: largest roll in pixels (0 disables).
        jitter_per_sample: one shift per image (``True``) or per batch (``False``, the reference).
        flip: probability of a horizontal flip per image (0 disables).
        crop: area range ``(low, high)`` of the random resized crop, or ``None`` (off);
            ``high > 1`` also zooms out.
        crop_ratio: aspect ratio range of the crop window.
        brightness: standard deviation of the per-image additive offset (0 disables).
        contrast: standard deviation of the per-image contrast factor (0 disables).
        erase: probability of a random erase per image (0 disables).
        erase_scale: area range of the erased rectangle, as a fraction of the canvas.
        erase_ratio: aspect ratio range of the erased rectangle.
        erase_fill: ``"noise"`` or ``"zero"``.
        min_box_size: boxes narrower or shorter than this (pixels) after a geometric op
            are dropped.
        min_box_visibility: boxes keeping less than this fraction of their area after
            clipping are dropped.
    """

    def __init__(
        self,
        *,
        jitter: int = 20,
        jitter_per_sample: bool = False,
        flip: float = 0.5,
        crop: tuple[float, float] | None = None,
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        brightness: float = 0.2,
        contrast: float = 0.1,
        erase: float = 0.5,
        erase_scale: tuple[float, float] = (0.02, 0.2),
        erase_ratio: tuple[float, float] = (0.3, 3.3),
        erase_fill: Literal["noise", "zero"] = "zero",
        min_box_size: float = 1.0,
        min_box_visibility: float = 0.1,
    ) -> None:
        super().__init__()
        size = _check_nonneg(min_box_size, "min_box_size")
        vis = _check_prob(min_box_visibility, "min_box_visibility")
        ops: list[_Op] = []
        if crop is not None:
            ops.append(RandomResizedCrop(_check_range(crop, "crop"),
                                         _check_range(crop_ratio, "crop_ratio"),
                                         min_size=size, min_visibility=vis))
        if _check_shift(jitter) > 0:
            ops.append(Jitter(jitter, per_sample=jitter_per_sample, min_size=size,
                              min_visibility=vis))
        if _check_prob(flip, "flip") > 0:
            ops.append(HFlip(flip))
        if _check_nonneg(brightness, "brightness") > 0:
            ops.append(Brightness(brightness))
        if _check_nonneg(contrast, "contrast") > 0:
            ops.append(Contrast(contrast))
        if _check_prob(erase, "erase") > 0:
            ops.append(RandomErase(erase, scale=_check_range(erase_scale, "erase_scale"),
                                   ratio=_check_range(erase_ratio, "erase_ratio"), fill=erase_fill))
        self.ops = nn.ModuleList(ops)

    def forward_packed(
        self,
        images: Tensor,
        batch_index: Tensor,
        labels: Tensor,
        boxes: Tensor,
        *,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Augment packed targets without host syncs (for the synthesis hot loop).

        Args:
            images: float ``[B, C, H, W]``.
            batch_index: long ``[M]``, image of each box.
            labels: int64 ``[M]``, passed through.
            boxes: float ``[M, 4]`` xyxy pixels (validate them once, outside the loop).
            generator: ``torch.Generator`` on the images' device, or ``None``.

        Returns:
            ``(images, batch_index, labels, boxes, valid)``; ``valid`` bool ``[M]`` is
            ``False`` for boxes a geometric op pushed out or made degenerate.
        """
        valid = _check_inputs(images, boxes, batch_index, None)
        if labels.shape != batch_index.shape:
            raise ValueError(f"labels must be a tensor [M] = [{boxes.shape[0]}] matching boxes")
        ops = list(self.ops)
        i = 0
        while i < len(ops):
            op, after = ops[i], ops[i + 1] if i + 1 < len(ops) else None
            # Adjacent ops with a fused form (same random draws, same result, fewer passes).
            if isinstance(op, Jitter) and isinstance(after, HFlip):
                images, boxes, batch_index, valid = _jitter_then_flip(
                    images, boxes, batch_index, valid, op.params, after.params["p"], generator)
                i += 2
            elif isinstance(op, Brightness) and isinstance(after, Contrast):
                images, boxes, batch_index, valid = _brightness_then_contrast(
                    images, boxes, batch_index, valid, op.params["sigma"], after.params["sigma"], generator)
                i += 2
            else:
                images, boxes, batch_index, valid = op(images, boxes, batch_index, valid, generator=generator)
                i += 1
        return images, batch_index, labels, boxes, valid

    def forward(
        self,
        images: Tensor,
        targets: Sequence[Target],
        *,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, list[Target]]:
        """Augment images and their targets; boxes made invalid are removed.

        Validates ``targets`` and unpacks at the end (host syncs); use
        :meth:`forward_packed` inside tight loops.

        Args:
            images: float ``[B, C, H, W]``.
            targets: ``B`` dicts with ``"boxes"`` ``[N, 4]`` xyxy pixels and ``"labels"`` ``[N]``.
            generator: ``torch.Generator`` on the images' device, or ``None``.

        Returns:
            ``(images [B, C, H, W], targets)``, new targets with only the valid boxes.
        """
        if not isinstance(images, Tensor) or images.ndim != 4:
            raise ValueError(f"images must be a float tensor [B, C, H, W], got "
                             f"{tuple(getattr(images, 'shape', ()))}")
        validate_targets(targets, image_size=(images.shape[2], images.shape[3]))
        if len(targets) != images.shape[0]:
            raise ValueError(f"targets has {len(targets)} dicts but images has batch size "
                             f"{images.shape[0]}: give one dict per image")
        batch_index, labels, boxes = pack_targets(targets)
        dev = images.device
        images, batch_index, labels, boxes, valid = self.forward_packed(
            images, batch_index.to(dev), labels.to(dev), boxes.to(dev), generator=generator
        )
        kept = unpack_targets(batch_index[valid], labels[valid], boxes[valid], images.shape[0])
        return images, kept
