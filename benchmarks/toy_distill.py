"""The DIODE paper's table in miniature: data-free distillation on the procedural shapes world.

One command, fixed seeds, CPU-sized (about 15 minutes on 2 cores, 25 with one thread):

1. train a small YOLO teacher (yolov3-tiny layout, narrow widths, 96 px) on shapes;
2. build six image sources of equal size: (a) real = the first images of the teacher's
   training set, (b) DIODE (onebox sampler), (c) DIODE with false-positive sampling,
   (b') DIODE with the tiles sampler (several objects per image, like the real scenes),
   (d) the out-of-distribution proxy domain, (e) uniform noise;
3. train the same student architecture from scratch on each with the teacher as the only
   supervisor (``Distiller`` mode ``outputs``, equal images, epochs and steps);
4. distill a narrower student (``pseudo_labels`` mode) from the DIODE images, and from the
   real images (its own ceiling);
5. report mAP50 of every student on held-out real shapes.

Writes ``DIR/results.json``, ``DIR/results.md`` (the table), ``DIR/results.png`` (bar plot)
and ``DIR/previews/*.png`` (a contact sheet of each data source).

    python benchmarks/toy_distill.py --out runs/toy_distill [--smoke]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from torch import Tensor

import diode
from diode.datasets.shapes import (
    ShapesConfig,
    render_noise,
    render_proxy,
    render_shapes,
    write_image_folder,
)
from diode.eval import detection_map

logger = logging.getLogger("toy_distill")

SOURCES = ("real", "diode", "diode_fp", "diode_tiles", "proxy", "noise")
DIODE_SOURCES = ("diode", "diode_fp", "diode_tiles")
# Twice the images for the same epochs, so twice the student steps: synthetic data costs only
# synthesis, so a data-free user can have more of it; the real row of that size is its ceiling.
MORE = ("real_2x", "diode_2x", "diode_mix_2x", "diode_comp_2x")
LABELS = {
    "real": "(a) real shapes (teacher's training images)",
    "diode": "(b) DIODE, onebox sampler",
    "diode_fp": "(c) DIODE + false-positive sampling",
    "diode_tiles": "(b') DIODE, tiles sampler",
    "proxy": "(d) out-of-distribution proxy domain",
    "noise": "(e) uniform noise",
    "real_2x": "(a2) real shapes, twice the images and steps",
    "diode_2x": "(b2) DIODE, onebox sampler, twice the images and steps",
    "diode_mix_2x": "(b3) DIODE, onebox + tiles mixture, twice the images and steps",
    "diode_comp_2x": "(b4) DIODE onebox, second half competing with a student of the first, twice the images and steps",
}
# Weight of the competition term (bounded in [-1, 1]) in the (b4) row, as large as the task term's.
W_COMPETITION = 0.5
# Six square anchors as fractions of the canvas side, spanning the shapes' boxes (0.15-0.45 of
# the canvas, up to ~0.55 with aspect and tilt); the first three sit on the stride-16 head.
ANCHOR_FRACTIONS = (0.125, 0.18, 0.24, 0.31, 0.4, 0.5)


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    """Every knob of the benchmark (the defaults are the published run).

    Args:
        image_size: square canvas side in pixels, a multiple of 32.
        width: channels of the first convolution of teacher and student; later layers
            double it like yolov3-tiny (16 there), so ``4`` is yolov3-tiny / 4.
        narrow_width: the same for the cross-architecture student.
        train_images: real shapes the teacher is trained on.
        val_images: held-out real shapes every model is scored on.
        teacher_epochs: passes over the training images.
        teacher_batch: images per teacher step.
        teacher_lr: peak AdamW learning rate of the teacher.
        images: images in every distillation source (a)-(e).
        synth_batch: images synthesized together (BatchNorm statistics are matched per batch).
        synth_iters: optimisation steps per synthesized batch.
        synth_lr: initial Adam step of the synthesis (cosine to 0).
        jitter: largest roll in pixels of the synthesis augmentation.
        w_bn: weight of the BatchNorm statistics term.
        w_tv1: weight of the total-variation (L1) prior.
        w_task: weight of the teacher's detection loss on the sampled boxes.
        fp_warmup: first iteration of false-positive sampling in (c).
        fp_every: cadence of false-positive sampling in (c).
        tiles_k: boxes per image of the tiles sampler in (b'), on a 2x2 grid; each box
            side is 0.3-0.9 of its cell, i.e. 0.15-0.45 of the canvas like the real objects.
        distill_epochs: passes over each source's images.
        distill_batch: images per distillation step.
        distill_lr: peak AdamW learning rate of the students.
        seed: base seed; every phase derives its own from it.
    """

    image_size: int = 96
    width: int = 4
    narrow_width: int = 2
    train_images: int = 3000
    val_images: int = 300
    teacher_epochs: int = 15
    teacher_batch: int = 32
    teacher_lr: float = 4e-3
    images: int = 768
    synth_batch: int = 64
    synth_iters: int = 200
    synth_lr: float = 0.1
    jitter: int = 10
    w_bn: float = 0.1
    w_tv1: float = 1500.0
    w_task: float = 0.5
    fp_warmup: int = 75
    fp_every: int = 25
    tiles_k: int = 4
    distill_epochs: int = 27
    distill_batch: int = 32
    distill_lr: float = 3e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.image_size % 32 or not 64 <= self.image_size <= 128:
            raise ValueError(f"image_size must be 64, 96 or 128 (a multiple of 32 the shapes world "
                             f"supports), got {self.image_size}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{f.name} must be a non-negative number, got {value!r}")


SMOKE = ToyConfig(image_size=64, width=2, narrow_width=1, train_images=32, val_images=8, teacher_epochs=1,
                  teacher_batch=16, images=8, synth_batch=8, synth_iters=2, fp_warmup=1, fp_every=1,
                  distill_epochs=1, distill_batch=8)
"""A tiny configuration that only checks the wiring (seconds; numbers meaningless)."""


def yolo_tiny_cfg(width: int, num_classes: int, image_size: int) -> str:
    """Darknet cfg text of yolov3-tiny with every width scaled to ``width / 16`` of the original.

    Two ``[yolo]`` heads (strides 32 and 16) with anchors from :data:`ANCHOR_FRACTIONS`.
    """
    f = [width * 2**k for k in range(7)]
    out = 3 * (5 + num_classes)
    anchors = ", ".join(f"{round(a * image_size)},{round(a * image_size)}" for a in ANCHOR_FRACTIONS)

    def conv(filters: int, size: int = 3, *, bn: bool = True, act: str = "leaky") -> str:
        norm = "batch_normalize=1\n" if bn else ""
        return (f"[convolutional]\n{norm}filters={filters}\nsize={size}\nstride=1\npad=1\n"
                f"activation={act}\n\n")

    def maxpool(stride: int) -> str:
        return f"[maxpool]\nsize=2\nstride={stride}\n\n"

    def yolo(mask: str) -> str:
        return f"[yolo]\nmask={mask}\nanchors={anchors}\nclasses={num_classes}\nnum=6\n\n"

    text = f"[net]\nwidth={image_size}\nheight={image_size}\nchannels=3\n\n"
    text += "".join(conv(c) + maxpool(2) for c in f[:5])  # layer 8 is the stride-16 feature
    text += conv(f[5]) + maxpool(1) + conv(f[6]) + conv(f[4], 1) + conv(f[5])
    text += conv(out, 1, bn=False, act="linear") + yolo("3,4,5")
    text += "[route]\nlayers=-4\n\n" + conv(f[3], 1) + "[upsample]\nstride=2\n\n"
    text += "[route]\nlayers=-1,8\n\n" + conv(f[4]) + conv(out, 1, bn=False, act="linear")
    return text + yolo("0,1,2")


def build_model(width: int, class_names: Sequence[str], image_size: int) -> diode.YOLOv3Adapter:
    """A randomly initialised yolov3-tiny-layout detector (seed the global RNG first)."""
    cfg = yolo_tiny_cfg(width, len(class_names), image_size)
    return diode.YOLOv3Adapter.from_config(cfg, class_names=class_names)


@contextmanager
def phase(name: str, seconds: dict[str, float]) -> Iterator[None]:
    """Time a phase, print its start and duration, and record it in ``seconds``."""
    print(f"[{name}] ...", flush=True)
    start = time.perf_counter()
    yield
    seconds[name] = round(time.perf_counter() - start, 1)
    print(f"[{name}] done in {seconds[name]:.0f} s", flush=True)


class Resume:
    """Finished phases of a run folder, so that running into the same folder again resumes.

    A trained teacher is kept as ``DIR/teacher*.pt`` and loaded instead of trained again;
    each finished student's mAP50 is kept in ``DIR/phases.json`` (written to a temporary
    name, then renamed). Synthesis resumes by itself: :func:`diode.synthesize_dataset`
    skips the batches its run folder already holds.
    """

    def __init__(self, out: Path, config: Any, *, log: Callable[[str], None] = print) -> None:
        self.path = out / "phases.json"
        self.log = log
        self.config = json.loads(json.dumps(dataclasses.asdict(config)))
        self.done: dict[str, Any] = {}
        if self.path.is_file():
            recorded = json.loads(self.path.read_text())
            if recorded["config"] != self.config:
                raise SystemExit(f"{out} holds a run of another configuration ({self.path}); choose a new --out")
            self.done = recorded["phases"]

    def value(self, name: str, compute: Callable[[], Any]) -> Any:
        """The recorded value of phase ``name``, or ``compute()``, recorded."""
        if name in self.done:
            self.log(f"  {name}: {self.done[name]} (recorded in {self.path.name})")
            return self.done[name]
        self.done[name] = compute()
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"config": self.config, "phases": self.done}, indent=2) + "\n")
        tmp.replace(self.path)
        return self.done[name]

    def teacher(self, model: diode.DetectorAdapter, path: Path,
                train: Callable[[diode.DetectorAdapter], None]) -> diode.DetectorAdapter:
        """``model`` frozen, with the weights saved at ``path`` or trained by ``train(model)`` and saved there."""
        if path.is_file():
            model.model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            self.log(f"  teacher weights from {path.name}")
        else:
            train(model)
            tmp = path.with_name(path.name + ".tmp")
            torch.save(model.model.state_dict(), tmp)
            tmp.replace(path)
        return model.freeze()


def evaluate_map50(model: diode.DetectorAdapter, images: Tensor, targets: list[dict[str, Tensor]],
                   *, batch_size: int = 100) -> float:
    """mAP50 of ``model`` on ``images`` ``[N, 3, S, S]`` against ``targets`` (xyxy pixels)."""
    predictions = []
    for start in range(0, len(images), batch_size):
        predictions += model.predict(images[start:start + batch_size], conf=0.001, iou=0.6)
    return float(detection_map(predictions, targets, num_classes=model.num_classes)["map50"])


def train_teacher(model: diode.DetectorAdapter, images: Tensor, targets: list[dict[str, Tensor]],
                  config: ToyConfig, *, log: Callable[[str], None] = print) -> None:
    """Supervised training with the adapter's task loss: AdamW, linear warmup, cosine decay.

    Flip, brightness and contrast augmentation; the running BatchNorm statistics are
    collected in train mode throughout, so they fit the real images the teacher saw.
    """
    params = [p for p in model.model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    rest = [p for p in params if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 5e-4},
                             {"params": rest, "weight_decay": 0.0}], lr=config.teacher_lr)
    augment = diode.AugmentationPipeline(jitter=0, flip=0.5, brightness=0.1, contrast=0.1, erase=0.0)
    g = torch.Generator().manual_seed(config.seed + 11)
    n = len(images)
    steps_per_epoch = math.ceil(n / config.teacher_batch)
    total = steps_per_epoch * config.teacher_epochs
    warmup = max(1, steps_per_epoch // 2)
    step = 0
    model.model.train()
    for epoch in range(config.teacher_epochs):
        order = torch.randperm(n, generator=g)
        running = 0.0
        for start in range(0, n, config.teacher_batch):
            idx = order[start:start + config.teacher_batch].tolist()
            batch, batch_targets = augment(images[idx], [targets[i] for i in idx], generator=g)
            lr = config.teacher_lr * min((step + 1) / warmup,
                                         0.5 * (1 + math.cos(math.pi * step / total)))
            for group in opt.param_groups:
                group["lr"] = lr
            loss = model.task_loss(model.forward(batch.clamp(0, 1)), batch_targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += float(loss.detach())
            step += 1
        log(f"  teacher epoch {epoch + 1}/{config.teacher_epochs}: loss {running / steps_per_epoch:.3f}")
    model.model.eval()


def synthesize(teacher: diode.DetectorAdapter, out: Path, config: ToyConfig, *, fp: bool = False,
               sampler: str = "onebox", loss: diode.DeepInversionLoss | None = None,
               seed_offset: int = 3) -> dict[str, Any]:
    """DIODE images for ``teacher`` into the run folder ``out``; returns the manifest.

    ``sampler`` is ``"onebox"`` (boxes of 0.15-0.5 of the canvas), ``"tiles"`` or ``"mix"`` (each
    image's layout from one of the two, equal odds); ``loss``
    replaces the one built from ``config.w_bn``, ``config.w_tv1`` and ``config.w_task``.
    """
    augment = diode.AugmentationPipeline(jitter=config.jitter)
    if loss is None:
        loss = diode.DeepInversionLoss(teacher, w_bn=config.w_bn, w_tv1=config.w_tv1, w_task=config.w_task)
    fp_sampling = diode.FPSampling(warmup=config.fp_warmup, every=config.fp_every) if fp else None
    synth = diode.Synthesizer(
        teacher, loss=loss, augment=augment, fp_sampling=fp_sampling,
        stages=[diode.Stage(config.image_size, config.synth_iters, lr=config.synth_lr)],
        log_every=max(1, config.synth_iters // 4),
    )
    tiles = diode.BBoxSampler.tiles(num_classes=teacher.num_classes, k=config.tiles_k, min_size=0.3, max_size=0.9)
    onebox = diode.BBoxSampler.onebox(num_classes=teacher.num_classes, min_size=0.15, max_size=0.5)
    boxes = {"tiles": tiles, "onebox": onebox, "mix": diode.BBoxSampler.mixture([onebox, tiles])}[sampler]
    return diode.synthesize_dataset(synth, boxes, out, num_images=config.images,
                                    batch_size=config.synth_batch, seed=config.seed + seed_offset)


def distill(teacher: diode.DetectorAdapter, student: diode.DetectorAdapter, folder: Path, config: ToyConfig,
            *, mode: str = "outputs") -> diode.DetectorAdapter:
    """Train ``student`` on the images of ``folder`` with ``teacher`` as the supervisor."""
    distiller = diode.Distiller(
        teacher, student, mode=mode, epochs=config.distill_epochs, batch_size=config.distill_batch,
        image_size=config.image_size, lr=config.distill_lr, warmup_epochs=2.0,
        ema=0.99, ema_tau=50.0, seed=config.seed + 5, log_every=10**6,
    )
    distiller.fit(folder)
    return distiller.student_for_eval()


def _finished(run: Path, images: int) -> bool:
    """Whether the synthesis run folder ``run`` holds all ``images`` images."""
    manifest = run / "manifest.json"
    return manifest.is_file() and json.loads(manifest.read_text()).get("status") == "complete" \
        and len(list((run / "images").glob("*.png"))) == images


def merge_image_folders(out: Path, sources: Sequence[Path]) -> Path:
    """``out/images`` holding copies of every PNG of ``sources`` (prefixed by their index); returns it."""
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    for i, source in enumerate(sources):
        for png in sorted(source.glob("*.png")):
            target = images / f"{i}_{png.name}"
            if not target.exists():
                tmp = target.with_name(target.name + ".tmp")
                shutil.copyfile(png, tmp)
                tmp.replace(target)
    return images


def render_data(config: ToyConfig) -> tuple[Tensor, list[dict[str, Tensor]], Tensor, list[dict[str, Tensor]]]:
    """The teacher's training shapes and the held-out shapes: ``(train_x, train_t, val_x, val_t)``."""
    shapes = ShapesConfig(image_size=config.image_size)
    train_x, train_t = render_shapes(config.train_images, config=shapes,
                                     generator=torch.Generator().manual_seed(config.seed + 1))
    val_x, val_t = render_shapes(config.val_images, config=shapes,
                                 generator=torch.Generator().manual_seed(config.seed + 2))
    return train_x, train_t, val_x, val_t


def write_baseline_sources(out: Path, train_x: Tensor, config: ToyConfig) -> dict[str, Path]:
    """The image folders ``out/real`` (the first training images), ``out/proxy`` and ``out/noise``."""
    n, size = config.images, config.image_size
    return {
        "real": write_image_folder(out / "real", train_x[:n]),
        "real_2x": write_image_folder(out / "real_2x", train_x[:2 * n]),
        "proxy": write_image_folder(
            out / "proxy", render_proxy(n, image_size=size, generator=torch.Generator().manual_seed(config.seed + 6))),
        "noise": write_image_folder(
            out / "noise", render_noise(n, image_size=size, generator=torch.Generator().manual_seed(config.seed + 7))),
    }


def run(out: Path, config: ToyConfig, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the whole benchmark into ``out``; returns what ``results.json`` holds."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "previews").mkdir(exist_ok=True)
    seconds: dict[str, float] = {}
    shapes = ShapesConfig(image_size=config.image_size)
    names = list(shapes.classes)
    size = config.image_size
    start = time.perf_counter()

    with phase("data", seconds):
        train_x, train_t, val_x, val_t = render_data(config)

    resume = Resume(out, config, log=log)
    with phase("teacher", seconds):
        torch.manual_seed(config.seed)
        teacher = build_model(config.width, names, size)
        resume.teacher(teacher, out / "teacher.pt", lambda m: train_teacher(m, train_x, train_t, config, log=log))
        teacher_map50 = evaluate_map50(teacher, val_x, val_t)
        log(f"  teacher mAP50 on held-out shapes: {teacher_map50:.3f}")

    folders: dict[str, Path] = {}
    inversion: dict[str, float | None] = {}
    with phase("sources", seconds):
        folders.update(write_baseline_sources(out / "data", train_x, config))
    for name, fp, sampler in (("diode", False, "onebox"), ("diode_2x", False, "onebox"),
                              ("diode_fp", True, "onebox"), ("diode_tiles", False, "tiles"),
                              ("diode_mix_2x", False, "mix")):
        with phase(f"synthesis_{name}", seconds):
            more = name in ("diode_2x", "diode_mix_2x")
            # diode_2x's first half is "diode" (batch i depends on (seed, i)): copied, not synthesized again.
            if name == "diode_2x" and not (out / "data" / name).exists():
                shutil.copytree(out / "data" / "diode", out / "data" / name)
            manifest = synthesize(teacher, out / "data" / name,
                                  dataclasses.replace(config, images=2 * config.images) if more else config,
                                  fp=fp, sampler=sampler)
            folders[name] = out / "data" / name / "images"
            inversion[name] = _mean_inversion_map50(manifest)
            log(f"  inversion mAP50 ({name}): {inversion[name]}")

    def student_on(folder: Path) -> diode.DetectorAdapter:
        """The same-architecture student, from scratch, distilled on ``folder`` (same seed for every source)."""
        torch.manual_seed(config.seed + 100)
        return distill(teacher, build_model(config.width, names, size), folder, config)

    with phase("synthesis_diode_comp", seconds):
        # Adaptive DeepInversion's competition, one round: a student distilled from the onebox
        # images, then as many new images (other targets) with the competition term against it.
        comp = out / "data" / "diode_comp"
        if not _finished(comp, config.images):
            term = diode.CompetitionTerm(student_on(folders["diode"]), teacher=teacher)
            loss = diode.DeepInversionLoss(teacher, w_bn=config.w_bn, w_tv1=config.w_tv1, w_task=config.w_task,
                                           terms={"competition": (W_COMPETITION, term)})
            synthesize(teacher, comp, config, loss=loss, seed_offset=13)
        folders["diode_comp_2x"] = merge_image_folders(out / "data" / "diode_comp_2x",
                                                       [folders["diode"], comp / "images"])
        inversion["diode_comp"] = _mean_inversion_map50(json.loads((comp / "manifest.json").read_text()))
        log(f"  inversion mAP50 (diode_comp): {inversion['diode_comp']}")

    save_previews(teacher, {name: folders[name] for name in SOURCES}, out / "previews", size)

    map50: dict[str, float] = {}
    for name in (*SOURCES, *MORE):
        with phase(f"distill_{name}", seconds):
            def train_student(name: str = name) -> float:
                return evaluate_map50(student_on(folders[name]), val_x, val_t)

            map50[name] = resume.value(f"distill_{name}", train_student)
            log(f"  student mAP50 ({name}): {map50[name]:.3f}")

    cross: dict[str, float] = {}
    # The narrower student: pseudo labels (any student) and, its head layout being the teacher's,
    # raw outputs on twice the images; each against the same student on real images, its own ceiling.
    for key, mode, source in (("diode", "pseudo_labels", "diode"), ("real", "pseudo_labels", "real"),
                              ("outputs_diode_2x", "outputs", "diode_2x"), ("outputs_real_2x", "outputs", "real_2x")):
        with phase(f"cross_arch_{key}", seconds):
            def train_narrow(mode: str = mode, source: str = source) -> float:
                torch.manual_seed(config.seed + 200)
                narrow = distill(teacher, build_model(config.narrow_width, names, size), folders[source], config,
                                 mode=mode)
                return evaluate_map50(narrow, val_x, val_t)

            cross[key] = resume.value("cross_arch" if key == "diode" else f"cross_arch_{key}", train_narrow)
            log(f"  narrow student mAP50 ({mode}, {source} images): {cross[key]:.3f}")
    seconds["total"] = round(time.perf_counter() - start, 1)

    results = {
        "map50": map50,
        "teacher_map50": teacher_map50,
        "cross_arch": {"mode": "pseudo_labels", "data": "diode", "width": config.narrow_width, "map50": cross["diode"],
                       "real_map50": cross["real"], "outputs_2x": {"diode": cross["outputs_diode_2x"],
                                                                    "real": cross["outputs_real_2x"]}},
        "inversion_map50": inversion,
        "goal": goal(map50),
        "seconds": seconds,
        "config": dataclasses.asdict(config),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown_table(results))
    bar_plot(results, out / "results.png")
    return results


def save_previews(teacher: diode.DetectorAdapter, folders: dict[str, Path], out: Path, image_size: int) -> None:
    """A contact sheet ``out/NAME.png`` of the first 16 images of each folder with the teacher's detections."""
    for name, path in folders.items():
        folder = diode.DetectionFolder(path, image_size=(image_size, image_size), labels="none")
        sample = torch.stack([folder[i][0] for i in range(min(16, len(folder)))])
        detections = teacher.predict(sample, conf=0.3)
        diode.viz.save_contact_sheet(out / f"{name}.png", sample, detections, class_names=teacher.class_names,
                                     nrow=8, width=1)


def goal(map50: dict[str, float], target: float = 0.8) -> dict[str, Any]:
    """The benchmark's goal: ``max(diode, diode_fp) >= target * real`` and above proxy and noise.

    Also reports the best DIODE source (the tiles sampler and the twice-the-images rows
    included), each against the real row of as many images and steps (``real_2x`` for the
    ``*_2x`` rows), and its margin over the proxy domain (a margin within a few hundredths
    is inside seed-to-seed noise). Sources missing from ``map50`` (a benchmark that skips
    ``diode_fp``) are left out.
    """
    real = map50["real"]
    onebox = max(map50[k] for k in ("diode", "diode_fp") if k in map50)

    ratios = {k: map50[k] / _real_of_as_many(map50, k) for k in (*DIODE_SOURCES, *MORE)
              if k.startswith("diode") and k in map50 and _real_of_as_many(map50, k) > 0}
    best_name = max(ratios, key=ratios.__getitem__)
    best = map50[best_name]
    others = max(map50["proxy"], map50["noise"])
    return {
        "target": target,
        "diode_over_real": onebox / real if real > 0 else None,
        "met": bool(onebox >= target * real and onebox > others),
        "best_diode": best_name,
        "best_diode_over_real": ratios[best_name],
        "best_diode_minus_proxy": best - map50["proxy"],
        "best_met": bool(best >= target * _real_of_as_many(map50, best_name) and best > others),
    }


def _real_of_as_many(map50: dict[str, float], name: str) -> float:
    """The real row of as many images and steps as row ``name``: ``real_2x`` for the ``*_2x`` rows, else ``real``."""
    return map50["real_2x"] if name.endswith("_2x") else map50["real"]


def _mean_inversion_map50(manifest: dict[str, Any]) -> float | None:
    values = [b["metrics"]["inversion_map50"] for b in _batches(manifest)
              if b.get("metrics", {}).get("inversion_map50") is not None]
    return sum(values) / len(values) if values else None


def _batches(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    batches = manifest.get("batches", [])
    return list(batches.values()) if isinstance(batches, dict) else list(batches)


def markdown_table(results: dict[str, Any]) -> str:
    """The results as a markdown table (students' mAP50 on held-out real shapes)."""
    real = results["map50"]["real"]
    rows = ["| student trained on | mAP50 | vs. real of as many images |", "|---|---:|---:|"]
    rows.append(f"| teacher (supervised on {results['config']['train_images']} real images) "
                f"| {results['teacher_map50']:.3f} | |")
    for name in (*SOURCES, *MORE):
        value = results["map50"][name]
        rows.append(f"| {LABELS[name]} | {value:.3f} | {_ratio(value, _real_of_as_many(results['map50'], name))} |")
    cross = results["cross_arch"]
    for key, data in (("real_map50", "real images"), ("map50", "DIODE images")):
        rows.append(f"| narrower student (width {cross['width']}), pseudo_labels, {data} "
                    f"| {cross[key]:.3f} | {_ratio(cross[key], real)} |")
    for key, data in (("real", "real images x2"), ("diode", "DIODE images x2")):
        value = cross["outputs_2x"][key]
        rows.append(f"| narrower student (width {cross['width']}), outputs, {data} | {value:.3f} "
                    f"| {_ratio(value, real)} |")
    inv = results["inversion_map50"]
    notes = (f"\nInversion mAP50 (teacher on its synthesized images): DIODE {_fmt(inv['diode'])}, "
             f"DIODE + FP sampling {_fmt(inv['diode_fp'])}, DIODE tiles {_fmt(inv['diode_tiles'])}, "
             f"mixture {_fmt(inv['diode_mix_2x'])}, competing half {_fmt(inv['diode_comp'])}. "
             f"Twice the images: DIODE / real {_ratio(results['map50']['diode_2x'], results['map50']['real_2x'])}, "
             f"mixture / real {_ratio(results['map50']['diode_mix_2x'], results['map50']['real_2x'])}, "
             f"with competition / real {_ratio(results['map50']['diode_comp_2x'], results['map50']['real_2x'])}. "
             f"Narrower student, DIODE / its real-image ceiling: pseudo_labels "
             f"{_ratio(cross['map50'], cross['real_map50'])}, outputs on twice the images "
             f"{_ratio(cross['outputs_2x']['diode'], cross['outputs_2x']['real'])}. "
             f"Total runtime {results['seconds']['total'] / 60:.1f} min with {results['threads']} torch thread(s).\n")
    g = results["goal"]
    notes += (f"\nGoal (max(DIODE, DIODE + FP) >= {g['target']} x real and above proxy and noise): "
              f"{'met' if g['met'] else 'missed'} ({_fmt(g['diode_over_real'])} x real). Best DIODE source: "
              f"{g['best_diode']} ({_fmt(g['best_diode_over_real'])} x real of as many images, "
              f"{g['best_diode_minus_proxy']:+.3f} over proxy).\n")
    return "\n".join(rows) + "\n" + notes


def _ratio(value: float, real: float) -> str:
    return f"{value / real:.2f}" if real > 0 else "n/a"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def bar_plot(results: dict[str, Any], path: Path) -> None:
    """A PNG bar chart of the students' mAP50 (drawn with PIL; no matplotlib needed)."""
    bars = [(name, results["map50"][name]) for name in (*SOURCES, *MORE)]
    bars.append(("narrow, real", results["cross_arch"]["real_map50"]))
    bars.append(("narrow, DIODE", results["cross_arch"]["map50"]))
    bars.insert(0, ("teacher", results["teacher_map50"]))
    draw_bars(bars, path)


def draw_bars(bars: Sequence[tuple[str, float]], path: Path, *, width: int = 720) -> None:
    """Draw ``(label, mAP50)`` bars into the PNG ``path`` (``width`` x 360 px; sources keep their colours)."""
    height, left, bottom, top = 360, 60, 50, 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    plot_h = height - bottom - top
    slot = (width - left - 20) / len(bars)
    for tick in range(0, 11, 2):
        y = top + plot_h * (1 - tick / 10)
        draw.line([(left, y), (width - 20, y)], fill=(225, 225, 225))
        draw.text((left - 30, y - 6), f"{tick / 10:.1f}", fill="black")
    colours = {"teacher": (90, 90, 90), "real": (60, 120, 200), "diode": (220, 110, 40),
               "diode_fp": (240, 160, 60), "diode_tiles": (200, 80, 20), "proxy": (120, 170, 90),
               "noise": (170, 170, 170)}
    for i, (name, value) in enumerate(bars):
        x0 = left + i * slot + slot * 0.15
        x1 = left + (i + 1) * slot - slot * 0.15
        y0 = top + plot_h * (1 - max(0.0, min(1.0, value)))
        draw.rectangle([x0, y0, x1, top + plot_h], fill=colours.get(name, (150, 90, 160)))
        draw.text((x0, y0 - 14), f"{value:.3f}", fill="black")
        draw.multiline_text((x0, top + plot_h + 8), _wrap(draw, name, slot * 0.8), fill="black", spacing=2)
    draw.line([(left, top), (left, top + plot_h), (width - 20, top + plot_h)], fill="black")
    draw.text((left, 12), "mAP50 on held-out real shapes (students from scratch, teacher-supervised)",
              fill="black")
    image.save(path)


def _wrap(draw: ImageDraw.ImageDraw, label: str, room: float) -> str:
    """``label`` broken after ``_`` or ``,`` into lines that fit ``room`` pixels where it can."""
    lines = [""]
    for piece in label.replace("_", "_\x00").replace(", ", ",\x00").split("\x00"):
        if lines[-1] and draw.textlength(lines[-1] + piece) > room:
            lines.append(piece)
        else:
            lines[-1] += piece
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line entry point; returns the results dict."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--smoke", action="store_true", help="a tiny configuration (seconds, for tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; use 1 on a busy machine, "
                             "where oversubscribed threads slow training tenfold)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = dataclasses.replace(SMOKE if args.smoke else ToyConfig(), seed=args.seed)
    logging.basicConfig(level=logging.WARNING)
    results = run(args.out, config)
    print()
    print((args.out / "results.md").read_text())
    return results


if __name__ == "__main__":
    main()
