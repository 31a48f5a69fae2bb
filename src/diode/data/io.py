"""Atomic file writing and lossless image reading/writing.

Every file diode writes goes through :func:`atomic_write_bytes`: the bytes land
in a uniquely named temporary file in the destination folder, are flushed and
fsynced, then renamed over the destination with :func:`os.replace`. A crash
or an error midway leaves the previous file (if any) intact and no temporary
file behind.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

PathLike = str | os.PathLike[str]


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, creating missing parent folders.

    Raises:
        OSError: ``"output folder X is not writable: ..."`` when the folder
            cannot be created or written to.
    """
    path = Path(path)
    folder = path.parent
    tmp = folder / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # os.open applies the umask to 0o666, so the file gets the usual permissions.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise OSError(f"output folder {folder} is not writable: {e}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: PathLike, text: str, *, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: PathLike, obj: Any, *, indent: int | None = 2) -> None:
    """Serialize ``obj`` as JSON and write it to ``path`` atomically.

    Serialization happens before anything touches the disk, so an object that
    is not JSON-serializable raises ``TypeError`` and leaves ``path`` as it was.
    """
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def image_to_uint8(image: Tensor) -> Tensor:
    """Quantize a float image in ``[0, 1]`` to uint8 by ``round(x * 255)``.

    Args:
        image: float ``[..., 3, H, W]``, values clamped to ``[0, 1]`` first.
            A uint8 tensor is returned unchanged.

    Returns:
        uint8 tensor of the same shape, on the same device.
    """
    if not isinstance(image, Tensor):
        raise TypeError(f"image must be a torch.Tensor, got {type(image).__name__}")
    if image.dtype == torch.uint8:
        return image
    if not image.dtype.is_floating_point:
        raise TypeError(f"image must be a float tensor in [0, 1] or uint8, got {image.dtype}")
    return (image.detach().clamp(0, 1) * 255).round().to(torch.uint8)


def save_image(path: PathLike, image: Tensor) -> None:
    """Save one RGB image atomically; the format follows the suffix (``.png``: lossless; JPEG at quality 95).

    Args:
        path: destination file, e.g. ``images/000001.png``.
        image: float ``[3, H, W]`` RGB in ``[0, 1]`` (quantized by ``round(x * 255)``)
            or uint8 ``[3, H, W]``.
    """
    if not isinstance(image, Tensor) or image.ndim != 3 or image.shape[0] != 3:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"image must be a [3, H, W] RGB tensor, got {shape}")
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"path {path} has no image suffix PIL can write; use .png (lossless)")
    array = image_to_uint8(image).permute(1, 2, 0).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    atomic_write_bytes(path, buffer.getvalue())


def load_image(path: PathLike) -> Tensor:
    """Read an image file as float ``[3, H, W]`` RGB in ``[0, 1]``.

    Grayscale, palette and RGBA images are converted to RGB (alpha dropped).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a readable image; the message names it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist")
    try:
        with Image.open(path) as img:
            array = np.array(img.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255)
