from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
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
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"wrote 4 images to {out} (complete)")
    assert printed[1].startswith("teacher mAP50 ")
    assert "on the 4 saved images (what `diode evaluate` reports" in printed[1]
    assert printed[2].startswith("inversion mAP50 during synthesis: mean ") and "over 2 batches" in printed[2]
    assert printed[3].startswith("seconds per iteration")
    assert (out / "log.txt").read_text().splitlines()[-4:] == printed  # the summary is in the log too
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


def test_every_input_error_is_one_line_with_status_2(tmp_path: Path, tiny_teacher: list[str],
                                                     capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    cfg, weights = tiny_teacher[1], tiny_teacher[3]
    run = tmp_path / "run"
    assert _synthesize(run, tiny_teacher, "--iterations", "2") == 0
    capsys.readouterr()
    notes = tmp_path / "notes.weights"
    notes.write_text("these are my notes, not weights\n")
    garbage_pt = tmp_path / "garbage.pt"
    garbage_pt.write_text("not a checkpoint\n")
    a_file = tmp_path / "a_file.png"
    a_file.write_bytes(b"x")
    not_an_image = tmp_path / "broken.jpg"
    not_an_image.write_text("text")
    empty = tmp_path / "empty"
    empty.mkdir()
    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    (tmp_path / "photo.png").write_bytes((run / "images" / "000000.png").read_bytes())
    (unlabelled / "photo.png").write_bytes((run / "images" / "000000.png").read_bytes())
    bad_stages = tmp_path / "bad.toml"
    bad_stages.write_text("[[stage]]\nresolution = 64\niterations = 0\n")
    syn = ["synthesize", "--out", str(tmp_path / "new"), "--num-images", "2", "--batch-size", "2",
           "--device", "cpu"]
    cases: list[tuple[list[str], str]] = [
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["synthesize", "--num-images", "1"], "the following arguments are required: --out, --batch-size"),
        ([*syn, "--num-images", "x"], "--num-images: invalid int value: 'x'"),
        (syn, "give --teacher SPEC"),
        ([*syn, "--teacher", "nope"], "unknown model 'nope'"),
        ([*syn, *tiny_teacher, "--device", "cuda"], "CUDA is not available"),
        ([*syn, *tiny_teacher, "--device", "gpu0"], "--device 'gpu0' is not a device"),
        ([*syn, *tiny_teacher, "--sampler", "grid"], "--sampler must be onebox"),
        ([*syn, *tiny_teacher, "--stages", str(tmp_path / "missing.toml")], "cannot read stages file"),
        ([*syn, *tiny_teacher, "--stages", str(bad_stages)], "stage 1"),
        ([*syn, "--cfg", cfg, "--weights", str(notes)], "not a darknet .weights file"),
        ([*syn, "--cfg", cfg, "--weights", str(garbage_pt)], "garbage.pt"),
        ([*syn, "--cfg", cfg, "--weights", str(tmp_path / "missing.weights")], "does not exist"),
        ([*syn, "--cfg", str(tmp_path / "missing.cfg"), "--weights", weights], "missing.cfg"),
        ([*syn[:2], str(a_file), *syn[3:], *tiny_teacher], "is a file"),
        ([*syn, *tiny_teacher, "--num-images", "0"], "--num-images must be >= 1"),
        ([*syn, *tiny_teacher, "--log-every", "0"], "--log-every must be >= 1"),
        (["synthesize", *tiny_teacher, "--out", str(run), "--num-images", "4", "--batch-size", "2",
          "--resolution", "64", "--iterations", "4", "--device", "cpu"],
         "synthesizer.stages[1].iterations: 1 -> 2)"),
        (["detect", *tiny_teacher, str(tmp_path / "photo.png"), "--out", str(a_file)], "--out"),
        (["detect", *tiny_teacher, str(tmp_path / "nope.jpg")], "image"),
        (["detect", *tiny_teacher, str(tmp_path / "*.gif")], "no files match"),
        (["detect", *tiny_teacher, str(empty)], "has no images"),
        (["detect", *tiny_teacher, str(not_an_image), "--device", "cpu"], "cannot read image"),
        (["show", str(tmp_path / "nowhere")], "does not exist"),
        (["show", str(run), "--num", "0"], "--num must be >= 1"),
        (["show", str(run), "--detections"], "give --teacher SPEC"),
        (["evaluate", "--model", "", *tiny_teacher, "--data", str(unlabelled), "--device", "cpu"], "no labels"),
        (["evaluate", "--model", "", *tiny_teacher, "--data", str(tmp_path / "nowhere"), "--device", "cpu"],
         "does not exist"),
        (["weights", "fetch"], "needs a NAME"),
    ]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv, expected in cases:
        code = main(argv)
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert code == 2, (argv, captured.err)
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (argv, captured.err)
        assert "Traceback" not in captured.err and captured.out == "", argv


def test_argument_errors_exit_2_from_the_shell(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "diode", "synthesize", "--num-images", "x"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "error: argument --num-images: invalid int value: 'x' (see `diode synthesize --help`)"]


def test_show_evaluate_and_distill_on_a_synthesized_run(tmp_path: Path, tiny_teacher: list[str],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert _synthesize(run, tiny_teacher) == 0
    assert main(["show", str(run), "--out", str(tmp_path / "sheet.png")]) == 0
    assert (tmp_path / "sheet.png").stat().st_size > 0
    capsys.readouterr()
    assert main(["-vv", "evaluate", "--model", "", *tiny_teacher, "--data", str(run), "--size", "64",
                 "--device", "cpu", "--json", str(tmp_path / "eval.json")]) == 0
    captured = capsys.readouterr()
    assert "Average Precision" not in captured.out + captured.err  # no COCO table, even with -vv
    lines = captured.out.splitlines()
    assert lines[0].startswith("mAP50 ") and "mAP50:95" in lines[0]
    assert lines[1].split() == ["class", "AP50", "AP50:95", "(sorted", "by", "AP50)"]
    result = json.loads((tmp_path / "eval.json").read_text())
    assert 0.0 <= result["map50"] <= 1.0
    classes = result["classes"]
    assert classes and {c["name"] for c in classes} <= {"circle", "square", "triangle"}
    assert [c["ap50"] for c in classes] == sorted((c["ap50"] for c in classes), reverse=True)
    assert all(c["ap50"] >= c["ap50_95"] for c in classes)
    assert [line.split()[0] for line in lines[2:]] == [c["name"] for c in classes]
    student = tmp_path / "student"
    assert main(["distill", *tiny_teacher, "--student", tiny_teacher[1], "--data", str(run), "--out",
                 str(student), "--epochs", "1", "--batch-size", "2", "--image-size", "64", "--device", "cpu",
                 "--quiet"]) == 0
    assert {"last.pt", "student.pt", "student.weights"} <= {p.name for p in student.iterdir()}
    assert main(["evaluate", "--model", "", "--cfg", tiny_teacher[1], "--weights", str(student / "student.pt"),
                 "--data", str(run), "--size", "64", "--device", "cpu"]) == 0


def test_log_every_sets_the_progress_lines(tmp_path: Path, tiny_teacher: list[str],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    for every, expected in ((1, 3), (3, 1)):
        out = tmp_path / f"every{every}"
        assert main(["synthesize", *tiny_teacher, "--out", str(out), "--num-images", "2", "--batch-size", "2",
                     "--resolution", "64", "--iterations", "3", "--device", "cpu", "--log-every", str(every),
                     "--recipe", "reference"]) == 0
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if "  iter " in line]
        assert len(lines) == expected and lines[-1].startswith("batch 1/1  iter 3/3  lr ")
        assert "\r" not in err  # stderr is not a terminal: plain lines, no progress bar
        assert [line for line in (out / "log.txt").read_text().splitlines() if "  iter " in line] == lines
        assert len((out / "metrics.csv").read_text().splitlines()) == 1 + expected


def test_detect_takes_folders_and_globs_and_keeps_formats(tmp_path: Path, tiny_teacher: list[str],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (80, 48), (200, 30, 30)).save(photos / "a.jpg")
    Image.new("RGB", (64, 64), (30, 200, 30)).save(photos / "b.png")
    (photos / "notes.txt").write_text("not an image")
    other = tmp_path / "more"
    other.mkdir()
    Image.new("RGB", (50, 70), (30, 30, 200)).save(other / "c.jpeg")
    out = tmp_path / "drawn"
    assert main(["detect", *tiny_teacher, str(photos), str(other / "*.jpeg"), "--out", str(out), "--size", "64",
                 "--conf", "0.01", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert [line.split(":")[0] for line in printed.splitlines() if line.endswith("detections")] == [
        str(photos / "a.jpg"), str(photos / "b.png"), str(other / "c.jpeg")]
    formats = {}
    for p in sorted(out.iterdir()):
        with Image.open(p) as im:
            formats[p.name] = (im.format, im.size)
    assert formats == {"a.jpg": ("JPEG", (80, 48)), "b.png": ("PNG", (64, 64)), "c.jpeg": ("JPEG", (50, 70))}


def test_show_fits_mixed_sizes_and_puts_detections_next_to_labels(tmp_path: Path, tiny_teacher: list[str]) -> None:
    from PIL import Image

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(mixed / "a.png")
    Image.new("RGB", (96, 48), (30, 200, 30)).save(mixed / "b.png")
    assert main(["show", str(mixed), "--out", str(tmp_path / "plain.png")]) == 0
    with Image.open(tmp_path / "plain.png") as sheet:
        plain = sheet.size
    assert plain[0] == 2 + 2 * (96 + 2)  # two 64 x 96 cells (the largest height and width) in one row
    assert main(["show", str(mixed), "--detections", *tiny_teacher, "--device", "cpu", "--conf", "0.01",
                 "--out", str(tmp_path / "both.png")]) == 0
    with Image.open(tmp_path / "both.png") as sheet:
        assert sheet.size == (2 + 4 * (96 + 2), plain[1])  # each image twice: labels, then detections


def test_weights_fetch_says_what_it_fetches_and_from_where(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    import hashlib

    from diode import hub

    source = tmp_path / "toy.weights"
    source.write_bytes(b"\0" * 64)
    entry = hub.WeightsEntry(name="toy", format="darknet", arch="yolov3-tiny", file_name="toy.weights", size=64,
                             sha256=hashlib.sha256(source.read_bytes()).hexdigest(),
                             sources=(hub.UrlSource(source.as_uri()),))
    monkeypatch.setitem(hub.REGISTRY, "toy", entry)
    monkeypatch.setenv("DIODE_HOME", str(tmp_path / "cache"))
    assert main(["weights", "fetch", "toy"]) == 0
    err = capsys.readouterr().err
    assert "fetching toy" in err and source.as_uri() in err


@pytest.mark.slow
def test_detect_real_photo(real_weights: Path, real_images: Path, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["detect", "--teacher", "yolov3-tiny", "--weights", str(real_weights),
                 str(real_images / "dog.jpg"), "--out", str(tmp_path), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "dog" in out and "bicycle" in out and ("car" in out or "truck" in out)
    assert (tmp_path / "dog.jpg").exists()


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


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for sub in ("images", "labels") for p in (root / sub).iterdir()}


@pytest.mark.slow
def test_sigint_and_sigterm_stop_synthesis_cleanly_and_resume_exactly(tmp_path: Path, tiny_teacher: list[str]) -> None:
    import os
    import signal
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread count for every run: the same float sums
    args = [sys.executable, "-m", "diode", "synthesize", *tiny_teacher, "--num-images", "12", "--batch-size", "2",
            "--resolution", "64", "--iterations", "20", "--log-every", "10", "--device", "cpu", "--quiet", "--out"]
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert subprocess.run([*args, str(reference)], env=env, capture_output=True, timeout=600).returncode == 0
    for signum, code, done_before in ((signal.SIGINT, 130, 0), (signal.SIGTERM, 143, 1)):
        # SIGINT must not be ignored in the child (it is in background jobs of a non-interactive shell)
        proc = subprocess.Popen([*args, str(run)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 300
        while not (run / "batches" / f"{done_before:06d}.json").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=300)
        manifest = json.loads((run / "manifest.json").read_text())
        finished = [k for k, b in manifest["batches"].items() if b["status"] == "done"]
        assert proc.returncode == code, err
        assert err.splitlines() == [f"interrupted after {len(finished)}/6 batches; re-run the same command to resume"]
        assert out == "" and manifest["status"] == "interrupted" and 0 < len(finished) < 6
        assert len(json.loads((run / "annotations.json").read_text())["images"]) == 2 * len(finished)
        assert (run / "preview.png").exists() and len(list((run / "images").iterdir())) == 2 * len(finished)
        assert not list(run.rglob("*.tmp"))
    final = subprocess.run([*args, str(run)], env=env, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr
    assert json.loads((run / "manifest.json").read_text())["status"] == "complete"
    assert _tree(run) == _tree(reference)
    for name in ("annotations.json", "metrics.csv"):
        assert (run / name).read_bytes() == (reference / name).read_bytes(), name


def test_sampler_and_class_prior_specs() -> None:
    from conftest import make_tiny_yolo

    from diode.cli import _class_prior_from_args, _sampler_from_args

    multibox = _sampler_from_args("multibox:2-3", 3)
    counts = {len(t["labels"]) for t in multibox.sample(8, image_size=(64, 64),
                                                        generator=torch.Generator().manual_seed(0))}
    assert counts <= {2, 3} and counts
    mixed = _sampler_from_args("onebox+tiles:4", 3)
    assert mixed.kind == "mixture" and [c.kind for c in mixed.components] == ["onebox", "tiles"]
    counts = {len(t["labels"]) for t in mixed.sample(32, image_size=(64, 64),
                                                     generator=torch.Generator().manual_seed(0))}
    assert counts == {1, 4}
    with pytest.raises(SystemExit, match="--sampler must be"):
        _sampler_from_args("onebox+grid", 3)
    prior = _class_prior_from_args("teacher:0.5", make_tiny_yolo())
    assert prior.shape == (3,) and abs(float(prior.sum()) - 1) < 1e-5
    assert _class_prior_from_args(None, None) is None
    with pytest.raises(SystemExit, match="--sampler must be"):
        _sampler_from_args("grid", 3)
    with pytest.raises(SystemExit, match="--class-prior must be"):
        _class_prior_from_args("uniform", None)
