from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_tiny_yolo, onebox_targets
from torchvision.ops import box_iou

from diode import DetectorAdapter, YOLOv3Adapter
from diode.adapters._common import letterbox
from diode.data.io import load_image
from diode.models.yolo import save_darknet_weights


def test_yolo_adapter_satisfies_the_protocol() -> None:
    assert isinstance(make_tiny_yolo(), DetectorAdapter)


def test_forward_pads_any_size_and_predict_returns_input_pixels() -> None:
    adapter = make_tiny_yolo()
    raw = adapter.forward(torch.rand(2, 3, 50, 70))
    assert [tuple(r.shape) for r in raw] == [(2, 3, 2, 3, 8), (2, 3, 4, 6, 8)]
    det = adapter.predict(torch.rand(2, 3, 50, 70), conf=0.0)
    assert len(det) == 2
    for d in det:
        assert d["boxes"][:, 2].max() <= 70 and d["boxes"][:, 3].max() <= 50
        assert d["labels"].dtype == torch.long and d["scores"].shape == d["labels"].shape


def test_task_loss_is_differentiable_wrt_images() -> None:
    adapter = make_tiny_yolo()
    x = torch.rand(2, 3, 64, 64, requires_grad=True)
    loss = adapter.task_loss(adapter.forward(x), onebox_targets(2))
    loss.backward()
    assert loss.ndim == 0 and x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in adapter.model.parameters())


def test_predict_restores_training_mode() -> None:
    adapter = YOLOv3Adapter.from_config(_tiny_cfg_path(), num_classes=3)
    adapter.model.train()
    adapter.predict(torch.rand(1, 3, 64, 64))
    assert adapter.model.training
    assert all(p.requires_grad for p in adapter.model.parameters())


def _tiny_cfg_path() -> str:
    from conftest import TINY_YOLO_CFG

    return TINY_YOLO_CFG


def test_from_darknet_round_trip_and_class_name_checks(tmp_path: Path) -> None:
    model = make_tiny_yolo().model
    cfg = tmp_path / "tiny.cfg"
    cfg.write_text(_tiny_cfg_path())
    weights = tmp_path / "tiny.weights"
    save_darknet_weights(model, weights)
    adapter = YOLOv3Adapter.from_darknet(cfg, weights, class_names=["a", "b", "c"])
    x = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(adapter.forward(x), model(x))
    assert adapter.source["sha256"] and not adapter.model.training
    with pytest.raises(ValueError, match="class_names has 2 names"):
        YOLOv3Adapter.from_darknet(cfg, weights, class_names=["a", "b"])


def test_from_ultralytics_checkpoint(tmp_path: Path) -> None:
    model = make_tiny_yolo().model
    cfg = tmp_path / "tiny.cfg"
    cfg.write_text(_tiny_cfg_path())
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "tiny.pt")
    adapter = YOLOv3Adapter.from_ultralytics(cfg, tmp_path / "tiny.pt")
    assert all(bn.eps == 1e-4 for bn in adapter.bn_layers())
    assert adapter.class_names == ["class_0", "class_1", "class_2"]


def test_letterbox_maps_coordinates() -> None:
    image = torch.zeros(3, 100, 200)
    image[:, 40:60, 50:70] = 1
    canvas, scale, (px, py) = letterbox(image, 64)
    assert canvas.shape == (3, 64, 64) and scale == pytest.approx(0.32) and (px, py) == (0, 16)
    ys, xs = torch.nonzero(canvas[0] > 0.9, as_tuple=True)
    assert abs(xs.float().mean() - (60 * scale + px)) < 1.5 and abs(ys.float().mean() - (50 * scale + py)) < 1.5


@pytest.mark.slow
def test_real_yolov3_tiny_finds_dog_bicycle_and_car(real_weights: Path, real_images: Path) -> None:
    teacher = YOLOv3Adapter.from_pretrained("yolov3-tiny", weights=real_weights)
    det = teacher.detect(load_image(real_images / "dog.jpg"))
    found = {teacher.class_names[int(label)]: box for label, box in zip(det["labels"], det["boxes"], strict=True)}
    assert {"dog", "bicycle"} <= set(found) and ({"car", "truck"} & set(found))
    # Sensible boxes in the 768x576 photo: the dog bottom left, the bicycle centre, the vehicle top right.
    dog, bike = found["dog"], found["bicycle"]
    car = found.get("car", found.get("truck"))
    assert dog[0] < 200 and dog[3] > 450 and dog[2] < 420
    assert 150 < bike[0] < 260 and 500 < bike[2] < 620 and 380 < bike[3] < 500
    assert car[0] > 420 and car[3] < 220


@pytest.mark.slow
@pytest.mark.parametrize("photo", ["dog.jpg", "horses.jpg", "person.jpg", "eagle.jpg", "giraffe.jpg"])
def test_detections_agree_with_opencv_darknet_reader(photo: str, real_weights: Path, real_images: Path) -> None:
    cv2 = pytest.importorskip("cv2")
    if not hasattr(cv2.dnn, "readNetFromDarknet"):
        pytest.skip("OpenCV 5 removed the darknet importer: pip install 'opencv-python-headless<5'")
    from diode.models.yolo import bundled_cfg_path

    bgr = cv2.imread(str(real_images / photo))
    h, w = bgr.shape[:2]
    blob = cv2.dnn.blobFromImage(bgr, 1 / 255, (416, 416), swapRB=True, crop=False)
    net = cv2.dnn.readNetFromDarknet(str(bundled_cfg_path("yolov3-tiny")), str(real_weights))
    net.setInput(blob)
    rows = torch.from_numpy(__import__("numpy").concatenate(net.forward(net.getUnconnectedOutLayersNames())))
    # darknet is multi-label: every class above the threshold is a candidate of its box.
    r, labels = torch.nonzero(rows[:, 5:] > 0.25, as_tuple=True)
    rows, scores = rows[r], rows[r, 5 + labels]
    cx, cy, bw, bh = rows[:, 0] * w, rows[:, 1] * h, rows[:, 2] * w, rows[:, 3] * h
    boxes = torch.stack((cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2), 1)
    nms = cv2.dnn.NMSBoxesBatched([[float(v) for v in b] for b in boxes], scores.tolist(), labels.tolist(),
                                  0.25, 0.45)
    theirs = {"boxes": boxes[list(nms)], "scores": scores[list(nms)], "labels": labels[list(nms)]}

    teacher = YOLOv3Adapter.from_pretrained("yolov3-tiny", weights=real_weights)
    ours = teacher.predict(torch.from_numpy(blob), conf=0.25, iou=0.45)[0]
    ours["boxes"] = ours["boxes"] * torch.tensor([w / 416, h / 416, w / 416, h / 416])
    assert len(ours["boxes"]) > 0
    for box, score, label in zip(ours["boxes"], ours["scores"], ours["labels"], strict=True):
        same = theirs["labels"] == label
        assert same.any(), f"{photo}: class {int(label)} found by diode only"
        ious = box_iou(box[None], theirs["boxes"][same])[0]
        j = int(ious.argmax())
        assert ious[j] > 0.8, f"{photo}: best IoU {float(ious[j]):.3f}"
        assert abs(float(score) - float(theirs["scores"][same][j])) < 0.05
