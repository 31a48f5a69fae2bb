"""Training loss of the anchor-free YOLO family (YOLOv5u, YOLOv8, YOLOv10, YOLO11).

Written from the published descriptions:

- task-aligned assignment (TOOD, Feng et al. 2021): alignment metric
  ``t = s ** alpha * u ** beta`` (``s`` the predicted score of the target's class,
  ``u`` the CIoU of the predicted box with the target); candidates are the anchor
  points inside the target box, the ``topk`` best by ``t`` become positives, an
  anchor claimed by several targets keeps the one it overlaps most, and the soft
  class target of a positive is ``t`` rescaled so that its maximum over a
  target's positives equals that target's best overlap;
- distribution focal loss (GFL, Li et al. 2020): cross-entropy to the two bins
  around each target side distance, weighted by their nearness;
- complete IoU (CIoU, Zheng et al. 2020) for the box term.

Loss scale: the parts are sums over the batch divided by the sum of the soft
class targets (clamped to at least 1), so the loss is a mean over the batch's
targets and does not grow with the batch size. The family's trainer multiplies
it by the batch size; diode does not, so loss weights (e.g. ``w_task`` of
synthesis) keep their meaning at any batch size. The forward has no host
synchronisation: targets are padded to ``[B, max N]`` with a mask, and every
shape depends only on shapes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diode._boxes import validate_targets
from diode.models.yolov8.boxes import bbox2dist, dfl_expectation, dist2bbox, make_anchors


def complete_iou(boxes1: Tensor, boxes2: Tensor, *, eps: float = 1e-7) -> Tensor:
    """Complete IoU of paired boxes, elementwise with broadcasting.

    ``CIoU = IoU - rho^2 / c^2 - a * v`` with ``rho`` the distance between the
    centres, ``c`` the diagonal of the enclosing box, ``v = 4 / pi^2 *
    (atan(w2 / h2) - atan(w1 / h1))^2`` and ``a = v / (1 - IoU + v)``. The
    gradient is the exact one of this function (``a`` is not detached).

    Args:
        boxes1: ``[..., 4]`` xyxy boxes (any unit), ``x2 >= x1``, ``y2 >= y1``.
        boxes2: ``[..., 4]`` xyxy boxes in the same unit, broadcastable to ``boxes1``.
        eps: added to denominators so degenerate boxes give finite values.

    Returns:
        ``[...]`` CIoU in ``(-1.5, 1]`` (1 for identical boxes).
    """
    x1a, y1a, x2a, y2a = boxes1.unbind(-1)
    x1b, y1b, x2b, y2b = boxes2.unbind(-1)
    wa, ha = x2a - x1a, y2a - y1a
    wb, hb = x2b - x1b, y2b - y1b
    inter = (torch.minimum(x2a, x2b) - torch.maximum(x1a, x1b)).clamp(min=0) * (
        torch.minimum(y2a, y2b) - torch.maximum(y1a, y1b)
    ).clamp(min=0)
    iou = inter / (wa * ha + wb * hb - inter + eps)
    hull_w = torch.maximum(x2a, x2b) - torch.minimum(x1a, x1b)
    hull_h = torch.maximum(y2a, y2b) - torch.minimum(y1a, y1b)
    rho2 = ((x1b + x2b - x1a - x2a) ** 2 + (y1b + y2b - y1a - y2a) ** 2) / 4
    c2 = hull_w**2 + hull_h**2 + eps
    v = (4 / math.pi**2) * (torch.atan(wb / (hb + eps)) - torch.atan(wa / (ha + eps))) ** 2
    alpha = v / (v - iou + (1 + eps))
    return iou - rho2 / c2 - alpha * v


class Assignment(NamedTuple):
    """Targets of every anchor point, from :func:`task_aligned_assign` (all detached).

    Attributes:
        labels: ``[B, A]`` int64 class of the assigned target (meaningless where
            ``foreground`` is false).
        boxes: ``[B, A, 4]`` xyxy pixels of the assigned target (likewise).
        scores: ``[B, A, C]`` soft class targets in ``[0, 1]``, zero off the
            foreground and off the assigned class.
        foreground: ``[B, A]`` bool, the positives.
    """

    labels: Tensor
    boxes: Tensor
    scores: Tensor
    foreground: Tensor


@torch.no_grad()
def task_aligned_assign(
    pred_scores: Tensor,
    pred_boxes: Tensor,
    points: Tensor,
    gt_labels: Tensor,
    gt_boxes: Tensor,
    gt_mask: Tensor,
    *,
    topk: int = 10,
    alpha: float = 0.5,
    beta: float = 6.0,
    eps: float = 1e-9,
) -> Assignment:
    """Task-aligned assignment of padded targets to anchor points (TOOD).

    Args:
        pred_scores: ``[B, A, C]`` predicted class probabilities in ``[0, 1]``.
        pred_boxes: ``[B, A, 4]`` predicted xyxy boxes, pixels.
        points: ``[A, 2]`` anchor points ``(x, y)``, pixels.
        gt_labels: ``[B, M]`` int64 classes in ``[0, C)`` (any valid class where padded).
        gt_boxes: ``[B, M, 4]`` xyxy pixels (any finite box where padded).
        gt_mask: ``[B, M]`` bool, true for real targets.
        topk: positives per target at most.
        alpha: exponent of the score in the alignment metric.
        beta: exponent of the overlap in the alignment metric.
        eps: an anchor point is inside a box when its distance to every side exceeds this.

    Returns:
        The :class:`Assignment`. A target whose box holds no anchor point gets no positive.
    """
    num_classes = pred_scores.shape[-1]
    num_anchors = points.shape[0]
    # [B, M, A]: anchor points strictly inside each real target.
    lt = points[None, None] - gt_boxes[..., None, :2]
    rb = gt_boxes[..., None, 2:] - points[None, None]
    inside = (torch.cat((lt, rb), -1).amin(-1) > eps) & gt_mask[..., None]
    overlaps = complete_iou(gt_boxes[:, :, None], pred_boxes[:, None]).clamp(min=0) * inside
    index = gt_labels[..., None].expand(-1, -1, num_anchors)
    scores = pred_scores.transpose(1, 2).gather(1, index)
    metric = scores.pow(alpha) * overlaps.pow(beta)

    top = metric.topk(min(topk, num_anchors), dim=-1).indices
    positive = torch.zeros_like(inside).scatter_(-1, top, True) & inside
    # An anchor claimed by several targets keeps the one it overlaps most.
    claims = positive.sum(1, keepdim=True)
    best = (overlaps * positive).argmax(1, keepdim=True)
    best_only = torch.zeros_like(positive).scatter_(1, best, True)
    positive = torch.where(claims > 1, best_only & positive, positive)

    foreground = positive.any(1)
    gt_index = positive.to(torch.uint8).argmax(1)
    labels = gt_labels.gather(1, gt_index)
    boxes = gt_boxes.gather(1, gt_index[..., None].expand(-1, -1, 4))

    metric = metric * positive
    overlaps = overlaps * positive
    # Divide by the per-target maximum itself (not max + eps): metrics of poorly aligned
    # predictions are tiny (u ** 6), and an additive eps would swamp them.
    peak = metric.amax(-1, keepdim=True).clamp(min=torch.finfo(metric.dtype).tiny)
    norm = metric / peak * overlaps.amax(-1, keepdim=True)
    strength = norm.amax(1)
    classes = torch.arange(num_classes, device=labels.device)
    target_scores = (labels[..., None] == classes).to(pred_scores.dtype) * strength[..., None]
    return Assignment(labels, boxes, target_scores, foreground)


def _pad_targets(targets: Sequence[dict[str, Tensor]], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """``(labels [B, M], boxes [B, M, 4], mask [B, M])`` with ``M = max(1, max N)``; padding is zeros.

    Only device kernels: no host synchronisation when the targets are on ``device``.
    """
    size = max([len(t["labels"]) for t in targets] + [1])
    labels, boxes, mask = [], [], []
    for t in targets:
        n = len(t["labels"])
        pad = size - n
        labels.append(torch.cat((t["labels"].to(device=device, dtype=torch.long),
                                 torch.zeros(pad, dtype=torch.long, device=device))))
        boxes.append(torch.cat((t["boxes"].to(device=device, dtype=torch.float32).reshape(n, 4),
                                torch.zeros(pad, 4, device=device))))
        mask.append(torch.cat((torch.ones(n, dtype=torch.bool, device=device),
                               torch.zeros(pad, dtype=torch.bool, device=device))))
    return torch.stack(labels), torch.stack(boxes), torch.stack(mask)


class DetectionLoss(nn.Module):
    """Detection loss of a ``Detect`` head: task-aligned assignment, BCE classes, CIoU + DFL boxes.

    ``total = box * sum_pos w (1 - CIoU) / S + cls * sum BCE(logits, soft targets) / S
    + dfl * sum_pos w DFL / S``, with ``w`` an anchor's soft target score and ``S``
    the sum of all soft targets (at least 1). Without any target the loss is the
    class BCE against zeros (summed) and the box and DFL parts are zero.

    Args:
        num_classes: classes of the head.
        reg_max: distribution bins per box side (16 in the family; 1: plain
            distances, no DFL term).
        strides: pixels per cell of each level.
        box: gain of the CIoU term.
        cls: gain of the class term.
        dfl: gain of the DFL term.
        topk: positives per target at most.
        alpha: score exponent of the alignment metric.
        beta: overlap exponent of the alignment metric.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        reg_max: int = 16,
        strides: Sequence[float] = (8, 16, 32),
        box: float = 7.5,
        cls: float = 0.5,
        dfl: float = 1.5,
        topk: int = 10,
        alpha: float = 0.5,
        beta: float = 6.0,
    ) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("reg_max", reg_max), ("topk", topk)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        strides = tuple(float(s) for s in strides)
        if not strides or not all(math.isfinite(s) and s > 0 for s in strides):
            raise ValueError(f"strides must be one positive number per level, got {strides}")
        for name, gain in (("box", box), ("cls", cls), ("dfl", dfl), ("alpha", alpha), ("beta", beta)):
            if not (math.isfinite(gain) and gain >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {gain}")
        self.num_classes = num_classes
        self.reg_max = reg_max
        self.strides = strides
        self.box = box
        self.cls = cls
        self.dfl = dfl
        self.topk = topk
        self.alpha = alpha
        self.beta = beta

    def forward(
        self,
        feats: Sequence[Tensor],
        targets: Sequence[dict[str, Tensor]],
        *,
        image_size: tuple[int, int],
        validate: bool = False,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Compute the loss.

        Args:
            feats: per level ``[B, 4 * reg_max + num_classes, H_i, W_i]`` raw logits
                (box distribution logits side-major, then class logits), any float
                dtype (computed in float32). Level ``i`` has stride ``strides[i]``.
            targets: ``B`` dicts, ``"boxes"`` float ``[N, 4]`` xyxy pixels of the
                input whose top-left corner is the feats' origin, ``"labels"`` int64
                ``[N]`` in ``[0, num_classes)``; ``N`` may be 0. Keep them on the
                feats' device (no transfer). Boxes that hold no anchor point
                (e.g. zero width) are ignored.
            image_size: ``(H, W)`` of that input, pixels; every level's grid must
                cover it (the feats may be for a bottom/right padded input).
            validate: check ``targets`` with :func:`diode._boxes.validate_targets`
                (host syncs; off so a hot loop with targets validated at the edge
                does not sync). Out-of-range labels otherwise fail inside a gather.

        Returns:
            The scalar loss and its detached parts ``{"box", "cls", "dfl"}``, each
            already multiplied by its gain.
        """
        self._check(feats, targets, image_size)
        if validate:
            validate_targets(targets, image_size=image_size, num_classes=self.num_classes)
        device = feats[0].device
        x = torch.cat([f.flatten(2) for f in feats], 2).float()
        box_logits, cls_logits = x.split((4 * self.reg_max, self.num_classes), 1)
        cls_logits = cls_logits.transpose(1, 2)
        points, stride = make_anchors(feats, self.strides)
        points_px = points * stride
        pred_boxes = dist2bbox(dfl_expectation(box_logits, self.reg_max) * stride, points_px)

        gt_labels, gt_boxes, gt_mask = _pad_targets(targets, device)
        assigned = task_aligned_assign(
            cls_logits.detach().sigmoid(), pred_boxes.detach(), points_px, gt_labels, gt_boxes, gt_mask,
            topk=self.topk, alpha=self.alpha, beta=self.beta,
        )
        score_sum = assigned.scores.sum().clamp(min=1)
        weight = assigned.scores.sum(-1)

        loss_cls = F.binary_cross_entropy_with_logits(cls_logits, assigned.scores, reduction="sum") / score_sum
        ciou = complete_iou(pred_boxes, assigned.boxes)
        loss_box = ((1 - ciou) * weight).sum() / score_sum
        if self.reg_max > 1:
            b, _, a = box_logits.shape
            log_prob = box_logits.view(b, 4, self.reg_max, a).permute(0, 3, 1, 2).log_softmax(-1)
            target = bbox2dist(points, assigned.boxes / stride, self.reg_max - 1.01)
            left = target.long()
            w_left = left + 1 - target
            ce = -(log_prob.gather(-1, left[..., None]).squeeze(-1) * w_left
                   + log_prob.gather(-1, left[..., None] + 1).squeeze(-1) * (1 - w_left))
            loss_dfl = (ce.mean(-1) * weight).sum() / score_sum
        else:
            loss_dfl = torch.zeros((), device=device)

        loss_box = loss_box * self.box
        loss_cls = loss_cls * self.cls
        loss_dfl = loss_dfl * self.dfl
        total = loss_box + loss_cls + loss_dfl
        return total, {"box": loss_box.detach(), "cls": loss_cls.detach(), "dfl": loss_dfl.detach()}

    def _check(self, feats: Sequence[Tensor], targets: Sequence[dict[str, Tensor]],
               image_size: tuple[int, int]) -> None:
        """Shape checks only (no host sync)."""
        if isinstance(feats, Tensor) or not isinstance(feats, Sequence) or len(feats) != len(self.strides):
            got = f"a list of {len(feats)}" if isinstance(feats, Sequence) else type(feats).__name__
            raise ValueError(f"feats must be a list of {len(self.strides)} tensors (one per stride {self.strides}), "
                             f"got {got} (a v10Detect dict goes to V10DetectionLoss)")
        if (not isinstance(image_size, Sequence) or len(image_size) != 2
                or not all(isinstance(s, int) and s > 0 for s in image_size)):
            raise ValueError(f"image_size must be (height, width) in pixels, got {image_size!r}")
        channels = 4 * self.reg_max + self.num_classes
        batch = feats[0].shape[0] if isinstance(feats[0], Tensor) and feats[0].ndim == 4 else -1
        for i, (f, s) in enumerate(zip(feats, self.strides, strict=True)):
            if not isinstance(f, Tensor) or f.ndim != 4 or f.shape[0] != batch or f.shape[1] != channels:
                raise ValueError(f"feats[{i}] must be [B, 4 * reg_max + num_classes = {channels}, H, W] with the "
                                 f"batch of feats[0], got {tuple(getattr(f, 'shape', ()))}")
            if f.shape[2] * s < image_size[0] or f.shape[3] * s < image_size[1]:
                raise ValueError(f"feats[{i}] grid {tuple(f.shape[2:])} at stride {s:g} does not cover image_size "
                                 f"{tuple(image_size)}: check strides and image_size")
        if len(targets) != batch:
            raise ValueError(f"targets must have one dict per image: got {len(targets)} for a batch of {batch}")


class V10DetectionLoss(nn.Module):
    """Loss of a YOLOv10 ``v10Detect`` head: both branches trained, losses summed.

    The one-to-many branch uses the task-aligned assignment with ``topk=10``, the
    one-to-one branch with ``topk=1`` (its targets are its own best anchor, which
    is what lets v10 skip NMS); same gains and alignment exponents in both.

    Args:
        num_classes: classes of the head.
        reg_max: distribution bins per box side.
        strides: pixels per cell of each level.
        box: gain of the CIoU term.
        cls: gain of the class term.
        dfl: gain of the DFL term.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        reg_max: int = 16,
        strides: Sequence[float] = (8, 16, 32),
        box: float = 7.5,
        cls: float = 0.5,
        dfl: float = 1.5,
    ) -> None:
        super().__init__()
        self.one2many = DetectionLoss(num_classes=num_classes, reg_max=reg_max, strides=strides, box=box, cls=cls,
                                      dfl=dfl, topk=10)
        self.one2one = DetectionLoss(num_classes=num_classes, reg_max=reg_max, strides=strides, box=box, cls=cls,
                                     dfl=dfl, topk=1)

    def forward(
        self,
        feats: dict[str, Sequence[Tensor]],
        targets: Sequence[dict[str, Tensor]],
        *,
        image_size: tuple[int, int],
        validate: bool = False,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Compute the summed loss of both branches.

        Args:
            feats: ``{"one2many": [...], "one2one": [...]}``, each as
                :meth:`DetectionLoss.forward` takes it.
            targets: as :meth:`DetectionLoss.forward`.
            image_size: as :meth:`DetectionLoss.forward`.
            validate: as :meth:`DetectionLoss.forward` (checked once).

        Returns:
            The scalar loss and its detached parts ``{"box", "cls", "dfl"}``, each
            the sum over the two branches.
        """
        if not isinstance(feats, dict) or set(feats) != {"one2many", "one2one"}:
            raise ValueError("feats must be a dict {'one2many': [...], 'one2one': [...]} (raw v10Detect output), got "
                             f"{sorted(feats) if isinstance(feats, dict) else type(feats).__name__}")
        many, parts_many = self.one2many(feats["one2many"], targets, image_size=image_size, validate=validate)
        one, parts_one = self.one2one(feats["one2one"], targets, image_size=image_size)
        return many + one, {k: parts_many[k] + parts_one[k] for k in parts_many}
