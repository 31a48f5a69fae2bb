from __future__ import annotations

from pathlib import Path

import pytest

from diode.models.yolo import available_cfgs, bundled_cfg_path, parse_cfg

CFG = """
# a comment
[net]
width=64
height = 64
channels=3
momentum=0.9
steps=400000,450000
scales=.1,.1

[convolutional]
batch_normalize=1
filters=8   ; trailing comment
size=3
activation=leaky

[route]
layers = -1

[route]
layers = -1, 0

[yolo]
mask = 0,2
anchors = 10,14,  23,27,  37,58
classes=2
ignore_thresh = .7
"""


def test_parse_types_values():
    defs = parse_cfg(CFG)
    assert [d["type"] for d in defs] == ["net", "convolutional", "route", "route", "yolo"]
    net, conv, route1, route2, yolo = defs
    assert net["width"] == 64 and net["height"] == 64 and isinstance(net["width"], int)
    assert net["momentum"] == pytest.approx(0.9) and isinstance(net["momentum"], float)
    assert net["steps"] == [400000, 450000]
    assert net["scales"] == [pytest.approx(0.1), pytest.approx(0.1)]
    assert conv == {
        "type": "convolutional",
        "batch_normalize": 1,
        "filters": 8,
        "size": 3,
        "activation": "leaky",
    }
    assert route1["layers"] == [-1]
    assert route2["layers"] == [-1, 0]
    assert yolo["mask"] == [0, 2]
    assert yolo["anchors"] == [(10, 14), (23, 27), (37, 58)]
    assert yolo["ignore_thresh"] == pytest.approx(0.7)


def test_network_alias_is_net():
    assert parse_cfg("[network]\nwidth=32\n")[0] == {"type": "net", "width": 32}


def test_bundled_cfgs():
    assert {"yolov3", "yolov3-tiny", "yolov3-spp"} <= set(available_cfgs())
    path = bundled_cfg_path("yolov3-tiny")
    assert path.is_file() and path.name == "yolov3-tiny.cfg"
    tiny = parse_cfg("yolov3-tiny")
    assert tiny == parse_cfg(path) == parse_cfg(str(path))
    yolos = [d for d in tiny if d["type"] == "yolo"]
    # The COCO weights were trained with this (darknet's original) mask.
    assert [y["mask"] for y in yolos] == [[3, 4, 5], [1, 2, 3]]
    assert len([d for d in parse_cfg("yolov3") if d["type"] == "convolutional"]) == 75


def test_path_source(tmp_path: Path):
    f = tmp_path / "mine.cfg"
    f.write_text(CFG)
    assert parse_cfg(f) == parse_cfg(CFG)


def test_unknown_section_type():
    with pytest.raises(ValueError, match=r"line 3: unknown section type \[dropout\]"):
        parse_cfg("[net]\nwidth=32\n[dropout]\nprobability=.5\n")


def test_unknown_bundled_name_lists_available():
    with pytest.raises(ValueError, match="yolov3-tiny") as err:
        parse_cfg("yolov9")
    assert "yolov9" in str(err.value)
    with pytest.raises(ValueError, match="available: .*yolov3-spp"):
        bundled_cfg_path("yolov9")


def test_missing_file(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="nope.cfg"):
        parse_cfg(tmp_path / "nope.cfg")
    with pytest.raises(FileNotFoundError):
        parse_cfg(str(tmp_path / "nope.cfg"))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("width=3\n[net]\n", "before the first section"),
        ("[convolutional]\nfilters=3\n", r"\[net\] section, and it comes first"),
        ("[net]\n[net]\n", "exactly one"),
        ("[net]\nwidth\n", "expected 'key=value'"),
        ("[net\nwidth=2\n", "malformed section header"),
        ("[net]\n[yolo]\nanchors=1,2,3\n", "odd count"),
        ("[net]\n[route]\nlayers=-1,a\n", "comma-separated integers"),
        ("# only a comment\n\n", "no sections"),
    ],
)
def test_malformed_cfg(text: str, match: str):
    with pytest.raises(ValueError, match=match):
        parse_cfg(text)


def test_bad_source_type():
    with pytest.raises(TypeError, match="source"):
        parse_cfg(3)  # type: ignore[arg-type]
