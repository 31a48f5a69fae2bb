from __future__ import annotations

import pytest
import torch
from torch import nn

from diode.models.yolov8 import blocks
from diode.models.yolov8.boxes import dfl_expectation

X = torch.randn(2, 16, 12, 10, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("block", "channels", "size"),
    [
        (blocks.Conv(16, 24, 3, 2), 24, (6, 5)),
        (blocks.Conv(16, 24, 1), 24, (12, 10)),
        (blocks.dw_conv(16, 16, 3, 2), 16, (6, 5)),
        (blocks.Bottleneck(16, 16), 16, (12, 10)),
        (blocks.Bottleneck(16, 8, k=(1, 3)), 8, (12, 10)),
        (blocks.C2f(16, 32, n=2, shortcut=True), 32, (12, 10)),
        (blocks.C3(16, 32, n=2), 32, (12, 10)),
        (blocks.C3k(16, 32, n=2, k=5), 32, (12, 10)),
        (blocks.C3k2(16, 32, n=2, c3k=False, e=0.25), 32, (12, 10)),
        (blocks.C3k2(16, 32, n=1, c3k=True), 32, (12, 10)),
        (blocks.SPPF(16, 24, 5), 24, (12, 10)),
        (blocks.SCDown(16, 32, 3, 2), 32, (6, 5)),
        (blocks.Attention(16, num_heads=2), 16, (12, 10)),
        (blocks.PSA(16, 16), 16, (12, 10)),
        (blocks.PSABlock(16, num_heads=2), 16, (12, 10)),
        (blocks.C2PSA(16, 16, n=2), 16, (12, 10)),
        (blocks.RepVGGDW(16), 16, (12, 10)),
        (blocks.CIB(16, 16, lk=False), 16, (12, 10)),
        (blocks.CIB(16, 24, lk=True), 24, (12, 10)),
        (blocks.C2fCIB(16, 32, n=2, shortcut=True, lk=True), 32, (12, 10)),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else None,
)
def test_block_output_shape(block: nn.Module, channels: int, size: tuple[int, int]) -> None:
    out = block.eval()(X)
    assert out.shape == (2, channels, *size)
    assert torch.isfinite(out).all()


def test_conv_is_conv_bn_silu_with_the_family_bn_settings() -> None:
    conv = blocks.Conv(16, 8, 3)
    assert conv.conv.bias is None and conv.conv.padding == (1, 1)
    assert (conv.bn.eps, conv.bn.momentum) == (1e-3, 0.03)
    assert isinstance(conv.act, nn.SiLU)
    assert isinstance(blocks.Conv(16, 8, act=False).act, nn.Identity)
    conv.eval()
    torch.testing.assert_close(conv(X), nn.functional.silu(conv.bn(conv.conv(X))))


def test_bottleneck_residual_only_when_shapes_match() -> None:
    assert blocks.Bottleneck(16, 16).add and not blocks.Bottleneck(16, 16, shortcut=False).add
    assert not blocks.Bottleneck(16, 8).add
    b = blocks.Bottleneck(16, 16).eval()
    torch.testing.assert_close(b(X), X + b.cv2(b.cv1(X)))


def test_c2f_chains_bottlenecks_on_the_last_piece() -> None:
    c2f = blocks.C2f(16, 32, n=2).eval()
    a, b = c2f.cv1(X).chunk(2, 1)
    y1 = c2f.m[0](b)
    y2 = c2f.m[1](y1)
    torch.testing.assert_close(c2f(X), c2f.cv2(torch.cat((a, b, y1, y2), 1)))
    assert c2f.cv2.conv.in_channels == (2 + 2) * 16


def test_repvggdw_sums_two_depthwise_branches() -> None:
    r = blocks.RepVGGDW(16).eval()
    torch.testing.assert_close(r(X), nn.functional.silu(r.conv(X) + r.conv1(X)))
    assert r.conv.conv.kernel_size == (7, 7) and r.conv.conv.groups == 16


def test_psa_and_attention_channel_checks() -> None:
    with pytest.raises(ValueError, match="keeps the channel count"):
        blocks.PSA(16, 32)
    with pytest.raises(ValueError, match="keeps the channel count"):
        blocks.C2PSA(16, 32)
    with pytest.raises(ValueError, match="num_heads"):
        blocks.Attention(16, num_heads=3)


def test_attention_mixes_positions() -> None:
    """A change at one position reaches every other position (global attention)."""
    att = blocks.Attention(16, num_heads=2).eval()
    x2 = X.clone()
    x2[:, :, 0, 0] += 5.0
    changed = (att(x2) - att(X)).abs().sum(1) > 1e-6
    assert changed[:, 6:, 6:].all()


def test_concat_and_dfl() -> None:
    assert blocks.Concat(1)([X, X[:, :3]]).shape == (2, 19, 12, 10)
    dfl = blocks.DFL(16)
    assert not dfl.conv.weight.requires_grad
    torch.testing.assert_close(dfl.conv.weight.flatten(), torch.arange(16.0))
    logits = torch.randn(2, 64, 7)
    torch.testing.assert_close(dfl(logits), dfl_expectation(logits, 16))


def _levels() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 32, 4, 4, generator=g)]


def test_detect_raw_output_layout() -> None:
    head = blocks.Detect(nc=5, ch=(16, 32), reg_max=16).eval()
    out = head(_levels())
    assert isinstance(out, list) and [o.shape for o in out] == [(2, 69, 8, 8), (2, 69, 4, 4)]
    x = _levels()
    torch.testing.assert_close(out[0][:, :64], head.cv2[0](x[0]))
    torch.testing.assert_close(out[0][:, 64:], head.cv3[0](x[0]))
    # legacy (v8) class branch: two 3x3 convs; otherwise depthwise + pointwise pairs
    assert head.cv3[0][0].conv.kernel_size == (3, 3) and head.cv3[0][0].conv.groups == 1
    light = blocks.Detect(nc=5, ch=(16, 32), legacy=False)
    assert light.cv3[0][0][0].conv.groups == 16 and light.cv3[0][0][1].conv.kernel_size == (1, 1)
    with pytest.raises(ValueError, match="input channels"):
        blocks.Detect(nc=5, ch=())


def test_v10detect_two_branches_and_detached_one2one_in_training() -> None:
    head = blocks.v10Detect(nc=5, ch=(16, 32)).eval()
    x = [t.requires_grad_() for t in _levels()]
    out = head(x)
    assert set(out) == {"one2many", "one2one"}
    assert [o.shape for o in out["one2one"]] == [(2, 69, 8, 8), (2, 69, 4, 4)]
    out["one2one"][0].sum().backward()
    assert x[0].grad is not None and x[0].grad.abs().sum() > 0  # eval: both branches pass gradients
    head.train()
    x = [t.detach().requires_grad_() for t in _levels()]
    head(x)["one2one"][0].sum().backward()
    assert x[0].grad is None  # training: the one-to-one branch reads detached features
    assert head.end2end and not blocks.Detect.end2end


def test_bias_init_needs_strides_and_sets_priors() -> None:
    head = blocks.v10Detect(nc=4, ch=(16, 32))
    with pytest.raises(ValueError, match="stride"):
        head.bias_init()
    head.stride = (8.0, 16.0)
    head.bias_init()
    assert torch.all(head.one2one_cv2[1][-1].bias == 1.0)
    expected = torch.log(torch.tensor(5 / 4 / (640 / 16) ** 2))
    torch.testing.assert_close(head.cv3[1][-1].bias, expected.expand(4))
