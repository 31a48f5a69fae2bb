"""Which distillation settings teach a narrower student best, on the toy shapes world.

The setting of ``benchmarks/toy_distill.py`` (same teacher, same DIODE onebox images, same
student budget), with the cross-architecture student (yolov3-tiny layout, widths / 8) trained
from scratch under several :class:`diode.DistillConfig` variants, each on the DIODE images
and on as many real images (the ceiling of that variant). Reports mAP50 on held-out real shapes
and the DIODE / real ratio of every variant.

    python benchmarks/toy_cross_arch.py --out runs/toy_cross_arch --seed 0 --threads 1
    python benchmarks/toy_cross_arch.py --out runs/toy_cross_arch --variants baseline,bernoulli

The teacher (``teacher.pt``) and the images are cached in ``--out``; a second run only trains
students. Writes ``results.json`` (every variant run so far) and ``results.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import toy_distill as toy  # noqa: E402

import diode  # noqa: E402
from diode.datasets.shapes import ShapesConfig, write_image_folder  # noqa: E402

# name -> DistillConfig overrides of the toy benchmark's student settings ("width": "teacher" trains
# the teacher's architecture instead of the narrower student).
PSEUDO = {"mode": "pseudo_labels", "conf": 0.25, "score_sampling": False, "mosaic": 0.0, "hsv": (0.0, 0.0, 0.0)}
HSV = (0.015, 0.5, 0.3)
VARIANTS: dict[str, dict[str, Any]] = {
    "pseudo": PSEUDO,
    "pseudo_conf10": {**PSEUDO, "conf": 0.1},
    "pseudo_sampled": {**PSEUDO, "conf": 0.05, "score_sampling": True},
    "pseudo_mosaic": {**PSEUDO, "mosaic": 0.5},
    "pseudo_hsv": {**PSEUDO, "hsv": HSV},
    "pseudo_hsv_strong": {**PSEUDO, "hsv": (0.1, 0.7, 0.4)},
    "pseudo_sampled_hsv": {**PSEUDO, "conf": 0.05, "score_sampling": True, "hsv": HSV},
    "hybrid_hsv": {**PSEUDO, "mode": "hybrid", "conf": 0.05, "score_sampling": True, "hsv": HSV},
    "hybrid": {**PSEUDO, "mode": "hybrid", "conf": 0.05, "score_sampling": True},
    "outputs": {**PSEUDO, "mode": "outputs"},
    "outputs_mosaic": {**PSEUDO, "mode": "outputs", "mosaic": 0.5},
    "outputs_hsv": {**PSEUDO, "mode": "outputs", "hsv": HSV},
    "same_outputs": {**PSEUDO, "mode": "outputs", "width": "teacher"},
    "same_outputs_mosaic": {**PSEUDO, "mode": "outputs", "mosaic": 0.5, "width": "teacher"},
    "same_outputs_hsv": {**PSEUDO, "mode": "outputs", "hsv": HSV, "width": "teacher"},
}


def prepare(out: Path, config: toy.ToyConfig) -> tuple[diode.YOLOv3Adapter, dict[str, Path], Any, Any]:
    """The teacher (trained once, cached), the image folders and the held-out real shapes."""
    names = list(ShapesConfig(image_size=config.image_size).classes)
    train_x, train_t, val_x, val_t = toy.render_data(config)
    torch.manual_seed(config.seed)
    teacher = toy.build_model(config.width, names, config.image_size)
    weights = out / "teacher.pt"
    if weights.is_file():
        teacher.model.load_state_dict(torch.load(weights, weights_only=True))
    else:
        toy.train_teacher(teacher, train_x, train_t, config)
        torch.save(teacher.model.state_dict(), weights)
    teacher.freeze()
    folders = {"diode": out / "data" / "diode" / "images", "real": out / "data" / "real"}
    if not (out / "data" / "diode" / "manifest.json").is_file() or json.loads(
            (out / "data" / "diode" / "manifest.json").read_text())["status"] != "complete":
        toy.synthesize(teacher, out / "data" / "diode", config)
    if not folders["real"].is_dir():
        write_image_folder(folders["real"], train_x[:config.images])
    return teacher, folders, val_x, val_t


def train_student(teacher: diode.YOLOv3Adapter, folder: Path, config: toy.ToyConfig,
                  overrides: dict[str, Any]) -> diode.YOLOv3Adapter:
    """The narrower student distilled from the images of ``folder`` with the toy benchmark's budget."""
    overrides = dict(overrides)
    width = config.width if overrides.pop("width", None) else config.narrow_width
    torch.manual_seed(config.seed + (100 if width == config.width else 200))
    student = toy.build_model(width, teacher.class_names, config.image_size)
    distiller = diode.Distiller(
        teacher, student, epochs=config.distill_epochs, batch_size=config.distill_batch,
        image_size=config.image_size, lr=config.distill_lr, warmup_epochs=2.0, ema=0.99, ema_tau=50.0,
        seed=config.seed + 5, log_every=10**6, **overrides,
    )
    distiller.fit(folder)
    return distiller.student_for_eval()  # type: ignore[return-value]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line entry point; returns the results dict."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS")
    parser.add_argument("--sources", default="diode,real", help="comma-separated: diode, real")
    parser.add_argument("--prepare-only", action="store_true", help="train the teacher and write the images")
    parser.add_argument("--smoke", action="store_true", help="the toy benchmark's tiny configuration (seconds)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = dataclasses.replace(toy.SMOKE if args.smoke else toy.ToyConfig(), seed=args.seed)
    out = args.out / f"seed{args.seed}"
    out.mkdir(parents=True, exist_ok=True)
    teacher, folders, val_x, val_t = prepare(out, config)
    print(f"teacher mAP50 {toy.evaluate_map50(teacher, val_x, val_t):.3f}", flush=True)
    path = out / "results.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    if args.prepare_only:
        return results
    for name in args.variants.split(","):
        for source in args.sources.split(","):
            start = time.perf_counter()
            student = train_student(teacher, folders[source], config, VARIANTS[name])
            value = toy.evaluate_map50(student, val_x, val_t)
            results.setdefault(name, {})[source] = value
            print(f"{name:18s} {source:6s} mAP50 {value:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
            path.write_text(json.dumps(results, indent=2) + "\n")
    rows = ["| variant | DIODE | real | DIODE / real |", "|---|---:|---:|---:|"]
    for name, r in results.items():
        ratio = f"{r['diode'] / r['real']:.2f}" if r.get("real") and "diode" in r else "n/a"
        rows.append(f"| {name} | {r.get('diode', float('nan')):.3f} | {r.get('real', float('nan')):.3f} "
                    f"| {ratio} |")
    (out / "results.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))
    return results


if __name__ == "__main__":
    main()
