"""Box and category layouts to synthesize images for, and false-positive sampling.

A :class:`BBoxSampler` holds a layout rule in normalized coordinates and draws targets
for any canvas at sample time: ``list[dict]`` with ``"boxes"`` float32 ``[N, 4]`` xyxy
pixels and ``"labels"`` int64 ``[N]``. :func:`add_false_positives` and
:class:`FPSampling` implement DIODE's false-positive sampling: confident teacher
detections away from the current targets become extra targets.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor
from torchvision.ops import box_iou

from diode._boxes import Target, cxcywh_to_xyxy, validate_targets
from diode.inversion.augment import _check_generator

__all__ = ["BBoxSampler", "FPSampling", "add_false_positives"]

logger = logging.getLogger(__name__)

Layout = tuple[Tensor, Tensor]  # normalized xyxy boxes [N, 4] float32, labels [N] int64 (CPU)


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


def _parse_yolo_labels(file: Path, num_classes: int) -> Layout:
    """Read a YOLO label file (rows ``class cx cy w h``, normalized) into a layout."""
    rows: list[list[float]] = []
    labels: list[int] = []
    lines: list[int] = []
    for lineno, line in enumerate(file.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{file}, line {lineno}"
        if len(fields) != 5:
            raise ValueError(f"{where}: expected 5 fields 'class cx cy w h', got {len(fields)}")
        try:
            cls_f = float(fields[0])
            cx, cy, w, h = (float(v) for v in fields[1:])
        except ValueError as err:
            raise ValueError(f"{where}: not a number ({err})") from err
        if not cls_f.is_integer():
            raise ValueError(f"{where}: class id {fields[0]!r} is not an integer")
        if not 0 <= cls_f < num_classes:
            raise ValueError(f"{where}: class id {int(cls_f)} is outside [0, {num_classes})")
        if not all(math.isfinite(v) for v in (cx, cy, w, h)):
            raise ValueError(f"{where}: box values must be finite, got {fields[1:]}")
        if w <= 0 or h <= 0:
            raise ValueError(f"{where}: box width and height must be positive, got w={w}, h={h}")
        rows.append([cx, cy, w, h])
        labels.append(int(cls_f))
        lines.append(lineno)
    boxes = cxcywh_to_xyxy(torch.tensor(rows, dtype=torch.float64).reshape(-1, 4))
    outside = (boxes[:, 2] <= 0) | (boxes[:, 3] <= 0) | (boxes[:, 0] >= 1) | (boxes[:, 1] >= 1)
    if outside.any():
        j = int(outside.nonzero()[0, 0])
        cx, cy, w, h = rows[j]
        raise ValueError(f"{file}, line {lines[j]}: box (cx={cx}, cy={cy}, w={w}, h={h}) lies "
                         "outside the normalized image [0, 1]")
    return boxes.clamp(0, 1).float(), torch.tensor(labels, dtype=torch.int64)


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


class BBoxSampler:
    """Draws synthesis targets (boxes and classes) for a batch.

    Build one with :meth:`onebox`, :meth:`tiles` or :meth:`from_labels`, then call
    :meth:`sample`. Layouts are normalized, so any canvas size works.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        kind: Literal["onebox", "tiles", "labels"],
        class_prior: Sequence[float] | Tensor | None = None,
        min_size: float = 0.2,
        max_size: float = 0.8,
        k: int = 1,
        layouts: Sequence[Layout] = (),
        order: Literal["random", "sequential"] = "random",
    ) -> None:
        """Prefer the :meth:`onebox`, :meth:`tiles` and :meth:`from_labels` builders."""
        self.num_classes = _check_num_classes(num_classes)
        if kind not in ("onebox", "tiles", "labels"):
            raise ValueError(f"kind must be 'onebox', 'tiles' or 'labels', got {kind!r}")
        if order not in ("random", "sequential"):
            raise ValueError(f"order must be 'random' or 'sequential', got {order!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1 (boxes per image), got {k!r}")
        if kind == "labels" and not layouts:
            raise ValueError("layouts is empty: give at least one label layout")
        self.kind = kind
        self.class_prior = _check_prior(class_prior, num_classes)
        self.min_size, self.max_size = _check_size_range(min_size, max_size)
        self.k = k
        self.layouts = list(layouts)
        self.order = order
        self.cursor = 0

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
    def from_labels(
        cls,
        path: str | Path,
        *,
        num_classes: int,
        order: Literal["random", "sequential"] = "random",
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

        Raises:
            ValueError: no label files, or a malformed row (the message names file and line).
        """
        num_classes = _check_num_classes(num_classes)
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
        return cls(num_classes=num_classes, kind="labels", layouts=layouts, order=order)

    def __len__(self) -> int:
        """Number of stored layouts (``from_labels``); 0 for generated layouts."""
        return len(self.layouts)

    def __repr__(self) -> str:
        extra = {"onebox": f"min_size={self.min_size}, max_size={self.max_size}",
                 "tiles": f"k={self.k}, min_size={self.min_size}, max_size={self.max_size}",
                 "labels": f"layouts={len(self.layouts)}, order={self.order!r}"}[self.kind]
        return f"BBoxSampler.{self.kind}(num_classes={self.num_classes}, {extra})"

    def _labels(self, shape: tuple[int, ...], generator: torch.Generator | None,
                device: torch.device) -> Tensor:
        if self.class_prior is None:
            return torch.randint(self.num_classes, shape, generator=generator, device=device)
        n = math.prod(shape)
        draws = torch.multinomial(self.class_prior.to(device), n, replacement=True,
                                  generator=generator)
        return draws.reshape(shape)

    def _draw_grid(self, batch_size: int, generator: torch.Generator | None,
                   device: torch.device) -> tuple[Tensor, Tensor]:
        """Normalized boxes ``[B, k, 4]`` and labels ``[B, k]`` for onebox/tiles."""
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
        return boxes, self._labels((batch_size, k), generator, device)

    def _pick_layouts(self, batch_size: int, generator: torch.Generator | None,
                      device: torch.device) -> list[Layout]:
        n = len(self.layouts)
        if self.order == "sequential":
            picks = [(self.cursor + i) % n for i in range(batch_size)]
            self.cursor = (self.cursor + batch_size) % n
        else:
            picks = torch.randint(n, (batch_size,), generator=generator, device=device).tolist()
        return [self.layouts[i] for i in picks]

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
        if self.kind == "labels":
            targets = [{"boxes": b.to(device) * scale, "labels": lab.to(device)}
                       for b, lab in self._pick_layouts(batch_size, generator, device)]
        else:
            boxes, labels = self._draw_grid(batch_size, generator, device)
            targets = [{"boxes": b * scale, "labels": lab}
                       for b, lab in zip(boxes.unbind(0), labels.unbind(0), strict=True)]
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
    ``(min_area, max_area)``. Inputs are not modified.

    Args:
        targets: one dict per image, ``"boxes"`` ``[N, 4]`` xyxy pixels, ``"labels"`` ``[N]``.
        detections: one dict per image, ``"boxes"`` ``[D, 4]`` xyxy pixels, ``"scores"``
            ``[D]``, ``"labels"`` ``[D]`` (e.g. ``adapter.predict``).
        image_size: canvas ``(height, width)`` in pixels.
        num_classes: if given, labels must lie in ``[0, num_classes)``.
        conf, iou, min_area, max_area: the thresholds above.

    Returns:
        New targets (boxes float32, labels int64) on the targets' devices.
    """
    _check_thresholds(conf, iou, min_area, max_area)
    validate_targets(targets, image_size=image_size, num_classes=num_classes)
    validate_targets(detections, image_size=image_size, num_classes=num_classes,
                     name="detections")
    if len(detections) != len(targets):
        raise ValueError(f"detections has {len(detections)} entries but targets has "
                         f"{len(targets)}: give one dict per image")
    h, w = image_size
    out = []
    for i, (t, d) in enumerate(zip(targets, detections, strict=True)):
        scores = d.get("scores")
        if not isinstance(scores, Tensor) or scores.shape != d["labels"].shape:
            raise ValueError(f"detections[{i}]['scores'] must be a float tensor [D] matching "
                             "its boxes")
        dev = t["boxes"].device
        boxes = t["boxes"].to(torch.float32)
        labels = t["labels"].to(torch.int64)
        det = d["boxes"].detach().to(dev, torch.float32)
        det = torch.stack((det[:, 0].clamp(0, w), det[:, 1].clamp(0, h),
                           det[:, 2].clamp(0, w), det[:, 3].clamp(0, h)), dim=-1)
        area = (det[:, 2] - det[:, 0]) * (det[:, 3] - det[:, 1]) / (h * w)
        keep = (scores.detach().to(dev) > conf) & (area > min_area) & (area < max_area)
        if len(boxes) and len(det):
            keep &= box_iou(det, boxes).amax(dim=1) < iou
        out.append({"boxes": torch.cat((boxes, det[keep])),
                    "labels": torch.cat((labels, d["labels"].to(dev, torch.int64)[keep]))})
    return out
