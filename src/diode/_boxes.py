"""Box conventions shared by the whole library.

Inside diode a set of targets is ``list[dict[str, Tensor]]``, one dict per image,
torchvision style: ``"boxes"`` float ``[N, 4]`` xyxy in pixels of that image and
``"labels"`` int64 ``[N]``. These helpers validate and convert at the edges.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Target = dict[str, Tensor]


def validate_targets(
    targets: Sequence[Target],
    *,
    image_size: tuple[int, int] | None = None,
    num_classes: int | None = None,
    name: str = "targets",
) -> None:
    """Raise ``ValueError`` naming the image and box if ``targets`` are malformed.

    Args:
        targets: one dict per image with ``"boxes"`` ``[N, 4]`` xyxy pixels and
            ``"labels"`` int64 ``[N]``.
        image_size: ``(height, width)`` of the canvas; boxes must overlap it
            (they may extend past it and are clipped later).
        num_classes: labels must satisfy ``0 <= label < num_classes``.
        name: the argument name used in error messages.
    """
    if not isinstance(targets, Sequence) or isinstance(targets, (str, bytes)):
        raise TypeError(f"{name} must be a list of dicts with 'boxes' and 'labels', got {type(targets).__name__}")
    for i, t in enumerate(targets):
        if not isinstance(t, dict) or "boxes" not in t or "labels" not in t:
            raise ValueError(f"{name}[{i}] must be a dict with 'boxes' and 'labels'")
        boxes, labels = t["boxes"], t["labels"]
        if not isinstance(boxes, Tensor) or boxes.ndim != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"{name}[{i}]['boxes'] must be a float tensor [N, 4] (xyxy pixels), got shape "
                             f"{tuple(getattr(boxes, 'shape', ()))}")
        if not isinstance(labels, Tensor) or labels.ndim != 1 or labels.shape[0] != boxes.shape[0]:
            raise ValueError(f"{name}[{i}]['labels'] must be an int64 tensor [N] matching boxes [N, 4]")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"{name}[{i}]['labels'] must be integer class ids, got {labels.dtype}")
        if boxes.numel() == 0:
            continue
        b = boxes.detach().to("cpu", torch.float64)
        bad = ~torch.isfinite(b).all(dim=1)
        bad |= (b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])
        if image_size is not None:
            h, w = image_size
            bad |= (b[:, 2] <= 0) | (b[:, 3] <= 0) | (b[:, 0] >= w) | (b[:, 1] >= h)
        if bad.any():
            j = int(bad.nonzero()[0, 0])
            where = f" inside the {image_size[1]}x{image_size[0]} canvas" if image_size else ""
            raise ValueError(f"{name}[{i}] box {j} = {b[j].tolist()} is invalid: boxes must be finite xyxy "
                             f"with x2 > x1 and y2 > y1{where}")
        if num_classes is not None:
            lab = labels.detach().cpu()
            out = (lab < 0) | (lab >= num_classes)
            if out.any():
                j = int(out.nonzero()[0, 0])
                raise ValueError(f"{name}[{i}] box {j} has class id {int(lab[j])}, outside [0, {num_classes})")


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """Convert ``[..., 4]`` xyxy boxes to center-x, center-y, width, height."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=-1)


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """Convert ``[..., 4]`` center-x, center-y, width, height boxes to xyxy."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1)


def pack_targets(targets: Sequence[Target]) -> tuple[Tensor, Tensor, Tensor]:
    """Concatenate per-image targets into ``(batch_index [M], labels [M], boxes [M, 4])``."""
    if len(targets) == 0:
        raise ValueError("targets is empty: give one dict per image")
    device = targets[0]["boxes"].device
    idx = torch.cat([torch.full((len(t["labels"]),), i, dtype=torch.long, device=device)
                     for i, t in enumerate(targets)])
    labels = torch.cat([t["labels"].to(device=device, dtype=torch.long) for t in targets])
    boxes = torch.cat([t["boxes"].to(device=device, dtype=torch.float32).reshape(-1, 4) for t in targets])
    return idx, labels, boxes


def unpack_targets(batch_index: Tensor, labels: Tensor, boxes: Tensor, batch_size: int) -> list[Target]:
    """Inverse of :func:`pack_targets`: split packed rows back into one dict per image."""
    order = torch.argsort(batch_index, stable=True)
    counts = torch.bincount(batch_index, minlength=batch_size).tolist()
    b_split = boxes[order].split(counts)
    l_split = labels[order].split(counts)
    return [{"boxes": b, "labels": lab} for b, lab in zip(b_split, l_split, strict=True)]


def detections_as_targets(detections: Sequence[dict[str, Tensor]]) -> list[Target]:
    """Detections (boxes, scores, labels) as targets, dropping non-finite or degenerate boxes.

    Used where a teacher's detections become ground truth (pseudo labels, agreement);
    clipping can leave zero-width boxes, which no target may have.
    """
    targets = []
    for d in detections:
        boxes = d["boxes"].float()
        keep = torch.isfinite(boxes).all(dim=1) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        targets.append({"boxes": boxes[keep], "labels": d["labels"][keep].long()})
    return targets
