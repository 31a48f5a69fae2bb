"""`YOLOv8Adapter`: the anchor-free YOLO family (YOLOv5u, YOLOv8, YOLOv10, YOLO11) as a :class:`DetectorAdapter`.

Models come from Ultralytics checkpoints read by diode's safe reader (no code from
the file runs, the Ultralytics package is not needed), from the weights registry,
or from an architecture spec (random init, for students). Ultralytics weights carry
that project's AGPL-3.0 terms.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from diode import hub
from diode.adapters._common import ModelAdapter, detect_photo
from diode.models.yolov8.builder import YOLOModel
from diode.models.yolov8.checkpoint import load_model
from diode.models.yolov8.decode import Raw, postprocess
from diode.models.yolov8.loss import DetectionLoss, V10DetectionLoss

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
Device = str | torch.device | None

#: Grey of the family's letterbox padding (114 / 255).
PAD_VALUE = 114 / 255


class YOLOv8Adapter(ModelAdapter):
    """A :class:`~diode.models.yolov8.YOLOModel` seen through the adapter protocol.

    Images are float ``[B, 3, H, W]`` RGB in ``[0, 1]`` (what the family expects: no
    further normalization). Any size works: :meth:`forward` zero-pads on the right
    and bottom to a multiple of the largest stride, which leaves pixel coordinates
    unchanged.

    Args:
        model: the network.
        class_names: one name per class (default ``"class_<i>"``).
        loss: the detection loss (default: the family's gains, box 7.5, cls 0.5,
            dfl 1.5; both branches for a YOLOv10 head).
        source: provenance recorded in synthesis manifests (name, weights, sha256).
    """

    def __init__(self, model: YOLOModel, *, class_names: Sequence[str] | None = None,
                 loss: DetectionLoss | V10DetectionLoss | None = None, source: dict[str, Any] | None = None) -> None:
        if not isinstance(model, YOLOModel):
            raise TypeError(f"model must be a diode.models.yolov8.YOLOModel, got {type(model).__name__}")
        names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(model.num_classes)]
        if len(names) != model.num_classes:
            raise ValueError(f"class_names has {len(names)} names but the model has {model.num_classes} classes")
        self.model = model
        self.class_names = names
        self.loss = loss if loss is not None else _default_loss(model)
        self.source = dict(source or {"spec": model.spec.get("yaml_file", "spec")})

    # constructors -------------------------------------------------------------------------

    @classmethod
    def from_ultralytics(cls, path: PathLike, *, device: Device = None,
                         class_names: Sequence[str] | None = None) -> YOLOv8Adapter:
        """A frozen teacher from an Ultralytics ``.pt`` detection checkpoint, read safely.

        Weights come from the checkpoint's ``ema`` when present, else ``model``
        (FP16 stored weights become FP32). Class names are the checkpoint's,
        except numbered names ``"0" .. "79"`` of an 80-class model, which become
        the COCO names.

        Args:
            path: the ``.pt`` file (``best.pt``, ``yolov8n.pt``, ...).
            device: where to put the model (default CPU).
            class_names: override the stored names.

        Raises:
            ValueError: not such a checkpoint, a refused pickle, or weights that do
                not fit the stored architecture (see :func:`~diode.models.yolov8.checkpoint.load_model`).
        """
        model, ckpt = load_model(path)
        names = list(class_names) if class_names is not None else _checkpoint_names(ckpt.class_names,
                                                                                    model.num_classes)
        source = {"name": os.path.basename(os.fspath(path)), "spec": ckpt.spec.get("yaml_file", ckpt.model_class),
                  "weights": os.fspath(path), "sha256": hub.sha256_file(path), "ema": ckpt.source == "ema"}
        return cls(model, class_names=names, source=source).to(device).freeze()

    @classmethod
    def from_pretrained(cls, name: str, *, weights: PathLike | None = None, device: Device = None) -> YOLOv8Adapter:
        """A frozen teacher from the weights registry (:mod:`diode.hub`), sha256-checked.

        Args:
            name: registry name of an Ultralytics-format entry, e.g. ``"yolov10n"``.
            weights: a local copy of the registered file (verified, not downloaded).
            device: where to put the model (default CPU).
        """
        entry = hub.get_entry(name)
        if entry.format != "ultralytics":
            raise ValueError(f"{name!r} is a {entry.format} checkpoint; load it with the adapter of that format "
                             "(e.g. diode.YOLOv3Adapter.from_pretrained for darknet)")
        path = hub.fetch(name, path=weights)
        adapter = cls.from_ultralytics(path, device=device, class_names=entry.class_names)
        adapter.source.update(name=name, sha256=entry.sha256 or adapter.source["sha256"])
        return adapter

    @classmethod
    def from_spec(cls, spec: str | PathLike | Mapping[str, Any], *, num_classes: int | None = None,
                  class_names: Sequence[str] | None = None, scale: str | None = None,
                  device: Device = None) -> YOLOv8Adapter:
        """A randomly initialised, trainable model (a student).

        Args:
            spec: a bundled spec name (``"yolov8n"``, ``"yolov10n"``, ``"yolo11n"``,
                ...), a ``.json`` spec file, or a spec mapping.
            num_classes: override the spec's class count (default: the number of
                ``class_names``, else the spec's ``nc``).
            class_names: names (COCO names by default for 80 classes).
            scale: which of the spec's scales to build, when it has several.
            device: where to put the model.
        """
        if num_classes is None and class_names is not None:
            num_classes = len(class_names)
        model = YOLOModel(spec, num_classes=num_classes, scale=scale)
        names = list(class_names) if class_names is not None else _checkpoint_names(None, model.num_classes)
        source = {"spec": spec if isinstance(spec, str) else model.spec.get("yaml_file", "spec")}
        return cls(model, class_names=names, source=source).to(device)

    # protocol -----------------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return self.model.num_classes

    @property
    def size_divisor(self) -> int:
        """The largest stride (32 for the standard models): sizes that need no padding."""
        return self.model.max_stride

    def forward(self, images: Tensor) -> Raw:
        """Raw head outputs for images ``[B, 3, H, W]`` in ``[0, 1]``.

        Returns:
            ``list`` of ``[B, 4 * reg_max + C, H_i, W_i]`` logits per level, or for a
            YOLOv10 head ``{"one2many": [...], "one2one": [...]}`` (see
            :mod:`diode.models.yolov8`). Level grids cover the padded input.
        """
        return self.model(self._pad(images))

    def task_loss(self, raw: Raw, targets: list[dict[str, Tensor]], *,
                  generator: torch.Generator | None = None) -> Tensor:
        """Family loss of ``raw`` against ``targets`` (xyxy input pixels): TAL assignment, CIoU + DFL, BCE.

        Both branches count for a YOLOv10 head. The loss draws nothing at random, so
        ``generator`` is unused.
        """
        levels = raw["one2many"] if isinstance(raw, dict) else raw
        stride = self.model.strides[0]
        image_size = (levels[0].shape[-2] * stride, levels[0].shape[-1] * stride)
        return self.loss(raw, targets, image_size=image_size)[0]

    def postprocess(self, raw: Raw, *, image_size: tuple[int, int], conf: float = 0.25, iou: float = 0.45,
                    max_det: int = 300) -> list[dict[str, Tensor]]:
        """Detections from raw outputs (NMS, or top-k of the one-to-one branch), boxes clipped to ``(H, W)``."""
        return postprocess(raw, self.model.strides, self.model.reg_max, conf=conf, iou=iou, image_size=image_size,
                           max_det=max_det)

    @torch.no_grad()
    def predict(self, images: Tensor, *, conf: float = 0.25, iou: float = 0.45,
                max_det: int = 300) -> list[dict[str, Tensor]]:
        """Detections per image: ``boxes`` ``[K, 4]`` xyxy input pixels, ``scores`` ``[K]``, ``labels`` ``[K]``.

        Runs the model in eval mode (restoring its previous mode). ``iou`` is unused
        by a YOLOv10 head, which needs no NMS.
        """
        with self._eval_mode():
            raw = self.forward(images)
        return self.postprocess(raw, image_size=(images.shape[-2], images.shape[-1]), conf=conf, iou=iou,
                                max_det=max_det)

    def bn_layers(self) -> list[nn.Module]:
        """The BatchNorm layers in the order the forward calls them."""
        return list(self.model.bn_layers())

    def synthesis_defaults(self) -> dict[str, Any]:
        """:class:`~diode.DeepInversionLoss` options for this family (none: the generic defaults)."""
        return {}

    # real images ----------------------------------------------------------------------------

    def detect(self, image: Tensor, *, size: int = 640, conf: float = 0.25, iou: float = 0.7,
               max_det: int = 300) -> dict[str, Tensor]:
        """Detect objects in one photograph of any size, as the family's predictor does.

        The image is resized so that its longer side is ``size`` (aspect kept),
        padded with grey (114) to the next multiple of the stride, centred; the
        boxes are mapped back to the original pixels. ``iou`` defaults to the
        family's 0.7.

        Args:
            image: float ``[3, H, W]`` RGB in ``[0, 1]``.
            size: longest side of the network input, pixels.

        Returns:
            ``boxes`` ``[K, 4]`` xyxy in the photo's pixels, ``scores`` ``[K]``, ``labels`` ``[K]``.
        """
        return detect_photo(lambda x: self.predict(x, conf=conf, iou=iou, max_det=max_det)[0],
                            image.to(self.device), size, stride=self.size_divisor, fill=PAD_VALUE)

    def __repr__(self) -> str:
        head = "v10Detect" if self.model.end2end else "Detect"
        return f"YOLOv8Adapter(head={head}, num_classes={self.num_classes}, source={self.source})"


def _default_loss(model: YOLOModel) -> DetectionLoss | V10DetectionLoss:
    kind = V10DetectionLoss if model.end2end else DetectionLoss
    return kind(num_classes=model.num_classes, reg_max=model.reg_max, strides=model.strides)


def _checkpoint_names(names: Sequence[str] | None, num_classes: int) -> list[str] | None:
    """Stored names, with numbered names (``"0" .. "79"``) and missing names of 80 classes as COCO's."""
    numbered = names is not None and list(names) == [str(i) for i in range(len(names))]
    if (names is None or numbered) and num_classes == len(hub.COCO_CLASSES):
        return list(hub.COCO_CLASSES)
    return None if names is None else list(names)
