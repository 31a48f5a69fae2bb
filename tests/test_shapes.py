from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.ops import box_iou

import diode.datasets as datasets
from diode._boxes import validate_targets
from diode.data.io import load_image
from diode.data.labels import read_yolo_labels
from diode.datasets import (
    SHAPE_NAMES,
    ShapesConfig,
    ShapesDataset,
    render_noise,
    render_proxy,
    render_shapes,
    write_image_folder,
    write_shapes_dataset,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _edge_density(images: torch.Tensor) -> float:
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().mean()
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().mean()
    return float(dx + dy)


@pytest.fixture(scope="module")
def scenes() -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    return render_shapes(160, generator=_gen(0))


def test_public_names() -> None:
    for name in ("SHAPE_NAMES", "ShapesConfig", "ShapesDataset", "render_shapes", "render_proxy",
                 "render_noise", "write_shapes_dataset", "write_image_folder"):
        assert name in datasets.__all__ and hasattr(datasets, name)


def test_same_seed_same_scenes_and_different_seed_differs(scenes) -> None:
    images, targets = scenes
    again, again_targets = render_shapes(160, generator=_gen(0))
    assert torch.equal(images, again)
    for a, b in zip(targets, again_targets, strict=True):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])
    other, _ = render_shapes(160, generator=_gen(1))
    assert (images - other).abs().mean() > 0.05


def test_images_and_targets_are_well_formed(scenes) -> None:
    images, targets = scenes
    cfg = ShapesConfig()
    assert images.shape == (160, 3, 96, 96) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    validate_targets(targets, image_size=(96, 96), num_classes=cfg.num_classes)
    for t in targets:
        assert t["labels"].dtype == torch.int64 and t["boxes"].dtype == torch.float32
        assert cfg.min_objects <= len(t["labels"]) <= cfg.max_objects
        assert (t["boxes"] >= 0).all() and (t["boxes"] <= 96).all()
    counts = torch.tensor([len(t["labels"]) for t in targets])
    assert len(set(counts.tolist())) == 4  # every count 1..4 occurs


def test_overlap_between_objects_is_limited(scenes) -> None:
    _, targets = scenes
    worst = 0.0
    for t in targets:
        if len(t["boxes"]) > 1:
            iou = box_iou(t["boxes"], t["boxes"]).fill_diagonal_(0)
            worst = max(worst, float(iou.max()))
    assert 0 < worst <= 0.5


def test_classes_are_roughly_balanced() -> None:
    _, targets = render_shapes(200, generator=_gen(3))
    labels = torch.cat([t["labels"] for t in targets])
    assert len(labels) >= 400
    share = torch.bincount(labels, minlength=4).float() / len(labels)
    assert ((share > 0.17) & (share < 0.33)).all(), share


@pytest.mark.parametrize("shape", SHAPE_NAMES)
def test_boxes_are_tight_around_the_drawn_shape(shape: str) -> None:
    cfg = ShapesConfig(min_objects=1, max_objects=1, background="plain", classes=(shape,),
                       min_size=0.1, max_size=0.6)
    images, targets = render_shapes(40, config=cfg, generator=_gen(4))
    for image, target in zip(images, targets, strict=True):
        background = image[:, :1, :1]  # objects keep at least a 1 px margin
        mask = (image - background).abs().amax(0) > 0.02
        ys, xs = mask.nonzero().unbind(1)
        drawn = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
        assert target["labels"].tolist() == [0]
        assert (target["boxes"][0] - drawn).abs().max() <= 1, (shape, target["boxes"], drawn)


def test_exact_object_count_is_honoured_even_when_crowded() -> None:
    cfg = ShapesConfig(min_objects=5, max_objects=5, min_size=0.4, max_size=0.5)
    _, targets = render_shapes(32, config=cfg, generator=_gen(5))
    assert all(len(t["labels"]) == 5 for t in targets)


def test_colour_does_not_encode_the_class(scenes) -> None:
    images, targets = scenes
    means = {k: [] for k in range(4)}
    for image, t in zip(images, targets, strict=True):
        for (x1, y1, x2, y2), label in zip(t["boxes"].long().tolist(), t["labels"].tolist(),
                                            strict=True):
            means[label].append(image[:, y1:y2, x1:x2].mean((1, 2)))
    per_class = torch.stack([torch.stack(v).mean(0) for v in means.values()])
    assert (per_class.amax(0) - per_class.amin(0)).max() < 0.1


def test_config_validation() -> None:
    assert ShapesConfig(classes=["ring", "diamond"]).classes == ("ring", "diamond")
    for bad in ({"image_size": 32}, {"min_objects": 3, "max_objects": 2}, {"max_objects": 9},
                {"min_size": 0.5, "max_size": 0.4}, {"max_size": 0.7}, {"classes": ("hexagon",)},
                {"classes": ("circle", "circle")}, {"classes": ()}, {"min_size": 0.05},
                {"domain": ""}, {"background": "noisy"}):
        with pytest.raises(ValueError):
            ShapesConfig(**bad)
    with pytest.raises(TypeError, match="generator"):
        render_shapes(2, generator=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n must be"):
        render_shapes(-1, generator=_gen(0))
    empty, no_targets = render_shapes(0, generator=_gen(0))
    assert empty.shape == (0, 3, 96, 96) and no_targets == []


def test_proxy_and_noise_domains(scenes) -> None:
    shapes, _ = scenes
    proxy = render_proxy(64, image_size=96, generator=_gen(6))
    assert proxy.shape == (64, 3, 96, 96) and proxy.min() >= 0 and proxy.max() <= 1
    assert torch.equal(proxy, render_proxy(64, image_size=96, generator=_gen(6)))
    assert _edge_density(proxy) > 1.8 * _edge_density(shapes[:64])
    saturation = lambda x: float((x.amax(1) - x.amin(1)).mean())  # noqa: E731
    assert saturation(proxy) > saturation(shapes[:64]) + 0.08
    noise = render_noise(8, image_size=64, generator=_gen(7))
    assert noise.shape == (8, 3, 64, 64) and 0.45 < noise.mean() < 0.55
    assert torch.equal(noise, render_noise(8, image_size=64, generator=_gen(7)))


def test_written_dataset_round_trips(tmp_path) -> None:
    cfg = ShapesConfig(image_size=64, min_size=0.2, classes=("circle", "cross", "ring"))
    root = write_shapes_dataset(tmp_path, 6, config=cfg, seed=11, split_name="val")
    assert root == tmp_path / "val"
    images, targets = render_shapes(6, config=cfg, generator=_gen(11))
    assert (root / "classes.txt").read_text().split() == ["circle", "cross", "ring"]
    meta = json.loads((root / "meta.json").read_text())
    assert meta["seed"] == 11 and meta["domain"] == "shapes" and meta["num_images"] == 6
    assert sorted(p.name for p in (root / "images").iterdir()) == [f"{i:06d}.png" for i in range(6)]
    assert not list(root.rglob("*.tmp"))
    for i in range(6):
        back = read_yolo_labels(root / "labels" / f"{i:06d}.txt", (64, 64))
        assert torch.equal(back["labels"], targets[i]["labels"])
        assert torch.allclose(back["boxes"], targets[i]["boxes"], atol=1e-3)
        assert (load_image(root / "images" / f"{i:06d}.png") - images[i]).abs().max() <= 0.51 / 255
    rows = (root / "labels" / "000000.txt").read_text().splitlines()
    assert all(len(v.split(".")[1]) == 6 for row in rows for v in row.split()[1:])


def test_write_image_folder(tmp_path) -> None:
    images = render_proxy(3, image_size=48, generator=_gen(8))
    out = write_image_folder(tmp_path / "proxy", images)
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png", "000002.png"]
    assert (load_image(out / "000002.png") - images[2]).abs().max() <= 0.51 / 255
    with pytest.raises(ValueError, match="images"):
        write_image_folder(tmp_path, images[0])


def test_shapes_dataset_in_memory() -> None:
    ds = ShapesDataset(10, config=ShapesConfig(image_size=64, min_size=0.2), seed=2)
    images, targets = render_shapes(10, config=ds.config, generator=_gen(2))
    assert len(ds) == 10 and ds.class_names == ["circle", "square", "triangle", "cross"]
    image, target = ds[3]
    assert torch.equal(image, images[3]) and torch.equal(target["boxes"], targets[3]["boxes"])
    batch_images, batch_targets = next(iter(DataLoader(ds, batch_size=4,
                                                       collate_fn=ShapesDataset.collate)))
    assert batch_images.shape == (4, 3, 64, 64) and len(batch_targets) == 4
    assert torch.equal(batch_targets[1]["labels"], targets[1]["labels"])
