"""A synthesis job: many independent batches written to a resumable run folder."""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch

from diode.data.io import PathLike
from diode.data.run import RunFolder
from diode.inversion.sampler import BBoxSampler
from diode.inversion.synthesizer import SynthesisResult, Synthesizer

logger = logging.getLogger(__name__)


def batch_seed(seed: int, batch_index: int) -> int:
    """The seed of batch ``batch_index``: depends only on (seed, index), never on the process count."""
    return int(np.random.SeedSequence([int(seed), int(batch_index)]).generate_state(1, np.uint64)[0] >> 1)


def write_dataset(result: SynthesisResult, out: PathLike, *, class_names: list[str],
                  config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write one in-memory :class:`SynthesisResult` as a run folder (batch 0); returns the manifest."""
    run = RunFolder(out, config=config or {}, class_names=class_names)
    run.write_batch(0, result.images, result.targets, first_image=0, metrics=result.metrics)
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
    progress: bool = False,
) -> dict[str, Any]:
    """Synthesize ``num_images`` images in batches into the run folder ``out``.

    Batch ``i`` draws its targets and noise from a generator seeded with
    ``batch_seed(seed, i)``, so any batch can be (re)computed alone: finished
    batches are skipped when the same job runs again (resume), and under
    ``torchrun`` rank ``r`` of ``W`` takes batches ``r, r + W, ...`` with the
    same result as one process.

    Args:
        synthesizer: the configured synthesizer (its teacher is the teacher).
        sampler: draws the targets of each batch at the first stage's resolution.
        out: the run folder.
        num_images: images to produce in total.
        batch_size: images per batch (the last batch may be smaller).
        seed: base seed of the job.
        config: extra configuration recorded in the manifest (teacher, sampler, ...).
        progress: show a progress bar over batches.

    Returns:
        The manifest (``status``, ``config``, per-batch records with metrics).
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
    rank, world = _rank_and_world()
    if rank == 0:
        run = RunFolder(out, config=full_config, class_names=teacher.class_names)
    _barrier(world)
    if rank != 0:
        run = RunFolder(out, config=full_config, class_names=teacher.class_names, primary=False)
    num_batches = -(-num_images // batch_size)
    mine = [i for i in range(num_batches) if i % world == rank]
    todo = [i for i in mine if not run.is_done(i)]
    if len(todo) < len(mine):
        logger.info("resuming: %d of %d batches already finished", len(mine) - len(todo), len(mine))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc="batches", dynamic_ncols=True)
    try:
        for i in todo:
            n = min(batch_size, num_images - i * batch_size)
            g = torch.Generator().manual_seed(batch_seed(seed, i))
            # A sequential label sampler walks the layouts in file order: batch i starts at its own
            # offset, so the batch does not depend on which batches this process ran before it.
            sampler.cursor = i * batch_size
            targets = sampler.sample(n, image_size=synthesizer.stages[0].size, generator=g)
            result = synthesizer.run(targets, generator=g)
            run.write_batch(i, result.images, result.targets, first_image=i * batch_size,
                            metrics={**result.metrics, "history": result.history,
                                     "seed": batch_seed(seed, i), "device": str(synthesizer.device)})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(map50=result.metrics["inversion_map50"])
    finally:
        if bar is not None:
            bar.close()
    _barrier(world)
    if rank != 0:
        return {}
    return run.finalize(num_batches)


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not initialized: call "
                           "torch.distributed.init_process_group() first (the diode CLI does it under torchrun)")
    return 0, 1


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()
