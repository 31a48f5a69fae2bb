"""Inversion mAP50 of synthesized batches: the teacher's mAP50 on its own synthesized images.

For each iteration budget, seed and batch index, a batch is synthesized from
scratch (single stage at 160 px, recipe defaults otherwise) and scored; the
table and the median per budget are printed.

    python benchmarks/inversion_quality.py [--iterations 200 2500] [--seeds 0 1 2] [--batches 2] [--batch-size 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import diode
from diode.inversion.job import batch_seed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, nargs="+", default=[200, 2500])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=160)
    parser.add_argument("--fp-sampling", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    teacher = diode.YOLOv3Adapter.from_pretrained("yolov3-tiny", device=args.device)
    sampler = diode.BBoxSampler.onebox(num_classes=teacher.num_classes)
    fp = diode.FPSampling() if args.fp_sampling else None
    results: dict[int, list[float]] = {}
    print(f"{'iters':>6} {'seed':>4} {'batch':>5} {'map50':>6} {'s/it':>7}")
    for iters in args.iterations:
        synth = diode.Synthesizer(teacher, stages=[diode.Stage(args.resolution, iters, lr=0.2)],
                                  fp_sampling=fp, log_every=max(1, iters // 4))
        for seed in args.seeds:
            for b in range(args.batches):
                g = torch.Generator().manual_seed(batch_seed(seed, b))
                size = (args.resolution, args.resolution)
                targets = sampler.sample(args.batch_size, image_size=size, generator=g)
                start = time.perf_counter()
                r = synth.run(targets, generator=g)
                m = r.metrics["inversion_map50"]
                results.setdefault(iters, []).append(m)
                print(f"{iters:>6} {seed:>4} {b:>5} {m:>6.3f} {r.metrics['seconds_per_iteration']:>7.4f}"
                      f"   ({time.perf_counter() - start:.0f} s)", flush=True)
    print()
    for iters, maps in results.items():
        print(f"iterations {iters}: median inversion mAP50 {statistics.median(maps):.3f} "
              f"(mean {statistics.mean(maps):.3f}, n={len(maps)})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({str(k): v for k, v in results.items()}, f, indent=2)


if __name__ == "__main__":
    main()
