"""The darknet YOLOv3 family: cfg parsing, the model, and weight file I/O."""

from __future__ import annotations

from .cfg import available_cfgs, bundled_cfg_path, parse_cfg
from .darknet import Darknet
from .weights import (
    ULTRALYTICS_BN_EPS,
    load_darknet_weights,
    load_ultralytics_checkpoint,
    read_darknet_header,
    save_darknet_weights,
)

__all__ = [
    "ULTRALYTICS_BN_EPS",
    "Darknet",
    "available_cfgs",
    "bundled_cfg_path",
    "load_darknet_weights",
    "load_ultralytics_checkpoint",
    "parse_cfg",
    "read_darknet_header",
    "save_darknet_weights",
]
