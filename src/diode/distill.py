"""`Distiller`: train a student detector on unlabelled images with a teacher as the only supervisor.

Two modes:

- ``"outputs"`` (the reference DIODE method): the loss is the sum over heads of the
  mean squared error between the student's and the teacher's raw outputs on the same
  (augmented) images. Teacher and student must produce outputs of the same structure
  and shapes (same head layout and classes), which is checked at construction.
- ``"pseudo_labels"``: the teacher's detections after NMS (score above ``conf``) are
  the targets of the student's own task loss; any student with the teacher's classes.

Training is reproducible and resumable: the shuffling of epoch ``e`` and the
augmentation of step ``s`` of it are seeded from ``(seed, e, s)`` alone, and the
learning rate is a function of the training progress, so a run resumed from its
last checkpoint ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler

from diode._boxes import Target, detections_as_targets
from diode.adapters.base import DetectorAdapter
from diode.data.folder import DetectionFolder
from diode.data.io import PathLike, atomic_write_bytes
from diode.inversion.augment import AugmentationPipeline

logger = logging.getLogger(__name__)

__all__ = ["DistillConfig", "Distiller"]

MODES = ("outputs", "pseudo_labels")
OPTIMIZERS = ("adamw", "sgd")
CHECKPOINT = "last.pt"
STUDENT_WEIGHTS = "student.pt"
_FORMAT = "diode.distill/1"
# Fields that do not change the result and so may differ when resuming.
_RESUME_FREE = ("num_workers", "log_every")
_SGD_MOMENTUM = 0.937


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_number(name: str, value: Any, low: float, high: float, *, open_low: bool = False,
                  open_high: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok:
        ok = (value > low if open_low else value >= low) and (
            value < high if open_high else value <= high
        )
    if not ok:
        interval = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Settings of a distillation run.

    Args:
        mode: ``"outputs"`` (MSE between raw outputs; same head layout) or
            ``"pseudo_labels"`` (teacher detections as targets of the student's task loss).
        epochs: passes over the images.
        batch_size: images per step.
        image_size: ``(height, width)`` (or one int for squares) every image is resized
            to; for darknet models a multiple of the model stride (32).
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
        augment: random horizontal flip, random resized crop (area 0.5-1) and
            brightness/contrast jitter of the training images; the teacher sees the
            same augmented images as the student.
        num_workers: ``DataLoader`` worker processes reading the images.
        seed: seed of the shuffling and the augmentation, ``>= 0``.
        amp: bfloat16 autocast of the forward passes.
        log_every: log the loss every this many steps.
    """

    mode: Literal["outputs", "pseudo_labels"] = "outputs"
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
    augment: bool = True
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
            _check_int(name, getattr(self, name), minimum)
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
        _check_number("lr", self.lr, 0.0, math.inf, open_low=True, open_high=True)
        _check_number("weight_decay", self.weight_decay, 0.0, math.inf, open_high=True)
        _check_number("warmup_epochs", self.warmup_epochs, 0.0, math.inf, open_high=True)
        _check_number("final_lr_ratio", self.final_lr_ratio, 0.0, 1.0)
        if self.ema is not None:
            _check_number("ema", self.ema, 0.0, 1.0, open_high=True)
        _check_number("ema_tau", self.ema_tau, 0.0, math.inf, open_low=True, open_high=True)
        _check_number("conf", self.conf, 0.0, 1.0)
        _check_number("iou", self.iou, 0.0, 1.0)
        for name in ("augment", "amp"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

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
    which is where training runs.

    Args:
        teacher: the supervising detector.
        student: the detector to train; at least one parameter must require gradients.
        config: the settings (default :class:`DistillConfig()`).
        **overrides: fields of :class:`DistillConfig` replacing those of ``config``.

    Raises:
        ValueError: devices differ, the image size does not suit a model, or (``"outputs"``
            mode) the raw outputs differ in structure or shape, or (``"pseudo_labels"``
            mode) the class counts differ.
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
        self.device = _device_of(student, "student")
        teacher_device = _device_of(teacher, "teacher")
        if teacher_device != self.device:
            raise ValueError(
                f"teacher is on {teacher_device} but student is on {self.device}; "
                "move both to the same device (adapter.to(device))"
            )
        h, w = self.image_size
        for name, adapter in (("teacher", teacher), ("student", student)):
            stride = getattr(adapter.model, "max_stride", None)
            if isinstance(stride, int) and (h % stride or w % stride):
                raise ValueError(
                    f"image_size {h}x{w} is not a multiple of the {name}'s stride {stride}; "
                    f"use e.g. image_size=({_round_to(h, stride)}, {_round_to(w, stride)})"
                )
        params = [p for p in student.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(
                "student has no trainable parameters (a frozen adapter?); "
                "call student.model.requires_grad_(True) first"
            )
        teacher.model.eval()
        if self.config.mode == "outputs":
            self._check_outputs()
        elif teacher.num_classes != student.num_classes:
            raise ValueError(
                f"mode='pseudo_labels' needs the teacher's classes, but the teacher has "
                f"{teacher.num_classes} and the student {student.num_classes}"
            )
        self.optimizer = _make_optimizer(student.model, self.config)
        self._ema: DetectorAdapter | None = None
        if self.config.ema is not None:
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

        Load them with ``student.model.load_state_dict(torch.load(path))``.
        """
        _atomic_torch_save(self.student_for_eval().model.state_dict(), path)

    def fit(
        self,
        data: PathLike | DetectionFolder,
        *,
        out: PathLike | None = None,
        resume: bool = True,
        eval_fn: Callable[[DetectorAdapter, int], Mapping[str, Any]] | None = None,
        progress: bool = False,
    ) -> list[dict[str, Any]]:
        """Train until ``config.epochs`` epochs are done.

        Args:
            data: an image folder (read by :class:`~diode.data.folder.DetectionFolder`,
                labels ignored, images resized to ``image_size``) or such a dataset built
                with the same ``image_size``.
            out: folder for ``last.pt`` (full training state, written after every epoch)
                and ``student.pt`` (the :meth:`save` weights); ``None`` writes nothing.
            resume: continue from ``out/last.pt`` if it exists (its settings must match,
                except ``num_workers`` and ``log_every``); ``False`` starts over and
                overwrites it.
            eval_fn: called after every epoch as ``eval_fn(student_for_eval(), epoch)``
                (``epoch`` counted from 1, the model in eval mode); its dict of numbers,
                strings, lists and dicts is stored in the history under ``"eval"``.
            progress: show a tqdm bar over the steps of each epoch.

        Returns:
            The history, one dict per finished epoch: ``"epoch"``, ``"loss"`` (mean training
            loss), ``"lr"`` (learning rate of the last step) and ``"eval"`` if ``eval_fn``.

        Raises:
            ValueError: no images, an unreadable image (named), or a checkpoint written
                with other settings.
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
        sampler = _EpochShuffle(len(folder), c.seed)
        loader = DataLoader(
            folder, batch_size=c.batch_size, sampler=sampler, num_workers=c.num_workers,
            collate_fn=DetectionFolder.collate, pin_memory=self.device.type == "cuda",
            persistent_workers=c.num_workers > 0,
        )
        logger.info("distilling (%s) on %d images, %d steps per epoch, epochs %d-%d", c.mode,
                    len(folder), len(loader), self.epoch + 1, c.epochs)
        self.teacher.model.eval()
        for epoch in range(self.epoch, c.epochs):
            sampler.epoch = epoch
            start = time.perf_counter()
            entry = self._train_epoch(loader, epoch, progress)
            if eval_fn is not None:
                entry["eval"] = self._evaluate(eval_fn, epoch + 1)
            self.history.append(entry)
            self.epoch = epoch + 1
            logger.info("epoch %d/%d: loss %.6g, lr %.3g, %.1f s", self.epoch, c.epochs,
                        entry["loss"], entry["lr"], time.perf_counter() - start)
            if out is not None:
                self._save_checkpoint(Path(out))
        return list(self.history)

    # training -----------------------------------------------------------------------------

    def _train_epoch(self, loader: DataLoader, epoch: int, progress: bool) -> dict[str, Any]:
        c = self.config
        steps = len(loader)
        self.student.model.train()
        total = torch.zeros((), device=self.device)
        bar = _progress_bar(steps, f"epoch {epoch + 1}/{c.epochs}") if progress else None
        lr = c.lr
        try:
            for step, (images, _, _) in enumerate(loader):
                lr = c.lr_at(epoch + (step + 1) / steps)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                images = images.to(self.device, non_blocking=True)
                if c.augment:
                    images = self._augmented(images, epoch, step)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=c.amp):
                    loss = self._loss(images)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self._update_ema()
                total += loss.detach().float()
                if (step + 1) % c.log_every == 0:
                    value = _finite(loss, epoch, step)
                    logger.info("epoch %d step %d/%d: loss %.6g, lr %.3g", epoch + 1, step + 1,
                                steps, value, lr)
                    if bar is not None:
                        bar.set_postfix(loss=f"{value:.4g}")
                if bar is not None:
                    bar.update()
        finally:
            if bar is not None:
                bar.close()
        return {"epoch": epoch + 1, "loss": _finite(total / steps, epoch, steps - 1), "lr": lr}

    def _loss(self, images: Tensor) -> Tensor:
        if self.config.mode == "outputs":
            with torch.no_grad():
                teacher = _flatten(self.teacher.forward(images), "teacher")
            student = _flatten(self.student.forward(images), "student")
            return torch.stack(
                [F.mse_loss(s.float(), t.float()) for s, t in zip(student, teacher, strict=True)]
            ).sum()
        targets = self._pseudo_labels(images)
        return self.student.task_loss(self.student.forward(images), targets)

    def _pseudo_labels(self, images: Tensor) -> list[Target]:
        """Teacher detections as targets; degenerate boxes (possible after clipping) dropped."""
        return detections_as_targets(self.teacher.predict(images, conf=self.config.conf, iou=self.config.iou))

    def _augmented(self, images: Tensor, epoch: int, step: int) -> Tensor:
        """Flip, crop-zoom and colour-jitter ``images``, seeded by (seed, epoch, step)."""
        g = torch.Generator(device=self.device).manual_seed(
            _derive_seed(self.config.seed, 1, epoch, step)
        )
        no_boxes = images.new_zeros(0, 4)
        no_index = torch.zeros(0, dtype=torch.long, device=self.device)
        out = self._augment.forward_packed(images, no_index, no_index, no_boxes, generator=g)[0]
        return out.clamp_(0, 1)

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
        with _training(adapter.model, False):
            result = eval_fn(adapter, epoch)
        if not isinstance(result, Mapping):
            raise TypeError(f"eval_fn must return a dict, got {type(result).__name__}")
        return _plain(result)

    # checks and I/O -----------------------------------------------------------------------

    def _check_outputs(self) -> None:
        """Raise ``ValueError`` unless the raw outputs of teacher and student have equal shapes."""
        x = torch.zeros(1, 3, *self.image_size, device=self.device)
        with torch.no_grad(), _training(self.student.model, False):
            teacher = _flatten(self.teacher.forward(x), "teacher")
            student = _flatten(self.student.forward(x), "student")
        t_shapes = [tuple(t.shape) for t in teacher]
        s_shapes = [tuple(s.shape) for s in student]
        if t_shapes != s_shapes:
            raise ValueError(
                f"mode='outputs' needs raw outputs of the same shapes, but for one "
                f"{self.image_size[0]}x{self.image_size[1]} image the teacher gives {t_shapes} "
                f"and the student {s_shapes}; use mode='pseudo_labels' for a student with "
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
        diff = [f"{k}: checkpoint {saved.get(k)!r}, now {v!r}" for k, v in now.items()
                if k not in _RESUME_FREE and saved.get(k) != v]
        if diff:
            raise ValueError(
                f"checkpoint {path} was written with other settings ({'; '.join(diff)}); "
                "use the same settings, another out folder, or resume=False to start over"
            )
        self.student.model.load_state_dict(state["student"])
        if self._ema is not None:
            self._ema.model.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.updates = int(state["epoch"]), int(state["updates"])
        self.history = list(state["history"])
        logger.info("resumed from %s after epoch %d", path, self.epoch)


class _EpochShuffle(Sampler[int]):
    """A permutation of ``range(n)`` that depends only on ``(seed, epoch)``; set ``epoch`` first."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(_derive_seed(self.seed, 0, self.epoch))
        return iter(torch.randperm(self.n, generator=g).tolist())


def _derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from non-negative ints."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> 1)


def _round_to(size: int, stride: int) -> int:
    return max(stride, round(size / stride) * stride)


def _device_of(adapter: DetectorAdapter, name: str) -> torch.device:
    param = next(iter(adapter.model.parameters()), None)
    if param is None:
        raise ValueError(f"{name}.model has no parameters")
    return param.device


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


def _flatten(raw: Any, name: str) -> list[Tensor]:
    """Raw outputs (a tensor, a sequence or a dict of tensors) as a list of tensors."""
    if isinstance(raw, Tensor):
        return [raw]
    items = list(raw.values()) if isinstance(raw, Mapping) else raw
    if isinstance(items, Sequence) and all(isinstance(t, Tensor) for t in items):
        return list(items)
    raise TypeError(
        f"mode='outputs' needs the {name}'s raw outputs as a tensor or a list/dict of tensors, "
        f"got {type(raw).__name__}; use mode='pseudo_labels'"
    )


@contextlib.contextmanager
def _training(module: nn.Module, mode: bool) -> Iterator[None]:
    """Set ``module``'s train/eval mode for the block, then restore it."""
    before = module.training
    module.train(mode)
    try:
        yield
    finally:
        module.train(before)


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


def _progress_bar(total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
