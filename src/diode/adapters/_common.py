"""Plumbing shared by the bundled adapters: device, moving, freezing, padding, eval-mode prediction, photos."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diode._utils import device_of

Device = str | torch.device | None
_Self = TypeVar("_Self", bound="ModelAdapter")


class ModelAdapter:
    """Base of the bundled adapters: everything here needs only ``self.model`` and ``self.size_divisor``."""

    model: nn.Module

    @property
    def size_divisor(self) -> int:  # overridden by each adapter
        """Sizes that need no padding (1: any)."""
        return 1

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters (else its buffers)."""
        return device_of(self)

    def to(self: _Self, device: Device = None, **kwargs: Any) -> _Self:
        """Move the model (``nn.Module.to`` arguments); returns ``self``."""
        if device is not None or kwargs:
            self.model.to(device, **kwargs)
        return self

    def freeze(self: _Self) -> _Self:
        """Eval mode and no parameter gradients (a teacher); returns ``self``."""
        self.model.eval().requires_grad_(False)
        return self

    def compile_targets(self) -> list[nn.Module]:
        """The modules ``Synthesizer(compile=True)`` compiles: those :meth:`forward` calls (here the model)."""
        return [self.model]

    def _pad(self, images: Tensor) -> Tensor:
        """Check ``[B, 3, H, W]`` and zero-pad right/bottom to :attr:`size_divisor` (pixel coordinates unchanged)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W] RGB in [0, 1], got shape {tuple(images.shape)}")
        s = self.size_divisor
        ph, pw = -images.shape[2] % s, -images.shape[3] % s
        return F.pad(images, (0, pw, 0, ph)) if ph or pw else images

    def _eval_mode(self) -> contextlib.AbstractContextManager[None]:
        """The model in eval mode for the block; each module's own mode restored after."""
        return module_mode(self.model, False)


@contextlib.contextmanager
def module_mode(module: nn.Module, training: bool) -> Iterator[None]:
    """Every module of ``module`` in train (``True``) or eval mode for the block; each one's own mode after.

    Per module, not ``module.train(previous)``: a model fine-tuned with some layers kept in eval
    mode (frozen BatchNorm, a common recipe) comes back exactly as it was.
    """
    modes = [(m, m.training) for m in module.modules()]
    try:
        module.train(training)
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def letterbox(image: Tensor, size: int, *, stride: int | None = None,
              fill: float = 0.5) -> tuple[Tensor, float, tuple[int, int]]:
    """Resize ``[3, H, W]`` keeping its aspect so its longer side is ``size``, and pad it, centred, with ``fill``.

    Args:
        image: float ``[3, H, W]``.
        size: longer side of the resized image, pixels.
        stride: ``None``: a ``size x size`` canvas (darknet); else the smallest canvas whose sides are
            multiples of ``stride`` (the anchor-free YOLO family's rectangular inference).
        fill: padding value.

    Returns:
        ``(canvas [3, H', W'], scale, (pad_x, pad_y))`` with ``canvas_xy = image_xy * scale + pad``.
    """
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    h, w = image.shape[-2:]
    scale = min(size / h, size / w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = image
    if (nh, nw) != (h, w):
        resized = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
    ch, cw = (size, size) if stride is None else (nh + -nh % stride, nw + -nw % stride)
    pad_x, pad_y = (cw - nw) // 2, (ch - nh) // 2
    canvas = image.new_full((3, ch, cw), fill)
    canvas[:, pad_y:pad_y + nh, pad_x:pad_x + nw] = resized
    return canvas, scale, (pad_x, pad_y)


def detect_photo(predict: Callable[[Tensor], dict[str, Tensor]], image: Tensor, size: int, *,
                 stride: int | None = None, fill: float = 0.5) -> dict[str, Tensor]:
    """Detections in one photograph of any size: letterboxed for the model, boxes mapped back.

    Args:
        predict: detections of one letterboxed ``[1, 3, H', W']`` batch's only image.
        image: float ``[3, H, W]`` RGB in ``[0, 1]``, on the model's device.
        size, stride, fill: the :func:`letterbox` settings.

    Returns:
        ``boxes`` ``[K, 4]`` xyxy in the photo's pixels, ``scores`` ``[K]``, ``labels`` ``[K]``.
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be [3, H, W] RGB, got shape {tuple(image.shape)}")
    boxed, scale, (pad_x, pad_y) = letterbox(image.float(), size, stride=stride, fill=fill)
    det = predict(boxed[None])
    boxes = det["boxes"].clone()
    boxes[:, 0::2] = ((boxes[:, 0::2] - pad_x) / scale).clamp(0, image.shape[2])
    boxes[:, 1::2] = ((boxes[:, 1::2] - pad_y) / scale).clamp(0, image.shape[1])
    return {"boxes": boxes, "scores": det["scores"], "labels": det["labels"]}
