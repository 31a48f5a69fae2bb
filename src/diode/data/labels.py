"""Label files: YOLO txt (one file per image) and COCO json (one file per set).

YOLO rows are ``class cx cy w h`` with the box normalized by the image width
and height. COCO ``bbox`` is ``[x, y, w, h]`` in pixels; diode writes category
ids as ``label + 1`` (COCO ids conventionally start at 1) and, when reading,
maps the categories sorted by id to contiguous labels ``0..C-1``, which also
turns the 80 non-contiguous ids of the official COCO files into the usual
80-class order.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diode._boxes import Target, cxcywh_to_xyxy, validate_targets, xyxy_to_cxcywh
from diode.data.io import PathLike, atomic_write_json, atomic_write_text


def _empty_target() -> Target:
    return {
        "boxes": torch.zeros((0, 4), dtype=torch.float32),
        "labels": torch.zeros((0,), dtype=torch.int64),
    }


def write_yolo_labels(
    path: PathLike, boxes: Tensor, labels: Tensor, image_size: tuple[int, int]
) -> None:
    """Write one image's boxes as a YOLO txt label file, atomically.

    Args:
        path: destination ``.txt`` file.
        boxes: float ``[N, 4]`` xyxy pixels; clipped to the canvas before writing.
        labels: int ``[N]`` class ids.
        image_size: ``(height, width)`` of the image in pixels.

    Rows are ``class cx cy w h`` normalized to ``[0, 1]`` with 6 decimals; no boxes
    gives an empty file (a background image).
    """
    h, w = image_size
    validate_targets([{"boxes": boxes, "labels": labels}], image_size=(h, w), name="boxes/labels")
    b = boxes.detach().to("cpu", torch.float64)
    b = torch.stack(
        (b[:, 0].clamp(0, w), b[:, 1].clamp(0, h), b[:, 2].clamp(0, w), b[:, 3].clamp(0, h)), dim=-1
    )
    norm = xyxy_to_cxcywh(b) / torch.tensor([w, h, w, h], dtype=torch.float64)
    rows = [
        f"{int(c)} {cx:.6f} {cy:.6f} {bw:.6f} {bh:.6f}\n"
        for c, (cx, cy, bw, bh) in zip(labels.tolist(), norm.tolist(), strict=True)
    ]
    atomic_write_text(path, "".join(rows))


def read_yolo_labels(path: PathLike, image_size: tuple[int, int]) -> Target:
    """Read a YOLO txt label file into a target in pixels.

    Args:
        path: the ``.txt`` file; an empty file means no objects.
        image_size: ``(height, width)`` of the image the labels belong to.

    Returns:
        ``{"boxes": float32 [N, 4] xyxy pixels, "labels": int64 [N]}``.

    Raises:
        ValueError: a malformed row; the message names the file and line.
    """
    path = Path(path)
    h, w = image_size
    classes: list[int] = []
    rows: list[list[float]] = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{lineno}"
        if len(fields) != 5:
            raise ValueError(
                f"{where}: expected 5 fields 'class cx cy w h', got {len(fields)}: {line!r}"
            )
        try:
            values = [float(v) for v in fields]
        except ValueError:
            raise ValueError(f"{where}: fields must be numbers, got {line!r}") from None
        c = values[0]
        if not (math.isfinite(c) and c >= 0 and c == int(c)):
            raise ValueError(f"{where}: class id must be a non-negative integer, got {fields[0]!r}")
        if not all(math.isfinite(v) for v in values[1:]) or values[3] <= 0 or values[4] <= 0:
            raise ValueError(f"{where}: box must be finite with w > 0 and h > 0, got {line!r}")
        classes.append(int(c))
        rows.append(values[1:])
    if not rows:
        return _empty_target()
    norm = torch.tensor(rows, dtype=torch.float64)
    boxes = cxcywh_to_xyxy(norm * torch.tensor([w, h, w, h], dtype=torch.float64))
    return {"boxes": boxes.float(), "labels": torch.tensor(classes, dtype=torch.int64)}


def coco_dict(
    images: Sequence[tuple[str, int, int]], targets: Sequence[Target], class_names: Sequence[str]
) -> dict[str, Any]:
    """Build a COCO detection dict (``images``, ``annotations``, ``categories``).

    Args:
        images: ``(file_name, height, width)`` per image; image ids are ``1..len(images)``.
        targets: one dict per image, ``"boxes"`` ``[N, 4]`` xyxy pixels, ``"labels"`` ``[N]``.
        class_names: name of each class; category ids are ``label + 1``.

    Returns:
        A JSON-serializable dict; ``bbox`` is ``[x, y, w, h]`` in pixels, annotation
        ids start at 1, ``iscrowd`` is 0 and ``area`` is ``w * h``.
    """
    if len(images) != len(targets):
        raise ValueError(
            f"images has {len(images)} entries but targets has {len(targets)}; "
            "give one target per image"
        )
    validate_targets(targets, num_classes=len(class_names))
    coco_images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id, ((file_name, h, w), t) in enumerate(zip(images, targets, strict=True), start=1):
        coco_images.append(
            {"id": image_id, "file_name": str(file_name), "height": int(h), "width": int(w)}
        )
        b = t["boxes"].detach().to("cpu", torch.float64)
        for (x1, y1, x2, y2), label in zip(b.tolist(), t["labels"].tolist(), strict=True):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(label) + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i + 1, "name": str(name)} for i, name in enumerate(class_names)]
    return {"images": coco_images, "annotations": annotations, "categories": categories}


def write_coco(
    path: PathLike,
    images: Sequence[tuple[str, int, int]],
    targets: Sequence[Target],
    class_names: Sequence[str],
) -> None:
    """Write :func:`coco_dict` of the arguments to ``path`` as JSON, atomically."""
    atomic_write_json(path, coco_dict(images, targets, class_names), indent=None)


def read_coco(path: PathLike) -> tuple[list[str], list[Target], list[str]]:
    """Read a COCO detection json.

    Categories sorted by id become labels ``0..C-1``; crowd annotations
    (``iscrowd: 1``) are skipped.

    Returns:
        ``(file_names, targets, class_names)`` in the file's image order; targets
        hold ``"boxes"`` float32 ``[N, 4]`` xyxy pixels and ``"labels"`` int64 ``[N]``.

    Raises:
        ValueError: the file is not valid COCO detection json; the message names it.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        images = data["images"]
        categories = sorted(data["categories"], key=lambda c: c["id"])
        label_of = {c["id"]: i for i, c in enumerate(categories)}
        class_names = [str(c["name"]) for c in categories]
        file_names = [str(im["file_name"]) for im in images]
        index_of = {im["id"]: i for i, im in enumerate(images)}
        boxes: list[list[list[float]]] = [[] for _ in images]
        labels: list[list[int]] = [[] for _ in images]
        for ann in data.get("annotations", []):
            if ann.get("iscrowd", 0):
                continue
            x, y, bw, bh = (float(v) for v in ann["bbox"])
            if not (bw > 0 and bh > 0):
                raise ValueError(
                    f"annotation {ann.get('id')} has bbox {ann['bbox']} with w or h <= 0"
                )
            i = index_of[ann["image_id"]]
            boxes[i].append([x, y, x + bw, y + bh])
            labels[i].append(label_of[ann["category_id"]])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(
            f"{path} is not a valid COCO detection file: {type(e).__name__}: {e}"
        ) from e
    targets = [
        {
            "boxes": torch.tensor(b, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(lab, dtype=torch.int64),
        }
        for b, lab in zip(boxes, labels, strict=True)
    ]
    return file_names, targets, class_names
