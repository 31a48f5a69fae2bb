"""Wrap your own detector for diode: a complete :class:`diode.DetectorAdapter` example.

The detector here is a toy, CenterNet-like, anchor-free network written in this
file: a small conv + BatchNorm backbone at stride 4 and a 1x1 head predicting,
per cell, one heatmap logit per class, a sub-cell centre offset and the log box
size. Its adapter supplies what diode needs:

- ``model`` (the ``nn.Module``), ``num_classes`` and ``class_names``;
- ``forward(images)``: raw, differentiable outputs for images ``[B, 3, H, W]`` RGB in ``[0, 1]``;
- ``size_divisor``: input sizes that need no padding (the model's stride here);
- ``task_loss(raw, targets, *, generator=None)``: the detector's own training loss against
  targets (``"boxes"`` xyxy pixels, ``"labels"`` int64), which synthesis uses as its task
  term; any random draw it makes comes from ``generator``;
- ``predict(images, conf=..., iou=...)``: post-processed detections (``boxes``, ``scores``, ``labels``);
- ``bn_layers()``: the BatchNorm layers whose running statistics DeepInversion matches;
- ``synthesis_defaults()``: loss options that suit this detector (``{}``: the generic defaults).

The script trains the toy detector briefly on diode's procedural shapes world
(so its BatchNorm statistics describe real images), then synthesizes a batch of
images from it with :class:`diode.DeepInversionLoss` and :class:`diode.Synthesizer`,
and prints the teacher's mAP50 on them (the inversion mAP).

    python examples/custom_adapter.py --train-steps 150 --iterations 200 --out runs/custom
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, sigmoid_focal_loss

import diode
from diode.datasets.shapes import ShapesConfig, ShapesDataset


def conv_bn(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    """3x3 convolution, BatchNorm, ReLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class TinyCenterNet(nn.Module):
    """Anchor-free detector at stride 4: output ``[B, C + 4, H / 4, W / 4]``.

    Channels: ``C`` class heatmap logits, 2 centre offsets (logits of the position
    inside the cell) and 2 log box sizes (in units of the stride).
    """

    stride = 4

    def __init__(self, num_classes: int, width: int = 16) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone = nn.Sequential(conv_bn(3, width, 2), conv_bn(width, 2 * width, 2),
                                      conv_bn(2 * width, 2 * width), conv_bn(2 * width, 2 * width))
        self.head = nn.Conv2d(2 * width, num_classes + 4, 1)
        nn.init.constant_(self.head.bias[:num_classes], -2.0)  # start with few detections

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


class TinyCenterNetAdapter:
    """:class:`TinyCenterNet` seen through diode's adapter protocol."""

    def __init__(self, model: TinyCenterNet, class_names: list[str]) -> None:
        if len(class_names) != model.num_classes:
            raise ValueError(f"class_names has {len(class_names)} names, the model {model.num_classes} classes")
        self.model = model
        self.num_classes = model.num_classes
        self.class_names = list(class_names)
        self.size_divisor = model.stride

    def forward(self, images: Tensor) -> Tensor:
        """Raw outputs ``[B, C + 4, ceil(H / 4), ceil(W / 4)]`` for images ``[B, 3, H, W]`` in ``[0, 1]``."""
        s = self.model.stride
        # Zero-pad right/bottom to a multiple of the stride: pixel coordinates stay the same.
        images = F.pad(images, (0, -images.shape[3] % s, 0, -images.shape[2] % s))
        return self.model((images - 0.5) / 0.25)  # the adapter owns the normalization

    def synthesis_defaults(self) -> dict[str, float]:
        """No overrides: the generic (reference recipe) loss weights work for this detector."""
        return {}

    def task_loss(self, raw: Tensor, targets: list[dict[str, Tensor]], *,
                  generator: torch.Generator | None = None) -> Tensor:
        """Focal loss on the heatmap + L1 on offsets and log sizes at each box's centre cell."""
        c, s = self.num_classes, self.model.stride
        raw = raw.float()
        heat, offset, log_size = raw[:, :c], raw[:, c:c + 2], raw[:, c + 2:]
        boxes = torch.cat([t["boxes"] for t in targets]).to(raw.device, torch.float32)
        labels = torch.cat([t["labels"] for t in targets]).to(raw.device)
        image = torch.cat([torch.full((len(t["labels"]),), i, dtype=torch.long)
                           for i, t in enumerate(targets)]).to(raw.device)
        h, w = heat.shape[-2:]
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2 / s
        cell = centre.floor().long()
        cx, cy = cell[:, 0].clamp(0, w - 1), cell[:, 1].clamp(0, h - 1)
        wanted = torch.zeros_like(heat)
        wanted[image, labels, cy, cx] = 1.0
        n = max(len(labels), 1)
        loss = sigmoid_focal_loss(heat, wanted, reduction="sum") / n
        if len(labels):
            size = ((boxes[:, 2:] - boxes[:, :2]) / s).clamp(min=1e-3).log()
            loss = loss + F.l1_loss(log_size[image, :, cy, cx], size)
            loss = loss + F.l1_loss(offset[image, :, cy, cx].sigmoid(), centre - cell.float())
        return loss

    @torch.no_grad()
    def predict(self, images: Tensor, *, conf: float = 0.25, iou: float = 0.45) -> list[dict[str, Tensor]]:
        """Heatmap peaks above ``conf`` decoded to boxes (xyxy pixels), then class-wise NMS at ``iou``."""
        training = self.model.training
        self.model.eval()
        try:
            raw = self.forward(images).float()
        finally:
            self.model.train(training)
        c, s = self.num_classes, self.model.stride
        height, width = images.shape[-2:]
        scores = raw[:, :c].sigmoid()
        peaks = scores * (F.max_pool2d(scores, 3, 1, 1) == scores)
        out = []
        for b in range(images.shape[0]):
            label, y, x = (peaks[b] > conf).nonzero(as_tuple=True)
            score = peaks[b, label, y, x]
            centre_x = (x + raw[b, c, y, x].sigmoid()) * s
            centre_y = (y + raw[b, c + 1, y, x].sigmoid()) * s
            half_w = raw[b, c + 2, y, x].exp() * s / 2
            half_h = raw[b, c + 3, y, x].exp() * s / 2
            boxes = torch.stack((centre_x - half_w, centre_y - half_h, centre_x + half_w, centre_y + half_h), 1)
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            boxes, score, label = boxes[keep], score[keep], label[keep]
            keep = batched_nms(boxes, score, label, iou)[:100]
            out.append({"boxes": boxes[keep], "scores": score[keep], "labels": label[keep]})
        return out

    def bn_layers(self) -> list[nn.Module]:
        """The BatchNorm layers, in forward order."""
        return [m for m in self.model.modules() if isinstance(m, nn.BatchNorm2d)]


def train(adapter: TinyCenterNetAdapter, data: ShapesDataset, steps: int, batch_size: int,
          generator: torch.Generator) -> None:
    """A few Adam steps on the shapes world, then freeze the model (a teacher)."""
    model = adapter.model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        idx = torch.randint(len(data), (batch_size,), generator=generator).tolist()
        images, targets = ShapesDataset.collate([data[i] for i in idx])
        loss = adapter.task_loss(adapter.forward(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % max(1, steps // 4) == 0 or step == steps - 1:
            print(f"train step {step + 1:4d}/{steps}: loss {loss.item():.3f}")
    model.eval().requires_grad_(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-steps", type=int, default=60, help="training steps of the toy detector")
    parser.add_argument("--train-images", type=int, default=256, help="shapes images to train on")
    parser.add_argument("--iterations", type=int, default=60, help="synthesis iterations")
    parser.add_argument("--num-images", type=int, default=8, help="images to synthesize")
    parser.add_argument("--resolution", type=int, default=64, help="canvas size (shapes world: 64..128)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the synthesized batch as a run folder here")
    args = parser.parse_args()

    torch.manual_seed(args.seed)  # the toy model's weight initialisation
    config = ShapesConfig(image_size=args.resolution, min_objects=1, max_objects=2, min_size=0.25,
                          background="plain")
    data = ShapesDataset(args.train_images, config=config, seed=args.seed)
    adapter = TinyCenterNetAdapter(TinyCenterNet(config.num_classes), data.class_names)
    if not isinstance(adapter, diode.DetectorAdapter):  # the protocol is runtime-checkable
        raise TypeError("TinyCenterNetAdapter misses a DetectorAdapter attribute or method")
    generator = torch.Generator().manual_seed(args.seed)
    train(adapter, data, args.train_steps, 16, generator)

    sampler = diode.BBoxSampler.onebox(num_classes=adapter.num_classes, min_size=0.3, max_size=0.6)
    size = (args.resolution, args.resolution)
    synth = diode.Synthesizer(
        adapter,
        loss=diode.DeepInversionLoss(adapter, w_task=1.0, w_tv1=10.0),
        augment=diode.AugmentationPipeline(jitter=max(1, args.resolution // 16), erase=0.0),
        stages=[diode.Stage(args.resolution, args.iterations, lr=0.1)],
        log_every=max(1, args.iterations // 4),
    )
    targets = sampler.sample(args.num_images, image_size=size, generator=generator)
    result = synth.run(targets, generator=generator)
    for record in result.history:
        print(f"synthesis iteration {record['iteration']:4d}: total {record['total']:.3f} "
              f"task {record['task']:.3f} bn {record['bn']:.3f}")
    if args.out:
        diode.write_dataset(result, args.out, class_names=adapter.class_names)
        print(f"wrote {args.num_images} images to {args.out}")
    map50 = result.metrics["inversion_map50"]
    print(f"inversion mAP50: {'n/a (pip install diode[eval])' if map50 is None else f'{map50:.3f}'}")


if __name__ == "__main__":
    main()
