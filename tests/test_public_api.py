from __future__ import annotations

import subprocess
import sys
from importlib import resources

import diode

PUBLIC = {
    "AugmentationPipeline", "BBoxSampler", "CompetitionTerm", "DeepInversionLoss", "DetectionFolder",
    "DetectorAdapter", "DistillConfig", "Distiller", "FPSampling", "Stage", "SynthesisResult", "Synthesizer",
    "TorchvisionAdapter", "YOLOv3Adapter", "YOLOv8Adapter", "__version__", "create_adapter",
    "estimate_class_prior", "eval", "fast_stages", "hub", "reference_stages", "synthesize_dataset", "viz",
    "write_dataset",
}


def test_public_names_are_exported() -> None:
    assert set(diode.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(diode, name) is not None


def test_public_callables_are_documented() -> None:
    for name in PUBLIC - {"__version__"}:
        assert getattr(diode, name).__doc__, f"diode.{name} has no docstring"


def test_package_data_ships() -> None:
    files = resources.files("diode")
    assert (files / "py.typed").is_file()
    cfgs = files / "models" / "yolo" / "cfgs"
    for name in ("yolov3.cfg", "yolov3-tiny.cfg", "yolov3-spp.cfg", "coco.names"):
        assert (cfgs / name).is_file()
    tiny = (cfgs / "yolov3-tiny.cfg").read_text()
    assert "mask = 1,2,3" in tiny and "mask = 0,1,2" not in tiny


def test_python_dash_m_diode_works() -> None:
    proc = subprocess.run([sys.executable, "-m", "diode", "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"diode {diode.__version__}"
