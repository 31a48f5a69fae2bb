"""``diode distill``: progress without a terminal, run-folder records, interrupts and resume, torchrun."""

from __future__ import annotations

import contextlib
import csv
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_YOLO_CFG, make_tiny_yolo

from diode.cli import main
from diode.data.io import save_image
from diode.data.labels import write_yolo_labels
from diode.models.yolo import save_darknet_weights

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
INTERRUPTED = re.compile(r"^interrupted after (\d+)/(\d+) epochs; re-run the same command to resume$")


@pytest.fixture
def tiny_teacher(tmp_path: Path) -> list[str]:
    """CLI flags of a tiny darknet teacher (3 classes, 64 px)."""
    (tmp_path / "tiny.cfg").write_text(TINY_YOLO_CFG)
    save_darknet_weights(make_tiny_yolo().model, tmp_path / "tiny.weights")
    return ["--cfg", str(tmp_path / "tiny.cfg"), "--weights", str(tmp_path / "tiny.weights")]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """Eight 64 px images with a box each (labels only matter to ``evaluate``)."""
    root = tmp_path / "data"
    g = torch.Generator().manual_seed(0)
    for i in range(8):
        save_image(root / "images" / f"{i:03d}.png", torch.rand(3, 64, 64, generator=g))
        write_yolo_labels(root / "labels" / f"{i:03d}.txt", torch.tensor([[8.0, 8.0, 40.0, 48.0]]),
                          torch.tensor([i % 3]), (64, 64))
    return root


def _distill(teacher: list[str], data: Path, out: Path, *extra: str) -> list[str]:
    return ["distill", *teacher, "--student", teacher[1], "--data", str(data), "--out", str(out), "--batch-size", "4",
            "--image-size", "64", "--device", "cpu", *extra]


def test_plain_progress_lines_and_records_without_a_terminal(tmp_path: Path, tiny_teacher: list[str], data: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(_distill(tiny_teacher, data, out, "--epochs", "2", "--log-every", "1")) == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.out + captured.err  # no bar when the output is not a terminal
    printed = (captured.err + captured.out).splitlines()
    log = (out / "log.txt").read_text().splitlines()
    assert log[0] == "distilling (outputs) on 8 images: batch 4, 2 steps per epoch, epochs 1-2"
    assert [line for line in printed if line in log] == log  # the terminal's lines, in order
    assert sum(line.startswith("epoch 2/2 step 2/2: loss ") for line in log) == 1
    with (out / "metrics.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 4
    assert {"last.pt", "student.pt", "student.weights", "loss.png"} <= {p.name for p in out.iterdir()}

    assert main(_distill(tiny_teacher, data, out, "--epochs", "3")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "(epochs: 2 -> 3)" in err and err.count("\n") == 1

    quiet = tmp_path / "quiet"
    assert main(_distill(tiny_teacher, data, quiet, "--epochs", "1", "--log-every", "1", "--quiet", "--mode", "hybrid",
                         "--score-sampling", "--mosaic", "0.5", "--hsv", "0.01", "0.5", "0.3")) == 0
    captured = capsys.readouterr()
    assert "distilling" not in captured.err + captured.out and "distilled" in captured.out
    with (quiet / "metrics.csv").open() as f:
        assert {"outputs", "task"} <= set(next(csv.DictReader(f)))


def _wait_for_new_checkpoint(process: subprocess.Popen[str], checkpoint: Path, before: int | None) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if checkpoint.exists() and checkpoint.stat().st_mtime_ns != before:
            return
        time.sleep(0.01)
    raise AssertionError(f"no new checkpoint (exit status {process.poll()})")


@pytest.mark.slow
def test_sigint_and_sigterm_stop_after_an_epoch_and_the_same_command_resumes(tmp_path: Path, tiny_teacher: list[str],
                                                                             data: Path) -> None:
    out = tmp_path / "run"
    flags = _distill(tiny_teacher, data, out, "--epochs", "12", "--log-every", "1000")
    command = [sys.executable, "-m", "diode", *flags]
    checkpoint = out / "last.pt"
    done = 0
    for signum, status in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        before = checkpoint.stat().st_mtime_ns if checkpoint.exists() else None
        # SIGINT must not be ignored in the child (it is in background jobs of a non-interactive shell)
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        _wait_for_new_checkpoint(process, checkpoint, before)
        process.send_signal(signum)
        _, err = process.communicate(timeout=300)
        assert process.returncode == status, err
        assert "Traceback" not in err
        last = err.strip().splitlines()[-1]
        match = INTERRUPTED.match(last)
        assert match is not None and int(match.group(2)) == 12, last
        assert int(match.group(1)) > done
        done = int(match.group(1))
        assert torch.load(checkpoint, weights_only=True)["epoch"] == done
        assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    finished = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert f"resuming: {done}/12 epochs already done" in finished.stderr
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 12
    log = (out / "log.txt").read_text()
    assert all(log.count(f"epoch {e}/12 done") == 1 for e in range(1, 13))


@pytest.mark.slow
def test_torchrun_two_processes_train_a_student_that_loads_and_evaluates(tmp_path: Path, tiny_teacher: list[str],
                                                                         data: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    result = subprocess.run([*torchrun, "-m", "diode", *_distill(tiny_teacher, data, out, "--epochs", "2")],
                            capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "batch 4 (2 processes)" in (out / "log.txt").read_text()
    assert result.stdout.count("distilled ") == 1  # rank 0 alone reports
    assert main(["evaluate", "--model", "", "--cfg", tiny_teacher[1], "--weights", str(out / "student.pt"), "--data",
                 str(data), "--size", "64", "--device", "cpu"]) == 0
    assert "mAP50" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_a_terminal_gets_a_progress_bar_with_the_lines_above_it(tmp_path: Path, tiny_teacher: list[str],
                                                              data: Path) -> None:
    import fcntl
    import struct
    import termios

    master, terminal = os.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    command = [sys.executable, "-m", "diode", *_distill(tiny_teacher, data, tmp_path / "run", "--epochs", "2",
                                                        "--log-every", "1")]
    process = subprocess.Popen(command, stdin=terminal, stdout=terminal, stderr=terminal, env=ENV)
    os.close(terminal)
    shown = b""
    with contextlib.suppress(OSError):  # EIO once the child closed the terminal
        while chunk := os.read(master, 4096):
            shown += chunk
    os.close(master)
    assert process.wait(timeout=300) == 0
    text = shown.decode(errors="replace")
    assert re.search(r"epoch 2/2: 100%\|.*\| 4/4 \[", text)  # the bar, with elapsed time and rate
    assert text.count("epoch 1/2 done: loss") == 1
