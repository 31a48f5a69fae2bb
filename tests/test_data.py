from __future__ import annotations

import json
import os

import pytest
import torch

from diode.data import (
    DetectionFolder,
    atomic_write_bytes,
    atomic_write_json,
    coco_dict,
    load_image,
    read_coco,
    read_yolo_labels,
    save_image,
    write_coco,
    write_yolo_labels,
)


def _image(h: int = 24, w: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))


def test_atomic_write_replaces_content_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "a.json"
    atomic_write_json(path, {"x": 1})
    atomic_write_json(path, {"x": 2})
    assert json.loads(path.read_text()) == {"x": 2}
    assert os.listdir(path.parent) == ["a.json"]


def test_atomic_write_failure_keeps_original_and_removes_temp(tmp_path, monkeypatch):
    path = tmp_path / "a.txt"
    path.write_bytes(b"original")

    def fail(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk on fire"):
        atomic_write_bytes(path, b"new content")
    assert path.read_bytes() == b"original"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_atomic_write_json_unserializable_keeps_original(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("{}")
    with pytest.raises(TypeError):
        atomic_write_json(path, {"x": object()})
    assert path.read_text() == "{}"
    assert os.listdir(tmp_path) == ["a.json"]


def test_unwritable_folder_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match="output folder .*file.* is not writable"):
        atomic_write_bytes(blocker / "x.bin", b"data")


def test_save_load_image_is_lossless_after_quantization(tmp_path):
    image = _image()
    save_image(tmp_path / "a.png", image)
    loaded = load_image(tmp_path / "a.png")
    assert loaded.shape == (3, 24, 32) and loaded.dtype == torch.float32
    assert torch.equal(loaded, (image * 255).round() / 255)


def test_load_image_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png"):
        load_image(bad)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")


def test_yolo_round_trip(tmp_path):
    boxes = torch.tensor(
        [[1.5, 2.25, 30.0, 20.0], [0.0, 0.0, 640.0, 480.0], [100.3, 50.7, 101.9, 52.1]]
    )
    labels = torch.tensor([3, 0, 79])
    write_yolo_labels(tmp_path / "a.txt", boxes, labels, (480, 640))
    rows = (tmp_path / "a.txt").read_text().splitlines()
    assert rows[1] == "0 0.500000 0.500000 1.000000 1.000000"
    back = read_yolo_labels(tmp_path / "a.txt", (480, 640))
    assert torch.equal(back["labels"], labels)
    assert back["boxes"].dtype == torch.float32
    assert torch.allclose(back["boxes"], boxes, atol=1e-3)


def test_yolo_clips_to_canvas_and_empty_file(tmp_path):
    write_yolo_labels(
        tmp_path / "a.txt", torch.tensor([[-10.0, 5.0, 20.0, 50.0]]), torch.tensor([1]), (40, 40)
    )
    back = read_yolo_labels(tmp_path / "a.txt", (40, 40))
    assert torch.allclose(back["boxes"], torch.tensor([[0.0, 5.0, 20.0, 40.0]]), atol=1e-4)
    write_yolo_labels(
        tmp_path / "b.txt", torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), (40, 40)
    )
    empty = read_yolo_labels(tmp_path / "b.txt", (40, 40))
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)


@pytest.mark.parametrize(
    "row", ["1 0.5 0.5 0.2", "x 0.5 0.5 0.2 0.2", "1.5 0.5 0.5 0.2 0.2", "1 0.5 0.5 0 0.2"]
)
def test_yolo_bad_row_names_file_and_line(tmp_path, row):
    path = tmp_path / "bad.txt"
    path.write_text(f"0 0.5 0.5 0.1 0.1\n{row}\n")
    with pytest.raises(ValueError, match=r"bad\.txt:2"):
        read_yolo_labels(path, (10, 10))


def test_coco_round_trip(tmp_path):
    targets = [
        {
            "boxes": torch.tensor([[1.0, 2.0, 11.0, 7.0], [3.0, 3.0, 9.0, 9.5]]),
            "labels": torch.tensor([0, 2]),
        },
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    images = [("000000.png", 16, 20), ("000001.png", 16, 20)]
    coco = coco_dict(images, targets, ["cat", "dog", "eel"])
    assert coco["annotations"][0]["bbox"] == [1.0, 2.0, 10.0, 5.0]
    assert [a["category_id"] for a in coco["annotations"]] == [1, 3]
    assert coco["categories"][2] == {"id": 3, "name": "eel"}
    write_coco(tmp_path / "annotations.json", images, targets, ["cat", "dog", "eel"])
    names, back, class_names = read_coco(tmp_path / "annotations.json")
    assert names == ["000000.png", "000001.png"] and class_names == ["cat", "dog", "eel"]
    for t, b in zip(targets, back, strict=True):
        assert torch.equal(t["labels"], b["labels"]) and torch.allclose(t["boxes"], b["boxes"])


def test_read_coco_maps_sparse_category_ids_and_skips_crowd(tmp_path):
    data = {
        "images": [{"id": 7, "file_name": "a.jpg", "height": 10, "width": 10}],
        "categories": [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 90, "bbox": [1, 1, 2, 2]},
            {"id": 2, "image_id": 7, "category_id": 1, "bbox": [0, 0, 5, 5], "iscrowd": 1},
        ],
    }
    (tmp_path / "c.json").write_text(json.dumps(data))
    _, targets, names = read_coco(tmp_path / "c.json")
    assert names == ["person", "toothbrush"]
    assert targets[0]["labels"].tolist() == [1]
    (tmp_path / "bad.json").write_text('{"images": []}')
    with pytest.raises(ValueError, match="bad.json"):
        read_coco(tmp_path / "bad.json")


def test_folder_images_and_yolo_labels(tmp_path):
    (tmp_path / "labels").mkdir()
    save_image(tmp_path / "images" / "b.png", _image(seed=1))
    save_image(tmp_path / "images" / "a.png", _image(seed=2))
    write_yolo_labels(
        tmp_path / "labels" / "a.txt",
        torch.tensor([[4.0, 6.0, 20.0, 18.0]]),
        torch.tensor([2]),
        (24, 32),
    )
    ds = DetectionFolder(tmp_path)
    assert ds.labelled and len(ds) == 2
    image, target, path = ds[0]
    assert path.endswith("a.png") and image.shape == (3, 24, 32)
    assert torch.allclose(target["boxes"], torch.tensor([[4.0, 6.0, 20.0, 18.0]]), atol=1e-3)
    assert ds[1][1]["boxes"].shape == (0, 4)  # b.png has no label file: background
    resized = DetectionFolder(tmp_path, image_size=(12, 64))
    image, target, _ = resized[0]
    assert image.shape == (3, 12, 64)
    assert torch.allclose(target["boxes"], torch.tensor([[8.0, 3.0, 40.0, 9.0]]), atol=1e-3)
    images, targets, paths = DetectionFolder.collate([resized[0], resized[1]])
    assert images.shape == (2, 3, 12, 64) and len(targets) == 2 and len(paths) == 2


def test_folder_images_and_coco(tmp_path):
    save_image(tmp_path / "images" / "x.png", _image())
    save_image(tmp_path / "images" / "y.jpg", _image(seed=3))
    target = {"boxes": torch.tensor([[1.0, 1.0, 9.0, 9.0]]), "labels": torch.tensor([1])}
    write_coco(tmp_path / "annotations.json", [("x.png", 24, 32)], [target], ["a", "b"])
    ds = DetectionFolder(tmp_path)
    assert ds.labelled and ds.class_names == ["a", "b"]
    assert torch.equal(ds[0][1]["boxes"], target["boxes"]) and ds[0][1]["labels"].tolist() == [1]
    assert ds[1][1]["labels"].numel() == 0 and ds[1][2].endswith("y.jpg")


def test_flat_unlabelled_folder(tmp_path):
    save_image(tmp_path / "p.bmp", _image())
    (tmp_path / "notes.txt").write_text("ignored")
    ds = DetectionFolder(tmp_path)
    assert not ds.labelled and len(ds) == 1
    image, target, _ = ds[0]
    assert image.shape == (3, 24, 32) and target["boxes"].shape == (0, 4)


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DetectionFolder(tmp_path / "nope")
    (tmp_path / "images").mkdir()
    with pytest.raises(
        ValueError, match=r"no images found in .*images \(looked for .png/.jpg/.jpeg/.bmp\)"
    ):
        DetectionFolder(tmp_path)
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG garbage")
    ds = DetectionFolder(tmp_path)
    with pytest.raises(ValueError, match="broken.png"):
        ds[0]


def test_collate_rejects_mixed_sizes(tmp_path):
    save_image(tmp_path / "a.png", _image(24, 32))
    save_image(tmp_path / "b.png", _image(16, 16))
    ds = DetectionFolder(tmp_path)
    with pytest.raises(ValueError, match="image_size"):
        DetectionFolder.collate([ds[0], ds[1]])
