"""The safe Ultralytics checkpoint reader, on checkpoints made here with stand-in Ultralytics classes."""

from __future__ import annotations

import builtins
import copy
import os
import sys
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from yolov8_helpers import TINY_V8, TINY_V10

from diode.models.yolov8 import blocks
from diode.models.yolov8.builder import YOLOModel
from diode.models.yolov8.checkpoint import Placeholder, load_checkpoint, load_model, read_pickle

_HOMES = {"Conv": "conv", "Concat": "conv", "Detect": "head", "v10Detect": "head"}


@pytest.fixture
def disguise(monkeypatch: pytest.MonkeyPatch):
    """Turn a diode model into one whose classes pickle as ``ultralytics.nn...`` classes, as real files do."""
    fake: dict[str, types.ModuleType] = {}
    for name in ("ultralytics", "ultralytics.nn", "ultralytics.nn.tasks", "ultralytics.nn.modules",
                 "ultralytics.nn.modules.block", "ultralytics.nn.modules.conv", "ultralytics.nn.modules.head"):
        fake[name] = types.ModuleType(name)
        monkeypatch.setitem(sys.modules, name, fake[name])

    def stand_in(cls: type, module: str) -> type:
        if not hasattr(fake[module], cls.__name__):
            setattr(fake[module], cls.__name__,
                    type(cls.__name__, (cls,), {"__module__": module, "__qualname__": cls.__name__}))
        return getattr(fake[module], cls.__name__)

    def apply(model: YOLOModel, names: object = None) -> nn.Module:
        out = copy.deepcopy(model)
        for m in out.modules():
            if type(m).__module__ == blocks.__name__:
                m.__class__ = stand_in(type(m), "ultralytics.nn.modules." + _HOMES.get(type(m).__name__, "block"))
        out.__class__ = stand_in(YOLOModel, "ultralytics.nn.tasks")
        out.yaml = copy.deepcopy(model.spec)
        out.names = names if names is not None else {i: f"c{i}" for i in range(model.num_classes)}
        out.stride = torch.tensor([float(s) for s in model.strides])
        return out

    return apply


def _seeded(spec: dict, seed: int = 0) -> YOLOModel:
    torch.manual_seed(seed)
    model = YOLOModel(spec)
    with torch.no_grad():
        for bn in model.bn_layers():
            bn.running_mean.normal_(0, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _same_outputs(a: nn.Module, b: nn.Module) -> None:
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    ra, rb = a.eval()(x), b.eval()(x)
    la = ra["one2one"] + ra["one2many"] if isinstance(ra, dict) else ra
    lb = rb["one2one"] + rb["one2many"] if isinstance(rb, dict) else rb
    for u, v in zip(la, lb, strict=True):
        torch.testing.assert_close(u, v)


def test_fp16_checkpoint_loads_strictly_as_fp32(disguise, tmp_path: Path) -> None:
    model = _seeded(TINY_V8)
    path = tmp_path / "best.pt"
    torch.save({"model": disguise(model, {0: "cat", 1: "dog", 2: "cow"}).half(), "ema": None, "epoch": 3,
                "date": "2024-01-01", "best_fitness": np.float64(0.5), "train_args": {"imgsz": 640}}, path)
    ckpt = load_checkpoint(path)
    assert ckpt.half and ckpt.source == "model" and ckpt.model_class == "ultralytics.nn.tasks.YOLOModel"
    assert ckpt.class_names == ["cat", "dog", "cow"] and ckpt.stride == (8.0, 16.0)
    assert ckpt.spec == model.spec and ckpt.meta == {"epoch": 3, "date": "2024-01-01"}
    assert all(t.dtype in (torch.float32, torch.int64) for t in ckpt.state_dict.values())
    assert set(ckpt.state_dict) == set(model.state_dict())
    assert ckpt.bn_eps["model.0.bn"] == pytest.approx(1e-3)
    loaded, _ = load_model(path)
    reference = copy.deepcopy(model).half().float()
    _same_outputs(loaded, reference)


def test_ema_weights_win_when_present_and_bn_eps_comes_from_the_file(disguise, tmp_path: Path) -> None:
    model, ema = _seeded(TINY_V10, 0), _seeded(TINY_V10, 1)
    for bn in ema.bn_layers():
        bn.eps = 1e-4
    path = tmp_path / "last.pt"
    torch.save({"model": disguise(model), "ema": disguise(ema), "updates": 10}, path)
    loaded, ckpt = load_model(path)
    assert ckpt.source == "ema" and not ckpt.half
    assert all(bn.eps == 1e-4 for bn in loaded.bn_layers())
    _same_outputs(loaded, ema)


def test_placeholders_record_without_running(disguise, tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.save({"model": disguise(_seeded(TINY_V8))}, path)
    obj = read_pickle(path)
    model = obj["model"]
    assert isinstance(model, Placeholder) and not isinstance(model, nn.Module)
    assert model.origin == "ultralytics.nn.tasks.YOLOModel"
    head = model.attr("_modules")["model"].attr("_modules")["10"]
    assert head.origin == "ultralytics.nn.modules.head.Detect" and head.attr("nc") == 3


def test_weights_that_do_not_fit_the_spec_are_named(disguise, tmp_path: Path) -> None:
    fake = disguise(_seeded(TINY_V8))
    fake.model[-1].dfl = nn.Identity()
    path = tmp_path / "missing.pt"
    torch.save({"model": fake}, path)
    with pytest.raises(ValueError, match=r"missing keys model\.10\.dfl\.conv\.weight"):
        load_model(path)
    fake = disguise(_seeded(TINY_V8))
    fake.yaml["nc"] = 5
    torch.save({"model": fake}, path)
    with pytest.raises(ValueError, match=r"shape mismatch.*model\.10\.cv3\.0\.2\.weight"):
        load_model(path)


def test_not_a_checkpoint(disguise, tmp_path: Path) -> None:
    text = tmp_path / "notes.pt"
    text.write_text("hello\n")
    with pytest.raises(ValueError, match="text file"):
        load_checkpoint(text)
    darknet = tmp_path / "yolov3-tiny.weights"
    darknet.write_bytes(np.array([0, 2, 0], dtype=np.int32).tobytes() + np.arange(64, dtype=np.float32).tobytes())
    with pytest.raises(ValueError, match="darknet"):
        load_checkpoint(darknet)
    state = tmp_path / "state.pt"
    torch.save(_seeded(TINY_V8).state_dict(), state)
    with pytest.raises(ValueError, match="plain state dict"):
        load_checkpoint(state)
    other = tmp_path / "list.pt"
    torch.save([1, 2, 3], other)
    with pytest.raises(ValueError, match="not an Ultralytics checkpoint"):
        load_checkpoint(other)
    fake = disguise(_seeded(TINY_V8))
    del fake.yaml
    torch.save({"model": fake}, other)
    with pytest.raises(ValueError, match="no architecture spec"):
        load_checkpoint(other)
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(tmp_path / "absent.pt")


class _RunsCommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Evaluates:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.eval, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.parametrize("payload", [_RunsCommand, _Evaluates])
def test_crafted_pickle_is_refused_and_does_not_run(disguise, tmp_path: Path, payload: type) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": disguise(_seeded(TINY_V8)), "extra": payload(marker)}, path)
    with pytest.raises(ValueError, match="diode does not run code from checkpoint files"):
        load_checkpoint(path)
    assert not marker.exists()


class _SavesFile:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return torch.save, ({}, str(self.marker))


def test_callables_from_model_namespaces_are_recorded_not_called(tmp_path: Path) -> None:
    marker = tmp_path / "written.pt"
    path = tmp_path / "sneaky.pt"
    torch.save({"model": _SavesFile(marker)}, path)
    obj = read_pickle(path)
    assert isinstance(obj["model"], Placeholder) and obj["model"].origin == "torch.serialization.save"
    assert not marker.exists()
    with pytest.raises(ValueError, match="no architecture spec"):
        load_checkpoint(path)


def test_storages_are_shared_and_views_kept(tmp_path: Path) -> None:
    base = torch.arange(12.0)
    path = tmp_path / "views.pt"
    torch.save(OrderedDict(a=base, b=base[2:8].view(2, 3), c=torch.tensor(5)), path)
    obj = read_pickle(path)
    assert torch.equal(obj["b"], base[2:8].view(2, 3)) and obj["c"].item() == 5
    assert obj["a"].untyped_storage().data_ptr() == obj["b"].untyped_storage().data_ptr()


class _StatefulSet:
    def __reduce__(self):
        return set, ([1, 2],), {"x": 1}


def test_state_is_set_on_placeholders_only(tmp_path: Path) -> None:
    """BUILD on a real type would run that type's state setter: refused (an OrderedDict's attributes excepted)."""
    path = tmp_path / "state.pt"
    torch.save({"model": _StatefulSet()}, path)
    with pytest.raises(ValueError, match="sets the state of a set"):
        read_pickle(path)
    state = _seeded(TINY_V8).state_dict()
    torch.save(state, path)
    assert read_pickle(path)._metadata == state._metadata
