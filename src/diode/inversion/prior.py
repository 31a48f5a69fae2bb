"""Class priors read from a teacher: which classes it expects when the image tells it nothing.

A detector's classification head carries the class frequencies of its training set in
its biases (GoodQ). :func:`estimate_class_prior` exposes them through the adapter
protocol alone, by asking the teacher about neutral images (mid grey and uniform
noise), and returns a prior that every :class:`~diode.BBoxSampler` builder takes as
``class_prior``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from diode._utils import device_of
from diode.adapters.base import DetectorAdapter

__all__ = ["estimate_class_prior"]

logger = logging.getLogger(__name__)

_BOX_SIDES = (0.25, 0.5, 0.75)  # "loss": one centred box per neutral image, these fractions of the canvas in turn


def estimate_class_prior(
    teacher: DetectorAdapter,
    *,
    method: Literal["loss", "detections", "bias"] = "loss",
    bias: Sequence[float] | Tensor | None = None,
    temperature: float = 1.0,
    smoothing: float = 0.0,
    num_images: int = 6,
    image_size: int | tuple[int, int] = 160,
    conf: float = 0.001,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Estimate the teacher's class prior, a ``[num_classes]`` float64 CPU tensor summing to 1.

    Neutral images: ``num_images`` images of ``image_size`` (rounded up to the teacher's
    ``size_divisor``), the even ones mid grey (0.5), the odd ones uniform noise in
    ``[0, 1]`` from ``generator``. With ``T = temperature`` and ``C`` classes:

    - ``"loss"`` (default): one centred box per image, its side 1/4, 1/2 or 3/4 of the
      canvas in turn. ``L_c`` is ``teacher.task_loss`` of the raw outputs on the neutral
      images with every box labelled ``c`` (the same ``generator`` state for every ``c``),
      and ``p_c = softmax_c(-L_c / T)``. The boxes are the same for every class, so only
      the classification part of the loss differs between classes: for a sigmoid head
      with a BCE class loss (YOLO), ``L_c - L_c'`` is ``-(gain / C)`` times the mean of the
      logit difference ``z_c - z_c'`` over the anchors matched to the boxes, and for a
      softmax head with cross-entropy (R-CNN) it is ``-(log q_c - log q_c')`` times the
      fraction of positive samples, so ``p`` is a tempered softmax of the class logits on
      images without content: the head's bias plus its response to a featureless input.
    - ``"detections"``: ``m_c`` is the mean over images of the summed scores of the
      teacher's class-``c`` detections above ``conf`` (``teacher.predict``), and
      ``p_c = m_c^(1/T) / sum_j m_j^(1/T)``; classes never detected get 0 (see ``smoothing``).
    - ``"bias"``: ``p = softmax(bias / T)`` for an explicit ``[C]`` vector, e.g. the
      class biases of a classification head (no teacher call).

    Finally ``p <- (1 - smoothing) * p + smoothing / C``, which keeps every class
    possible.

    Args:
        teacher: the detector (any :class:`~diode.DetectorAdapter`); not modified.
        method: ``"loss"``, ``"detections"`` or ``"bias"``.
        bias: ``[C]`` logits, required by (and only used with) ``method="bias"``.
        temperature: ``T > 0``; above 1 flattens the prior, below 1 sharpens it.
        smoothing: weight in ``[0, 1]`` of the uniform distribution mixed in.
        num_images: neutral images to average over (``"loss"``, ``"detections"``).
        image_size: side or ``(height, width)`` of the neutral images in pixels.
        conf: score threshold of the detections (``"detections"``).
        generator: CPU generator, source of the noise images and of any draw ``task_loss`` makes
            (default: a generator seeded with 0, so the estimate is reproducible).

    Returns:
        ``[C]`` float64 probabilities on the CPU.

    Raises:
        ValueError: a bad option, a ``bias`` of the wrong length, or no detection at all
            with ``method="detections"`` (lower ``conf``).
    """
    if method not in ("loss", "detections", "bias"):
        raise ValueError(f"method must be 'loss', 'detections' or 'bias', got {method!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not (isinstance(smoothing, (int, float)) and 0 <= smoothing <= 1):
        raise ValueError(f"smoothing must be in [0, 1], got {smoothing!r}")
    if (bias is not None) != (method == "bias"):
        raise ValueError("bias is used by method='bias' only: give both or neither")
    num_classes = teacher.num_classes
    if method == "bias":
        prior = torch.softmax(_check_bias(bias, num_classes) / temperature, dim=0)
    else:
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"num_images must be an int >= 1, got {num_images!r}")
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        images = _neutral_images(num_images, _canvas(image_size, teacher.size_divisor), g, device_of(teacher))
        if method == "loss":
            prior = torch.softmax(-_class_losses(teacher, images, g) / temperature, dim=0)
        else:
            if not (isinstance(conf, (int, float)) and 0 <= conf < 1):
                raise ValueError(f"conf must be in [0, 1), got {conf!r}")
            mass = _detection_mass(teacher, images, conf)
            if not mass.sum() > 0:
                raise ValueError(f"the teacher detects nothing above conf={conf} on neutral images: lower conf "
                                 "or use method='loss'")
            weights = mass.pow(1 / temperature)
            prior = weights / weights.sum()
    prior = (1 - smoothing) * prior + smoothing / num_classes
    top = prior.argsort(descending=True)[:3].tolist()
    logger.info("class prior (%s): top classes %s", method,
                ", ".join(f"{teacher.class_names[c]}={float(prior[c]):.3f}" for c in top))
    return prior


def _check_bias(bias: Sequence[float] | Tensor | None, num_classes: int) -> Tensor:
    try:
        b = torch.as_tensor(bias, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"bias must be a sequence of {num_classes} numbers: {err}") from err
    if b.shape != (num_classes,) or not torch.isfinite(b).all():
        raise ValueError(f"bias must be {num_classes} finite numbers (one per class), got shape {tuple(b.shape)}")
    return b


def _canvas(image_size: int | tuple[int, int], divisor: int) -> tuple[int, int]:
    """``image_size`` as ``(height, width)``, each rounded up to a multiple of ``divisor``."""
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
        raise ValueError(f"image_size must be a positive int or (height, width), got {image_size!r}")
    return -(-size[0] // divisor) * divisor, -(-size[1] // divisor) * divisor


def _neutral_images(n: int, size: tuple[int, int], g: torch.Generator, device: torch.device) -> Tensor:
    """``[n, 3, H, W]``: even indices mid grey, odd indices uniform noise."""
    noise = torch.rand(n, 3, *size, generator=g).to(device)
    grey = torch.arange(n, device=device).remainder(2).eq(0).view(n, 1, 1, 1)
    return torch.where(grey, torch.full_like(noise, 0.5), noise)


@torch.no_grad()
def _class_losses(teacher: DetectorAdapter, images: Tensor, g: torch.Generator) -> Tensor:
    """``[C]`` float64: the task loss with every neutral image's box labelled ``c``."""
    n, _, h, w = images.shape
    sides = torch.tensor([_BOX_SIDES[i % len(_BOX_SIDES)] for i in range(n)], device=images.device)
    half = torch.stack((sides * w, sides * h), dim=1) / 2
    centre = torch.tensor([w / 2, h / 2], device=images.device)
    boxes = torch.cat((centre - half, centre + half), dim=1)[:, None]  # [n, 1, 4]
    raw = teacher.forward(images)
    seed = int(torch.randint(0, 2**62, (1,), generator=g))
    losses = []
    for c in range(teacher.num_classes):
        label = torch.full((1,), c, dtype=torch.int64, device=images.device)
        targets = [{"boxes": b, "labels": label} for b in boxes]
        same_draws = torch.Generator(device=images.device).manual_seed(seed)
        losses.append(teacher.task_loss(raw, targets, generator=same_draws).detach().double().cpu())
    out = torch.stack(losses)
    if not torch.isfinite(out).all():
        raise ValueError("the teacher's task loss on neutral images is not finite: use method='detections'")
    return out


@torch.no_grad()
def _detection_mass(teacher: DetectorAdapter, images: Tensor, conf: float) -> Tensor:
    """``[C]`` float64: per class, the summed detection scores per image."""
    mass = torch.zeros(teacher.num_classes, dtype=torch.float64)
    for d in teacher.predict(images, conf=conf):
        mass.index_add_(0, d["labels"].cpu().long(), d["scores"].detach().cpu().double())
    return mass / images.shape[0]
