from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY_YOLO_CFG, make_tiny_yolo

from diode.cli import main
from diode.models.yolo import save_darknet_weights


@pytest.fixture
def tiny_teacher(tmp_path: Path) -> list[str]:
    cfg, weights, names = tmp_path / "tiny.cfg", tmp_path / "tiny.weights", tmp_path / "tiny.names"
    cfg.write_text(TINY_YOLO_CFG)
    save_darknet_weights(make_tiny_yolo().model, weights)
    names.write_text("circle\nsquare\ntriangle\n")
    return ["--cfg", str(cfg), "--weights", str(weights), "--names", str(names)]


def _synthesize(out: Path, teacher: list[str], *extra: str) -> int:
    return main(["synthesize", *teacher, "--out", str(out), "--num-images", "4", "--batch-size", "2",
                 "--resolution", "64", "--iterations", "3", "--device", "cpu", "--quiet", *extra])


def test_weights_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["weights", "list"]) == 0
    out = capsys.readouterr().out
    assert "yolov3-tiny" in out and "dccea06f59b781ec" in out and "yolov3-spp" in out


def test_synthesize_writes_resumes_and_summarises(tmp_path: Path, tiny_teacher: list[str],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert _synthesize(out, tiny_teacher) == 0
    printed = capsys.readouterr().out
    assert "wrote 4 images" in printed and "inversion mAP50" in printed and "seconds per iteration" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["class_names"] == ["circle", "square", "triangle"]
    assert manifest["config"]["teacher"]["sha256"]
    stamp = (out / "images" / "000000.png").stat().st_mtime_ns
    assert _synthesize(out, tiny_teacher) == 0
    assert (out / "images" / "000000.png").stat().st_mtime_ns == stamp
    assert _synthesize(out, tiny_teacher, "--seed", "1") == 2
    assert "different configuration" in capsys.readouterr().err


def test_synthesize_with_stages_file_sampler_and_fp(tmp_path: Path, tiny_teacher: list[str]) -> None:
    stages = tmp_path / "stages.toml"
    stages.write_text("[[stage]]\nresolution = 32\niterations = 2\nlr = 0.1\n\n"
                      "[[stage]]\nresolution = 64\niterations = 2\nlr = 0.01\nfp_sampling = false\n"
                      "[stage.augment]\njitter = 4\n[stage.loss]\nfirst_bn_weight = 0.0\n")
    out = tmp_path / "run"
    assert _synthesize(out, tiny_teacher, "--stages", str(stages), "--sampler", "tiles:2", "--fp-sampling",
                       "--fp-warmup", "0", "--fp-every", "1") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["resolution"] for s in manifest["config"]["synthesizer"]["stages"]] == [[32, 32], [64, 64]]
    assert manifest["config"]["sampler"].startswith("BBoxSampler.tiles")
    assert manifest["batches"]["0"]["height"] == 64


def test_bad_arguments_fail_clearly(tmp_path: Path, tiny_teacher: list[str],
                                    capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit, match="--sampler"):
        _synthesize(tmp_path / "a", tiny_teacher, "--sampler", "grid")
    with pytest.raises(SystemExit, match="--teacher SPEC .*, or --cfg CFG and --weights"):
        main(["synthesize", "--out", str(tmp_path / "b"), "--num-images", "1", "--batch-size", "1"])
    bad = tmp_path / "bad.toml"
    bad.write_text("[[stage]]\nresolution = 64\niterations = 0\n")
    with pytest.raises(SystemExit, match="stage 1"):
        _synthesize(tmp_path / "c", tiny_teacher, "--stages", str(bad))
    assert main(["synthesize", "--teacher", "nope", "--out", str(tmp_path / "d"), "--num-images", "1",
                 "--batch-size", "1"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err


def test_show_evaluate_and_distill_on_a_synthesized_run(tmp_path: Path, tiny_teacher: list[str],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert _synthesize(run, tiny_teacher) == 0
    assert main(["show", str(run), "--out", str(tmp_path / "sheet.png")]) == 0
    assert (tmp_path / "sheet.png").stat().st_size > 0
    assert main(["evaluate", "--model", "", *tiny_teacher, "--data", str(run), "--size", "64",
                 "--device", "cpu", "--json", str(tmp_path / "eval.json")]) == 0
    assert "mAP50" in capsys.readouterr().out
    assert 0.0 <= json.loads((tmp_path / "eval.json").read_text())["map50"] <= 1.0
    student = tmp_path / "student"
    assert main(["distill", *tiny_teacher, "--student", tiny_teacher[1], "--data", str(run), "--out",
                 str(student), "--epochs", "1", "--batch-size", "2", "--image-size", "64", "--device", "cpu",
                 "--quiet"]) == 0
    assert {"last.pt", "student.pt", "student.weights"} <= {p.name for p in student.iterdir()}
    assert main(["evaluate", "--model", "", "--cfg", tiny_teacher[1], "--weights", str(student / "student.pt"),
                 "--data", str(run), "--size", "64", "--device", "cpu"]) == 0


@pytest.mark.slow
def test_detect_real_photo(real_weights: Path, real_images: Path, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["detect", "--teacher", "yolov3-tiny", "--weights", str(real_weights),
                 str(real_images / "dog.jpg"), "--out", str(tmp_path), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "dog" in out and "bicycle" in out and ("car" in out or "truck" in out)
    assert (tmp_path / "dog.png").exists()


@pytest.mark.slow
def test_real_teacher_detects_its_synthesized_labels(real_weights: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert main(["synthesize", "--teacher", "yolov3-tiny", "--weights", str(real_weights), "--out", str(run),
                 "--num-images", "4", "--batch-size", "4", "--resolution", "160", "--iterations", "200",
                 "--device", "cpu", "--quiet"]) == 0
    # default --size keeps the synthesized 160 px (upscaled to 416 the teacher finds few of its objects)
    assert main(["evaluate", "--model", "yolov3-tiny", "--weights", str(real_weights), "--data", str(run),
                 "--device", "cpu", "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["map50"] >= 0.5


@pytest.mark.slow
def test_torchrun_two_processes_write_the_same_dataset(tmp_path: Path, tiny_teacher: list[str]) -> None:
    import os
    import subprocess
    import sys

    args = ["-m", "diode", "synthesize", *tiny_teacher, "--num-images", "6", "--batch-size", "2", "--resolution",
            "64", "--iterations", "3", "--device", "cpu", "--quiet", "--out"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same thread count: same float reduction order
    single, multi = tmp_path / "single", tmp_path / "multi"
    torchrun = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
    for cmd in ([*args, str(single)], [*torchrun, *args, str(multi)]):
        proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((multi / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    for sub in ("images", "labels"):
        names = sorted(p.name for p in (single / sub).iterdir())
        assert names == sorted(p.name for p in (multi / sub).iterdir()) and len(names) == 6
        for name in names:
            assert (single / sub / name).read_bytes() == (multi / sub / name).read_bytes(), name
