"""The scripts in examples/ run end to end at tiny sizes and write what they promise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args: str, timeout: float = 120) -> str:
    """Run ``examples/<name>`` with ``args`` in a fresh interpreter; return its stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _map50(stdout: str) -> float:
    line = next(line for line in stdout.splitlines() if line.startswith("inversion mAP50:"))
    return float(line.split(":")[1])


def test_custom_adapter_example(tmp_path: Path) -> None:
    out = tmp_path / "run"
    stdout = run_example("custom_adapter.py", "--train-steps", "2", "--train-images", "8", "--iterations", "3",
                         "--num-images", "2", "--out", str(out))
    assert 0.0 <= _map50(stdout) <= 1.0
    assert "synthesis iteration    3" in stdout
    assert sorted(p.name for p in (out / "images").iterdir()) == ["000000.png", "000001.png"]
    assert len(list((out / "labels").glob("*.txt"))) == 2
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"


@pytest.mark.slow
def test_synthesize_yolov3_tiny_example(tmp_path: Path, real_weights: Path) -> None:
    out = tmp_path / "run"
    stdout = run_example("synthesize_yolov3_tiny.py", "--iterations", "3", "--num-images", "2",
                         "--resolution", "64", "--weights", str(real_weights), "--out", str(out))
    assert 0.0 <= _map50(stdout) <= 1.0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["config"]["teacher"]["name"] == "yolov3-tiny"
    assert len(manifest["class_names"]) == 80
    coco = json.loads((out / "annotations.json").read_text())
    assert len(coco["images"]) == 2 and len(coco["annotations"]) >= 2
    assert (out / "preview.png").is_file()


def test_distill_shapes_example(tmp_path: Path) -> None:
    out = tmp_path / "shapes"
    stdout = run_example("distill_shapes.py", "--out", str(out), "--train-images", "16", "--val-images", "4",
                         "--teacher-steps", "2", "--num-images", "2", "--batch-size", "2", "--iterations", "2",
                         "--epochs", "1")
    assert "distilled for 1 epochs" in stdout
    assert "mAP50 on real shapes: teacher" in stdout
    assert (out / "student" / "student.pt").is_file()
    assert len(list((out / "synth" / "images").glob("*.png"))) == 2
    assert json.loads((out / "synth" / "manifest.json").read_text())["status"] == "complete"
