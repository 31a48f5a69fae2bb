"""Use an Ultralytics YOLO detector (YOLOv5u/v8/v10/11) as a DIODE teacher, without the Ultralytics package.

The checkpoint is read by diode's safe reader (nothing in the file runs), the
teacher synthesizes a small labelled batch, and a student of the same
architecture, built from the checkpoint's own spec with random weights, is
distilled on it for a few steps (``outputs`` mode)::

    python examples/ultralytics_teacher.py --checkpoint runs/detect/train/weights/best.pt
    python examples/ultralytics_teacher.py                 # the hub's YOLOv10n if cached

Without ``--checkpoint`` the registered COCO YOLOv10n is used when it is already
in the weights cache (``diode weights fetch yolov10n``); otherwise the example
falls back to a randomly initialised YOLOv10n so it still runs offline (its
images then mean nothing). Weights trained with Ultralytics carry its AGPL-3.0
terms.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import diode
from diode.data.io import load_image


def load_teacher(args: argparse.Namespace) -> diode.YOLOv8Adapter:
    if args.checkpoint:
        return diode.YOLOv8Adapter.from_ultralytics(args.checkpoint, device=args.device)
    entry = diode.hub.get_entry("yolov10n")
    if (diode.hub.cache_dir() / entry.file_name).is_file():
        return diode.YOLOv8Adapter.from_pretrained("yolov10n", device=args.device)
    print("yolov10n is not in the weights cache (diode weights fetch yolov10n): using random weights")
    torch.manual_seed(args.seed)
    return diode.YOLOv8Adapter.from_spec("yolov10n", device=args.device).freeze()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="an Ultralytics detection checkpoint (.pt)")
    parser.add_argument("--image", help="a photo to run the teacher on first")
    parser.add_argument("--out", default="runs/ultralytics-teacher", help="run folder to write")
    parser.add_argument("--num-images", type=int, default=4, help="images to synthesize")
    parser.add_argument("--iterations", type=int, default=40, help="synthesis steps (200 give clear objects)")
    parser.add_argument("--resolution", type=int, default=160, help="canvas size in pixels, a multiple of 32")
    parser.add_argument("--distill-epochs", type=int, default=1, help="student epochs on the batch (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    teacher = load_teacher(args)
    head = "YOLOv10 one-to-one head, no NMS" if teacher.model.end2end else "NMS head"
    print(f"teacher: {teacher.num_classes} classes, {len(teacher.bn_layers())} BatchNorm layers, {head}, "
          f"strides {teacher.model.strides}")

    if args.image:
        det = teacher.detect(load_image(args.image))
        for box, score, label in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist(),
                                     strict=True):
            print(f"  {teacher.class_names[label]:>16} {score:.2f} at {[round(v) for v in box]}")

    generator = torch.Generator().manual_seed(args.seed)
    size = (args.resolution, args.resolution)
    targets = diode.BBoxSampler.onebox(num_classes=teacher.num_classes).sample(args.num_images, image_size=size,
                                                                               generator=generator)
    synth = diode.Synthesizer(teacher, stages=[diode.Stage(args.resolution, args.iterations, lr=0.2)],
                              log_every=max(1, args.iterations // 4))
    result = synth.run(targets, generator=generator)
    out = Path(args.out)
    diode.write_dataset(result, out, class_names=teacher.class_names,
                        config={"teacher": teacher.source, "synthesizer": synth.describe()})
    map50 = result.metrics["inversion_map50"]
    print(f"wrote {args.num_images} images to {out}")
    print(f"inversion mAP50: {'n/a (pip install diode[eval])' if map50 is None else f'{map50:.3f}'}")

    if args.distill_epochs > 0:
        student = diode.YOLOv8Adapter.from_spec(teacher.model.spec, class_names=teacher.class_names,
                                                device=args.device)
        distiller = diode.Distiller(teacher, student, mode="outputs", epochs=args.distill_epochs,
                                    batch_size=min(4, args.num_images), image_size=args.resolution)
        history = distiller.fit(out / "images", out=out / "student", progress=False)
        print(f"student: {sum(p.numel() for p in student.model.parameters()):,} parameters, "
              f"last loss {history[-1]['loss']:.4f}, weights in {out / 'student'}")


if __name__ == "__main__":
    main()
