"""diode: data-free knowledge distillation for object detection."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
