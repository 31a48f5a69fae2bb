from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import complete_box_iou

from diode.models.yolov8.boxes import dfl_expectation, dist2bbox, make_anchors
from diode.models.yolov8.loss import DetectionLoss, V10DetectionLoss, complete_iou, task_aligned_assign

NC = 3
REG_MAX = 16
STRIDES = (8, 16)
SIZE = (64, 64)


def _feats(batch: int = 2, seed: int = 0, scale: float = 1.0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 4 * REG_MAX + NC, 8, 8, generator=g) * scale).requires_grad_(),
            (torch.randn(batch, 4 * REG_MAX + NC, 4, 4, generator=g) * scale).requires_grad_()]


def _aligned_feats(batch: int = 2, seed: int = 0) -> list[Tensor]:
    """Like :func:`_feats` with box sides of about 1.5 cells, so targets overlap their predictions.

    The soft targets of :data:`ONE` or :data:`THREE` then sum past 1 per image.
    """
    bias = torch.cat((-0.5 * torch.arange(REG_MAX, dtype=torch.float32).repeat(4), torch.zeros(NC)))
    return [(f.detach() * 0.3 + bias[:, None, None]).requires_grad_() for f in _feats(batch, seed)]


def _grad(t: Tensor) -> Tensor:
    assert t.grad is not None
    return t.grad


def _target(boxes: list[list[float]], labels: list[int]) -> dict[str, Tensor]:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64)}


EMPTY = _target([], [])
ONE = _target([[10.0, 12.0, 40.0, 50.0]], [1])
THREE = _target([[2.0, 3.0, 30.0, 20.0], [20.0, 20.0, 60.0, 62.0], [5.0, 30.0, 25.0, 60.0]], [0, 2, 1])


def _random_boxes(n: int, g: torch.Generator, dtype: torch.dtype = torch.float32) -> Tensor:
    xy = torch.rand(n, 2, generator=g, dtype=dtype) * 10
    return torch.cat((xy, xy + torch.rand(n, 2, generator=g, dtype=dtype) * 5 + 0.1), 1)


def test_complete_iou_matches_torchvision() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = _random_boxes(50, g), _random_boxes(50, g)
    torch.testing.assert_close(complete_iou(a, b), complete_box_iou(a, b).diagonal(), atol=1e-5, rtol=0)
    torch.testing.assert_close(complete_iou(a, a), torch.ones(50), atol=1e-5, rtol=0)
    # broadcasting gives the pairwise matrix
    torch.testing.assert_close(complete_iou(a[:, None], b[None]), complete_box_iou(a, b), atol=1e-5, rtol=0)


def test_complete_iou_gradcheck() -> None:
    g = torch.Generator().manual_seed(1)
    a, b = _random_boxes(6, g, torch.float64), _random_boxes(6, g, torch.float64)
    assert torch.autograd.gradcheck(complete_iou, (a.requires_grad_(), b.requires_grad_()))


def _grid(n: int = 8, stride: float = 8.0) -> Tensor:
    """``[n * n, 2]`` cell centres in pixels, row-major."""
    c = (torch.arange(n, dtype=torch.float32) + 0.5) * stride
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    return torch.stack((xx, yy), -1).reshape(-1, 2)


def test_assign_picks_topk_best_anchors_inside_the_box() -> None:
    points = _grid()
    pred = torch.cat((points - 6, points + 10), 1)[None]  # boxes off-centre, so overlaps differ
    scores = torch.full((1, 64, NC), 0.5)
    gt = torch.tensor([[[10.0, 10.0, 50.0, 42.0]]])
    out = task_aligned_assign(scores, pred, points, torch.tensor([[2]]), gt, torch.ones(1, 1, dtype=torch.bool),
                              topk=10)
    inside = ((points > gt[0, 0, :2]) & (points < gt[0, 0, 2:])).all(1)
    assert inside.sum() == 20
    fg = out.foreground[0]
    assert fg.sum() == 10 and not (fg & ~inside).any()
    overlap = complete_iou(gt[0, 0], pred[0]).clamp(min=0)
    assert overlap[fg].min() >= overlap[inside & ~fg].max()
    assert (out.labels[0, fg] == 2).all() and (out.boxes[0, fg] == gt[0, 0]).all()
    # soft targets: only on the foreground and the gt's class, max equals the best overlap
    assert (out.scores[0, ~fg] == 0).all() and (out.scores[0, :, :2] == 0).all()
    torch.testing.assert_close(out.scores[0, :, 2].max(), overlap[fg].max())
    assert (out.scores[0, fg, 2] > 0).all()


def test_assign_shared_anchor_goes_to_its_best_overlap() -> None:
    points = _grid()
    a = torch.tensor([4.0, 4.0, 36.0, 36.0])
    b = torch.tensor([12.0, 12.0, 60.0, 60.0])
    gt = torch.stack((a, b))[None]
    shared = 27  # point (28, 28), inside both
    for own, other in ((0, 1), (1, 0)):
        pred = torch.cat((points - 2, points + 2), 1)
        pred[shared] = gt[0, own]
        out = task_aligned_assign(torch.full((1, 64, NC), 0.5), pred[None], points, torch.tensor([[0, 1]]), gt,
                                  torch.ones(1, 2, dtype=torch.bool), topk=64)
        assert out.foreground[0, shared]
        assert out.labels[0, shared] == own
        assert (out.boxes[0, shared] == gt[0, own]).all()
        assert out.scores[0, shared, other] == 0


def test_assign_ignores_padding_and_boxes_without_anchor_points() -> None:
    points = _grid()
    pred = torch.cat((points - 8, points + 8), 1)[None]
    gt = torch.tensor([[[0.0, 0.0, 64.0, 64.0], [5.0, 5.0, 11.0, 11.0]]])  # padded big box, tiny box between points
    out = task_aligned_assign(torch.full((1, 64, NC), 0.5), pred, points, torch.tensor([[0, 1]]), gt,
                              torch.tensor([[False, True]]))
    assert not out.foreground.any() and (out.scores == 0).all()


def test_no_targets_is_class_bce_against_zeros() -> None:
    feats = _feats()
    total, parts = DetectionLoss(num_classes=NC, strides=STRIDES)(feats, [EMPTY, EMPTY], image_size=SIZE)
    assert torch.isfinite(total) and parts["box"] == 0 and parts["dfl"] == 0
    logits = torch.cat([f.detach().flatten(2) for f in feats], 2)[:, 4 * REG_MAX:]
    expected = 0.5 * F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="sum")
    torch.testing.assert_close(total.detach(), expected)
    total.backward()
    assert all((_grad(f)[:, :4 * REG_MAX] == 0).all() and (_grad(f)[:, 4 * REG_MAX:] > 0).all() for f in feats)


def test_one_target_parts_and_gradients() -> None:
    feats = _feats()
    total, parts = DetectionLoss(num_classes=NC, strides=STRIDES)(feats, [ONE, EMPTY], image_size=SIZE)
    assert parts["box"] > 0 and parts["cls"] > 0 and parts["dfl"] > 0
    assert not any(p.requires_grad for p in parts.values())
    torch.testing.assert_close(total.detach(), parts["box"] + parts["cls"] + parts["dfl"])
    total.backward()
    grad = _grad(feats[0])
    assert grad[0, :4 * REG_MAX].abs().sum() > 0 and grad[0, 4 * REG_MAX:].abs().sum() > 0
    assert (grad[1, :4 * REG_MAX] == 0).all()  # image without targets: no box gradient


def test_exact_values_with_a_single_positive() -> None:
    # uniform box logits: every anchor predicts a 2 * 7.5 cells = 120 px square; zero class logits
    feats = [torch.zeros(1, 4 * REG_MAX + NC, 4, 4, requires_grad=True)]
    gt = torch.tensor([6.0, 6.0, 22.0, 22.0])
    total, parts = DetectionLoss(num_classes=NC, strides=(8,), topk=1)(
        feats, [{"boxes": gt[None], "labels": torch.tensor([1])}], image_size=(32, 32))
    point = torch.tensor([12.0, 12.0])  # the cell centre closest to the box centre (14, 14)
    u = complete_iou(torch.cat((point - 60, point + 60)), gt)
    assert 0 < u < 1
    # the one positive has soft target u; the sum of soft targets (u) is clamped to 1
    torch.testing.assert_close(parts["box"], 7.5 * (1 - u) * u)
    torch.testing.assert_close(parts["dfl"], 1.5 * math.log(REG_MAX) * u)
    # BCE of a zero logit is log 2 whatever the target
    torch.testing.assert_close(parts["cls"], torch.tensor(0.5 * 16 * NC * math.log(2)))


def _minimise(loss: DetectionLoss, feats: list[Tensor], targets: list[dict[str, Tensor]], *, steps: int) -> None:
    """Adam steps on ``feats`` of a 32x32 input."""
    opt = torch.optim.Adam(feats, lr=0.3)
    for _ in range(steps):
        total, _ = loss(feats, targets, image_size=(32, 32))
        opt.zero_grad()
        total.backward()
        opt.step()


def test_dfl_minimum_is_the_two_bins_around_the_target_distance() -> None:
    feats = [torch.zeros(1, 4 * REG_MAX + NC, 4, 4, requires_grad=True)]
    loss = DetectionLoss(num_classes=NC, strides=(8,), topk=1, box=0.0, cls=0.0)
    target = [{"boxes": torch.tensor([[6.0, 6.0, 22.0, 22.0]]), "labels": torch.tensor([1])}]
    _minimise(loss, feats, target, steps=60)
    # anchor (12, 12) is row 1, column 1; its sides are 0.75, 0.75, 1.25, 1.25 cells from the box
    prob = feats[0].detach()[0, :4 * REG_MAX, 1, 1].view(4, REG_MAX).softmax(-1)
    torch.testing.assert_close(prob[:, :3], torch.tensor([[0.25, 0.75, 0.0]] * 2 + [[0.0, 0.75, 0.25]] * 2),
                               atol=0.02, rtol=0)


def test_dfl_targets_beyond_the_last_bin_are_clamped() -> None:
    reg_max = 4
    feats = [torch.zeros(1, 4 * reg_max + NC, 8, 8, requires_grad=True)]
    loss = DetectionLoss(num_classes=NC, reg_max=reg_max, strides=(4,), topk=1, box=0.0, cls=0.0)
    target = [{"boxes": torch.tensor([[0.5, 0.5, 31.0, 31.0]]), "labels": torch.tensor([0])}]
    _minimise(loss, feats, target, steps=40)
    # anchor (14, 14), row 3, column 3: every side is over 3 cells away, its target is 2.99 cells
    prob = feats[0].detach()[0, :4 * reg_max, 3, 3].view(4, reg_max).softmax(-1)
    assert (prob[:, 3] > 0.9).all() and (prob[:, 3] > 20 * prob[:, 2]).all()


def test_class_gradient_is_bce_against_detached_soft_targets() -> None:
    feats = _aligned_feats(batch=1)
    loss = DetectionLoss(num_classes=NC, strides=STRIDES, box=0.0, dfl=0.0)
    total, _ = loss(feats, [THREE], image_size=SIZE)
    total.backward()
    x = torch.cat([f.detach().flatten(2) for f in feats], 2)
    cls = x[:, 4 * REG_MAX:].transpose(1, 2)
    points, stride = make_anchors(feats, STRIDES)
    pred = dist2bbox(dfl_expectation(x[:, :4 * REG_MAX], REG_MAX) * stride, points * stride)
    out = task_aligned_assign(cls.sigmoid(), pred, points * stride, THREE["labels"][None], THREE["boxes"][None],
                              torch.ones(1, 3, dtype=torch.bool))
    assert out.foreground.sum() > 3
    expected = 0.5 * (cls.sigmoid() - out.scores) / out.scores.sum().clamp(min=1)
    grad = torch.cat([_grad(f).flatten(2) for f in feats], 2)[:, 4 * REG_MAX:].transpose(1, 2)
    torch.testing.assert_close(grad, expected)


def test_batch_order_and_mixed_target_counts() -> None:
    loss = DetectionLoss(num_classes=NC, strides=STRIDES)
    feats = _feats(batch=3)
    total, _ = loss(feats, [EMPTY, ONE, THREE], image_size=SIZE)
    assert torch.isfinite(total)
    order = [2, 0, 1]
    permuted = [f.detach()[order] for f in feats]
    total_p, _ = loss(permuted, [[EMPTY, ONE, THREE][i] for i in order], image_size=SIZE)
    torch.testing.assert_close(total_p, total.detach())


def test_loss_does_not_scale_with_batch_size() -> None:
    loss = DetectionLoss(num_classes=NC, strides=STRIDES)
    feats = [f.detach() for f in _aligned_feats(batch=2)]
    total, parts = loss(feats, [ONE, THREE], image_size=SIZE)
    total2, parts2 = loss([torch.cat((f, f)) for f in feats], [ONE, THREE, ONE, THREE], image_size=SIZE)
    torch.testing.assert_close(total2, total)
    for k in parts:
        torch.testing.assert_close(parts2[k], parts[k])


def test_loss_decreases_under_adam_on_feats() -> None:
    feats = _feats(batch=2)
    loss = DetectionLoss(num_classes=NC, strides=STRIDES)
    targets = [ONE, THREE]
    opt = torch.optim.Adam(feats, lr=0.1)
    history = []
    for _ in range(15):
        total, parts = loss(feats, targets, image_size=SIZE)
        history.append(parts)
        opt.zero_grad()
        total.backward()
        opt.step()
    first, last = history[0], history[-1]
    assert last["cls"] < 0.5 * first["cls"] and last["box"] < first["box"] and last["dfl"] < first["dfl"]


class _TinyDetector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.SiLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.SiLU(),
                                  nn.Conv2d(16, 16, 3, 2, 1), nn.SiLU())
        self.down = nn.Sequential(nn.Conv2d(16, 16, 3, 2, 1), nn.SiLU())
        self.heads = nn.ModuleList(nn.Conv2d(16, 4 * REG_MAX + NC, 1) for _ in STRIDES)

    def forward(self, x: Tensor) -> list[Tensor]:
        p3 = self.stem(x)
        return [self.heads[0](p3), self.heads[1](self.down(p3))]


def test_loss_decreases_when_training_a_tiny_model() -> None:
    torch.manual_seed(0)
    model = _TinyDetector()
    images = torch.rand(2, 3, *SIZE, generator=torch.Generator().manual_seed(0))
    loss = DetectionLoss(num_classes=NC, strides=STRIDES)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    values = []
    for _ in range(15):
        total, _ = loss(model(images), [ONE, THREE], image_size=SIZE)
        values.append(float(total.detach()))
        opt.zero_grad()
        total.backward()
        opt.step()
    assert values[-1] < 0.5 * values[0]


def test_v10_is_the_sum_of_its_branches() -> None:
    feats = {"one2many": _feats(seed=0), "one2one": _feats(seed=1)}
    targets = [ONE, THREE]
    total, parts = V10DetectionLoss(num_classes=NC, strides=STRIDES)(feats, targets, image_size=SIZE)
    many, p_many = DetectionLoss(num_classes=NC, strides=STRIDES, topk=10)(feats["one2many"], targets,
                                                                           image_size=SIZE)
    one, p_one = DetectionLoss(num_classes=NC, strides=STRIDES, topk=1)(feats["one2one"], targets, image_size=SIZE)
    torch.testing.assert_close(total, many + one)
    for k in ("box", "cls", "dfl"):
        torch.testing.assert_close(parts[k], p_many[k] + p_one[k])
    with pytest.raises(ValueError, match="one2one"):
        V10DetectionLoss(num_classes=NC, strides=STRIDES)(feats["one2many"], targets, image_size=SIZE)  # type: ignore[arg-type]


def test_reg_max_one_has_no_dfl_term() -> None:
    g = torch.Generator().manual_seed(0)
    feats = [(torch.rand(1, 4 + NC, 8, 8, generator=g) * 3).requires_grad_()]
    total, parts = DetectionLoss(num_classes=NC, reg_max=1, strides=(8,))(feats, [ONE], image_size=SIZE)
    assert parts["dfl"] == 0 and parts["box"] > 0
    total.backward()
    assert _grad(feats[0])[:, :4].abs().sum() > 0


def test_low_precision_feats_are_computed_in_float32() -> None:
    feats = [f.detach() for f in _feats()]
    loss = DetectionLoss(num_classes=NC, strides=STRIDES)
    ref, _ = loss(feats, [ONE, THREE], image_size=SIZE)
    half, _ = loss([f.bfloat16() for f in feats], [ONE, THREE], image_size=SIZE)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, ref, rtol=0.02, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"num_classes": 0}, "num_classes"), ({"num_classes": 3, "reg_max": 0}, "reg_max"),
     ({"num_classes": 3, "strides": ()}, "strides"), ({"num_classes": 3, "box": -1.0}, "box"),
     ({"num_classes": 3, "topk": 0}, "topk")],
)
def test_bad_options(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DetectionLoss(**kwargs)


def test_bad_inputs() -> None:
    loss = DetectionLoss(num_classes=NC, strides=STRIDES)
    feats = [f.detach() for f in _feats()]
    with pytest.raises(ValueError, match="2 tensors"):
        loss(feats[:1], [ONE, ONE], image_size=SIZE)
    with pytest.raises(ValueError, match="V10DetectionLoss"):
        loss({"one2many": feats, "one2one": feats}, [ONE, ONE], image_size=SIZE)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"feats\[1\]"):
        loss([feats[0], feats[1][:, :-1]], [ONE, ONE], image_size=SIZE)
    with pytest.raises(ValueError, match="one dict per image"):
        loss(feats, [ONE], image_size=SIZE)
    with pytest.raises(ValueError, match="does not cover"):
        loss(feats, [ONE, ONE], image_size=(128, 64))
    with pytest.raises(ValueError, match="image_size"):
        loss(feats, [ONE, ONE], image_size=64)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="class id"):
        loss(feats, [ONE, _target([[1.0, 1.0, 9.0, 9.0]], [NC])], image_size=SIZE, validate=True)
