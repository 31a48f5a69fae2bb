from __future__ import annotations

import pytest
import torch
from torch import Tensor

from diode.models.yolov8.decode import decode, postprocess

REG = 16
NC = 3
STRIDES = (8, 16)
BIG = 30.0


def _levels(batch: int = 1) -> list[Tensor]:
    """Raw levels for a 32x32 input (4x4 and 2x2 grids) with every class logit very negative."""
    levels = [torch.zeros(batch, 4 * REG + NC, 4, 4), torch.zeros(batch, 4 * REG + NC, 2, 2)]
    for t in levels:
        t[:, 4 * REG:] = -BIG
    return levels


def _put(levels: list[Tensor], level: int, y: int, x: int, sides: tuple[int, int, int, int],
         scores: dict[int, float], image: int = 0) -> None:
    """Box distances (in cells, whole bins) and class probabilities at one anchor point."""
    t = levels[level]
    t[image, : 4 * REG, y, x] = -BIG
    for s, d in enumerate(sides):
        t[image, s * REG + d, y, x] = BIG
    for c, p in scores.items():
        t[image, 4 * REG + c, y, x] = torch.logit(torch.tensor(p))


def test_decode_boxes_in_pixels_and_sigmoid_scores() -> None:
    levels = _levels()
    _put(levels, 0, 1, 2, (1, 1, 2, 3), {2: 0.9})
    _put(levels, 1, 1, 0, (0, 1, 1, 0), {0: 0.6})
    boxes, scores = decode(levels, STRIDES, REG)
    assert boxes.shape == (1, 20, 4) and scores.shape == (1, 20, NC)
    # level 0, cell (y=1, x=2): centre (2.5, 1.5) cells * 8 px
    torch.testing.assert_close(boxes[0, 1 * 4 + 2], torch.tensor([1.5, 0.5, 4.5, 4.5]) * 8)
    torch.testing.assert_close(boxes[0, 16 + 2], torch.tensor([0.5, 0.5, 1.5, 1.5]) * 16)
    torch.testing.assert_close(scores[0, 6], torch.tensor([0.0, 0.0, 0.9]), atol=1e-6, rtol=0)


def test_decode_is_differentiable() -> None:
    levels = [t.requires_grad_() for t in _levels()]
    boxes, scores = decode(levels, STRIDES, REG)
    (boxes.sum() + scores.sum()).backward()
    assert all(t.grad is not None for t in levels)


def test_nms_keeps_the_best_box_of_a_class() -> None:
    levels = _levels()
    _put(levels, 0, 1, 1, (1, 1, 1, 1), {0: 0.9})
    _put(levels, 0, 1, 2, (2, 1, 1, 1), {0: 0.8})  # IoU 2/3 with the first: suppressed at iou 0.5
    _put(levels, 0, 2, 2, (2, 2, 0, 0), {1: 0.7})  # same box, another class: kept
    _put(levels, 1, 1, 1, (1, 1, 0, 0), {2: 0.2})  # below conf
    det = postprocess(levels, STRIDES, REG, conf=0.25, iou=0.5)[0]
    torch.testing.assert_close(det["scores"], torch.tensor([0.9, 0.7]))
    assert det["labels"].tolist() == [0, 1]
    torch.testing.assert_close(det["boxes"][0], torch.tensor([4.0, 4.0, 20.0, 20.0]))
    assert len(postprocess(levels, STRIDES, REG, conf=0.25, iou=0.99)[0]["scores"]) == 3
    assert len(postprocess(levels, STRIDES, REG, conf=0.1, iou=0.5)[0]["scores"]) == 3
    assert len(postprocess(levels, STRIDES, REG, conf=0.25, iou=0.5, max_det=1)[0]["scores"]) == 1


def test_nms_takes_one_class_per_anchor_point() -> None:
    levels = _levels()
    _put(levels, 0, 1, 1, (1, 1, 1, 1), {0: 0.9, 1: 0.8})
    det = postprocess(levels, STRIDES, REG, conf=0.25)[0]
    assert det["labels"].tolist() == [0]


def test_v10_top_k_without_nms() -> None:
    one2one = _levels(batch=2)
    _put(one2one, 0, 1, 1, (1, 1, 1, 1), {0: 0.9, 1: 0.8})  # one point, two classes: both kept
    _put(one2one, 0, 1, 2, (2, 1, 0, 1), {0: 0.85})  # overlapping box, same class: kept (no NMS)
    _put(one2one, 1, 0, 0, (0, 0, 1, 1), {2: 0.3}, image=1)
    raw = {"one2many": _levels(batch=2), "one2one": one2one}
    det = postprocess(raw, STRIDES, REG, conf=0.25, iou=0.1)
    torch.testing.assert_close(det[0]["scores"], torch.tensor([0.9, 0.85, 0.8]))
    assert det[0]["labels"].tolist() == [0, 0, 1]
    torch.testing.assert_close(det[0]["boxes"][0], det[0]["boxes"][2])
    assert det[1]["labels"].tolist() == [2]
    assert postprocess(raw, STRIDES, REG, conf=0.25, max_det=2)[0]["scores"].tolist() == pytest.approx([0.9, 0.85])
    # a draw of the one-to-many branch alone is not used
    many_only = {"one2many": one2one, "one2one": _levels(batch=2)}
    assert len(postprocess(many_only, STRIDES, REG)[0]["scores"]) == 0


def test_boxes_clipped_to_the_image() -> None:
    levels = _levels()
    _put(levels, 1, 1, 1, (3, 3, 3, 3), {1: 0.9})  # 24..72 px wide box at centre (24, 24)
    det = postprocess(levels, STRIDES, REG, image_size=(30, 20))[0]
    torch.testing.assert_close(det["boxes"], torch.tensor([[0.0, 0.0, 20.0, 30.0]]))


def test_bad_raw_outputs() -> None:
    with pytest.raises(TypeError, match="non-empty list"):
        decode([], STRIDES, REG)
    with pytest.raises(ValueError, match="strides"):
        decode(_levels(), (8,), REG)
    with pytest.raises(ValueError, match="fewer than"):
        decode([torch.zeros(1, 10, 2, 2)], (8,), REG)
    with pytest.raises(ValueError, match="same B and C"):
        decode([torch.zeros(1, 67, 2, 2), torch.zeros(1, 68, 1, 1)], STRIDES, REG)
    with pytest.raises(ValueError, match="one2one"):
        postprocess({"one2many": _levels()}, STRIDES, REG)
    with pytest.raises(ValueError, match="conf"):
        postprocess(_levels(), STRIDES, REG, conf=1.5)
