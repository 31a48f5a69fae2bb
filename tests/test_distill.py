from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diode.adapters.yolo import YOLOv3Adapter
from diode.data.folder import DetectionFolder
from diode.data.io import save_image
from diode.distill import DistillConfig, Distiller, _ShardedBatches
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
