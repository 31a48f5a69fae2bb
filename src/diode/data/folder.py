"""A detection dataset read from an image folder, labelled or not."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from diode._boxes import Target
from diode.data.io import PathLike, load_image
from diode.data.labels import _empty_target, read_coco, read_yolo_labels

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
_LABEL_FORMATS = ("auto", "yolo", "coco", "none")


class DetectionFolder(Dataset[tuple[Tensor, Target, str]]):
    """Images of a folder with optional YOLO or COCO labels.

    Layouts (images are ``.png/.jpg/.jpeg/.bmp``, read in sorted name order):

    - ``root/images/*`` with ``root/labels/<stem>.txt`` (YOLO; a missing txt
      means no objects) or ``root/annotations.json`` (COCO, matched by file
      base name; images it does not list have no objects);
    - ``root/*``: a flat folder of images, labelled only if
      ``root/annotations.json`` exists.

    With ``labels="auto"``, ``labels/`` wins over ``annotations.json``.

    Args:
        root: the dataset folder.
        image_size: ``(height, width)`` to resize every image to (plain bilinear
            resize, boxes scaled with it); ``None`` keeps each image's size.
        labels: ``"auto"``, ``"yolo"``, ``"coco"`` or ``"none"`` (ignore labels).

    Items are ``(image, target, path)``: image float ``[3, H, W]`` RGB in
    ``[0, 1]``, target ``{"boxes": float32 [N, 4] xyxy pixels, "labels": int64 [N]}``
    (empty when unlabelled) and the image path as a string.
    """

    def __init__(
        self, root: PathLike, *, image_size: tuple[int, int] | None = None, labels: str = "auto"
    ) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"dataset folder {root} does not exist or is not a folder")
        if labels not in _LABEL_FORMATS:
            raise ValueError(f"labels must be one of {_LABEL_FORMATS}, got {labels!r}")
        if image_size is not None and (len(image_size) != 2 or min(image_size) <= 0):
            raise ValueError(
                f"image_size must be (height, width) with positive sizes, got {image_size}"
            )
        self.root = root
        self.image_size = None if image_size is None else (int(image_size[0]), int(image_size[1]))
        image_dir = root / "images" if (root / "images").is_dir() else root
        self.paths = sorted(
            p for p in image_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not self.paths:
            raise ValueError(
                f"no images found in {image_dir} (looked for {'/'.join(IMAGE_EXTENSIONS)})"
            )
        label_dir, coco_file = root / "labels", root / "annotations.json"
        if labels == "auto":
            labels = "yolo" if label_dir.is_dir() else "coco" if coco_file.is_file() else "none"
        if labels == "yolo" and not label_dir.is_dir():
            raise FileNotFoundError(f"labels='yolo' but {label_dir} does not exist")
        if labels == "coco" and not coco_file.is_file():
            raise FileNotFoundError(f"labels='coco' but {coco_file} does not exist")
        self.label_format = labels
        self.label_dir = label_dir
        self.class_names: list[str] | None = None
        self._coco_targets: dict[str, Target] = {}
        if labels == "coco":
            file_names, targets, self.class_names = read_coco(coco_file)
            self._coco_targets = {Path(f).name: t for f, t in zip(file_names, targets, strict=True)}
            missing = set(self._coco_targets) - {p.name for p in self.paths}
            if missing:
                logger.warning(
                    "%d images listed in %s are not in %s, e.g. %s",
                    len(missing),
                    coco_file,
                    image_dir,
                    sorted(missing)[0],
                )

    @property
    def labelled(self) -> bool:
        """Whether the folder carries labels (YOLO ``labels/`` or COCO ``annotations.json``)."""
        return self.label_format != "none"

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, Target, str]:
        path = self.paths[index]
        image = load_image(path)
        h, w = image.shape[-2:]
        if self.label_format == "yolo":
            txt = self.label_dir / f"{path.stem}.txt"
            target = read_yolo_labels(txt, (h, w)) if txt.is_file() else _empty_target()
        elif self.label_format == "coco":
            target = self._coco_targets.get(path.name) or _empty_target()
            target = {"boxes": target["boxes"].clone(), "labels": target["labels"].clone()}
        else:
            target = _empty_target()
        if self.image_size is not None and self.image_size != (h, w):
            new_h, new_w = self.image_size
            image = F.interpolate(
                image[None],
                size=self.image_size,
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )[0].clamp_(0, 1)
            scale = torch.tensor([new_w / w, new_h / h, new_w / w, new_h / h])
            target["boxes"] = target["boxes"] * scale
        return image, target, str(path)

    @staticmethod
    def collate(
        batch: Sequence[tuple[Tensor, Target, str]],
    ) -> tuple[Tensor, list[Target], list[str]]:
        """Stack items into ``(images [B, 3, H, W], targets, paths)``; sizes must match."""
        sizes = {tuple(item[0].shape) for item in batch}
        if len(sizes) != 1:
            raise ValueError(
                f"cannot stack images of different sizes {sorted(sizes)}; "
                "give DetectionFolder an image_size"
            )
        return (
            torch.stack([item[0] for item in batch]),
            [item[1] for item in batch],
            [item[2] for item in batch],
        )
