from __future__ import annotations

import contextlib
import importlib.util
import io
import sys

import pytest
import torch
from torch import nn

from diode.data import DetectionFolder, save_image, write_yolo_labels
from diode.eval import agreement, detection_map, evaluate

BACKENDS = [
    b for b in ("faster_coco_eval", "pycocotools") if importlib.util.find_spec(b) is not None
]


def _random_case(seed: int = 0, num_images: int = 5, num_classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    targets, predictions = [], []
    for _ in range(num_images):
        n = int(torch.randint(1, 6, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * 80
        wh = torch.rand(n, 2, generator=g) * 40 + 5
        boxes = torch.cat([xy, xy + wh], dim=1)
        labels = torch.randint(0, num_classes, (n,), generator=g)
        targets.append({"boxes": boxes, "labels": labels})
        keep = torch.rand(n, generator=g) > 0.2  # some objects are missed
        noisy = boxes[keep] + torch.randn(int(keep.sum()), 4, generator=g) * 3
        noisy[:, 2:] = torch.maximum(noisy[:, 2:], noisy[:, :2] + 1)
        m = int(torch.randint(0, 3, (1,), generator=g))  # false positives
        fxy = torch.rand(m, 2, generator=g) * 80
        fp = torch.cat([fxy, fxy + 10], dim=1)
        predictions.append(
            {
                "boxes": torch.cat([noisy, fp]),
                "scores": torch.rand(int(keep.sum()) + m, generator=g),
                "labels": torch.cat(
                    [labels[keep], torch.randint(0, num_classes, (m,), generator=g)]
                ),
            }
        )
    return predictions, targets


def _perfect(targets):
    return [{**t, "scores": torch.ones(len(t["labels"]))} for t in targets]


@pytest.mark.parametrize("backend", BACKENDS)
def test_perfect_predictions_score_one(backend):
    _, targets = _random_case(1)
    result = detection_map(_perfect(targets), targets, num_classes=3, backend=backend)
    assert result["map"] == pytest.approx(1.0) and result["map50"] == pytest.approx(1.0)
    assert result["map75"] == pytest.approx(1.0)
    assert all(v == pytest.approx(1.0) for v in result["per_class"].values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_predictions_score_zero(backend):
    _, targets = _random_case(2)
    empty = [
        {
            "boxes": torch.zeros(0, 4),
            "scores": torch.zeros(0),
            "labels": torch.zeros(0, dtype=torch.int64),
        }
        for _ in targets
    ]
    result = detection_map(empty, targets, num_classes=3, backend=backend)
    assert (result["map"], result["map50"], result["map75"]) == (0.0, 0.0, 0.0)
    present = sorted({int(c) for t in targets for c in t["labels"]})
    assert result["per_class"] == {c: 0.0 for c in present}


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_ground_truth(backend):
    predictions, targets = _random_case(3, num_images=3)
    no_gt = [
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)} for _ in targets
    ]
    result = detection_map(predictions, no_gt, num_classes=3, backend=backend)
    assert (result["map"], result["map50"], result["per_class"]) == (0.0, 0.0, {})
    # One image without ground truth among labelled ones: its false positives count.
    mixed_targets = [*targets, no_gt[0]]
    fp = {
        "boxes": torch.tensor([[0.0, 0.0, 30.0, 30.0]]),
        "scores": torch.tensor([2.0]),
        "labels": torch.tensor([0]),
    }
    base = detection_map(
        _perfect(targets) + [_perfect(no_gt[:1])[0]], mixed_targets, num_classes=3, backend=backend
    )
    worse = detection_map(_perfect(targets) + [fp], mixed_targets, num_classes=3, backend=backend)
    assert base["map"] == pytest.approx(1.0) and worse["per_class"][0] < 1.0


def _pycocotools_reference(predictions, targets, num_classes):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = {
        "images": [],
        "annotations": [],
        "categories": [{"id": c + 1} for c in range(num_classes)],
    }
    dt = []
    for i, (p, t) in enumerate(zip(predictions, targets, strict=True)):
        gt["images"].append({"id": i + 1, "width": 128, "height": 128})
        for box, label in zip(t["boxes"].double().tolist(), t["labels"].tolist(), strict=True):
            w, h = box[2] - box[0], box[3] - box[1]
            gt["annotations"].append(
                {
                    "id": len(gt["annotations"]) + 1,
                    "image_id": i + 1,
                    "category_id": label + 1,
                    "bbox": [box[0], box[1], w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
        for box, s, label in zip(
            p["boxes"].double().tolist(), p["scores"].tolist(), p["labels"].tolist(), strict=True
        ):
            dt.append(
                {
                    "image_id": i + 1,
                    "category_id": label + 1,
                    "score": s,
                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                }
            )
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(dt), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    per_class = {}
    for c in range(num_classes):
        prec = ev.eval["precision"][:, :, c, 0, -1]
        if (prec > -1).any():
            per_class[c] = float(prec[prec > -1].mean())
    return ev.stats, per_class


@pytest.mark.skipif("pycocotools" not in BACKENDS, reason="pycocotools not installed")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 5])
def test_matches_pycocotools(backend, seed):
    predictions, targets = _random_case(seed)
    stats, per_class = _pycocotools_reference(predictions, targets, 3)
    result = detection_map(predictions, targets, num_classes=3, backend=backend)
    assert 0.05 < result["map"] < 0.95  # a non-trivial case
    assert result["map"] == pytest.approx(stats[0], abs=1e-6)
    assert result["map50"] == pytest.approx(stats[1], abs=1e-6)
    assert result["map75"] == pytest.approx(stats[2], abs=1e-6)
    assert result["per_class"].keys() == per_class.keys()
    for c, ap in per_class.items():
        assert result["per_class"][c] == pytest.approx(ap, abs=1e-6)


def test_bad_inputs():
    predictions, targets = _random_case(0)
    with pytest.raises(ValueError, match="backend"):
        detection_map(predictions, targets, backend="nope")
    with pytest.raises(ValueError, match="one dict per image"):
        detection_map(predictions[:-1], targets)
    with pytest.raises(ValueError, match="scores"):
        detection_map([{"boxes": t["boxes"], "labels": t["labels"]} for t in targets], targets)
    with pytest.raises(ValueError, match="outside"):
        detection_map(predictions, targets, num_classes=2)


class FakeAdapter:
    """Returns the given detections in order, one per image seen; records how it was called."""

    def __init__(self, detections, num_classes=3):
        self.model = nn.Linear(1, 1)
        self.num_classes = num_classes
        self.class_names = [str(c) for c in range(num_classes)]
        self.detections = list(detections)
        self.calls = []

    def predict(self, images, *, conf=0.25, iou=0.45):
        assert images.ndim == 4 and images.shape[1] == 3
        self.calls.append(
            (images.shape[0], conf, iou, self.model.training, torch.is_inference_mode_enabled())
        )
        out, self.detections = (
            self.detections[: images.shape[0]],
            self.detections[images.shape[0] :],
        )
        return out


def _labelled_folder(root, targets):
    (root / "labels").mkdir(parents=True)
    for i, t in enumerate(targets):
        save_image(
            root / "images" / f"{i:03d}.png",
            torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(i)),
        )
        write_yolo_labels(root / "labels" / f"{i:03d}.txt", t["boxes"], t["labels"], (128, 128))


def test_evaluate_perfect_adapter(tmp_path):
    _, targets = _random_case(4)
    _labelled_folder(tmp_path, targets)
    adapter = FakeAdapter(_perfect(targets))
    adapter.model.train()
    result = evaluate(adapter, tmp_path, batch_size=2, conf=0.01, iou=0.5)
    assert result["map"] == pytest.approx(1.0)
    assert [c[0] for c in adapter.calls] == [2, 2, 1]
    assert all(c[1:] == (0.01, 0.5, False, True) for c in adapter.calls)
    assert adapter.model.training  # mode restored
    half = evaluate(
        FakeAdapter(
            _perfect(targets[:2])
            + [dict(p, labels=(p["labels"] + 1) % 3) for p in _perfect(targets[2:])]
        ),
        DetectionFolder(tmp_path),
    )
    assert 0.0 < half["map"] < 1.0


def test_evaluate_rejects_unlabelled(tmp_path):
    save_image(tmp_path / "a.png", torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="no labels"):
        evaluate(FakeAdapter([]), tmp_path)


def test_agreement():
    _, targets = _random_case(6, num_images=4)
    teacher_dets = _perfect(targets)
    images = torch.rand(4, 3, 128, 128)
    result = agreement(FakeAdapter(teacher_dets), FakeAdapter(teacher_dets), images, batch_size=3)
    assert result["map"] == pytest.approx(1.0) and result["map50"] == pytest.approx(1.0)
    nothing = [
        {
            "boxes": torch.zeros(0, 4),
            "scores": torch.zeros(0),
            "labels": torch.zeros(0, dtype=torch.int64),
        }
        for _ in targets
    ]
    student, teacher = FakeAdapter(nothing), FakeAdapter(teacher_dets)
    assert agreement(student, teacher, images, conf=0.3, iou=0.4)["map50"] == 0.0
    assert teacher.calls[0][1:3] == (0.3, 0.4) and student.calls[0][1:3] == (0.001, 0.6)
    with pytest.raises(ValueError, match="classes"):
        agreement(FakeAdapter([], num_classes=2), FakeAdapter([]), images)


def test_backend_fallback_and_install_hint(monkeypatch):
    predictions, targets = _random_case(0)
    expected = detection_map(predictions, targets, num_classes=3)
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)
    if "pycocotools" in BACKENDS:
        assert detection_map(predictions, targets, num_classes=3)["map"] == pytest.approx(
            expected["map"], abs=1e-6
        )
    monkeypatch.setitem(sys.modules, "pycocotools.coco", None)
    with pytest.raises(ImportError, match=r'pip install "diode\[eval\]"'):
        detection_map(predictions, targets, num_classes=3)
