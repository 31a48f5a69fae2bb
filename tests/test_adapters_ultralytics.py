from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision.ops import box_iou
from yolov8_helpers import TINY_11, TINY_V8, TINY_V10, fall_weights, yolov10n_weights  # noqa: F401

from diode import hub
from diode.adapters._common import letterbox
from diode.adapters.base import DetectorAdapter
from diode.adapters.ultralytics import PAD_VALUE, YOLOv8Adapter
from diode.data.io import load_image
from diode.models.yolov8.loss import DetectionLoss, V10DetectionLoss

ROOT = Path(__file__).parents[1]
FIXTURE = json.loads((ROOT / "tests/fixtures/ultralytics_reference.json").read_text())


def _tiny(spec: dict = TINY_V8, seed: int = 0) -> YOLOv8Adapter:
    torch.manual_seed(seed)
    return YOLOv8Adapter.from_spec(spec)


def _targets() -> list[dict[str, torch.Tensor]]:
    return [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
            {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]


def test_is_a_detector_adapter() -> None:
    adapter = _tiny()
    assert isinstance(adapter, DetectorAdapter)
    assert adapter.size_divisor == 16 and adapter.num_classes == 3
    assert adapter.class_names == ["class_0", "class_1", "class_2"]
    assert adapter.synthesis_defaults() == {}
    assert isinstance(adapter.loss, DetectionLoss)
    assert isinstance(_tiny(TINY_V10).loss, V10DetectionLoss)
    assert "Detect" in repr(adapter)


def test_from_spec_names_and_class_count() -> None:
    coco = YOLOv8Adapter.from_spec("yolov8n")
    assert coco.class_names == list(hub.COCO_CLASSES) and coco.model.training
    named = YOLOv8Adapter.from_spec(TINY_V8, class_names=["a", "b"])
    assert named.num_classes == 2 and named.class_names == ["a", "b"]
    assert YOLOv8Adapter.from_spec(TINY_V8, num_classes=5).num_classes == 5
    with pytest.raises(ValueError, match="class_names has 3 names"):
        YOLOv8Adapter(named.model, class_names=["x", "y", "z"])
    with pytest.raises(TypeError, match="YOLOModel"):
        YOLOv8Adapter(torch.nn.Linear(2, 2))  # type: ignore[arg-type]


def test_from_pretrained_refuses_other_formats() -> None:
    with pytest.raises(ValueError, match="darknet"):
        YOLOv8Adapter.from_pretrained("yolov3-tiny")


def test_forward_pads_right_and_bottom_only() -> None:
    adapter = _tiny().freeze()
    images = torch.rand(2, 3, 50, 70)
    raw = adapter.forward(images)
    assert [t.shape[-2:] for t in raw] == [(8, 10), (4, 5)]
    padded = torch.zeros(2, 3, 64, 80)
    padded[..., :50, :70] = images
    for a, b in zip(raw, adapter.model(padded), strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="images must be"):
        adapter.forward(torch.rand(3, 32, 32))


@pytest.mark.parametrize("spec", [TINY_V8, TINY_V10, TINY_11], ids=["v8", "v10", "11"])
def test_task_loss_reaches_the_images(spec: dict) -> None:
    adapter = _tiny(spec).freeze()
    images = torch.rand(2, 3, 48, 64, requires_grad=True)
    loss = adapter.task_loss(adapter.forward(images), _targets(), generator=torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in adapter.model.parameters())


def test_v10_task_loss_sums_both_branches() -> None:
    adapter = _tiny(TINY_V10).freeze()
    raw = adapter.forward(torch.rand(2, 3, 64, 64))
    targets = _targets()
    both = adapter.task_loss(raw, targets)
    many = DetectionLoss(num_classes=3, strides=(8, 16))(raw["one2many"], targets, image_size=(64, 64))[0]
    one = DetectionLoss(num_classes=3, strides=(8, 16), topk=1)(raw["one2one"], targets, image_size=(64, 64))[0]
    torch.testing.assert_close(both, many + one)


def test_student_learns_under_its_task_loss() -> None:
    adapter = _tiny()
    adapter.model.train()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(adapter.model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = adapter.task_loss(adapter.forward(images), _targets())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("spec", [TINY_V8, TINY_V10], ids=["v8", "v10"])
def test_predict_any_size_in_input_pixels(spec: dict) -> None:
    adapter = _tiny(spec)
    images = torch.rand(2, 3, 45, 61)
    det = adapter.predict(images, conf=0.0)
    assert adapter.model.training  # mode restored
    assert len(det) == 2 and len(det[0]["scores"]) > 0
    for d in det:
        assert d["boxes"].shape[1] == 4 and d["labels"].dtype == torch.int64
        assert (d["boxes"][:, 0::2] <= 61).all() and (d["boxes"][:, 1::2] <= 45).all() and (d["boxes"] >= 0).all()
        assert torch.all(d["scores"][:-1] >= d["scores"][1:])
    adapter.freeze()
    raw = adapter.forward(images)
    expected = adapter.postprocess(raw, image_size=(45, 61), conf=0.0)
    for a, b in zip(det, expected, strict=True):
        torch.testing.assert_close(a["boxes"], b["boxes"])


def test_bn_layers_freeze_and_to() -> None:
    adapter = _tiny(TINY_V10)
    bns = adapter.bn_layers()
    assert bns == adapter.model.bn_layers()
    assert len(bns) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in adapter.model.modules())
    assert adapter.freeze() is adapter and not adapter.model.training
    assert not any(p.requires_grad for p in adapter.model.parameters())
    assert adapter.to("cpu", dtype=torch.float64).device == torch.device("cpu")
    assert next(adapter.model.parameters()).dtype == torch.float64


def test_letterbox_keeps_aspect_and_pads_to_the_stride() -> None:
    image = torch.rand(3, 90, 120)
    canvas, scale, (px, py) = letterbox(image, 64, stride=16)
    assert scale == pytest.approx(64 / 120) and canvas.shape == (3, 48, 64) and (px, py) == (0, 0)
    canvas, scale, (px, py) = letterbox(torch.rand(3, 100, 60), 64, stride=32, fill=PAD_VALUE)
    assert canvas.shape == (3, 64, 64) and (px, py) == (13, 0)
    assert torch.all(canvas[:, :, :13] == PAD_VALUE) and torch.all(canvas[:, :, 13 + 38:] == PAD_VALUE)
    assert not torch.any(canvas[:, :, 13:13 + 38] == PAD_VALUE)
    same, scale, _ = letterbox(image[:, :64, :64], 64, stride=32)
    assert scale == 1 and torch.equal(same, image[:, :64, :64])


def test_detect_maps_boxes_back_to_the_photo(monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = _tiny().freeze()
    photo = torch.rand(3, 100, 60)  # -> scale 0.64, 64x38 resized, canvas 64x48 (stride 16), 5 px padding left
    seen = {}

    def fake_predict(images: torch.Tensor, **kwargs: object) -> list[dict[str, torch.Tensor]]:
        seen["shape"] = tuple(images.shape)
        seen.update(kwargs)
        return [{"boxes": torch.tensor([[5.0, 0.0, 17.8, 32.0], [0.0, 0.0, 48.0, 64.0]]),
                 "scores": torch.tensor([0.9, 0.5]), "labels": torch.tensor([2, 0])}]

    monkeypatch.setattr(adapter, "predict", fake_predict)
    det = adapter.detect(photo, size=64, conf=0.3)
    assert seen == {"shape": (1, 3, 64, 48), "conf": 0.3, "iou": 0.7, "max_det": 300}
    torch.testing.assert_close(det["boxes"], torch.tensor([[0.0, 0.0, 20.0, 50.0], [0.0, 0.0, 60.0, 100.0]]))
    assert det["labels"].tolist() == [2, 0]
    with pytest.raises(ValueError, match="image must be"):
        adapter.detect(torch.rand(1, 3, 10, 10))


# --- the real checkpoints against Ultralytics' own reading (tests/fixtures/ultralytics_reference.json,
# --- made by tools/ultralytics_reference.py in a scratch environment with Ultralytics 8.3) -------------


def _pattern() -> torch.Tensor:
    spec = importlib.util.spec_from_file_location("ultralytics_reference", ROOT / "tools/ultralytics_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.pattern(*FIXTURE["pattern"][2:])


def _check_raw(adapter: YOLOv8Adapter, name: str) -> None:
    with torch.no_grad():
        raw = adapter.forward(_pattern())
    raw = raw if isinstance(raw, dict) else {"one2many": raw}
    reference = FIXTURE["models"][name]["pattern_raw"]
    assert raw.keys() == reference.keys()
    for key, levels in reference.items():
        for mine, ref in zip(raw[key], levels, strict=True):
            assert list(mine.shape) == ref["shape"]
            flat = mine.flatten().double()
            torch.testing.assert_close(flat[ref["index"]], torch.tensor(ref["values"], dtype=torch.float64),
                                       atol=1e-4, rtol=0)
            assert float(flat.sum()) == pytest.approx(ref["sum"], rel=1e-5, abs=1e-2)
            assert float(flat.abs().sum()) == pytest.approx(ref["abs_sum"], rel=1e-5)


def _check_detections(adapter: YOLOv8Adapter, name: str, images: Path) -> None:
    conf, tol = FIXTURE["conf"], 0.02
    for photo, ref in FIXTURE["models"][name]["photos"].items():
        if hub.sha256_file(images / photo) != ref["sha256"]:
            pytest.skip(f"{photo} differs from the photo the reference was made with")
        det = adapter.detect(load_image(images / photo), size=FIXTURE["imgsz"], conf=conf - tol)
        ref_boxes = torch.tensor([d["box"] for d in ref["detections"]]).reshape(-1, 4)
        ref_scores = torch.tensor([d["score"] for d in ref["detections"]])
        ref_labels = torch.tensor([d["label"] for d in ref["detections"]], dtype=torch.int64)
        iou = box_iou(ref_boxes, det["boxes"]) * (ref_labels[:, None] == det["labels"][None])
        for i in range(len(ref_scores)):
            j = int(iou[i].argmax()) if iou.shape[1] else -1
            assert j >= 0 and iou[i, j] > 0.8, f"{photo}: reference detection {i} unmatched"
            assert abs(float(det["scores"][j] - ref_scores[i])) <= tol, f"{photo}: score of detection {i}"
        extra = det["scores"] > conf + tol
        matched = (iou > 0.8).any(0) if len(ref_scores) else torch.zeros_like(extra)
        assert bool((matched | ~extra).all()), f"{photo}: detections the reference does not have"


@pytest.mark.slow
def test_yolov10n_matches_ultralytics(yolov10n_weights: Path, real_images: Path) -> None:  # noqa: F811
    adapter = YOLOv8Adapter.from_pretrained("yolov10n", weights=yolov10n_weights)
    assert adapter.class_names == list(hub.COCO_CLASSES)  # the file stores "0" .. "79"
    assert adapter.model.end2end and len(adapter.bn_layers()) == 95
    assert all(bn.eps == 1e-3 for bn in adapter.bn_layers())
    assert adapter.source["sha256"] == FIXTURE["models"]["yolov10n"]["sha256"]
    _check_raw(adapter, "yolov10n")
    _check_detections(adapter, "yolov10n", real_images)


@pytest.mark.slow
def test_fall_model_matches_ultralytics(fall_weights: Path, real_images: Path) -> None:  # noqa: F811
    adapter = YOLOv8Adapter.from_pretrained("yolov8s-fall", weights=fall_weights)
    assert adapter.class_names == ["Normal", "Fall"] and not adapter.model.end2end
    assert len(adapter.bn_layers()) == 57
    _check_raw(adapter, "yolov8s-fall")
    _check_detections(adapter, "yolov8s-fall", real_images)


@pytest.mark.slow
def test_example_runs_offline_with_a_random_teacher(tmp_path: Path) -> None:
    """examples/ultralytics_teacher.py end to end at a tiny size, with an empty weights cache."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIODE_HOME": str(tmp_path / "cache")}
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "examples/ultralytics_teacher.py"), "--iterations", "2",
                           "--num-images", "2", "--resolution", "64", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "using random weights" in proc.stdout and "inversion mAP50:" in proc.stdout
    assert len(list((out / "images").glob("*.png"))) == 2
    assert (out / "student" / "student.pt").is_file()
