"""Shared fixtures: tiny models and adapters that run in milliseconds on CPU."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn


def _unavailable(reason: str) -> None:
    """Skip locally, fail in CI: real-weight tests must run there."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def real_weights() -> Path:
    """The real COCO yolov3-tiny weights, fetched and sha256-checked through the hub."""
    from diode import hub

    try:
        return hub.fetch("yolov3-tiny")
    except (RuntimeError, ValueError) as e:
        _unavailable(f"yolov3-tiny weights unavailable: {e}")
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def real_images() -> Path:
    """Darknet's sample photos (dog.jpg, ...): $DIODE_TEST_IMAGES, the cache, or Debian's darknet package.

    Runs only when a test asks for it (never at collection), never refreshes the package lists
    (no ``apt-get update``) and skips with the reason and the fix when the photos cannot be had.
    """
    from diode import hub

    env = os.environ.get("DIODE_TEST_IMAGES")
    cached = hub.cache_dir() / "test-images"
    for folder in (Path(env) if env else None, cached):
        if folder is not None and (folder / "dog.jpg").is_file():
            return folder
    how = ("set DIODE_TEST_IMAGES to a folder holding darknet's dog.jpg, or copy the photos of darknet's data/ "
           f"folder to {cached}")
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        _unavailable(f"darknet sample photos unavailable: no apt-get/dpkg-deb to fetch Debian's darknet package; {how}")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            download = subprocess.run(["apt-get", "download", "darknet"], cwd=tmp, capture_output=True, text=True,
                                      timeout=120)
            if download.returncode != 0:
                reason = (download.stderr.strip().splitlines() or ["no output"])[-1]
                _unavailable(f"darknet sample photos unavailable (offline, or no package lists: `apt-get download "
                             f"darknet` said {reason!r}); {how}")
            deb = next(Path(tmp).glob("darknet_*.deb"))
            subprocess.run(["dpkg-deb", "-x", str(deb), tmp + "/x"], check=True, capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError, StopIteration) as e:
            _unavailable(f"darknet sample photos unavailable (apt-get download darknet failed: {e}); {how}")
        cached.mkdir(parents=True, exist_ok=True)
        for jpg in (Path(tmp) / "x/usr/share/darknet/data").glob("*.jpg"):
            shutil.copy(jpg, cached / jpg.name)
    return cached


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
        self.size_divisor = 1

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)

    def synthesis_defaults(self) -> dict[str, float]:
        return {}

    def task_loss(self, raw: Tensor, targets: list[dict[str, Tensor]], *,
                  generator: torch.Generator | None = None) -> Tensor:
        loss = raw.sum() * 0
        for i, t in enumerate(targets):
            for box, label in zip(t["boxes"], t["labels"], strict=True):
                x1, y1, x2, y2 = box.long().tolist()
                loss = loss - raw[i, label, y1:y2, x1:x2].mean()
        return loss

    def predict(self, images: Tensor, *, conf: float = 0.25, iou: float = 0.45) -> list[dict[str, Tensor]]:
        return [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
                for _ in range(images.shape[0])]

    def bn_layers(self) -> list[nn.Module]:
        return [m for m in self.model.modules() if hasattr(m, "running_mean")]


# A yolov3-tiny-like darknet cfg small enough for unit tests: 64x64 input,
# two heads (stride 32 and 16), 3 classes, 8-16 channels.
TINY_YOLO_CFG = """
[net]
width=64
height=64
channels=3

[convolutional]
batch_normalize=1
filters=8
size=3
stride=1
pad=1
activation=leaky

[maxpool]
size=2
stride=2

[convolutional]
batch_normalize=1
filters=8
size=3
stride=1
pad=1
activation=leaky

[maxpool]
size=2
stride=2

[convolutional]
batch_normalize=1
filters=16
size=3
stride=1
pad=1
activation=leaky

[maxpool]
size=2
stride=2

[convolutional]
batch_normalize=1
filters=16
size=3
stride=1
pad=1
activation=leaky

[maxpool]
size=2
stride=2

[convolutional]
batch_normalize=1
filters=16
size=3
stride=1
pad=1
activation=leaky

[maxpool]
size=2
stride=2

[convolutional]
size=1
stride=1
pad=1
filters=24
activation=linear

[yolo]
mask=3,4,5
anchors=6,8, 10,14, 16,20, 24,30, 36,40, 50,56
classes=3

[route]
layers=-3

[upsample]
stride=2

[route]
layers=-1, 7

[convolutional]
size=1
stride=1
pad=1
filters=24
activation=linear

[yolo]
mask=0,1,2
anchors=6,8, 10,14, 16,20, 24,30, 36,40, 50,56
classes=3
"""


def make_tiny_yolo(seed: int = 0, *, num_classes: int = 3):
    """A frozen YOLOv3Adapter on TINY_YOLO_CFG with seeded random weights and BN statistics."""
    from diode.adapters.yolo import YOLOv3Adapter
    from diode.models.yolo import Darknet

    torch.manual_seed(seed)
    model = Darknet(TINY_YOLO_CFG, num_classes=num_classes)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in model.bn_layers():
            bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g) * 0.2)
            bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g) * 0.5 + 0.1)
    names = ["circle", "square", "triangle", "cross", "ring", "diamond"][:num_classes]
    return YOLOv3Adapter(model, class_names=names, source={"name": "tiny", "cfg": "tiny"}).freeze()


def onebox_targets(n: int, size: int = 64, num_classes: int = 3) -> list[dict[str, Tensor]]:
    from diode.inversion.sampler import BBoxSampler

    sampler = BBoxSampler.onebox(num_classes=num_classes)
    return sampler.sample(n, image_size=(size, size), generator=torch.Generator().manual_seed(n))
