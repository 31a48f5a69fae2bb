from __future__ import annotations

import pytest
import torch
from torchvision.ops import box_iou, generalized_box_iou

from diode._boxes import cxcywh_to_xyxy
from diode.models.yolo.decode import postprocess
from diode.models.yolo.loss import YOLOLoss, giou_cxcywh

STRIDE = 8
# target 16x16 boxes: wh-IoU 1.0, 0.64 and 0.0256 with these anchors
ANCHORS = [torch.tensor([[16.0, 16.0], [20.0, 20.0], [100.0, 100.0]])]


def _outputs(batch: int = 1, num_classes: int = 2) -> list[torch.Tensor]:
    return [torch.zeros(batch, 3, 6, 6, 5 + num_classes, requires_grad=True)]


def _target(boxes: list[list[float]], labels: list[int]) -> dict[str, torch.Tensor]:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64)}


def _positive_obj_cells(outputs: list[torch.Tensor], targets: list[dict], **kwargs) -> torch.Tensor:
    """Cells whose objectness target is positive: BCE gradient at a zero logit is negative there."""
    total, _ = YOLOLoss(**kwargs)(outputs, ANCHORS, [STRIDE], targets)
    total.backward()
    return (outputs[0].grad[..., 4] < 0).nonzero()


def _random_boxes(n: int, g: torch.Generator, dtype: torch.dtype) -> list[torch.Tensor]:
    """Two ``[n, 4]`` cxcywh box sets with centers in [0, 10) and sizes in [0.1, 5.1)."""
    def one() -> torch.Tensor:
        return torch.cat((torch.rand(n, 2, generator=g, dtype=dtype) * 10,
                          torch.rand(n, 2, generator=g, dtype=dtype) * 5 + 0.1), dim=1)

    return [one(), one()]


def test_giou_matches_torchvision() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = _random_boxes(20, g, torch.float32)
    expected = generalized_box_iou(cxcywh_to_xyxy(a), cxcywh_to_xyxy(b)).diagonal()
    torch.testing.assert_close(giou_cxcywh(a, b), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(giou_cxcywh(a, a), torch.ones(20), atol=1e-5, rtol=0)


def test_giou_gradcheck() -> None:
    g = torch.Generator().manual_seed(1)
    a, b = _random_boxes(6, g, torch.float64)
    assert torch.autograd.gradcheck(giou_cxcywh, (a.requires_grad_(), b.requires_grad_()))


def test_no_targets() -> None:
    outputs = _outputs(batch=2)
    total, parts = YOLOLoss()(outputs, ANCHORS, [STRIDE], [_target([], []), _target([], [])])
    assert parts["box"] == 0 and parts["cls"] == 0 and parts["obj"] > 0
    assert torch.isfinite(total)
    total.backward()
    assert (outputs[0].grad[..., 4] > 0).all()
    assert (outputs[0].grad[..., [0, 1, 2, 3, 5, 6]] == 0).all()


def test_one_target_matches_every_anchor_above_threshold() -> None:
    target = [_target([[12.0, 20.0, 28.0, 36.0]], [1])]  # 16x16 centered (20, 28): cell x=2, y=3
    cells = _positive_obj_cells(_outputs(), target)
    assert cells.tolist() == [[0, 0, 3, 2], [0, 1, 3, 2]]
    cells = _positive_obj_cells(_outputs(), target, iou_threshold=0.7)
    assert cells.tolist() == [[0, 0, 3, 2]]


def test_one_target_parts_and_gradients() -> None:
    outputs = _outputs()
    target = [_target([[13.0, 21.0, 27.0, 37.0]], [1])]
    total, parts = YOLOLoss()(outputs, ANCHORS, [STRIDE], target)
    assert parts["box"] > 0 and parts["cls"] > 0 and parts["obj"] > 0
    assert not parts["box"].requires_grad
    torch.testing.assert_close(total.detach(), parts["box"] + parts["obj"] + parts["cls"])
    total.backward()
    grad = outputs[0].grad
    box_grad_cells = (grad[..., :4].abs().sum(-1) > 0).nonzero().tolist()
    assert box_grad_cells == [[0, 0, 3, 2], [0, 1, 3, 2]]
    assert (grad[0, :2, 3, 2, 5] > 0).all() and (grad[0, :2, 3, 2, 6] < 0).all()


def test_giou_ratio_sets_objectness_target() -> None:
    outputs = _outputs()
    box = [[12.0, 20.0, 30.0, 36.0]]  # 18x16, center (21, 28): in-cell (0.625, 0.5)
    loss = YOLOLoss(giou_ratio=1.0, obj_gain=1.0)
    total, _ = loss(outputs, ANCHORS, [STRIDE], [_target(box, [0])])
    total.backward()
    pred = torch.tensor([0.5, 0.5, 2.0, 2.0])  # zero logits, anchor 16x16 in grid units
    giou = giou_cxcywh(pred, torch.tensor([0.625, 0.5, 18 / 8, 2.0]))
    expected = (0.5 - giou) / outputs[0][..., 4].numel()
    torch.testing.assert_close(outputs[0].grad[0, 0, 3, 2, 4], expected)


def test_two_heads_match_by_anchor_size() -> None:
    outputs = [torch.zeros(1, 2, 8, 8, 7, requires_grad=True),
               torch.zeros(1, 2, 4, 4, 7, requires_grad=True)]
    anchors = [torch.tensor([[10.0, 10.0], [16.0, 16.0]]),
               torch.tensor([[60.0, 60.0], [90.0, 90.0]])]
    total, _ = YOLOLoss()(outputs, anchors, [8, 16], [_target([[0.0, 0.0, 64.0, 64.0]], [0])])
    total.backward()
    assert not (outputs[0].grad[..., 4] < 0).any()
    assert (outputs[1].grad[..., 4] < 0).nonzero().tolist() == [[0, 0, 2, 2], [0, 1, 2, 2]]


def test_batch_with_an_empty_image() -> None:
    target = [_target([], []), _target([[12.0, 20.0, 28.0, 36.0]], [0])]
    cells = _positive_obj_cells(_outputs(batch=2), target)
    assert cells.tolist() == [[1, 0, 3, 2], [1, 1, 3, 2]]


def test_single_class_has_no_class_loss() -> None:
    outputs = _outputs(num_classes=1)
    _, parts = YOLOLoss()(outputs, ANCHORS, [STRIDE], [_target([[12.0, 20.0, 28.0, 36.0]], [0])])
    assert parts["cls"] == 0 and parts["box"] > 0


def test_bfloat16_outputs() -> None:
    outputs = [torch.zeros(1, 3, 6, 6, 7, dtype=torch.bfloat16, requires_grad=True)]
    total, _ = YOLOLoss()(outputs, ANCHORS, [STRIDE], [_target([[12.0, 20.0, 28.0, 36.0]], [0])])
    assert total.dtype == torch.float32 and torch.isfinite(total)
    total.backward()
    assert outputs[0].grad.dtype == torch.bfloat16


def test_validation() -> None:
    loss = YOLOLoss()
    bad_label = [_target([[12.0, 20.0, 28.0, 36.0]], [5])]
    with pytest.raises(ValueError, match="class id"):
        loss(_outputs(), ANCHORS, [STRIDE], bad_label, validate=True)
    with pytest.raises(ValueError, match="one dict per image"):
        loss(_outputs(batch=2), ANCHORS, [STRIDE], bad_label)
    with pytest.raises(ValueError, match="iou_threshold"):
        YOLOLoss(iou_threshold=1.0)
    with pytest.raises(ValueError, match="obj_gain"):
        YOLOLoss(obj_gain=-1.0)


def test_optimising_outputs_recovers_the_target() -> None:
    anchors = [torch.tensor([[16.0, 16.0], [40.0, 40.0]])]
    raw = torch.zeros(1, 2, 6, 6, 7, requires_grad=True)
    target = _target([[10.0, 14.0, 30.0, 38.0]], [1])
    loss = YOLOLoss()
    opt = torch.optim.Adam([raw], lr=0.1)
    losses = []
    for _ in range(150):
        total, _ = loss([raw], anchors, [STRIDE], [target])
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(total.item())
    assert losses[-1] < 0.05 * losses[0]
    (det,) = postprocess([raw.detach()], anchors, [STRIDE], conf=0.5)
    assert det["labels"].tolist() == [1]
    assert box_iou(det["boxes"], target["boxes"]).item() > 0.95
