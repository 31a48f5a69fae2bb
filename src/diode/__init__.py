"""diode: data-free knowledge distillation for object detection (DIODE).

Synthesize a labelled detection dataset from a trained detector alone
(DeepInversion for detection) and distill a student detector from it.
"""

from __future__ import annotations

__version__ = "0.1.0"

from diode import eval, hub, viz
from diode.adapters.base import DetectorAdapter
from diode.adapters.factory import create_adapter
from diode.adapters.torchvision import TorchvisionAdapter
from diode.adapters.ultralytics import YOLOv8Adapter
from diode.adapters.yolo import YOLOv3Adapter
from diode.data.folder import DetectionFolder
from diode.distill import DistillConfig, Distiller
from diode.inversion.augment import AugmentationPipeline
from diode.inversion.competition import CompetitionTerm
from diode.inversion.job import synthesize_dataset, write_dataset
from diode.inversion.loss import DeepInversionLoss
from diode.inversion.prior import estimate_class_prior
from diode.inversion.sampler import BBoxSampler, FPSampling
from diode.inversion.synthesizer import Stage, SynthesisResult, Synthesizer, fast_stages, reference_stages

__all__ = [
    "AugmentationPipeline",
    "BBoxSampler",
    "CompetitionTerm",
    "DeepInversionLoss",
    "DetectionFolder",
    "DetectorAdapter",
    "DistillConfig",
    "Distiller",
    "FPSampling",
    "Stage",
    "SynthesisResult",
    "Synthesizer",
    "TorchvisionAdapter",
    "YOLOv3Adapter",
    "YOLOv8Adapter",
    "__version__",
    "create_adapter",
    "estimate_class_prior",
    "eval",
    "fast_stages",
    "hub",
    "reference_stages",
    "synthesize_dataset",
    "viz",
    "write_dataset",
]
