"""YOLOv3 training loss (GIoU box + objectness BCE + class BCE).

The recipe of the Ultralytics-archive YOLOv3 trainer used by DIODE: each target
is matched, on every head, to every anchor whose width-height IoU with it
exceeds a threshold, in the grid cell that holds its center.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diode._boxes import pack_targets, validate_targets, xyxy_to_cxcywh
from diode.models.yolo.decode import _check_heads

logger = logging.getLogger(__name__)


def giou_cxcywh(boxes1: Tensor, boxes2: Tensor, *, eps: float = 1e-7) -> Tensor:
    """Generalized IoU of paired boxes, elementwise.

    Args:
        boxes1: ``[..., 4]`` boxes as (center x, center y, width, height),
            widths and heights >= 0.
        boxes2: ``[..., 4]`` boxes in the same format, broadcastable to ``boxes1``.
        eps: added to the union and enclosing areas so degenerate boxes give a
            finite value and gradient.

    Returns:
        ``[...]`` GIoU in ``[-1, 1]``.
    """
    half1, half2 = boxes1[..., 2:] / 2, boxes2[..., 2:] / 2
    lo1, hi1 = boxes1[..., :2] - half1, boxes1[..., :2] + half1
    lo2, hi2 = boxes2[..., :2] - half2, boxes2[..., :2] + half2
    inter_wh = (torch.minimum(hi1, hi2) - torch.maximum(lo1, lo2)).clamp(min=0)
    inter = inter_wh[..., 0] * inter_wh[..., 1]
    union = boxes1[..., 2] * boxes1[..., 3] + boxes2[..., 2] * boxes2[..., 3] - inter + eps
    hull_wh = torch.maximum(hi1, hi2) - torch.minimum(lo1, lo2)
    hull = hull_wh[..., 0] * hull_wh[..., 1] + eps
    return inter / union - (hull - union) / hull


def _wh_iou(anchors: Tensor, wh: Tensor) -> Tensor:
    """IoU of ``[A, 2]`` and ``[M, 2]`` (w, h) pairs as if sharing a center: ``[A, M]``."""
    inter = torch.minimum(anchors[:, None], wh[None]).prod(dim=-1)
    return inter / (anchors.prod(dim=-1)[:, None] + wh.prod(dim=-1)[None] - inter)


class YOLOLoss(nn.Module):
    """YOLOv3 detection loss on raw head outputs.

    ``total = box_gain * sum_heads mean(1 - GIoU) + obj_gain * sum_heads
    BCE(obj, tobj) + cls_gain * sum_heads BCE(cls, one_hot)``. Defaults are the
    DIODE / Ultralytics-archive hyperparameters (``giou``, ``obj``, ``cls``,
    ``iou_t``).

    Args:
        box_gain: weight of the GIoU box term.
        obj_gain: weight of the objectness term.
        cls_gain: weight of the class term (only used when ``C > 1``).
        iou_threshold: a target is matched to every anchor whose width-height
            IoU with it exceeds this, in ``[0, 1)``.
        giou_ratio: objectness target of a matched cell is
            ``(1 - giou_ratio) + giou_ratio * GIoU.clamp(0)``, in ``[0, 1]``
            (0 gives target 1, the original recipe).
    """

    def __init__(
        self,
        *,
        box_gain: float = 3.54,
        obj_gain: float = 64.3,
        cls_gain: float = 37.4,
        iou_threshold: float = 0.225,
        giou_ratio: float = 0.0,
    ) -> None:
        super().__init__()
        for name, gain in (("box_gain", box_gain), ("obj_gain", obj_gain), ("cls_gain", cls_gain)):
            if not (math.isfinite(gain) and gain >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {gain}")
        if not 0.0 <= iou_threshold < 1.0:
            raise ValueError(f"iou_threshold must be in [0, 1), got {iou_threshold}")
        if not 0.0 <= giou_ratio <= 1.0:
            raise ValueError(f"giou_ratio must be in [0, 1], got {giou_ratio}")
        self.box_gain = box_gain
        self.obj_gain = obj_gain
        self.cls_gain = cls_gain
        self.iou_threshold = iou_threshold
        self.giou_ratio = giou_ratio

    def forward(
        self,
        outputs: Sequence[Tensor],
        anchors: Sequence[Tensor],
        strides: Sequence[int],
        targets: Sequence[dict[str, Tensor]],
        *,
        validate: bool = False,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Compute the loss.

        Args:
            outputs: per head ``[B, A, H_i, W_i, 5 + C]`` raw logits (any float
                dtype; the loss is computed in float32).
            anchors: per head ``[A, 2]`` anchor (w, h) in input pixels.
            strides: per head input pixels per grid cell.
            targets: ``B`` dicts with ``"boxes"`` ``[N, 4]`` xyxy input pixels
                and ``"labels"`` int64 ``[N]`` in ``[0, C)``; ``N`` may be 0.
                Boxes with zero width or height match no anchor.
            validate: check ``targets`` with :func:`diode._boxes.validate_targets`
                (host syncs). Off by default so a hot loop whose targets were
                validated once at the edge does not sync; malformed labels
                then fail inside indexing.

        Returns:
            The scalar total loss and its detached parts ``{"box", "obj",
            "cls"}`` (already multiplied by their gains). When no target is
            matched the box and class parts are zero.
        """
        anchors_f, strides_i, num_classes = _check_heads(outputs, anchors, strides)
        batch = outputs[0].shape[0]
        if len(targets) != batch:
            raise ValueError(
                f"targets must have one dict per image: got {len(targets)} for a batch of {batch}"
            )
        if validate:
            size = (outputs[0].shape[2] * strides_i[0], outputs[0].shape[3] * strides_i[0])
            validate_targets(targets, image_size=size, num_classes=num_classes)
        device = outputs[0].device
        image_idx, labels, boxes = pack_targets(targets)
        image_idx, labels = image_idx.to(device), labels.to(device)
        cxcywh = xyxy_to_cxcywh(boxes.to(device))

        loss_box = torch.zeros((), device=device)
        loss_obj = torch.zeros((), device=device)
        loss_cls = torch.zeros((), device=device)
        for p, anc, stride in zip(outputs, anchors_f, strides_i, strict=True):
            p = p.float()
            _, num_anchors, h, w, _ = p.shape
            anchor_grid = anc / stride
            t = cxcywh / stride
            a, m = (_wh_iou(anchor_grid, t[:, 2:]) > self.iou_threshold).nonzero(as_tuple=True)
            tobj = torch.zeros_like(p[..., 4])
            if a.numel() > 0:
                b, t = image_idx[m], t[m]
                gx = t[:, 0].floor().long().clamp(0, w - 1)
                gy = t[:, 1].floor().long().clamp(0, h - 1)
                matched = p[b, a, gy, gx]
                pbox = torch.cat(
                    (
                        matched[:, :2].sigmoid(),
                        matched[:, 2:4].exp().clamp(max=1e3) * anchor_grid[a],
                    ),
                    dim=1,
                )
                tbox = torch.cat((t[:, :2] - torch.stack((gx, gy), dim=1), t[:, 2:]), dim=1)
                giou = giou_cxcywh(pbox, tbox)
                loss_box = loss_box + (1.0 - giou).mean()
                obj_target = (1.0 - self.giou_ratio) + self.giou_ratio * giou.detach().clamp(min=0)
                # amax makes the target deterministic when several targets share a cell.
                cell = ((b * num_anchors + a) * h + gy) * w + gx
                tobj = tobj.flatten().scatter_reduce(0, cell, obj_target, "amax").view_as(tobj)
                if num_classes > 1:
                    onehot = F.one_hot(labels[m], num_classes).to(matched.dtype)
                    loss_cls = loss_cls + F.binary_cross_entropy_with_logits(matched[:, 5:], onehot)
            loss_obj = loss_obj + F.binary_cross_entropy_with_logits(p[..., 4], tobj)

        loss_box = loss_box * self.box_gain
        loss_obj = loss_obj * self.obj_gain
        loss_cls = loss_cls * self.cls_gain
        total = loss_box + loss_obj + loss_cls
        return total, {"box": loss_box.detach(), "obj": loss_obj.detach(), "cls": loss_cls.detach()}
