"""Decoding of raw YOLOv3 head outputs into boxes, and darknet-style NMS.

Raw outputs are one tensor per YOLO head, ``[B, A, H_i, W_i, 5 + C]`` logits
(per anchor: ``tx, ty, tw, th, obj, cls_0 .. cls_{C-1}``, no sigmoid applied),
with anchors ``[A, 2]`` (width, height) in input pixels and an integer stride
per head (network input size = ``H_i * stride_i``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import batched_nms, clip_boxes_to_image

from diode._boxes import cxcywh_to_xyxy

logger = logging.getLogger(__name__)


def _check_heads(
    outputs: Sequence[Tensor], anchors: Sequence[Tensor], strides: Sequence[int]
) -> tuple[list[Tensor], list[int], int]:
    """Validate the raw-output contract.

    Returns:
        The anchors as float32 ``[A, 2]`` tensors on the outputs' device, the
        strides as ints, and the number of classes ``C``.
    """
    if not isinstance(outputs, Sequence) or len(outputs) == 0:
        raise TypeError(
            "outputs must be a non-empty list of [B, A, H, W, 5 + C] tensors, one per head"
        )
    if len(anchors) != len(outputs) or len(strides) != len(outputs):
        raise ValueError(
            f"outputs, anchors and strides must have one entry per head, got "
            f"{len(outputs)}, {len(anchors)} and {len(strides)}"
        )
    device = outputs[0].device
    batch, channels = outputs[0].shape[0], outputs[0].shape[-1]
    anchors_out: list[Tensor] = []
    strides_out: list[int] = []
    for i, (p, anc, s) in enumerate(zip(outputs, anchors, strides, strict=True)):
        if not isinstance(p, Tensor) or p.ndim != 5 or p.shape[-1] < 6:
            raise ValueError(
                f"outputs[{i}] must be a tensor [B, A, H, W, 5 + C] with C >= 1, "
                f"got shape {tuple(getattr(p, 'shape', ()))}"
            )
        if p.shape[0] != batch or p.shape[-1] != channels:
            raise ValueError(
                f"outputs[{i}] has shape {tuple(p.shape)}; every head must share "
                f"the batch size {batch} and the last dimension {channels}"
            )
        anc = torch.as_tensor(anc, dtype=torch.float32, device=device)
        if anc.shape != (p.shape[1], 2):
            raise ValueError(
                f"anchors[{i}] must be [A, 2] (w, h) pixels with A = {p.shape[1]} "
                f"as in outputs[{i}], got shape {tuple(anc.shape)}"
            )
        if isinstance(s, bool) or int(s) != s or int(s) <= 0:
            raise ValueError(f"strides[{i}] must be a positive integer, got {s!r}")
        anchors_out.append(anc)
        strides_out.append(int(s))
    return anchors_out, strides_out, channels - 5


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def decode(
    outputs: Sequence[Tensor], anchors: Sequence[Tensor], strides: Sequence[int]
) -> tuple[Tensor, Tensor, Tensor]:
    """Decode raw YOLO head outputs (darknet YOLOv3 parametrisation).

    ``cx = (sigmoid(tx) + grid_x) * stride``, ``w = exp(tw) * anchor_w`` (same
    for y/h), objectness ``sigmoid(obj)``, class probabilities
    ``sigmoid(cls)``. Computed in float32 whatever the outputs' dtype (safe
    under autocast); nothing is cached between calls.

    Args:
        outputs: per head ``[B, A, H_i, W_i, 5 + C]`` raw logits.
        anchors: per head ``[A, 2]`` anchor (w, h) in input pixels.
        strides: per head input pixels per grid cell.

    Returns:
        ``boxes [B, N, 4]`` xyxy input pixels, ``objectness [B, N]`` in
        ``[0, 1]`` and ``class_probs [B, N, C]`` in ``[0, 1]``, with
        ``N = sum_i A * H_i * W_i`` ordered by head, anchor, row, column.
    """
    anchors_f, strides_i, _ = _check_heads(outputs, anchors, strides)
    boxes, objectness, class_probs = [], [], []
    for p, anc, stride in zip(outputs, anchors_f, strides_i, strict=True):
        p = p.float()
        b, a, h, w, _ = p.shape
        gy, gx = torch.meshgrid(
            torch.arange(h, device=p.device, dtype=p.dtype),
            torch.arange(w, device=p.device, dtype=p.dtype),
            indexing="ij",
        )
        grid = torch.stack((gx, gy), dim=-1)
        xy = (p[..., :2].sigmoid() + grid) * stride
        wh = p[..., 2:4].exp() * anc.view(1, a, 1, 1, 2)
        boxes.append(cxcywh_to_xyxy(torch.cat((xy, wh), dim=-1)).reshape(b, -1, 4))
        objectness.append(p[..., 4].sigmoid().reshape(b, -1))
        class_probs.append(p[..., 5:].sigmoid().reshape(b, a * h * w, -1))
    return torch.cat(boxes, dim=1), torch.cat(objectness, dim=1), torch.cat(class_probs, dim=1)


def postprocess(
    outputs: Sequence[Tensor],
    anchors: Sequence[Tensor],
    strides: Sequence[int],
    *,
    conf: float = 0.25,
    iou: float = 0.45,
    max_det: int = 300,
    multi_label: bool = True,
    image_size: tuple[int, int] | None = None,
    max_nms: int = 30000,
) -> list[dict[str, Tensor]]:
    """Decode raw outputs and run darknet-style thresholding and per-class NMS.

    A (box, class) pair is a candidate when ``objectness * class_prob > conf``;
    with ``multi_label`` every passing class of a box is a candidate (darknet),
    otherwise only its best class. Boxes are clipped, then suppressed per image
    and class with ``torchvision.ops.batched_nms``.

    Args:
        outputs: per head ``[B, A, H_i, W_i, 5 + C]`` raw logits.
        anchors: per head ``[A, 2]`` anchor (w, h) in input pixels.
        strides: per head input pixels per grid cell.
        conf: score threshold in ``[0, 1]``.
        iou: NMS IoU threshold in ``[0, 1]``.
        max_det: at most this many detections per image.
        multi_label: allow several labels per box.
        image_size: ``(height, width)`` to clip boxes to; defaults to the
            network input size ``(H_0 * stride_0, W_0 * stride_0)``.
        max_nms: at most this many highest-scoring candidates per image enter
            NMS (bounds NMS memory when ``conf`` is tiny).

    Returns:
        One dict per image: ``"boxes"`` float32 ``[K, 4]`` xyxy pixels,
        ``"scores"`` float32 ``[K]`` and ``"labels"`` int64 ``[K]``, sorted by
        score descending (empty ``K = 0`` tensors when nothing passes).
    """
    _check_unit("conf", conf)
    _check_unit("iou", iou)
    if max_det < 1 or max_nms < 1:
        raise ValueError(f"max_det and max_nms must be >= 1, got {max_det} and {max_nms}")
    boxes, objectness, class_probs = decode(outputs, anchors, strides)
    if image_size is None:
        stride = int(strides[0])
        image_size = (outputs[0].shape[2] * stride, outputs[0].shape[3] * stride)
    elif len(image_size) != 2 or min(image_size) <= 0:
        raise ValueError(f"image_size must be (height, width) > 0, got {image_size}")
    boxes = clip_boxes_to_image(boxes, (int(image_size[0]), int(image_size[1])))
    scores_all = objectness.unsqueeze(-1) * class_probs
    results = []
    for box_i, score_i in zip(boxes, scores_all, strict=True):
        if multi_label:
            n, c = (score_i > conf).nonzero(as_tuple=True)
            scores = score_i[n, c]
        else:
            scores, c = score_i.max(dim=1)
            n = (scores > conf).nonzero(as_tuple=True)[0]
            scores, c = scores[n], c[n]
        if scores.numel() > max_nms:
            scores, top = scores.topk(max_nms)
            n, c = n[top], c[top]
        keep = batched_nms(box_i[n], scores, c, iou)[:max_det]
        results.append({"boxes": box_i[n[keep]], "scores": scores[keep], "labels": c[keep]})
    return results
