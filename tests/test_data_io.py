from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from diode.data.io import load_image, save_image


def test_jpeg_keeps_its_format_at_high_quality(tmp_path: Path) -> None:
    smooth = F.interpolate(torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)), size=(64, 64),
                           mode="bilinear", align_corners=False)[0]
    save_image(tmp_path / "a.jpg", smooth)
    with Image.open(tmp_path / "a.jpg") as im:
        assert im.format == "JPEG"
    # PIL's default quality (75) gives about 0.017 here, quality 95 about 0.009
    assert (load_image(tmp_path / "a.jpg") - smooth).abs().mean() < 0.012
