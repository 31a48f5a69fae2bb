"""Detector architectures diode ships (the darknet YOLOv3 family in :mod:`diode.models.yolo`)."""
