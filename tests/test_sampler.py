from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.ops import box_iou

from diode.inversion.sampler import BBoxSampler, FPSampling, add_false_positives


def test_onebox_sizes_inside_canvas_and_uniform_classes() -> None:
    sampler = BBoxSampler.onebox(num_classes=10)
    h, w = 120, 200
    targets = sampler.sample(500, image_size=(h, w), generator=torch.Generator().manual_seed(0))
    boxes = torch.cat([t["boxes"] for t in targets])
    labels = torch.cat([t["labels"] for t in targets])
    assert boxes.shape == (500, 4) and labels.dtype == torch.int64
    bw = (boxes[:, 2] - boxes[:, 0]) / w
    bh = (boxes[:, 3] - boxes[:, 1]) / h
    assert (bw >= 0.2 - 1e-6).all() and (bw <= 0.8 + 1e-6).all()
    assert (bh >= 0.2 - 1e-6).all() and (bh <= 0.8 + 1e-6).all()
    assert bw.min() < 0.25 and bw.max() > 0.75
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    assert set(labels.tolist()) == set(range(10))


def test_onebox_prior_respected_and_validated() -> None:
    prior = [0.0] * 5
    prior[3] = 2.0
    sampler = BBoxSampler.onebox(num_classes=5, class_prior=prior)
    targets = sampler.sample(64, generator=torch.Generator().manual_seed(0))
    assert torch.cat([t["labels"] for t in targets]).unique().tolist() == [3]
    for bad in ([1.0, 1.0], [1.0, -1.0, 1.0, 1.0, 1.0], [0.0] * 5):
        with pytest.raises(ValueError, match="class_prior"):
            BBoxSampler.onebox(num_classes=5, class_prior=bad)
    with pytest.raises(ValueError, match="min_size"):
        BBoxSampler.onebox(num_classes=5, min_size=0.9, max_size=0.5)


def test_same_seed_same_targets() -> None:
    sampler = BBoxSampler.tiles(num_classes=4, k=3)
    a = sampler.sample(4, generator=torch.Generator().manual_seed(5))
    b = sampler.sample(4, generator=torch.Generator().manual_seed(5))
    c = sampler.sample(4, generator=torch.Generator().manual_seed(6))
    assert all(torch.equal(x["boxes"], y["boxes"]) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x["boxes"], y["boxes"]) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("k", [4, 5])
def test_tiles_k_boxes_without_overlap(k: int) -> None:
    sampler = BBoxSampler.tiles(num_classes=3, k=k)
    targets = sampler.sample(50, image_size=(96, 128), generator=torch.Generator().manual_seed(0))
    for t in targets:
        assert t["boxes"].shape == (k, 4) and t["labels"].shape == (k,)
        iou = box_iou(t["boxes"], t["boxes"])
        assert torch.equal(iou - torch.diag(iou.diagonal()), torch.zeros(k, k))
        assert (t["boxes"] >= 0).all() and (t["boxes"][:, 2] <= 128).all()
        assert (t["boxes"][:, 3] <= 96).all()


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_from_labels_yolo_folder(tmp_path: Path) -> None:
    _write(tmp_path / "a.txt", "1 0.5 0.5 0.5 0.25\n\n2 0.25 0.25 0.1 0.1\n")
    _write(tmp_path / "b.txt", "0 0.5 0.5 1.0 1.0\n")
    sampler = BBoxSampler.from_labels(tmp_path, num_classes=3, order="sequential")
    assert len(sampler) == 2
    a, b, a2 = sampler.sample(3, image_size=(100, 200))
    expected = torch.tensor([[50.0, 37.5, 150.0, 62.5], [40.0, 20.0, 60.0, 30.0]])
    assert torch.allclose(a["boxes"], expected)
    assert a["labels"].tolist() == [1, 2]
    assert torch.allclose(b["boxes"], torch.tensor([[0.0, 0.0, 200.0, 100.0]]))
    assert torch.equal(a2["boxes"], a["boxes"])

    rand = BBoxSampler.from_labels(tmp_path, num_classes=3)
    picked = rand.sample(20, generator=torch.Generator().manual_seed(0))
    counts = {len(t["labels"]) for t in picked}
    assert counts == {1, 2}


def test_from_labels_diode_manifest(tmp_path: Path) -> None:
    _write(tmp_path / "onebox" / "labels" / "x" / "img0.txt", "4 0.5 0.5 0.2 0.4\n")
    _write(tmp_path / "onebox" / "labels" / "x" / "img1.txt", "7 0.3 0.6 0.4 0.2\n")
    absolute = tmp_path / "onebox" / "images" / "x" / "img1.png"
    manifest = _write(tmp_path / "onebox" / "manifest.txt", f"images/x/img0.jpg\n{absolute}\n")
    for path in (manifest, manifest.parent):
        sampler = BBoxSampler.from_labels(path, num_classes=80, order="sequential")
        t0, t1 = sampler.sample(2, image_size=(10, 10))
        assert t0["labels"].tolist() == [4] and t1["labels"].tolist() == [7]
        assert torch.allclose(t0["boxes"], torch.tensor([[4.0, 3.0, 6.0, 7.0]]))
        assert torch.allclose(t1["boxes"], torch.tensor([[1.0, 5.0, 5.0, 7.0]]))


@pytest.mark.parametrize(
    ("row", "problem"),
    [("0 0.5 0.5 0.2", ":2: expected 5 fields"), ("9 0.5 0.5 0.2 0.2", ", box 1: class id 9"),
     ("1 0.5 0.5 0 0.2", ":2: box must be finite with w > 0"), ("1 0.5 x 0.2 0.2", ":2: fields must be numbers"),
     ("1.5 0.5 0.5 0.2 0.2", ":2: class id must be a non-negative integer"),
     ("1 3.0 0.5 0.2 0.2", ", box 1 .*outside")],
)
def test_from_labels_rejects_bad_rows(tmp_path: Path, row: str, problem: str) -> None:
    _write(tmp_path / "bad.txt", f"1 0.5 0.5 0.2 0.2\n{row}\n")
    with pytest.raises(ValueError, match=rf"bad\.txt{problem}"):
        BBoxSampler.from_labels(tmp_path, num_classes=5)


def test_from_labels_rejects_empty_and_missing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no label files"):
        BBoxSampler.from_labels(tmp_path, num_classes=5)
    manifest = _write(tmp_path / "m" / "manifest.txt", "images/missing.jpg\n")
    with pytest.raises(ValueError, match=r"manifest\.txt, line 1: label file"):
        BBoxSampler.from_labels(manifest, num_classes=5)


def _target(*boxes: list[float], labels: list[int] | None = None) -> dict[str, torch.Tensor]:
    b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    lab = torch.tensor(labels if labels is not None else [0] * len(b), dtype=torch.int64)
    return {"boxes": b, "labels": lab}


def test_add_false_positives_filters() -> None:
    targets = [_target([0, 0, 20, 20]), _target(), _target([10, 10, 30, 30])]
    det = _target([50, 50, 80, 80], [1, 1, 19, 19], [40, 40, 43, 43], [0, 0, 100, 100],
                  [60, 0, 90, 30], labels=[5, 6, 7, 8, 9])
    det["scores"] = torch.tensor([0.9, 0.9, 0.9, 0.9, 0.1])
    empty = {**_target(), "scores": torch.zeros(0)}
    detections = [det, dict(det), empty]
    originals = [t["boxes"].clone() for t in targets]
    out = add_false_positives(targets, detections, image_size=(100, 100))
    # image 0 keeps only the far, mid-sized, confident box
    # (not the overlapping, tiny, huge or low-score ones)
    assert out[0]["labels"].tolist() == [0, 5]
    assert torch.equal(out[0]["boxes"][1], torch.tensor([50.0, 50, 80, 80]))
    # image 1 has no targets: the IoU test is vacuous
    assert out[1]["labels"].tolist() == [5, 6]
    assert torch.equal(out[2]["boxes"], targets[2]["boxes"])
    assert all(torch.equal(t["boxes"], o) for t, o in zip(targets, originals, strict=True))
    assert len(targets[0]["boxes"]) == 1  # inputs untouched

    strict = add_false_positives(targets, detections, image_size=(100, 100), conf=0.95)
    assert [len(t["labels"]) for t in strict] == [1, 0, 1]


def test_fp_sampling_policy() -> None:
    fp = FPSampling()
    due = [fp.due(i) for i in (0, 799, 800, 850, 900, 1000)]
    assert due == [False, False, True, False, True, True]
    targets = [_target([0, 0, 20, 20])]
    det = {**_target([50, 50, 80, 80], labels=[2]), "scores": torch.tensor([0.3])}
    assert len(fp.apply(targets, [det], image_size=(100, 100))[0]["labels"]) == 2
    assert len(FPSampling(conf=0.5).apply(targets, [det], image_size=(100, 100))[0]["labels"]) == 1
    with pytest.raises(ValueError, match="every"):
        FPSampling(every=0)
    with pytest.raises(ValueError, match="min_area"):
        FPSampling(min_area=0.9, max_area=0.1)


def test_invalid_boxes_and_class_ids_named() -> None:
    good = _target([0, 0, 20, 20])
    det = {**_target([50, 50, 80, 80], labels=[2]), "scores": torch.tensor([0.9])}
    with pytest.raises(ValueError, match=r"targets\[1\] box 0"):
        add_false_positives([good, _target([5, 5, 2, 9])], [det, det], image_size=(100, 100))
    bad_det = {**_target([50, 50, 80, 80], labels=[12]), "scores": torch.tensor([0.9])}
    with pytest.raises(ValueError, match=r"detections\[0\] box 0 has class id 12"):
        add_false_positives([good], [bad_det], image_size=(100, 100), num_classes=10)
    with pytest.raises(ValueError, match="one dict per image"):
        add_false_positives([good], [det, det], image_size=(100, 100))
    with pytest.raises(ValueError, match="num_classes"):
        BBoxSampler.tiles(num_classes=0)
    with pytest.raises(ValueError, match="image_size"):
        BBoxSampler.onebox(num_classes=3).sample(2, image_size=(0, 10))


def test_add_false_positives_drops_detections_degenerate_after_clipping() -> None:
    # A detection on the canvas edge clips to zero width; a NaN box is non-finite: both are dropped,
    # the good detection of the same image is still added.
    targets = [_target([0, 0, 20, 20])]
    det = _target([100, 10, 120, 40], [50, 50, 50, 80], [40, 40, 70, 70], labels=[1, 2, 3])
    det["boxes"][1, 0] = float("nan")
    det["scores"] = torch.tensor([0.9, 0.9, 0.9])
    out = add_false_positives(targets, [det], image_size=(100, 100), num_classes=5)
    assert out[0]["labels"].tolist() == [0, 3]
    assert torch.equal(out[0]["boxes"][1], torch.tensor([40.0, 40, 70, 70]))
    assert det["boxes"].shape == (3, 4)  # input untouched
    with pytest.raises(ValueError, match=r"detections\[0\] must hold"):
        add_false_positives(targets, [{**det, "scores": torch.zeros(2)}], image_size=(100, 100))


def _pairwise_iou_max(boxes: torch.Tensor) -> float:
    iou = box_iou(boxes, boxes)
    return float((iou - torch.diag(iou.diagonal())).max()) if len(boxes) > 1 else 0.0


def test_multibox_counts_sizes_and_no_overlap() -> None:
    h, w = 96, 128
    sampler = BBoxSampler.multibox(num_classes=5, k=(1, 4), min_size=0.1, max_size=0.4)
    targets = sampler.sample(200, image_size=(h, w), generator=torch.Generator().manual_seed(0))
    counts = [len(t["labels"]) for t in targets]
    assert set(counts) == {1, 2, 3, 4}
    for t in targets:
        b = t["boxes"]
        assert _pairwise_iou_max(b) == 0.0
        assert (b[:, :2] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
        bw, bh = (b[:, 2] - b[:, 0]) / w, (b[:, 3] - b[:, 1]) / h
        assert (bw >= 0.1 - 1e-5).all() and (bw <= 0.4 + 1e-5).all() and (bh >= 0.1 - 1e-5).all()
    exact = BBoxSampler.multibox(num_classes=5, k=3, min_size=0.1, max_size=0.3)
    assert {len(t["labels"]) for t in exact.sample(100, generator=torch.Generator().manual_seed(1))} == {3}


def test_multibox_max_iou_allows_overlap_and_seed_decides() -> None:
    loose = BBoxSampler.multibox(num_classes=3, k=6, min_size=0.3, max_size=0.6, max_iou=0.3)
    targets = loose.sample(50, generator=torch.Generator().manual_seed(0))
    worst = max(_pairwise_iou_max(t["boxes"]) for t in targets)
    assert 0.0 < worst <= 0.3 + 1e-6
    a = loose.sample(4, generator=torch.Generator().manual_seed(3))
    b = loose.sample(4, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(x["boxes"], y["boxes"]) and torch.equal(x["labels"], y["labels"])
               for x, y in zip(a, b, strict=True))
    assert repr(loose) == "BBoxSampler.multibox(num_classes=3, k=6, min_size=0.3, max_size=0.6, max_iou=0.3)"


def test_multibox_prior_and_validation() -> None:
    sampler = BBoxSampler.multibox(num_classes=4, class_prior=[0, 0, 1, 0])
    labels = torch.cat([t["labels"] for t in sampler.sample(20, generator=torch.Generator().manual_seed(0))])
    assert labels.unique().tolist() == [2]
    assert "class_prior=sha256:" in repr(sampler)
    for bad in ((3, 1), (0, 2), (1, 2, 3), 0, True):
        with pytest.raises(ValueError, match="k must be"):
            BBoxSampler.multibox(num_classes=4, k=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k must be an int"):
        BBoxSampler.tiles(num_classes=4, k=(1, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_iou"):
        BBoxSampler.multibox(num_classes=4, max_iou=1.0)


def _two_cluster_targets(n: int = 6) -> list[dict[str, torch.Tensor]]:
    # class 0: small boxes at the top left; class 1: large boxes at the bottom right (x1 in 50..60)
    out = []
    for i in range(n):
        boxes = torch.tensor([[0.0, 0, 10, 10], [50 + 2 * i, 60, 90 + 2 * i, 100]])
        out.append({"boxes": boxes, "labels": torch.tensor([0, 1])})
    return out


def test_from_statistics_per_class_shapes_positions_and_counts() -> None:
    source = _two_cluster_targets()
    exact = BBoxSampler.from_statistics(source, num_classes=3, image_size=(100, 100), bandwidth=0)
    targets = exact.sample(100, image_size=(100, 100), generator=torch.Generator().manual_seed(0))
    assert {len(t["labels"]) for t in targets} == {2}
    observed = torch.cat([t["boxes"] for t in source])
    for t in targets:  # bandwidth 0: every box is an observed box of its own class
        for box, label in zip(t["boxes"], t["labels"], strict=True):
            own = torch.cat([s["boxes"][s["labels"] == label] for s in source])
            assert torch.isclose(own, box, atol=1e-4).all(dim=1).any()
    labels = torch.cat([t["labels"] for t in targets])
    assert 80 < int((labels == 0).sum()) < 120 and not (labels == 2).any()  # the data's class frequencies

    smooth = BBoxSampler.from_statistics(source, num_classes=3, image_size=(100, 100))
    targets = smooth.sample(200, image_size=(100, 100), generator=torch.Generator().manual_seed(0))
    boxes = torch.cat([t["boxes"] for t in targets])
    labels = torch.cat([t["labels"] for t in targets])
    small, large = boxes[labels == 0], boxes[labels == 1]
    assert not torch.isclose(boxes[:, None], observed[None], atol=1e-3).all(dim=-1).any(dim=1).all()
    assert (small[:, 2] - small[:, 0]).max() < 20 and (large[:, 2] - large[:, 0]).min() > 30
    assert small[:, 0].max() < 15 and large[:, 0].min() > 35


def test_from_statistics_pooled_prior_folder_and_errors(tmp_path: Path) -> None:
    source = _two_cluster_targets()
    pooled = BBoxSampler.from_statistics(source, num_classes=3, image_size=(100, 100), per_class=False,
                                         bandwidth=0, class_prior=[0, 0, 1], max_boxes=1)
    targets = pooled.sample(100, image_size=(100, 100), generator=torch.Generator().manual_seed(0))
    assert {len(t["labels"]) for t in targets} == {1}
    assert torch.cat([t["labels"] for t in targets]).unique().tolist() == [2]
    widths = torch.cat([t["boxes"][:, 2] - t["boxes"][:, 0] for t in targets])
    assert (widths < 15).any() and (widths > 30).any()  # class 2 has no boxes: shapes from the whole pool

    _write(tmp_path / "a.txt", "1 0.5 0.5 0.5 0.25\n2 0.25 0.25 0.1 0.1\n")
    _write(tmp_path / "b.txt", "")
    folder = BBoxSampler.from_statistics(tmp_path, num_classes=3, bandwidth=0)
    assert repr(folder).startswith("BBoxSampler.statistics(num_classes=3, boxes=2, images=1, per_class=True")
    (t,) = folder.sample(1, image_size=(100, 200), generator=torch.Generator().manual_seed(0))
    assert len(t["labels"]) == 2
    with pytest.raises(ValueError, match="image_size is required"):
        BBoxSampler.from_statistics(source, num_classes=3)
    with pytest.raises(ValueError, match="no box"):
        BBoxSampler.from_statistics([_target()], num_classes=3, image_size=(10, 10))
    with pytest.raises(ValueError, match="bandwidth"):
        BBoxSampler.from_statistics(source, num_classes=3, image_size=(100, 100), bandwidth=-1)
    with pytest.raises(ValueError, match="max_boxes"):
        BBoxSampler.from_statistics(source, num_classes=3, image_size=(100, 100), max_boxes=0)


def test_from_labels_class_prior_redraws_classes(tmp_path: Path) -> None:
    _write(tmp_path / "a.txt", "1 0.5 0.5 0.5 0.25\n2 0.25 0.25 0.1 0.1\n")
    sampler = BBoxSampler.from_labels(tmp_path, num_classes=5, class_prior=[0, 0, 0, 0, 1])
    (t,) = sampler.sample(1, image_size=(100, 200), generator=torch.Generator().manual_seed(0))
    assert t["labels"].tolist() == [4, 4]
    assert torch.allclose(t["boxes"], torch.tensor([[50.0, 37.5, 150.0, 62.5], [40.0, 20.0, 60.0, 30.0]]))


def test_a_generating_sampler_is_truthy_though_it_stores_no_layouts() -> None:
    sampler = BBoxSampler.multibox(num_classes=3)
    assert len(sampler) == 0 and bool(sampler)
    assert (sampler or BBoxSampler.onebox(num_classes=3)) is sampler


def test_mixture_draws_each_image_from_one_component_with_the_weights() -> None:
    onebox = BBoxSampler.onebox(num_classes=5, min_size=0.1, max_size=0.2)
    tiles = BBoxSampler.tiles(num_classes=5, k=4)
    mixed = BBoxSampler.mixture([onebox, tiles], weights=[3.0, 1.0])
    targets = mixed.sample(400, image_size=(64, 64), generator=torch.Generator().manual_seed(0))
    counts = torch.tensor([len(t["labels"]) for t in targets])
    assert set(counts.tolist()) == {1, 4}
    assert 0.68 < (counts == 1).float().mean() < 0.82  # 3:1 weights
    single = [t["boxes"] for t in targets if len(t["labels"]) == 1]
    sides = torch.cat(single)[:, 2:] - torch.cat(single)[:, :2]
    assert sides.min() >= 0.1 * 64 - 1e-4 and sides.max() <= 0.2 * 64 + 1e-4  # onebox keeps its own sizes
    again = mixed.sample(400, image_size=(64, 64), generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(targets, again, strict=True))
    only_tiles = BBoxSampler.mixture([onebox, tiles], weights=[0, 1])
    assert {len(t["labels"]) for t in only_tiles.sample(20, generator=torch.Generator().manual_seed(1))} == {4}
    assert "mixture" in repr(mixed) and "weights=[0.75, 0.25]" in repr(mixed)


def test_mixture_rejects_bad_components_and_weights() -> None:
    onebox = BBoxSampler.onebox(num_classes=5)
    with pytest.raises(ValueError, match="at least one"):
        BBoxSampler.mixture([])
    with pytest.raises(ValueError, match="num_classes"):
        BBoxSampler.mixture([onebox, BBoxSampler.onebox(num_classes=3)])
    with pytest.raises(ValueError, match="weights"):
        BBoxSampler.mixture([onebox, onebox], weights=[1.0])
    with pytest.raises(ValueError, match="weights"):
        BBoxSampler.mixture([onebox, onebox], weights=[0.0, 0.0])
    with pytest.raises(ValueError, match="weights"):
        BBoxSampler.mixture([onebox, onebox], weights=[-1.0, 2.0])
    with pytest.raises(ValueError, match="BBoxSampler"):
        BBoxSampler.mixture([onebox, "tiles"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="kind='mixture'"):
        BBoxSampler(num_classes=5, kind="onebox", components=[onebox])
