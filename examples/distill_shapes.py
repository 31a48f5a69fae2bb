"""The whole DIODE pipeline on a toy world: teacher, synthesis, distillation, evaluation.

1. Render a labelled shapes dataset (:mod:`diode.datasets.shapes`) and train a
   small YOLO teacher on it (a darknet cfg written by this script).
2. Forget the data: synthesize images from the teacher alone
   (:func:`diode.synthesize_dataset`, a resumable run folder).
3. Distill a freshly initialised student of the same architecture on the
   synthesized images only (:class:`diode.Distiller`, ``mode="outputs"``).
4. Evaluate teacher and student on held-out real shapes (:func:`diode.eval.evaluate`).

The defaults are sized for a quick CPU run, far too short for a good student;
raise ``--teacher-steps``, ``--iterations``, ``--num-images`` and ``--epochs``
(ideally on a GPU, ``--device cuda``) to see the student approach the teacher.

    python examples/distill_shapes.py --out runs/shapes
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import diode
from diode.datasets.shapes import ShapesConfig, write_shapes_dataset


def tiny_yolo_cfg(num_classes: int, size: int, widths: tuple[int, ...] = (16, 32, 32, 64, 64)) -> str:
    """A yolov3-tiny-like darknet cfg: five conv+BN+maxpool stages and two heads (stride 32, 16)."""
    conv = ("[convolutional]\nbatch_normalize=1\nfilters={}\nsize=3\nstride=1\npad=1\n"
            "activation=leaky\n\n[maxpool]\nsize=2\nstride=2\n\n")
    anchors = "anchors=6,6, 10,10, 14,14, 20,20, 28,28, 40,40"
    head = ("[convolutional]\nsize=1\nstride=1\npad=1\nfilters={f}\nactivation=linear\n\n"
            "[yolo]\nmask={m}\n" + anchors + f"\nclasses={num_classes}\n\n")
    filters = 3 * (5 + num_classes)
    return (f"[net]\nwidth={size}\nheight={size}\nchannels=3\n\n"
            + "".join(conv.format(w) for w in widths)
            + head.format(f=filters, m="3,4,5")
            + "[route]\nlayers=-3\n\n[upsample]\nstride=2\n\n[route]\nlayers=-1, 7\n\n"
            + head.format(f=filters, m="0,1,2"))


def train_teacher(teacher: diode.YOLOv3Adapter, data: Path, steps: int, batch_size: int,
                  size: int, seed: int) -> None:
    """Supervised training with the adapter's own YOLO loss, then freeze (eval mode, no grads)."""
    folder = diode.DetectionFolder(data, image_size=(size, size))
    loader = DataLoader(folder, batch_size=batch_size, shuffle=True, collate_fn=folder.collate,
                        generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.Adam(teacher.model.parameters(), lr=3e-3)
    teacher.model.train().requires_grad_(True)
    step = 0
    while step < steps:
        for images, targets, _ in loader:
            targets = [{k: v.to(teacher.device) for k, v in t.items()} for t in targets]
            loss = teacher.task_loss(teacher.forward(images.to(teacher.device)), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step % max(1, steps // 4) == 0 or step == steps:
                print(f"teacher step {step}/{steps}: loss {loss.item():.3f}")
            if step == steps:
                break
    teacher.freeze()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/shapes", help="folder for datasets, run folder and student")
    parser.add_argument("--size", type=int, default=64, help="image size (64..128, a multiple of 32)")
    parser.add_argument("--train-images", type=int, default=256)
    parser.add_argument("--val-images", type=int, default=64)
    parser.add_argument("--teacher-steps", type=int, default=80)
    parser.add_argument("--num-images", type=int, default=16, help="images to synthesize")
    parser.add_argument("--batch-size", type=int, default=8, help="synthesis and distillation batch size")
    parser.add_argument("--iterations", type=int, default=60, help="synthesis iterations per batch")
    parser.add_argument("--epochs", type=int, default=3, help="distillation epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    out = Path(args.out)

    config = ShapesConfig(image_size=args.size, min_size=0.2, max_size=0.5)
    train_dir = write_shapes_dataset(out / "shapes", args.train_images, config=config, seed=args.seed,
                                     split_name="train")
    val_dir = write_shapes_dataset(out / "shapes", args.val_images, config=config, seed=args.seed + 1,
                                   split_name="val")
    names = list(config.classes)
    cfg = out / "tiny-yolo.cfg"
    cfg.write_text(tiny_yolo_cfg(len(names), args.size))

    torch.manual_seed(args.seed)  # weight initialisation of the models built below
    teacher = diode.YOLOv3Adapter.from_config(cfg, class_names=names, device=args.device)
    train_teacher(teacher, train_dir, args.teacher_steps, 16, args.size, args.seed)

    synth = diode.Synthesizer(
        teacher,
        augment=diode.AugmentationPipeline(jitter=args.size // 16),
        stages=[diode.Stage(args.size, args.iterations, lr=0.1)],
        log_every=max(1, args.iterations // 2),
    )
    sampler = diode.BBoxSampler.onebox(num_classes=teacher.num_classes)
    manifest = diode.synthesize_dataset(synth, sampler, out / "synth", num_images=args.num_images,
                                        batch_size=args.batch_size, seed=args.seed)
    maps = [b["metrics"]["inversion_map50"] for b in manifest["batches"].values()]
    shown = ", ".join("n/a" if m is None else f"{m:.3f}" for m in maps)
    print(f"synthesized {args.num_images} images into {out / 'synth'}; inversion mAP50 per batch: {shown}")

    student = diode.YOLOv3Adapter.from_config(cfg, class_names=names, device=args.device)
    distiller = diode.Distiller(teacher, student, mode="outputs", epochs=args.epochs,
                                batch_size=args.batch_size, image_size=args.size, lr=2e-3, ema=None,
                                seed=args.seed)
    history = distiller.fit(out / "synth", out=out / "student")
    print(f"distilled for {len(history)} epochs: final loss {history[-1]['loss']:.4f}")

    teacher_map = diode.eval.evaluate(teacher, val_dir)["map50"]
    student_map = diode.eval.evaluate(distiller.student_for_eval(), val_dir)["map50"]
    print(f"mAP50 on real shapes: teacher {teacher_map:.3f}, student {student_map:.3f}")
    print(f"student weights: {out / 'student' / 'student.pt'}")


if __name__ == "__main__":
    main()
