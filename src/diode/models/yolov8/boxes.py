"""Anchor points and distance boxes of the anchor-free YOLO heads (shared by decoding and the loss)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def make_anchors(feats: Sequence[Tensor], strides: Sequence[float], offset: float = 0.5) -> tuple[Tensor, Tensor]:
    """Cell centres of every level, in grid units of their level.

    Args:
        feats: per level ``[B, C, H_i, W_i]``.
        strides: per level, pixels per cell.
        offset: position of the point inside its cell (0.5: the centre).

    Returns:
        ``(points [A, 2], stride [A, 1])`` with ``A = sum(H_i * W_i)``, points as
        ``(x, y)`` in cells (multiply by ``stride`` for pixels), levels in order,
        row-major inside a level.
    """
    points, stride_rows = [], []
    ref = feats[0]
    for feat, stride in zip(feats, strides, strict=True):
        h, w = feat.shape[-2:]
        sx = torch.arange(w, device=ref.device, dtype=torch.float32) + offset
        sy = torch.arange(h, device=ref.device, dtype=torch.float32) + offset
        yy, xx = torch.meshgrid(sy, sx, indexing="ij")
        points.append(torch.stack((xx, yy), -1).reshape(-1, 2))
        stride_rows.append(torch.full((h * w, 1), float(stride), device=ref.device, dtype=torch.float32))
    return torch.cat(points), torch.cat(stride_rows)


def dist2bbox(distance: Tensor, points: Tensor) -> Tensor:
    """``(left, top, right, bottom)`` distances ``[..., 4]`` from ``points`` ``[..., 2]`` to xyxy boxes."""
    lt, rb = distance.chunk(2, -1)
    return torch.cat((points - lt, points + rb), -1)


def bbox2dist(points: Tensor, boxes: Tensor, max_dist: float) -> Tensor:
    """Inverse of :func:`dist2bbox`, clamped to ``[0, max_dist]`` (``reg_max - 1 - eps`` for DFL targets)."""
    x1y1, x2y2 = boxes.chunk(2, -1)
    return torch.cat((points - x1y1, x2y2 - points), -1).clamp(0, max_dist)


def dfl_expectation(box_logits: Tensor, reg_max: int) -> Tensor:
    """Expected distances from distribution logits.

    Args:
        box_logits: ``[B, 4 * reg_max, A]`` (side-major: ``reg_max`` bins of the
            left side, then top, right, bottom).
        reg_max: bins per side (16 in the family; 1 means plain regression).

    Returns:
        ``[B, A, 4]`` distances in grid units of each anchor's level.
    """
    b, _, a = box_logits.shape
    if reg_max == 1:
        return box_logits.transpose(1, 2)
    prob = box_logits.view(b, 4, reg_max, a).softmax(2)
    bins = torch.arange(reg_max, device=box_logits.device, dtype=prob.dtype)
    return torch.einsum("bsra,r->bas", prob, bins)
