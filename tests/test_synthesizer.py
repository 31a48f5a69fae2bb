from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_tiny_yolo, onebox_targets

from diode import AugmentationPipeline, DeepInversionLoss, FPSampling, Stage, Synthesizer
from diode.inversion.synthesizer import FAST_FINE_LR, FAST_TASK_SCALE, fast_stages, reference_stages


def _synth(teacher, stages=None, **kw) -> Synthesizer:
    return Synthesizer(teacher, stages=stages or [Stage(64, 30, lr=0.1)], log_every=10, **kw)


def test_run_returns_images_targets_metrics_and_history() -> None:
    teacher = make_tiny_yolo()
    result = _synth(teacher).run(onebox_targets(2), generator=torch.Generator().manual_seed(0))
    assert result.images.shape == (2, 3, 64, 64)
    assert result.images.min() >= 0 and result.images.max() <= 1
    assert not result.images.requires_grad
    assert len(result.targets) == 2 and all(len(t["boxes"]) == 1 for t in result.targets)
    for key in ("task", "bn", "tv_l1", "tv_l2", "l2", "seconds_per_iteration", "inversion_map50"):
        assert key in result.metrics
    assert result.metrics["iterations"] == 30
    assert [h["iteration"] for h in result.history] == [10, 20, 30]


def test_optimisation_lowers_the_loss() -> None:
    teacher = make_tiny_yolo()
    synth = _synth(teacher, stages=[Stage(64, 60, lr=0.05)], augment=AugmentationPipeline(jitter=0, flip=0,
                   brightness=0, contrast=0, erase=0))
    result = synth.run(onebox_targets(2), generator=torch.Generator().manual_seed(0))
    assert result.history[-1]["total"] < 0.8 * result.history[0]["total"]


def test_coarse_to_fine_upsamples_images_and_scales_targets() -> None:
    teacher = make_tiny_yolo()
    targets = onebox_targets(2, size=32)
    synth = _synth(teacher, stages=[Stage(32, 5, lr=0.1), Stage(64, 5, lr=0.01, loss={"first_bn_weight": 0.0})])
    result = synth.run(targets, generator=torch.Generator().manual_seed(0))
    assert result.images.shape[-2:] == (64, 64)
    for before, after in zip(targets, result.targets, strict=True):
        torch.testing.assert_close(after["boxes"], before["boxes"] * 2)
        assert torch.equal(after["labels"], before["labels"])
    assert {h["stage"] for h in result.history} == {0, 1}


def test_teacher_stays_frozen_and_hooks_are_removed() -> None:
    teacher = make_tiny_yolo()
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    _synth(teacher).run(onebox_targets(2), generator=torch.Generator().manual_seed(0))
    assert all(p.grad is None and not p.requires_grad for p in teacher.model.parameters())
    after = teacher.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not m._forward_hooks for m in teacher.model.modules())


def test_result_depends_only_on_the_generator() -> None:
    teacher = make_tiny_yolo()
    synth = _synth(teacher, stages=[Stage(64, 8, lr=0.1)])
    a = synth.run(onebox_targets(2), generator=torch.Generator().manual_seed(3))
    b = synth.run(onebox_targets(2), generator=torch.Generator().manual_seed(3))
    c = synth.run(onebox_targets(2), generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.images, b.images)
    assert not torch.equal(a.images, c.images)


def test_non_finite_loss_names_iteration_and_term() -> None:
    teacher = make_tiny_yolo()
    teacher.model.bn_layers()[2].running_var.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"iteration 1: term\(s\) .*'bn'"):
        _synth(teacher).run(onebox_targets(2), generator=torch.Generator().manual_seed(0))


def test_false_positive_sampling_appends_teacher_detections(monkeypatch: pytest.MonkeyPatch) -> None:
    teacher = make_tiny_yolo()
    fixed = {"boxes": torch.tensor([[2.0, 2.0, 20.0, 20.0]]), "scores": torch.tensor([0.9]),
             "labels": torch.tensor([2])}
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    monkeypatch.setattr(teacher, "predict", lambda images, conf=0.25, iou=0.45: [fixed, empty][: len(images)])
    targets = [{"boxes": torch.tensor([[40.0, 40.0, 60.0, 60.0]]), "labels": torch.tensor([0])}] * 2
    synth = _synth(teacher, stages=[Stage(64, 6, lr=0.1)], fp_sampling=FPSampling(warmup=2, every=100))
    result = synth.run(targets, generator=torch.Generator().manual_seed(0))
    assert len(result.targets[0]["boxes"]) == 2 and result.targets[0]["labels"].tolist() == [0, 2]
    assert len(result.targets[1]["boxes"]) == 1


def test_bad_targets_and_options_raise() -> None:
    teacher = make_tiny_yolo()
    synth = _synth(teacher)
    with pytest.raises(ValueError, match="class id 7"):
        synth.run([{"boxes": torch.tensor([[1.0, 1.0, 9.0, 9.0]]), "labels": torch.tensor([7])}])
    with pytest.raises(ValueError, match="box 0"):
        synth.run([{"boxes": torch.tensor([[9.0, 1.0, 1.0, 9.0]]), "labels": torch.tensor([0])}])
    with pytest.raises(ValueError, match="iterations"):
        Stage(64, 0)
    with pytest.raises(ValueError, match="min_lr"):
        Stage(64, 10, lr=0.1, min_lr=0.2)
    with pytest.raises(ValueError, match="init"):
        Synthesizer(teacher, init="zeros")


def test_reference_stages_follow_the_recipe() -> None:
    s1, s2 = reference_stages()
    assert (s1.size, s1.iterations, s1.lr, s1.min_lr, s1.betas) == ((160, 160), 2500, 0.2, 0.0, (0.0, 0.0))
    assert (s2.size, s2.iterations, s2.lr, s2.min_lr) == ((320, 320), 1500, 0.002, 0.0005)
    assert s2.loss == {"first_bn_weight": 0.0, "num_bn_layers": 51 / 72, "w_task": 1.0}
    assert s1.lr_at(0) == pytest.approx(0.2) and s1.lr_at(2499) == pytest.approx(0.0, abs=1e-12)
    assert s2.lr_at(1499) == pytest.approx(0.0005)


def test_stage_rejects_unknown_loss_options_up_front() -> None:
    with pytest.raises(ValueError, match="unknown DeepInversionLoss option.*w_tv"):
        Stage(64, 10, loss={"w_tv": 1.0})


@pytest.mark.slow  # torch.compile takes over a minute on 2 CPU cores
def test_compiled_teacher_gives_the_eager_loss() -> None:
    """``compile=True`` (inductor; about 40 s on CPU) with the fused BatchNorm forward of the loss."""
    targets = onebox_targets(2)
    runs = []
    for compile_ in (True, False):
        synth = Synthesizer(make_tiny_yolo(), stages=[Stage(64, 2, lr=0.1)], log_every=1, compile=compile_)
        runs.append(synth.run(targets, generator=torch.Generator().manual_seed(0)))
    compiled, eager = runs
    assert compiled.history[0]["total"] == pytest.approx(eager.history[0]["total"], rel=1e-4)
    assert torch.isfinite(compiled.images).all()


def test_autocast_bf16_and_channels_last_run_on_cpu() -> None:
    teacher = make_tiny_yolo()
    synth = _synth(teacher, stages=[Stage(64, 4, lr=0.1)], amp="bf16", channels_last=True)
    assert synth.amp_dtype == torch.bfloat16
    result = synth.run(onebox_targets(2), generator=torch.Generator().manual_seed(0))
    assert result.images.dtype == torch.float32 and torch.isfinite(result.images).all()
    assert all(torch.isfinite(torch.tensor(h["total"])) for h in result.history)
    with pytest.raises(ValueError, match="amp"):
        Synthesizer(teacher, amp="fp8")


def test_the_callers_model_is_never_changed() -> None:
    teacher = make_tiny_yolo()
    teacher.model.train().requires_grad_(True)
    state = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    dicts = [set(m.__dict__) for m in teacher.model.modules()]
    synth = Synthesizer(teacher, stages=[Stage(64, 2, lr=0.1)], channels_last=True)
    synth.run(onebox_targets(2), generator=torch.Generator().manual_seed(0))
    assert teacher.model.training and all(p.requires_grad for p in teacher.model.parameters())
    assert all(p.is_contiguous() for p in teacher.model.parameters())
    assert all(torch.equal(v, teacher.model.state_dict()[k]) for k, v in state.items())
    assert [set(m.__dict__) for m in teacher.model.modules()] == dicts
    assert synth.loss.teacher is not teacher and synth.loss.teacher.model is not teacher.model


def test_extra_loss_terms_are_logged_with_the_builtin_ones() -> None:
    teacher = make_tiny_yolo()
    loss = DeepInversionLoss(teacher, terms={"dark": (0.5, lambda images, raw, targets: images.mean())})
    result = Synthesizer(teacher, loss=loss, stages=[Stage(64, 2, lr=0.1)], log_every=1).run(
        onebox_targets(2), generator=torch.Generator().manual_seed(0))
    assert all("dark" in h and "task" in h for h in result.history)
    assert "dark" in result.metrics


def test_stage_loss_scale_multiplies_the_synthesizers_weights() -> None:
    teacher = make_tiny_yolo()
    loss = DeepInversionLoss(teacher, w_task=0.5, w_tv1=10.0)
    scaled = Stage(64, 2, loss={"w_tv1": 2.0}, loss_scale={"w_task": 4.0, "w_tv1": 3.0}).loss_for(loss)
    assert (scaled.w_task, scaled.w_tv1, scaled.w_bn) == (2.0, 6.0, loss.w_bn)
    assert Stage(64, 2).loss_for(loss) is loss
    for bad in ({"num_bn_layers": 2.0}, {"w_task": -1.0}, {"w_task": float("nan")}, {"w_tsk": 2.0}):
        with pytest.raises(ValueError, match="w_tsk|loss_scale"):
            Stage(64, 2, loss_scale=bad)


def test_stage_loss_scale_changes_the_optimised_objective() -> None:
    teacher = make_tiny_yolo()
    totals = []
    for factor in (1.0, 3.0):
        synth = Synthesizer(teacher, stages=[Stage(64, 1, lr=0.1, loss_scale={"w_task": factor})], log_every=1)
        result = synth.run(onebox_targets(2), generator=torch.Generator().manual_seed(0))
        totals.append(result.history[0])
    one, three = totals
    assert one["task"] == pytest.approx(three["task"])
    assert three["total"] - one["total"] == pytest.approx(2 * synth.loss.w_task * one["task"], rel=1e-4)


def test_fast_stages_split_the_budget_coarse_to_fine() -> None:
    coarse, fine = fast_stages(200)
    assert (coarse.size, coarse.iterations, coarse.lr) == ((80, 80), 100, 0.2)
    assert (fine.size, fine.iterations, fine.lr) == ((160, 160), 100, FAST_FINE_LR)
    assert coarse.loss_scale == fine.loss_scale == {"w_task": FAST_TASK_SCALE}
    assert [s.iterations for s in fast_stages(625, (96, 128), coarse_fraction=0.8)] == [500, 125]
    assert fast_stages(625, (96, 128))[0].size == (48, 64)
    (single,) = fast_stages(50, coarse_fraction=0.0, lr=0.1)
    assert (single.size, single.iterations, single.lr) == ((160, 160), 50, 0.1)
    with pytest.raises(ValueError, match="iterations"):
        fast_stages(1)
    with pytest.raises(ValueError, match="coarse_fraction"):
        fast_stages(200, coarse_fraction=1.0)


def test_fast_stages_run_and_return_full_resolution_images() -> None:
    teacher = make_tiny_yolo()
    targets = onebox_targets(2, size=32)
    result = Synthesizer(teacher, stages=fast_stages(6, 64), log_every=3).run(
        targets, generator=torch.Generator().manual_seed(0))
    assert result.images.shape == (2, 3, 64, 64) and result.metrics["iterations"] == 6
    torch.testing.assert_close(result.targets[0]["boxes"], targets[0]["boxes"] * 2)


def test_cli_recipe_option_picks_the_schedule() -> None:
    from diode.cli import _stages_from_args, build_parser

    base = ["synthesize", "--teacher", "yolov3-tiny", "--out", "x", "--num-images", "4", "--batch-size", "4",
            "--iterations", "200"]
    default = _stages_from_args(build_parser().parse_args(base))
    assert [(s.size, s.iterations, s.lr) for s in default] == [(s.size, s.iterations, s.lr) for s in fast_stages(200)]
    (reference,) = _stages_from_args(build_parser().parse_args([*base, "--recipe", "reference", "--lr", "0.1"]))
    assert (reference.size, reference.iterations, reference.lr, reference.loss_scale) == ((160, 160), 200, 0.1, {})


def test_stages_file_reads_loss_scale_and_the_schedule_files_load(tmp_path: Path) -> None:
    from diode.cli import load_stages

    path = tmp_path / "s.toml"
    path.write_text("[[stage]]\nresolution = 80\niterations = 10\n[stage.loss_scale]\nw_task = 4.0\n")
    (stage,) = load_stages(path)
    assert stage.loss_scale == {"w_task": 4.0}
    schedules = Path(__file__).resolve().parents[1] / "benchmarks" / "schedules"
    default = [(s.size, s.iterations, s.lr, s.betas, s.loss_scale) for s in fast_stages(200)]
    assert [(s.size, s.iterations, s.lr, s.betas, s.loss_scale)
            for s in load_stages(schedules / "c2f_sign_task8.toml")] == default
    assert all(load_stages(f) for f in schedules.glob("*.toml"))
