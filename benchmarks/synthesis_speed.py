"""Cost of one synthesis iteration against the floor: a bare frozen-teacher forward+backward.

All are timed in this one process on the same batch (by default yolov3-tiny COCO, 160 px;
``--teachers`` takes any adapter specs, e.g. ``yolov10n`` or ``tv:ssdlite320_mobilenet_v3_large``
(random init: speed does not depend on the weights), and reports each against its own floor),
alternating in rounds so machine noise hits them alike; the median per-iteration
time of each and the median over rounds of the per-round ratios are printed (paired
ratios: a slow spell of the machine lengthens the bare and the synthesizer timings of
its round alike). The floor is measured twice: with the
default (contiguous) memory format, the plain way to run the teacher, and with
channels-last, the format the synthesizer runs the teacher in.

``--schedules`` adds the cost per iteration of the two ``diode synthesize`` recipes, timed
the same way over whole schedules of ``--iters`` iterations: ``--recipe fast``
(:func:`diode.fast_stages`: half the iterations at half the resolution) against
``--recipe reference`` (one stage at the full resolution).

    python benchmarks/synthesis_speed.py [--teachers yolov3-tiny yolov10n tv:ssdlite320_mobilenet_v3_large]
        [--batch-sizes 4 32] [--iters 30] [--rounds 7] [--device cpu] [--schedules]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

import diode
from diode.adapters.factory import create_adapter


def bare_forward_backward(teacher: Any, x: torch.Tensor, targets: list, iters: int,
                          memory_format: torch.memory_format) -> float:
    """Seconds per iteration of forward + the teacher's own task loss + backward w.r.t. the input only.

    The task loss is part of the floor because some detectors run their heads inside it
    (two-stage R-CNNs: the adapter's forward stops at the features).
    """
    teacher.model.requires_grad_(False).to(memory_format=memory_format)
    x = x.clone().contiguous(memory_format=memory_format).requires_grad_(True)
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        loss = teacher.task_loss(teacher.forward(x), targets)
        (grad,) = torch.autograd.grad(loss, x)
    sync()
    return (time.perf_counter() - start) / iters


def synthesizer_iteration(teacher: Any, targets: list, res: int, iters: int, amp: bool,
                          stages: list[diode.Stage] | None = None) -> float:
    """Seconds per iteration of ``Synthesizer.run`` (one stage at ``res`` unless ``stages``)."""
    stages = stages or [diode.Stage(res, iters, lr=0.2)]
    synth = diode.Synthesizer(teacher, stages=stages, log_every=iters, amp=amp)
    result = synth.run(targets, generator=torch.Generator().manual_seed(0), image_size=(res, res))
    return result.metrics["seconds_per_iteration"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teachers", nargs="+", default=["yolov3-tiny"],
                        help="adapter specs (registered names, tv:BUILDER, yolov8:SPEC)")
    parser.add_argument("--num-classes", type=int, default=91, help="classes of specs built from scratch")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 32])
    parser.add_argument("--resolution", type=int, default=160)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--schedules", action="store_true",
                        help="also time the fast and reference recipes of diode synthesize per iteration")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"resolution={args.resolution} iters/round={args.iters} rounds={args.rounds}")
    print(f"{'teacher':>34} {'batch':>5} {'bare, contiguous':>17} {'bare, channels_last':>20} {'synthesizer':>12} "
          f"{'ratio/contig':>13} {'ratio/cl':>9}   (seconds per iteration)")
    for spec in args.teachers:
        teacher = create_adapter(spec, num_classes=None if spec in diode.hub.REGISTRY else args.num_classes,
                                 device=device)
        for bs in args.batch_sizes:
            _measure(spec, teacher, bs, args, device)
    if args.schedules:
        print(f"\n{'teacher':>34} {'batch':>5} {'reference recipe':>17} {'fast recipe':>12} {'fast/reference':>15}"
              "   (seconds per iteration over whole schedules)")
        for spec in args.teachers:
            teacher = create_adapter(spec, num_classes=None if spec in diode.hub.REGISTRY else args.num_classes,
                                     device=device)
            for bs in args.batch_sizes:
                _measure_schedules(spec, teacher, bs, args, device)


def _measure(spec: str, teacher: Any, bs: int, args: argparse.Namespace, device: torch.device) -> None:
    sampler = diode.BBoxSampler.onebox(num_classes=teacher.num_classes)
    g = torch.Generator().manual_seed(0)
    targets = sampler.sample(bs, image_size=(args.resolution, args.resolution), generator=g)
    x = torch.rand(bs, 3, args.resolution, args.resolution, generator=g).to(device)
    contiguous, channels_last = torch.contiguous_format, torch.channels_last
    bare_forward_backward(teacher, x, targets, 3, contiguous)
    bare_forward_backward(teacher, x, targets, 3, channels_last)
    synthesizer_iteration(teacher, targets, args.resolution, 3, args.amp)
    bare, bare_cl, synth = [], [], []
    for _ in range(args.rounds):
        bare.append(bare_forward_backward(teacher, x, targets, args.iters, contiguous))
        bare_cl.append(bare_forward_backward(teacher, x, targets, args.iters, channels_last))
        synth.append(synthesizer_iteration(teacher, targets, args.resolution, args.iters, args.amp))
    b, bc, s = statistics.median(bare), statistics.median(bare_cl), statistics.median(synth)
    ratio = statistics.median(sy / ba for sy, ba in zip(synth, bare, strict=True))
    ratio_cl = statistics.median(sy / ba for sy, ba in zip(synth, bare_cl, strict=True))
    print(f"{spec:>34} {bs:>5} {b:>17.4f} {bc:>20.4f} {s:>12.4f} {ratio:>13.3f} {ratio_cl:>9.3f}",
          flush=True)


def _measure_schedules(spec: str, teacher: Any, bs: int, args: argparse.Namespace, device: torch.device) -> None:
    targets = diode.BBoxSampler.onebox(num_classes=teacher.num_classes).sample(
        bs, image_size=(args.resolution, args.resolution), generator=torch.Generator().manual_seed(0))
    fast = diode.fast_stages(args.iters, args.resolution)
    synthesizer_iteration(teacher, targets, args.resolution, 3, args.amp)
    reference, quick = [], []
    for _ in range(args.rounds):
        reference.append(synthesizer_iteration(teacher, targets, args.resolution, args.iters, args.amp))
        quick.append(synthesizer_iteration(teacher, targets, args.resolution, args.iters, args.amp, fast))
    ratio = statistics.median(f / r for f, r in zip(quick, reference, strict=True))
    print(f"{spec:>34} {bs:>5} {statistics.median(reference):>17.4f} {statistics.median(quick):>12.4f} "
          f"{ratio:>15.3f}", flush=True)


if __name__ == "__main__":
    main()
