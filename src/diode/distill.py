"""`Distiller`: train a student detector on unlabelled images with a teacher as the only supervisor.

Three modes:

- ``"outputs"`` (the reference DIODE method): the loss is the sum over output tensors of
  the mean squared error between the student's and the teacher's raw outputs on the same
  (augmented) images. Raw outputs may be a tensor or tensors nested in lists, tuples and
  dicts (flattened in a stable order: dict keys sorted); teacher and student must give the
  same structure and shapes (same head layout and classes), which is checked at construction.
- ``"pseudo_labels"``: the teacher's detections after NMS (score above ``conf``) are the
  targets of the student's own task loss; any two adapters with the same classes. With
  ``score_sampling`` each detection is kept with probability equal to its score, so the
  expected objectness target of a detector trained with binary cross-entropy is the
  teacher's score (soft targets through any adapter's task loss).
- ``"hybrid"``: both, ``outputs + pseudo_weight * task`` (same head layout).

Training is reproducible and resumable: the shuffling of epoch ``e`` and the random draws
of step ``s`` of it are seeded from ``(seed, e, s)`` (and the rank), and the learning rate
is a function of the training progress, so a run resumed from its last checkpoint ends with
the same weights as an uninterrupted one.

Under ``torchrun`` (``torch.distributed`` initialized, world size ``W > 1``) the student
is wrapped in :class:`~torch.nn.parallel.DistributedDataParallel`. ``batch_size`` is the
*global* batch: every step, the same epoch permutation is cut into global batches and rank
``r`` takes the ``r``-th of ``W`` near-equal slices of each, and each rank's loss is weighted
by its share so the averaged gradient is that of the global batch mean. Only rank 0 writes
files and shows progress. BatchNorm layers normalise with per-rank batch statistics (as
DistributedDataParallel does by default), so a ``W``-process run is close to, not equal to,
a one-process run.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler

from diode._boxes import Target, detections_as_targets
from diode._interrupt import RunInterrupted, signal_number
from diode._progress import progress_bar
from diode._utils import barrier, check_int, check_number, derive_seed, device_of, rank_and_world
from diode.adapters._common import module_mode
from diode.adapters.base import DetectorAdapter
from diode.data.folder import DetectionFolder
from diode.data.io import PathLike, atomic_write_bytes
from diode.data.records import LOG, METRICS, PLOT, RunRecords
from diode.inversion.augment import AugmentationPipeline

logger = logging.getLogger(__name__)

__all__ = ["DistillConfig", "Distiller"]

MODES = ("outputs", "pseudo_labels", "hybrid")
OPTIMIZERS = ("adamw", "sgd")
CHECKPOINT = "last.pt"
STUDENT_WEIGHTS = "student.pt"
_FORMAT = "diode.distill/1"
# Fields that do not change the result and so may differ when resuming.
_RESUME_FREE = ("num_workers", "log_every")
_SGD_MOMENTUM = 0.937
# Colour jitter of the pseudo_labels and hybrid modes (docs/guide/distillation.rst: measured effect).
_PSEUDO_LABEL_HSV = (0.015, 0.5, 0.3)


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Settings of a distillation run.

    Args:
        mode: ``"outputs"`` (MSE between raw outputs; same head layout), ``"pseudo_labels"``
            (teacher detections as targets of the student's task loss; any student with the
            teacher's classes) or ``"hybrid"`` (both; same head layout).
        epochs: passes over the images.
        batch_size: images per step, over all processes together under ``torchrun``
            (each of ``W`` ranks takes about ``batch_size / W``; at least ``W``).
        image_size: ``(height, width)`` (or one int for squares) every image is resized
            to; a multiple of both adapters' ``size_divisor``.
        lr: peak learning rate.
        weight_decay: decoupled (AdamW) or L2 (SGD) weight decay, applied to weights of
            two or more dimensions only (not to biases and BatchNorm parameters).
        optimizer: ``"adamw"`` or ``"sgd"`` (momentum 0.937, Nesterov).
        warmup_epochs: the learning rate rises linearly over this many epochs (counted
            in steps), then follows a cosine from ``lr`` to ``lr * final_lr_ratio``.
        final_lr_ratio: the learning rate at the end of training, relative to ``lr``.
        ema: decay of the exponential moving average of the student weights, in
            ``[0, 1)``, or ``None`` to keep no average. The effective decay after ``n``
            updates is ``ema * (1 - exp(-n / ema_tau))``.
        ema_tau: updates over which the EMA decay ramps up.
        conf: score threshold of the teacher's pseudo labels, in ``[0, 1]``.
        iou: NMS IoU threshold of the teacher's pseudo labels, in ``[0, 1]``.
        score_sampling: keep each pseudo label with probability equal to its score (drawn
            anew every step) instead of every label above ``conf``.
        pseudo_weight: weight of the task loss against the output MSE in ``"hybrid"`` mode.
        augment: random horizontal flip, random resized crop (area 0.5-1) and
            brightness/contrast jitter of the training images; the teacher sees the
            same augmented images as the student.
        mosaic: probability that a training image is replaced by a 2x2 mosaic of four
            half-size images of its batch (before the other augmentations), in ``[0, 1]``.
        hsv: colour jitter gains ``(hue, saturation, value)``: per image a hue rotation of
            up to ``hue`` of a turn about the grey axis and saturation and value factors in
            ``[1 - gain, 1 + gain]``; ``(0, 0, 0)`` switches it off. ``None``: ``(0.015, 0.5, 0.3)``
            in the ``"pseudo_labels"`` and ``"hybrid"`` modes, where it helps a student learn from
            synthesized images, and off in ``"outputs"`` mode, where it does not
            (:attr:`colour_gains` is the value in effect).
        num_workers: ``DataLoader`` worker processes reading the images.
        seed: seed of the shuffling and the augmentation, ``>= 0``.
        amp: bfloat16 autocast of the forward passes.
        log_every: log the loss (averaged since the previous logging point) every this
            many steps and at the end of every epoch.
    """

    mode: Literal["outputs", "pseudo_labels", "hybrid"] = "outputs"
    epochs: int = 100
    batch_size: int = 16
    image_size: int | tuple[int, int] = 160
    lr: float = 1e-3
    weight_decay: float = 5e-4
    optimizer: Literal["adamw", "sgd"] = "adamw"
    warmup_epochs: float = 1.0
    final_lr_ratio: float = 0.05
    ema: float | None = 0.999
    ema_tau: float = 2000.0
    conf: float = 0.25
    iou: float = 0.45
    score_sampling: bool = False
    pseudo_weight: float = 0.05
    augment: bool = True
    mosaic: float = 0.0
    hsv: tuple[float, float, float] | None = None
    num_workers: int = 0
    seed: int = 0
    amp: bool = False
    log_every: int = 20

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        for name, minimum in (("epochs", 1), ("batch_size", 1), ("num_workers", 0), ("seed", 0),
                              ("log_every", 1)):
            check_int(name, getattr(self, name), minimum)
        size = self.image_size
        pair = (size, size) if isinstance(size, int) and not isinstance(size, bool) else size
        if (
            not isinstance(pair, Sequence)
            or len(pair) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair)
        ):
            raise ValueError(
                f"image_size must be a positive int or a (height, width) pair, got {size!r}"
            )
        object.__setattr__(self, "image_size", (int(pair[0]), int(pair[1])))
        check_number("lr", self.lr, 0.0, math.inf, open_low=True, open_high=True)
        check_number("weight_decay", self.weight_decay, 0.0, math.inf, open_high=True)
        check_number("warmup_epochs", self.warmup_epochs, 0.0, math.inf, open_high=True)
        check_number("final_lr_ratio", self.final_lr_ratio, 0.0, 1.0)
        if self.ema is not None:
            check_number("ema", self.ema, 0.0, 1.0, open_high=True)
        check_number("ema_tau", self.ema_tau, 0.0, math.inf, open_low=True, open_high=True)
        check_number("conf", self.conf, 0.0, 1.0)
        check_number("iou", self.iou, 0.0, 1.0)
        check_number("pseudo_weight", self.pseudo_weight, 0.0, math.inf, open_low=True, open_high=True)
        check_number("mosaic", self.mosaic, 0.0, 1.0)
        hsv = self.hsv
        if hsv is not None:
            if isinstance(hsv, (str, bytes)) or not isinstance(hsv, Sequence) or len(hsv) != 3:
                raise ValueError(f"hsv must be three gains (hue, saturation, value) or None, got {hsv!r}")
            for name, gain, high in zip(("hsv hue", "hsv saturation", "hsv value"), hsv, (0.5, 1.0, 1.0),
                                        strict=True):
                check_number(name, gain, 0.0, high)
            object.__setattr__(self, "hsv", tuple(float(g) for g in hsv))
        for name in ("augment", "amp", "score_sampling"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @property
    def colour_gains(self) -> tuple[float, float, float]:
        """The ``hsv`` gains in effect: ``hsv``, or the mode's default when it is ``None``."""
        if self.hsv is not None:
            return self.hsv
        return (0.0, 0.0, 0.0) if self.mode == "outputs" else _PSEUDO_LABEL_HSV

    def lr_at(self, progress: float) -> float:
        """The learning rate after ``progress`` epochs of training (``0 < progress <= epochs``)."""
        if self.warmup_epochs > 0 and progress <= self.warmup_epochs:
            return self.lr * progress / self.warmup_epochs
        span = self.epochs - self.warmup_epochs
        p = min(max((progress - self.warmup_epochs) / span, 0.0), 1.0) if span > 0 else 1.0
        cosine = 0.5 * (1.0 + math.cos(math.pi * p))
        return self.lr * (self.final_lr_ratio + (1.0 - self.final_lr_ratio) * cosine)


class Distiller:
    """Train ``student`` to imitate ``teacher`` on a folder of images.

    The teacher is put in eval mode and run without gradients; it is never updated.
    The student is trained in train mode from whatever weights it holds (a freshly
    built ``YOLOv3Adapter.from_config(...)`` trains from scratch; load weights into
    ``student.model`` before to start from them). Both must be on the same device,
    which is where training runs. Under ``torchrun`` call
    ``torch.distributed.init_process_group`` first and put both on this rank's device
    (``cuda:LOCAL_RANK``, or the CPU with the gloo backend); the student's weights are then
    made equal to rank 0's.

    Args:
        teacher: the supervising detector.
        student: the detector to train; at least one parameter must require gradients.
        config: the settings (default :class:`DistillConfig()`).
        **overrides: fields of :class:`DistillConfig` replacing those of ``config``.

    Raises:
        ValueError: devices differ, the image size is not a multiple of an adapter's
            ``size_divisor``, the global batch is smaller than the number of processes, or
            (``"outputs"``/``"hybrid"``) the raw outputs differ in structure or shape, or
            (``"pseudo_labels"``/``"hybrid"``) the class counts differ.
    """

    def __init__(self, teacher: DetectorAdapter, student: DetectorAdapter, *,
                 config: DistillConfig | None = None, **overrides: Any) -> None:
        if config is None:
            config = DistillConfig()
        if not isinstance(config, DistillConfig):
            raise TypeError(f"config must be a DistillConfig, got {type(config).__name__}")
        unknown = set(overrides) - {f.name for f in dataclasses.fields(DistillConfig)}
        if unknown:
            raise TypeError(f"unknown DistillConfig fields {sorted(unknown)}")
        self.config = dataclasses.replace(config, **overrides)
        for name, adapter in (("teacher", teacher), ("student", student)):
            if not isinstance(adapter, DetectorAdapter):
                raise TypeError(f"{name} must be a DetectorAdapter, got {type(adapter).__name__}")
        if teacher.model is student.model:
            raise ValueError("teacher and student are the same model; build a separate student")
        self.teacher = teacher
        self.student = student
        self.device = device_of(student, "student")
        teacher_device = device_of(teacher, "teacher")
        if teacher_device != self.device:
            raise ValueError(
                f"teacher is on {teacher_device} but student is on {self.device}; "
                "move both to the same device (adapter.to(device))"
            )
        self._check_size()
        params = [p for p in student.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(
                "student has no trainable parameters (a frozen adapter?); "
                "call student.model.requires_grad_(True) first"
            )
        c = self.config
        teacher.model.eval()
        if c.mode in ("outputs", "hybrid"):
            self._check_outputs()
        if c.mode in ("pseudo_labels", "hybrid") and teacher.num_classes != student.num_classes:
            raise ValueError(
                f"mode={c.mode!r} needs the teacher's classes, but the teacher has "
                f"{teacher.num_classes} and the student {student.num_classes}"
            )
        self.rank, self.world = rank_and_world()
        if c.batch_size < self.world:
            raise ValueError(f"batch_size {c.batch_size} is the global batch and must be at least the "
                             f"number of processes, {self.world}; raise batch_size")
        self._forward: nn.Module = _StudentForward(student)
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            # Construction broadcasts rank 0's parameters and buffers to every rank.
            self._forward = DistributedDataParallel(
                self._forward, device_ids=[self.device] if self.device.type == "cuda" else None)
        self.optimizer = _make_optimizer(student.model, c)
        self._ema: DetectorAdapter | None = None
        if c.ema is not None:
            self._ema = copy.deepcopy(student)
            self._ema.model.eval().requires_grad_(False)
        self._augment = AugmentationPipeline(
            jitter=0, flip=0.5, crop=(0.5, 1.0), brightness=0.1, contrast=0.1, erase=0.0
        )
        self.epoch = 0
        self.updates = 0
        self.history: list[dict[str, Any]] = []

    @property
    def image_size(self) -> tuple[int, int]:
        """``(height, width)`` of the training images."""
        return self.config.image_size  # type: ignore[return-value]

    def student_for_eval(self) -> DetectorAdapter:
        """The student to evaluate or export: its EMA copy (in eval mode), or itself without EMA."""
        return self._ema if self._ema is not None else self.student

    def save(self, path: PathLike) -> None:
        """Write the :meth:`student_for_eval` weights (``model.state_dict()``) atomically.

        Load them with ``student.model.load_state_dict(torch.load(path))``. Under ``torchrun``
        every rank holds the same weights; call this on rank 0 only.
        """
        _atomic_torch_save(self.student_for_eval().model.state_dict(), path)

    def fit(
        self,
        data: PathLike | DetectionFolder,
        *,
        out: PathLike | None = None,
        resume: bool = True,
        eval_fn: Callable[[DetectorAdapter, int], Mapping[str, Any]] | None = None,
        progress: bool | None = None,
    ) -> list[dict[str, Any]]:
        """Train until ``config.epochs`` epochs are done.

        Progress lines (every ``log_every`` steps and at every epoch end) go to this module's
        logger at INFO level and, with ``out``, to ``out/log.txt``.

        Args:
            data: an image folder (read by :class:`~diode.data.folder.DetectionFolder`,
                labels ignored, images resized to ``image_size``) or such a dataset built
                with the same ``image_size``.
            out: the run folder, written by rank 0 only: ``last.pt`` (full training state,
                written atomically after every epoch), ``student.pt`` (the :meth:`save`
                weights), ``log.txt`` (the progress lines), ``metrics.csv`` (one row per
                logging point: epoch, step, lr, loss and every loss term) and ``loss.png``
                (their curves); ``None`` writes nothing.
            resume: continue from ``out/last.pt`` if it exists (its settings must match,
                except ``num_workers`` and ``log_every``); ``False`` starts over and
                overwrites it.
            eval_fn: called on rank 0 after every epoch as ``eval_fn(student_for_eval(), epoch)``
                (``epoch`` counted from 1, the model in eval mode); its dict of numbers,
                strings, lists and dicts is stored in the history under ``"eval"``.
            progress: a tqdm bar over all steps with an ETA (rank 0); ``None`` shows it when
                standard error is an interactive terminal.

        Returns:
            The history, one dict per finished epoch: ``"epoch"``, ``"loss"`` (mean training
            loss), ``"terms"`` (mean of each loss term), ``"lr"`` (learning rate of the last
            step) and ``"eval"`` if ``eval_fn`` (rank 0).

        Raises:
            ValueError: no images, an unreadable image (named), or a checkpoint written
                with other settings (the changed settings named).
            FloatingPointError: the loss became NaN or infinite.
        """
        c = self.config
        folder = self._folder(data)
        checkpoint = Path(out) / CHECKPOINT if out is not None else None
        if checkpoint is not None and checkpoint.is_file():
            if resume:
                self._load(checkpoint)
            else:
                logger.warning("resume=False: starting over, %s will be overwritten", checkpoint)
        if self.epoch >= c.epochs:
            logger.info("all %d epochs are done already", c.epochs)
            return list(self.history)
        primary = self.rank == 0
        records = None
        if out is not None and primary:
            _remove_stale_temporaries(Path(out))
            done = self.epoch
            records = RunRecords(out, keep=(lambda row: int(row["epoch"]) <= done) if done else None)
        sampler = _ShardedBatches(len(folder), c.batch_size, c.seed, self.rank, self.world)
        loader = DataLoader(
            folder, batch_sampler=sampler, num_workers=c.num_workers,
            collate_fn=DetectionFolder.collate, pin_memory=self.device.type == "cuda",
            persistent_workers=c.num_workers > 0,
        )
        steps = len(loader)
        report = _Reporter(records, primary)
        split = f" ({self.world} processes)" if self.world > 1 else ""
        if self.epoch:
            report.line(f"resuming: {self.epoch}/{c.epochs} epochs already done")
        report.line(f"distilling ({c.mode}) on {len(folder)} images: batch {c.batch_size}{split}, "
                    f"{steps} steps per epoch, epochs {self.epoch + 1}-{c.epochs}")
        show = (sys.stderr.isatty() if progress is None else progress) and primary
        self.teacher.model.eval()
        saved = [self.epoch]  # the epochs a re-run skips: those in the last checkpoint, or in memory without out
        stopped = _stopped_after(saved, c.epochs, resumable=out is not None)
        with progress_bar(c.epochs * steps, initial=self.epoch * steps, show=show, logger=logger, desc="distill",
                          unit="step") as report.bar, stopped:
            for epoch in range(self.epoch, c.epochs):
                sampler.epoch = epoch
                start = time.perf_counter()
                entry = self._train_epoch(loader, sampler, epoch, report)
                if eval_fn is not None and primary:
                    entry["eval"] = self._evaluate(eval_fn, epoch + 1)
                self.history.append(entry)
                self.epoch = epoch + 1
                scores = "".join(f", {k} {v:.4g}" for k, v in entry.get("eval", {}).items()
                                 if isinstance(v, (int, float)) and not isinstance(v, bool))
                report.line(f"epoch {self.epoch}/{c.epochs} done: loss {entry['loss']:.4g}, "
                            f"lr {entry['lr']:.3g}, {time.perf_counter() - start:.1f} s{scores}")
                if out is not None and primary:
                    with _signals_deferred():
                        self._save_checkpoint(Path(out))
                        saved[0] = self.epoch
                        report.plot()
                else:  # nothing to write here (rank 0 writes under torchrun)
                    saved[0] = self.epoch
        barrier(self.world)
        return list(self.history)

    # training -----------------------------------------------------------------------------

    def _train_epoch(self, loader: DataLoader, sampler: _ShardedBatches, epoch: int,
                     report: _Reporter) -> dict[str, Any]:
        c = self.config
        steps = len(loader)
        self.student.model.train()
        epoch_sums: dict[str, Tensor] = {}
        window: dict[str, Tensor] = {}
        since = 0
        lr = c.lr
        logged: float | None = None
        for step, (images, _, _) in enumerate(loader):
            lr = c.lr_at(epoch + (step + 1) / steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            images = images.to(self.device, non_blocking=True)
            images = self._augmented(images, epoch, step)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=c.amp):
                loss, terms = self._loss(images, epoch, step)
            self.optimizer.zero_grad(set_to_none=True)
            (loss * sampler.weight(step)).backward()
            self.optimizer.step()
            self._update_ema()
            for name, value in {"loss": loss, **terms}.items():
                value = value.detach().float()
                epoch_sums[name] = epoch_sums[name] + value if name in epoch_sums else value
                window[name] = window[name] + value if name in window else value
            since += 1
            if (step + 1) % c.log_every == 0 or step + 1 == steps:
                values = self._mean_over_ranks(window, since, epoch, step)
                shown = ", ".join(f"{k} {v:.4g}" for k, v in values.items() if k != "loss")
                report.line(f"epoch {epoch + 1}/{c.epochs} step {step + 1}/{steps}: "
                            f"loss {values['loss']:.4g} ({shown}), lr {lr:.3g}")
                report.row({"epoch": epoch + 1, "step": step + 1, "progress": epoch + (step + 1) / steps,
                            "lr": lr, **values})
                window, since, logged = {}, 0, values["loss"]
            report.step(epoch, c.epochs, logged)
        means = self._mean_over_ranks(epoch_sums, steps, epoch, steps - 1)
        loss_mean = means.pop("loss")
        return {"epoch": epoch + 1, "loss": loss_mean, "terms": means, "lr": lr}

    def _mean_over_ranks(self, sums: Mapping[str, Tensor], count: int, epoch: int,
                         step: int) -> dict[str, float]:
        """Means of ``sums / count`` over all ranks, as checked finite floats (a host sync)."""
        stacked = torch.stack([sums[k] for k in sums]) / count
        if self.world > 1:
            torch.distributed.all_reduce(stacked)
            stacked = stacked / self.world
        return {k: _finite(v, epoch, step) for k, v in zip(sums, stacked, strict=True)}

    def _loss(self, images: Tensor, epoch: int, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of one step and its named terms."""
        c = self.config
        raw = self._forward(images)
        terms: dict[str, Tensor] = {}
        if c.mode in ("outputs", "hybrid"):
            with torch.no_grad():
                teacher = _leaves(self.teacher.forward(images), "teacher")
            student = _leaves(raw, "student")
            terms["outputs"] = torch.stack(
                [F.mse_loss(s.float(), t.float()) for (_, s), (_, t) in zip(student, teacher, strict=True)
                 if s.is_floating_point()]
            ).sum()
        if c.mode in ("pseudo_labels", "hybrid"):
            g = self._generator(2, epoch, step)
            targets = self._pseudo_labels(images, g)
            terms["task"] = self.student.task_loss(raw, targets, generator=g)
        if c.mode == "hybrid":
            return terms["outputs"] + c.pseudo_weight * terms["task"], terms
        return next(iter(terms.values())), terms

    def _pseudo_labels(self, images: Tensor, generator: torch.Generator) -> list[Target]:
        """Teacher detections as targets (degenerate boxes dropped), sampled by score if asked.

        Args:
            images: float ``[B, 3, H, W]`` in ``[0, 1]``.
            generator: on the images' device; draws the kept labels under ``score_sampling``.

        Returns:
            One dict per image, ``"boxes"`` ``[N, 4]`` xyxy pixels and ``"labels"`` ``[N]``.
        """
        detections = self.teacher.predict(images, conf=self.config.conf, iou=self.config.iou)
        if self.config.score_sampling:
            kept = []
            for d in detections:
                keep = torch.rand(d["scores"].shape, generator=generator, device=generator.device) < d["scores"]
                kept.append({k: v[keep] for k, v in d.items()})
            detections = kept
        return detections_as_targets(detections)

    def _generator(self, purpose: int, epoch: int, step: int) -> torch.Generator:
        """A generator on the training device seeded by ``(seed, purpose, epoch, step, rank)``."""
        key = derive_seed(self.config.seed, purpose, epoch, step, self.rank)
        return torch.Generator(device=self.device).manual_seed(key)

    def _augmented(self, images: Tensor, epoch: int, step: int) -> Tensor:
        """Mosaic, flip, crop-zoom and colour-jitter ``images`` as configured, seeded by the step.

        Args:
            images: float ``[B, 3, H, W]`` in ``[0, 1]``; not modified.

        Returns:
            float ``[B, 3, H, W]`` in ``[0, 1]`` (``images`` itself when nothing is on).
        """
        c = self.config
        if not (c.augment or c.mosaic > 0 or any(c.colour_gains)):
            return images
        g = self._generator(1, epoch, step)
        if c.mosaic > 0:
            images = _mosaic(images, c.mosaic, g)
        if c.augment:
            no_boxes = images.new_zeros(0, 4)
            no_index = torch.zeros(0, dtype=torch.long, device=self.device)
            images = self._augment.forward_packed(images, no_index, no_index, no_boxes, generator=g)[0]
        if any(c.colour_gains):
            images = _colour_jitter(images, c.colour_gains, g)
        return images.clamp(0, 1)

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self._ema is None or self.config.ema is None:
            return
        self.updates += 1
        decay = self.config.ema * (1.0 - math.exp(-self.updates / self.config.ema_tau))
        current = self.student.model.state_dict()
        for key, value in self._ema.model.state_dict().items():
            if value.dtype.is_floating_point:
                value.lerp_(current[key], 1.0 - decay)
            else:
                value.copy_(current[key])

    def _evaluate(self, eval_fn: Callable[[DetectorAdapter, int], Mapping[str, Any]],
                  epoch: int) -> dict[str, Any]:
        adapter = self.student_for_eval()
        with module_mode(adapter.model, False):
            result = eval_fn(adapter, epoch)
        if not isinstance(result, Mapping):
            raise TypeError(f"eval_fn must return a dict, got {type(result).__name__}")
        return _plain(result)

    # checks and I/O -----------------------------------------------------------------------

    def _check_size(self) -> None:
        """Raise ``ValueError`` unless ``image_size`` is a multiple of both adapters' size divisors."""
        h, w = self.image_size
        for name, adapter in (("teacher", self.teacher), ("student", self.student)):
            divisor = adapter.size_divisor
            if isinstance(divisor, bool) or not isinstance(divisor, int) or divisor < 1:
                raise TypeError(f"{name}.size_divisor must be a positive int, got {divisor!r}")
            if h % divisor or w % divisor:
                raise ValueError(
                    f"image_size {h}x{w} is not a multiple of the {name}'s size divisor {divisor}; "
                    f"use e.g. image_size=({_round_to(h, divisor)}, {_round_to(w, divisor)})"
                )

    def _check_outputs(self) -> None:
        """Raise ``ValueError`` unless the raw outputs of teacher and student have equal structure and shapes."""
        x = torch.zeros(1, 3, *self.image_size, device=self.device)
        with torch.no_grad(), module_mode(self.student.model, False):
            teacher = [(path, tuple(t.shape)) for path, t in _leaves(self.teacher.forward(x), "teacher")]
            student = [(path, tuple(s.shape)) for path, s in _leaves(self.student.forward(x), "student")]
        if teacher != student:
            def shown(leaves: list[tuple[str, tuple[int, ...]]]) -> str:
                return "[" + ", ".join(f"{path or 'raw'} {shape}" for path, shape in leaves) + "]"

            raise ValueError(
                f"mode={self.config.mode!r} needs raw outputs of the same structure and shapes, but for "
                f"one {self.image_size[0]}x{self.image_size[1]} image the teacher gives {shown(teacher)} "
                f"and the student {shown(student)}; use mode='pseudo_labels' for a student with "
                f"another head layout or class count"
            )

    def _folder(self, data: PathLike | DetectionFolder) -> DetectionFolder:
        if isinstance(data, DetectionFolder):
            if data.image_size != self.image_size:
                raise ValueError(
                    f"data resizes images to {data.image_size} but image_size is "
                    f"{self.image_size}; build it with DetectionFolder(root, "
                    f"image_size={self.image_size}) or pass the folder path"
                )
            return data
        if not isinstance(data, (str, os.PathLike)):
            raise TypeError(f"data must be a folder path or a DetectionFolder, got "
                            f"{type(data).__name__}")
        return DetectionFolder(data, image_size=self.image_size, labels="none")

    def _save_checkpoint(self, out: Path) -> None:
        state = {
            "format": _FORMAT,
            "epoch": self.epoch,
            "updates": self.updates,
            "config": _plain(dataclasses.asdict(self.config)),
            "student": self.student.model.state_dict(),
            "ema": self._ema.model.state_dict() if self._ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "history": self.history,
        }
        _atomic_torch_save(state, out / CHECKPOINT)
        self.save(out / STUDENT_WEIGHTS)

    def _load(self, path: Path) -> None:
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as e:
            raise ValueError(f"cannot read checkpoint {path}: {e}") from e
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a diode distillation checkpoint; "
                             "use another out folder or resume=False")
        saved, now = state["config"], _plain(dataclasses.asdict(self.config))
        diff = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in now.items()
                if k not in _RESUME_FREE and saved.get(k) != v]
        if diff:
            raise ValueError(
                f"checkpoint {path} was written with other settings ({'; '.join(diff)}); "
                "use the same settings, another out folder, or resume=False to start over"
            )
        try:
            self.student.model.load_state_dict(state["student"])
            if self._ema is not None:
                self._ema.model.load_state_dict(state["ema"])
        except RuntimeError as e:
            raise ValueError(f"checkpoint {path} holds another student architecture ({e}); "
                             "use another out folder, or resume=False to start over") from e
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.updates = int(state["epoch"]), int(state["updates"])
        self.history = list(state["history"])
        logger.info("resumed from %s after epoch %d", path, self.epoch)


class _StudentForward(nn.Module):
    """The student adapter's forward as a module over its model (what DDP wraps)."""

    def __init__(self, adapter: DetectorAdapter) -> None:
        super().__init__()
        self.net = adapter.model
        self.adapter = adapter

    def forward(self, images: Tensor) -> Any:
        return self.adapter.forward(images)


class _ShardedBatches(Sampler[list[int]]):
    """This rank's share of each global batch of an epoch permutation; set ``epoch`` first.

    The permutation of ``range(n)`` depends only on ``(seed, epoch)``; it is cut into global
    batches of ``batch_size`` and rank ``r`` of ``world`` takes the ``r``-th of ``world``
    near-equal slices of each (a last batch smaller than ``world`` is first repeated cyclically).
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world, self.epoch = rank, world, 0

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def permutation(self) -> Tensor:
        """The epoch's order of all ``n`` indices, the same on every rank."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, 0, self.epoch))
        return torch.randperm(self.n, generator=g)

    def __iter__(self) -> Iterator[list[int]]:
        for chunk in self.permutation().split(self.batch_size):
            yield self._padded(chunk).tensor_split(self.world)[self.rank].tolist()

    def weight(self, step: int) -> float:
        """This rank's loss weight at ``step``: its share of the global batch times ``world``."""
        size = max(min(self.batch_size, self.n - step * self.batch_size), self.world)
        mine = size // self.world + (self.rank < size % self.world)
        return mine * self.world / size

    def _padded(self, chunk: Tensor) -> Tensor:
        if len(chunk) >= self.world:
            return chunk
        return chunk.repeat(-(-self.world // len(chunk)))[: self.world]


class _Reporter:
    """Progress lines to the logger (rank 0) and ``log.txt``, rows to ``metrics.csv``, and the tqdm bar."""

    def __init__(self, records: RunRecords | None, primary: bool) -> None:
        self.records = records
        self.primary = primary
        self.bar: Any = None

    def line(self, text: str) -> None:
        if self.primary:
            logger.info(text)
        if self.records is not None:
            self.records.log(text)

    def row(self, values: Mapping[str, float | int]) -> None:
        if self.records is not None:
            self.records.add_row(values)

    def step(self, epoch: int, epochs: int, loss: float | None = None) -> None:
        """Advance the bar by one step (showing the latest logged loss)."""
        if self.bar is None:
            return
        self.bar.set_description(f"epoch {epoch + 1}/{epochs}", refresh=False)
        if loss is not None:
            self.bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
        self.bar.update()

    def plot(self) -> None:
        if self.records is not None and self.records.rows:
            terms = [k for k in self.records.columns if k not in ("epoch", "step", "progress", "lr")]
            self.records.plot(x="progress", ys=terms, title="distillation loss per logging point (x: epochs)")


def _mosaic(images: Tensor, p: float, generator: torch.Generator) -> Tensor:
    """Replace each image with probability ``p`` by a 2x2 mosaic of four half-size images of the batch.

    Args:
        images: float ``[B, 3, H, W]``; not modified.
        p: probability per image.
        generator: on the images' device.

    Returns:
        float ``[B, 3, H, W]``; the four tiles of a mosaic are drawn uniformly from the batch.
    """
    b, _, h, w = images.shape
    dev = images.device
    use = torch.rand(b, generator=generator, device=dev) < p
    sources = torch.randint(0, b, (b, 4), generator=generator, device=dev)
    top, left = h // 2, w // 2
    sizes = ((top, left), (top, w - left), (h - top, left), (h - top, w - left))
    tiles = [F.interpolate(images[sources[:, k]], size=size, mode="bilinear", align_corners=False,
                           antialias=True) for k, size in enumerate(sizes)]
    mosaic = torch.cat((torch.cat(tiles[:2], dim=3), torch.cat(tiles[2:], dim=3)), dim=2)
    return torch.where(use[:, None, None, None], mosaic, images)


def _colour_jitter(images: Tensor, gains: tuple[float, float, float], generator: torch.Generator) -> Tensor:
    """Per-image hue rotation about the grey axis, then saturation and value scaling.

    Args:
        images: float ``[B, 3, H, W]`` RGB in ``[0, 1]``; not modified.
        gains: ``(hue, saturation, value)``: hue turns up to ``hue`` (fraction of a full
            turn), saturation and value factors in ``[1 - gain, 1 + gain]``.
        generator: on the images' device.

    Returns:
        float ``[B, 3, H, W]``, not clamped.
    """
    b = images.shape[0]
    dev = images.device
    draws = torch.rand(3, b, generator=generator, device=dev) * 2 - 1
    hue, sat, val = (draws[i] * gains[i] for i in range(3))
    angle = 2 * math.pi * hue
    cos, sin = angle.cos()[:, None, None], angle.sin()[:, None, None]
    k = torch.full((3,), 1 / math.sqrt(3), device=dev)
    cross = torch.tensor([[0.0, -1.0, 1.0], [1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]], device=dev) / math.sqrt(3)
    # Rodrigues' rotation about the grey axis k: cos I + sin [k]x + (1 - cos) k k^T.
    rotation = cos * torch.eye(3, device=dev) + sin * cross + (1 - cos) * torch.outer(k, k)
    x = torch.einsum("bij,bjhw->bihw", rotation.to(images.dtype), images)
    v = x.amax(dim=1, keepdim=True)
    x = v - (1 + sat)[:, None, None, None] * (v - x)
    return x * (1 + val)[:, None, None, None]


def _round_to(size: int, divisor: int) -> int:
    return max(divisor, round(size / divisor) * divisor)


def _make_optimizer(model: nn.Module, config: DistillConfig) -> torch.optim.Optimizer:
    """AdamW or SGD, with weight decay only on parameters of two or more dimensions."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=_SGD_MOMENTUM, nesterov=True)
    return torch.optim.AdamW(groups, lr=config.lr)


def _leaves(raw: Any, name: str, path: str = "") -> list[tuple[str, Tensor]]:
    """The tensors of raw outputs nested in lists, tuples and dicts, with their paths.

    Dict keys are visited in sorted order and ``None`` entries skipped, so two models of
    the same architecture give the same paths in the same order.
    """
    if isinstance(raw, Tensor):
        return [(path, raw)]
    if raw is None:
        return []
    if isinstance(raw, Mapping):
        items = [(f"{path}[{k!r}]", raw[k]) for k in sorted(raw, key=str)]
    elif isinstance(raw, (list, tuple)):
        items = [(f"{path}[{i}]", v) for i, v in enumerate(raw)]
    else:
        where = f" at {path}" if path else ""
        raise TypeError(
            f"the outputs modes need the {name}'s raw outputs as tensors, possibly nested in lists, tuples "
            f"and dicts, but it holds a {type(raw).__name__}{where}; use mode='pseudo_labels'"
        )
    return [leaf for sub_path, value in items for leaf in _leaves(value, name, sub_path)]


def _finite(value: Tensor, epoch: int, step: int) -> float:
    number = float(value.detach())
    if not math.isfinite(number):
        raise FloatingPointError(
            f"the distillation loss is {number} at epoch {epoch + 1}, step {step + 1}; "
            "lower lr, raise warmup_epochs or turn amp off"
        )
    return number


def _plain(value: Any) -> Any:
    """``value`` with only builtin numbers, strings, lists and dicts (safe to torch.load)."""
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(
        f"eval_fn results must be numbers, strings, lists or dicts, got {type(value).__name__}"
    )


def _atomic_torch_save(obj: Any, path: PathLike) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _remove_stale_temporaries(out: Path) -> None:
    """Delete temporary files a killed run left behind (atomic writes are ``.NAME.*.tmp``)."""
    for name in (CHECKPOINT, STUDENT_WEIGHTS, LOG, METRICS, PLOT):
        for tmp in out.glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM arriving in the block take effect right after it (so a checkpoint is whole).

    Outside the main thread, or for a signal whose handler was not set from Python, nothing is deferred.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    previous = {s: h for s, h in previous.items() if h is not None}
    for s in previous:
        signal.signal(s, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if caught:
        signal.raise_signal(caught[0])


@contextlib.contextmanager
def _stopped_after(saved: list[int], epochs: int, *, resumable: bool) -> Iterator[None]:
    """Turn a ``KeyboardInterrupt`` (Ctrl-C, or SIGTERM under the CLI) into the one-line :class:`RunInterrupted`.

    ``saved[0]`` is read when the interrupt arrives: the epochs a re-run resumes after.
    """
    try:
        yield
    except KeyboardInterrupt as e:
        hint = "; re-run the same command to resume" if resumable else ""
        raise RunInterrupted(f"interrupted after {saved[0]}/{epochs} epochs{hint}", signum=signal_number(e)) from e
