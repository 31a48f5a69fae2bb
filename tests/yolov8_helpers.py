"""Shared pieces of the anchor-free YOLO tests: tiny specs and the real-checkpoint fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

UP = [-1, 1, "nn.Upsample", [None, 2, "nearest"]]

#: A YOLOv8-like spec small enough for unit tests: 3 classes, strides 8 and 16, 8-32 channels.
TINY_V8 = {
    "nc": 3,
    "depth_multiple": 0.33,
    "width_multiple": 0.0625,
    "backbone": [
        [-1, 1, "Conv", [64, 3, 2]],
        [-1, 1, "Conv", [128, 3, 2]],
        [-1, 3, "C2f", [128, True]],
        [-1, 1, "Conv", [256, 3, 2]],
        [-1, 3, "C2f", [256, True]],
        [-1, 1, "Conv", [512, 3, 2]],
        [-1, 1, "SPPF", [512, 5]],
    ],
    "head": [
        UP,
        [[-1, 4], 1, "Concat", [1]],
        [-1, 3, "C2f", [256]],
        [[9, 6], 1, "Detect", ["nc"]],
    ],
}

#: A YOLOv10-like spec (SCDown, PSA, C2fCIB with the large kernel, v10Detect).
TINY_V10 = {
    "nc": 3,
    "scales": {"t": [0.33, 0.125, 256]},
    "scale": "t",
    "backbone": [
        [-1, 1, "Conv", [64, 3, 2]],
        [-1, 1, "Conv", [128, 3, 2]],
        [-1, 1, "C2f", [128, True]],
        [-1, 1, "Conv", [256, 3, 2]],
        [-1, 1, "C2f", [256, True]],
        [-1, 1, "SCDown", [512, 3, 2]],
        [-1, 1, "SPPF", [512, 5]],
        [-1, 1, "PSA", [512]],
    ],
    "head": [
        UP,
        [[-1, 4], 1, "Concat", [1]],
        [-1, 1, "C2fCIB", [256, True, True]],
        [[10, 7], 1, "v10Detect", ["nc"]],
    ],
}

#: A YOLO11-like spec (C3k2 with and without C3k, C2PSA, the depthwise Detect class branch).
TINY_11 = {
    "nc": 2,
    "scales": {"t": [0.5, 0.125, 256]},
    "scale": "t",
    "backbone": [
        [-1, 1, "Conv", [64, 3, 2]],
        [-1, 1, "Conv", [128, 3, 2]],
        [-1, 2, "C3k2", [256, False, 0.25]],
        [-1, 1, "Conv", [256, 3, 2]],
        [-1, 2, "C3k2", [256, True]],
        [-1, 1, "Conv", [512, 3, 2]],
        [-1, 1, "SPPF", [512, 5]],
        [-1, 2, "C2PSA", [512]],
    ],
    "head": [
        UP,
        [[-1, 4], 1, "Concat", [1]],
        [-1, 2, "C3k2", [256, False]],
        [[10, 7], 1, "Detect", ["nc"]],
    ],
}


def _unavailable(reason: str) -> None:
    """Skip locally, fail in CI: real-weight tests must run there."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def _fetch(name: str) -> Path:
    from diode import hub

    try:
        return hub.fetch(name)
    except (RuntimeError, ValueError) as e:
        _unavailable(f"{name} weights unavailable: {e}")
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def yolov10n_weights() -> Path:
    """The real COCO YOLOv10n checkpoint, fetched and sha256-checked through the hub."""
    return _fetch("yolov10n")


@pytest.fixture(scope="session")
def fall_weights() -> Path:
    """The real 2-class YOLOv8s fall-detection checkpoint (FP16), fetched through the hub."""
    return _fetch("yolov8s-fall")
