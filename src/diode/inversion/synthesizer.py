"""`Synthesizer`: optimise noise into images the frozen teacher detects as the sampled targets."""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from diode._boxes import Target, pack_targets, unpack_targets, validate_targets
from diode._progress import progress_bar
from diode._utils import device_of
from diode.adapters.base import DetectorAdapter
from diode.inversion.augment import AugmentationPipeline
from diode.inversion.loss import LOSS_OPTIONS, DeepInversionLoss, check_loss_options
from diode.inversion.sampler import FPSampling, add_false_positives

logger = logging.getLogger(__name__)

#: The loss weights a :class:`Stage` may scale (``num_bn_layers`` is a count, not a weight).
_SCALABLE = tuple(k for k in LOSS_OPTIONS if k != "num_bn_layers")


@dataclass
class Stage:
    """One resolution of the coarse-to-fine schedule.

    Args:
        resolution: canvas size in pixels, ``int`` (square) or ``(height, width)``.
        iterations: optimisation steps at this resolution.
        lr: Adam learning rate at the start (cosine-annealed to ``min_lr``).
        min_lr: learning rate at the last step.
        betas: Adam betas; the reference uses ``(0, 0)`` (sign-like steps).
        augment: augmentation for this stage (``None``: the synthesizer's).
        loss: overrides of :class:`DeepInversionLoss` weights for this stage,
            e.g. ``{"first_bn_weight": 0.0, "num_bn_layers": 0.7}``.
        loss_scale: factors on the synthesizer's loss weights for this stage (after ``loss``),
            e.g. ``{"w_task": 4.0}``; relative, so a schedule keeps each teacher's own balance.
        fp_sampling: whether false-positive sampling (if configured) runs here.
    """

    resolution: int | tuple[int, int]
    iterations: int
    lr: float = 0.2
    min_lr: float = 0.0
    betas: tuple[float, float] = (0.0, 0.0)
    augment: AugmentationPipeline | None = None
    loss: dict[str, Any] = field(default_factory=dict)
    loss_scale: dict[str, float] = field(default_factory=dict)
    fp_sampling: bool = True

    def __post_init__(self) -> None:
        res = (self.resolution, self.resolution) if isinstance(self.resolution, int) else tuple(self.resolution)
        if len(res) != 2 or min(res) < 8:
            raise ValueError(f"Stage resolution must be an int or (height, width) >= 8, got {self.resolution}")
        self.resolution = (int(res[0]), int(res[1]))
        if self.iterations < 1:
            raise ValueError(f"Stage iterations must be >= 1, got {self.iterations}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"Stage needs lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"Stage betas must be two values in [0, 1), got {self.betas}")
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        check_loss_options(self.loss)
        check_loss_options(self.loss_scale)
        for name, factor in self.loss_scale.items():
            if name not in _SCALABLE or isinstance(factor, bool) or not isinstance(factor, (int, float)) \
                    or not (math.isfinite(factor) and factor >= 0):
                raise ValueError(f"Stage loss_scale[{name!r}] must be a finite factor >= 0 on one of "
                                 f"{', '.join(_SCALABLE)}, got {factor!r}")
        self.loss_scale = {k: float(v) for k, v in self.loss_scale.items()}

    def loss_for(self, loss: DeepInversionLoss) -> DeepInversionLoss:
        """``loss`` with this stage's overrides, then its factors, applied (``loss`` itself if none)."""
        if not self.loss and not self.loss_scale:
            return loss
        options = {**loss.options(), **self.loss}
        return loss.replace(**{**self.loss, **{k: options[k] * f for k, f in self.loss_scale.items()}})

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)``."""
        return self.resolution  # type: ignore[return-value]

    def lr_at(self, iteration: int) -> float:
        """Cosine schedule from ``lr`` (iteration 0) to ``min_lr`` (last iteration)."""
        t = iteration / max(1, self.iterations - 1)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * t))

    def describe(self) -> dict[str, Any]:
        """JSON-serializable description (for manifests)."""
        d = asdict(self)
        d["augment"] = None if self.augment is None else repr(self.augment)
        return d


#: Stage 2 of the reference recipe matches the first 51 of YOLOv3's 72 BN layers; as a fraction
#: it applies to any teacher.
STAGE2_BN_FRACTION = 51 / 72


#: :func:`fast_stages` defaults, measured on the COCO yolov3-tiny (docs/guide/synthesis.rst).
FAST_COARSE_FRACTION = 0.5
FAST_FINE_LR = 0.02
FAST_TASK_SCALE = 8.0


def reference_stages() -> list[Stage]:
    """The original DIODE recipe: 2500 iterations at 160 px, then 1500 at 320 px.

    Stage 2's BatchNorm limit, 51 layers of YOLOv3's 72 in the reference, is the fraction
    :data:`STAGE2_BN_FRACTION` of the teacher's layers, so the recipe applies to any detector.
    """
    return [
        Stage(160, 2500, lr=0.2, min_lr=0.0, betas=(0.0, 0.0)),
        Stage(320, 1500, lr=0.002, min_lr=0.0005, betas=(0.0, 0.0), augment=AugmentationPipeline(jitter=40),
              loss={"first_bn_weight": 0.0, "num_bn_layers": STAGE2_BN_FRACTION, "w_task": 1.0},
              fp_sampling=False),
    ]


def fast_stages(
    iterations: int = 200,
    resolution: int | tuple[int, int] = 160,
    *,
    coarse_fraction: float = FAST_COARSE_FRACTION,
    lr: float = 0.2,
    fine_lr: float = FAST_FINE_LR,
    task_scale: float = FAST_TASK_SCALE,
) -> list[Stage]:
    """A coarse-to-fine schedule for short budgets (the ``diode synthesize`` default).

    The first ``coarse_fraction`` of ``iterations`` run at half ``resolution`` (a quarter of
    the pixels, so about a quarter of the cost per iteration) with learning rate ``lr``;
    the rest run at ``resolution``, from the upsampled images, with the lower ``fine_lr``
    (the recipe's sign-like Adam steps at ``lr`` would bring back the pixel noise the coarse
    stage avoided). Both stages multiply the loss's task weight by ``task_scale``. The loss
    weights are otherwise the synthesizer's (the teacher's defaults), and the augmentation
    is the synthesizer's (the recipe's) in both stages.

    Args:
        iterations: total optimisation steps, ``>= 2``.
        resolution: final canvas, ``int`` (square) or ``(height, width)``.
        coarse_fraction: share of ``iterations`` at half resolution, in ``[0, 1)``; ``0`` gives
            one stage at ``resolution`` with ``lr``.
        lr: learning rate of the first stage (cosine-annealed to 0).
        fine_lr: learning rate of the full-resolution stage after a coarse one (cosine to 0).
        task_scale: factor on the task weight in both stages.

    Returns:
        One or two :class:`Stage`.
    """
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 2:
        raise ValueError(f"iterations must be an int >= 2, got {iterations!r}")
    if not 0 <= coarse_fraction < 1:
        raise ValueError(f"coarse_fraction must be in [0, 1), got {coarse_fraction!r}")
    final = Stage(resolution, iterations, lr=lr).size
    scale = {"w_task": task_scale}
    coarse = min(iterations - 1, round(coarse_fraction * iterations))
    if coarse == 0:
        return [Stage(final, iterations, lr=lr, loss_scale=scale)]
    half = (max(8, round(final[0] / 2)), max(8, round(final[1] / 2)))
    return [Stage(half, coarse, lr=lr, loss_scale=scale),
            Stage(final, iterations - coarse, lr=fine_lr, loss_scale=scale)]


@dataclass
class SynthesisResult:
    """What :meth:`Synthesizer.run` returns.

    Attributes:
        images: float ``[B, 3, H, W]`` in ``[0, 1]`` at the last stage's resolution (detached).
        targets: per image ``boxes`` (xyxy pixels of ``images``) and ``labels``,
            including boxes added by false-positive sampling.
        metrics: final per-term losses, ``inversion_map50`` (the teacher's mAP50
            on ``images`` against ``targets``; ``None`` without an eval backend),
            ``seconds_per_iteration`` and ``iterations``.
        history: one dict per logging point (``stage``, ``iteration``, ``lr``, ``total`` and every
            scalar loss term, extra terms included).
    """

    images: Tensor
    targets: list[Target]
    metrics: dict[str, Any]
    history: list[dict[str, float]]


class Synthesizer:
    """DeepInversion for detectors: coarse-to-fine optimisation of a batch of images.

    The synthesizer runs a private copy of the teacher (in eval mode, without parameter
    gradients, channels-last or compiled as asked), so the caller's model is never
    changed: its modes, memory format, ``requires_grad`` flags and buffers stay as given.
    The copy costs one model's memory on the teacher's device.

    Args:
        teacher: the frozen detector; its parameters' device is used.
        loss: the objective (default ``DeepInversionLoss(teacher)``, recipe weights).
        augment: augmentation applied every iteration (default: recipe stage 1).
        stages: the resolution schedule (default :func:`reference_stages`).
        fp_sampling: false-positive sampling policy (``None``: off).
        log_every: iterations between logging points (the only host syncs).
        amp: mixed precision on CUDA: ``False``, ``True`` (bf16 where supported,
            else fp16), ``"bf16"`` or ``"fp16"``.
        channels_last: run the teacher's copy and the images in channels-last memory format
            (default on: faster convolutions on CUDA and with oneDNN on CPU).
        compile: ``torch.compile`` the teacher's copy (first call is slow): the modules of the
            adapter's ``compile_targets()`` where it has one (the bundled adapters do), else its model.
        init: ``"rand"`` (uniform noise) or ``"randn"`` (clamped Gaussian, the reference).
        eval_conf: confidence threshold of the inversion-mAP detections.
        eval_iou: NMS IoU of the inversion-mAP detections.
        progress: show a tqdm bar over iterations.
    """

    def __init__(
        self,
        teacher: DetectorAdapter,
        *,
        loss: DeepInversionLoss | None = None,
        augment: AugmentationPipeline | None = None,
        stages: Sequence[Stage] | None = None,
        fp_sampling: FPSampling | None = None,
        log_every: int = 100,
        amp: bool | str = False,
        channels_last: bool | None = None,
        compile: bool = False,
        init: str = "randn",
        eval_conf: float = 0.05,
        eval_iou: float = 0.45,
        progress: bool = False,
    ) -> None:
        self.teacher = teacher
        loss = loss if loss is not None else DeepInversionLoss(teacher)
        if loss.teacher is not teacher:
            raise ValueError("loss was built for another teacher: pass DeepInversionLoss(teacher)")
        self.augment = augment if augment is not None else AugmentationPipeline()
        self.stages = list(stages) if stages is not None else reference_stages()
        if not self.stages or not all(isinstance(s, Stage) for s in self.stages):
            raise ValueError("stages must be a non-empty list of diode.Stage")
        if log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {log_every}")
        if init not in ("rand", "randn"):
            raise ValueError(f"init must be 'rand' or 'randn', got {init!r}")
        self.fp_sampling = fp_sampling
        self.log_every = log_every
        self.device = device_of(teacher)
        self.amp_dtype = _amp_dtype(amp, self.device)
        self.channels_last = True if channels_last is None else channels_last
        self.init = init
        self.eval_conf, self.eval_iou = eval_conf, eval_iou
        self.progress = progress
        self.compile = compile
        self._teacher = _private_copy(teacher, channels_last=self.channels_last, compile=compile)
        self.loss = loss.bind(self._teacher)

    def describe(self) -> dict[str, Any]:
        """JSON-serializable configuration (for manifests and resume checks)."""
        loss = self.loss
        return {
            "loss": {**loss.options(), **({"terms": sorted(loss.terms)} if loss.terms else {})},
            "augment": repr(self.augment),
            "stages": [s.describe() for s in self.stages],
            "fp_sampling": None if self.fp_sampling is None else asdict(self.fp_sampling),
            "init": self.init,
            "amp": None if self.amp_dtype is None else str(self.amp_dtype),
            "eval": {"conf": self.eval_conf, "iou": self.eval_iou},
        }

    def run(
        self,
        targets: Sequence[Target],
        *,
        generator: torch.Generator | None = None,
        image_size: tuple[int, int] | None = None,
        init_images: Tensor | None = None,
        callback: Callable[[dict[str, float]], None] | None = None,
    ) -> SynthesisResult:
        """Synthesize one batch of images for ``targets``.

        Args:
            targets: one dict per image, ``boxes`` xyxy pixels of a canvas of
                ``image_size`` and ``labels`` in ``[0, num_classes)``.
            generator: CPU ``torch.Generator`` (seeds the initial noise and every
                augmentation draw, so the result depends only on it).
            image_size: ``(height, width)`` of the targets' canvas (default: the
                first stage's resolution).
            init_images: start from these ``[B, 3, H, W]`` images in ``[0, 1]``
                instead of noise (resized to the first stage).
            callback: called with each logging record.

        Raises:
            ValueError: malformed targets.
            FloatingPointError: a loss term became non-finite (names the
                iteration and the term).
        """
        canvas = image_size or self.stages[0].size
        targets = list(targets)
        validate_targets(targets, image_size=canvas, num_classes=self._teacher.num_classes)
        if not targets:
            raise ValueError("targets is empty: give one dict per image to synthesize")
        batch = len(targets)
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        dev_gen = _device_generator(g, self.device)
        norm = _normalize(targets, canvas, self.device)

        x = self._initial_images(batch, init_images, dev_gen)
        history: list[dict[str, float]] = []
        parts: dict[str, Tensor] = {}
        start = time.perf_counter()
        total_iters = 0
        with progress_bar(sum(s.iterations for s in self.stages), show=self.progress, logger=logger,
                          desc="iterations", leave=False) as bar:
            for stage_idx, stage in enumerate(self.stages):
                x = _resize(x, stage.size)
                x, norm, parts = self._run_stage(stage_idx, stage, x, norm, dev_gen, history, callback, bar)
                total_iters += stage.iterations
        seconds = time.perf_counter() - start
        images = x.detach().contiguous()
        final_targets = _denormalize(norm, images.shape[-2:], batch)
        metrics: dict[str, Any] = {k: float(v) for k, v in parts.items() if v.ndim == 0}
        metrics["seconds_per_iteration"] = seconds / total_iters
        metrics["iterations"] = total_iters
        metrics["inversion_map50"] = self.inversion_map50(images, final_targets)
        return SynthesisResult(images=images, targets=final_targets, metrics=metrics, history=history)

    def _initial_images(self, batch: int, init_images: Tensor | None, gen: torch.Generator) -> Tensor:
        h, w = self.stages[0].size
        if init_images is not None:
            if init_images.ndim != 4 or init_images.shape[:2] != (batch, 3):
                raise ValueError(f"init_images must be [{batch}, 3, H, W], got {tuple(init_images.shape)}")
            return _resize(init_images.detach().to(self.device, torch.float32), (h, w)).clamp(0, 1)
        if self.init == "rand":
            return torch.rand(batch, 3, h, w, generator=gen, device=self.device)
        return torch.randn(batch, 3, h, w, generator=gen, device=self.device).clamp_(0, 1)

    def _run_stage(
        self,
        stage_idx: int,
        stage: Stage,
        x: Tensor,
        norm: tuple[Tensor, Tensor, Tensor],
        gen: torch.Generator,
        history: list[dict[str, float]],
        callback: Callable[[dict[str, float]], None] | None,
        bar: Any,
    ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor], dict[str, Tensor]]:
        loss = stage.loss_for(self.loss)
        augment = stage.augment if stage.augment is not None else self.augment
        h, w = stage.size
        batch = x.shape[0]
        memory = torch.channels_last if self.channels_last else torch.contiguous_format
        x = x.contiguous(memory_format=memory).requires_grad_(True)
        opt = torch.optim.Adam([x], lr=stage.lr, betas=stage.betas, eps=1e-8)
        scale = torch.tensor([w, h, w, h], device=self.device, dtype=torch.float32)
        idx, labels, boxes = norm[0], norm[1], norm[2] * scale
        first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        terms: list[str] = []
        bad_parts = torch.zeros(0, device=self.device)
        fp = self.fp_sampling if stage.fp_sampling else None
        parts: dict[str, Tensor] = {}
        autocast = torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16,
                                  enabled=self.amp_dtype is not None)
        with loss.hooks(private=True):  # the teacher is this synthesizer's own copy
            for it in range(stage.iterations):
                lr = stage.lr_at(it)
                for group in opt.param_groups:
                    group["lr"] = lr
                x_aug, a_idx, a_labels, a_boxes, valid = augment.forward_packed(x, idx, labels, boxes,
                                                                                generator=gen)
                aug_targets = unpack_targets(a_idx[valid], a_labels[valid], a_boxes[valid], batch)
                x_aug = x_aug.contiguous(memory_format=memory)
                with autocast:
                    total, parts = loss(x_aug, aug_targets, generator=gen)
                if not terms:
                    terms = [k for k, v in parts.items() if v.ndim == 0]
                    bad_parts = torch.zeros(len(terms), device=self.device)
                opt.zero_grad(set_to_none=True)
                total.backward()
                opt.step()
                with torch.no_grad():
                    x.clamp_(0, 1)
                    stacked = torch.stack([parts[k].float() for k in terms])
                    newly_bad = (first_bad < 0) & ~torch.isfinite(stacked).all()
                    first_bad = torch.where(newly_bad, torch.full_like(first_bad, it), first_bad)
                    bad_parts = torch.where(newly_bad, stacked, bad_parts)
                if fp is not None and fp.due(it):
                    idx, labels, boxes = self._add_false_positives(fp, x, idx, labels, boxes, batch)
                last = it == stage.iterations - 1
                if bar is not None:
                    bar.update(1)
                if (it + 1) % self.log_every == 0 or last:
                    _raise_if_bad(first_bad, bad_parts, terms, stage_idx)
                    record = {"stage": stage_idx, "iteration": it + 1, "lr": lr, "total": float(total.detach()),
                              **{k: float(parts[k]) for k in terms}}
                    history.append(record)
                    logger.debug("stage %d iter %d: %s", stage_idx, it + 1, record)
                    if bar is not None:
                        bar.set_postfix(loss=f"{record['total']:.3f}", task=f"{record['task']:.3f}")
                    if callback is not None:
                        callback(record)
        return x.detach(), (idx, labels, boxes / scale), parts

    def _add_false_positives(self, fp: FPSampling, x: Tensor, idx: Tensor, labels: Tensor, boxes: Tensor,
                             batch: int) -> tuple[Tensor, Tensor, Tensor]:
        size = (x.shape[-2], x.shape[-1])
        detections = self._teacher.predict(x.detach(), conf=fp.conf)
        current = unpack_targets(idx, labels, boxes, batch)
        updated = add_false_positives(current, detections, conf=fp.conf, iou=fp.iou, min_area=fp.min_area,
                                      max_area=fp.max_area, image_size=size)
        return pack_targets(updated)

    @torch.no_grad()
    def inversion_map50(self, images: Tensor, targets: Sequence[Target]) -> float | None:
        """The teacher's mAP50 on ``images`` against ``targets`` (``None`` without an eval backend)."""
        from diode.eval import detection_map

        predictions = self._teacher.predict(images, conf=self.eval_conf, iou=self.eval_iou)
        try:
            result = detection_map(predictions, list(targets), num_classes=self._teacher.num_classes)
        except ImportError as e:
            logger.warning("inversion mAP skipped: %s", e)
            return None
        return float(result["map50"])


def _private_copy(teacher: DetectorAdapter, *, channels_last: bool, compile: bool) -> DetectorAdapter:
    """A deep copy of ``teacher`` set up for synthesis; the caller's adapter and model stay as they are."""
    clone = copy.deepcopy(teacher)
    clone.model.eval().requires_grad_(False)
    if channels_last:
        clone.model.to(memory_format=torch.channels_last)
    if compile:
        targets = clone.compile_targets() if hasattr(clone, "compile_targets") else [clone.model]
        for module in targets:
            module.compile()
    return clone


def _raise_if_bad(first_bad: Tensor, bad_parts: Tensor, terms: Sequence[str], stage_idx: int) -> None:
    it = int(first_bad)
    if it >= 0:
        values = bad_parts.tolist()
        bad = [k for k, v in zip(terms, values, strict=True) if not math.isfinite(v)] or ["total"]
        raise FloatingPointError(f"non-finite loss at stage {stage_idx}, iteration {it + 1}: term(s) "
                                 f"{', '.join(map(repr, bad))} (values {dict(zip(terms, values, strict=True))}); "
                                 "lower the learning rate or check the teacher's BatchNorm statistics")


def _normalize(targets: Sequence[Target], canvas: tuple[int, int], device: torch.device
               ) -> tuple[Tensor, Tensor, Tensor]:
    idx, labels, boxes = pack_targets([{k: v.to(device) for k, v in t.items()} for t in targets])
    h, w = canvas
    boxes = boxes.clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w) / w
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h) / h
    return idx.to(device), labels.to(device), boxes.to(device)


def _denormalize(norm: tuple[Tensor, Tensor, Tensor], size: Sequence[int], batch: int) -> list[Target]:
    idx, labels, boxes = norm
    h, w = int(size[0]), int(size[1])
    scale = torch.tensor([w, h, w, h], device=boxes.device, dtype=boxes.dtype)
    return unpack_targets(idx, labels, boxes * scale, batch)


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False).clamp(0, 1)


def _device_generator(g: torch.Generator, device: torch.device) -> torch.Generator:
    if g.device == device:
        return g
    seed = int(torch.randint(0, 2**62, (1,), generator=g))
    return torch.Generator(device=device).manual_seed(seed)


def _amp_dtype(amp: bool | str, device: torch.device) -> torch.dtype | None:
    if amp is False or amp is None:
        return None
    if amp == "bf16" or (amp is True and (device.type != "cuda" or torch.cuda.is_bf16_supported())):
        return torch.bfloat16
    if amp in ("fp16", True):
        return torch.float16
    raise ValueError(f"amp must be False, True, 'bf16' or 'fp16', got {amp!r}")
