"""Shared fixtures: tiny models and adapters that run in milliseconds on CPU."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TinyBNAdapter:
    """A minimal DetectorAdapter: conv+BN stack; task loss pulls a per-class map up inside boxes."""

    def __init__(self, num_classes: int = 3, norm: type[nn.Module] = nn.BatchNorm2d, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        layers: list[nn.Module] = []
        c_in = 3
        for c_out in (8, 8):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), norm(c_out), nn.ReLU()]
            c_in = c_out
        layers.append(nn.Conv2d(c_in, num_classes, 1))
        self.model = nn.Sequential(*layers).eval()
        with torch.no_grad():
            for p in self.model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            for m in self.model.modules():
                if hasattr(m, "running_mean"):
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
        self.num_classes = num_classes
        self.class_names = [f"c{i}" for i in range(num_classes)]

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)

    def task_loss(self, raw: Tensor, targets: list[dict[str, Tensor]]) -> Tensor:
        loss = raw.sum() * 0
        for i, t in enumerate(targets):
            for box, label in zip(t["boxes"], t["labels"]):
                x1, y1, x2, y2 = box.long().tolist()
                loss = loss - raw[i, label, y1:y2, x1:x2].mean()
        return loss

    def predict(self, images: Tensor, *, conf: float = 0.25, iou: float = 0.45) -> list[dict[str, Tensor]]:
        return [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
                for _ in range(images.shape[0])]

    def bn_layers(self) -> list[nn.Module]:
        return [m for m in self.model.modules() if hasattr(m, "running_mean")]
