"""`YOLOv3Adapter`: the bundled darknet YOLOv3 family as a :class:`DetectorAdapter`."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diode import hub
from diode.adapters._common import ModelAdapter, detect_photo
from diode.models.yolo import Darknet, load_darknet_weights, load_ultralytics_checkpoint
from diode.models.yolo.decode import postprocess
from diode.models.yolo.loss import YOLOLoss

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
Device = str | torch.device | None


class YOLOv3Adapter(ModelAdapter):
    """A darknet YOLO model (:class:`~diode.models.yolo.Darknet`) seen through the adapter protocol.

    Images are float ``[B, 3, H, W]`` RGB in ``[0, 1]`` (what darknet expects:
    no further normalization); any size works, images are zero-padded on the
    right and bottom to a multiple of the model stride, which leaves pixel
    coordinates unchanged.

    Args:
        model: the network.
        class_names: one name per class (default ``"class_<i>"``).
        loss: the detection loss (default: the original recipe's settings).
        source: provenance recorded in synthesis manifests (name, cfg, sha256).
    """

    def __init__(self, model: Darknet, *, class_names: Sequence[str] | None = None,
                 loss: YOLOLoss | None = None, source: dict[str, Any] | None = None) -> None:
        if not isinstance(model, Darknet):
            raise TypeError(f"model must be a diode.models.yolo.Darknet, got {type(model).__name__}")
        names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(model.num_classes)]
        if len(names) != model.num_classes:
            raise ValueError(f"class_names has {len(names)} names but the model has {model.num_classes} classes")
        self.model = model
        self.class_names = names
        self.loss = loss if loss is not None else YOLOLoss()
        self.source = dict(source or {"cfg": model.cfg_name})

    # constructors -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name: str = "yolov3-tiny", *, weights: PathLike | None = None,
                        device: Device = None) -> YOLOv3Adapter:
        """A frozen teacher from the weights registry (:mod:`diode.hub`), sha256-checked.

        Args:
            name: registry name, e.g. ``"yolov3-tiny"``.
            weights: a local copy of the registered file (verified, not downloaded).
            device: where to put the model (default CPU).
        """
        entry = hub.get_entry(name)
        path = hub.fetch(name, path=weights)
        sha = entry.sha256 or hub.sha256_file(path)
        if entry.format != "darknet":
            raise ValueError(f"{name!r} holds {entry.format} weights; load it with diode.hub.load({name!r})")
        model = Darknet(entry.arch, num_classes=entry.num_classes)
        load_darknet_weights(model, path)
        source = {"name": name, "cfg": entry.arch, "weights": str(path), "sha256": sha}
        return cls(model, class_names=entry.class_names, source=source).to(device).freeze()

    @classmethod
    def from_darknet(cls, cfg: PathLike, weights: PathLike, *, class_names: Sequence[str] | None = None,
                     device: Device = None) -> YOLOv3Adapter:
        """A frozen teacher from a darknet cfg (bundled name or path) and ``.weights`` file."""
        model = Darknet(cfg)
        load_darknet_weights(model, weights)
        return cls._loaded(model, weights, class_names, device)

    @classmethod
    def from_ultralytics(cls, cfg: PathLike, checkpoint: PathLike, *, class_names: Sequence[str] | None = None,
                         device: Device = None) -> YOLOv3Adapter:
        """A frozen teacher from an Ultralytics-archive ``.pt`` checkpoint (BN eps 1e-4 kept)."""
        model = Darknet(cfg)
        load_ultralytics_checkpoint(model, checkpoint)
        return cls._loaded(model, checkpoint, class_names, device)

    @classmethod
    def _loaded(cls, model: Darknet, weights: PathLike, class_names: Sequence[str] | None,
                device: Device) -> YOLOv3Adapter:
        source = {"name": Path(weights).name, "cfg": model.cfg_name, "weights": str(weights),
                  "sha256": hub.sha256_file(weights)}
        return cls(model, class_names=_names(class_names, model), source=source).to(device).freeze()

    @classmethod
    def from_config(cls, cfg: PathLike, *, num_classes: int | None = None,
                    class_names: Sequence[str] | None = None, device: Device = None) -> YOLOv3Adapter:
        """A randomly initialised, trainable model (a student).

        Args:
            cfg: a bundled cfg name (``"yolov3-tiny"``), a ``.cfg`` path, or cfg text.
            num_classes: override the cfg's class count (heads resized).
            class_names: names (their count sets ``num_classes`` when that is not given).
            device: where to put the model.
        """
        if num_classes is None and class_names is not None:
            num_classes = len(class_names)
        model = Darknet(cfg, num_classes=num_classes)
        return cls(model, class_names=_names(class_names, model)).to(device)

    # protocol -----------------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return self.model.num_classes

    @property
    def size_divisor(self) -> int:
        """The model's largest stride (32 for the bundled cfgs); other sizes are zero-padded."""
        return int(self.model.max_stride)

    def synthesis_defaults(self) -> dict[str, Any]:
        """``{}``: the generic defaults are the reference recipe's, tuned on this family."""
        return {}

    def forward(self, images: Tensor) -> list[Tensor]:
        """Raw head outputs ``[B, A, H_i, W_i, 5 + C]`` for images ``[B, 3, H, W]`` in ``[0, 1]``."""
        return self.model(self._pad(images))

    def task_loss(self, raw: list[Tensor], targets: list[dict[str, Tensor]], *,
                  generator: torch.Generator | None = None) -> Tensor:
        """YOLO loss (GIoU box + objectness + class BCE) of ``raw`` against ``targets`` (xyxy pixels).

        Deterministic: ``generator`` is accepted for the protocol and not used.
        """
        return self.loss(raw, self.model.anchors, self.model.strides, targets)[0]

    def postprocess(self, raw: list[Tensor], *, image_size: tuple[int, int], conf: float = 0.25,
                    iou: float = 0.45) -> list[dict[str, Tensor]]:
        """Detections from raw outputs, boxes clipped to ``image_size`` ``(H, W)``."""
        return postprocess(raw, self.model.anchors, self.model.strides, conf=conf, iou=iou,
                           image_size=image_size)

    @torch.no_grad()
    def predict(self, images: Tensor, *, conf: float = 0.25, iou: float = 0.45) -> list[dict[str, Tensor]]:
        """Detections per image: ``boxes`` ``[K, 4]`` xyxy input pixels, ``scores`` ``[K]``, ``labels`` ``[K]``.

        Runs the model in eval mode (restoring its previous mode).
        """
        with self._eval_mode():
            raw = self.forward(images)
        return self.postprocess(raw, image_size=(images.shape[-2], images.shape[-1]), conf=conf, iou=iou)

    def bn_layers(self) -> list[nn.Module]:
        """The BatchNorm layers in forward order."""
        return list(self.model.bn_layers())

    # real images ----------------------------------------------------------------------------

    def detect(self, image: Tensor, *, size: int = 416, conf: float = 0.25, iou: float = 0.45) -> dict[str, Tensor]:
        """Detect objects in one photograph of any size, darknet style.

        The image is letterboxed (aspect kept, grey padding) to ``size x size``
        and the boxes are mapped back to the original pixels.

        Args:
            image: float ``[3, H, W]`` RGB in ``[0, 1]``.
            size: network input size, a multiple of the model stride.
        """
        return detect_photo(lambda x: self.predict(x, conf=conf, iou=iou)[0], image.to(self.device), size)

    def __repr__(self) -> str:
        return f"YOLOv3Adapter(cfg={self.model.cfg_name!r}, num_classes={self.num_classes}, source={self.source})"


def _names(class_names: Sequence[str] | None, model: Darknet) -> list[str] | None:
    if class_names is None and model.num_classes == len(hub.COCO_CLASSES):
        return list(hub.COCO_CLASSES)
    return None if class_names is None else list(class_names)
