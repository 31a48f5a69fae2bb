"""Detector adapters: the protocol diode needs and its implementations."""

from __future__ import annotations

from diode.adapters.base import DetectorAdapter
from diode.adapters.yolo import YOLOv3Adapter

__all__ = ["DetectorAdapter", "YOLOv3Adapter"]
