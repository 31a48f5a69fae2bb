"""Synthesize a small labelled dataset from the COCO yolov3-tiny teacher (DIODE).

A walk-through of the Python API: the teacher comes from the weights hub
(downloaded once, sha256-checked), a one-box sampler draws one target box per
image, a single-stage :class:`diode.Synthesizer` optimises noise into images
the teacher detects as those targets, and :func:`diode.write_dataset` saves
the batch as a run folder (``images/``, ``labels/``, ``annotations.json``,
``manifest.json``, ``preview.png``).

    python examples/synthesize_yolov3_tiny.py --out runs/example --iterations 200

The defaults finish in well under a minute on a laptop CPU; the images only
start to look like objects after a few hundred iterations (the reference recipe
uses 2500 at 160 px, then 1500 at 320 px: see ``examples/reference_recipe.toml``).
"""

from __future__ import annotations

import argparse

import torch

import diode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/example", help="run folder to write")
    parser.add_argument("--num-images", type=int, default=4, help="images in the batch")
    parser.add_argument("--iterations", type=int, default=40, help="optimisation steps")
    parser.add_argument("--resolution", type=int, default=160, help="canvas size in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", help="a local copy of yolov3-tiny.weights (else the hub cache)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    teacher = diode.YOLOv3Adapter.from_pretrained("yolov3-tiny", weights=args.weights, device=args.device)
    sampler = diode.BBoxSampler.onebox(num_classes=teacher.num_classes)
    synth = diode.Synthesizer(
        teacher,
        loss=diode.DeepInversionLoss(teacher),  # the reference recipe's stage-1 weights
        augment=diode.AugmentationPipeline(),  # jitter 20 px, flip, brightness, contrast, erase
        stages=[diode.Stage(args.resolution, args.iterations, lr=0.2)],
        log_every=max(1, args.iterations // 4),
    )

    generator = torch.Generator().manual_seed(args.seed)
    size = (args.resolution, args.resolution)
    targets = sampler.sample(args.num_images, image_size=size, generator=generator)
    result = synth.run(targets, generator=generator)

    for record in result.history:
        print(f"iteration {record['iteration']:5d}: total {record['total']:.3f} "
              f"task {record['task']:.3f} bn {record['bn']:.3f}")
    names = [teacher.class_names[int(t["labels"][0])] for t in targets]
    print(f"targets: {', '.join(names)}")
    manifest = diode.write_dataset(result, args.out, class_names=teacher.class_names,
                                   config={"teacher": teacher.source, "synthesizer": synth.describe()})
    print(f"wrote {args.num_images} images to {args.out} ({manifest['status']})")
    map50 = result.metrics["inversion_map50"]
    print(f"inversion mAP50: {'n/a (pip install diode[eval])' if map50 is None else f'{map50:.3f}'}")


if __name__ == "__main__":
    main()
