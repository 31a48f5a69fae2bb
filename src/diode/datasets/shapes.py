"""Procedural shapes: a seedable, labelled detection world, and an unlabelled proxy domain.

:func:`render_shapes` draws simple geometric shapes (circle, square, triangle, cross,
optionally ring and diamond) of random colour, size, mild aspect and tilt, with textured
fills, on smooth textured backgrounds. The shape, never the colour, determines the class,
so a small conv net learns it at 96 px. :func:`render_proxy` draws a visibly different,
unlabelled domain (colour fields, fine textures, blotches, lines, curves) as an
out-of-distribution proxy for data-free distillation; :func:`render_noise` draws uniform
noise. Everything is vectorized with torch over images, objects and pixels, and all
randomness comes from the ``torch.Generator`` argument, on whose device the images are made.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from diode._boxes import Target
from diode.data.io import atomic_write_json, atomic_write_text, save_image
from diode.data.labels import write_yolo_labels

logger = logging.getLogger(__name__)

SHAPE_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring", "diamond")
"""Every shape :func:`render_shapes` can draw; ``ShapesConfig.classes`` picks from these."""

_CHUNK = 128  # images rendered at once: bounds memory to ~100 MB at 96 px, 4 objects
_MAX_TILT = math.radians(15)  # small enough that a tilted square never looks like a diamond
_MAX_ASPECT = 1.25
_PLACEMENT_CANDIDATES = 16
_MAX_IOU = 0.3
_MAX_IOA = 0.4  # at most this fraction of the smaller box may lie under another box
_COLOUR_CANDIDATES = 8
_VISIBLE = 0.1  # coverage from which a pixel counts as part of the shape
_CROSS_ARM = 0.32  # half-thickness of a cross arm, relative to the half-size


@dataclass(frozen=True)
class ShapesConfig:
    """How :func:`render_shapes` lays out a scene.

    Args:
        image_size: square canvas side in pixels, 64..128.
        min_objects: fewest objects per image (>= 0).
        max_objects: most objects per image, ``min_objects..8``.
        min_size: smallest object size as a fraction of the canvas side.
        max_size: largest object size as a fraction of the canvas side (<= 0.6).
        classes: shape names from :data:`SHAPE_NAMES`; class id ``i`` is ``classes[i]``.
        domain: a name for this world, recorded in a written dataset's ``meta.json``.
        background: ``"textured"`` (gradients, low-frequency and fine noise) or ``"plain"``
            (one flat colour per image and no pixel noise; handy in tests).
    """

    image_size: int = 96
    min_objects: int = 1
    max_objects: int = 4
    min_size: float = 0.15
    max_size: float = 0.45
    classes: tuple[str, ...] = ("circle", "square", "triangle", "cross")
    domain: str = "shapes"
    background: str = "textured"

    def __post_init__(self) -> None:
        if isinstance(self.classes, str) or not all(isinstance(c, str) for c in self.classes):
            raise TypeError(f"classes must be a tuple of shape names from {SHAPE_NAMES}, "
                            f"got {self.classes!r}")
        object.__setattr__(self, "classes", tuple(self.classes))
        if not isinstance(self.image_size, int) or not 64 <= self.image_size <= 128:
            raise ValueError(f"image_size must be an int in [64, 128], got {self.image_size!r}")
        if not 0 <= self.min_objects <= self.max_objects or not 1 <= self.max_objects <= 8:
            raise ValueError("need 0 <= min_objects <= max_objects and 1 <= max_objects <= 8, got "
                             f"min_objects={self.min_objects}, max_objects={self.max_objects}")
        if not 0 < self.min_size <= self.max_size <= 0.6:
            raise ValueError("need 0 < min_size <= max_size <= 0.6 (fractions of the canvas), got "
                             f"min_size={self.min_size}, max_size={self.max_size}")
        if self.min_size * self.image_size < 8:
            raise ValueError(f"min_size={self.min_size} gives objects under 8 px on a "
                             f"{self.image_size} px canvas: raise min_size to at least "
                             f"{8 / self.image_size:.3f}")
        unknown = [c for c in self.classes if c not in SHAPE_NAMES]
        if not self.classes or unknown or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be distinct names from {SHAPE_NAMES}, "
                             f"got {self.classes}")
        if not isinstance(self.domain, str) or not self.domain:
            raise ValueError(f"domain must be a non-empty name, got {self.domain!r}")
        if self.background not in ("textured", "plain"):
            raise ValueError(f"background must be 'textured' or 'plain', got {self.background!r}")

    @property
    def num_classes(self) -> int:
        """Number of classes, ``len(classes)``."""
        return len(self.classes)


def render_shapes(
    n: int, *, config: ShapesConfig | None = None, generator: torch.Generator
) -> tuple[Tensor, list[Target]]:
    """Render ``n`` labelled scenes of shapes.

    Args:
        n: number of images (>= 0).
        config: scene layout; ``ShapesConfig()`` when omitted.
        generator: the only source of randomness; images are made on its device.

    Returns:
        ``(images, targets)``: images float ``[n, 3, S, S]`` RGB in ``[0, 1]``; one target dict
        per image with ``"boxes"`` float ``[N, 4]`` xyxy pixels, tight around each drawn shape
        (whole shape, even where a later object covers part of it), and ``"labels"`` int64
        ``[N]`` indexing ``config.classes``.
    """
    config = _check_config(config)
    _check_count(n, generator)
    images: list[Tensor] = []
    targets: list[Target] = []
    for chunk_images, chunk_targets in _shape_chunks(n, config, generator):
        images.append(chunk_images)
        targets.extend(chunk_targets)
    if not images:
        size = config.image_size
        return torch.empty(0, 3, size, size, device=generator.device), []
    return torch.cat(images), targets


def render_proxy(n: int, *, image_size: int = 96, generator: torch.Generator) -> Tensor:
    """Render ``n`` unlabelled images of a domain unlike :func:`render_shapes`.

    Saturated colour fields overlaid with fine gratings or blurred pixel noise, irregular
    blotches, long lines and wavy curves; nothing resembles a compact shape instance.

    Args:
        n: number of images (>= 0).
        image_size: square side in pixels, 32..512.
        generator: the only source of randomness; images are made on its device.

    Returns:
        Float ``[n, 3, image_size, image_size]`` RGB in ``[0, 1]``.
    """
    _check_count(n, generator)
    _check_free_size(image_size)
    parts = [_proxy_chunk(min(_CHUNK, n - s), image_size, generator) for s in range(0, n, _CHUNK)]
    if not parts:
        return torch.empty(0, 3, image_size, image_size, device=generator.device)
    return torch.cat(parts)


def render_noise(n: int, *, image_size: int = 96, generator: torch.Generator) -> Tensor:
    """Uniform noise images, float ``[n, 3, image_size, image_size]`` in ``[0, 1)``.

    Args:
        n: number of images (>= 0).
        image_size: square side in pixels, 32..512.
        generator: the only source of randomness; images are made on its device.
    """
    _check_count(n, generator)
    _check_free_size(image_size)
    return torch.rand(n, 3, image_size, image_size, generator=generator, device=generator.device)


def write_shapes_dataset(
    out_dir: str | os.PathLike[str],
    n: int,
    *,
    config: ShapesConfig | None = None,
    seed: int,
    split_name: str | None = None,
) -> Path:
    """Render ``n`` scenes and write them as a YOLO-format dataset.

    Layout under ``root = out_dir / split_name`` (or ``out_dir``): ``images/000000.png`` ...,
    ``labels/000000.txt`` ... (one ``class cx cy w h`` line per object, normalized to
    ``[0, 1]``, 6 decimals), ``classes.txt`` (one name per line, line ``i`` is class ``i``)
    and ``meta.json`` (domain, seed, count, config). Every file is written atomically. The
    images equal ``render_shapes(n, config=config,
    generator=torch.Generator().manual_seed(seed))`` up to 8-bit quantization.

    Args:
        out_dir: destination folder (created if missing).
        n: number of images (>= 0).
        config: scene layout; ``ShapesConfig()`` when omitted.
        seed: seed of the CPU generator that drives the rendering.
        split_name: optional sub-folder name such as ``"train"`` or ``"val"``.

    Returns:
        The dataset root folder.
    """
    config = _check_config(config)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if split_name is not None and (not split_name or Path(split_name).name != split_name):
        raise ValueError("split_name must be a plain folder name such as 'train', "
                         f"got {split_name!r}")
    root = Path(out_dir) / split_name if split_name else Path(out_dir)
    generator = torch.Generator().manual_seed(seed)
    _check_count(n, generator)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    size = config.image_size
    index = 0
    for images, targets in _shape_chunks(n, config, generator):
        for image, target in zip(images, targets, strict=True):
            name = f"{index:06d}"
            save_image(root / "images" / f"{name}.png", image)
            write_yolo_labels(root / "labels" / f"{name}.txt", target["boxes"], target["labels"],
                              (size, size))
            index += 1
    atomic_write_text(root / "classes.txt", "".join(f"{c}\n" for c in config.classes))
    meta = {"domain": config.domain, "seed": seed, "num_images": n, "config": asdict(config)}
    atomic_write_json(root / "meta.json", meta)
    logger.info("wrote %d %s images to %s", n, config.domain, root)
    return root


def write_image_folder(out_dir: str | os.PathLike[str], images: Tensor) -> Path:
    """Write unlabelled images as ``out_dir/000000.png`` ... (lossless, atomic).

    Args:
        out_dir: destination folder (created if missing).
        images: float ``[N, 3, H, W]`` RGB in ``[0, 1]`` (values outside are clipped).

    Returns:
        ``Path(out_dir)``.
    """
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be a float tensor [N, 3, H, W], got "
                         f"{tuple(getattr(images, 'shape', ()))}")
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        save_image(root / f"{i:06d}.png", image)
    logger.info("wrote %d images to %s", len(images), root)
    return root


class ShapesDataset(Dataset[tuple[Tensor, Target]]):
    """An in-memory shapes dataset, rendered once from a seed.

    Indexing returns ``(image, target)``: image float ``[3, S, S]`` in ``[0, 1]``, target a dict
    with ``"boxes"`` ``[N, 4]`` xyxy pixels and ``"labels"`` int64 ``[N]``. Use
    :meth:`collate` as the ``DataLoader`` ``collate_fn``.

    Args:
        n: number of images.
        config: scene layout; ``ShapesConfig()`` when omitted.
        seed: seed of the CPU generator that drives the rendering.
    """

    def __init__(self, n: int, *, config: ShapesConfig | None = None, seed: int = 0) -> None:
        self.config = _check_config(config)
        self.seed = seed
        self.images, self.targets = render_shapes(
            n, config=self.config, generator=torch.Generator().manual_seed(seed))

    @property
    def class_names(self) -> list[str]:
        """Class names; ``class_names[i]`` is label ``i``."""
        return list(self.config.classes)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        target = self.targets[index]
        return self.images[index], {"boxes": target["boxes"], "labels": target["labels"]}

    @staticmethod
    def collate(batch: list[tuple[Tensor, Target]]) -> tuple[Tensor, list[Target]]:
        """Stack images to ``[B, 3, S, S]`` and keep targets as a list of ``B`` dicts."""
        images, targets = zip(*batch, strict=True)
        return torch.stack(images), list(targets)


# ---------------------------------------------------------------------------- checks


def _check_config(config: ShapesConfig | None) -> ShapesConfig:
    if config is None:
        return ShapesConfig()
    if not isinstance(config, ShapesConfig):
        raise TypeError(f"config must be a ShapesConfig, got {type(config).__name__}")
    return config


def _check_count(n: int, generator: torch.Generator) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be a non-negative int (number of images), got {n!r}")
    if not isinstance(generator, torch.Generator):
        raise TypeError("generator must be a torch.Generator, e.g. "
                        f"torch.Generator().manual_seed(0), got {type(generator).__name__}")


def _check_free_size(image_size: int) -> None:
    if not isinstance(image_size, int) or not 32 <= image_size <= 512:
        raise ValueError(f"image_size must be an int in [32, 512], got {image_size!r}")


# ---------------------------------------------------------------------------- random helpers


def _uniform(low: float, high: float, shape: tuple[int, ...], g: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(shape, generator=g, device=g.device)


def _hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """HSV in ``[0, 1]`` (any equal shapes) to RGB ``[..., 3]``."""
    k = (torch.tensor([5.0, 3.0, 1.0], device=h.device) + 6 * h[..., None]) % 6
    ramp = torch.minimum(k, 4 - k).clamp(0, 1)
    return v[..., None] * (1 - s[..., None] * ramp)


def _smooth_noise(
    n: int, channels: int, cells: int, size: int, g: torch.Generator, *, mode: str = "bicubic"
) -> Tensor:
    """Gaussian noise on a ``cells x cells`` grid, upsampled to ``[n, channels, size, size]``."""
    coarse = torch.randn(n, channels, cells, cells, generator=g, device=g.device)
    return F.interpolate(coarse, size=(size, size), mode=mode, align_corners=False)


def _pixel_grid(size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Pixel-centre coordinates ``x [1, 1, S]`` and ``y [1, S, 1]``."""
    c = torch.arange(size, device=device, dtype=torch.float32) + 0.5
    return c.view(1, 1, size), c.view(1, size, 1)


# ---------------------------------------------------------------------------- shapes


def _sdf_box(p: Tensor, q: Tensor, bx: float, by: float) -> Tensor:
    dx, dy = p.abs() - bx, q.abs() - by
    return torch.hypot(dx.clamp(min=0), dy.clamp(min=0)) + torch.maximum(dx, dy).clamp(max=0)


def _sdf_circle(p: Tensor, q: Tensor) -> Tensor:
    return torch.hypot(p, q) - 1


def _sdf_square(p: Tensor, q: Tensor) -> Tensor:
    return _sdf_box(p, q, 1.0, 1.0)


def _sdf_triangle(p: Tensor, q: Tensor) -> Tensor:
    # apex (0, -1), base corners (+-1, 1): exact inside, a close bound outside
    return torch.maximum(q - 1, (2 * p.abs() - q - 1) / math.sqrt(5))


def _sdf_cross(p: Tensor, q: Tensor) -> Tensor:
    return torch.minimum(_sdf_box(p, q, 1.0, _CROSS_ARM), _sdf_box(p, q, _CROSS_ARM, 1.0))


def _sdf_ring(p: Tensor, q: Tensor) -> Tensor:
    return (torch.hypot(p, q) - 0.75).abs() - 0.25


def _sdf_diamond(p: Tensor, q: Tensor) -> Tensor:
    return (p.abs() + q.abs() - 1) / math.sqrt(2)


# Signed distance in the object's frame, where the shape fills [-1, 1]^2; negative inside.
_SDF = {"circle": _sdf_circle, "square": _sdf_square, "triangle": _sdf_triangle,
        "cross": _sdf_cross, "ring": _sdf_ring, "diamond": _sdf_diamond}


def _shape_chunks(
    n: int, config: ShapesConfig, g: torch.Generator
) -> Iterator[tuple[Tensor, list[Target]]]:
    for start in range(0, n, _CHUNK):
        yield _shapes_chunk(min(_CHUNK, n - start), config, g)


def _shapes_chunk(n: int, cfg: ShapesConfig, g: torch.Generator) -> tuple[Tensor, list[Target]]:
    size, slots = cfg.image_size, cfg.max_objects
    counts = torch.randint(cfg.min_objects, slots + 1, (n,), generator=g, device=g.device)
    labels = torch.randint(0, cfg.num_classes, (n, slots), generator=g, device=g.device)
    side = _uniform(cfg.min_size, cfg.max_size, (n, slots), g) * size
    log_aspect = _uniform(-math.log(_MAX_ASPECT), math.log(_MAX_ASPECT), (n, slots), g)
    half_w, half_h = side / 2 * torch.exp(log_aspect / 2), side / 2 * torch.exp(-log_aspect / 2)
    # every shape is symmetric under a half turn except the triangle, which may point down
    flip = torch.rand(n, slots, generator=g, device=g.device) < 0.5
    theta = _uniform(-_MAX_TILT, _MAX_TILT, (n, slots), g) + math.pi * flip
    cos, sin = torch.cos(theta), torch.sin(theta)
    ext_x = half_w * cos.abs() + half_h * sin.abs()
    ext_y = half_w * sin.abs() + half_h * cos.abs()
    cx, cy, active = _place(ext_x, ext_y, counts, cfg.min_objects, size, g)

    canvas = _background(n, size, cfg.background == "plain", g)
    dist = _signed_distance(labels, cx, cy, half_w, half_h, cos, sin, cfg.classes, size)
    coverage = (0.5 - dist * torch.sqrt(half_w * half_h)[..., None, None]).clamp(0, 1)
    # a box spans every visibly painted pixel, antialiased fringe included
    drawn = (coverage > _VISIBLE) & active[..., None, None]
    active = active & drawn.flatten(2).any(-1)
    coverage = coverage * active[..., None, None]
    for j in range(slots):
        canvas = _draw_objects(canvas, coverage[:, j], g)
    if cfg.background != "plain":
        sigma = _uniform(0.0, 0.03, (n, 1, 1, 1), g)
        canvas = canvas + sigma * torch.randn(canvas.shape, generator=g, device=g.device)
    boxes = _mask_boxes(drawn)
    targets = [{"boxes": boxes[i][active[i]], "labels": labels[i][active[i]]} for i in range(n)]
    return canvas.clamp(0, 1), targets


def _place(
    ext_x: Tensor, ext_y: Tensor, counts: Tensor, min_objects: int, size: int, g: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """Centres ``[n, M]`` keeping every object inside the canvas, and which slots are used.

    Slot ``j`` tries a few random centres at once and takes the first whose box overlaps no
    earlier box by more than ``_MAX_IOU`` (IoU) or ``_MAX_IOA`` (of the smaller box); slots
    below ``min_objects`` fall back to the least-overlapping candidate, others are dropped.
    """
    n, slots = ext_x.shape
    k = _PLACEMENT_CANDIDATES
    boxes = torch.zeros(n, slots, 4, device=ext_x.device)
    active = torch.zeros(n, slots, dtype=torch.bool, device=ext_x.device)
    rows = torch.arange(n, device=ext_x.device)
    for j in range(slots):
        ex, ey = ext_x[:, j, None], ext_y[:, j, None]
        cx = ex + 1 + (size - 2 * ex - 2) * torch.rand(n, k, generator=g, device=g.device)
        cy = ey + 1 + (size - 2 * ey - 2) * torch.rand(n, k, generator=g, device=g.device)
        cand = torch.stack((cx - ex, cy - ey, cx + ex, cy + ey), dim=-1)
        worst = _worst_overlap(cand, boxes[:, :j], active[:, :j])
        ok = worst <= 1
        pick = torch.where(ok.any(1), ok.int().argmax(1), worst.argmin(1))
        active[:, j] = (j < counts) & (ok.any(1) | (j < min_objects))
        boxes[:, j] = cand[rows, pick]
    centre_x = (boxes[..., 0] + boxes[..., 2]) / 2
    centre_y = (boxes[..., 1] + boxes[..., 3]) / 2
    return centre_x, centre_y, active


def _worst_overlap(cand: Tensor, prev: Tensor, prev_active: Tensor) -> Tensor:
    """Largest overlap ``[n, K]`` of candidates ``[n, K, 4]`` with earlier boxes ``[n, J, 4]``.

    Scaled so that 1 is the acceptance limit; inactive earlier slots count as no overlap.
    """
    if prev.shape[1] == 0:
        return cand.new_zeros(cand.shape[:2])
    a, b = cand[:, :, None], prev[:, None]
    iw = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(min=0)
    ih = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(min=0)
    inter = iw * ih
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    iou = inter / (area_a + area_b - inter)
    ioa = inter / torch.minimum(area_a, area_b)
    ratio = torch.maximum(iou / _MAX_IOU, ioa / _MAX_IOA) * prev_active[:, None]
    return ratio.amax(-1)


def _signed_distance(
    labels: Tensor, cx: Tensor, cy: Tensor, half_w: Tensor, half_h: Tensor, cos: Tensor,
    sin: Tensor, classes: tuple[str, ...], size: int,
) -> Tensor:
    """Per-object signed distance ``[n, M, S, S]`` in object units (negative inside)."""
    x, y = _pixel_grid(size, labels.device)
    flat = labels.reshape(-1)
    out = torch.empty(flat.shape[0], size, size, device=labels.device)
    params = [t.reshape(-1, 1, 1) for t in (cx, cy, half_w, half_h, cos, sin)]
    for k, name in enumerate(classes):
        sel = (flat == k).nonzero().squeeze(1)
        if sel.numel() == 0:
            continue
        ox, oy, hw, hh, c, s = (t[sel] for t in params)
        dx, dy = x - ox, y - oy
        out[sel] = _SDF[name]((dx * c + dy * s) / hw, (dy * c - dx * s) / hh)
    return out.view(*labels.shape, size, size)


def _mask_boxes(mask: Tensor) -> Tensor:
    """Tight xyxy pixel boxes ``[..., 4]`` of boolean masks ``[..., S, S]`` (zeros if empty)."""
    size = mask.shape[-1]
    cols, rows = mask.any(-2).int(), mask.any(-1).int()
    x1, y1 = cols.argmax(-1), rows.argmax(-1)
    x2, y2 = size - cols.flip(-1).argmax(-1), size - rows.flip(-1).argmax(-1)
    return torch.stack((x1, y1, x2, y2), dim=-1).float()


def _background(n: int, size: int, plain: bool, g: torch.Generator) -> Tensor:
    """Muted backgrounds ``[n, 3, S, S]``: a flat colour, or a gradient plus smooth noise."""
    base = _hsv_to_rgb(_uniform(0, 1, (n,), g), _uniform(0, 0.5, (n,), g),
                       _uniform(0.2, 0.9, (n,), g))[..., None, None]
    if plain:
        return base.expand(n, 3, size, size).clone()
    other = (base + _uniform(-0.25, 0.25, (n, 3, 1, 1), g)).clamp(0, 1)
    x, y = _pixel_grid(size, g.device)
    angle = _uniform(0, 2 * math.pi, (n, 1, 1, 1), g)
    ramp = ((x - size / 2) * torch.cos(angle) + (y - size / 2) * torch.sin(angle)) / size + 0.5
    low = _uniform(0, 0.12, (n, 1, 1, 1), g) * _smooth_noise(n, 3, 4, size, g)
    fine = _smooth_noise(n, 1, size // 6, size, g, mode="bilinear")
    mid = _uniform(0, 0.05, (n, 1, 1, 1), g) * fine
    return (base + (other - base) * ramp + low + mid).clamp(0, 1)


def _draw_objects(canvas: Tensor, coverage: Tensor, g: torch.Generator) -> Tensor:
    """Composite one object per image (coverage ``[n, S, S]``, zero where none) onto ``canvas``.

    The fill is a colour shaded by a flat, striped or blotchy pattern; the colour is the one of
    a few random candidates that stays farthest from the canvas under the object at every
    shade, so each object contrasts with its local background.
    """
    n, _, size, _ = canvas.shape
    k = _COLOUR_CANDIDATES
    colours = _hsv_to_rgb(_uniform(0, 1, (n, k), g), _uniform(0.35, 1, (n, k), g),
                          _uniform(0.35, 1, (n, k), g))
    depth = _uniform(0.15, 0.45, (n, 1, 1), g)
    weight = coverage[:, None]
    local = (canvas * weight).sum((2, 3)) / weight.sum((2, 3)).clamp(min=1e-6)
    shades = 1 - depth.view(n, 1, 1) * torch.tensor([0.0, 0.5, 1.0], device=canvas.device)
    shaded = colours[:, :, None] * shades[..., None]
    gap = (shaded - local[:, None, None]).norm(dim=-1).amin(-1)
    colour = colours[torch.arange(n, device=canvas.device), gap.argmax(1)]

    x, y = _pixel_grid(size, canvas.device)
    angle = _uniform(0, math.pi, (n, 1, 1), g)
    period = _uniform(3, 10, (n, 1, 1), g)
    phase = _uniform(0, 2 * math.pi, (n, 1, 1), g)
    stripes = 0.5 + 0.5 * torch.sin(
        2 * math.pi * (x * torch.cos(angle) + y * torch.sin(angle)) / period + phase)
    blotches = _smooth_noise(n, 1, 6, size, g, mode="bilinear")[:, 0].sigmoid()
    kind = torch.randint(0, 3, (n, 1, 1), generator=g, device=g.device)
    pattern = torch.where(kind == 1, stripes, blotches) * (kind > 0)
    fill = colour[..., None, None] * (1 - depth * pattern)[:, None]
    return torch.lerp(canvas, fill, weight)


# ---------------------------------------------------------------------------- proxy domain


def _proxy_chunk(n: int, size: int, g: torch.Generator) -> Tensor:
    x, y = _pixel_grid(size, g.device)
    x, y = x[:, None], y[:, None]  # [1, 1, 1, S] and [1, 1, S, 1]

    field = _smooth_noise(n, 3, 3, size, g)
    lo, hi = field.amin((2, 3), keepdim=True), field.amax((2, 3), keepdim=True)
    image = (field - lo) / (hi - lo).clamp(min=1e-6)

    angles = _uniform(0, math.pi, (n, 2, 1, 1), g)
    periods = _uniform(2.5, 6, (n, 2, 1, 1), g)
    along = x * torch.cos(angles) + y * torch.sin(angles)
    gratings = (0.5 + 0.5 * torch.sin(2 * math.pi * along / periods)).prod(1, keepdim=True)
    grain = F.avg_pool2d(torch.rand(n, 1, size, size, generator=g, device=g.device), 3, 1, 1)
    grain = (grain - 0.5) * 3 + 0.5
    use_grating = torch.rand(n, 1, 1, 1, generator=g, device=g.device) < 0.5
    texture = torch.where(use_grating, gratings, grain).clamp(0, 1)
    image = _blend(image, torch.rand(n, 3, 1, 1, generator=g, device=g.device),
                   _uniform(0.15, 0.5, (n, 1, 1, 1), g) * texture)

    level = _uniform(-0.2, 0.5, (n, 1, 1, 1), g)  # low levels: large irregular blotches
    present = torch.rand(n, 1, 1, 1, generator=g, device=g.device) < 0.7
    blot = ((_smooth_noise(n, 1, 5, size, g) - level) * 4).clamp(0, 1) * present
    image = _blend(image, torch.rand(n, 3, 1, 1, generator=g, device=g.device), blot)

    image = _draw_strokes(image, _curve_distance(n, size, 3, x, y, g), g)
    image = _draw_strokes(image, _segment_distance(n, size, 4, x, y, g), g)
    sigma = _uniform(0, 0.06, (n, 1, 1, 1), g)
    return (image + sigma * torch.randn(image.shape, generator=g, device=g.device)).clamp(0, 1)


def _blend(image: Tensor, colour: Tensor, alpha: Tensor) -> Tensor:
    return torch.lerp(image, colour.expand_as(image), alpha)


def _curve_distance(n: int, size: int, count: int, x: Tensor, y: Tensor,
                    g: torch.Generator) -> Tensor:
    """Approximate distance ``[n, count, S, S]`` to random sine curves crossing the canvas."""
    angle = _uniform(0, math.pi, (n, count, 1, 1), g)
    offset = _uniform(-0.4 * size, 0.4 * size, (n, count, 1, 1), g)
    amp = _uniform(2, 0.15 * size, (n, count, 1, 1), g)
    freq = _uniform(0.04, 0.3, (n, count, 1, 1), g)
    phase = _uniform(0, 2 * math.pi, (n, count, 1, 1), g)
    cx, cy = x - size / 2, y - size / 2
    u = cx * torch.cos(angle) + cy * torch.sin(angle)
    v = cy * torch.cos(angle) - cx * torch.sin(angle)
    wave = freq * u + phase
    return (v - offset - amp * torch.sin(wave)).abs() / torch.hypot(
        torch.ones_like(wave), amp * freq * torch.cos(wave))


def _segment_distance(n: int, size: int, count: int, x: Tensor, y: Tensor,
                      g: torch.Generator) -> Tensor:
    """Distance ``[n, count, S, S]`` to random long segments whose ends may leave the canvas."""
    ends = _uniform(-0.2 * size, 1.2 * size, (n, count, 4, 1, 1), g)
    ax, ay, bx, by = ends.unbind(2)
    dx, dy = bx - ax, by - ay
    t = (((x - ax) * dx + (y - ay) * dy) / (dx * dx + dy * dy).clamp(min=1e-6)).clamp(0, 1)
    return torch.hypot(x - ax - t * dx, y - ay - t * dy)


def _draw_strokes(image: Tensor, dist: Tensor, g: torch.Generator) -> Tensor:
    """Paint antialiased strokes (distance fields ``[n, k, S, S]``), each present with p=0.6."""
    n, count = dist.shape[:2]
    width = _uniform(0.8, 3, (n, count, 1, 1), g)
    present = torch.rand(n, count, 1, 1, generator=g, device=g.device) < 0.6
    alpha = (width / 2 + 0.5 - dist).clamp(0, 1) * present
    colours = torch.rand(n, count, 3, generator=g, device=g.device)
    for i in range(count):
        image = _blend(image, colours[:, i, :, None, None], alpha[:, i, None])
    return image
