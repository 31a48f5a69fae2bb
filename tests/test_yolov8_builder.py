from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from yolov8_helpers import TINY_11, TINY_V8, TINY_V10

from diode.models.yolov8 import blocks
from diode.models.yolov8.builder import (
    YOLOModel,
    bundled_specs,
    load_spec,
    make_divisible,
    resolve_scale,
)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "params", "bn"),
    [
        # The family publishes 3.2M (v8n), 2.3M (v10n, its one-to-one inference branch only) and 2.6M
        # (11n); these are the exact counts of the whole model, both v10 branches included.
        ("yolov8n", 3_157_200, 57),
        ("yolov10n", 2_775_520, 95),
        ("yolo11n", 2_624_080, 81),
    ],
)
def test_bundled_specs_have_the_family_parameter_counts(name: str, params: int, bn: int) -> None:
    model = YOLOModel(name)
    assert _params(model) == params
    assert len(model.bn_layers()) == bn
    assert model.strides == (8, 16, 32) and model.num_classes == 80


@pytest.mark.slow
@pytest.mark.parametrize(("name", "params"), [("yolov8s", 11_166_560), ("yolov10s", 8_128_272),
                                              ("yolo11s", 9_458_752)])
def test_bundled_s_specs(name: str, params: int) -> None:
    assert _params(YOLOModel(name)) == params


def test_v10n_one_to_one_inference_branch_is_the_published_size() -> None:
    model = YOLOModel("yolov10n")
    one2many = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("model.23.cv2.", "model.23.cv3.")))
    assert round((_params(model) - one2many) / 1e6, 1) == 2.3


def test_bundled_specs_list_and_load() -> None:
    assert set(bundled_specs()) == {"yolov8n", "yolov8s", "yolov10n", "yolov10s", "yolo11n", "yolo11s"}
    spec = load_spec("yolov10s")
    assert spec["scale"] == "s" and spec["head"][-1][2] == "v10Detect"
    spec["nc"] = 1
    assert load_spec("yolov10s")["nc"] == 80  # a fresh copy each time


def test_load_spec_errors_and_json_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bundled name"):
        load_spec("yolov99z")
    with pytest.raises(ValueError, match="backbone"):
        load_spec({"nc": 3})
    bad = tmp_path / "spec.yaml"
    bad.write_text("nc: 3\n")
    with pytest.raises(ValueError, match="not JSON"):
        load_spec(bad)
    good = tmp_path / "spec.json"
    good.write_text(json.dumps(TINY_V8))
    assert load_spec(good) == TINY_V8


def test_spec_given_as_a_dict_is_not_changed() -> None:
    spec = copy.deepcopy(TINY_V10)
    YOLOModel(spec, num_classes=7)
    assert spec == TINY_V10


def test_unknown_block_names_the_block_and_layer() -> None:
    spec = copy.deepcopy(TINY_V8)
    spec["backbone"][3] = [-1, 1, "FancyConv", [256, 3, 2]]
    with pytest.raises(ValueError, match=r"layer 3: unknown block 'FancyConv'"):
        YOLOModel(spec)


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        ([-1, 1, "Conv"], "layer 2: expected"),
        ([5, 1, "Conv", [8]], "layer 2: 'from' refers to layer 5"),
        ([-1, 1, 7, [8]], "block name must be a string"),
        ([-1, 1, "Conv", [8, 3, 2, 1, 1, 1, 1, 1, 1]], r"layer 2 \(Conv"),
    ],
)
def test_bad_layers_are_named(layer: list, message: str) -> None:
    spec = copy.deepcopy(TINY_V8)
    spec["backbone"][2] = layer
    with pytest.raises(ValueError, match=message):
        YOLOModel(spec)


def test_spec_must_end_with_a_head_and_have_classes() -> None:
    spec = copy.deepcopy(TINY_V8)
    spec["head"] = spec["head"][:-1]
    with pytest.raises(ValueError, match="detection head"):
        YOLOModel(spec)
    with pytest.raises(ValueError, match="num_classes"):
        YOLOModel(TINY_V8, num_classes=0)
    with pytest.raises(ValueError, match="scale 'q'"):
        YOLOModel(TINY_V10, scale="q")


def test_scaling_rules() -> None:
    assert make_divisible(64 * 0.25) == 16 and make_divisible(20.1) == 24
    assert resolve_scale({"depth_multiple": 0.33, "width_multiple": 0.5}) == (None, 0.33, 0.5, float("inf"))
    scales = {"n": [0.33, 0.25, 1024], "s": [0.33, 0.5, 1024]}
    assert resolve_scale({"scales": scales, "yaml_file": "yolov8s.yaml"})[0] == "s"
    assert resolve_scale({"scales": scales, "scale": "s"}, "n")[0] == "n"
    assert resolve_scale({"scales": scales})[0] == "n"
    model = YOLOModel("yolov8n")
    # repeats: 3 -> round(3 * 0.33) = 1, 6 -> 2; widths: 64 * 0.25 = 16, 1024 capped then scaled = 256
    assert len(model.model[2].m) == 1 and len(model.model[4].m) == 2
    assert model.model[0].conv.out_channels == 16 and model.model[9].cv2.conv.out_channels == 256
    capped = load_spec("yolov8n")
    capped["scales"]["n"] = [0.33, 0.25, 512]
    assert YOLOModel(capped).model[9].cv2.conv.out_channels == 128


def test_c3k2_uses_c3k_at_large_scales() -> None:
    spec = load_spec("yolo11n")
    spec["scales"] = {"n": [0.5, 0.25, 1024], "m": [0.5, 0.25, 1024]}
    assert isinstance(YOLOModel(spec, scale="n").model[2].m[0], blocks.Bottleneck)
    assert isinstance(YOLOModel(spec, scale="m").model[2].m[0], blocks.C3k)


def test_repeats_of_plain_blocks_stack_copies() -> None:
    spec = copy.deepcopy(TINY_V8)
    spec["depth_multiple"] = 1.0
    spec["backbone"][1] = [-1, 2, "Conv", [128, 3, 1]]
    model = YOLOModel(spec)
    assert isinstance(model.model[1], nn.Sequential) and len(model.model[1]) == 2
    assert "model.1.1.conv.weight" in model.state_dict()


@pytest.mark.parametrize("spec", [TINY_V8, TINY_V10, TINY_11], ids=["v8", "v10", "11"])
def test_tiny_models_forward_raw_layout(spec: dict) -> None:
    model = YOLOModel(spec).eval()
    x = torch.rand(2, 3, 64, 96)
    raw = model(x)
    levels = raw["one2many"] if isinstance(raw, dict) else raw
    no = 64 + spec["nc"]
    assert [t.shape for t in levels] == [(2, no, 8, 12), (2, no, 4, 6)]
    assert model.strides == (8, 16) and model.max_stride == 16 and model.reg_max == 16
    assert model.end2end == isinstance(raw, dict)
    if isinstance(raw, dict):
        assert [t.shape for t in raw["one2one"]] == [t.shape for t in levels]


def test_checkpoint_style_names() -> None:
    keys = YOLOModel("yolov8n").state_dict()
    assert "model.0.conv.weight" in keys and "model.22.cv2.0.0.conv.weight" in keys
    assert "model.22.dfl.conv.weight" in keys and "model.2.m.0.cv1.bn.running_var" in keys
    v10 = YOLOModel("yolov10n").state_dict()
    assert "model.23.one2one_cv3.2.1.1.conv.weight" in v10 and "model.22.m.0.cv1.2.conv1.conv.weight" in v10


def test_bn_layers_in_call_order() -> None:
    """C2f registers cv2 before its bottlenecks but calls it after them."""
    model = YOLOModel(TINY_V8)
    names = {id(m): n for n, m in model.named_modules()}
    order = [names[id(bn)] for bn in model.bn_layers()]
    assert order[0] == "model.0.bn"
    assert order.index("model.2.m.0.cv1.bn") < order.index("model.2.cv2.bn")
    assert len(order) == len([m for m in model.modules() if isinstance(m, nn.BatchNorm2d)])


def test_new_model_has_the_family_init_and_is_deterministic_under_a_seed() -> None:
    torch.manual_seed(0)
    a = YOLOModel(TINY_V8)
    torch.manual_seed(0)
    b = YOLOModel(TINY_V8)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    assert all(bn.eps == 1e-3 and bn.momentum == 0.03 for bn in a.bn_layers())
    assert torch.all(a.head.cv2[0][-1].bias == 1.0)
    assert all(bn.num_batches_tracked == 0 for bn in a.bn_layers())  # the stride probe runs in eval mode
    assert a.training


def test_width_equal_to_nc_is_left_unscaled() -> None:
    """The family skips scaling a width equal to nc; checkpoints trained so depend on it."""
    spec = copy.deepcopy(TINY_V8)
    spec["nc"] = 64
    assert YOLOModel(spec).model[0].conv.out_channels == 64
