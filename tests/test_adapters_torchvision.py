"""TorchvisionAdapter: every torchvision detection family, tiny and randomly initialised, on CPU.

The fast tests build small models through torchvision's own classes (a three-level
BatchNorm backbone, small heads) so each family runs in well under a second; the
``slow`` tests run the real builders by name at 64 px.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, KeypointRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator, DefaultBoxGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.ssdlite import SSDLiteHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.misc import FrozenBatchNorm2d

import diode
from diode.adapters.torchvision import TorchvisionAdapter, TorchvisionOutputs

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
WIDTH = 32  # FCOS heads use GroupNorm(32, C)
LEVELS = ("0", "1", "2")


class TinyBackbone(nn.Module):
    """Three conv+BN stages (strides 4, 8, 16), ``WIDTH`` channels, torchvision's backbone contract."""

    def __init__(self, *, frozen_first: bool = False) -> None:
        super().__init__()
        first_norm: nn.Module = FrozenBatchNorm2d(WIDTH) if frozen_first else nn.BatchNorm2d(WIDTH)
        self.stem = nn.Sequential(nn.Conv2d(3, WIDTH, 3, 4, 1, bias=False), first_norm, nn.ReLU())
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(WIDTH, WIDTH, 3, 2, 1, bias=False), nn.BatchNorm2d(WIDTH), nn.ReLU())
            for _ in range(2))
        self.out_channels = WIDTH

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        x = self.stem(x)
        out = OrderedDict([("0", x)])
        for name, stage in zip(LEVELS[1:], self.stages, strict=True):
            x = stage(x)
            out[name] = x
        return out


class ListBackbone(TinyBackbone):
    """The SSD flavour: per-level channel counts as a list."""

    def __init__(self) -> None:
        super().__init__()
        self.out_channels = [WIDTH] * len(LEVELS)  # type: ignore[assignment]


def _with_running_stats(model: Any, seed: int = 0) -> Any:
    """Random BN running statistics (a trained look) so the BN term is not trivially zero."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            mean, var = m.running_mean, m.running_var
            assert mean is not None and var is not None
            mean.copy_(torch.randn(mean.shape, generator=g) * 0.2)
            var.copy_(torch.rand(var.shape, generator=g) + 0.5)
    return model.eval()


def _anchors(per_location: tuple[float, ...] = (0.5, 1.0, 2.0)) -> AnchorGenerator:
    return AnchorGenerator(((16,), (32,), (64,)), (per_location,) * len(LEVELS))


def _rcnn_kwargs(num_classes: int, box_head: nn.Module | None = None) -> dict[str, object]:
    return dict(rpn_anchor_generator=_anchors(), box_roi_pool=MultiScaleRoIAlign(list(LEVELS), 7, 2),
                box_head=box_head or TwoMLPHead(WIDTH * 7 * 7, 32), box_predictor=FastRCNNPredictor(32, num_classes),
                rpn_batch_size_per_image=32, box_batch_size_per_image=16, rpn_pre_nms_top_n_train=64,
                rpn_post_nms_top_n_train=32, rpn_pre_nms_top_n_test=32, rpn_post_nms_top_n_test=8)


def faster_rcnn(num_classes: int = 4) -> Any:
    """v1 layout: MLP box head, no BN outside the backbone (first BN frozen, as torchvision's pretrained)."""
    torch.manual_seed(0)
    return _with_running_stats(FasterRCNN(TinyBackbone(frozen_first=True), **_rcnn_kwargs(num_classes)))


def faster_rcnn_v2(num_classes: int = 4) -> Any:
    """v2 layout: two-conv RPN head, conv box head with BatchNorm (run inside the loss)."""
    torch.manual_seed(0)
    box_head = FastRCNNConvFCHead((WIDTH, 7, 7), [WIDTH, WIDTH], [32], norm_layer=nn.BatchNorm2d)
    return _with_running_stats(FasterRCNN(TinyBackbone(), rpn_head=RPNHead(WIDTH, 3, conv_depth=2),
                                          **_rcnn_kwargs(num_classes, box_head)))


def mask_rcnn(num_classes: int = 4) -> Any:
    """Mask head with BatchNorm: the adapter never runs it (a box detector)."""
    torch.manual_seed(0)
    return _with_running_stats(MaskRCNN(TinyBackbone(), mask_roi_pool=MultiScaleRoIAlign(list(LEVELS), 14, 2),
                                        mask_head=MaskRCNNHeads(WIDTH, [WIDTH], 1, norm_layer=nn.BatchNorm2d),
                                        mask_predictor=MaskRCNNPredictor(WIDTH, WIDTH, num_classes),
                                        **_rcnn_kwargs(num_classes)))


def keypoint_rcnn(num_classes: int = 2) -> Any:
    torch.manual_seed(0)
    return _with_running_stats(KeypointRCNN(TinyBackbone(), keypoint_roi_pool=MultiScaleRoIAlign(list(LEVELS), 14, 2),
                                            keypoint_head=KeypointRCNNHeads(WIDTH, (WIDTH,)),
                                            keypoint_predictor=KeypointRCNNPredictor(WIDTH, 3),
                                            **_rcnn_kwargs(num_classes)))


def retinanet(num_classes: int = 3) -> Any:
    torch.manual_seed(0)
    anchors = _anchors()
    head = RetinaNetHead(WIDTH, anchors.num_anchors_per_location()[0], num_classes)
    return _with_running_stats(RetinaNet(TinyBackbone(), num_classes, anchor_generator=anchors, head=head,
                                         min_size=64, max_size=128))


def fcos(num_classes: int = 3) -> Any:
    torch.manual_seed(0)
    return _with_running_stats(FCOS(TinyBackbone(), num_classes, anchor_generator=_anchors((1.0,)),
                                    min_size=64, max_size=128))


def ssdlite(num_classes: int = 4) -> Any:
    """An SSDlite-style model: BatchNorm in the backbone and the heads, fixed size 64."""
    torch.manual_seed(0)
    boxes = DefaultBoxGenerator([[2]] * len(LEVELS), min_ratio=0.2, max_ratio=0.9)
    head = SSDLiteHead([WIDTH] * len(LEVELS), boxes.num_anchors_per_location(), num_classes, nn.BatchNorm2d)
    return _with_running_stats(SSD(ListBackbone(), boxes, (64, 64), num_classes, head=head))


FAMILIES: dict[str, Callable[..., Any]] = {
    "faster_rcnn": faster_rcnn, "faster_rcnn_v2": faster_rcnn_v2, "mask_rcnn": mask_rcnn,
    "keypoint_rcnn": keypoint_rcnn, "retinanet": retinanet, "fcos": fcos, "ssdlite": ssdlite,
}


def _targets(n: int = 2, size: int = 64) -> list[dict[str, Tensor]]:
    sampler = diode.BBoxSampler.onebox(num_classes=1, min_size=0.3, max_size=0.6)
    return sampler.sample(n, image_size=(size, size), generator=torch.Generator().manual_seed(3))


def _snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _quiet_synth(adapter: TorchvisionAdapter, **kwargs: object) -> diode.Synthesizer:
    kwargs.setdefault("stages", [diode.Stage(64, 3, lr=0.1)])
    return diode.Synthesizer(adapter, **kwargs)  # type: ignore[arg-type]


# protocol and per-family synthesis ----------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_synthesis_leaves_model_unchanged_and_is_seeded(family: str) -> None:
    model = FAMILIES[family]()
    adapter = TorchvisionAdapter(model)
    assert isinstance(adapter, diode.DetectorAdapter)
    before = _snapshot(model)
    modes = [m.training for m in model.modules()]
    grads = [p.requires_grad for p in model.parameters()]
    targets = _targets()
    first = _quiet_synth(adapter).run(targets, generator=torch.Generator().manual_seed(7))
    again = _quiet_synth(adapter).run(targets, generator=torch.Generator().manual_seed(7))
    assert first.images.shape == (2, 3, 64, 64)
    assert torch.equal(first.images, again.images)
    assert first.metrics["iterations"] == 3 and 0.0 <= (first.metrics["inversion_map50"] or 0.0) <= 1.0
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats and every parameter
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == grads


@pytest.mark.parametrize("family", list(FAMILIES))
def test_loss_decreases(family: str) -> None:
    adapter = TorchvisionAdapter(FAMILIES[family]()).freeze()
    still = diode.AugmentationPipeline(jitter=0, flip=0, brightness=0, contrast=0, erase=0)
    synth = _quiet_synth(adapter, augment=still, stages=[diode.Stage(64, 6, lr=0.05)], log_every=1)
    history = synth.run(_targets(), generator=torch.Generator().manual_seed(1)).history
    assert history[-1]["total"] < history[0]["total"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_forward_and_loss_run_bn_in_eval_and_are_differentiable(family: str) -> None:
    model = FAMILIES[family]()
    adapter = TorchvisionAdapter(model)
    before = _snapshot(model)
    modes: list[bool] = []
    handles = [m.register_forward_pre_hook(lambda m, i: modes.append(m.training)) for m in adapter.bn_layers()]
    images = torch.rand(2, 3, 64, 64, requires_grad=True)
    raw = adapter.forward(images)
    assert isinstance(raw, TorchvisionOutputs) and all(isinstance(v, Tensor) for v in raw.values())
    losses = adapter.losses(raw, _targets())
    assert losses and all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    loss = adapter.task_loss(raw, _targets())
    assert torch.allclose(loss, sum(losses.values()))  # type: ignore[arg-type]
    loss.backward()
    for h in handles:
        h.remove()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert len(modes) >= len(adapter.bn_layers()) and not any(modes)  # every BN call in eval mode
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_empty_targets_give_a_finite_loss(family: str) -> None:
    adapter = TorchvisionAdapter(FAMILIES[family]())
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    assert torch.isfinite(adapter.task_loss(adapter.forward(torch.rand(2, 3, 64, 64)), empty))


@pytest.mark.parametrize("family", ["faster_rcnn", "faster_rcnn_v2", "mask_rcnn"])
def test_rcnn_sampling_draws_from_the_generator_only(family: str) -> None:
    adapter = TorchvisionAdapter(FAMILIES[family]())
    raw = adapter.forward(torch.rand(2, 3, 64, 64))

    def loss(seed: int | None) -> Tensor:
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        return adapter.task_loss(raw, _targets(), generator=gen).detach()

    rng = torch.get_rng_state()
    assert torch.equal(loss(1), loss(1))
    assert not torch.equal(loss(1), loss(2))  # the proposal sampling follows the generator
    assert torch.equal(loss(None), loss(0))  # no generator: a fixed seed, reproducible
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is never drawn from


def test_rcnn_loss_uses_training_proposal_counts_without_changing_modes() -> None:
    model = faster_rcnn()
    adapter = TorchvisionAdapter(model)
    seen: list[int] = []
    handle = model.roi_heads.box_roi_pool.register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    raw = adapter.forward(torch.rand(1, 3, 64, 64))
    adapter.task_loss(raw, _targets(1))
    handle.remove()
    # box_batch_size_per_image=16 RoIs sampled from the RPN's 32 training-time proposals (plus the
    # ground truth); the test-time branch would pool its 8 proposals
    assert seen == [16]
    assert not any(m.training for m in model.modules())


def test_bn_layers_follow_the_first_call_order() -> None:
    model = ssdlite()
    adapter = TorchvisionAdapter(model)
    calls: list[nn.Module] = []
    bn = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    handles = [m.register_forward_hook(lambda m, i, o: calls.append(m)) for m in bn]
    adapter.task_loss(adapter.forward(torch.rand(1, 3, 64, 64)), _targets(1))
    for h in handles:
        h.remove()
    first_calls = list(dict.fromkeys(calls))
    assert adapter.bn_layers() == first_calls
    # SSDlite's head runs its regression branch first: module order would be wrong
    assert first_calls != bn


def test_bn_layers_include_loss_time_layers_and_skip_unused_heads() -> None:
    v2_model = faster_rcnn_v2()
    v2 = TorchvisionAdapter(v2_model)
    box_head_bn = [m for m in v2_model.roi_heads.box_head.modules() if isinstance(m, nn.BatchNorm2d)]
    assert v2.bn_layers()[-len(box_head_bn):] == box_head_bn  # run by task_loss, after the backbone
    mask_model = mask_rcnn()
    masked = TorchvisionAdapter(mask_model)
    mask_bn = [m for m in mask_model.roi_heads.mask_head.modules() if isinstance(m, nn.BatchNorm2d)]
    assert mask_bn and not set(mask_bn) & set(masked.bn_layers())
    frozen = TorchvisionAdapter(faster_rcnn())
    assert isinstance(frozen.bn_layers()[0], FrozenBatchNorm2d)  # FrozenBatchNorm2d counts as BatchNorm


def test_bn_term_counts_loss_time_layers() -> None:
    adapter = TorchvisionAdapter(faster_rcnn_v2())
    loss = diode.DeepInversionLoss(adapter)
    total, parts = loss(torch.rand(2, 3, 64, 64), _targets(), generator=torch.Generator().manual_seed(0))
    assert parts["bn_layers"].shape == (len(adapter.bn_layers()),) and torch.isfinite(total)


# images, sizes, predictions ---------------------------------------------------------------------------


def test_images_keep_their_size_and_are_normalised_and_padded() -> None:
    model = retinanet()
    adapter = TorchvisionAdapter(model)
    assert adapter.size_divisor == 32
    images = torch.rand(1, 3, 70, 100)
    raw = adapter.forward(images)
    assert raw.image_list.image_sizes == [(70, 100)]
    padded = raw.image_list.tensors
    assert padded.shape == (1, 3, 96, 128)
    mean = torch.tensor(model.transform.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(model.transform.image_std).view(1, 3, 1, 1)
    assert torch.allclose(padded[:, :, :70, :100], (images - mean) / std)
    assert padded[:, :, 70:].abs().sum() == 0 and padded[..., 100:].abs().sum() == 0
    before = images.clone()
    adapter.predict(images)
    assert torch.equal(images, before)
    assert TorchvisionAdapter(ssdlite()).size_divisor == 1


@pytest.mark.parametrize("family", ["retinanet", "fcos", "ssdlite"])
def test_anchors_stay_float32_under_autocast(family: str) -> None:
    adapter = TorchvisionAdapter(FAMILIES[family]())
    images = torch.rand(1, 3, 64, 96)
    exact = adapter.forward(images).anchors
    with torch.autocast("cpu", dtype=torch.bfloat16):
        raw = adapter.forward(images)
        assert raw["cls_logits"].dtype == torch.bfloat16
        assert torch.isfinite(adapter.task_loss(raw, _targets(1)))
    assert raw.anchors is not None and exact is not None
    assert all(a.dtype == torch.float32 and torch.equal(a, b) for a, b in zip(raw.anchors, exact, strict=True))


def test_bad_images_and_targets_are_refused() -> None:
    adapter = TorchvisionAdapter(fcos())
    with pytest.raises(ValueError, match="targets has 2 dicts for 1 images"):
        adapter.task_loss(adapter.forward(torch.rand(1, 3, 64, 64)), _targets(2))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        adapter.forward(torch.rand(3, 64, 64))
    with pytest.raises(ValueError, match="float"):
        adapter.forward(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_predict_thresholds_boxes_and_modes(family: str) -> None:
    model = FAMILIES[family]().train()
    model.backbone.stem[1].eval()  # a mixed-mode model: each module's own mode comes back
    modes = [m.training for m in model.modules()]
    adapter = TorchvisionAdapter(model)
    images = torch.rand(2, 3, 64, 96)
    loose = adapter.predict(images, conf=0.0, iou=0.9)
    strict = adapter.predict(images, conf=0.99, iou=0.9)
    assert [m.training for m in model.modules()] == modes
    assert len(loose) == 2
    for det in loose:
        assert det["boxes"].shape[1] == 4 and det["boxes"].dtype == torch.float32
        assert (det["boxes"][:, 0::2] <= 96).all() and (det["boxes"][:, 1::2] <= 64).all()
        assert ((det["labels"] >= 0) & (det["labels"] < adapter.num_classes)).all()
    assert sum(len(d["scores"]) for d in loose) > 0
    assert all((d["scores"] > 0.99).all() for d in strict)
    assert sum(len(d["scores"]) for d in strict) <= sum(len(d["scores"]) for d in loose)


def test_predictions_come_back_in_diode_labels() -> None:
    model = retinanet(num_classes=91)
    adapter = TorchvisionAdapter(model)
    logits = model.head.classification_head.cls_logits
    car, na = adapter.class_names.index("car"), 12  # torchvision's id 12 is an "N/A" gap
    for model_label, expect in ((adapter.label_map[car], car), (na, None)):
        with torch.no_grad():
            logits.bias.fill_(-20.0)
            logits.bias.view(-1, 91)[:, model_label] = 20.0
        dets = adapter.predict(torch.rand(1, 3, 64, 64), conf=0.5)[0]
        if expect is None:
            assert dets["labels"].numel() == 0  # a label outside the mapping is dropped
        else:
            assert dets["labels"].numel() > 0 and (dets["labels"] == expect).all()


# labels ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "offset"), [("faster_rcnn", 1), ("mask_rcnn", 1), ("keypoint_rcnn", 1),
                                                ("ssdlite", 1), ("retinanet", 0), ("fcos", 0)])
def test_default_label_map_skips_the_background(family: str, offset: int) -> None:
    model = FAMILIES[family]()
    adapter = TorchvisionAdapter(model)
    outputs = adapter.num_classes + offset
    assert adapter.label_map == tuple(range(offset, outputs))
    assert adapter.class_names == [f"class_{i}" for i in range(adapter.num_classes)]
    labels = torch.arange(adapter.num_classes)
    assert torch.equal(adapter.from_model_labels(adapter.to_model_labels(labels)), labels)
    if offset:
        assert adapter.from_model_labels(torch.tensor([0])).item() == -1  # the background is no class


@pytest.mark.parametrize("family", ["faster_rcnn", "retinanet", "ssdlite"])
def test_coco_91_label_space_maps_to_80_contiguous_classes(family: str) -> None:
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    categories = FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
    adapter = TorchvisionAdapter(FAMILIES[family](num_classes=91))
    assert adapter.num_classes == 80
    assert adapter.class_names[:3] == ["person", "bicycle", "car"] and adapter.class_names[-1] == "toothbrush"
    assert "N/A" not in adapter.class_names and "__background__" not in adapter.class_names
    assert [categories[i] for i in adapter.label_map] == adapter.class_names
    labels = torch.arange(80)
    model_labels = adapter.to_model_labels(labels)
    assert model_labels.max() == 90 and 12 not in model_labels.tolist()  # id 12 is an N/A gap
    assert torch.equal(adapter.from_model_labels(model_labels), labels)
    # onebox sampling over num_classes can only pick real classes
    drawn = diode.BBoxSampler.onebox(num_classes=adapter.num_classes).sample(
        64, image_size=(64, 64), generator=torch.Generator().manual_seed(0))
    picked = adapter.to_model_labels(torch.cat([t["labels"] for t in drawn]))
    assert all(categories[i] not in ("N/A", "__background__") for i in picked.tolist())


def test_label_map_and_class_names_arguments() -> None:
    adapter = TorchvisionAdapter(faster_rcnn(num_classes=6), label_map=[5, 2], class_names=["dog", "cat"])
    assert adapter.num_classes == 2 and adapter.class_names == ["dog", "cat"]
    assert adapter.to_model_labels(torch.tensor([0, 1])).tolist() == [5, 2]
    assert adapter.from_model_labels(torch.tensor([2, 5, 3])).tolist() == [1, 0, -1]
    named = TorchvisionAdapter(retinanet(num_classes=3), class_names=["a", "b", "c"])
    assert named.label_map == (0, 1, 2)
    with pytest.raises(ValueError, match="background"):
        TorchvisionAdapter(faster_rcnn(), label_map=[0, 1])
    with pytest.raises(ValueError, match="distinct"):
        TorchvisionAdapter(retinanet(), label_map=[1, 1])
    with pytest.raises(ValueError, match="class_names has 2 names but the model has 3 classes"):
        TorchvisionAdapter(faster_rcnn(), class_names=["a", "b"])


def test_targets_reach_the_model_in_its_label_space() -> None:
    model = ssdlite(num_classes=91)
    adapter = TorchvisionAdapter(model)
    seen: list[Tensor] = []
    original = model.compute_loss

    def spy(targets: list[dict[str, Tensor]], *args: object) -> dict[str, Tensor]:
        seen.append(targets[0]["labels"])
        return original(targets, *args)

    view = copy.copy(model)
    view.compute_loss = spy
    spied = TorchvisionAdapter(view)
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]), "labels": torch.tensor([11])}]
    spied.task_loss(spied.forward(torch.rand(1, 3, 64, 64)), targets)
    assert seen[0].tolist() == [adapter.label_map[11]] == [13]  # "stop sign": torchvision id 13


# refusals, builder, misc -------------------------------------------------------------------------------


def test_unknown_family_and_models_without_bn_are_refused() -> None:
    with pytest.raises(TypeError, match="Sequential"):
        TorchvisionAdapter(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)))
    # built on the meta device (no memory, no init cost): the refusal comes before anything runs
    with torch.device("meta"), pytest.raises(ValueError, match="ssd300_vgg16's VGG backbone.*has none"):
        TorchvisionAdapter.from_name("ssd300_vgg16", num_classes=3)


def test_from_name_builds_locally_and_loads_weights_strictly(tmp_path: Path) -> None:
    student = TorchvisionAdapter.from_name("ssdlite320_mobilenet_v3_large", num_classes=3)
    assert student.family == "ssd" and student.num_classes == 2 and student.model.training
    assert student.source == {"name": "ssdlite320_mobilenet_v3_large"}
    path = tmp_path / "ssdlite.pth"
    torch.save(student.model.state_dict(), path)
    teacher = TorchvisionAdapter.from_name("ssdlite320_mobilenet_v3_large", num_classes=3, weights=path,
                                           class_names=["a", "b"])
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.model.parameters())
    assert all(torch.equal(v, teacher.model.state_dict()[k]) for k, v in student.model.state_dict().items())
    assert teacher.class_names == ["a", "b"] and teacher.source["sha256"] and "ssdlite" in repr(teacher)
    torch.save({"model": student.model.state_dict(), "epoch": 3}, tmp_path / "checkpoint.pth")
    TorchvisionAdapter.from_name("ssdlite320_mobilenet_v3_large", num_classes=3, weights=tmp_path / "checkpoint.pth")
    # a state dict of torchvision's pretrained models (FrozenBatchNorm2d: no num_batches_tracked) loads too
    frozen_style = {k: v for k, v in student.model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(frozen_style, tmp_path / "frozen.pth")
    TorchvisionAdapter.from_name("ssdlite320_mobilenet_v3_large", num_classes=3, weights=tmp_path / "frozen.pth")
    with pytest.raises(ValueError, match="do not fit"):
        TorchvisionAdapter.from_name("ssdlite320_mobilenet_v3_large", num_classes=5, weights=path)
    with pytest.raises(ValueError, match="unknown torchvision detection builder"):
        TorchvisionAdapter.from_name("yolov3")
    with pytest.raises(TypeError, match="backbone_weights"):
        TorchvisionAdapter.from_name("ssdlite320_mobilenet_v3_large", weights_backbone="IMAGENET1K_V1")


def test_from_pretrained_reads_a_torchvision_hub_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from diode import hub

    student = TorchvisionAdapter.from_name("ssdlite320_mobilenet_v3_large", num_classes=3)
    path = tmp_path / "tiny.pth"
    torch.save(student.model.state_dict(), path)
    entry = hub.WeightsEntry(name="tiny-ssdlite", format="torchvision", arch="ssdlite320_mobilenet_v3_large",
                             file_name="tiny.pth", size=None, sha256=None, class_names=("a", "b"))
    monkeypatch.setitem(hub.REGISTRY, entry.name, entry)
    teacher = TorchvisionAdapter.from_pretrained("tiny-ssdlite", weights=path)
    assert teacher.class_names == ["a", "b"] and teacher.label_map == (1, 2)  # SSD: background at 0
    assert teacher.source["name"] == "tiny-ssdlite" and not teacher.model.training
    with pytest.raises(ValueError, match="not a torchvision detector"):
        TorchvisionAdapter.from_pretrained("yolov3-tiny")


def test_from_name_backbone_weights(tmp_path: Path) -> None:
    import torchvision

    torch.manual_seed(1)
    classifier = torchvision.models.mobilenet_v3_large()
    _with_running_stats(classifier, seed=2)
    path = tmp_path / "mobilenet_v3_large.pth"
    torch.save(classifier.state_dict(), path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = TorchvisionAdapter.from_name("fasterrcnn_mobilenet_v3_large_320_fpn", num_classes=3,
                                               backbone_weights=path)
    body: Any = adapter.model.backbone.body  # type: ignore[union-attr]
    assert torch.equal(body["0"][0].weight, classifier.features[0][0].weight)
    assert torch.equal(body["16"][1].running_var, classifier.features[16][1].running_var)
    with pytest.raises(ValueError, match="reduced-tail"):
        TorchvisionAdapter.from_name("ssdlite320_mobilenet_v3_large", num_classes=3, backbone_weights=path)


def test_device_to_and_repr() -> None:
    adapter = TorchvisionAdapter(fcos())
    assert adapter.to("cpu") is adapter and adapter.device == torch.device("cpu")
    assert adapter.freeze() is adapter and not adapter.model.training
    assert repr(adapter).startswith("TorchvisionAdapter(FCOS, family='fcos', num_classes=3")

@pytest.mark.parametrize(("family", "w_task"), [("faster_rcnn", 20.0), ("mask_rcnn", 20.0), ("retinanet", 0.5),
                                                ("fcos", 5.0), ("ssdlite", 0.5)])
def test_synthesis_defaults_set_the_task_weight_per_family(family: str, w_task: float) -> None:
    adapter = TorchvisionAdapter(FAMILIES[family]())
    assert diode.DeepInversionLoss(adapter).w_task == w_task
    assert diode.DeepInversionLoss(adapter, w_task=1.0).w_task == 1.0  # explicit arguments win
    defaults = adapter.synthesis_defaults()
    defaults["w_task"] = 0.0
    assert diode.DeepInversionLoss(adapter).w_task == w_task  # a copy: the adapter's table is not shared


def test_example_runs(tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / "torchvision_teacher.py"), "--train-steps", "2",
                           "--train-images", "4", "--val-images", "2", "--batch-size", "2", "--resolution", "64",
                           "--iterations", "2", "--num-images", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("inversion mAP50:"))
    assert 0.0 <= float(line.split(":")[1]) <= 1.0
    assert sorted(p.name for p in (out / "images").iterdir()) == ["000000.png", "000001.png"]
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"


# the real builders ---------------------------------------------------------------------------------------

BUILDERS = ["fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "fasterrcnn_mobilenet_v3_large_fpn",
            "fasterrcnn_mobilenet_v3_large_320_fpn", "maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2",
            "keypointrcnn_resnet50_fpn", "retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2",
            "fcos_resnet50_fpn", "ssdlite320_mobilenet_v3_large"]


@pytest.mark.slow
@pytest.mark.parametrize("name", BUILDERS)
def test_real_builders_synthesize_without_changing_the_model(name: str) -> None:
    small: dict[str, Any] = {"box_batch_size_per_image": 32, "rpn_batch_size_per_image": 32} if "rcnn" in name else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = TorchvisionAdapter.from_name(name, num_classes=3, **small).freeze()
    before = _snapshot(adapter.model)
    targets = _targets()
    first = _quiet_synth(adapter).run(targets, generator=torch.Generator().manual_seed(0))
    again = _quiet_synth(adapter).run(targets, generator=torch.Generator().manual_seed(0))
    assert torch.equal(first.images, again.images)
    assert all(torch.equal(before[k], v) for k, v in adapter.model.state_dict().items())
    assert len(adapter.bn_layers()) > 0


@pytest.mark.parametrize("family", ["retinanet", "faster_rcnn"])
def test_compile_targets_the_modules_forward_calls(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    compiled: list[nn.Module] = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    adapter = TorchvisionAdapter(FAMILIES[family]())
    synth = _quiet_synth(adapter, compile=True)
    copy = synth._teacher.model  # the synthesizer's private copy
    wanted = [copy.backbone] + ([] if family == "faster_rcnn" else [copy.head])
    assert compiled == wanted  # the copy's modules that forward() calls, never the caller's
    assert all(m is not adapter.model.backbone for m in compiled)
