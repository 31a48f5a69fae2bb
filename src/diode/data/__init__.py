"""Datasets on disk: atomic writes, lossless images, YOLO/COCO labels, image folders."""

from __future__ import annotations

from diode.data.folder import IMAGE_EXTENSIONS, DetectionFolder
from diode.data.io import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    image_to_uint8,
    load_image,
    save_image,
)
from diode.data.labels import coco_dict, read_coco, read_yolo_labels, write_coco, write_yolo_labels

__all__ = [
    "IMAGE_EXTENSIONS",
    "DetectionFolder",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "coco_dict",
    "image_to_uint8",
    "load_image",
    "read_coco",
    "read_yolo_labels",
    "save_image",
    "write_coco",
    "write_yolo_labels",
]
