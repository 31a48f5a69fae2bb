"""Our darknet reader and model against an independent one: OpenCV's darknet importer.

OpenCV's ``Region`` layer (its YOLOv3 ``[yolo]``) emits, per head, a
``[H * W * A, 5 + C]`` array with rows ordered (y, x, anchor) and columns
``cx, cy, w, h`` (normalized to the input size), ``obj`` (sigmoid), then the class
scores ``obj * sigmoid(cls)`` with every score ``<= 0.2`` (its default ``thresh``)
set to 0. No NMS is applied for darknet-imported nets. OpenCV 5 removed the darknet
importer, so this needs ``opencv-python-headless<5``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diode.models.yolo import Darknet, bundled_cfg_path, load_darknet_weights

cv2 = pytest.importorskip("cv2")

OPENCV_CLASS_THRESH = 0.2
SIZE = 416

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not hasattr(cv2.dnn, "readNetFromDarknet"),
        reason="OpenCV 5 removed the darknet importer: pip install 'opencv-python-headless<5'",
    ),
]


@pytest.fixture(scope="module")
def dog_image(real_images: Path) -> Path:
    """The darknet sample photo ``dog.jpg``."""
    return real_images / "dog.jpg"


def _decode_like_opencv(raw: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """``[1, A, H, W, 5 + C]`` raw logits to OpenCV's ``[H * W * A, 5 + C]`` rows."""
    _, a, h, w, _ = raw.shape
    p = raw[0].double().sigmoid()
    gy, gx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    wh = raw[0, ..., 2:4].double().exp() * anchors.double().view(a, 1, 1, 2) / SIZE
    obj = p[..., 4:5]
    rows = torch.cat(
        [
            ((p[..., 0] + gx) / w)[..., None],
            ((p[..., 1] + gy) / h)[..., None],
            wh,
            obj,
            obj * p[..., 5:],
        ],
        -1,
    )
    return rows.permute(1, 2, 0, 3).reshape(h * w * a, -1)


def test_matches_opencv_darknet_importer(dog_image: Path, real_weights: Path):
    cfg = str(bundled_cfg_path("yolov3-tiny"))
    net = cv2.dnn.readNetFromDarknet(cfg, str(real_weights))
    blob = cv2.dnn.blobFromImage(
        cv2.imread(str(dog_image)), 1 / 255, (SIZE, SIZE), swapRB=True, crop=False
    )
    net.setInput(blob)
    theirs = [torch.from_numpy(o).double() for o in net.forward(net.getUnconnectedOutLayersNames())]

    model = Darknet("yolov3-tiny")
    load_darknet_weights(model, real_weights)
    with torch.no_grad():
        raw = model.eval()(torch.from_numpy(blob))
    assert len(raw) == len(theirs) == 2

    detected: set[int] = set()
    for head, anchors, ref in zip(raw, model.anchors, theirs, strict=True):
        ours = _decode_like_opencv(head, anchors)
        assert ours.shape == ref.shape
        torch.testing.assert_close(ours[:, :5], ref[:, :5], rtol=1e-3, atol=1e-3)
        kept = ref[:, 5:] > 0
        torch.testing.assert_close(ours[:, 5:][kept], ref[:, 5:][kept], rtol=1e-3, atol=1e-3)
        assert (ours[:, 5:][~kept] <= OPENCV_CLASS_THRESH + 1e-3).all()
        detected |= set(kept.nonzero()[:, 1].tolist())
    assert 16 in detected  # COCO "dog": the comparison covered real detections
