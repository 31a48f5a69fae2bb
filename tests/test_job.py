from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_yolo
from PIL import Image

from diode import BBoxSampler, Stage, Synthesizer, synthesize_dataset, write_dataset
from diode._interrupt import RunInterrupted
from diode.data.io import load_image
from diode.data.labels import read_yolo_labels
from diode.data.run import config_changes, history_rows
from diode.inversion.job import batch_seed


def _job(tmp: Path, *, num_images: int = 6, iterations: int = 4, **kw):
    teacher = make_tiny_yolo()
    synth = Synthesizer(teacher, stages=[Stage(64, iterations, lr=0.1)], log_every=2)
    sampler = BBoxSampler.onebox(num_classes=teacher.num_classes)
    return synthesize_dataset(synth, sampler, tmp, num_images=num_images, batch_size=4, seed=7, **kw), synth


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_writes_a_complete_run_folder(tmp_path: Path) -> None:
    manifest, _ = _job(tmp_path)
    assert manifest["status"] == "complete"
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [f"{i:06d}.png" for i in range(6)]
    assert len(list((tmp_path / "labels").iterdir())) == 6
    assert (tmp_path / "preview.png").exists()
    coco = json.loads((tmp_path / "annotations.json").read_text())
    assert len(coco["images"]) == 6 and len(coco["annotations"]) == 6
    assert [c["name"] for c in coco["categories"]] == ["circle", "square", "triangle"]
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk["config"]["teacher"]["name"] == "tiny" and on_disk["config"]["seed"] == 7
    batch = on_disk["batches"]["1"]
    assert batch["status"] == "done" and batch["images"] == ["000004.png", "000005.png"]
    assert {"inversion_map50", "seconds_per_iteration", "task", "history"} <= set(batch["metrics"])
    assert not [p for p in _files(tmp_path) if p.endswith(".tmp")]


def test_a_batch_depends_only_on_seed_and_index(tmp_path: Path) -> None:
    _, synth = _job(tmp_path)
    sampler = BBoxSampler.onebox(num_classes=3)
    g = torch.Generator().manual_seed(batch_seed(7, 1))
    result = synth.run(sampler.sample(2, image_size=(64, 64), generator=g), generator=g)
    written = load_image(tmp_path / "images" / "000004.png")
    assert (written - result.images[0]).abs().max() <= 0.5 / 255 + 1e-6
    labels = read_yolo_labels(tmp_path / "labels" / "000004.txt", (64, 64))
    torch.testing.assert_close(labels["boxes"], result.targets[0]["boxes"], atol=1e-3, rtol=0)


def test_rerun_skips_finished_batches_and_extends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _job(tmp_path, num_images=4)
    stamp = (tmp_path / "images" / "000000.png").stat().st_mtime_ns
    calls = []
    original = Synthesizer.run
    monkeypatch.setattr(Synthesizer, "run", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    _job(tmp_path, num_images=4)
    assert calls == []
    manifest, _ = _job(tmp_path, num_images=8)
    assert calls == [1] and manifest["status"] == "complete"
    assert (tmp_path / "images" / "000000.png").stat().st_mtime_ns == stamp


def test_killed_run_leaves_no_partial_files_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import diode.data.run as run_module

    written = []
    real_save = run_module.save_image

    def dying_save(path, image):
        if len(written) == 5:  # second batch, after its first image: the process "dies"
            raise KeyboardInterrupt
        real_save(path, image)
        written.append(path)

    monkeypatch.setattr(run_module, "save_image", dying_save)
    with pytest.raises(KeyboardInterrupt):
        _job(tmp_path)
    files = _files(tmp_path)
    assert not [p for p in files if p.endswith(".tmp")]
    assert "batches/000001.json" not in files and "batches/000000.json" in files
    monkeypatch.setattr(run_module, "save_image", real_save)
    manifest, _ = _job(tmp_path)
    assert manifest["status"] == "complete" and len(list((tmp_path / "images").iterdir())) == 6


def test_stale_temporary_files_are_cleaned(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir(parents=True)
    stale = tmp_path / "images" / ".000000.png.123.abc.tmp"
    stale.write_bytes(b"partial")
    _job(tmp_path, num_images=2)
    assert not stale.exists()


def test_different_config_into_same_folder_is_refused(tmp_path: Path) -> None:
    _job(tmp_path, num_images=2)
    with pytest.raises(ValueError, match="different configuration"):
        _job(tmp_path, num_images=2, iterations=5)


def test_unwritable_output_folder_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="not writable"):
        _job(blocker / "run", num_images=2)


def test_sequential_label_layouts_follow_the_batch_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    labels = tmp_path / "layouts"
    labels.mkdir()
    for i in range(6):
        (labels / f"{i}.txt").write_text(f"{i % 3} 0.5 0.5 0.{i + 2} 0.4\n")
    teacher = make_tiny_yolo()
    synth = Synthesizer(teacher, stages=[Stage(64, 2, lr=0.1)])
    seen = []
    original = Synthesizer.run
    monkeypatch.setattr(Synthesizer, "run", lambda self, t, **k: seen.append(t) or original(self, t, **k))
    sampler = BBoxSampler.from_labels(labels, num_classes=3, order="sequential")
    synthesize_dataset(synth, sampler, tmp_path / "a", num_images=6, batch_size=2, seed=0)
    widths_all = [float(t["boxes"][0, 2] - t["boxes"][0, 0]) for batch in seen for t in batch]
    seen.clear()
    (tmp_path / "a" / "batches" / "000001.json").unlink()
    synthesize_dataset(synth, BBoxSampler.from_labels(labels, num_classes=3, order="sequential"), tmp_path / "a",
                       num_images=6, batch_size=2, seed=0)
    assert [float(t["boxes"][0, 2] - t["boxes"][0, 0]) for t in seen[0]] == widths_all[2:4]


def test_run_folder_records_log_metrics_and_loss_plot(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="diode"):
        _job(tmp_path)
    log = (tmp_path / "log.txt").read_text().splitlines()
    # the same lines as the logger (the terminal under the CLI)
    assert log == [r.getMessage() for r in caplog.records if r.name == "diode.inversion.job"]
    assert log[0].startswith("synthesizing 6 images in 2 batches of 4")
    assert sum("iter 2/4" in line for line in log) == 2 and sum("iter 4/4" in line for line in log) == 2
    assert "batch 2/2 done: 2 images" in log[-2] and log[-1].startswith("finished: 2/2 batches, 6 images")
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:5] == ["batch", "stage", "iteration", "step", "lr"]
    assert {"total", "task", "bn", "tv_l1"} <= set(rows[0])
    assert [(r["batch"], r["iteration"]) for r in rows] == [("0", "2"), ("0", "4"), ("1", "2"), ("1", "4")]
    with Image.open(tmp_path / "loss.png") as plot:
        assert plot.format == "PNG" and plot.width > 300


def test_resume_says_how_many_batches_are_done(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _job(tmp_path, num_images=4)
    with caplog.at_level(logging.INFO, logger="diode"):
        _job(tmp_path, num_images=8)
    assert "resuming: 1/2 batches already done" in caplog.messages
    log = (tmp_path / "log.txt").read_text()
    assert log.count("synthesizing") == 2 and "resuming: 1/2 batches already done" in log  # appended, not replaced
    with open(tmp_path / "metrics.csv", newline="") as f:
        assert [r["batch"] for r in csv.DictReader(f)] == ["0", "0", "1", "1"]


def test_interrupt_finalizes_the_folder_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = Synthesizer.run
    calls = []

    def interrupted_second_batch(self, targets, **kw):
        calls.append(1)
        if len(calls) == 2:
            kw["callback"]({"stage": 0, "iteration": 2, "lr": 0.1, "total": 1.0})  # mid-batch
            import diode.data.run as run_module

            run_module.save_image(tmp_path / "images" / "000004.png", torch.zeros(3, 64, 64))  # a stray image
            raise KeyboardInterrupt
        return original(self, targets, **kw)

    monkeypatch.setattr(Synthesizer, "run", interrupted_second_batch)
    line = "interrupted after 1/2 batches; re-run the same command to resume"
    with pytest.raises(RunInterrupted, match=f"^{line}$") as e:
        _job(tmp_path)
    assert e.value.exit_code == 130 and isinstance(e.value, KeyboardInterrupt)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    assert manifest["batches"]["0"]["status"] == "done" and manifest["batches"]["1"]["status"] == "missing"
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [f"{i:06d}.png" for i in range(4)]
    assert len(json.loads((tmp_path / "annotations.json").read_text())["images"]) == 4
    assert (tmp_path / "preview.png").exists() and (tmp_path / "loss.png").exists()
    assert (tmp_path / "log.txt").read_text().splitlines()[-1].startswith("interrupted after 1/2 batches")
    assert not [p for p in _files(tmp_path) if p.endswith(".tmp")]
    monkeypatch.setattr(Synthesizer, "run", original)
    manifest, _ = _job(tmp_path)
    assert manifest["status"] == "complete" and len(list((tmp_path / "images").iterdir())) == 6


def test_refused_resume_names_the_changed_keys(tmp_path: Path) -> None:
    _job(tmp_path, num_images=2)
    with pytest.raises(ValueError, match=re.escape("synthesizer.stages[0].iterations: 4 -> 5")) as e:
        _job(tmp_path, num_images=2, iterations=5)
    assert "lr" not in str(e.value)  # only what changed


def test_config_changes_lists_changed_leaves() -> None:
    old = {"a": 1, "s": [{"it": 200, "lr": 0.2}], "gone": True, "pair": [1, 2]}
    new = {"a": 1, "s": [{"it": 100, "lr": 0.2}], "new": "x", "pair": [1, 2, 3]}
    assert config_changes(old, new) == ["gone: True -> (absent)", "new: (absent) -> 'x'",
                                        "pair: [1, 2] -> [1, 2, 3]", "s[0].it: 200 -> 100"]


def test_config_changes_accept_a_setting_added_at_its_neutral_default() -> None:
    recorded = {"stages": [{"iterations": 200}], "amp": None}  # written before stages had loss_scale
    current = {"stages": [{"iterations": 200, "loss_scale": {}}], "amp": None, "extra": []}
    assert config_changes(recorded, current) == [] and config_changes(current, recorded) == []
    assert config_changes(recorded, {"stages": [{"iterations": 200, "loss_scale": {"w_task": 4.0}}], "amp": None}) \
        == ["stages[0].loss_scale: (absent) -> {'w_task': 4.0}"]


def test_history_rows_count_steps_over_stages() -> None:
    history = [{"stage": 0, "iteration": 5, "lr": 0.1, "total": 2.0}, {"stage": 0, "iteration": 10, "lr": 0.0,
                                                                       "total": 1.0},
               {"stage": 1, "iteration": 3, "lr": 0.01, "total": 0.5}]
    rows = history_rows(7, history)
    assert [r["step"] for r in rows] == [5, 10, 13] and all(r["batch"] == 7 for r in rows)
    assert list(rows[0]) == ["batch", "stage", "iteration", "step", "lr", "total"]


def test_progress_bar_on_request_and_none_off_a_terminal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _job(tmp_path / "bar", num_images=2, progress=True)
    err = capsys.readouterr().err
    assert "0/2 images" in err and "2/2 images, batch 1/1 done" in err and "\r" in err
    _job(tmp_path / "plain", num_images=2)  # progress=None: stderr is not a terminal under pytest
    assert "\r" not in capsys.readouterr().err


def test_write_dataset_records_its_history(tmp_path: Path) -> None:
    teacher = make_tiny_yolo()
    synth = Synthesizer(teacher, stages=[Stage(64, 2, lr=0.1)], log_every=1)
    result = synth.run(BBoxSampler.onebox(num_classes=3).sample(2, image_size=(64, 64),
                                                                generator=torch.Generator().manual_seed(0)))
    write_dataset(result, tmp_path, class_names=teacher.class_names)
    with open(tmp_path / "metrics.csv", newline="") as f:
        assert [r["iteration"] for r in csv.DictReader(f)] == ["1", "2"]
    assert (tmp_path / "loss.png").exists() and (tmp_path / "log.txt").read_text().startswith("wrote 2 images")
