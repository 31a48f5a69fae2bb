"""Pictures of detections: boxes drawn on images and contact sheets of many images.

Boxes are drawn with PIL: the line width and the label font grow with the image
(:func:`line_width`, :func:`label_font_size`), and each label sits on a filled
background in its box's colour, so it stays readable on any image.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageColor, ImageDraw, ImageFont
from torch import Tensor
from torchvision.utils import make_grid

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
_CAPTION_BACKGROUND = (32, 32, 32)


def line_width(height: int, width: int) -> int:
    """Box line width in pixels for an image of ``height x width``: 1 up to 300 px, +1 per 200 px after."""
    return max(1, round(max(height, width) / 200))


def label_font_size(height: int, width: int) -> int:
    """Label font size in pixels for an image of ``height x width`` (at least 9, about 1/28 of the long side)."""
    return max(9, round(max(height, width) / 28))


def target_caption(target: Target, class_names: Sequence[str] | None = None, *, limit: int = 3) -> str:
    """A short text naming the classes of one image's boxes, e.g. ``"dog, 2x person"`` or ``"-"`` (none).

    Args:
        target: ``"labels"`` int ``[N]``; order of first appearance is kept.
        class_names: name of each class id; ids are shown when ``None``.
        limit: at most this many classes are named, then ``"+k"``.
    """
    counts = Counter(int(c) for c in target["labels"].tolist())
    if not counts:
        return "-"
    parts = [(f"{n}x " if n > 1 else "") + _name(c, class_names) for c, n in counts.items()]
    extra = f" +{len(parts) - limit}" if len(parts) > limit else ""
    return ", ".join(parts[:limit]) + extra


def draw_detections(
    image: Tensor,
    target: Target,
    *,
    class_names: Sequence[str] | None = None,
    colors: Color | Sequence[Color] | None = None,
    width: int | None = None,
    font_size: int | None = None,
) -> Tensor:
    """Draw boxes with their class names (and scores, when present) on one image.

    Args:
        image: float ``[3, H, W]`` RGB in ``[0, 1]`` or uint8 ``[3, H, W]``; not modified.
        target: ``"boxes"`` ``[N, 4]`` xyxy pixels, ``"labels"`` ``[N]``, optional
            ``"scores"`` ``[N]`` (then each label reads ``"name 0.87"``).
        class_names: name of each class id; ids are shown when ``None``.
        colors: one colour for every box, or a sequence indexed by class id;
            a fixed palette by class id when ``None``.
        width: line width in pixels (default :func:`line_width` of the image).
        font_size: label height in pixels (default :func:`label_font_size` of the image).

    Returns:
        uint8 ``[3, H, W]`` on the CPU. Each label is drawn on a filled box of its
        box's colour (black or white text, whichever reads better), above the box
        when there is room, else inside its top edge.
    """
    if not isinstance(image, Tensor) or image.ndim != 3 or image.shape[0] != 3:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"image must be a [3, H, W] RGB tensor, got {shape}")
    canvas = image_to_uint8(image).cpu()
    boxes = target["boxes"].detach().cpu().float().reshape(-1, 4)
    if boxes.shape[0] == 0:
        return canvas.clone()
    h, w = canvas.shape[-2:]
    labels = target["labels"].detach().cpu().tolist()
    texts = [_name(c, class_names) for c in labels]
    if "scores" in target:
        texts = [f"{n} {s:.2f}" for n, s in zip(texts, target["scores"].tolist(), strict=True)]
    if colors is None or isinstance(colors, (str, tuple)):
        palette: Sequence[Color] = _PALETTE if colors is None else [colors]
    else:
        palette = colors
    box_colors = [ImageColor.getrgb(c) if isinstance(c, str) else c
                  for c in (palette[label % len(palette)] for label in labels)]
    lw = width if width is not None else line_width(h, w)
    font = _font(font_size if font_size is not None else label_font_size(h, w))
    picture = Image.fromarray(canvas.permute(1, 2, 0).numpy().copy())
    draw = ImageDraw.Draw(picture)
    for box, color in zip(boxes.tolist(), box_colors, strict=True):
        draw.rectangle(box, outline=color, width=lw)
    for (x1, y1, _, _), text, color in zip(boxes.tolist(), texts, box_colors, strict=True):
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        pad = max(1, lw)
        bw, bh = right - left + 2 * pad, bottom - top + 2 * pad
        ly = y1 - bh if y1 - bh >= 0 else max(y1, 0)
        lx = min(max(x1, 0), max(0, w - bw))
        draw.rectangle((lx, ly, lx + bw - 1, ly + bh - 1), fill=color)
        draw.text((lx + pad - left, ly + pad - top), text, fill=_text_color(color), font=font)
    return torch.from_numpy(np.array(picture)).permute(2, 0, 1).contiguous()


def contact_sheet(
    images: Tensor | Sequence[Tensor],
    targets: Sequence[Target] | None = None,
    *,
    class_names: Sequence[str] | None = None,
    captions: Sequence[str] | None = None,
    nrow: int | None = None,
    padding: int = 2,
    colors: Color | Sequence[Color] | None = None,
    width: int | None = None,
) -> Tensor:
    """Tile images, each with its boxes drawn and an optional caption, into one picture.

    Images of different sizes are each scaled to fit the largest height and width
    (aspect kept, centred on black), their boxes with them.

    Args:
        images: float ``[B, 3, H, W]`` RGB in ``[0, 1]``, or a list of ``[3, H, W]``
            (float or uint8), sizes may differ.
        targets: one dict per image (see :func:`draw_detections`); no boxes when ``None``.
        class_names: name of each class id.
        captions: one line of text per image, drawn under it (e.g. :func:`target_caption`).
        nrow: images per row; ``ceil(sqrt(B))`` when ``None``.
        padding: pixels between tiles.
        colors: see :func:`draw_detections`.
        width: box line width in pixels (default :func:`line_width` of a tile).

    Returns:
        uint8 ``[3, H', W']`` on the CPU.
    """
    images = list(images)
    if not images:
        raise ValueError("images is empty: give at least one [3, H, W] image")
    for name, values in (("targets", targets), ("captions", captions)):
        if values is not None and len(values) != len(images):
            raise ValueError(f"{name} has {len(values)} entries for {len(images)} images; give one per image")
    for i, im in enumerate(images):
        if not isinstance(im, Tensor) or im.ndim != 3 or im.shape[0] != 3:
            raise ValueError(f"images[{i}] must be a [3, H, W] RGB tensor, got {tuple(getattr(im, 'shape', ()))}")
    cell = (max(im.shape[1] for im in images), max(im.shape[2] for im in images))
    empty: Target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    tiles = []
    for k, im in enumerate(images):
        fitted, target = _fit(im, targets[k] if targets is not None else empty, cell)
        tile = draw_detections(fitted, target, class_names=class_names, colors=colors, width=width)
        if captions is not None:
            tile = _with_caption(tile, captions[k])
        tiles.append(tile)
    nrow = nrow if nrow is not None else math.ceil(math.sqrt(len(tiles)))
    return make_grid(torch.stack(tiles), nrow=nrow, padding=padding)


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


def _name(label: int, class_names: Sequence[str] | None) -> str:
    if class_names is not None and 0 <= label < len(class_names):
        return str(class_names[label])
    return str(label)


def _text_color(color: tuple[int, ...]) -> tuple[int, int, int]:
    r, g, b = color[:3]
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def _fit(image: Tensor, target: Target, size: tuple[int, int]) -> tuple[Tensor, Target]:
    """Scale ``image`` (and its boxes) to fit ``size`` = ``(H, W)``, centred on black; float ``[3, H, W]``."""
    h, w = int(image.shape[1]), int(image.shape[2])
    if (h, w) == size:
        return image, target
    scale = min(size[0] / h, size[1] / w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    src = image.detach().cpu().float() / (255.0 if image.dtype == torch.uint8 else 1.0)
    resized = F.interpolate(src[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
    top, left = (size[0] - nh) // 2, (size[1] - nw) // 2
    canvas = torch.zeros(3, *size)
    canvas[:, top : top + nh, left : left + nw] = resized.clamp(0, 1)
    factor = torch.tensor([nw / w, nh / h, nw / w, nh / h])
    shift = torch.tensor([left, top, left, top], dtype=torch.float32)
    boxes = target["boxes"].detach().cpu().float().reshape(-1, 4) * factor + shift
    return canvas, {**target, "boxes": boxes}


def _with_caption(tile: Tensor, text: str) -> Tensor:
    """``tile`` (uint8 ``[3, H, W]``) with a strip of text under it, truncated to the tile's width."""
    h, w = int(tile.shape[1]), int(tile.shape[2])
    font = _font(label_font_size(h, w))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    _, top, _, bottom = probe.textbbox((0, 0), "Ag", font=font)
    strip_h = int(bottom - top) + 6
    shown = text
    while shown and probe.textlength(shown, font=font) > w - 6:
        shown = shown[:-2] + "\u2026" if len(shown) > 1 else ""
    strip = Image.new("RGB", (w, strip_h), _CAPTION_BACKGROUND)
    ImageDraw.Draw(strip).text((3, 3 - top), shown, fill=(255, 255, 255), font=font)
    caption = torch.from_numpy(np.array(strip)).permute(2, 0, 1)
    return torch.cat([tile, caption], dim=1)


@lru_cache(maxsize=32)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """PIL's bundled scalable font at ``size`` pixels (Pillow >= 10.1 with FreeType), else its bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()
