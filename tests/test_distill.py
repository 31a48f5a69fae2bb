from __future__ import annotations

import csv
import logging
import signal
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn

from diode._interrupt import RunInterrupted
from diode.adapters.yolo import YOLOv3Adapter
from diode.data.folder import DetectionFolder
from diode.data.io import save_image
from diode.distill import (
    DistillConfig,
    Distiller,
    _colour_jitter,
    _leaves,
    _mosaic,
    _ShardedBatches,
    _signals_deferred,
)
from diode.models.yolo import Darknet

SIZE = 64


def _cfg(width: int, classes: int = 3, anchors: int = 2) -> str:
    """A 64x64 darknet with one [yolo] head at stride 32 (2x2 grid, 1 or 2 anchors)."""
    conv = (
        "[convolutional]\nbatch_normalize=1\nfilters={f}\nsize=3\nstride={s}\npad=1\n"
        "activation=leaky\n\n"
    )
    body = conv.format(f=width, s=1) + "[maxpool]\nsize=2\nstride=2\n\n"
    body += "".join(conv.format(f=2 * width, s=2) for _ in range(4))
    head = (
        f"[convolutional]\nsize=1\nstride=1\npad=1\nfilters={anchors * (5 + classes)}\n"
        "activation=linear\n\n"
        f"[yolo]\nmask={','.join(map(str, range(anchors)))}\nanchors=16,16, 40,40\n"
        f"classes={classes}\n"
    )
    return f"[net]\nwidth={SIZE}\nheight={SIZE}\nchannels=3\n\n" + body + head


def _adapter(seed: int, width: int = 8, classes: int = 3, anchors: int = 2, *,
             teacher: bool = False) -> YOLOv3Adapter:
    torch.manual_seed(seed)
    adapter = YOLOv3Adapter(Darknet(_cfg(width, classes, anchors)))
    if teacher:
        # A confident teacher, so pseudo_labels mode has detections to learn from.
        last = adapter.model.conv_layers()[-1][0]
        with torch.no_grad():
            last.bias.view(2, 5 + classes)[:, 4] += 3.0
        adapter.freeze()
    return adapter


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    root = tmp_path / "synth"
    for i in range(8):
        save_image(root / "images" / f"{i:03d}.png", torch.rand(3, SIZE, SIZE, generator=g))
    return root


FAST = dict(batch_size=4, image_size=SIZE, lr=1e-2, warmup_epochs=0.5, log_every=1)


def test_outputs_mode_lowers_the_distillation_loss(images: Path):
    teacher, student = _adapter(0, teacher=True), _adapter(1)
    settings = dict(FAST, lr=3e-2)
    distiller = Distiller(teacher, student, epochs=6, augment=False, ema=None, **settings)
    history = distiller.fit(images)
    assert [h["epoch"] for h in history] == list(range(1, 7))
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    # the learning rate warmed up and then decayed along the cosine
    assert history[-1]["lr"] == pytest.approx(3e-2 * 0.05)
    assert teacher.model.training is False


def test_pseudo_labels_mode_trains_another_architecture(images: Path):
    teacher, student = _adapter(0, teacher=True), _adapter(1, width=4, anchors=1)
    preds = teacher.predict(torch.rand(2, 3, SIZE, SIZE), conf=0.25)
    assert all(len(p["boxes"]) > 0 for p in preds)
    with pytest.raises(ValueError, match="pseudo_labels"):
        Distiller(teacher, student, mode="outputs", **FAST)
    distiller = Distiller(teacher, student, mode="pseudo_labels", epochs=5, **FAST)
    history = distiller.fit(images, progress=True)
    assert history[-1]["loss"] < history[0]["loss"]


def test_resume_reproduces_an_uninterrupted_run(images: Path, tmp_path: Path):
    settings = dict(FAST, epochs=2, batch_size=3, seed=5)  # 8 images: a short last batch

    def eval_fn(adapter: YOLOv3Adapter, epoch: int) -> dict:
        assert adapter.model.training is False
        return {"epoch": epoch, "value": torch.tensor(epoch / 10)}

    full = Distiller(_adapter(0, teacher=True), _adapter(1), **settings)
    full_history = full.fit(images, out=tmp_path / "a", eval_fn=eval_fn)

    def crash_after_first(adapter: YOLOv3Adapter, epoch: int) -> dict:
        if epoch == 2:
            raise KeyboardInterrupt
        return eval_fn(adapter, epoch)

    first = Distiller(_adapter(0, teacher=True), _adapter(1), **settings)
    with pytest.raises(KeyboardInterrupt):
        first.fit(images, out=tmp_path / "b", eval_fn=crash_after_first)
    # a fresh process: another initialisation, restored from b/last.pt
    resumed = Distiller(_adapter(0, teacher=True), _adapter(7), **settings)
    history = resumed.fit(images, out=tmp_path / "b", eval_fn=eval_fn)

    assert history == full_history and len(history) == 2
    assert history[0]["eval"] == {"epoch": 1, "value": pytest.approx(0.1)}
    for a, b in (
        (full.student.model.state_dict(), resumed.student.model.state_dict()),
        (full.student_for_eval().model.state_dict(), resumed.student_for_eval().model.state_dict()),
    ):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    saved = torch.load(tmp_path / "b" / "student.pt", weights_only=True)
    ema = resumed.student_for_eval().model.state_dict()
    assert all(torch.equal(saved[k], ema[k]) for k in ema)
    # finished: another fit is a no-op
    assert resumed.fit(images, out=tmp_path / "b") == history


def test_resume_with_other_settings_names_the_fields(images: Path, tmp_path: Path):
    Distiller(_adapter(0, teacher=True), _adapter(1), epochs=1, **FAST).fit(images, out=tmp_path)
    other = dict(FAST, lr=2e-2)
    d = Distiller(_adapter(0, teacher=True), _adapter(1), epochs=1, **other)
    with pytest.raises(ValueError, match=r"\(lr: 0\.01 -> 0\.02\)"):
        d.fit(images, out=tmp_path)
    # log_every does not change the result, and resume=False starts over
    d = Distiller(_adapter(0, teacher=True), _adapter(1), epochs=1, **dict(FAST, log_every=7))
    assert len(d.fit(images, out=tmp_path)) == 1 and d.epoch == 1
    d = Distiller(_adapter(0, teacher=True), _adapter(1), epochs=1, **other)
    assert len(d.fit(images, out=tmp_path, resume=False)) == 1


def test_checkpoints_are_atomic_and_ema_tracks_the_student(images: Path, tmp_path: Path):
    out = tmp_path / "run"
    distiller = Distiller(_adapter(0, teacher=True), _adapter(1), epochs=2, ema=0.9, ema_tau=1.0,
                          **FAST)
    distiller.fit(images, out=out)
    assert sorted(p.name for p in out.iterdir()) == ["last.pt", "log.txt", "loss.png", "metrics.csv", "student.pt"]
    raw, ema = distiller.student, distiller.student_for_eval()
    assert ema is not raw and type(ema) is type(raw) and ema.model.training is False
    w_raw, w_ema = raw.model.state_dict(), ema.model.state_dict()
    conv = "module_list.0.Conv2d.weight"
    assert not torch.equal(w_raw[conv], w_ema[conv])
    assert torch.equal(w_raw["module_list.0.BatchNorm2d.num_batches_tracked"],
                       w_ema["module_list.0.BatchNorm2d.num_batches_tracked"])
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["epoch"] == 2 and state["updates"] == distiller.updates == 4

    plain = Distiller(_adapter(0, teacher=True), _adapter(1), epochs=1, ema=None, **FAST)
    assert plain.student_for_eval() is plain.student
    plain.save(tmp_path / "w.pt")
    loaded = torch.load(tmp_path / "w.pt", weights_only=True)
    assert torch.equal(loaded["module_list.0.Conv2d.weight"],
                       plain.student.model.state_dict()["module_list.0.Conv2d.weight"])


def test_augmentation_is_seeded_and_keeps_images_in_range(images: Path):
    d = Distiller(_adapter(0, teacher=True), _adapter(1), **FAST)
    x = torch.rand(4, 3, SIZE, SIZE)
    a, b, c = d._augmented(x, 0, 0), d._augmented(x, 0, 0), d._augmented(x, 0, 1)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, x)
    assert a.min() >= 0 and a.max() <= 1


def test_shuffle_depends_on_seed_and_epoch_only():
    def order(seed: int, epoch: int) -> list[int]:
        sampler = _ShardedBatches(50, 7, seed)
        sampler.epoch = epoch
        return [i for batch in sampler for i in batch]

    assert order(0, 3) == order(0, 3) and sorted(order(0, 3)) == list(range(50))
    assert order(0, 3) != order(0, 4) and order(0, 3) != order(1, 3)


def test_bad_data_raises_clear_errors(images: Path, tmp_path: Path):
    d = Distiller(_adapter(0, teacher=True), _adapter(1), epochs=1, **FAST)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images found"):
        d.fit(empty)
    (images / "images" / "004.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="004.png"):
        d.fit(images)
    with pytest.raises(ValueError, match="image_size"):
        d.fit(DetectionFolder(images, image_size=(32, 32), labels="none"))


def test_bad_models_raise_clear_errors():
    teacher = _adapter(0, teacher=True)
    with pytest.raises(ValueError, match=r"\(1, 2, 2, 2, 8\).*\(1, 2, 2, 2, 9\).*pseudo_labels"):
        Distiller(teacher, _adapter(1, classes=4), **FAST)
    with pytest.raises(ValueError, match="classes"):
        Distiller(teacher, _adapter(1, classes=4), mode="pseudo_labels", **FAST)
    with pytest.raises(ValueError, match="multiple of the teacher's size divisor 32"):
        Distiller(teacher, _adapter(1), **dict(FAST, image_size=(48, 64)))
    with pytest.raises(ValueError, match="trainable"):
        Distiller(teacher, _adapter(1).freeze(), **FAST)
    with pytest.raises(ValueError, match="same model"):
        Distiller(teacher, teacher, **FAST)
    with pytest.raises(TypeError, match="unknown DistillConfig fields"):
        Distiller(teacher, _adapter(1), epoch=3)


@pytest.mark.parametrize(
    ("field", "value"),
    [("mode", "logits"), ("epochs", 0), ("batch_size", 1.5), ("image_size", (64,)),
     ("image_size", -32), ("lr", 0.0), ("optimizer", "adam"), ("final_lr_ratio", 1.5),
     ("ema", 1.0), ("conf", -0.1), ("seed", -1), ("augment", "yes"),
     ("warmup_epochs", float("nan"))],
)
def test_config_rejects_bad_values(field: str, value: object):
    with pytest.raises(ValueError, match=field):
        DistillConfig(**{field: value})


def test_config_schedule_and_sgd():
    c = DistillConfig(epochs=10, lr=1.0, warmup_epochs=2.0, final_lr_ratio=0.1, image_size=(64, 96))
    assert c.image_size == (64, 96)
    assert c.lr_at(1.0) == pytest.approx(0.5)
    assert c.lr_at(2.0) == pytest.approx(1.0)
    assert c.lr_at(6.0) == pytest.approx(0.55)
    assert c.lr_at(10.0) == pytest.approx(0.1)
    d = Distiller(_adapter(0, teacher=True), _adapter(1), optimizer="sgd", **FAST)
    assert isinstance(d.optimizer, torch.optim.SGD)
    assert [g["weight_decay"] for g in d.optimizer.param_groups] == [5e-4, 0.0]


# generic adapters --------------------------------------------------------------------------


class NestedOutputs:
    """A YOLOv3Adapter whose raw outputs are nested: ``{"z": {"heads": (head,)}, "a": [2 * head, None]}``.

    ``swap`` builds the dicts in the other insertion order (the same architecture, built differently).
    """

    def __init__(self, inner: YOLOv3Adapter, *, divisor: int = 32, swap: bool = False) -> None:
        self.inner, self.model, self.size_divisor, self.swap = inner, inner.model, divisor, swap
        self.num_classes, self.class_names = inner.num_classes, inner.class_names

    def forward(self, images: torch.Tensor) -> dict:
        head = self.inner.forward(images)[0]
        items = [("z", {"heads": (head,)}), ("a", [2 * head, None])]
        return dict(reversed(items) if self.swap else items)

    def task_loss(self, raw: dict, targets: list, *, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.inner.task_loss([raw["z"]["heads"][0]], targets)

    def predict(self, images: torch.Tensor, *, conf: float = 0.25, iou: float = 0.45) -> list:
        return self.inner.predict(images, conf=conf, iou=iou)

    def bn_layers(self) -> list:
        return self.inner.bn_layers()

    def synthesis_defaults(self) -> dict:
        return {}


class CellDetector:
    """A detector unlike YOLO: a BN conv net predicting, per 8x8 cell, class logits and a box size.

    Raw outputs are ``{"logits": [B, C, H/8, W/8], "sizes": [B, 2, H/8, W/8]}`` (box w, h in pixels,
    centred on the cell). Records the generators its task loss receives.
    """

    size_divisor = 8

    def __init__(self, seed: int, classes: int = 3, *, bias: float = 0.0) -> None:
        torch.manual_seed(seed)
        self.model = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, classes + 2, 1),
        )
        with torch.no_grad():
            self.model[-1].bias[:classes] += bias
        self.num_classes, self.class_names = classes, [f"c{i}" for i in range(classes)]
        self.generators: list[torch.Generator | None] = []

    def forward(self, images: torch.Tensor) -> dict:
        out = self.model(images)
        return {"logits": out[:, : self.num_classes], "sizes": out[:, self.num_classes:].exp() * 16}

    def task_loss(self, raw: dict, targets: list, *, generator: torch.Generator | None = None) -> torch.Tensor:
        self.generators.append(generator)
        logits = raw["logits"]
        wanted = torch.zeros_like(logits)
        size_loss = logits.new_zeros(())
        for i, t in enumerate(targets):
            centre = ((t["boxes"][:, :2] + t["boxes"][:, 2:]) / 2 / 8).long()
            cx = centre[:, 0].clamp(0, logits.shape[3] - 1)
            cy = centre[:, 1].clamp(0, logits.shape[2] - 1)
            wanted[i, t["labels"], cy, cx] = 1.0
            wh = t["boxes"][:, 2:] - t["boxes"][:, :2]
            size_loss = size_loss + F.l1_loss(raw["sizes"][i, :, cy, cx].T, wh, reduction="sum") / 64
        return F.binary_cross_entropy_with_logits(logits, wanted) + size_loss / len(targets)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, *, conf: float = 0.25, iou: float = 0.45) -> list:
        training = self.model.training
        self.model.eval()
        raw = self.forward(images)
        self.model.train(training)
        scores, labels = raw["logits"].sigmoid().max(dim=1)
        results = []
        for i in range(images.shape[0]):
            cy, cx = (scores[i] > conf).nonzero(as_tuple=True)
            centre = torch.stack(((cx + 0.5) * 8, (cy + 0.5) * 8), dim=1)
            half = raw["sizes"][i, :, cy, cx].T / 2
            boxes = torch.cat((centre - half, centre + half), dim=1).clamp(0, images.shape[-1])
            keep = torchvision.ops.batched_nms(boxes, scores[i, cy, cx], labels[i, cy, cx], iou)
            results.append({"boxes": boxes[keep], "scores": scores[i, cy, cx][keep],
                            "labels": labels[i, cy, cx][keep]})
        return results

    def bn_layers(self) -> list:
        return [m for m in self.model.modules() if isinstance(m, nn.BatchNorm2d)]

    def synthesis_defaults(self) -> dict:
        return {}


def test_the_size_constraint_comes_from_the_adapter():
    teacher = NestedOutputs(_adapter(0, teacher=True), divisor=48)
    with pytest.raises(ValueError, match=r"teacher's size divisor 48.*image_size=\(48, 48\)"):
        Distiller(teacher, _adapter(1), **FAST)
    with pytest.raises(ValueError, match="student's size divisor 8"):
        Distiller(NestedOutputs(_adapter(0, teacher=True), divisor=4), CellDetector(1), mode="pseudo_labels",
                  **dict(FAST, image_size=(64, 60)))
    student = CellDetector(1)
    student.size_divisor = 0  # type: ignore[misc]
    with pytest.raises(TypeError, match="size_divisor must be a positive int"):
        Distiller(_adapter(0, teacher=True), student, mode="pseudo_labels", **FAST)


def test_outputs_mode_matches_nested_outputs_in_a_stable_order(images: Path):
    teacher = NestedOutputs(_adapter(0, teacher=True))
    student = NestedOutputs(_adapter(1), swap=True)
    paths = [p for p, _ in _leaves(student.forward(torch.zeros(1, 3, SIZE, SIZE)), "student")]
    assert paths == ["['a'][0]", "['z']['heads'][0]"]
    history = Distiller(teacher, student, epochs=4, augment=False, ema=None, **dict(FAST, lr=3e-2)).fit(images)
    assert history[-1]["loss"] < 0.7 * history[0]["loss"]
    assert set(history[-1]["terms"]) == {"outputs"}

    other = CellDetector(2)
    with pytest.raises(ValueError, match=r"same structure and shapes.*\['z'\]\['heads'\]\[0\].*\['logits'\]"):
        Distiller(teacher, other, **FAST)
    with pytest.raises(TypeError, match=r"holds a str at \['a'\]\[1\]"):
        _leaves({"a": [torch.zeros(1), "x"]}, "teacher")


def test_pseudo_labels_work_between_unrelated_adapters(images: Path):
    # a YOLO teacher teaches a cell detector ...
    student = CellDetector(1)
    history = Distiller(_adapter(0, teacher=True), student, mode="pseudo_labels", epochs=4, **FAST).fit(images)
    assert history[-1]["loss"] < history[0]["loss"]
    assert student.generators and all(isinstance(g, torch.Generator) for g in student.generators)
    # ... and a cell detector teaches a YOLO student
    teacher = CellDetector(3, bias=3.0)
    teacher.model.eval().requires_grad_(False)
    assert all(len(p["boxes"]) > 0 for p in teacher.predict(torch.rand(2, 3, SIZE, SIZE)))
    history = Distiller(teacher, _adapter(1), mode="pseudo_labels", epochs=3, **FAST).fit(images)
    assert history[-1]["loss"] < history[0]["loss"]


class FixedDetections:
    """A teacher whose detections are 400 boxes scored 0.2 and 400 scored 0.8 on every image."""

    def __init__(self, inner: YOLOv3Adapter) -> None:
        self.inner, self.model, self.size_divisor = inner, inner.model, 32
        self.num_classes, self.class_names = inner.num_classes, inner.class_names

    def forward(self, images: torch.Tensor) -> list:
        return self.inner.forward(images)

    def task_loss(self, raw: list, targets: list, *, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.inner.task_loss(raw, targets)

    def predict(self, images: torch.Tensor, *, conf: float = 0.25, iou: float = 0.45) -> list:
        xy = torch.arange(800.0)[:, None] * 0.05  # distinct boxes; the first 400 start left of x = 20
        boxes = torch.cat((xy, xy, xy + 10, xy + 10), dim=1)
        scores = torch.cat((torch.full((400,), 0.2), torch.full((400,), 0.8)))
        keep = scores > conf
        return [{"boxes": boxes[keep], "scores": scores[keep], "labels": torch.zeros(int(keep.sum()), dtype=torch.long)}
                for _ in range(images.shape[0])]

    def bn_layers(self) -> list:
        return self.inner.bn_layers()

    def synthesis_defaults(self) -> dict:
        return {}


def test_score_sampling_keeps_each_label_with_its_score():
    teacher = FixedDetections(_adapter(0, teacher=True))
    x = torch.zeros(50, 3, SIZE, SIZE)
    sampled = Distiller(teacher, _adapter(1), mode="pseudo_labels", conf=0.05, score_sampling=True, **FAST)
    kept = sampled._pseudo_labels(x, torch.Generator().manual_seed(0))
    low = torch.tensor([float((t["boxes"][:, 0] < 20).sum()) for t in kept])  # the boxes scored 0.2
    high = torch.tensor([float((t["boxes"][:, 0] >= 20).sum()) for t in kept])
    assert low.mean() / 400 == pytest.approx(0.2, abs=0.02)
    assert high.mean() / 400 == pytest.approx(0.8, abs=0.02)
    again = sampled._pseudo_labels(x, torch.Generator().manual_seed(0))
    assert all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(kept, again, strict=True))
    hard = Distiller(teacher, _adapter(1), mode="pseudo_labels", conf=0.25, **FAST)
    assert [len(t["boxes"]) for t in hard._pseudo_labels(x[:2], hard._generator(2, 0, 0))] == [400, 400]


# augmentation ------------------------------------------------------------------------------


def test_mosaic_tiles_four_half_size_images_of_the_batch():
    values = torch.tensor([0.1, 0.3, 0.6, 0.9])
    x = values[:, None, None, None].expand(4, 3, SIZE, SIZE).clone()
    g = torch.Generator().manual_seed(0)
    out = _mosaic(x, 1.0, g)
    assert out.shape == x.shape and torch.equal(x, values[:, None, None, None].expand_as(x))
    half = SIZE // 2
    quadrants = [out[:, :, :half, :half], out[:, :, :half, half:], out[:, :, half:, :half], out[:, :, half:, half:]]
    for q in quadrants:
        first = q[:, :, :1, :1]
        assert torch.allclose(q, first.expand_as(q))  # each tile is one whole (constant) image
        assert all(torch.isclose(v, values).any() for v in first.flatten())
    tiles = torch.stack([q[:, 0, 0, 0] for q in quadrants], dim=1)
    assert len(torch.unique(tiles)) > 1  # the tiles come from several images
    assert torch.equal(_mosaic(x, 1.0, torch.Generator().manual_seed(0)), out)
    assert torch.equal(_mosaic(x, 0.0, g), x)
    d = Distiller(_adapter(0, teacher=True), _adapter(1), augment=False, mosaic=1.0, **FAST)
    a = d._augmented(x, 0, 0)
    assert torch.equal(a, d._augmented(x, 0, 0)) and not torch.equal(a, d._augmented(x, 0, 1))
    assert torch.allclose(a[:, :, :half, :half], a[:, :, :1, :1].expand(4, 3, half, half))


def test_colour_jitter_rotates_hue_about_grey_and_scales_saturation_and_value():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 8, 8, generator=g)
    x[:, :, :2] = x[:, :1, :2]  # the top rows grey
    hue = _colour_jitter(x, (0.5, 0.0, 0.0), torch.Generator().manual_seed(1))
    assert not torch.allclose(hue, x)
    assert torch.allclose(hue.sum(dim=1), x.sum(dim=1), atol=1e-5)  # the grey component is kept
    assert torch.allclose(hue[:, :, :2], x[:, :, :2], atol=1e-6)  # grey stays grey
    value = _colour_jitter(x, (0.0, 0.0, 0.5), torch.Generator().manual_seed(1))
    ratio = value / x
    assert torch.allclose(ratio, ratio[:, :1, :1, :1].expand_as(ratio), atol=1e-5)
    assert ((ratio[:, 0, 0, 0] - 1).abs() <= 0.5).all() and not torch.allclose(ratio, torch.ones_like(ratio))
    sat = _colour_jitter(x, (0.0, 0.5, 0.0), torch.Generator().manual_seed(1))
    assert torch.allclose(sat.amax(dim=1), x.amax(dim=1), atol=1e-6)  # value kept, saturation changed
    assert torch.allclose(sat[:, :, :2], x[:, :, :2]) and not torch.allclose(sat, x)
    assert torch.equal(_colour_jitter(x, (0.0, 0.0, 0.0), g), x)
    d = Distiller(_adapter(0, teacher=True), _adapter(1), augment=False, hsv=(0.1, 0.5, 0.5), **FAST)
    out = d._augmented(x[:, :, :, :], 0, 0)
    assert not torch.equal(out, x) and out.min() >= 0 and out.max() <= 1
    assert torch.equal(Distiller(_adapter(0, teacher=True), _adapter(1), augment=False, **FAST)._augmented(x, 0, 0), x)


def test_colour_jitter_is_on_by_default_where_it_helps():
    assert DistillConfig().colour_gains == (0.0, 0.0, 0.0)  # outputs mode
    assert DistillConfig(mode="pseudo_labels").colour_gains == (0.015, 0.5, 0.3)
    assert DistillConfig(mode="hybrid").colour_gains == (0.015, 0.5, 0.3)
    assert DistillConfig(mode="hybrid", hsv=(0, 0, 0)).colour_gains == (0.0, 0.0, 0.0)
    assert DistillConfig(hsv=[0.1, 0.2, 0.3]).colour_gains == (0.1, 0.2, 0.3)
    x = torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    d = Distiller(_adapter(0, teacher=True), _adapter(1), mode="pseudo_labels", augment=False, **FAST)
    assert d.config.hsv is None and not torch.equal(d._augmented(x, 0, 0), x)


# modes, records, progress, interrupts --------------------------------------------------------


def test_hybrid_mode_adds_the_weighted_task_loss(images: Path, tmp_path: Path):
    with pytest.raises(ValueError, match="mode='hybrid' needs raw outputs of the same structure"):
        Distiller(_adapter(0, teacher=True), _adapter(1, classes=4), mode="hybrid", **FAST)
    d = Distiller(_adapter(0, teacher=True), _adapter(1), mode="hybrid", pseudo_weight=0.5, epochs=2, **FAST)
    history = d.fit(images, out=tmp_path)
    assert set(history[-1]["terms"]) == {"outputs", "task"}
    with (tmp_path / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and list(rows[0]) == ["epoch", "step", "progress", "lr", "loss", "outputs", "task"]
    for row in rows:
        assert float(row["loss"]) == pytest.approx(float(row["outputs"]) + 0.5 * float(row["task"]), rel=1e-4)


def test_run_folder_records_and_plain_progress(images: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                               capsys: pytest.CaptureFixture[str]):
    caplog.set_level(logging.INFO, logger="diode.distill")
    d = Distiller(_adapter(0, teacher=True), _adapter(1), epochs=2, **dict(FAST, log_every=1))
    d.fit(images, out=tmp_path)  # progress=None: stderr is not a terminal here, so no bar
    assert "\r" not in capsys.readouterr().err
    lines = (tmp_path / "log.txt").read_text().splitlines()
    assert lines == [r.getMessage() for r in caplog.records if r.name == "diode.distill"]
    assert lines[0] == "distilling (outputs) on 8 images: batch 4, 2 steps per epoch, epochs 1-2"
    assert lines[1].startswith("epoch 1/2 step 1/2: loss ") and "(outputs " in lines[1]
    assert lines[1].endswith(", lr 0.01")
    assert lines[3].startswith("epoch 1/2 done: loss ")
    with (tmp_path / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["epoch"], r["step"]) for r in rows] == [("1", "1"), ("1", "2"), ("2", "1"), ("2", "2")]
    assert float(rows[0]["lr"]) == pytest.approx(1e-2) and float(rows[1]["progress"]) == 1.0
    with Image.open(tmp_path / "loss.png") as png:
        assert png.format == "PNG" and png.size == (800, 450)

    Distiller(_adapter(0, teacher=True), _adapter(1), epochs=1, **FAST).fit(images, progress=True)
    assert "\r" in capsys.readouterr().err  # the tqdm bar, when asked for


def test_interrupt_names_the_epochs_and_resume_keeps_the_records_whole(images: Path, tmp_path: Path):
    def stop_in_epoch_two(adapter: YOLOv3Adapter, epoch: int) -> dict:
        if epoch == 2:
            raise KeyboardInterrupt
        return {}

    settings = dict(FAST, epochs=3, log_every=1)
    with pytest.raises(RunInterrupted, match=r"^interrupted after 1/3 epochs; re-run the same command to resume$"):
        Distiller(_adapter(0, teacher=True), _adapter(1), **settings).fit(images, out=tmp_path,
                                                                          eval_fn=stop_in_epoch_two)
    (tmp_path / ".last.pt.123.abc.tmp").write_bytes(b"half")  # what a killed writer leaves
    (tmp_path / ".keep.me.tmp").write_bytes(b"not ours")
    resumed = Distiller(_adapter(0, teacher=True), _adapter(1), **settings)
    assert len(resumed.fit(images, out=tmp_path)) == 3
    assert not (tmp_path / ".last.pt.123.abc.tmp").exists() and (tmp_path / ".keep.me.tmp").exists()
    with (tmp_path / "metrics.csv").open() as f:
        steps = [(r["epoch"], r["step"]) for r in csv.DictReader(f)]
    assert steps == [(str(e), str(s)) for e in (1, 2, 3) for s in (1, 2)]  # epoch 2's first rows replaced
    log = (tmp_path / "log.txt").read_text()
    assert "resuming: 1/3 epochs already done" in log and log.count("epoch 1/3 done") == 1
    d = Distiller(_adapter(0, teacher=True), _adapter(1), **settings)
    with pytest.raises(RunInterrupted, match=r"^interrupted after 2/3 epochs$"):  # no out: nothing to resume
        d.fit(images, eval_fn=lambda adapter, epoch: {} if epoch < 3 else _raise(KeyboardInterrupt()))
    with pytest.raises(ValueError, match=r"\(epochs: 3 -> 2\)"):
        Distiller(_adapter(0, teacher=True), _adapter(1), **dict(settings, epochs=2)).fit(images, out=tmp_path)


def _raise(error: BaseException) -> dict:
    raise error


def test_the_interrupt_line_counts_the_checkpointed_epochs(images: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch):
    d = Distiller(_adapter(0, teacher=True), _adapter(1), **dict(FAST, epochs=3))
    save = d._save_checkpoint
    monkeypatch.setattr(d, "_save_checkpoint", lambda out: save(out) if d.epoch < 2 else _raise(KeyboardInterrupt()))
    with pytest.raises(RunInterrupted, match=r"^interrupted after 1/3 epochs; re-run"):  # epoch 2 trained, not saved
        d.fit(images, out=tmp_path)
    assert d.epoch == 2 and torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 1


def test_signals_during_a_checkpoint_take_effect_after_it():
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job starts with SIGINT ignored
    try:
        reached = False
        with pytest.raises(KeyboardInterrupt):
            with _signals_deferred():
                signal.raise_signal(signal.SIGINT)
                reached = True
        assert reached
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize(
    ("field", "value"),
    [("mode", "soft"), ("mosaic", 1.5), ("hsv", (0.6, 0.0, 0.0)), ("hsv", (0.1, 0.2)), ("hsv", "0.1"),
     ("score_sampling", 1), ("pseudo_weight", 0.0)],
)
def test_config_rejects_bad_new_values(field: str, value: object):
    with pytest.raises(ValueError, match=field.split("_")[0]):
        DistillConfig(**{field: value})


def test_global_batch_must_cover_the_processes():
    sampler = _ShardedBatches(10, 4, seed=0, rank=1, world=3)
    batches = list(sampler)
    assert [len(b) for b in batches] == [1, 1, 1]  # global batches 4, 4, 2 -> rank 1 takes 1, 1, 1
    assert [sampler.weight(s) for s in range(3)] == [pytest.approx(0.75), pytest.approx(0.75), 1.0]
    full = [b for r in range(3) for b in _ShardedBatches(10, 4, 0, r, 3)]
    extra = int(sampler.permutation()[8])  # the last global batch (2 images < 3 ranks) is repeated cyclically
    assert sorted(i for b in full for i in b) == sorted([*range(10), extra])


def test_progress_lines_print_once_above_the_bar(images: Path, capsys: pytest.CaptureFixture[str]):
    package = logging.getLogger("diode")  # configured as the CLI does: a console handler, no propagation
    handler = logging.StreamHandler(sys.stderr)
    before = (package.level, package.propagate)
    package.addHandler(handler)
    package.setLevel(logging.INFO)
    package.propagate = False
    try:
        Distiller(_adapter(0, teacher=True), _adapter(1), epochs=1, **FAST).fit(images, progress=True)
    finally:
        package.removeHandler(handler)
        package.setLevel(before[0])
        package.propagate = before[1]
    err = capsys.readouterr().err
    assert err.count("epoch 1/1 done: loss") == 1 and "distill: " in err and "\r" in err
