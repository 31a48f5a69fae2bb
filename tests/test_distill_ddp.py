"""Distillation with DistributedDataParallel: two gloo processes on the CPU against one process."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from diode.adapters.yolo import YOLOv3Adapter
from diode.data.io import save_image
from diode.distill import Distiller
from diode.models.yolo import Darknet

SIZE = 64


def _cfg(bn: bool) -> str:
    """A 64 px darknet, one [yolo] head (2x2 grid, 2 anchors, 3 classes), with or without BatchNorm."""
    norm = "batch_normalize=1\n" if bn else ""
    conv = "[convolutional]\n" + norm + "filters={f}\nsize=3\nstride={s}\npad=1\nactivation=leaky\n\n"
    body = conv.format(f=8, s=1) + "[maxpool]\nsize=2\nstride=2\n\n"
    body += "".join(conv.format(f=8, s=2) for _ in range(4))
    head = ("[convolutional]\nsize=1\nstride=1\npad=1\nfilters=16\nactivation=linear\n\n"
            "[yolo]\nmask=0,1\nanchors=16,16, 40,40\nclasses=3\n")
    return f"[net]\nwidth={SIZE}\nheight={SIZE}\nchannels=3\n\n" + body + head


def _pair(student_bn: bool, student_seed: int) -> tuple[YOLOv3Adapter, YOLOv3Adapter]:
    torch.manual_seed(0)
    teacher = YOLOv3Adapter(Darknet(_cfg(True))).freeze()
    torch.manual_seed(student_seed)
    return teacher, YOLOv3Adapter(Darknet(_cfg(student_bn)))


# Augmentation off: every process sees exactly the images of its share of the global batch.
SETTINGS: dict[str, Any] = dict(image_size=SIZE, lr=1e-2, warmup_epochs=0.5, augment=False, ema=0.9, ema_tau=1.0,
                                log_every=1, epochs=2)


def _run(rank: int, world: int, port: int, data: str, out: str, result: str, student_bn: bool, batch_size: int,
         stop_in_epoch_two: bool) -> None:
    """One process of a ``world``-process job: distil, and from rank 0 save the final student weights."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # ranks start from different weights: DDP makes them rank 0's
        teacher, student = _pair(student_bn, student_seed=1 + rank)
        distiller = Distiller(teacher, student, batch_size=batch_size, **SETTINGS)
        if stop_in_epoch_two:  # every rank stops at the same point, as under a signal
            train = distiller._train_epoch

            def stopping(loader: Any, sampler: Any, epoch: int, report: Any) -> Any:
                if epoch == 1:
                    raise KeyboardInterrupt
                return train(loader, sampler, epoch, report)

            distiller._train_epoch = stopping  # type: ignore[method-assign]
            with pytest.raises(KeyboardInterrupt):
                distiller.fit(data, out=out)
            # a fresh start of the same job resumes from out/last.pt
            teacher, student = _pair(student_bn, student_seed=7)
            distiller = Distiller(teacher, student, batch_size=batch_size, **SETTINGS)
        distiller.fit(data, out=out)
        if rank == 0:
            torch.save({"student": student.model.state_dict(),
                        "ema": distiller.student_for_eval().model.state_dict()}, result)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    g = torch.Generator().manual_seed(0)
    for i in range(8):
        save_image(root / "images" / f"{i:03d}.png", torch.rand(3, SIZE, SIZE, generator=g))
    return root


def _two_processes(data: Path, out: Path, *, student_bn: bool, batch_size: int,
                   stop_in_epoch_two: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    result = out / "result.pt"
    mp.spawn(_run, args=(2, _free_port(), str(data), str(out), str(result), student_bn, batch_size,
                         stop_in_epoch_two), nprocs=2)
    return torch.load(result, weights_only=True)


class _Shares(nn.Module):
    """The student's forward run on each rank's share of the batch apart, outputs concatenated.

    BatchNorm then normalises each share with its own statistics, as it does on each rank.
    """

    def __init__(self, adapter: YOLOv3Adapter, world: int) -> None:
        super().__init__()
        self.net, self.adapter, self.world = adapter.model, adapter, world

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        parts = [self.adapter.forward(share) for share in images.tensor_split(self.world)]
        return [torch.cat(heads) for heads in zip(*parts, strict=True)]


def _one_process(data: Path, *, student_bn: bool, batch_size: int,
                 shares: int = 1) -> dict[str, dict[str, torch.Tensor]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        teacher, student = _pair(student_bn, student_seed=1)
        distiller = Distiller(teacher, student, batch_size=batch_size, **SETTINGS)
        if shares > 1:
            distiller._forward = _Shares(student, shares)
        distiller.fit(data)
    finally:
        torch.set_num_threads(threads)
    return {"student": student.model.state_dict(), "ema": distiller.student_for_eval().model.state_dict()}


def _assert_same_parameters(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> None:
    """Equal weights of student and EMA, to float32 reduction-order noise (BN running statistics excluded)."""
    for key in ("student", "ema"):
        for name, value in b[key].items():
            if value.is_floating_point() and "running" not in name:
                torch.testing.assert_close(a[key][name], value, rtol=1e-4, atol=1e-5, msg=f"{key} {name}")


@pytest.mark.slow
def test_two_processes_without_batchnorm_match_one_process(data: Path, tmp_path: Path) -> None:
    # batch 3 on 8 images: global batches 3, 3, 2 -> shares 2+1, 2+1, 1+1, the loss weighted by share
    two = _two_processes(data, tmp_path / "two", student_bn=False, batch_size=3)
    _assert_same_parameters(two, _one_process(data, student_bn=False, batch_size=3))
    log = (tmp_path / "two" / "log.txt").read_text()
    assert "batch 3 (2 processes)" in log and log.count("epoch 1/2 done") == 1  # rank 0 alone writes


@pytest.mark.slow
def test_two_processes_with_batchnorm_differ_only_by_per_rank_statistics_and_resume(data: Path,
                                                                                    tmp_path: Path) -> None:
    two = _two_processes(data, tmp_path / "two", student_bn=True, batch_size=4)
    # One process that normalises each rank's 2 images apart reproduces the 2-process run: the gap to a
    # plain one-process run (BatchNorm over all 4 images) is BatchNorm's per-rank statistics, nothing else.
    _assert_same_parameters(two, _one_process(data, student_bn=True, batch_size=4, shares=2))
    plain = _one_process(data, student_bn=True, batch_size=4)
    assert not torch.equal(plain["student"]["module_list.0.Conv2d.weight"],
                           two["student"]["module_list.0.Conv2d.weight"])
    resumed = _two_processes(data, tmp_path / "resumed", student_bn=True, batch_size=4, stop_in_epoch_two=True)
    for key in ("student", "ema"):
        for name, value in two[key].items():
            torch.testing.assert_close(resumed[key][name], value, rtol=0, atol=0, msg=f"{key} {name}")
    assert "resuming: 1/2 epochs already done" in (tmp_path / "resumed" / "log.txt").read_text()


def test_the_global_batch_must_cover_the_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("diode.distill.rank_and_world", lambda: (0, 4))
    teacher, student = _pair(False, student_seed=1)
    with pytest.raises(ValueError, match="batch_size 3 is the global batch and must be at least the number of "
                                         "processes, 4"):
        Distiller(teacher, student, batch_size=3, **SETTINGS)
