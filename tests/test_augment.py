from __future__ import annotations

import pytest
import torch

from diode.inversion import augment as A
from diode.inversion.augment import (
    AugmentationPipeline,
    brightness,
    contrast,
    hflip,
    jitter,
    random_erase,
    random_resized_crop,
)


def _square_batch(b: int, h: int, w: int, box: list[float]) -> tuple[torch.Tensor, ...]:
    """Dark images with a bright, pixel-aligned square filling ``box`` in each image."""
    x1, y1, x2, y2 = (int(v) for v in box)
    images = torch.zeros(b, 3, h, w)
    images[:, :, y1:y2, x1:x2] = 1.0
    boxes = torch.tensor([box], dtype=torch.float32).repeat(b, 1)
    return images, boxes, torch.arange(b)


def _assert_tight(
    images: torch.Tensor, boxes: torch.Tensor, valid: torch.Tensor, tol: float
) -> None:
    """Bright pixels of each image lie in its (valid) box, and the box hugs them."""
    for i in range(images.shape[0]):
        ys, xs = torch.nonzero(images[i, 0] > 0.5, as_tuple=True)
        if not valid[i]:
            continue
        assert len(ys) > 0
        x1, y1, x2, y2 = boxes[i].tolist()
        # pixel (y, x) covers [x, x+1) x [y, y+1)
        bx1, by1 = xs.min().item(), ys.min().item()
        bx2, by2 = xs.max().item() + 1, ys.max().item() + 1
        assert bx1 >= x1 - tol and by1 >= y1 - tol and bx2 <= x2 + tol and by2 <= y2 + tol
        assert abs(bx1 - x1) <= tol and abs(by1 - y1) <= tol
        assert abs(bx2 - x2) <= tol and abs(by2 - y2) <= tol


def test_jitter_moves_boxes_with_pixels() -> None:
    images, boxes, bi = _square_batch(16, 32, 40, [12, 10, 22, 18])
    g = torch.Generator().manual_seed(0)
    out, new_boxes, out_bi, valid = jitter(images, boxes, bi, max_shift=8, per_sample=True, generator=g)
    assert valid.all() and torch.equal(out_bi, bi)
    _assert_tight(out, new_boxes, valid, tol=0.0)
    shifts = new_boxes[:, :2] - boxes[:, :2]
    assert len({tuple(s) for s in shifts.tolist()}) > 1  # per-sample shifts
    assert shifts.abs().max() <= 8


def test_jitter_per_batch_uses_one_shift() -> None:
    images, boxes, bi = _square_batch(6, 32, 32, [12, 10, 22, 18])
    g = torch.Generator().manual_seed(1)
    out, new_boxes, _, valid = jitter(images, boxes, bi, max_shift=8, generator=g)  # the default, as the reference
    _assert_tight(out, new_boxes, valid, tol=0.0)
    assert torch.equal(new_boxes, new_boxes[:1].expand_as(new_boxes))


def test_jitter_marks_boxes_pushed_out_invalid_and_pipeline_removes_them() -> None:
    b, h, w = 32, 32, 32
    images = torch.rand(b, 3, h, w)
    big = torch.tensor([10.0, 10.0, 20.0, 20.0])
    edge = torch.tensor([30.5, 10.0, 32.0, 20.0])  # any shift to the right pushes it out
    boxes = torch.stack([big, edge]).repeat(b, 1)
    bi = torch.arange(b).repeat_interleave(2)
    g = torch.Generator().manual_seed(0)
    _, new_boxes, _, valid = jitter(images, boxes, bi, max_shift=4, per_sample=True, generator=g)
    sx = new_boxes[0::2, 0] - big[0]
    assert torch.equal(valid[1::2], sx <= 0) and valid[0::2].all()
    assert (sx > 0).any() and (sx <= 0).any()

    pipe = AugmentationPipeline(jitter=4, jitter_per_sample=True, flip=0, brightness=0, contrast=0, erase=0)
    targets = [{"boxes": torch.stack([big, edge]), "labels": torch.tensor([1, 2])}
               for _ in range(b)]
    _, out_targets = pipe(images, targets, generator=torch.Generator().manual_seed(0))
    for t, keep_edge in zip(out_targets, (sx <= 0).tolist(), strict=True):
        assert t["labels"].tolist() == ([1, 2] if keep_edge else [1])


def test_hflip_mirrors_boxes() -> None:
    images, boxes, bi = _square_batch(16, 24, 40, [3, 5, 11, 20])
    g = torch.Generator().manual_seed(0)
    out, new_boxes, _, valid = hflip(images, boxes, bi, p=0.5, generator=g)
    _assert_tight(out, new_boxes, valid, tol=0.0)
    flipped = new_boxes[:, 0] != boxes[:, 0]
    assert flipped.any() and (~flipped).any()
    mirrored = torch.tensor([[29.0, 5.0, 37.0, 20.0]]).expand(int(flipped.sum()), 4)
    assert torch.equal(new_boxes[flipped], mirrored)
    assert torch.equal(out[~flipped], images[~flipped])


@pytest.mark.parametrize("scale", [(0.3, 1.0), (1.5, 2.5)])
def test_random_resized_crop_scales_and_clips_boxes(scale: tuple[float, float]) -> None:
    images, boxes, bi = _square_batch(24, 48, 48, [14, 16, 34, 30])
    g = torch.Generator().manual_seed(3)
    out, new_boxes, _, valid = random_resized_crop(images, boxes, bi, scale=scale, generator=g)
    assert valid.any()
    assert (new_boxes[:, 0::2] >= 0).all() and (new_boxes[:, 0::2] <= 48).all()
    assert (new_boxes[:, 1::2] >= 0).all() and (new_boxes[:, 1::2] <= 48).all()
    _assert_tight(out, new_boxes, valid, tol=1.0)
    size = (new_boxes[:, 2:] - new_boxes[:, :2])[valid]
    if scale[0] > 1:
        assert (size < torch.tensor([20.0, 14.0])).all()  # zoomed out: boxes shrink
    else:
        assert (size > torch.tensor([20.0, 14.0])).any()  # zoomed in


def test_random_resized_crop_invalidates_boxes_outside_the_window() -> None:
    images, boxes, bi = _square_batch(64, 32, 32, [0, 0, 4, 4])
    g = torch.Generator().manual_seed(0)
    _, new_boxes, _, valid = random_resized_crop(images, boxes, bi, scale=(0.1, 0.2), generator=g)
    assert (~valid).any() and valid.any()
    w = new_boxes[:, 2] - new_boxes[:, 0]
    h = new_boxes[:, 3] - new_boxes[:, 1]
    assert (w[valid] >= 1).all() and (h[valid] >= 1).all()


def _inputs() -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    targets = [{"boxes": torch.tensor([[2.0, 3.0, 12.0, 14.0], [1.0, 1.0, 6.0, 5.0]]),
                "labels": torch.tensor([0, 5])} for _ in range(4)]
    return images, targets


def test_pipeline_gradcheck_float64() -> None:
    pipe = AugmentationPipeline(jitter=3, flip=0.5, crop=(0.5, 1.2), erase=1.0)
    bi = torch.tensor([0])
    labels = torch.tensor([1])
    boxes = torch.tensor([[1.0, 1.0, 6.0, 7.0]])
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64, requires_grad=True)

    def fn(images: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        return pipe.forward_packed(images, bi, labels, boxes, generator=g)[0]

    assert torch.autograd.gradcheck(fn, (x,))


def test_seed_determines_output() -> None:
    pipe = AugmentationPipeline(jitter=3, crop=(0.5, 1.0))  # 16 px images: a 20 px roll may drop every box
    images, targets = _inputs()

    def run(seed: int) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        return pipe(images, targets, generator=torch.Generator().manual_seed(seed))

    a, ta = run(0)
    b, tb = run(0)
    c, tc = run(1)
    assert torch.equal(a, b)
    assert all(torch.equal(x["boxes"], y["boxes"]) for x, y in zip(ta, tb, strict=True))
    assert not torch.equal(a, c)
    assert not all(torch.equal(x["boxes"], y["boxes"]) for x, y in zip(ta, tc, strict=True))


def test_caller_tensors_unmodified() -> None:
    pipe = AugmentationPipeline(crop=(0.5, 1.0), erase=1.0)
    images, targets = _inputs()
    img_copy = images.clone()
    tgt_copy = [{k: v.clone() for k, v in t.items()} for t in targets]
    out, out_targets = pipe(images, targets, generator=torch.Generator().manual_seed(0))
    assert torch.equal(images, img_copy)
    for t, c in zip(targets, tgt_copy, strict=True):
        assert torch.equal(t["boxes"], c["boxes"]) and torch.equal(t["labels"], c["labels"])
    assert not torch.equal(out, images)


def test_brightness_contrast_statistics() -> None:
    b = 4000
    g = torch.Generator().manual_seed(0)
    flat = torch.full((b, 3, 2, 2), 0.5)
    empty = torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)
    out = brightness(flat, *empty, sigma=0.2, generator=g)[0]
    delta = out - flat
    assert torch.allclose(delta, delta[:, :1, :1, :1].expand_as(delta))  # one offset per image
    assert abs(delta.mean().item()) < 0.02 and abs(delta.std().item() - 0.2) < 0.01
    assert (out > 1).any() and (out < 0).any()  # not clamped, as in the reference

    x = torch.rand(b, 3, 2, 2, generator=g)
    out = contrast(x, *empty, sigma=0.1, generator=g)[0]
    ratio = out / x  # the reference scales about zero: x (1 + N(0, sigma))
    assert torch.allclose(ratio, ratio[:, :1, :1, :1].expand_as(ratio), atol=1e-5)  # one factor per image
    gain = ratio[:, 0, 0, 0]
    assert abs(gain.mean().item() - 1) < 0.01 and abs(gain.std().item() - 0.1) < 0.01


def test_random_erase_rectangle_and_gradients() -> None:
    x = torch.ones(8, 3, 32, 32, requires_grad=True)
    boxes = torch.tensor([[1.0, 1.0, 9.0, 9.0]])
    bi = torch.tensor([0])
    g = torch.Generator().manual_seed(0)
    out, out_boxes, _, valid = random_erase(x, boxes, bi, p=1.0, scale=(0.1, 0.2), fill="zero",
                                            generator=g)
    assert torch.equal(out_boxes, boxes) and valid.all()
    erased = out[:, 0] == 0
    frac = erased.float().mean(dim=(1, 2))
    assert (frac > 0.05).all() and (frac < 0.3).all()
    for m in erased:  # a filled axis-aligned rectangle
        ys, xs = torch.nonzero(m, as_tuple=True)
        area = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        assert area == m.sum()
    out.sum().backward()
    assert torch.equal(x.grad[:, 0] == 0, erased)

    kept = random_erase(x, boxes, bi, p=0.0, generator=g)[0]
    assert torch.equal(kept, x)


def test_module_twins_match_functions() -> None:
    images, boxes, bi = _square_batch(4, 16, 16, [2, 2, 10, 10])
    pairs = [
        (A.Jitter(5), jitter, {"max_shift": 5}),
        (A.HFlip(0.5), hflip, {"p": 0.5}),
        (A.RandomResizedCrop((0.4, 1.0)), random_resized_crop, {"scale": (0.4, 1.0)}),
        (A.Brightness(0.3), brightness, {"sigma": 0.3}),
        (A.Contrast(0.3), contrast, {"sigma": 0.3}),
        (A.RandomErase(0.7), random_erase, {"p": 0.7}),
    ]
    for module, fn, kwargs in pairs:
        a = module(images, boxes, bi, generator=torch.Generator().manual_seed(0))
        b = fn(images, boxes, bi, generator=torch.Generator().manual_seed(0), **kwargs)
        assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True)), type(module).__name__
        assert type(module).__name__ in A.__all__ and fn.__name__ in A.__all__


def test_pipeline_ops_switch_off() -> None:
    pipe = AugmentationPipeline(jitter=0, flip=0, brightness=0, contrast=0, erase=0)
    images, targets = _inputs()
    out, out_targets = pipe(images, targets)
    assert len(pipe.ops) == 0 and torch.equal(out, images)
    assert [type(op).__name__ for op in AugmentationPipeline().ops] == [
        "Jitter", "HFlip", "Brightness", "Contrast", "RandomErase"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"flip": 1.5}, "flip"), ({"crop": (0.9, 0.1)}, "crop"), ({"jitter": -1}, "max_shift"),
     ({"brightness": -0.1}, "brightness"), ({"erase_fill": "blue"}, "fill")],
)
def test_pipeline_rejects_bad_config(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AugmentationPipeline(**kwargs)


def test_pipeline_rejects_bad_inputs() -> None:
    pipe = AugmentationPipeline()
    images, targets = _inputs()
    bad = [dict(t) for t in targets]
    bad[2] = {"boxes": torch.tensor([[5.0, 5.0, 3.0, 9.0]]), "labels": torch.tensor([0])}
    with pytest.raises(ValueError, match=r"targets\[2\] box 0"):
        pipe(images, bad)
    with pytest.raises(ValueError, match="one dict per image"):
        pipe(images, targets[:3])
    with pytest.raises(TypeError, match="generator"):
        pipe(images, targets, generator=0)  # type: ignore[arg-type]


@pytest.mark.parametrize("channels_last", [False, True])
def test_pipeline_fused_ops_match_the_ops_applied_one_by_one(channels_last: bool) -> None:
    pipe = AugmentationPipeline(jitter=5, flip=0.5, brightness=0.2, contrast=0.1, erase=0.5)
    g0 = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, 16, 20, generator=g0)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    boxes = torch.tensor([[1.0, 2.0, 9.0, 12.0], [4.0, 0.0, 19.0, 5.0]]).repeat(3, 1)
    bi = torch.arange(6)
    labels = torch.zeros(6, dtype=torch.long)
    x = images.clone().requires_grad_(True)
    fused, f_bi, _, f_boxes, f_valid = pipe.forward_packed(x, bi, labels, boxes,
                                                           generator=torch.Generator().manual_seed(7))
    y = images.clone().requires_grad_(True)
    out, seq_boxes, seq_bi, seq_valid = y, boxes, bi, torch.ones(6, dtype=torch.bool)
    g = torch.Generator().manual_seed(7)
    for op in pipe.ops:  # the module twins, one at a time
        out, seq_boxes, seq_bi, seq_valid = op(out, seq_boxes, seq_bi, seq_valid, generator=g)
    torch.testing.assert_close(fused, out)
    torch.testing.assert_close(f_boxes, seq_boxes)
    assert torch.equal(f_valid, seq_valid) and torch.equal(f_bi, seq_bi)
    weights = torch.rand(fused.shape, generator=g0)
    (gf,) = torch.autograd.grad((fused * weights).sum(), x)
    (gs,) = torch.autograd.grad((out * weights).sum(), y)
    torch.testing.assert_close(gf, gs)
    if channels_last:
        assert fused.is_contiguous(memory_format=torch.channels_last)


def test_jitter_keeps_channels_last_and_matches_contiguous() -> None:
    images = torch.rand(2, 3, 9, 7)
    boxes, bi = torch.tensor([[1.0, 1.0, 5.0, 6.0]]).repeat(2, 1), torch.arange(2)
    a = jitter(images, boxes, bi, max_shift=3, generator=torch.Generator().manual_seed(1))[0]
    b = jitter(images.contiguous(memory_format=torch.channels_last), boxes, bi, max_shift=3,
               generator=torch.Generator().manual_seed(1))[0]
    assert torch.equal(a, b) and b.is_contiguous(memory_format=torch.channels_last)


def test_cpu_erase_fills_exactly_the_masked_rectangles() -> None:
    g = torch.Generator().manual_seed(3)
    images = torch.rand(5, 3, 12, 10, generator=g) + 2.0  # outside [0, 1): noise is recognisable
    idx_y, idx_x = torch.arange(12), torch.arange(10)
    y0, x0 = torch.tensor([0, 3, 5, 11, 2]), torch.tensor([1, 0, 9, 4, 2])
    nh, nw = torch.tensor([4, 9, 7, 1, 0]), torch.tensor([3, 10, 1, 6, 5])
    rows = (idx_y >= y0[:, None]) & (idx_y < (y0 + nh)[:, None])
    cols = (idx_x >= x0[:, None]) & (idx_x < (x0 + nw)[:, None])
    mask = rows[:, None, :, None] & cols[:, None, None, :]
    zeroed = A._erase_rectangles(images, rows, cols, "zero", None)
    assert torch.equal(zeroed, torch.where(mask, torch.zeros(()), images))
    noisy = A._erase_rectangles(images, rows, cols, "noise", g)
    assert torch.equal(noisy[~mask.expand_as(images)], images[~mask.expand_as(images)])
    inside = noisy[mask.expand_as(images)]
    assert inside.numel() == int(mask.sum()) * 3 and (inside >= 0).all() and (inside < 1).all()


def test_default_pipeline_follows_the_reference_recipe() -> None:
    """One roll for the whole batch; the erase zeroes at most 20 % of an image."""
    pipe = AugmentationPipeline(flip=0, brightness=0, contrast=0)
    b = 64
    images = torch.ones(b, 3, 40, 40)
    box = torch.tensor([[15.0, 15.0, 25.0, 25.0]])
    targets = [{"boxes": box.clone(), "labels": torch.tensor([1])} for _ in range(b)]
    out, out_targets = pipe(images, targets, generator=torch.Generator().manual_seed(0))
    shifted = torch.cat([t["boxes"] for t in out_targets])
    assert shifted.shape == (b, 4) and torch.equal(shifted, shifted[:1].expand_as(shifted))
    assert not torch.equal(shifted[:1], box)
    erased = out == 0
    assert ((out == 0) | (out == 1)).all()  # zero fill, no noise
    frac = erased[:, 0].float().mean(dim=(1, 2))
    assert (frac > 0).sum() > b // 4 and (frac == 0).sum() > b // 4  # p = 0.5
    assert frac.max() <= 0.2 + 2 * 41 / 1600  # area up to 20 % (plus pixel rounding)
