"""Smoke test of benchmarks/toy_distill_torchvision.py: the whole pipeline on a tiny configuration."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load_script():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        path = BENCHMARKS / "toy_distill_torchvision.py"
        spec = importlib.util.spec_from_file_location("toy_distill_torchvision", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["toy_distill_torchvision"] = module
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def test_retinanet_levels_anchors_and_batchnorm():
    tv = _load_script()
    torch.manual_seed(0)
    adapter = tv.build_retinanet(2, 8, ["a", "b", "c", "d"], 64)
    assert adapter.family == "retinanet" and adapter.num_classes == 4 and adapter.size_divisor == 32
    raw = adapter.forward(torch.rand(2, 3, 64, 64))
    assert raw.level_sizes == [8 * 8, 4 * 4, 2 * 2]  # strides 8, 16, 32
    assert raw["cls_logits"].shape == (2, 2 * 84, 4)  # two anchors per location
    widths = raw.anchors[0][:, 2] - raw.anchors[0][:, 0]
    wanted = [a * 64 for a in tv.toy.ANCHOR_FRACTIONS]  # torchvision rounds anchor corners to pixels
    assert len(set(widths.tolist())) == 6 and all(min(abs(w - x) for x in wanted) <= 1 for w in widths.tolist())
    assert len(adapter.bn_layers()) == 9 + 6 + 8  # backbone convs, FPN inner and layer blocks, two head towers
    with pytest.raises(ValueError, match="width"):
        tv.TorchvisionToyConfig(width=0)


def test_smoke_run_writes_results(tmp_path):
    tv = _load_script()
    threads = torch.get_num_threads()
    try:
        results = tv.main(["--out", str(tmp_path), "--smoke", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)

    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert set(on_disk["map50"]) == set(tv.SOURCES)
    assert all(0.0 <= v <= 1.0 for v in on_disk["map50"].values())
    assert set(on_disk["cross_family"]) == set(tv.CROSS)
    assert {r["mode"] for r in on_disk["cross_family"].values()} == {"pseudo_labels"}
    assert on_disk["cross_family"]["yolo_to_retinanet"]["data"] == "yolo_diode"
    assert set(on_disk["inversion_map50"]) == {"diode", "yolo_diode"}
    defaults = tv.diode.DeepInversionLoss(tv.build_retinanet(2, 8, ["a", "b", "c", "d"], 64)).options()
    assert on_disk["synthesis_loss"] == json.loads(json.dumps(defaults))  # the teacher's, not the YOLO benchmark's
    assert on_disk["goal"]["best_diode"] in tv.DIODE_SOURCES
    assert on_disk["seconds"]["total"] > 0 and on_disk["cpu_seconds"]["total"] > 0
    assert on_disk["config"]["base"]["images"] == tv.SMOKE.base.images

    table = (tmp_path / "results.md").read_text()
    assert table.count("\n|") >= 9 and "reverse: YOLO teacher" in table
    with Image.open(tmp_path / "results.png") as plot:
        assert plot.format == "PNG" and plot.size == (800, 360)
    for name in tv.SOURCES:
        assert (tmp_path / "previews" / f"{name}.png").is_file()
    for name in (*tv.SOURCES, "yolo_diode"):
        assert len(list((tmp_path / "data" / name).rglob("*.png"))) >= tv.SMOKE.base.images
    assert (tmp_path / "teacher_retinanet.pt").is_file() and (tmp_path / "teacher_yolo.pt").is_file()
