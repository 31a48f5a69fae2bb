"""Decoding raw outputs of the anchor-free YOLO heads into boxes, and inference post-processing.

Inference follows the family: YOLOv5u / YOLOv8 / YOLO11 keep each anchor point's
best class above ``conf`` and run class-wise NMS; YOLOv10 takes the top-k
(anchor point, class) pairs of its one-to-one branch and needs no NMS.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import batched_nms, clip_boxes_to_image

from diode.models.yolov8.boxes import dfl_expectation, dist2bbox, make_anchors

#: Candidates kept before NMS, as the family does (bounds the NMS cost on noise).
MAX_NMS = 30000

Raw = list[Tensor] | dict[str, list[Tensor]]


def _check_levels(levels: Sequence[Tensor], strides: Sequence[float], reg_max: int) -> int:
    if not isinstance(levels, Sequence) or not levels or not all(isinstance(t, Tensor) for t in levels):
        raise TypeError("raw outputs must be a non-empty list of [B, 4 * reg_max + nc, H, W] tensors")
    if len(levels) != len(strides):
        raise ValueError(f"got {len(levels)} output levels but {len(strides)} strides")
    channels = {tuple(t.shape[:2]) for t in levels}
    if any(t.ndim != 4 for t in levels) or len(channels) != 1:
        raise ValueError(f"every level must be [B, C, H, W] with the same B and C, got "
                         f"{[tuple(t.shape) for t in levels]}")
    nc = levels[0].shape[1] - 4 * reg_max
    if nc < 1:
        raise ValueError(f"levels have {levels[0].shape[1]} channels, fewer than 4 * reg_max + 1 = {4 * reg_max + 1}")
    return nc


def decode(levels: Sequence[Tensor], strides: Sequence[float], reg_max: int) -> tuple[Tensor, Tensor]:
    """Boxes and class probabilities of every anchor point (differentiable).

    Args:
        levels: per level ``[B, 4 * reg_max + nc, H_i, W_i]`` raw logits.
        strides: per level, input pixels per cell.
        reg_max: distribution bins per box side.

    Returns:
        ``(boxes [B, A, 4], scores [B, A, nc])``: xyxy boxes in input pixels and
        sigmoid class probabilities in ``[0, 1]``, ``A = sum(H_i * W_i)``, levels in
        order, row-major inside a level.
    """
    nc = _check_levels(levels, strides, reg_max)
    flat = torch.cat([t.flatten(2) for t in levels], 2)
    box_logits, cls_logits = flat.split((4 * reg_max, nc), 1)
    points, stride = make_anchors(levels, strides)
    boxes = dist2bbox(dfl_expectation(box_logits, reg_max), points) * stride
    return boxes, cls_logits.transpose(1, 2).sigmoid()


def postprocess(raw: Raw, strides: Sequence[float], reg_max: int, *, conf: float = 0.25, iou: float = 0.45,
                image_size: tuple[int, int] | None = None, max_det: int = 300) -> list[dict[str, Tensor]]:
    """Detections per image from raw head outputs.

    Args:
        raw: a ``Detect`` list (NMS) or a ``v10Detect`` dict (top-k of ``"one2one"``).
        strides: per level, input pixels per cell.
        reg_max: distribution bins per box side.
        conf: keep scores strictly above this.
        iou: NMS IoU threshold (ignored for the one-to-one head).
        image_size: ``(H, W)`` to clip boxes to (after selection, as the family does).
        max_det: most detections per image.

    Returns:
        One dict per image: ``boxes`` ``[K, 4]`` xyxy input pixels, ``scores``
        ``[K]`` in ``(conf, 1]`` (descending), ``labels`` int64 ``[K]``.
    """
    if not 0 <= conf < 1 or not 0 < iou <= 1:
        raise ValueError(f"conf must be in [0, 1) and iou in (0, 1], got conf={conf}, iou={iou}")
    if max_det < 1:
        raise ValueError(f"max_det must be >= 1, got {max_det}")
    if isinstance(raw, dict):
        if "one2one" not in raw:
            raise ValueError(f"a YOLOv10 output dict needs a 'one2one' entry, got keys {sorted(raw)}")
        boxes, scores = decode(raw["one2one"], strides, reg_max)
        results = [_topk(b, s, conf, max_det) for b, s in zip(boxes, scores, strict=True)]
    else:
        boxes, scores = decode(raw, strides, reg_max)
        results = [_nms(b, s, conf, iou, max_det) for b, s in zip(boxes, scores, strict=True)]
    if image_size is not None:
        for r in results:
            r["boxes"] = clip_boxes_to_image(r["boxes"], image_size)
    return results


def _topk(boxes: Tensor, scores: Tensor, conf: float, max_det: int) -> dict[str, Tensor]:
    """The ``max_det`` best (anchor point, class) pairs; an anchor point may give several classes.

    This equals the family's two-step selection (best anchor points by their top
    class score, then best pairs among them): a pair outside the best anchor
    points is beaten by ``max_det`` pairs already.
    """
    nc = scores.shape[1]
    top, index = scores.flatten().topk(min(max_det, scores.numel()))
    keep = top > conf
    top, index = top[keep], index[keep]
    return {"boxes": boxes[index // nc], "scores": top, "labels": index % nc}


def _nms(boxes: Tensor, scores: Tensor, conf: float, iou: float, max_det: int) -> dict[str, Tensor]:
    best, labels = scores.max(1)
    keep = best > conf
    boxes, best, labels = boxes[keep], best[keep], labels[keep]
    order = best.argsort(descending=True)[:MAX_NMS]
    boxes, best, labels = boxes[order], best[order], labels[order]
    kept = batched_nms(boxes.float(), best.float(), labels, iou)[:max_det]
    return {"boxes": boxes[kept], "scores": best[kept], "labels": labels[kept]}
