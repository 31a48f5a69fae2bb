from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from diode.models.yolo import Darknet, parse_cfg
from diode.models.yolo.darknet import MaxPoolDarknet

NET = "[net]\nwidth=64\nheight=64\nchannels=3\n"
HEAD = "[yolo]\nmask=0,1\nanchors=4,6, 10,12, 20,30\nclasses=3\n"

# 64x64 input: two heads at stride 32 (2x2) and 16 (4x4), every layer type.
TINY = (
    NET
    + """
[convolutional]
batch_normalize=1
filters=8
size=3
stride=1
pad=1
activation=leaky

[maxpool]
size=2
stride=2

[convolutional]
batch_normalize=1
filters=8
size=3
stride=2
pad=1
activation=leaky

[convolutional]
batch_normalize=1
filters=8
size=1
stride=1
pad=1
activation=leaky

[shortcut]
from=-2
activation=linear

[maxpool]
size=2
stride=2

[convolutional]
batch_normalize=1
filters=16
size=3
stride=2
pad=1
activation=leaky

[maxpool]
size=2
stride=1

[convolutional]
size=1
stride=1
pad=1
filters=16
activation=linear

"""
    + HEAD
    + """
[route]
layers = -3

[upsample]
stride=2

[route]
layers = -1, 5

[convolutional]
size=1
stride=1
pad=1
filters=16
activation=linear

"""
    + HEAD.replace("mask=0,1", "mask=1,2")
)


def _conv(
    filters: int, size: int = 3, stride: int = 1, pad: int = 1, bn: int = 1, act: str = "leaky"
) -> str:
    return (
        f"[convolutional]\nbatch_normalize={bn}\nfilters={filters}\nsize={size}\nstride={stride}\n"
        f"pad={pad}\nactivation={act}\n\n"
    )


def _head_cfg(body: str) -> str:
    """A cfg of ``body`` closed by a 1x1 conv to 2x(5+3) channels and a [yolo]."""
    return NET + body + _conv(16, size=1, bn=0, act="linear") + HEAD


def _darknet_maxpool_reference(x: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    """Darknet's maxpool forward, written out loop by loop (padding = size - 1)."""
    pad = size - 1
    h, w = x.shape[-2:]
    oh, ow = (h + pad - size) // stride + 1, (w + pad - size) // stride + 1
    out = torch.empty(*x.shape[:-2], oh, ow)
    for i in range(oh):
        for j in range(ow):
            best = torch.full(x.shape[:-2], -math.inf)
            for n in range(size):
                for m in range(size):
                    y, xx = i * stride - pad // 2 + n, j * stride - pad // 2 + m
                    if 0 <= y < h and 0 <= xx < w:
                        best = torch.maximum(best, x[..., y, xx])
            out[..., i, j] = best
    return out


@pytest.mark.parametrize(
    ("size", "stride", "hw"),
    [(2, 2, 8), (2, 2, 7), (2, 1, 6), (3, 2, 7), (3, 1, 5), (5, 1, 6), (9, 1, 6), (13, 1, 6)],
)
def test_maxpool_matches_darknet(size: int, stride: int, hw: int):
    x = -torch.rand(1, 2, hw, hw) - 1  # all negative: zero padding would show
    got = MaxPoolDarknet(size, stride, size - 1)(x)
    assert torch.equal(got, _darknet_maxpool_reference(x, size, stride))


@pytest.mark.parametrize("hw", [(8, 7), (7, 8), (2, 2), (1, 4)])
def test_maxpool_size2_stride2_on_mixed_parity_maps(hw: tuple[int, int]):
    x = -torch.rand(1, 2, *hw) - 1
    assert torch.equal(MaxPoolDarknet(2, 2, 1)(x), _darknet_maxpool_reference(x, 2, 2))


def test_layer_shapes_follow_darknet_arithmetic():
    model = Darknet(TINY)
    shapes: dict[int, tuple[int, ...]] = {}
    for i, m in enumerate(model.module_list):
        if model.module_defs[i]["type"] != "route":
            m.register_forward_hook(
                lambda mod, inp, out, i=i: shapes.__setitem__(i, tuple(out.shape))
            )
    heads = model(torch.rand(2, 3, 64, 64))
    assert shapes[0] == (2, 8, 64, 64)  # 3x3 s1 pad=1: same size
    assert shapes[1] == (2, 8, 32, 32)  # maxpool 2/2
    assert shapes[2] == (2, 8, 16, 16)  # 3x3 s2
    assert shapes[4] == (2, 8, 16, 16)  # shortcut
    assert shapes[6] == (2, 16, 4, 4)
    assert shapes[7] == (2, 16, 4, 4)  # maxpool size 2 stride 1 keeps the size
    assert shapes[11] == (2, 16, 8, 8)  # upsample x2
    assert [tuple(h.shape) for h in heads] == [(2, 2, 4, 4, 8), (2, 2, 8, 8, 8)]
    assert model.strides == [16, 8] and model.max_stride == 16
    assert model.num_classes == 3
    assert [a.tolist() for a in model.anchors] == [[[4, 6], [10, 12]], [[10, 12], [20, 30]]]


def test_route_and_shortcut_values():
    body = (
        _conv(8)
        + _conv(4)
        + "[route]\nlayers=-1,0\n\n"
        + _conv(4, bn=0, act="linear")
        + "[shortcut]\nfrom=1\nactivation=linear\n\n"
        + "[route]\nlayers=-2\n\n"
    )
    model = Darknet(_head_cfg(body))
    out: dict[int, torch.Tensor] = {}
    for i, m in enumerate(model.module_list):
        m.register_forward_hook(lambda mod, inp, o, i=i: out.__setitem__(i, o))
    model(torch.rand(1, 3, 64, 64))
    assert torch.equal(out[2], torch.cat([out[1], out[0]], dim=1))  # -1 relative, 0 absolute
    assert out[2].shape[1] == 12
    assert torch.equal(out[4], out[3] + out[1])  # from=1 absolute
    assert torch.equal(out[5], out[3])


def test_spp_block_keeps_size_and_stacks_channels():
    spp = "".join(f"[maxpool]\nsize={s}\nstride=1\n\n[route]\nlayers=-2\n\n" for s in (5, 9))
    body = _conv(8) + spp + "[maxpool]\nsize=13\nstride=1\n\n[route]\nlayers=-1,-3,-5,-6\n\n"
    model = Darknet(_head_cfg(body))
    out: dict[int, torch.Tensor] = {}
    model.module_list[6].register_forward_hook(lambda mod, inp, o: out.__setitem__(6, o))
    model(torch.rand(1, 3, 64, 64))
    assert out[6].shape == (1, 32, 64, 64)
    assert model.module_list[7].Conv2d.in_channels == 32


def test_head_is_a_view_of_the_conv_output():
    model = Darknet(TINY)
    conv_out = {}
    model.module_list[8].register_forward_hook(lambda mod, inp, o: conv_out.__setitem__(0, o))
    head = model(torch.rand(1, 3, 64, 64))[0]
    c = conv_out[0]
    assert torch.equal(head[0, 1, 2, 3, 4], c[0, 1 * 8 + 4, 2, 3])
    assert torch.equal(head.permute(0, 1, 4, 2, 3).reshape(c.shape), c)


def test_conv_blocks_and_state_dict_layout():
    model = Darknet(TINY)
    keys = model.state_dict().keys()
    assert "module_list.0.Conv2d.weight" in keys and "module_list.0.Conv2d.bias" not in keys
    assert {
        f"module_list.0.BatchNorm2d.{k}"
        for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    } <= set(keys)
    assert "module_list.8.Conv2d.bias" in keys and "module_list.8.BatchNorm2d.weight" not in keys
    assert not any("anchors" in k for k in keys)
    block = model.module_list[0]
    assert isinstance(block.leaky, nn.LeakyReLU) and block.leaky.negative_slope == pytest.approx(
        0.1
    )
    assert list(dict(model.module_list[8].named_children())) == ["Conv2d"]
    convs = model.conv_layers()
    assert [c.out_channels for c, _ in convs] == [8, 8, 8, 16, 16, 16]
    assert [bn is None for _, bn in convs] == [False] * 4 + [True] * 2
    assert model.bn_layers() == [bn for _, bn in convs[:4]]
    assert model.input_size == (64, 64)


def test_bn_options():
    model = Darknet(TINY, bn_eps=1e-4, bn_momentum=0.03)
    assert all(bn.eps == 1e-4 and bn.momentum == 0.03 for bn in model.bn_layers())


@pytest.mark.parametrize(
    ("name", "params", "file_bytes", "strides", "bns", "size"),
    [
        ("yolov3-tiny", 8_852_366, 35_434_956, [32, 16], 11, 416),
        ("yolov3", 61_949_149, 248_007_048, [32, 16, 8], 72, 608),
        ("yolov3-spp", 62_998_749, 252_209_544, [32, 16, 8], 73, 608),
    ],
)
def test_bundled_models(
    name: str, params: int, file_bytes: int, strides: list[int], bns: int, size: int
):
    model = Darknet(name)
    assert sum(p.numel() for p in model.parameters()) == params
    running = sum(2 * bn.num_features for bn in model.bn_layers())
    assert 20 + 4 * (params + running) == file_bytes  # the size of darknet's COCO .weights file
    assert model.strides == strides and len(model.bn_layers()) == bns
    assert model.num_classes == 80 and model.input_size == (size, size) and model.cfg_name == name


def test_yolov3_tiny_forward_64():
    model = Darknet("yolov3-tiny").eval()
    with torch.no_grad():
        heads = model(torch.rand(1, 3, 64, 64))
    assert [tuple(h.shape) for h in heads] == [(1, 3, 2, 2, 85), (1, 3, 4, 4, 85)]
    assert [a.tolist() for a in model.anchors] == [
        [[81, 82], [135, 169], [344, 319]],
        [[23, 27], [37, 58], [81, 82]],
    ]


def test_num_classes_override():
    defs = parse_cfg("yolov3-tiny")
    model = Darknet(defs, num_classes=3)
    assert [c.out_channels for c, _ in model.conv_layers()][-1] == 24
    assert model.module_list[15].Conv2d.out_channels == 24
    assert model.num_classes == 3 and model.cfg_name == "<parsed cfg>"
    assert all(d["classes"] == 3 for d in model.module_defs if d["type"] == "yolo")
    assert [d["filters"] for d in defs if d.get("filters") in (24, 255)] == [
        255,
        255,
    ]  # input not mutated
    heads = model(torch.rand(1, 3, 64, 64))
    assert [h.shape[-1] for h in heads] == [8, 8]


def test_gradient_reaches_input():
    model = Darknet(TINY).eval()
    x = torch.rand(1, 3, 64, 64, requires_grad=True)
    sum(h.square().sum() for h in model(x)).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_channels_last_and_autocast():
    model = Darknet(TINY).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        cl = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    for r, c, lo in zip(ref, cl, low, strict=True):
        torch.testing.assert_close(c, r, rtol=1e-4, atol=1e-5)
        assert lo.dtype == torch.bfloat16 and lo.shape == r.shape


def test_anchors_follow_the_model():
    model = Darknet(TINY).to(torch.float64)
    assert all(a.dtype == torch.float64 for a in model.anchors)


def test_input_validation():
    model = Darknet(TINY)
    with pytest.raises(ValueError, match="multiples of 16"):
        model(torch.rand(1, 3, 64, 40))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.rand(1, 1, 64, 64))
    with pytest.raises(ValueError, match="num_classes"):
        Darknet(TINY, num_classes=0)


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        (NET + _conv(8) + "[route]\nlayers=3\n\n" + HEAD, "must be an earlier layer"),
        (
            NET + _conv(8) + _conv(4) + "[shortcut]\nfrom=-2\n\n" + HEAD,
            "does not match the previous layer",
        ),
        (NET + _conv(8) + HEAD, r"8 channels but 2 anchors x \(5 \+ 3 classes\) = 16"),
        (NET + _conv(16, act="swish") + HEAD, "unsupported activation 'swish'"),
        (
            NET + _conv(8) + "[maxpool]\nsize=2\nstride=2\n\n[route]\nlayers=-1,-2\n\n" + HEAD,
            "spatial sizes",
        ),
        (NET + _conv(16) + HEAD + _conv(16), r"a layer after \[yolo\] must be a \[route\]"),
        (
            NET
            + _conv(16, size=1, bn=0, act="linear")
            + HEAD
            + "[route]\nlayers=-2\n\n"
            + _conv(7, size=1, bn=0, act="linear")
            + HEAD.replace("classes=3", "classes=2").replace("mask=0,1", "mask=0"),
            "disagree on classes",
        ),
        (NET + _conv(8), r"no \[yolo\] layer"),
    ],
)
def test_bad_cfgs(cfg: str, match: str):
    with pytest.raises(ValueError, match=match):
        Darknet(cfg)
