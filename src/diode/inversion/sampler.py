"""Box and category layouts to synthesize images for, and false-positive sampling.

A :class:`BBoxSampler` holds a layout rule in normalized coordinates and draws targets
for any canvas at sample time: ``list[dict]`` with ``"boxes"`` float32 ``[N, 4]`` xyxy
pixels and ``"labels"`` int64 ``[N]``. :func:`add_false_positives` and
:class:`FPSampling` implement DIODE's false-positive sampling: confident teacher
detections away from the current targets become extra targets.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

import torch
from torch import Tensor
from torchvision.ops import box_iou

from diode._boxes import Target, detections_as_targets, validate_targets, xyxy_to_cxcywh
from diode.data.labels import read_yolo_labels
from diode.inversion.augment import _check_generator

__all__ = ["BBoxSampler", "FPSampling", "add_false_positives"]

logger = logging.getLogger(__name__)

Layout = tuple[Tensor, Tensor]  # normalized xyxy boxes [N, 4] float32, labels [N] int64

_CANDIDATES_PER_BOX = 32  # multibox: candidates drawn per wanted box before an image settles for fewer


def _check_num_classes(num_classes: int) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    return num_classes


def _check_prior(class_prior: Sequence[float] | Tensor | None, num_classes: int) -> Tensor | None:
    """Validate a class prior and return it as a float64 CPU tensor (``None`` = uniform)."""
    if class_prior is None:
        return None
    try:
        prior = torch.as_tensor(class_prior, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError) as err:
        raise ValueError(f"class_prior must be a sequence of {num_classes} weights: {err}") from err
    if prior.shape != (num_classes,):
        raise ValueError(f"class_prior must have num_classes = {num_classes} weights, "
                         f"got shape {tuple(prior.shape)}")
    if not torch.isfinite(prior).all() or (prior < 0).any() or prior.sum() <= 0:
        raise ValueError("class_prior must be finite, non-negative weights with a positive sum")
    return prior / prior.sum()


def _check_size_range(min_size: float, max_size: float) -> tuple[float, float]:
    if not (isinstance(min_size, (int, float)) and isinstance(max_size, (int, float))
            and 0 < min_size <= max_size <= 1):
        raise ValueError(f"min_size and max_size must satisfy 0 < min_size <= max_size <= 1 "
                         f"(fractions), got {min_size!r} and {max_size!r}")
    return float(min_size), float(max_size)


def _check_components(components: Sequence[BBoxSampler], weights: Sequence[float] | None, num_classes: int,
                      kind: str) -> tuple[list[BBoxSampler], Tensor]:
    """The components and normalized float64 weights of a mixture (empty for other kinds)."""
    if kind != "mixture":
        if components or weights is not None:
            raise ValueError("components and weights belong to kind='mixture' (BBoxSampler.mixture)")
        return [], torch.ones(0, dtype=torch.float64)
    components = list(components)
    if not components or not all(isinstance(c, BBoxSampler) for c in components):
        raise ValueError(f"mixture needs one or more BBoxSampler components, got {components!r}")
    other = [c.num_classes for c in components if c.num_classes != num_classes]
    if other:
        raise ValueError(f"mixture components must share num_classes={num_classes}, got {other}")
    if weights is None:
        weights = [1.0] * len(components)
    w = torch.as_tensor(list(weights), dtype=torch.float64)
    if w.shape != (len(components),) or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"mixture weights must be {len(components)} finite non-negative numbers, not all zero, "
                         f"got {list(weights)!r}")
    return components, w / w.sum()


def _parse_yolo_labels(file: Path, num_classes: int) -> Layout:
    """Read a YOLO label file (rows ``class cx cy w h``, normalized) into a layout (boxes in ``[0, 1]``)."""
    target = read_yolo_labels(file, (1, 1))
    boxes, labels = target["boxes"].double(), target["labels"]
    out_of_range = labels >= num_classes
    if out_of_range.any():
        j = int(out_of_range.nonzero()[0, 0])
        raise ValueError(f"{file}, box {j}: class id {int(labels[j])} is outside [0, {num_classes})")
    outside = (boxes[:, 2] <= 0) | (boxes[:, 3] <= 0) | (boxes[:, 0] >= 1) | (boxes[:, 1] >= 1)
    if outside.any():
        j = int(outside.nonzero()[0, 0])
        raise ValueError(f"{file}, box {j} = {boxes[j].tolist()} (xyxy, normalized) lies outside the "
                         "normalized image [0, 1]")
    return boxes.clamp(0, 1).float(), labels


def _manifest_label_files(manifest: Path) -> list[Path]:
    """Label files of a DIODE-style manifest (``images`` -> ``labels``, extension -> ``.txt``)."""
    files = []
    for lineno, line in enumerate(manifest.read_text().splitlines(), start=1):
        entry = line.strip()
        if not entry:
            continue
        image = Path(entry)
        if not image.is_absolute():
            image = manifest.parent / image
        parts = list(image.parts)
        if "images" not in parts:
            raise ValueError(f"{manifest}, line {lineno}: image path {entry!r} has no 'images' "
                             "directory to map to its 'labels' directory")
        i = len(parts) - 1 - parts[::-1].index("images")
        parts[i] = "labels"
        label = Path(*parts).with_suffix(".txt")
        if not label.is_file():
            raise ValueError(f"{manifest}, line {lineno}: label file {label} does not exist")
        files.append(label)
    return files


def _check_k(k: int | tuple[int, int], kind: str) -> tuple[int, int]:
    """``k`` (boxes per image) as an inclusive ``(low, high)`` range."""
    def is_count(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    if isinstance(k, int) and is_count(k):
        return k, k
    if (kind == "multibox" and isinstance(k, tuple) and len(k) == 2 and all(is_count(v) for v in k)
            and k[0] <= k[1]):
        return k
    what = "an int >= 1 or a (low, high) range with 1 <= low <= high" if kind == "multibox" else "an int >= 1"
    raise ValueError(f"k must be {what} (boxes per image), got {k!r}")


def _read_layouts(path: str | Path, num_classes: int) -> list[Layout]:
    """Layouts of a label set: a manifest file, a folder with ``manifest.txt``, a run folder or a labels folder."""
    root = Path(path)
    if root.is_dir() and (root / "manifest.txt").is_file():
        root = root / "manifest.txt"
    if root.is_file():
        files = _manifest_label_files(root)
    elif root.is_dir():
        folder = root / "labels" if (root / "labels").is_dir() else root
        files = sorted(folder.glob("*.txt"))
    else:
        raise ValueError(f"path {str(path)!r} is neither a manifest file nor a labels folder")
    if not files:
        raise ValueError(f"no label files found at {str(path)!r}: expected YOLO *.txt files "
                         "or a manifest listing images")
    layouts = [_parse_yolo_labels(f, num_classes) for f in files]
    logger.info("read %d label layouts from %s", len(layouts), path)
    return layouts


def _targets_as_layouts(targets: Sequence[Target], image_size: tuple[int, int] | None,
                        num_classes: int) -> list[Layout]:
    """Pixel targets of one canvas as normalized layouts (boxes clipped to the canvas)."""
    if image_size is None:
        raise ValueError("image_size is required when the source is a list of targets: give the "
                         "(height, width) of their canvas")
    validate_targets(targets, image_size=image_size, num_classes=num_classes)
    h, w = image_size
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    return [((t["boxes"].detach().to("cpu", torch.float32) / scale).clamp(0, 1),
             t["labels"].detach().to("cpu", torch.int64)) for t in targets]


def _batched_iou(box: Tensor, boxes: Tensor) -> Tensor:
    """IoU ``[B, K]`` of ``box`` ``[B, 4]`` with each of ``boxes`` ``[B, K, 4]`` (xyxy; empty boxes give 0)."""
    lt = torch.maximum(box[:, None, :2], boxes[..., :2])
    rb = torch.minimum(box[:, None, 2:], boxes[..., 2:])
    inter = (rb - lt).clamp_min(0).prod(dim=-1)
    area = (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1])
    areas = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    return inter / (area[:, None] + areas - inter).clamp_min(1e-12)


@dataclass(frozen=True)
class _BoxStatistics:
    """Box statistics of a label set, as :meth:`BBoxSampler.from_statistics` fits them.

    Attributes:
        features: ``[M, 4]`` float32 ``(cx, cy, log w, log h)`` of every box (normalized), sorted by class.
        class_start: ``[C]`` int64 first row of each class in ``features``.
        class_count: ``[C]`` int64 rows of each class.
        counts: ``[I]`` int64 boxes per image, over the images with at least one box, capped at ``max_boxes``.
        kernel: ``[C + 1, 4]`` float32 standard deviation of the Gaussian kernel per feature: row
            ``c`` for the boxes of class ``c`` (the last row's where the class has fewer than 2
            boxes), row ``C`` for the pool of all boxes.
        per_class: a box's shape and position come from the boxes of its class.
        bandwidth: the kernel's width relative to Scott's rule.
        max_boxes: cap on boxes per image (``None``: none).
    """

    features: Tensor
    class_start: Tensor
    class_count: Tensor
    counts: Tensor
    kernel: Tensor
    per_class: bool
    bandwidth: float
    max_boxes: int | None

    @classmethod
    def fit(cls, layouts: Sequence[Layout], *, num_classes: int, per_class: bool, bandwidth: float,
            max_boxes: int | None) -> _BoxStatistics:
        counts = torch.tensor([len(lab) for _, lab in layouts], dtype=torch.int64)
        counts = counts[counts > 0]
        if not len(counts):
            raise ValueError("source holds no boxes: give label files or targets with at least one box")
        if max_boxes is not None:
            counts = counts.clamp_max(max_boxes)
        boxes = xyxy_to_cxcywh(torch.cat([b for b, _ in layouts]).float())
        labels = torch.cat([lab for _, lab in layouts])
        order = labels.argsort(stable=True)
        features = torch.cat((boxes[:, :2], boxes[:, 2:].log()), dim=1)[order]
        labels = labels[order]
        class_count = torch.bincount(labels, minlength=num_classes)
        n = class_count.clamp_min(1)[:, None].float()
        mean = torch.zeros(num_classes, 4).index_add_(0, labels, features) / n
        var = torch.zeros(num_classes, 4).index_add_(0, labels, features.square()) / n - mean.square()
        # Scott's rule for a d = 4 dimensional kernel density estimate: std * n^(-1 / (d + 4))
        pooled = features.std(dim=0, correction=0) * len(features) ** (-1 / 8)
        own = var.clamp_min(0).sqrt() * n ** (-1 / 8)
        kernel = bandwidth * torch.cat((torch.where(class_count[:, None] >= 2, own, pooled), pooled[None]))
        return cls(features=features, class_start=class_count.cumsum(0) - class_count, class_count=class_count,
                   counts=counts, kernel=kernel, per_class=per_class, bandwidth=bandwidth, max_boxes=max_boxes)


class BBoxSampler:
    """Draws synthesis targets (boxes and classes) for a batch.

    Build one with :meth:`onebox`, :meth:`tiles`, :meth:`multibox`, :meth:`from_labels`
    or :meth:`from_statistics`, then call :meth:`sample`. Layouts are normalized, so any
    canvas size works. Every builder takes ``class_prior`` (``[num_classes]``
    non-negative weights, e.g. :func:`~diode.estimate_class_prior`).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        kind: Literal["onebox", "tiles", "multibox", "labels", "statistics", "mixture"],
        class_prior: Sequence[float] | Tensor | None = None,
        min_size: float = 0.2,
        max_size: float = 0.8,
        k: int | tuple[int, int] = 1,
        max_iou: float = 0.0,
        layouts: Sequence[Layout] = (),
        order: Literal["random", "sequential"] = "random",
        statistics: _BoxStatistics | None = None,
        components: Sequence[BBoxSampler] = (),
        weights: Sequence[float] | None = None,
    ) -> None:
        """Prefer the builders (:meth:`onebox`, :meth:`tiles`, :meth:`multibox`, :meth:`mixture`, ...)."""
        self.num_classes = _check_num_classes(num_classes)
        kinds = ("onebox", "tiles", "multibox", "labels", "statistics", "mixture")
        if kind not in kinds:
            raise ValueError(f"kind must be one of {', '.join(map(repr, kinds))}, got {kind!r}")
        if order not in ("random", "sequential"):
            raise ValueError(f"order must be 'random' or 'sequential', got {order!r}")
        if not (isinstance(max_iou, (int, float)) and 0 <= max_iou < 1):
            raise ValueError(f"max_iou must be in [0, 1) (0: boxes never overlap), got {max_iou!r}")
        if kind == "labels" and not layouts:
            raise ValueError("layouts is empty: give at least one label layout")
        if kind == "statistics" and statistics is None:
            raise ValueError("statistics is missing: build the sampler with BBoxSampler.from_statistics")
        self.kind = kind
        self.class_prior = _check_prior(class_prior, num_classes)
        self.min_size, self.max_size = _check_size_range(min_size, max_size)
        self.min_k, self.k = _check_k(k, kind)
        self.max_iou = float(max_iou)
        self.layouts = list(layouts)
        self.order = order
        self.statistics = statistics
        self.cursor = 0
        self.components, self.weights = _check_components(components, weights, num_classes, kind)

    @classmethod
    def onebox(
        cls,
        *,
        num_classes: int,
        min_size: float = 0.2,
        max_size: float = 0.8,
        class_prior: Sequence[float] | Tensor | None = None,
    ) -> BBoxSampler:
        """One box per image, ``w, h ~ U[min_size, max_size]`` of the canvas, fully inside it.

        Args:
            num_classes: number of classes of the teacher.
            min_size: smallest box side as a fraction of the canvas side.
            max_size: largest box side as a fraction of the canvas side.
            class_prior: ``[num_classes]`` non-negative weights, or ``None`` (uniform).
        """
        return cls(num_classes=num_classes, kind="onebox", class_prior=class_prior,
                   min_size=min_size, max_size=max_size)

    @classmethod
    def tiles(
        cls,
        *,
        num_classes: int,
        k: int = 4,
        min_size: float = 0.5,
        max_size: float = 0.9,
        class_prior: Sequence[float] | Tensor | None = None,
    ) -> BBoxSampler:
        """``k`` non-overlapping boxes per image, one per cell of a grid.

        The canvas is split into ``ceil(sqrt(k))`` x ``ceil(sqrt(k))`` cells; each image
        uses ``k`` distinct random cells, and each box has sides ``U[min_size, max_size]``
        of its cell and a uniform position inside it.

        Args:
            num_classes: number of classes of the teacher.
            k: boxes per image.
            min_size: smallest box side as a fraction of the cell side.
            max_size: largest box side as a fraction of the cell side.
            class_prior: ``[num_classes]`` non-negative weights, or ``None`` (uniform).
        """
        return cls(num_classes=num_classes, kind="tiles", class_prior=class_prior,
                   min_size=min_size, max_size=max_size, k=k)

    @classmethod
    def multibox(
        cls,
        *,
        num_classes: int,
        k: int | tuple[int, int] = (1, 4),
        min_size: float = 0.15,
        max_size: float = 0.5,
        max_iou: float = 0.0,
        class_prior: Sequence[float] | Tensor | None = None,
    ) -> BBoxSampler:
        """``k`` boxes per image at random places, no two overlapping by more than ``max_iou``.

        Each image wants ``n ~ U{low, ..., high}`` boxes (``k = (low, high)``, or exactly
        ``k``). Candidates with sides ``U[min_size, max_size]`` of the canvas and a uniform
        position inside it are drawn (``32 * high`` per image, all at once) and accepted in
        order while their IoU with every box already accepted in that image is at most
        ``max_iou``, until the image has ``n`` boxes. An image whose candidates run out
        keeps fewer boxes (only when ``max_size`` leaves little room; logged at debug
        level). Where the canvas gets crowded, small candidates fit more often, so
        accepted boxes lean small.

        Args:
            num_classes: number of classes of the teacher.
            k: boxes per image, an int or an inclusive ``(low, high)`` range.
            min_size: smallest box side as a fraction of the canvas side.
            max_size: largest box side as a fraction of the canvas side.
            max_iou: largest IoU allowed between two boxes of an image (0: disjoint).
            class_prior: ``[num_classes]`` non-negative weights, or ``None`` (uniform).
        """
        return cls(num_classes=num_classes, kind="multibox", class_prior=class_prior,
                   min_size=min_size, max_size=max_size, k=k, max_iou=max_iou)

    @classmethod
    def mixture(cls, samplers: Sequence[BBoxSampler], *, weights: Sequence[float] | None = None) -> BBoxSampler:
        """Each image's layout from one of ``samplers``, drawn with probability proportional to ``weights``.

        For example single objects and 4-box grids side by side (``onebox`` + ``tiles``):
        on the toy benchmark a student learns more from such a mix than from either kind
        alone (``docs/toy_distill_results.rst``). Each component keeps its own sizes and
        class prior; the images of a batch are split among the components at random.

        Args:
            samplers: samplers of the same ``num_classes`` (mixtures nest).
            weights: non-negative weights, one per sampler, not all zero; ``None``: equal.
        """
        if not samplers:
            raise ValueError("mixture needs at least one sampler")
        return cls(num_classes=samplers[0].num_classes, kind="mixture", components=samplers, weights=weights)

    @classmethod
    def from_labels(
        cls,
        path: str | Path,
        *,
        num_classes: int,
        order: Literal["random", "sequential"] = "random",
        class_prior: Sequence[float] | Tensor | None = None,
    ) -> BBoxSampler:
        """Layouts read from an existing label set.

        ``path`` is one of: a DIODE-style manifest file (one image path per line,
        relative paths against the manifest's folder; labels at the same path with
        the last ``images`` component replaced by ``labels`` and the extension by
        ``.txt``); a folder holding ``manifest.txt``; a folder with a ``labels/``
        subfolder (a diode run folder); or a folder of YOLO ``*.txt`` label files
        (rows ``class cx cy w h``, normalized).

        Args:
            path: manifest file or labels folder.
            num_classes: class ids must lie in ``[0, num_classes)``.
            order: ``"random"`` picks layouts with the generator; ``"sequential"`` cycles
                through them in file order starting at ``self.cursor`` (advanced by each
                :meth:`sample`; set it to ``batch * batch_size`` to split work across
                processes).
            class_prior: ``None`` keeps the files' classes; ``[num_classes]`` weights
                redraw every box's class from them (the files' boxes are kept).

        Raises:
            ValueError: no label files, or a malformed row (the message names file and line).
        """
        num_classes = _check_num_classes(num_classes)
        return cls(num_classes=num_classes, kind="labels", layouts=_read_layouts(path, num_classes),
                   order=order, class_prior=class_prior)

    @classmethod
    def from_statistics(
        cls,
        source: str | Path | Sequence[Target],
        *,
        num_classes: int,
        image_size: tuple[int, int] | None = None,
        per_class: bool = True,
        bandwidth: float = 1.0,
        max_boxes: int | None = None,
        min_size: float = 0.02,
        max_size: float = 1.0,
        class_prior: Sequence[float] | Tensor | None = None,
    ) -> BBoxSampler:
        """New layouts drawn from the box statistics of a label set.

        The sampler fits, from ``source``, the distribution of boxes per image and a
        kernel density estimate of each box's ``(cx, cy, log w, log h)`` (normalized),
        per class or over all boxes. An image then gets:

        - ``n`` boxes, ``n`` drawn from the label set's per-image counts (images with
          no box left out), at most ``max_boxes``;
        - for each box, a class from ``class_prior`` (default: the label set's class
          frequencies);
        - for each box, an observed box drawn uniformly from those of its class (from
          all boxes when ``per_class`` is false or its class has none), plus Gaussian
          noise of per-feature standard deviation ``bandwidth * std * n ** (-1/8)``
          (Scott's rule in 4 dimensions; ``std`` and ``n`` over the pool the box came
          from, over all boxes for a class with fewer than 2; ``bandwidth=0``
          resamples observed boxes exactly); sides are clamped to
          ``[min_size, max_size]`` of the canvas and the box is moved inside it.

        Counts, classes and boxes are drawn independently, so co-occurrence of classes
        and overlap between boxes follow no rule.

        Args:
            source: a label set as :meth:`from_labels` reads it, or targets
                (``"boxes"`` xyxy pixels of an ``image_size`` canvas, ``"labels"``).
            num_classes: class ids must lie in ``[0, num_classes)``.
            image_size: ``(height, width)`` of the targets' canvas (targets only).
            per_class: fit shapes and positions per class (else one pool for all classes).
            bandwidth: kernel width relative to Scott's rule (>= 0).
            max_boxes: cap on boxes per image (``None``: the label set's counts as they are).
            min_size: smallest box side as a fraction of the canvas side.
            max_size: largest box side as a fraction of the canvas side.
            class_prior: ``[num_classes]`` non-negative weights, or ``None`` (the label
                set's class frequencies).

        Raises:
            ValueError: the source holds no box, a malformed label row or target, or a bad option.
        """
        num_classes = _check_num_classes(num_classes)
        if not (isinstance(bandwidth, (int, float)) and math.isfinite(bandwidth) and bandwidth >= 0):
            raise ValueError(f"bandwidth must be a finite number >= 0, got {bandwidth!r}")
        if max_boxes is not None and (isinstance(max_boxes, bool) or not isinstance(max_boxes, int)
                                      or max_boxes < 1):
            raise ValueError(f"max_boxes must be an int >= 1 or None, got {max_boxes!r}")
        if isinstance(source, (str, Path)):
            layouts = _read_layouts(source, num_classes)
        else:
            layouts = _targets_as_layouts(source, image_size, num_classes)
        stats = _BoxStatistics.fit(layouts, num_classes=num_classes, per_class=bool(per_class),
                                   bandwidth=float(bandwidth), max_boxes=max_boxes)
        prior = class_prior if class_prior is not None else stats.class_count.double()
        return cls(num_classes=num_classes, kind="statistics", class_prior=prior, min_size=min_size,
                   max_size=max_size, statistics=stats)

    def __len__(self) -> int:
        """Number of stored layouts (``from_labels``); 0 for generated layouts."""
        return len(self.layouts)

    def __bool__(self) -> bool:
        """Always true: a generating sampler has no stored layouts (``len`` 0) but is no empty value."""
        return True

    def __repr__(self) -> str:
        k = self.k if self.min_k == self.k else (self.min_k, self.k)
        size = f"min_size={self.min_size}, max_size={self.max_size}"
        if self.kind == "statistics":
            st = self.statistics
            assert st is not None
            extra = (f"boxes={len(st.features)}, images={len(st.counts)}, per_class={st.per_class}, "
                     f"bandwidth={st.bandwidth}, max_boxes={st.max_boxes}, {size}")
        elif self.kind == "mixture":
            parts = ", ".join(repr(c) for c in self.components)
            return f"BBoxSampler.mixture([{parts}], weights={[round(float(w), 6) for w in self.weights]})"
        else:
            extra = {"onebox": size, "tiles": f"k={k}, {size}",
                     "multibox": f"k={k}, {size}, max_iou={self.max_iou}",
                     "labels": f"layouts={len(self.layouts)}, order={self.order!r}"}[self.kind]
        if self.class_prior is not None:
            digest = hashlib.sha256(self.class_prior.numpy().tobytes()).hexdigest()[:12]
            extra += f", class_prior=sha256:{digest}"
        return f"BBoxSampler.{self.kind}(num_classes={self.num_classes}, {extra})"

    def _labels(self, shape: tuple[int, ...], generator: torch.Generator | None,
                device: torch.device) -> Tensor:
        if self.class_prior is None:
            return torch.randint(self.num_classes, shape, generator=generator, device=device)
        n = math.prod(shape)
        if n == 0:
            return torch.zeros(shape, dtype=torch.int64, device=device)
        draws = torch.multinomial(self.class_prior.to(device), n, replacement=True,
                                  generator=generator)
        return draws.reshape(shape)

    def _draw_grid(self, batch_size: int, generator: torch.Generator | None,
                   device: torch.device) -> list[Layout]:
        """Normalized boxes and labels for onebox/tiles: ``k`` per image."""
        g = 1 if self.kind == "onebox" else math.ceil(math.sqrt(self.k))
        k = self.k
        # k distinct cells per image: the first k of a random permutation of the g*g cells
        cells = torch.rand(batch_size, g * g, generator=generator, device=device).argsort(dim=1)
        cells = cells[:, :k]
        lo, hi = self.min_size, self.max_size
        wh = (lo + (hi - lo) * torch.rand(batch_size, k, 2, generator=generator, device=device)) / g
        origin = torch.stack((cells % g, cells // g), dim=-1).float() / g
        offset = torch.rand(batch_size, k, 2, generator=generator, device=device)
        xy = origin + (1 / g - wh) * offset
        boxes = torch.cat((xy, xy + wh), dim=-1).clamp(0, 1)
        labels = self._labels((batch_size, k), generator, device)
        return list(zip(boxes.unbind(0), labels.unbind(0), strict=True))

    def _draw_multibox(self, batch_size: int, generator: torch.Generator | None,
                       device: torch.device) -> list[Layout]:
        """Greedy placement of random candidates, vectorised over the batch (see :meth:`multibox`)."""
        high = self.k
        wanted = torch.randint(self.min_k, high + 1, (batch_size,), generator=generator, device=device)
        n_candidates = _CANDIDATES_PER_BOX * high
        lo, hi = self.min_size, self.max_size
        wh = lo + (hi - lo) * torch.rand(batch_size, n_candidates, 2, generator=generator, device=device)
        xy = (1 - wh) * torch.rand(batch_size, n_candidates, 2, generator=generator, device=device)
        candidates = torch.cat((xy, xy + wh), dim=-1)
        placed = candidates.new_zeros(batch_size, high, 4)
        count = torch.zeros(batch_size, dtype=torch.int64, device=device)
        slots = torch.arange(high, device=device)
        for j in range(n_candidates):
            box = candidates[:, j]
            clash = (_batched_iou(box, placed) > self.max_iou) & (slots < count[:, None])
            take = (count < wanted) & ~clash.any(dim=1)
            into = (slots == count[:, None]) & take[:, None]
            placed = torch.where(into[..., None], box[:, None], placed)
            count = count + take.long()
        labels = self._labels((batch_size, high), generator, device)
        short = int((count < wanted).sum())
        if short:
            logger.debug("multibox: %d of %d images got fewer boxes than drawn (no room left for "
                         "max_size=%s, max_iou=%s)", short, batch_size, self.max_size, self.max_iou)
        return [(placed[i, :c], labels[i, :c]) for i, c in enumerate(count.tolist())]

    def _draw_statistics(self, batch_size: int, generator: torch.Generator | None,
                         device: torch.device) -> list[Layout]:
        """Layouts from the fitted statistics (see :meth:`from_statistics`)."""
        st = self.statistics
        assert st is not None
        pick = torch.randint(len(st.counts), (batch_size,), generator=generator, device=device)
        counts = st.counts.to(device)[pick]
        total = int(counts.sum())
        labels = self._labels((total,), generator, device)
        features = st.features.to(device)
        pool = torch.full_like(labels, len(features))
        start = torch.zeros_like(labels)
        kernel = st.kernel.to(device)
        which = torch.full_like(labels, len(kernel) - 1)
        if st.per_class:
            own = st.class_count.to(device)[labels]
            pool = torch.where(own > 0, own, pool)
            start = torch.where(own > 0, st.class_start.to(device)[labels], start)
            which = torch.where(own > 0, labels, which)
        u = torch.rand(total, generator=generator, device=device)
        rows = start + (u * pool).long().clamp_max(pool - 1)
        noise = torch.randn(total, 4, generator=generator, device=device) * kernel[which]
        drawn = features[rows] + noise
        wh = drawn[:, 2:].exp().clamp(self.min_size, self.max_size)
        centre = torch.minimum(torch.maximum(drawn[:, :2], wh / 2), 1 - wh / 2)
        boxes = torch.cat((centre - wh / 2, centre + wh / 2), dim=1).clamp(0, 1)
        sizes = counts.tolist()
        return list(zip(boxes.split(sizes), labels.split(sizes), strict=True))

    def _draw(self, batch_size: int, generator: torch.Generator | None, device: torch.device) -> list[Layout]:
        """``batch_size`` normalized layouts of this sampler's kind."""
        draw = {"labels": self._pick_layouts, "onebox": self._draw_grid, "tiles": self._draw_grid,
                "multibox": self._draw_multibox, "statistics": self._draw_statistics,
                "mixture": self._draw_mixture}[self.kind]
        return draw(batch_size, generator, device)

    def _draw_mixture(self, batch_size: int, generator: torch.Generator | None,
                      device: torch.device) -> list[Layout]:
        """Each image's component drawn from the weights, then each component draws its images at once."""
        pick = torch.multinomial(self.weights.to(device), batch_size, replacement=True, generator=generator).tolist()
        layouts: list[Layout | None] = [None] * batch_size
        for j, component in enumerate(self.components):
            mine = [i for i, c in enumerate(pick) if c == j]
            if mine:
                for i, layout in zip(mine, component._draw(len(mine), generator, device), strict=True):
                    layouts[i] = layout
        return cast(list[Layout], layouts)

    def _pick_layouts(self, batch_size: int, generator: torch.Generator | None,
                      device: torch.device) -> list[Layout]:
        n = len(self.layouts)
        if self.order == "sequential":
            picks = [(self.cursor + i) % n for i in range(batch_size)]
            self.cursor = (self.cursor + batch_size) % n
        else:
            picks = torch.randint(n, (batch_size,), generator=generator, device=device).tolist()
        layouts = [(b.to(device), lab.to(device)) for b, lab in (self.layouts[i] for i in picks)]
        if self.class_prior is None:
            return layouts
        sizes = [len(lab) for _, lab in layouts]
        drawn = self._labels((sum(sizes),), generator, device).split(sizes)
        return [(b, lab) for (b, _), lab in zip(layouts, drawn, strict=True)]

    def sample(
        self,
        batch_size: int,
        *,
        image_size: tuple[int, int] = (160, 160),
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> list[Target]:
        """Draw targets for ``batch_size`` images of ``image_size = (height, width)``.

        Args:
            batch_size: number of images.
            image_size: canvas ``(height, width)`` in pixels.
            generator: ``torch.Generator`` on ``device`` (random draws happen there).
            device: device of the returned tensors; default the generator's device, else CPU.

        Returns:
            ``batch_size`` dicts with ``"boxes"`` float32 ``[N, 4]`` xyxy pixels and
            ``"labels"`` int64 ``[N]``.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if (not isinstance(image_size, Sequence) or len(image_size) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                           for v in image_size)):
            raise ValueError(f"image_size must be (height, width) positive ints, "
                             f"got {image_size!r}")
        if device is None:
            device = generator.device if generator is not None else torch.device("cpu")
        device = torch.device(device)
        _check_generator(generator, device)
        h, w = image_size
        scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=device)
        targets = [{"boxes": b * scale, "labels": lab} for b, lab in self._draw(batch_size, generator, device)]
        validate_targets(targets, image_size=(h, w), num_classes=self.num_classes)
        return targets


@dataclass(frozen=True)
class FPSampling:
    """When and how to add teacher false positives to the targets (DIODE FP sampling).

    Args:
        warmup: first iteration (0-based) at which detections are added.
        every: cadence in iterations after ``warmup``.
        conf: detections need a score above this.
        iou: detections need IoU below this with every current target of their image.
        min_area: detections need an area fraction of the canvas above this.
        max_area: detections need an area fraction of the canvas below this.
    """

    warmup: int = 800
    every: int = 100
    conf: float = 0.2
    iou: float = 0.35
    min_area: float = 0.01
    max_area: float = 0.85

    def __post_init__(self) -> None:
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be an int >= 0 (iterations), got {self.warmup!r}")
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"every must be an int >= 1 (iterations), got {self.every!r}")
        _check_thresholds(self.conf, self.iou, self.min_area, self.max_area)

    def due(self, iteration: int) -> bool:
        """Whether to add false positives at ``iteration`` (0-based)."""
        return iteration >= self.warmup and (iteration - self.warmup) % self.every == 0

    def apply(
        self,
        targets: Sequence[Target],
        detections: Sequence[dict[str, Tensor]],
        *,
        image_size: tuple[int, int],
        num_classes: int | None = None,
    ) -> list[Target]:
        """:func:`add_false_positives` with this policy's thresholds."""
        return add_false_positives(targets, detections, image_size=image_size,
                                   num_classes=num_classes, conf=self.conf, iou=self.iou,
                                   min_area=self.min_area, max_area=self.max_area)


def _check_thresholds(conf: float, iou: float, min_area: float, max_area: float) -> None:
    for name, v in (("conf", conf), ("iou", iou)):
        if not (isinstance(v, (int, float)) and 0 <= v <= 1):
            raise ValueError(f"{name} must be in [0, 1], got {v!r}")
    if not (isinstance(min_area, (int, float)) and isinstance(max_area, (int, float))
            and 0 <= min_area < max_area <= 1):
        raise ValueError(f"min_area and max_area must satisfy 0 <= min_area < max_area <= 1, "
                         f"got {min_area!r} and {max_area!r}")


def add_false_positives(
    targets: Sequence[Target],
    detections: Sequence[dict[str, Tensor]],
    *,
    image_size: tuple[int, int],
    num_classes: int | None = None,
    conf: float = 0.2,
    iou: float = 0.35,
    min_area: float = 0.01,
    max_area: float = 0.85,
) -> list[Target]:
    """Append confident teacher detections that match no current target.

    A detection of image ``i`` is appended to ``targets[i]`` when its score is above
    ``conf``, its IoU with every current target of image ``i`` is below ``iou``, and its
    area (after clipping to the canvas) is a fraction of the canvas in
    ``(min_area, max_area)``. Detections left non-finite or degenerate by clipping (a box on
    the canvas edge clips to zero width) are dropped, not raised on. Inputs are not modified.

    Args:
        targets: one dict per image, ``"boxes"`` ``[N, 4]`` xyxy pixels, ``"labels"`` ``[N]``.
        detections: one dict per image, ``"boxes"`` ``[D, 4]`` xyxy pixels, ``"scores"``
            ``[D]``, ``"labels"`` ``[D]`` (e.g. ``adapter.predict``).
        image_size: canvas ``(height, width)`` in pixels.
        num_classes: if given, labels (of targets and kept detections) must lie in ``[0, num_classes)``.
        conf, iou, min_area, max_area: the thresholds above.

    Returns:
        New targets (boxes float32, labels int64) on the targets' devices.
    """
    _check_thresholds(conf, iou, min_area, max_area)
    validate_targets(targets, image_size=image_size, num_classes=num_classes)
    _check_detections(detections)
    if len(detections) != len(targets):
        raise ValueError(f"detections has {len(detections)} entries but targets has "
                         f"{len(targets)}: give one dict per image")
    h, w = image_size
    out = []
    for t, d in zip(targets, detections, strict=True):
        dev = t["boxes"].device
        boxes = t["boxes"].to(torch.float32)
        labels = t["labels"].to(torch.int64)
        det = d["boxes"].detach().to(dev, torch.float32)
        det = torch.stack((det[:, 0].clamp(0, w), det[:, 1].clamp(0, h),
                           det[:, 2].clamp(0, w), det[:, 3].clamp(0, h)), dim=-1)
        # Clipping leaves zero-width boxes (a detection on the canvas edge); the shared filter drops
        # those and non-finite ones. Row numbers travel as its labels to say which rows survive.
        rows = torch.arange(len(det), device=dev)
        kept = detections_as_targets([{"boxes": det, "labels": rows}])[0]
        det, rows = kept["boxes"], kept["labels"]
        det_labels = d["labels"].detach().to(dev, torch.int64)[rows]
        validate_targets([{"boxes": det, "labels": det_labels}], num_classes=num_classes, name="detections")
        area = (det[:, 2] - det[:, 0]) * (det[:, 3] - det[:, 1]) / (h * w)
        keep = (d["scores"].detach().to(dev)[rows] > conf) & (area > min_area) & (area < max_area)
        if len(boxes) and len(det):
            keep &= box_iou(det, boxes).amax(dim=1) < iou
        out.append({"boxes": torch.cat((boxes, det[keep])), "labels": torch.cat((labels, det_labels[keep]))})
    return out


def _check_detections(detections: Sequence[dict[str, Tensor]]) -> None:
    """Raise ``ValueError`` unless each detection is a dict of ``boxes [D, 4]``, ``scores [D]``, ``labels [D]``."""
    if not isinstance(detections, Sequence) or isinstance(detections, (str, bytes)):
        raise TypeError(f"detections must be a list of dicts (boxes, scores, labels), "
                        f"got {type(detections).__name__}")
    for i, d in enumerate(detections):
        if not isinstance(d, dict) or not all(isinstance(d.get(k), Tensor) for k in ("boxes", "scores", "labels")):
            raise ValueError(f"detections[{i}] must be a dict with tensors 'boxes', 'scores' and 'labels'")
        boxes, scores, labels = d["boxes"], d["scores"], d["labels"]
        n = boxes.shape[0] if boxes.ndim == 2 and boxes.shape[1] == 4 else -1
        if n < 0 or scores.shape != (n,) or labels.shape != (n,):
            raise ValueError(f"detections[{i}] must hold 'boxes' [D, 4] xyxy pixels, 'scores' [D] and 'labels' [D], "
                             f"got shapes {tuple(boxes.shape)}, {tuple(scores.shape)}, {tuple(labels.shape)}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"detections[{i}]['labels'] must be integer class ids, got {labels.dtype}")
