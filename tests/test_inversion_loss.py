from __future__ import annotations

import pytest
import torch
from conftest import TinyBNAdapter
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from diode.inversion.loss import DeepInversionLoss, tv_losses


def _targets(n: int) -> list[dict[str, torch.Tensor]]:
    return [{"boxes": torch.tensor([[2.0, 2.0, 10.0, 12.0]]), "labels": torch.tensor([1])} for _ in range(n)]


def test_bn_term_is_zero_when_batch_statistics_match_running_ones() -> None:
    adapter = TinyBNAdapter()
    loss = DeepInversionLoss(adapter)
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    # Layer by layer (downstream inputs depend on upstream running stats in eval mode).
    for i, layer in enumerate(loss.bn_layers):
        with loss.hooks() as stats:
            adapter.forward(x)
        var, mean = stats[i][0]
        with torch.no_grad():
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)
    with loss.hooks() as stats:
        adapter.forward(x)
    bn, per_layer = loss.bn_term(stats)
    assert bn.item() == pytest.approx(0.0, abs=1e-5)
    assert per_layer.shape == (2,)


def test_bn_term_is_plain_l2_norm_with_first_layer_weight() -> None:
    adapter = TinyBNAdapter()
    x = torch.rand(2, 3, 8, 8)
    loss = DeepInversionLoss(adapter, first_bn_weight=3.0)
    with loss.hooks() as stats:
        adapter.forward(x)
    bn, per_layer = loss.bn_term(stats)
    first = adapter.model[1]
    conv_out = adapter.model[0](x)
    var, mean = torch.var_mean(conv_out, dim=(0, 2, 3), unbiased=False)
    expected0 = torch.linalg.norm(mean - first.running_mean) + torch.linalg.norm(var - first.running_var)
    assert per_layer[0].item() == pytest.approx(expected0.item(), rel=1e-5)
    assert bn.item() == pytest.approx(3.0 * per_layer[0].item() + per_layer[1].item(), rel=1e-5)


def test_num_bn_layers_limits_the_term() -> None:
    loss = DeepInversionLoss(TinyBNAdapter(), num_bn_layers=1)
    _, parts = loss(torch.rand(2, 3, 8, 8), _targets(2))
    assert parts["bn_layers"].shape == (1,)


def test_total_combines_weighted_terms_and_parts_are_detached() -> None:
    adapter = TinyBNAdapter()
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    loss = DeepInversionLoss(adapter, w_task=0.5, w_bn=0.1, w_tv1=75.0, w_tv2=2.0, w_l2=0.3)
    total, parts = loss(x, _targets(2))
    expected = (0.5 * parts["task"] + 0.1 * parts["bn"] + 75 * parts["tv_l1"] + 2.0 * parts["tv_l2"]
                + 0.3 * parts["l2"])
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert all(not v.requires_grad for v in parts.values())
    total.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_tv_losses_zero_on_constant_and_match_definition() -> None:
    l1, l2 = tv_losses(torch.full((1, 3, 5, 5), 0.3))
    assert l1.item() == 0 and l2.item() == 0
    x = torch.zeros(1, 1, 2, 2)
    x[0, 0, 0, 0] = 1.0
    l1, l2 = tv_losses(x)
    # horizontal: 1 of 2 diffs, vertical: 1 of 2, diagonal: 0 of 1, anti-diagonal: 1 of 1
    assert l1.item() == pytest.approx(0.5 + 0.5 + 0.0 + 1.0)
    assert l2.item() == pytest.approx(1 + 1 + 0 + 1)


def test_tv_gradcheck() -> None:
    x = torch.rand(1, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: tv_losses(t)[1], (x,))
    assert torch.autograd.gradcheck(lambda t: tv_losses(t)[0], (x,))
    assert torch.autograd.gradcheck(lambda t: 3 * tv_losses(t)[0] + 0.5 * tv_losses(t)[1], (x,))


def _tv_reference(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    diffs = (images[..., :, :-1] - images[..., :, 1:], images[..., :-1, :] - images[..., 1:, :],
             images[..., 1:, :-1] - images[..., :-1, 1:], images[..., :-1, :-1] - images[..., 1:, 1:])
    return sum(d.abs().mean() for d in diffs), sum(torch.linalg.vector_norm(d) for d in diffs)  # type: ignore[return-value]


@pytest.mark.parametrize("channels_last", [False, True])
def test_tv_values_and_gradients_match_autograd_reference(channels_last: bool) -> None:
    x = torch.rand(2, 3, 7, 9, generator=torch.Generator().manual_seed(0))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for w1, w2 in ((1.0, 0.0), (0.0, 2.0), (75.0, 0.5)):
        a = x.clone().requires_grad_(True)
        b = x.clone().requires_grad_(True)
        l1, l2 = tv_losses(a)
        r1, r2 = _tv_reference(b)
        torch.testing.assert_close((l1, l2), (r1, r2))
        terms = [w * t for w, t in ((w1, l1), (w2, l2)) if w > 0]
        (ga,) = torch.autograd.grad(sum(terms), a)
        (gb,) = torch.autograd.grad(w1 * r1 + w2 * r2, b)
        torch.testing.assert_close(ga, gb)


def test_hooks_are_removed_even_when_forward_raises() -> None:
    adapter = TinyBNAdapter()
    loss = DeepInversionLoss(adapter)
    with pytest.raises(RuntimeError, match="boom"), loss.hooks():
        raise RuntimeError("boom")
    assert all(not m._forward_hooks and not m._forward_pre_hooks and "forward" not in m.__dict__
               for m in adapter.model.modules())
    loss(torch.rand(1, 3, 8, 8), _targets(1))
    assert all(not m._forward_hooks and not m._forward_pre_hooks and "forward" not in m.__dict__
               for m in adapter.model.modules())


def test_model_without_batchnorm_is_rejected() -> None:
    adapter = TinyBNAdapter()
    adapter.model = nn.Sequential(nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="no BatchNorm"):
        DeepInversionLoss(adapter)


@pytest.mark.parametrize("norm", [FrozenBatchNorm2d, nn.SyncBatchNorm])
def test_other_batchnorm_kinds(norm: type[nn.Module]) -> None:
    adapter = TinyBNAdapter(norm=norm)
    total, parts = DeepInversionLoss(adapter)(torch.rand(2, 3, 8, 8), _targets(2))
    assert torch.isfinite(total) and parts["bn_layers"].shape == (2,)


def test_replace_changes_weights_and_validates() -> None:
    loss = DeepInversionLoss(TinyBNAdapter())
    stage2 = loss.replace(first_bn_weight=0.0, w_task=1.0)
    assert stage2.first_bn_weight == 0.0 and stage2.w_task == 1.0 and loss.first_bn_weight == 2.0
    with pytest.raises(ValueError, match="unknown"):
        loss.replace(w_bogus=1.0)
    with pytest.raises(ValueError, match="w_bn"):
        DeepInversionLoss(TinyBNAdapter(), w_bn=-1.0)


def test_channel_stats_match_var_mean_and_gradcheck() -> None:
    from diode.inversion.loss import channel_stats

    x = torch.randn(3, 4, 5, 6, dtype=torch.float64) * 3 + 2
    var, mean = channel_stats(x)
    ref_var, ref_mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(var, ref_var)
    var16, mean16 = channel_stats(x.to(torch.bfloat16))
    assert var16.dtype == mean16.dtype == torch.float32
    x64 = torch.randn(2, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(channel_stats, (x64,))
    for shape in ((6, 4), (3, 4, 5), (2, 4, 3, 2, 2)):  # BatchNorm1d without and with length, BatchNorm3d
        y = torch.randn(shape, dtype=torch.float64)
        dims = (0, *range(2, y.ndim))
        torch.testing.assert_close(channel_stats(y), torch.var_mean(y, dim=dims, correction=0))
        assert torch.autograd.gradcheck(channel_stats, (y.requires_grad_(True),))


def test_channel_stats_stay_accurate_when_the_mean_dwarfs_the_spread() -> None:
    from diode.inversion.loss import channel_stats

    # E[x^2] - mean^2 in float32 would lose the variance entirely here (1e6 against 1e-4).
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.01 + 1000
    var, mean = channel_stats(x)
    ref_var, ref_mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(var.double(), ref_var, rtol=0.05, atol=0.0)
    torch.testing.assert_close(mean.double(), ref_mean)


def _loss_and_grad(loss: DeepInversionLoss, x: torch.Tensor, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    import diode.inversion.loss as loss_module

    original = loss_module._fusable
    if not fused:
        loss_module._fusable = lambda layer: False
    try:
        x = x.detach().clone().requires_grad_(True)
        with loss.hooks():
            total, _ = loss(x, _targets(len(x)))
        (grad,) = torch.autograd.grad(total, x)
    finally:
        loss_module._fusable = original
    return total.detach(), grad


@pytest.mark.parametrize("norm", [nn.BatchNorm2d, FrozenBatchNorm2d, nn.SyncBatchNorm])
def test_fused_batchnorm_forward_matches_hooked_batchnorm(norm: type[nn.Module]) -> None:
    adapter = TinyBNAdapter(norm=norm)
    g = torch.Generator().manual_seed(3)
    loss = DeepInversionLoss(adapter, w_tv1=0.0)
    x = torch.rand(3, 3, 12, 12, generator=g)
    fused_total, fused_grad = _loss_and_grad(loss, x, fused=True)
    plain_total, plain_grad = _loss_and_grad(loss, x, fused=False)
    torch.testing.assert_close(fused_total, plain_total)
    torch.testing.assert_close(fused_grad, plain_grad)


def test_fused_batchnorm_gradcheck() -> None:
    from diode.inversion.loss import _AffineWithStats

    x = torch.randn(2, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    scale, shift = torch.rand(1, 3, 1, 1, dtype=torch.float64) + 0.5, torch.randn(1, 3, 1, 1, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: _AffineWithStats.apply(t, scale, shift), (x,))
    # Only some outputs used (the others' gradients arrive as None).
    assert torch.autograd.gradcheck(lambda t: _AffineWithStats.apply(t, scale, shift)[0], (x,))
    assert torch.autograd.gradcheck(lambda t: _AffineWithStats.apply(t, scale, shift)[2], (x,))
    assert torch.autograd.gradcheck(lambda t: _AffineWithStats.apply(t, scale, shift)[1], (x,))


def test_vectorized_bn_term_matches_per_layer_norms_in_value_and_gradient() -> None:
    adapter = TinyBNAdapter()
    adapter.model.double()
    loss = DeepInversionLoss(adapter, first_bn_weight=1.5)
    layers = loss.bn_layers
    with torch.no_grad():
        for layer in layers:
            layer.running_mean.uniform_(-1, 1)
            layer.running_var.uniform_(0.5, 2)

    def term(x: torch.Tensor) -> torch.Tensor:
        with loss.hooks() as stats:
            adapter.forward(x)
        return loss.bn_term(stats)[0]

    def reference(x: torch.Tensor) -> torch.Tensor:
        inputs = []
        hooks = [layer.register_forward_pre_hook(lambda m, a: inputs.append(a[0])) for layer in layers]
        adapter.forward(x)
        for h in hooks:
            h.remove()
        total = torch.zeros((), dtype=x.dtype)
        for i, (layer, inp) in enumerate(zip(layers, inputs, strict=True)):
            var, mean = torch.var_mean(inp, dim=(0, 2, 3), correction=0)
            value = (torch.linalg.vector_norm(mean - layer.running_mean)
                     + torch.linalg.vector_norm(var - layer.running_var))
            total = total + (1.5 if i == 0 else 1.0) * value
        return total

    x = torch.rand(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(term(x), reference(x))
    torch.testing.assert_close(torch.autograd.grad(term(x), x)[0], torch.autograd.grad(reference(x), x)[0])
    assert torch.autograd.gradcheck(term, (x,))


def test_batchnorm_in_training_mode_or_with_own_forward_is_hooked_not_fused() -> None:
    class CustomBN(nn.BatchNorm2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    adapter = TinyBNAdapter()
    adapter.model[4] = CustomBN(8).eval()
    adapter.model[1].train()  # normalizes with batch statistics: the fused eval form would be wrong
    loss = DeepInversionLoss(adapter)
    x = torch.rand(2, 3, 8, 8)
    expected = adapter.forward(x)
    with loss.hooks() as stats:
        assert adapter.model[4]._forward_hooks and not adapter.model[4]._forward_pre_hooks
        assert adapter.model[1]._forward_pre_hooks  # stock layer: fused path (it switches per call)
        out = adapter.forward(x)
    torch.testing.assert_close(out, expected)
    var, mean = torch.var_mean(adapter.model[0](x), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(stats[0][0], (var, mean))
    assert len(stats[1]) == 1
    assert all("forward" not in m.__dict__ and not m._forward_hooks for m in adapter.model.modules())


class _SharedBN(nn.Module):
    """One BatchNorm layer called on two feature maps (a head shared across FPN levels)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(4).eval()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.bn(self.conv_a(x)), self.bn(self.conv_b(x))]


class _SharedAdapter:
    def __init__(self) -> None:
        self.model = _SharedBN()
        self.num_classes, self.class_names, self.size_divisor = 1, ["a"], 1
        with torch.no_grad():
            self.model.bn.running_mean.fill_(0.3)
            self.model.bn.running_var.fill_(2.0)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.model(images)

    def task_loss(self, raw, targets, *, generator=None):  # noqa: ANN001, ANN201
        return sum(r.sum() for r in raw) * 0

    def predict(self, images, *, conf=0.25, iou=0.45):  # noqa: ANN001, ANN201
        return []

    def bn_layers(self) -> list[nn.Module]:
        return [self.model.bn]

    def synthesis_defaults(self) -> dict[str, float]:
        return {}


@pytest.mark.parametrize("fused", [True, False])
def test_shared_layer_contributes_every_call_with_gradient_through_both(fused: bool) -> None:
    import diode.inversion.loss as loss_module

    adapter = _SharedAdapter()
    loss = DeepInversionLoss(adapter, w_task=0.0, w_tv1=0.0)
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    original = loss_module._fusable
    loss_module._fusable = original if fused else (lambda layer: False)
    try:
        with loss.hooks() as stats:
            total, parts = loss(x, [])
            assert len(stats[0]) == 2
    finally:
        loss_module._fusable = original
    model = adapter.model
    rm, rv = model.bn.running_mean, model.bn.running_var
    per_call = []
    for conv in (model.conv_a, model.conv_b):
        var, mean = torch.var_mean(conv(x), dim=(0, 2, 3), correction=0)
        per_call.append(torch.linalg.vector_norm(mean - rm) + torch.linalg.vector_norm(var - rv))
    torch.testing.assert_close(parts["bn_layers"][0], (per_call[0] + per_call[1]).detach() / 2)
    grads = torch.autograd.grad(total, [model.conv_a.weight, model.conv_b.weight], allow_unused=True)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_hooks_leave_every_module_dict_as_it_was_also_after_an_exception() -> None:
    import copy

    adapter = TinyBNAdapter()
    adapter.model[4] = FrozenBatchNorm2d(8)
    before = [copy.copy(m.__dict__) for m in adapter.model.modules()]
    snapshot = [{k: (dict(v) if isinstance(v, dict) else v) for k, v in d.items()} for d in before]
    loss = DeepInversionLoss(adapter)
    loss(torch.rand(2, 3, 8, 8), _targets(2))
    with pytest.raises(RuntimeError, match="boom"), loss.hooks():
        adapter.forward(torch.rand(1, 3, 8, 8))
        raise RuntimeError("boom")
    after = [{k: (dict(v) if isinstance(v, dict) else v) for k, v in m.__dict__.items()}
             for m in adapter.model.modules()]
    assert after == snapshot


def test_user_hooks_on_a_fused_layer_see_the_real_output() -> None:
    adapter = TinyBNAdapter()
    seen: list[torch.Size] = []
    handle = adapter.model[1].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    loss = DeepInversionLoss(adapter)
    loss(torch.rand(2, 3, 8, 8), _targets(2))
    handle.remove()
    assert seen == [torch.Size([2, 8, 8, 8])]


def test_options_come_from_the_adapter_then_explicit_arguments() -> None:
    adapter = TinyBNAdapter()
    adapter.synthesis_defaults = lambda: {"w_tv1": 5.0, "w_bn": 0.3}  # type: ignore[method-assign]
    loss = DeepInversionLoss(adapter, w_bn=0.7)
    assert (loss.w_tv1, loss.w_bn, loss.w_task) == (5.0, 0.7, 0.5)
    adapter.synthesis_defaults = lambda: {"w_bogus": 1.0}  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="w_bogus"):
        DeepInversionLoss(adapter)


def test_num_bn_layers_as_a_fraction() -> None:
    adapter = TinyBNAdapter()
    assert len(DeepInversionLoss(adapter, num_bn_layers=0.5).bn_layers) == 1
    assert len(DeepInversionLoss(adapter, num_bn_layers=1.0).bn_layers) == 2
    with pytest.raises(ValueError, match="fraction"):
        DeepInversionLoss(adapter, num_bn_layers=1.5)


def test_extra_terms_are_weighted_logged_and_validated() -> None:
    adapter = TinyBNAdapter()
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    calls: list[tuple[int, int]] = []

    def brightness(images: torch.Tensor, raw: torch.Tensor, targets: list) -> torch.Tensor:
        calls.append((images.shape[0], raw.shape[1]))
        return images.mean()

    base = DeepInversionLoss(adapter, w_tv1=0.0)
    loss = DeepInversionLoss(adapter, w_tv1=0.0, terms={"bright": (2.0, brightness)})
    total, parts = loss(x, _targets(2))
    plain, _ = base(x, _targets(2))
    torch.testing.assert_close(total, plain + 2.0 * x.mean())
    assert parts["bright"] == pytest.approx(x.mean().item()) and calls == [(2, 3)]
    assert "bright" in loss.replace(w_bn=0.2).terms
    with pytest.raises(ValueError, match="taken"):
        DeepInversionLoss(adapter, terms={"bn": (1.0, brightness)})
    with pytest.raises(ValueError, match="weight"):
        DeepInversionLoss(adapter, terms={"b": (-1.0, brightness)})


def test_private_hooks_run_the_fused_node_as_the_instance_forward_and_match_the_hooked_path() -> None:
    import copy

    adapter = TinyBNAdapter()
    adapter.model[4] = FrozenBatchNorm2d(8)
    def snapshot() -> list[dict]:
        return [{k: (dict(v) if isinstance(v, dict) else v) for k, v in m.__dict__.items()}
                for m in adapter.model.modules()]

    before = snapshot()
    loss = DeepInversionLoss(adapter, w_tv1=0.0)
    x = torch.rand(3, 3, 12, 12, generator=torch.Generator().manual_seed(4))
    results = []
    for private in (False, True):
        xi = x.clone().requires_grad_(True)
        with loss.hooks(private=private):
            fused = [m for m in loss.bn_layers if "forward" in m.__dict__]
            hooked = [m for m in loss.bn_layers if m._forward_pre_hooks]
            assert (len(fused), len(hooked)) == ((2, 0) if private else (0, 2))
            total, parts = loss(xi, _targets(3))
        results.append((total.detach(), parts["bn_layers"], torch.autograd.grad(total, xi)[0]))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)
    assert snapshot() == before
    # A layer whose instance already has its own forward is not stock: hooked, never overwritten.
    layer = adapter.model[1]
    own = copy.copy(type(layer).forward).__get__(layer)
    layer.forward = own
    with loss.hooks(private=True):
        assert layer.__dict__["forward"] is own and layer._forward_hooks
    assert layer.__dict__["forward"] is own


def test_synthesizer_runs_its_teacher_copy_on_the_private_path() -> None:
    import diode.inversion.loss as loss_module
    from diode import Stage, Synthesizer

    calls = []
    original = loss_module._fused_forward

    def spy(layer, stats):  # noqa: ANN001, ANN202
        calls.append(layer)
        return original(layer, stats)

    loss_module._fused_forward = spy
    try:
        adapter = TinyBNAdapter()
        synth = Synthesizer(adapter, stages=[Stage(16, 2, lr=0.1)], log_every=2)
        synth.run(_targets(2), generator=torch.Generator().manual_seed(0), image_size=(16, 16))
    finally:
        loss_module._fused_forward = original
    assert len(calls) == 2 and all(layer not in list(adapter.model.modules()) for layer in calls)
