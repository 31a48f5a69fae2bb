from __future__ import annotations

import math

import pytest
import torch

from diode.models.yolo.decode import decode, postprocess

STRIDE = 8
ANCHORS = [torch.tensor([[32.0, 32.0], [16.0, 24.0]])]


def _empty_outputs(batch: int = 1, size: int = 6, num_classes: int = 2) -> list[torch.Tensor]:
    """Raw outputs where every cell has objectness logit -20 (score ~ 0)."""
    p = torch.zeros(batch, 2, size, size, 5 + num_classes)
    p[..., 4] = -20.0
    p[..., 5:] = -20.0
    return [p]


def _set_cell(p: torch.Tensor, *, image: int = 0, anchor: int = 0, gy: int, gx: int,
              obj: float, cls: list[float]) -> None:
    p[image, anchor, gy, gx, :4] = 0.0
    p[image, anchor, gy, gx, 4] = obj
    p[image, anchor, gy, gx, 5:] = torch.tensor(cls)


def test_decode_exact_box_two_heads() -> None:
    p0 = torch.zeros(2, 2, 4, 5, 7)
    p1 = torch.zeros(2, 3, 2, 3, 7)
    p1[1, 2, 1, 2, :4] = torch.tensor([0.0, 0.0, math.log(2.0), 0.0])
    anchors = [torch.tensor([[10.0, 14.0], [20.0, 6.0]]),
               torch.tensor([[30.0, 40.0], [50.0, 60.0], [70.0, 80.0]])]
    boxes, obj, cls = decode([p0, p1], anchors, [8, 16])
    assert boxes.shape == (2, 2 * 20 + 3 * 6, 4)
    assert obj.shape == (2, 58) and cls.shape == (2, 58, 2)
    # head 0, anchor 1, row 3, column 2: center ((2 + 0.5) * 8, (3 + 0.5) * 8), size = anchor
    n = (1 * 4 + 3) * 5 + 2
    torch.testing.assert_close(boxes[0, n], torch.tensor([10.0, 25.0, 30.0, 31.0]))
    # head 1, anchor 2, row 1, column 2, tw = log 2 doubles the width
    n = 40 + (2 * 2 + 1) * 3 + 2
    torch.testing.assert_close(boxes[1, n], torch.tensor([-30.0, -16.0, 110.0, 64.0]))
    torch.testing.assert_close(obj, torch.full_like(obj, 0.5))
    torch.testing.assert_close(cls, torch.full_like(cls, 0.5))


def test_decode_bfloat16_outputs_give_float32() -> None:
    p = torch.zeros(1, 2, 3, 3, 6, dtype=torch.bfloat16)
    boxes, obj, cls = decode([p], ANCHORS, [STRIDE])
    assert boxes.dtype == obj.dtype == cls.dtype == torch.float32


def test_decode_rejects_mismatched_anchors() -> None:
    with pytest.raises(ValueError, match="anchors"):
        decode(_empty_outputs(), [torch.ones(3, 2)], [STRIDE])


def test_postprocess_suppresses_overlapping_same_class() -> None:
    outputs = _empty_outputs()
    # adjacent cells, same 32x32 anchor: IoU = 24*32 / (2*32*32 - 24*32) = 0.6
    _set_cell(outputs[0], gy=2, gx=2, obj=3.0, cls=[10.0, -20.0])
    _set_cell(outputs[0], gy=2, gx=3, obj=2.0, cls=[10.0, -20.0])
    (det,) = postprocess(outputs, ANCHORS, [STRIDE])
    assert det["labels"].tolist() == [0]
    torch.testing.assert_close(det["boxes"][0], torch.tensor([4.0, 4.0, 36.0, 36.0]))
    expected = torch.sigmoid(torch.tensor(3.0)) * torch.sigmoid(torch.tensor(10.0))
    torch.testing.assert_close(det["scores"][0], expected)


def test_postprocess_keeps_overlapping_different_classes_sorted() -> None:
    outputs = _empty_outputs()
    _set_cell(outputs[0], gy=2, gx=2, obj=2.0, cls=[10.0, -20.0])
    _set_cell(outputs[0], gy=2, gx=3, obj=3.0, cls=[-20.0, 10.0])
    (det,) = postprocess(outputs, ANCHORS, [STRIDE])
    assert det["labels"].tolist() == [1, 0]
    assert det["scores"][0] > det["scores"][1]


def test_postprocess_respects_conf_and_empty_outputs() -> None:
    outputs = _empty_outputs(batch=2)
    _set_cell(outputs[0], gy=1, gx=1, obj=0.0, cls=[0.0, -20.0])  # score 0.5 * 0.5
    _set_cell(outputs[0], gy=1, gx=1, anchor=1, obj=20.0, cls=[math.log(0.2 / 0.8), -20.0])  # 0.2
    dets = postprocess(outputs, ANCHORS, [STRIDE], conf=0.24)
    assert dets[0]["scores"].tolist() == pytest.approx([0.25])
    low = postprocess(outputs, ANCHORS, [STRIDE], conf=0.1, iou=1.0)
    assert low[0]["scores"].tolist() == pytest.approx([0.25, 0.2])
    empty = dets[1]
    assert empty["boxes"].shape == (0, 4) and empty["boxes"].dtype == torch.float32
    assert empty["scores"].shape == (0,) and empty["scores"].dtype == torch.float32
    assert empty["labels"].shape == (0,) and empty["labels"].dtype == torch.int64


def test_postprocess_multi_label() -> None:
    outputs = _empty_outputs()
    _set_cell(outputs[0], gy=2, gx=2, obj=10.0, cls=[10.0, 5.0])
    (det,) = postprocess(outputs, ANCHORS, [STRIDE], multi_label=True)
    assert det["labels"].tolist() == [0, 1]
    torch.testing.assert_close(det["boxes"][0], det["boxes"][1])
    (single,) = postprocess(outputs, ANCHORS, [STRIDE], multi_label=False)
    assert single["labels"].tolist() == [0]


def test_postprocess_clips_and_limits() -> None:
    outputs = _empty_outputs()
    _set_cell(outputs[0], gy=0, gx=0, obj=10.0, cls=[10.0, -20.0])  # 32x32 box centered (4, 4)
    _set_cell(outputs[0], gy=5, gx=5, obj=5.0, cls=[10.0, -20.0])  # centered (44, 44), canvas 48
    (det,) = postprocess(outputs, ANCHORS, [STRIDE])
    expected = torch.tensor([[0.0, 0.0, 20.0, 20.0], [28.0, 28.0, 48.0, 48.0]])
    torch.testing.assert_close(det["boxes"], expected)
    (det,) = postprocess(outputs, ANCHORS, [STRIDE], image_size=(40, 30), max_det=1)
    torch.testing.assert_close(det["boxes"], torch.tensor([[0.0, 0.0, 20.0, 20.0]]))


@pytest.mark.parametrize("kwargs", [{"conf": 1.5}, {"iou": -0.1}, {"max_det": 0}])
def test_postprocess_rejects_bad_thresholds(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        postprocess(_empty_outputs(), ANCHORS, [STRIDE], **kwargs)
