from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from diode.models.yolo import (
    ULTRALYTICS_BN_EPS,
    Darknet,
    load_darknet_weights,
    load_ultralytics_checkpoint,
    read_darknet_header,
    save_darknet_weights,
)

# Two BN convs, a maxpool, then a biased head conv: 3->8 (216 + 4*8), 8->8 1x1 (64 + 4*8),
# 8->14 1x1 head (112 + 14) = 470 floats.
CFG = """[net]
width=32
height=32
channels=3

[convolutional]
batch_normalize=1
filters=8
size=3
stride=2
pad=1
activation=leaky

[maxpool]
size=2
stride=2

[convolutional]
batch_normalize=1
filters=8
size=1
stride=1
pad=1
activation=leaky

[convolutional]
size=1
stride=1
pad=1
filters=14
activation=linear

[yolo]
mask=0,1
anchors=4,6, 10,12
classes=2
"""
FLOATS = 470


def _random_model(seed: int = 0) -> Darknet:
    """A model whose every tensor (incl. BN running stats) is random, so order mix-ups show."""
    g = torch.Generator().manual_seed(seed)
    model = Darknet(CFG)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
    return model


def _assert_same_state(a: Darknet, b: Darknet) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize(
    ("version", "seen", "header"), [((0, 2, 0), 2**40 + 7, 20), ((0, 1, 0), 12345, 16)]
)
def test_round_trip(tmp_path: Path, version: tuple[int, int, int], seen: int, header: int):
    src = _random_model()
    path = tmp_path / "m.weights"
    save_darknet_weights(src, path, version=version, seen=seen)
    assert path.stat().st_size == header + 4 * FLOATS
    assert read_darknet_header(path) == (*version, seen)
    dst = Darknet(CFG)
    load_darknet_weights(dst, path)
    _assert_same_state(src, dst)
    assert os.listdir(tmp_path) == ["m.weights"]  # no temp file left behind


def test_darknet_value_order(tmp_path: Path):
    """A file written by hand in darknet's order lands in the right tensors."""
    values = np.arange(FLOATS, dtype="<f4")
    path = tmp_path / "hand.weights"
    path.write_bytes(
        np.array([0, 2, 5], "<i4").tobytes() + np.array([9], "<i8").tobytes() + values.tobytes()
    )
    model = Darknet(CFG)
    load_darknet_weights(model, path)
    (c0, bn0), (c1, bn1), (c2, bn2) = model.conv_layers()
    assert bn0 is not None and bn1 is not None and bn2 is None
    assert bn0.bias.tolist() == list(range(0, 8))  # beta first
    assert bn0.weight.tolist() == list(range(8, 16))  # then gamma
    assert bn0.running_mean.tolist() == list(range(16, 24))
    assert bn0.running_var.tolist() == list(range(24, 32))
    assert c0.weight.flatten().tolist() == list(range(32, 248))  # OIHW
    assert c0.weight[1, 0, 0, 0].item() == 32 + 27
    assert bn1.bias[0].item() == 248 and c1.weight[0, 0, 0, 0].item() == 248 + 32
    assert c2.bias is not None and c2.bias.tolist() == list(
        range(344, 358)
    )  # no BN: bias, then weights
    assert c2.weight.flatten().tolist() == list(range(358, 470))


@pytest.mark.parametrize("delta", [-4, 4, -1])
def test_wrong_size_is_refused(tmp_path: Path, delta: int):
    path = tmp_path / "bad.weights"
    save_darknet_weights(_random_model(), path)
    data = path.read_bytes()
    path.write_bytes(data[:delta] if delta < 0 else data + b"\0" * delta)
    found, needed = 20 + 4 * FLOATS + delta, 20 + 4 * FLOATS
    with pytest.raises(
        ValueError,
        match=f"bad.weights has {found:,} bytes but cfg '<cfg text>' with 2 classes "
        f"needs exactly {needed:,}: wrong cfg or class count",
    ):
        load_darknet_weights(Darknet(CFG), path)


def test_wrong_class_count_is_refused(tmp_path: Path):
    path = tmp_path / "m.weights"
    save_darknet_weights(_random_model(), path)
    with pytest.raises(ValueError, match="with 3 classes needs"):
        load_darknet_weights(Darknet(CFG, num_classes=3), path)


def test_cutoff_loads_a_prefix(tmp_path: Path):
    src = _random_model(1)
    full = tmp_path / "full.weights"
    save_darknet_weights(src, full)
    partial = tmp_path / "partial.weights"
    partial.write_bytes(full.read_bytes()[: 20 + 4 * 248])  # layer 0 only, like darknet's `partial`
    for path in (full, partial):
        dst = Darknet(CFG)
        untouched = dst.module_list[2].Conv2d.weight.clone()
        load_darknet_weights(dst, path, cutoff=2)
        assert torch.equal(dst.module_list[0].Conv2d.weight, src.module_list[0].Conv2d.weight)
        assert torch.equal(
            dst.module_list[0].BatchNorm2d.running_var, src.module_list[0].BatchNorm2d.running_var
        )
        assert torch.equal(dst.module_list[2].Conv2d.weight, untouched)
    with pytest.raises(ValueError, match="needs at least"):
        load_darknet_weights(Darknet(CFG), partial, cutoff=3)
    with pytest.raises(ValueError, match="cutoff"):
        load_darknet_weights(Darknet(CFG), full, cutoff=9)


def test_header_errors(tmp_path: Path):
    path = tmp_path / "short.weights"
    path.write_bytes(np.array([0, 2, 0, 1], "<i4").tobytes())
    with pytest.raises(ValueError, match="too short"):
        read_darknet_header(path)
    with pytest.raises(ValueError, match="version"):
        save_darknet_weights(Darknet(CFG), tmp_path / "x.weights", version=(0, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seen"):
        save_darknet_weights(Darknet(CFG), tmp_path / "x.weights", version=(0, 1, 0), seen=2**31)


def _ultralytics_state(model: Darknet) -> dict[str, torch.Tensor]:
    """The Ultralytics archive key layout, written out independently of ``state_dict()``."""
    state: dict[str, torch.Tensor] = {}
    for i, d in enumerate(model.module_defs):
        if d["type"] != "convolutional":
            continue
        block = model.module_list[i]
        state[f"module_list.{i}.Conv2d.weight"] = block.Conv2d.weight.detach().clone()
        if d.get("batch_normalize"):
            bn = block.BatchNorm2d
            for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                state[f"module_list.{i}.BatchNorm2d.{name}"] = getattr(bn, name).detach().clone()
        else:
            state[f"module_list.{i}.Conv2d.bias"] = block.Conv2d.bias.detach().clone()
    return state


def test_ultralytics_checkpoint(tmp_path: Path):
    src = _random_model(2)
    path = tmp_path / "last.pt"
    torch.save({"epoch": 3, "model": _ultralytics_state(src), "optimizer": None}, path)
    dst = Darknet(CFG)
    load_ultralytics_checkpoint(dst, path)
    _assert_same_state(src, dst)
    assert all(bn.eps == ULTRALYTICS_BN_EPS == 1e-4 for bn in dst.bn_layers())

    bare = Darknet(CFG)  # a bare state dict, without num_batches_tracked (older PyTorch)
    state = {
        k: v for k, v in _ultralytics_state(src).items() if not k.endswith("num_batches_tracked")
    }
    load_ultralytics_checkpoint(bare, state)
    _assert_same_state(src, bare)


def test_ultralytics_checkpoint_key_errors():
    state = _ultralytics_state(_random_model())
    renamed = dict(state)
    renamed["module_list.0.conv.weight"] = renamed.pop("module_list.0.Conv2d.weight")
    with pytest.raises(
        ValueError,
        match=r"missing \(1\): module_list.0.Conv2d.weight; unexpected \(1\): "
        r"module_list.0.conv.weight",
    ):
        load_ultralytics_checkpoint(Darknet(CFG), {"model": renamed})
    with pytest.raises(
        ValueError,
        match=r"shape mismatch \(2\): module_list.3.Conv2d.weight \(14, 8, 1, 1\) "
        r"vs \(16, 8, 1, 1\)",
    ):
        load_ultralytics_checkpoint(Darknet(CFG, num_classes=3), state)
    with pytest.raises(TypeError, match="checkpoint"):
        load_ultralytics_checkpoint(Darknet(CFG), [1, 2])  # type: ignore[arg-type]


def test_ultralytics_checkpoint_with_numpy_metadata(tmp_path: Path):
    src = _random_model(4)
    path = tmp_path / "best.pt"
    torch.save({"epoch": 9, "best_fitness": np.float64(0.42), "fitness_curve": np.array([0.1, 0.4]),
                "training_results": "   9/272 ...", "model": _ultralytics_state(src), "optimizer": None}, path)
    dst = Darknet(CFG)
    load_ultralytics_checkpoint(dst, path)
    _assert_same_state(src, dst)


class _RunsCode:
    """Unpickling this calls ``open(marker, "w")``: a stand-in for any code a crafted file runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_crafted_checkpoint_runs_no_code(tmp_path: Path):
    marker = tmp_path / "ran"
    path = tmp_path / "crafted.pt"
    torch.save({"model": _ultralytics_state(_random_model()), "payload": _RunsCode(marker)}, path)
    with pytest.raises(ValueError, match="cannot be read safely.*weights_only=True"):
        load_ultralytics_checkpoint(Darknet(CFG), path)
    assert not marker.exists()


def test_files_that_are_not_checkpoints_or_weights(tmp_path: Path):
    text = tmp_path / "notes.weights"
    text.write_text("these are my notes, not weights\n" * 3)
    with pytest.raises(ValueError, match="not a darknet .weights file.*starts with text: 'these are my notes"):
        load_darknet_weights(Darknet(CFG), text)
    with pytest.raises(ValueError, match="is not a PyTorch checkpoint"):
        load_ultralytics_checkpoint(Darknet(CFG), text)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_ultralytics_checkpoint(Darknet(CFG), tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_darknet_weights(Darknet(CFG), tmp_path / "missing.weights")


def test_garbage_batchnorm_statistics_give_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    good = tmp_path / "good.weights"
    save_darknet_weights(_random_model(), good)
    with caplog.at_level("WARNING", logger="diode"):
        load_darknet_weights(Darknet(CFG), good)
    assert not caplog.records
    garbage = tmp_path / "garbage.weights"
    values = np.random.default_rng(0).normal(size=FLOATS).astype("<f4")  # right size, wrong contents
    garbage.write_bytes(np.array([0, 2, 0], "<i4").tobytes() + np.array([0], "<i8").tobytes() + values.tobytes())
    with caplog.at_level("WARNING", logger="diode"):
        load_darknet_weights(Darknet(CFG), garbage)
    assert "2 of 2 BatchNorm layers have non-positive or non-finite running variances" in caplog.text


@pytest.mark.slow
def test_real_yolov3_tiny_weights(real_weights: Path):
    assert read_darknet_header(real_weights)[:3] == (0, 2, 0)
    model = Darknet("yolov3-tiny")
    load_darknet_weights(model, real_weights)
    first = model.bn_layers()[0]
    assert torch.all(first.running_var > 0) and first.weight.abs().sum() > 0
    with torch.no_grad():
        heads = model.eval()(torch.full((1, 3, 416, 416), 0.5))
    assert all(torch.isfinite(h).all() for h in heads)
    with pytest.raises(
        ValueError, match="has 35,434,956 bytes .* with 20 classes needs exactly 34,880,556"
    ):
        load_darknet_weights(Darknet("yolov3-tiny", num_classes=20), real_weights)
