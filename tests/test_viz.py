from __future__ import annotations

import torch

from diode.data import load_image
from diode.viz import contact_sheet, draw_detections, label_font_size, line_width, save_contact_sheet, target_caption


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


def test_labels_sit_on_a_filled_background_in_the_box_colour():
    image = torch.zeros(3, 96, 96)
    target = {"boxes": torch.tensor([[30.0, 40.0, 80.0, 90.0]]), "labels": torch.tensor([0])}
    drawn = draw_detections(image, target, class_names=["person"], colors=(0, 0, 255), width=1)
    above = drawn[:, 32:40, 30:60]  # just above the box's top edge: the label strip
    assert (above[2] == 255).float().mean() > 0.9  # filled with the box colour (white text keeps blue at 255) ...
    assert ((above[0] > 200) & (above[1] > 200)).any()  # ... with white text on the dark fill
    top_edge = draw_detections(image, {**target, "boxes": torch.tensor([[30.0, 2.0, 80.0, 90.0]])},
                               class_names=["person"], colors=(0, 0, 255), width=1)
    assert (top_edge[2, 3:8, 31:40] == 255).float().mean() > 0.4  # no room above: the label goes inside


def test_line_width_and_font_grow_with_the_image():
    assert line_width(64, 64) == 1 and line_width(416, 416) == 2 and line_width(1280, 960) == 6
    assert label_font_size(160, 160) == 9 and label_font_size(1280, 720) > 40
    big = draw_detections(torch.zeros(3, 800, 800), {"boxes": torch.tensor([[100.0, 300.0, 700.0, 700.0]]),
                                                      "labels": torch.tensor([0])}, colors="red")
    assert (big[0, 500, 100:104] == 255).all() and big[0, 500, 105] == 0  # 4 px at 800 px


def test_target_caption():
    labels = {"boxes": torch.zeros(4, 4), "labels": torch.tensor([2, 0, 2, 1])}
    assert target_caption(labels, ["a", "b", "c"]) == "2x c, a, b"
    assert target_caption(labels, ["a", "b", "c"], limit=2) == "2x c, a +1"
    assert target_caption({"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}) == "-"


def test_contact_sheet_captions_and_mixed_sizes():
    images = [torch.rand(3, 32, 32), torch.rand(3, 16, 48)]
    targets = [_target(), {"boxes": torch.tensor([[0.0, 0.0, 48.0, 16.0]]), "labels": torch.tensor([0])}]
    sheet = contact_sheet(images, targets, captions=["b", "a"], nrow=2, padding=2)
    caption_h = sheet.shape[1] - 2 * 2 - 32
    assert caption_h > 8  # a caption strip under the 32 x 48 cells
    assert sheet.shape[2] == 2 * (48 + 2) + 2
    plain = contact_sheet(images, None, nrow=2, padding=2)
    assert plain.shape[1] == 32 + 2 * 2  # no captions, no strip
    second = plain[:, 2:34, 52:100]  # the 16 x 48 image fitted into 32 x 48: black bars above and below
    assert second[:, 0:8].sum() == 0 and second[:, 24:].sum() == 0 and (second[:, 8:24] > 0).float().mean() > 0.9
