"""Invert a torchvision detector: train a small SSDlite on the shapes world, then synthesize from it.

Any torchvision detection model (Faster/Mask/Keypoint R-CNN, RetinaNet, FCOS,
SSD/SSDlite) with BatchNorm works in diode through :class:`diode.TorchvisionAdapter`, which
feeds images at their own size (no resize), computes the model's own training
losses without training mode, draws the R-CNN proposal sampling from diode's
generator and maps labels to contiguous classes (background and COCO's 91 ids
handled).

The script builds a compact SSDlite (torchvision's ``SSD`` with an ``SSDLiteHead``
on a small BatchNorm backbone, so it trains on a CPU in minutes), trains it on
diode's procedural shapes world with the adapter's own ``task_loss``, freezes it,
and synthesizes a batch with the default :class:`diode.DeepInversionLoss` and
:class:`diode.AugmentationPipeline`; it prints the teacher's mAP50 on real shapes
images and on the synthesized ones (the inversion mAP). ``--builder`` uses one of
torchvision's builders instead (``diode.TorchvisionAdapter.from_name``; e.g.
``fcos_resnet50_fpn``: far slower to train on a CPU).

    python examples/torchvision_teacher.py --train-steps 400 --iterations 300 --out runs/tv
"""

from __future__ import annotations

import argparse
from collections import OrderedDict

import torch
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.ssdlite import SSDLiteHead

import diode
from diode.datasets.shapes import ShapesConfig, ShapesDataset


def conv_bn(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    """3x3 convolution, BatchNorm, ReLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class SmallBackbone(nn.Module):
    """Feature maps at strides 8, 16 and 32 (``out_channels`` each), torchvision's backbone contract:
    ``forward`` returns an ordered dict of maps and ``out_channels`` lists their widths (SSD)."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 32, 2), conv_bn(32, 48, 2), conv_bn(48, width, 2))
        self.stages = nn.ModuleList([conv_bn(width, width, 1), conv_bn(width, width, 2), conv_bn(width, width, 2)])
        self.out_channels = [width] * 3

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        x = self.stem(x)
        out = OrderedDict()
        for i, stage in enumerate(self.stages):
            x = stage(x)
            out[str(i)] = x
        return out


def small_ssdlite(num_classes: int, size: int) -> SSD:
    """An SSDlite for ``num_classes`` object classes (plus torchvision's background class 0)."""
    boxes = DefaultBoxGenerator([[2, 3]] * 3, min_ratio=0.15, max_ratio=0.7)
    backbone = SmallBackbone()
    head = SSDLiteHead(backbone.out_channels, boxes.num_anchors_per_location(), num_classes + 1, nn.BatchNorm2d)
    return SSD(backbone, boxes, (size, size), num_classes + 1, head=head, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def train(adapter: diode.TorchvisionAdapter, data: ShapesDataset, steps: int, batch_size: int,
          generator: torch.Generator) -> None:
    """AdamW with a one-cycle schedule on the adapter's task loss; BatchNorm in training mode learns
    the running statistics that synthesis later matches. Then freeze the model (a teacher)."""
    model = adapter.model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=max(steps, 2), pct_start=0.1)
    for step in range(steps):
        idx = torch.randint(len(data), (batch_size,), generator=generator).tolist()
        images, targets = ShapesDataset.collate([data[i] for i in idx])
        loss = adapter.task_loss(adapter.forward(images), targets, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        optimizer.step()
        schedule.step()
        if step % max(1, steps // 4) == 0 or step == steps - 1:
            print(f"train step {step + 1:4d}/{steps}: loss {loss.item():.3f}")
    adapter.freeze()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--builder", help="a torchvision detection builder name instead of the small SSDlite")
    parser.add_argument("--train-steps", type=int, default=400, help="training steps of the teacher")
    parser.add_argument("--train-images", type=int, default=1024, help="shapes images to train on")
    parser.add_argument("--val-images", type=int, default=64, help="shapes images to measure the teacher on")
    parser.add_argument("--batch-size", type=int, default=16, help="training batch size")
    parser.add_argument("--iterations", type=int, default=300, help="synthesis iterations")
    parser.add_argument("--num-images", type=int, default=8, help="images to synthesize")
    parser.add_argument("--resolution", type=int, default=96, help="canvas size (shapes world: 64..128)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the synthesized batch as a run folder here")
    args = parser.parse_args()

    torch.manual_seed(args.seed)  # the model's weight initialisation
    config = ShapesConfig(image_size=args.resolution)
    data = ShapesDataset(args.train_images, config=config, seed=args.seed)
    if args.builder:
        # torchvision's num_classes counts the background for R-CNN and SSD models
        background = 0 if args.builder.startswith(("retinanet", "fcos")) else 1
        teacher = diode.TorchvisionAdapter.from_name(args.builder, num_classes=config.num_classes + background,
                                                     class_names=data.class_names)
    else:
        model = small_ssdlite(config.num_classes, args.resolution)
        teacher = diode.TorchvisionAdapter(model, class_names=data.class_names)
    print(teacher)
    generator = torch.Generator().manual_seed(args.seed)
    train(teacher, data, args.train_steps, args.batch_size, generator)

    val = ShapesDataset(args.val_images, config=config, seed=args.seed + 1)
    val_images, val_targets = ShapesDataset.collate([val[i] for i in range(len(val))])
    try:
        real = diode.eval.detection_map(teacher.predict(val_images, conf=0.05), val_targets,
                                        num_classes=teacher.num_classes)["map50"]
        print(f"teacher mAP50 on real shapes images: {float(real):.3f}")
    except ImportError as e:
        print(f"teacher mAP50 on real shapes images: n/a ({e})")

    sampler = diode.BBoxSampler.onebox(num_classes=teacher.num_classes)
    size = (args.resolution, args.resolution)
    synth = diode.Synthesizer(
        teacher,  # the synthesizer runs a private copy: the teacher itself is never changed
        loss=diode.DeepInversionLoss(teacher),  # recipe weights + the adapter's synthesis_defaults()
        augment=diode.AugmentationPipeline(jitter=max(1, args.resolution // 8)),  # the recipe's 20 px at 160 px
        stages=[diode.Stage(args.resolution, args.iterations, lr=0.2)],
        log_every=max(1, args.iterations // 4),
    )
    targets = sampler.sample(args.num_images, image_size=size, generator=generator)
    result = synth.run(targets, generator=generator)
    for record in result.history:
        print(f"synthesis iteration {record['iteration']:4d}: total {record['total']:.3f} "
              f"task {record['task']:.3f} bn {record['bn']:.3f}")
    if args.out:
        diode.write_dataset(result, args.out, class_names=teacher.class_names,
                            config={"teacher": teacher.source, "synthesizer": synth.describe()})
        print(f"wrote {args.num_images} images to {args.out}")
    map50 = result.metrics["inversion_map50"]
    print(f"inversion mAP50: {'n/a (pip install diode[eval])' if map50 is None else f'{map50:.3f}'}")


if __name__ == "__main__":
    main()
