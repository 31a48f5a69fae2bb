"""Pictures of detections: boxes drawn on images and contact sheets of many images."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.utils import draw_bounding_boxes, make_grid

from diode._boxes import Target
from diode.data.io import PathLike, image_to_uint8, save_image

Color = str | tuple[int, int, int]

# Distinct, saturated colours; class c gets _PALETTE[c % len(_PALETTE)].
_PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (220, 190, 255),
    (170, 110, 40),
    (255, 250, 200),
    (128, 0, 0),
    (170, 255, 195),
    (128, 128, 0),
    (255, 215, 180),
    (0, 0, 128),
    (255, 255, 255),
)


def draw_detections(
    image: Tensor,
    target: Target,
    *,
    class_names: Sequence[str] | None = None,
    colors: Color | Sequence[Color] | None = None,
    width: int = 2,
) -> Tensor:
    """Draw boxes with their class names (and scores, when present) on one image.

    Args:
        image: float ``[3, H, W]`` RGB in ``[0, 1]`` or uint8 ``[3, H, W]``; not modified.
        target: ``"boxes"`` ``[N, 4]`` xyxy pixels, ``"labels"`` ``[N]``, optional
            ``"scores"`` ``[N]`` (then each label reads ``"name 0.87"``).
        class_names: name of each class id; ids are shown when ``None``.
        colors: one colour for every box, or a sequence indexed by class id;
            a fixed palette by class id when ``None``.
        width: line width in pixels.

    Returns:
        uint8 ``[3, H, W]`` on the CPU.
    """
    if not isinstance(image, Tensor) or image.ndim != 3 or image.shape[0] != 3:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"image must be a [3, H, W] RGB tensor, got {shape}")
    canvas = image_to_uint8(image).cpu()
    boxes = target["boxes"].detach().cpu().float().reshape(-1, 4)
    if boxes.shape[0] == 0:
        return canvas.clone()
    labels = target["labels"].detach().cpu().tolist()
    names = [class_names[c] if class_names is not None else str(c) for c in labels]
    if "scores" in target:
        names = [f"{n} {s:.2f}" for n, s in zip(names, target["scores"].tolist(), strict=True)]
    if colors is None or isinstance(colors, (str, tuple)):
        palette: Sequence[Color] = _PALETTE if colors is None else [colors]
    else:
        palette = colors
    box_colors = [palette[c % len(palette)] for c in labels]
    return draw_bounding_boxes(canvas, boxes, labels=names, colors=box_colors, width=width)


def contact_sheet(
    images: Tensor | Sequence[Tensor],
    targets: Sequence[Target] | None = None,
    *,
    class_names: Sequence[str] | None = None,
    nrow: int | None = None,
    padding: int = 2,
    colors: Color | Sequence[Color] | None = None,
    width: int = 2,
) -> Tensor:
    """Tile images, each with its boxes drawn, into one picture.

    Args:
        images: float ``[B, 3, H, W]`` RGB in ``[0, 1]`` (or a list of ``[3, H, W]``
            of one size).
        targets: one dict per image (see :func:`draw_detections`); no boxes when ``None``.
        class_names: name of each class id.
        nrow: images per row; ``ceil(sqrt(B))`` when ``None``.
        padding: pixels between tiles.
        colors: see :func:`draw_detections`.
        width: box line width in pixels.

    Returns:
        uint8 ``[3, H', W']`` on the CPU.
    """
    images = list(images)
    if not images:
        raise ValueError("images is empty: give at least one [3, H, W] image")
    if targets is not None and len(targets) != len(images):
        raise ValueError(
            f"targets has {len(targets)} entries for {len(images)} images; give one per image"
        )
    sizes = {tuple(im.shape) for im in images}
    if len(sizes) != 1:
        raise ValueError(f"images must share one size to tile, got {sorted(sizes)}")
    empty: Target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    drawn = [
        draw_detections(im, t, class_names=class_names, colors=colors, width=width)
        for im, t in zip(
            images, targets if targets is not None else [empty] * len(images), strict=True
        )
    ]
    nrow = nrow if nrow is not None else math.ceil(math.sqrt(len(drawn)))
    return make_grid(torch.stack(drawn), nrow=nrow, padding=padding)


def save_contact_sheet(
    path: PathLike,
    images: Tensor | Sequence[Tensor],
    targets: Sequence[Target] | None = None,
    **kwargs: object,
) -> None:
    """Write :func:`contact_sheet` of ``images`` and ``targets`` to ``path`` (PNG), atomically.

    ``kwargs`` go to :func:`contact_sheet`.
    """
    save_image(path, contact_sheet(images, targets, **kwargs))  # type: ignore[arg-type]
