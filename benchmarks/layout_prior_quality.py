"""Inversion quality of box layouts and class priors: the teacher's pooled mAP50 on its synthesized images.

For each sampler configuration and seed, ``--batches`` batches are synthesized from
scratch (one stage at ``--resolution`` px, recipe defaults otherwise) with the same
batch seeds as ``inversion_quality.py``; the teacher's detections on all images of all
batches of a seed are scored together against their targets (one pooled mAP50 per
seed), and over all seeds together.

    python benchmarks/layout_prior_quality.py [--configs onebox onebox+prior multibox multibox+prior]
        [--iterations 200] [--seeds 0 1 2] [--batches 2] [--batch-size 4]

Configurations: ``onebox`` (the default sampler), ``tiles`` (``k=4``), ``multibox``
(disjoint; ``--multibox-k``, default the builder's ``(1, 4)``, ``--multibox-size``,
default 0.15-0.5), ``statistics`` (``from_statistics`` fitted to
the teacher's own detections, conf 0.25, on the photos in ``--stats-photos``, e.g.
darknet's samples in ``~/.cache/diode/test-images``); ``+prior`` adds the class prior
estimated from the teacher (``estimate_class_prior(teacher)``, ``--prior-temperature``;
for ``statistics`` it replaces the detections' class frequencies).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import diode
from diode.data.io import load_image
from diode.eval import detection_map
from diode.inversion.job import batch_seed
from diode.inversion.prior import estimate_class_prior

LAYOUTS = {
    "onebox": lambda c, prior: diode.BBoxSampler.onebox(num_classes=c, class_prior=prior),
    "tiles": lambda c, prior: diode.BBoxSampler.tiles(num_classes=c, k=4, class_prior=prior),
}


def photo_statistics(teacher: diode.YOLOv3Adapter, photos: Path, prior: torch.Tensor | None) -> diode.BBoxSampler:
    """``from_statistics`` fitted to the teacher's detections on the photos of a folder."""
    with tempfile.TemporaryDirectory() as tmp:
        for path in sorted(photos.glob("*.jpg")):
            image = load_image(path)
            h, w = image.shape[-2:]
            det = teacher.detect(image)
            rows = [f"{int(c)} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}"
                    for (x1, y1, x2, y2), c in zip(det["boxes"].tolist(), det["labels"].tolist(), strict=True)
                    if x2 > x1 and y2 > y1]
            (Path(tmp) / f"{path.stem}.txt").write_text("\n".join(rows) + "\n")
        return diode.BBoxSampler.from_statistics(tmp, num_classes=teacher.num_classes, class_prior=prior)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["onebox", "onebox+prior", "multibox", "multibox+prior"])
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=160)
    parser.add_argument("--prior-temperature", type=float, default=1.0)
    parser.add_argument("--multibox-k", type=int, nargs=2, default=[1, 4])
    parser.add_argument("--multibox-size", type=float, nargs=2, default=[0.15, 0.5])
    parser.add_argument("--stats-photos", type=Path, default=Path.home() / ".cache/diode/test-images")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    teacher = diode.YOLOv3Adapter.from_pretrained("yolov3-tiny", device=args.device)
    prior = estimate_class_prior(teacher, temperature=args.prior_temperature)
    synth = diode.Synthesizer(teacher, stages=[diode.Stage(args.resolution, args.iterations, lr=0.2)],
                              log_every=args.iterations)
    size = (args.resolution, args.resolution)
    results: dict[str, dict[str, float]] = {}
    print(f"{'config':>16} {'seed':>4} {'boxes':>5} {'map50':>6} {'s/it':>7}")
    for config in args.configs:
        layout, _, use_prior = config.partition("+")
        if layout not in (*LAYOUTS, "multibox", "statistics") or use_prior not in ("", "prior"):
            parser.error(f"unknown config {config!r}: one of {sorted(LAYOUTS)}, multibox or statistics, "
                         "optionally with '+prior'")
        if layout == "multibox":
            (lo, hi), (small, large) = args.multibox_k, args.multibox_size
            sampler = diode.BBoxSampler.multibox(num_classes=teacher.num_classes, k=(lo, hi), min_size=small,
                                                 max_size=large, class_prior=prior if use_prior else None)
        elif layout == "statistics":
            sampler = photo_statistics(teacher, args.stats_photos, prior if use_prior else None)
            print(f"{config}: {sampler}", flush=True)
        else:
            sampler = LAYOUTS[layout](teacher.num_classes, prior if use_prior else None)
        every_pred, every_target = [], []
        for seed in args.seeds:
            preds, targets, seconds = [], [], []
            for b in range(args.batches):
                g = torch.Generator().manual_seed(batch_seed(seed, b))
                r = synth.run(sampler.sample(args.batch_size, image_size=size, generator=g), generator=g)
                preds += teacher.predict(r.images, conf=synth.eval_conf, iou=synth.eval_iou)
                targets += r.targets
                seconds.append(r.metrics["seconds_per_iteration"])
            m = detection_map(preds, targets, num_classes=teacher.num_classes)["map50"]
            results.setdefault(config, {})[str(seed)] = m
            boxes = sum(len(t["labels"]) for t in targets)
            print(f"{config:>16} {seed:>4} {boxes:>5} {m:>6.3f} {sum(seconds) / len(seconds):>7.4f}", flush=True)
            every_pred += preds
            every_target += targets
        pooled = detection_map(every_pred, every_target, num_classes=teacher.num_classes)["map50"]
        results[config]["all"] = pooled
        print(f"{config:>16} {'all':>4} {'':>5} {pooled:>6.3f}", flush=True)
    print()
    for config, per_seed in results.items():
        seeds = " ".join(f"{per_seed[str(s)]:.3f}" for s in args.seeds)
        print(f"{config}: pooled mAP50 per seed {seeds}; all seeds {per_seed['all']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            record = {"args": vars(args), "time": time.strftime("%Y-%m-%d %H:%M"), "results": results}
            json.dump(record, f, indent=2, default=str)


if __name__ == "__main__":
    main()
