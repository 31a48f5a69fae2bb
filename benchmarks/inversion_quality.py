"""Inversion quality: the teacher's pooled mAP50 on datasets that ``diode synthesize`` writes with its defaults.

For each iteration budget and seed the benchmark runs the command line in this
process, exactly as a user would::

    diode synthesize --teacher yolov3-tiny --num-images 24 --batch-size 4 --iterations N --seed S --out DIR

(plus any extra ``diode synthesize`` options given after ``--``), then reads the
run folder back like an independent user (PNG images and YOLO labels from disk)
and scores the teacher's detections (score > 0.001, NMS IoU 0.6, as
``diode evaluate``) against the sampled labels. The mAP50 is computed over the
whole set of images pooled, once per seed and once over all seeds together (not
a median of batch values), and the median seconds per iteration of the batches
is reported next to it.

    python benchmarks/inversion_quality.py --iterations 200 625 --seeds 0 1 2
    python benchmarks/inversion_quality.py --iterations 200 --seeds 0 1 2 -- --recipe reference
    python benchmarks/inversion_quality.py --iterations 200 --seeds 0 --keep runs/q -- --init randn
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from diode.adapters.factory import create_adapter
from diode.cli import main as diode_main
from diode.data.folder import DetectionFolder
from diode.eval import detection_map


def synthesize(out: Path, *, teacher: str, iterations: int, seed: int, num_images: int, batch_size: int,
               device: str, extra: list[str]) -> dict[str, Any]:
    """Run ``diode synthesize`` into ``out``; returns its manifest."""
    argv = ["synthesize", "--teacher", teacher, "--num-images", str(num_images), "--batch-size", str(batch_size),
            "--iterations", str(iterations), "--seed", str(seed), "--out", str(out), "--device", device,
            "--quiet", *extra]
    with contextlib.redirect_stdout(io.StringIO()):
        code = diode_main(argv)
    if code != 0:
        raise SystemExit(f"diode {' '.join(argv)} exited with {code}")
    return json.loads((out / "manifest.json").read_text())


@torch.no_grad()
def read_back(teacher: Any, folder: Path) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """The teacher's detections on the images of a run folder, and the folder's labels."""
    data = DetectionFolder(folder)
    device = next(teacher.model.parameters()).device
    predictions, targets = [], []
    for index in range(len(data)):
        image, target, _ = data[index]
        predictions += [{k: v.cpu() for k, v in p.items()}
                        for p in teacher.predict(image[None].to(device), conf=0.001, iou=0.6)]
        targets.append(target)
    return predictions, targets


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, nargs="+", default=[200, 625])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num-images", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--teacher", default="yolov3-tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--keep", help="keep the run folders under this folder (ITERS-sSEED)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    teacher = create_adapter(args.teacher, device=args.device)
    rows: list[dict[str, Any]] = []
    print(f"extra options: {' '.join(extra) or '(none: the CLI defaults)'}")
    print(f"{'iters':>6} {'seed':>4} {'images':>6} {'map50':>6} {'s/it':>7}")
    for iters in args.iterations:
        pooled: tuple[list[Any], list[Any]] = ([], [])
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(args.keep) / f"{iters}-s{seed}" if args.keep else Path(tmp)
                start = time.perf_counter()
                manifest = synthesize(out, teacher=args.teacher, iterations=iters, seed=seed,
                                      num_images=args.num_images, batch_size=args.batch_size, device=args.device,
                                      extra=extra)
                wall = time.perf_counter() - start
                predictions, targets = read_back(teacher, out)
            spi = statistics.median(b["metrics"]["seconds_per_iteration"] for b in manifest["batches"].values())
            score = detection_map(predictions, targets, num_classes=teacher.num_classes)["map50"]
            pooled[0].extend(predictions)
            pooled[1].extend(targets)
            rows.append({"iterations": iters, "seed": seed, "images": len(targets), "map50": score,
                         "seconds_per_iteration": spi, "wall_seconds": wall})
            print(f"{iters:>6} {seed:>4} {len(targets):>6} {score:>6.3f} {spi:>7.4f}   ({wall:.0f} s)", flush=True)
        score = detection_map(pooled[0], pooled[1], num_classes=teacher.num_classes)["map50"]
        rows.append({"iterations": iters, "seed": "all", "images": len(pooled[1]), "map50": score})
        print(f"{iters:>6} {'all':>4} {len(pooled[1]):>6} {score:>6.3f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"extra": extra, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
