"""A synthesis job: many independent batches written to a resumable run folder."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from diode._interrupt import RunInterrupted, signal_number
from diode._progress import progress_bar
from diode._utils import barrier, derive_seed, rank_and_world
from diode.data.io import PathLike
from diode.data.run import RunFolder
from diode.inversion.sampler import BBoxSampler
from diode.inversion.synthesizer import SynthesisResult, Synthesizer

logger = logging.getLogger(__name__)

_POSITION_KEYS = ("stage", "iteration", "lr")


def batch_seed(seed: int, batch_index: int) -> int:
    """The seed of batch ``batch_index``: depends only on (seed, index), never on the process count."""
    return derive_seed(seed, batch_index)


def write_dataset(result: SynthesisResult, out: PathLike, *, class_names: list[str],
                  config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write one in-memory :class:`SynthesisResult` as a run folder (batch 0); returns the manifest."""
    run = RunFolder(out, config=config or {}, class_names=class_names)
    run.write_batch(0, result.images, result.targets, first_image=0,
                    metrics={**result.metrics, "history": result.history})
    run.log(f"wrote {result.images.shape[0]} images as batch 1/1 to {out}")
    return run.finalize(1)


def synthesize_dataset(
    synthesizer: Synthesizer,
    sampler: BBoxSampler,
    out: PathLike,
    *,
    num_images: int,
    batch_size: int,
    seed: int = 0,
    config: dict[str, Any] | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Synthesize ``num_images`` images in batches into the run folder ``out``.

    Batch ``i`` draws its targets and noise from a generator seeded with
    ``batch_seed(seed, i)``, so any batch can be (re)computed alone: finished
    batches are skipped when the same job runs again (resume), and under
    ``torchrun`` rank ``r`` of ``W`` takes batches ``r, r + W, ...`` with the
    same result as one process.

    The job reports through the ``diode.inversion.job`` logger at INFO (a line
    at the start, ``"resuming: 1/4 batches already done"``, one line per
    logging point of the synthesizer, i.e. every ``synthesizer.log_every``
    iterations, and one per finished batch) and appends the same lines to
    ``out/log.txt``. After every batch the folder's ``manifest.json``,
    ``annotations.json``, ``preview.png``, ``metrics.csv`` and ``loss.png``
    are brought up to date.

    On SIGINT (``KeyboardInterrupt``; SIGTERM too under
    :func:`diode.data.records.sigterm_as_interrupt`) the files of the
    unfinished batch are removed, the folder is finalized with status
    ``"interrupted"`` and :class:`~diode.data.records.RunInterrupted` is raised
    with the line to show (``"interrupted after 1/4 batches; re-run the same
    command to resume"``).

    Args:
        synthesizer: the configured synthesizer (its teacher is the teacher).
        sampler: draws the targets of each batch at the first stage's resolution.
        out: the run folder.
        num_images: images to produce in total.
        batch_size: images per batch (the last batch may be smaller).
        seed: base seed of the job.
        config: extra configuration recorded in the manifest (teacher, sampler, ...).
        progress: a progress bar over images with the current batch's stage and
            iteration (tqdm, on stderr, rank 0 only); ``None`` shows it when stderr
            is a terminal, so output redirected to a file has no bar.

    Returns:
        The manifest (``status``, ``config``, per-batch records with metrics);
        ``{}`` on ranks other than 0.

    Raises:
        RunInterrupted: the job was stopped by a signal after saving its state.
    """
    if num_images < 1 or batch_size < 1:
        raise ValueError(f"num_images and batch_size must be >= 1, got {num_images} and {batch_size}")
    teacher = synthesizer.teacher
    full_config = {
        "teacher": getattr(teacher, "source", {"model": type(teacher.model).__name__}),
        "synthesizer": synthesizer.describe(),
        "sampler": repr(sampler),
        "seed": int(seed),
        "batch_size": int(batch_size),
        "num_images": int(num_images),
        **(config or {}),
    }
    rank, world = rank_and_world()
    if rank == 0:
        run = RunFolder(out, config=full_config, class_names=teacher.class_names)
    barrier(world)
    if rank != 0:
        run = RunFolder(out, config=full_config, class_names=teacher.class_names, primary=False)
    num_batches = -(-num_images // batch_size)
    mine = [i for i in range(num_batches) if i % world == rank]
    todo = [i for i in mine if not run.is_done(i)]
    sizes = {i: min(batch_size, num_images - i * batch_size) for i in mine}
    show = (sys.stderr.isatty() if progress is None else progress) and rank == 0
    report = _Report(run, synthesizer, num_batches, rank=rank, world=world)
    report.start(out, num_images, batch_size, mine, todo)
    current: int | None = None
    with _ProgressBar(sum(sizes.values()), sum(sizes[i] for i in mine if i not in todo), show) as bar:
        report.bar = bar
        try:
            for i in todo:
                current = i
                g = torch.Generator().manual_seed(batch_seed(seed, i))
                # A sequential label sampler walks the layouts in file order: batch i starts at its own
                # offset, so the batch does not depend on which batches this process ran before it.
                sampler.cursor = i * batch_size
                targets = sampler.sample(sizes[i], image_size=synthesizer.stages[0].size, generator=g)
                report.begin_batch(i, sizes[i])
                result = synthesizer.run(targets, generator=g, callback=report.point)
                run.write_batch(i, result.images, result.targets, first_image=i * batch_size,
                                metrics={**result.metrics, "history": result.history,
                                         "seed": batch_seed(seed, i), "device": str(synthesizer.device)})
                current = None
                report.end_batch(result.metrics)
                if rank == 0:
                    run.finalize(num_batches, status="running")
        except KeyboardInterrupt as e:
            bar.close()
            if current is not None:
                run.discard_batch(current, first_image=current * batch_size, num_images=sizes[current])
            if rank == 0:
                run.finalize(num_batches, status="interrupted")
            finished = sum(run.is_done(i) for i in range(num_batches))
            message = f"interrupted after {finished}/{num_batches} batches; re-run the same command to resume"
            run.log(message)
            raise RunInterrupted(message, signum=signal_number(e)) from None
    barrier(world)
    if rank != 0:
        return {}
    manifest = run.finalize(num_batches)
    report.finish(manifest)
    return manifest


class _Report:
    """The job's lines (logger + ``log.txt``) and its progress bar's text."""

    def __init__(self, run: RunFolder, synthesizer: Synthesizer, num_batches: int, *, rank: int,
                 world: int) -> None:
        self.run = run
        self.stages = synthesizer.stages
        self.iterations = sum(s.iterations for s in synthesizer.stages)
        self.num_batches = num_batches
        self.prefix = f"[rank {rank}/{world}] " if world > 1 else ""
        self.bar: _ProgressBar | None = None
        self.batch = 0
        self.batch_images = 0
        self.done_iterations = 0
        self.started = time.perf_counter()

    def info(self, line: str) -> None:
        logger.info("%s%s", self.prefix, line)
        self.run.log(line)

    def start(self, out: PathLike, num_images: int, batch_size: int, mine: list[int], todo: list[int]) -> None:
        schedule = ", then ".join(f"{s.iterations} iterations at {s.size[0]}x{s.size[1]}" for s in self.stages)
        share = f", this process takes {len(mine)} of them" if len(mine) != self.num_batches else ""
        self.info(f"synthesizing {num_images} images in {self.num_batches} batches of {batch_size} into "
                  f"{Path(out)} ({schedule}{share})")
        if len(todo) < len(mine):
            self.info(f"resuming: {len(mine) - len(todo)}/{len(mine)} batches already done")

    def begin_batch(self, index: int, images: int) -> None:
        self.batch, self.batch_images, self.done_iterations = index, images, 0

    def point(self, record: dict[str, float]) -> None:
        """Synthesizer callback at each logging point."""
        stage = int(record["stage"])
        iteration = int(record["iteration"])
        done = sum(s.iterations for s in self.stages[:stage]) + iteration
        terms = "  ".join(f"{k} {v:.4g}" for k, v in record.items() if k not in _POSITION_KEYS)
        where = f"batch {self.batch + 1}/{self.num_batches}"
        stage_text = f"stage {stage + 1}/{len(self.stages)} " if len(self.stages) > 1 else ""
        self.info(f"{where}  {stage_text}iter {iteration}/{self.stages[stage].iterations}  "
                  f"lr {record['lr']:.3g}  {terms}")
        if self.bar is not None:
            self.bar.advance(self.batch_images * (done - self.done_iterations) / self.iterations,
                             f"{where}, {stage_text}iter {iteration}/{self.stages[stage].iterations}, "
                             f"loss {record.get('total', float('nan')):.4g}")
        self.done_iterations = done

    def end_batch(self, metrics: dict[str, Any]) -> None:
        score = metrics.get("inversion_map50")
        score_text = "n/a" if score is None else f"{score:.3f}"
        self.info(f"batch {self.batch + 1}/{self.num_batches} done: {self.batch_images} images, "
                  f"inversion mAP50 {score_text}, {metrics['seconds_per_iteration']:.3f} s/iteration")
        if self.bar is not None:
            self.bar.advance(self.batch_images * (self.iterations - self.done_iterations) / self.iterations,
                             f"batch {self.batch + 1}/{self.num_batches} done")

    def finish(self, manifest: dict[str, Any]) -> None:
        done = [b for b in manifest["batches"].values() if b["status"] == "done"]
        images = sum(len(b["images"]) for b in done)
        minutes, seconds = divmod(time.perf_counter() - self.started, 60)
        self.info(f"finished: {len(done)}/{self.num_batches} batches, {images} images ({manifest['status']}), "
                  f"this run took {int(minutes)}m{seconds:04.1f}s")


class _ProgressBar:
    """A tqdm bar over images (fractional while a batch runs, so the ETA moves), or nothing.

    While it is shown, this module's console log records print above it
    (:func:`diode._progress.progress_bar`).
    """

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.total, self.initial, self.enabled = total, initial, enabled
        self.bar: Any = None
        self.images = float(initial)
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> _ProgressBar:
        self.bar = self._stack.enter_context(
            progress_bar(self.total, initial=self.initial, show=self.enabled, logger=logger, desc=self._count(),
                         bar_format="{percentage:3.0f}%|{bar}| {desc} [{elapsed}<{remaining}]"))
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()
        self.bar = None

    def advance(self, images: float, text: str) -> None:
        if self.bar is None:
            return
        self.images += images
        self.bar.set_description_str(f"{self._count()}, {text}", refresh=False)
        self.bar.update(images)

    def _count(self) -> str:
        return f"{int(self.images + 1e-6)}/{self.total} images"
