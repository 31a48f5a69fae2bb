from __future__ import annotations

import torch

from diode.data import load_image
from diode.viz import contact_sheet, draw_detections, save_contact_sheet


def _target():
    return {"boxes": torch.tensor([[4.0, 6.0, 20.0, 28.0]]), "labels": torch.tensor([1])}


def test_draw_detections_changes_box_border_only():
    image = torch.zeros(3, 32, 32)
    drawn = draw_detections(image, _target(), class_names=["a", "b"], colors="red", width=1)
    assert drawn.dtype == torch.uint8 and drawn.shape == (3, 32, 32)
    assert drawn[:, 15, 4].tolist() == [255, 0, 0]  # left edge
    assert drawn[:, 28, 12].tolist() == [255, 0, 0]  # bottom edge
    assert drawn[:, 2, 30].sum() == 0 and drawn[:, 20, 12].sum() == 0  # outside and inside
    assert image.sum() == 0  # input untouched


def test_draw_detections_with_scores_and_no_boxes():
    image = torch.full((3, 32, 32), 0.5)
    target = {**_target(), "scores": torch.tensor([0.9])}
    assert not torch.equal(
        draw_detections(image, target),
        draw_detections(image, {**target, "boxes": target["boxes"] + 2}),
    )
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    assert torch.equal(
        draw_detections(image, empty), torch.full((3, 32, 32), 128, dtype=torch.uint8)
    )


def test_contact_sheet_shape_and_save(tmp_path):
    images = torch.rand(4, 3, 16, 24, generator=torch.Generator().manual_seed(0))
    sheet = contact_sheet(images, [_target()] * 4, padding=2)
    assert sheet.dtype == torch.uint8 and sheet.shape == (3, 2 * 18 + 2, 2 * 26 + 2)
    assert contact_sheet(images, None, nrow=4).shape == (3, 18 + 2, 4 * 26 + 2)
    save_contact_sheet(tmp_path / "preview.png", images, [_target()] * 4, class_names=["a", "b"])
    assert torch.equal(
        (load_image(tmp_path / "preview.png") * 255).round().to(torch.uint8),
        contact_sheet(images, [_target()] * 4, class_names=["a", "b"]),
    )
