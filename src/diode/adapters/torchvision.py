"""`TorchvisionAdapter`: torchvision detection models as a :class:`DetectorAdapter`.

Covers every family in ``torchvision.models.detection``: Faster R-CNN (v1, v2,
MobileNetV3), Mask R-CNN and Keypoint R-CNN (seen as box detectors), RetinaNet
(v1, v2), FCOS and SSD/SSDlite. The adapter uses the model's own pieces
(backbone, heads, anchor generators, loss and post-processing code) but never
its ``forward``, so that:

- images enter at their own size: the model's ``GeneralizedRCNNTransform`` is
  bypassed except for its normalisation (``image_mean``/``image_std``) and its
  padding to ``size_divisible``;
- the training losses are computed without putting any layer in training mode
  (BatchNorm layers keep the mode the caller gave them; a frozen teacher's running
  statistics never change);
- the proposal sampling of the R-CNN losses draws from diode's ``torch.Generator``;
- labels are contiguous ``0 .. num_classes - 1`` whatever the model's label space
  (background at 0, the 91-id COCO layout with "N/A" gaps).

Where torchvision's code reads a module attribute (``training``, a threshold, the
proposal sampler), the adapter calls it on a *view*: a shallow copy of that one
module with the attribute changed, which shares every parameter, buffer and
submodule with the original, so the caller's model is never modified.
"""

from __future__ import annotations

import copy
import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, FasterRCNN_ResNet50_FPN_Weights, RetinaNet
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssd import SSD
from torchvision.ops import box_iou

from diode import hub
from diode.adapters._common import Device, ModelAdapter
from diode.adapters.base import BN_TYPES

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


#: The model families the adapter knows, by torchvision class (subclasses included).
FAMILIES: dict[str, type[nn.Module]] = {"rcnn": FasterRCNN, "retinanet": RetinaNet, "fcos": FCOS, "ssd": SSD}

# Families whose classifier reserves label 0 for the background (softmax over background + classes).
_BACKGROUND_AT_0 = ("rcnn", "ssd")

# DeepInversionLoss options per family. The reference recipe's w_task = 0.5 suits YOLO's loss, a sum
# over cells (about 26 on noise for yolov3-tiny); torchvision's losses are means over matched anchors or
# sampled proposals, on noise about 0.8 (R-CNN), 1.7 (RetinaNet), 2.4 (FCOS) and 10 (SSD). Raising w_task
# by about that ratio makes trained teachers detect the synthesized images (adapter guide: measurements).
# RetinaNet keeps the recipe's: there w_task 5 raised the inversion mAP50 but taught students less
# (toy table, 2 seeds: 0.651 / 0.585 against 0.713 / 0.657 mAP50 at 0.5).
_SYNTHESIS_DEFAULTS: dict[str, dict[str, Any]] = {"rcnn": {"w_task": 20.0}, "retinanet": {},
                                                  "fcos": {"w_task": 5.0}, "ssd": {}}

# torchvision's COCO label space: 91 ids, 0 "__background__", 10 "N/A" gaps (the metadata of its weights).
_COCO_91: tuple[str, ...] = tuple(FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"])
_NOT_A_CLASS = ("__background__", "N/A")

# R-CNN heads' optional branches: the adapter treats Mask and Keypoint R-CNN as box detectors.
_MASK_AND_KEYPOINT = ("mask_roi_pool", "mask_head", "mask_predictor", "keypoint_roi_pool", "keypoint_head",
                      "keypoint_predictor")


class TorchvisionOutputs(dict[str, Tensor]):
    """Raw outputs of a torchvision detector: a dict of tensors plus the geometry the loss needs.

    Items (the differentiable outputs): for one-stage models (RetinaNet, FCOS, SSD) the
    head outputs ``cls_logits`` ``[B, HWA, K]``, ``bbox_regression`` ``[B, HWA, 4]`` (and
    FCOS's ``bbox_ctrness`` ``[B, HWA, 1]``) in the model's label space; for R-CNN models
    the backbone's feature maps by name (``"0"``, ``"1"``, ..., ``"pool"``), the RPN and
    RoI heads run in :meth:`TorchvisionAdapter.task_loss`.

    Attributes:
        image_list: the normalised, padded batch ``[B, 3, H', W']`` and the unpadded
            ``(H, W)`` of each image.
        anchors: one-stage models: the anchors (xyxy pixels) of each image ``[HWA, 4]``.
        level_sizes: one-stage models: ``H_l * W_l`` of each feature level.
    """

    def __init__(self, items: dict[str, Tensor], *, image_list: ImageList, anchors: list[Tensor] | None = None,
                 level_sizes: list[int] | None = None) -> None:
        super().__init__(items)
        self.image_list = image_list
        self.anchors = anchors
        self.level_sizes = level_sizes


class TorchvisionAdapter(ModelAdapter):
    """A torchvision detection model seen through the adapter protocol.

    Images are float ``[B, 3, H, W]`` RGB in ``[0, 1]`` at any size: the adapter
    normalises them with the model's ``transform.image_mean``/``image_std`` and
    zero-pads them on the right and bottom to a multiple of
    ``transform.size_divisible`` (:attr:`size_divisor`), which leaves pixel
    coordinates unchanged. The model's resize is never applied.

    SSD and SSDlite were trained on images resized to ``transform.fixed_size``
    (300 or 320 px squares); their anchors are fractions of the input size, so
    any size works, but synthesize at that size for images the model sees as it
    saw its training data.

    Labels are contiguous ``0 .. num_classes - 1``; ``label_map[i]`` is the model's
    label of diode class ``i``. The default: the COCO mapping (80 classes, torchvision's
    names, "N/A" and background skipped) for a model with 91 outputs; otherwise
    every model label, after the background for R-CNN and SSD models (whose
    classifiers reserve 0 for it).

    Args:
        model: a torchvision ``FasterRCNN`` (or ``MaskRCNN``, ``KeypointRCNN``),
            ``RetinaNet``, ``FCOS`` or ``SSD`` (SSDlite included), with at least one
            BatchNorm layer (``FrozenBatchNorm2d`` counts).
        class_names: one name per diode class.
        label_map: the model label of each diode class (see above).
        source: provenance recorded in synthesis manifests.

    Raises:
        TypeError: the model is not of a known family.
        ValueError: the model has no BatchNorm layer, or ``class_names``/``label_map``
            do not fit the model's classes.
    """

    def __init__(self, model: nn.Module, *, class_names: Sequence[str] | None = None,
                 label_map: Sequence[int] | None = None, source: dict[str, Any] | None = None) -> None:
        family = next((name for name, cls in FAMILIES.items() if isinstance(model, cls)), None)
        if family is None:
            raise TypeError(f"TorchvisionAdapter supports torchvision's FasterRCNN/MaskRCNN/KeypointRCNN, "
                            f"RetinaNet, FCOS and SSD/SSDlite models, got {type(model).__name__}; wrap other "
                            "detectors in their own adapter (see the adapter guide)")
        if not any(_is_bn(m) for m in model.modules()):
            raise ValueError(f"{type(model).__name__} has no BatchNorm layer (BatchNorm1d/2d/3d, SyncBatchNorm or "
                             "FrozenBatchNorm2d with running statistics): DeepInversion matches BatchNorm running "
                             "statistics, so it cannot invert this model (ssd300_vgg16's VGG backbone, for one, "
                             "has none)")
        transform: Any = model.transform
        for attr in ("image_mean", "image_std", "size_divisible"):
            if not hasattr(transform, attr):
                raise TypeError(f"model.transform must be torchvision's GeneralizedRCNNTransform (it has no {attr})")
        self.model = model
        self.family = family
        self.label_map, self.class_names = _resolve_labels(family, _model_classes(model, family), class_names,
                                                           label_map)
        self.source = dict(source or {"model": type(model).__name__})
        self._bn_names: list[str] | None = None

    # constructors -------------------------------------------------------------------------

    @classmethod
    def from_name(cls, name: str, *, weights: PathLike | None = None, num_classes: int | None = None,
                  backbone_weights: PathLike | None = None, class_names: Sequence[str] | None = None,
                  label_map: Sequence[int] | None = None, device: Device = None,
                  **kwargs: Any) -> TorchvisionAdapter:
        """Build a model with torchvision's builder ``name``; weights only from local files.

        The builder runs with ``weights=None, weights_backbone=None`` (nothing is
        downloaded), so its backbones use trainable ``BatchNorm2d`` (equal to torchvision's
        ``FrozenBatchNorm2d`` in eval mode).

        Args:
            name: a builder of ``torchvision.models.detection``, e.g.
                ``"ssdlite320_mobilenet_v3_large"`` or ``"fasterrcnn_resnet50_fpn_v2"``.
            weights: a state dict file of the whole model (``torch.save(model.state_dict())``,
                or a torchvision reference checkpoint ``{"model": state_dict, ...}``), loaded
                strictly; the adapter is then a frozen teacher (eval mode, no gradients).
                Without it the model is randomly initialised and trainable (a student).
            num_classes: the builder's ``num_classes`` in torchvision's meaning (R-CNN and
                SSD count the background; default 91, COCO's layout).
            backbone_weights: a state dict file of the classification network the builder's
                backbone is cut from (e.g. torchvision's ImageNet ``resnet50`` or
                ``mobilenet_v3_large`` weights), matched to the backbone's feature extractor
                in order, with every shape checked.
            class_names: as in the constructor.
            label_map: as in the constructor.
            device: where to put the model.
            **kwargs: more builder arguments (e.g. ``trainable_backbone_layers``,
                ``score_thresh``).

        Raises:
            ValueError: unknown builder, or a weights file that does not fit.
        """
        detection = torchvision.models.detection
        builders = torchvision.models.list_models(module=detection)
        if name not in builders:
            raise ValueError(f"unknown torchvision detection builder {name!r}; available: {', '.join(builders)}")
        if "weights_backbone" in kwargs:
            raise TypeError("from_name never downloads: pass backbone_weights=PATH (a local state dict file) "
                            "instead of weights_backbone")
        model = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=num_classes,
                                             **kwargs)
        source: dict[str, Any] = {"name": name}
        if backbone_weights is not None:
            _load_backbone(model, backbone_weights)
            source["backbone_weights"] = str(backbone_weights)
        if weights is not None:
            try:
                model.load_state_dict(_read_state_dict(weights), strict=True)
            except RuntimeError as e:
                raise ValueError(f"weights {weights} do not fit {name} with num_classes="
                                 f"{num_classes if num_classes is not None else 'default'}: {e}") from e
            source.update(weights=str(weights), sha256=hub.sha256_file(weights))
        adapter = cls(model, class_names=class_names, label_map=label_map, source=source).to(device)
        return adapter.freeze() if weights is not None else adapter

    @classmethod
    def from_pretrained(cls, name: str, *, weights: PathLike | None = None,
                        device: Device = None) -> TorchvisionAdapter:
        """A frozen teacher from a ``"torchvision"`` entry of the weights registry (:mod:`diode.hub`).

        The entry's ``arch`` is the builder name; its class names are the diode classes
        (80 names: the COCO mapping of a 91-output model).

        Args:
            name: registry name.
            weights: a local copy of the registered file (verified, not downloaded).
            device: where to put the model (default CPU).
        """
        entry = hub.get_entry(name)
        if entry.format != "torchvision":
            raise ValueError(f"{name!r} is a {entry.format} entry, not a torchvision detector")
        path = hub.fetch(name, path=weights)
        names = list(entry.class_names)
        if names and len(names) != len(_coco_labels()):
            offset = 0 if entry.arch.startswith(("retinanet", "fcos")) else 1
            num_classes: int | None = len(names) + offset
        else:
            num_classes = None
        adapter = cls.from_name(entry.arch, weights=path, num_classes=num_classes, class_names=names or None,
                                device=device)
        adapter.source["name"] = name
        return adapter

    # protocol -----------------------------------------------------------------------------

    @property
    def _tv(self) -> Any:
        """The model, typed for torchvision's attributes (``nn.Module.__getattr__`` hides them)."""
        return self.model

    @property
    def num_classes(self) -> int:
        """Number of diode classes (``len(label_map)``)."""
        return len(self.label_map)

    @property
    def size_divisor(self) -> int:
        """The transform's ``size_divisible`` (32 for R-CNN, RetinaNet and FCOS; 1 for SSD)."""
        return int(self._tv.transform.size_divisible)

    def synthesis_defaults(self) -> dict[str, Any]:
        """The family's task weight: ``w_task`` 20 (R-CNN), 5 (FCOS); RetinaNet and SSD keep the recipe's.

        torchvision's losses are means over matched anchors or sampled proposals, far smaller
        than the YOLO loss the recipe's ``w_task = 0.5`` was set for; measurements in the
        adapter guide.
        """
        return dict(_SYNTHESIS_DEFAULTS[self.family])

    def compile_targets(self) -> list[nn.Module]:
        """The backbone and, outside R-CNN, the head: :meth:`forward` calls them, not the model's own forward
        (R-CNN's region proposal and box heads, with data-dependent shapes, stay eager)."""
        return [self._tv.backbone] + ([] if self.family == "rcnn" else [self._tv.head])

    def forward(self, images: Tensor) -> TorchvisionOutputs:
        """Raw outputs for images ``[B, 3, H, W]`` in ``[0, 1]`` (see :class:`TorchvisionOutputs`).

        Differentiable; every layer runs in the mode the caller gave it (a frozen
        teacher: eval, so BatchNorm running statistics never change).
        """
        image_list = self._image_list(images)
        features = self._tv.backbone(image_list.tensors)
        if isinstance(features, Tensor):
            features = OrderedDict([("0", features)])
        if self.family == "rcnn":
            return TorchvisionOutputs(features, image_list=image_list)
        levels = list(features.values())
        head = self._tv.head(levels)
        # Anchor generators read only the maps' sizes and the first one's dtype: float32 stand-ins keep
        # the anchors exact under autocast (bf16 would round 300 px coordinates to 2 px).
        sizes_only = [f.new_empty((0, 0, *f.shape[-2:]), dtype=torch.float32) for f in levels]
        anchors = self._tv.anchor_generator(image_list, sizes_only)
        return TorchvisionOutputs(head, image_list=image_list, anchors=anchors,
                                  level_sizes=[f.shape[-2] * f.shape[-1] for f in levels])

    def losses(self, raw: TorchvisionOutputs, targets: list[dict[str, Tensor]], *,
               generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """The model's own training losses, by torchvision's names, without training mode.

        Args:
            raw: :meth:`forward`'s outputs.
            targets: per image, ``boxes`` ``[N, 4]`` xyxy pixels and ``labels`` ``[N]`` in
                ``[0, num_classes)``.
            generator: the source of the R-CNN proposal sampling (RPN anchors and RoI
                proposals); default a fresh generator seeded 0, so a call is reproducible.
                The other families draw nothing.
        """
        if len(targets) != len(raw.image_list.image_sizes):
            raise ValueError(f"targets has {len(targets)} dicts for {len(raw.image_list.image_sizes)} images: "
                             "give one dict per image")
        model_targets = self._model_targets(targets, raw.image_list.tensors.device)
        if self.family == "rcnn":
            return self._rcnn_losses(raw, model_targets, generator)
        head = dict(raw)
        anchors = _require_anchors(raw)
        if self.family == "retinanet":
            return self._tv.compute_loss(model_targets, head, anchors)
        if self.family == "fcos":
            return self._tv.compute_loss(model_targets, head, anchors, raw.level_sizes)
        matched = []  # SSD matches in its forward; the same code, on our anchors
        for anchors_i, target in zip(anchors, model_targets, strict=True):
            if target["boxes"].numel() == 0:
                matched.append(torch.full((anchors_i.shape[0],), -1, dtype=torch.int64, device=anchors_i.device))
            else:
                matched.append(self._tv.proposal_matcher(box_iou(target["boxes"], anchors_i)))
        return self._tv.compute_loss(model_targets, head, anchors, matched)

    def task_loss(self, raw: TorchvisionOutputs, targets: list[dict[str, Tensor]], *,
                  generator: torch.Generator | None = None) -> Tensor:
        """The sum of :meth:`losses` (torchvision's training objective: every term weighs 1)."""
        return torch.stack([v.float() for v in self.losses(raw, targets, generator=generator).values()]).sum()

    @torch.no_grad()
    def predict(self, images: Tensor, *, conf: float = 0.25, iou: float = 0.45) -> list[dict[str, Tensor]]:
        """Detections per image: ``boxes`` ``[K, 4]`` xyxy input pixels, ``scores`` ``[K]``, ``labels`` ``[K]``.

        The model's own post-processing with ``conf`` as its score threshold and ``iou``
        as its NMS threshold; labels are diode classes (detections of model labels outside
        :attr:`label_map` are dropped). Runs every layer in eval mode, restoring each
        layer's mode after.
        """
        with self._eval_mode():
            raw = self.forward(images)
            sizes = raw.image_list.image_sizes
            if self.family == "rcnn":
                features = OrderedDict(raw)
                proposals, _ = self._tv.rpn(raw.image_list, features)
                heads = _view(self._tv.roi_heads, score_thresh=conf, nms_thresh=iou,
                              **dict.fromkeys(_MASK_AND_KEYPOINT))
                detections, _ = heads(features, proposals, sizes)
            else:
                view = _view(self.model, score_thresh=conf, nms_thresh=iou)
                anchors = _require_anchors(raw)
                if self.family == "ssd":
                    detections = view.postprocess_detections(dict(raw), anchors, sizes)
                else:
                    per_level = raw.level_sizes or []
                    per_anchor = raw["cls_logits"].shape[1] // sum(per_level)
                    counts = [n * per_anchor for n in per_level]
                    split = {k: list(v.split(counts, dim=1)) for k, v in raw.items()}
                    detections = view.postprocess_detections(split, [list(a.split(counts)) for a in anchors], sizes)
        out = []
        for det in detections:
            labels = self.from_model_labels(det["labels"])
            keep = labels >= 0
            out.append({"boxes": det["boxes"][keep].float(), "scores": det["scores"][keep].float(),
                        "labels": labels[keep]})
        return out

    def bn_layers(self) -> list[nn.Module]:
        """The BatchNorm layers that :meth:`forward` and :meth:`task_loss` run, in the order of their first call.

        The order is recorded once, with forward hooks, on a throwaway copy of the model
        in eval mode (one forward and loss on a blank image); layers the adapter never runs
        (e.g. a Mask R-CNN's mask head) are left out.
        """
        if self._bn_names is None:
            self._bn_names = self._record_bn_order()
        modules = dict(self.model.named_modules())
        return [modules[name] for name in self._bn_names]

    # labels ---------------------------------------------------------------------------------

    def to_model_labels(self, labels: Tensor) -> Tensor:
        """Model labels of diode classes ``labels`` (int64, any shape, values in ``[0, num_classes)``)."""
        lut = torch.tensor(self.label_map, dtype=torch.int64, device=labels.device)
        return lut[labels.long()]

    def from_model_labels(self, labels: Tensor) -> Tensor:
        """Diode classes of model labels ``labels`` (int64, any shape); ``-1`` where no class maps there."""
        size = max(max(self.label_map), int(labels.max()) if labels.numel() else 0) + 1
        inverse = torch.full((size,), -1, dtype=torch.int64, device=labels.device)
        inverse[torch.tensor(self.label_map, dtype=torch.int64, device=labels.device)] = torch.arange(
            len(self.label_map), device=labels.device)
        return inverse[labels.long()]

    # internals ------------------------------------------------------------------------------

    def _image_list(self, images: Tensor) -> ImageList:
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be a float tensor [B, 3, H, W] RGB in [0, 1], got "
                             f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
        if not images.is_floating_point():
            raise ValueError(f"images must be float in [0, 1], got {images.dtype}: divide uint8 images by 255")
        transform = self._tv.transform
        mean = torch.as_tensor(transform.image_mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        std = torch.as_tensor(transform.image_std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        # zeros after the normalisation, as torchvision's batching pads
        x = self._pad((images - mean) / std)
        return ImageList(x, [(int(images.shape[-2]), int(images.shape[-1]))] * images.shape[0])

    def _model_targets(self, targets: list[dict[str, Tensor]], device: torch.device) -> list[dict[str, Tensor]]:
        lut = torch.tensor(self.label_map, dtype=torch.int64, device=device)
        return [{"boxes": t["boxes"].to(device, torch.float32), "labels": lut[t["labels"].to(device).long()]}
                for t in targets]

    def _rcnn_losses(self, raw: TorchvisionOutputs, targets: list[dict[str, Tensor]],
                     generator: torch.Generator | None) -> dict[str, Tensor]:
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        features = OrderedDict(raw)
        rpn, heads = self._tv.rpn, self._tv.roi_heads
        # training=True on the views selects the RPN's training proposal counts and the loss
        # branches; the views' submodules (the RPN head, the box head) are the model's own.
        rpn_view = _view(rpn, training=True, fg_bg_sampler=_Sampler(rpn.fg_bg_sampler, gen))
        proposals, rpn_losses = rpn_view(raw.image_list, features, targets)
        heads_view = _view(heads, training=True, fg_bg_sampler=_Sampler(heads.fg_bg_sampler, gen),
                           **dict.fromkeys(_MASK_AND_KEYPOINT))
        _, head_losses = heads_view(features, proposals, raw.image_list.image_sizes, targets)
        return {**rpn_losses, **head_losses}

    def _probe_size(self) -> tuple[int, int]:
        fixed = getattr(self._tv.transform, "fixed_size", None)
        if fixed:
            return int(fixed[1]), int(fixed[0])  # torchvision's fixed_size is (width, height)
        s = self.size_divisor
        side = -(-64 // s) * s
        return side, side

    def _record_bn_order(self) -> list[str]:
        probe = TorchvisionAdapter(copy.deepcopy(self.model), label_map=self.label_map,
                                   class_names=self.class_names)
        probe.model.eval()
        names = {m: n for n, m in probe.model.named_modules() if _is_bn(m)}
        order: dict[str, None] = {}

        def record(module: nn.Module, inputs: Any, output: Any) -> None:
            order.setdefault(names[module])

        handles = [m.register_forward_hook(record) for m in names]
        try:
            h, w = self._probe_size()
            with torch.no_grad():
                images = torch.full((1, 3, h, w), 0.5, device=probe.device)
                box = torch.tensor([[w / 4, h / 4, 3 * w / 4, 3 * h / 4]], device=probe.device)
                probe.task_loss(probe.forward(images), [{"boxes": box, "labels": torch.zeros(1, dtype=torch.long)}])
        finally:
            for handle in handles:
                handle.remove()
        unused = [n for n in names.values() if n not in order]
        if unused:
            logger.info("%d BatchNorm layer(s) of %s never run by the adapter, left out: %s", len(unused),
                        type(self.model).__name__, ", ".join(unused))
        return list(order)

    def __repr__(self) -> str:
        return (f"TorchvisionAdapter({type(self.model).__name__}, family={self.family!r}, "
                f"num_classes={self.num_classes}, source={self.source})")


class _Sampler:
    """Faster R-CNN's balanced positive/negative sampling, drawing from a ``torch.Generator``.

    Same contract as torchvision's ``BalancedPositiveNegativeSampler`` (whose draws come
    from the global RNG): per image, at most ``batch_size_per_image * positive_fraction``
    random positives (matched index >= 1), the rest of the batch random negatives (== 0);
    returns per-image uint8 masks of the chosen positives and negatives.
    """

    def __init__(self, like: Any, generator: torch.Generator) -> None:
        self.batch_size_per_image = int(like.batch_size_per_image)
        self.positive_fraction = float(like.positive_fraction)
        self.generator = generator

    def _choose(self, candidates: Tensor, k: int) -> Tensor:
        order = torch.randperm(candidates.numel(), generator=self.generator, device=self.generator.device)
        return candidates[order[:k].to(candidates.device)]

    def __call__(self, matched_idxs: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        pos_masks, neg_masks = [], []
        for matched in matched_idxs:
            positive = torch.where(matched >= 1)[0]
            negative = torch.where(matched == 0)[0]
            num_pos = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
            num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)
            pos_mask = torch.zeros_like(matched, dtype=torch.uint8)
            neg_mask = torch.zeros_like(matched, dtype=torch.uint8)
            pos_mask[self._choose(positive, num_pos)] = 1
            neg_mask[self._choose(negative, num_neg)] = 1
            pos_masks.append(pos_mask)
            neg_masks.append(neg_mask)
        return pos_masks, neg_masks


def _view(module: nn.Module, **changes: Any) -> Any:
    """A shallow copy of ``module`` with ``changes`` applied; ``module`` itself is untouched.

    The copy shares every parameter, buffer and submodule (and their modes) with the
    original; its own submodule table is a copy, so setting a submodule to ``None``
    (e.g. a mask head) affects the view only.
    """
    view = copy.copy(module)
    view._modules = dict(module._modules)
    for name, value in changes.items():
        setattr(view, name, value)
    return view


def _is_bn(module: nn.Module) -> bool:
    return (isinstance(module, BN_TYPES) and getattr(module, "running_mean", None) is not None
            and getattr(module, "running_var", None) is not None)


def _require_anchors(raw: TorchvisionOutputs) -> list[Tensor]:
    if raw.anchors is None:
        raise ValueError("raw outputs carry no anchors: pass what TorchvisionAdapter.forward returned")
    return raw.anchors


def _model_classes(model: Any, family: str) -> int:
    """The number of outputs of the model's classifier (its label space)."""
    if family == "rcnn":
        return int(model.roi_heads.box_predictor.cls_score.out_features)
    head = model.head.classification_head
    return int(head.num_classes if family in ("retinanet", "fcos") else head.num_columns)


def _coco_labels() -> list[int]:
    """The 80 COCO classes' ids in torchvision's 91-id space."""
    return [i for i, name in enumerate(_COCO_91) if name not in _NOT_A_CLASS]


def _resolve_labels(family: str, model_classes: int, class_names: Sequence[str] | None,
                    label_map: Sequence[int] | None) -> tuple[tuple[int, ...], list[str]]:
    """``(label_map, class_names)`` from the arguments and the model's label space (see the class docstring)."""
    offset = 1 if family in _BACKGROUND_AT_0 else 0
    coco = model_classes == len(_COCO_91)
    if label_map is not None:
        mapping = tuple(int(i) for i in label_map)
        if not mapping or len(set(mapping)) != len(mapping) or not all(offset <= i < model_classes for i in mapping):
            raise ValueError(f"label_map must list distinct model labels in [{offset}, {model_classes}) (the "
                             f"model's classes{', 0 is the background' if offset else ''}), got {list(mapping)}")
    elif coco and (class_names is None or len(class_names) == len(_coco_labels())):
        mapping = tuple(_coco_labels())
    else:
        mapping = tuple(range(offset, model_classes))
    if class_names is None:
        names = [_COCO_91[i] if coco else f"class_{n}" for n, i in enumerate(mapping)]
    else:
        names = list(class_names)
        if len(names) != len(mapping):
            raise ValueError(f"class_names has {len(names)} names but the model has {len(mapping)} classes "
                             f"(model labels {mapping[0]}..{mapping[-1]}); pass label_map to choose which model "
                             "labels the names belong to")
    return mapping, names


def _read_state_dict(path: PathLike) -> dict[str, Tensor]:
    """A state dict from ``path``: a plain one, or a torchvision reference checkpoint's ``"model"``."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state dict (name -> tensor) nor a checkpoint with one under 'model'")
    return state


def _load_backbone(model: Any, path: PathLike) -> None:
    """Copy a classification network's weights into the detector backbone's feature extractor.

    torchvision cuts detection backbones from classifiers keeping their layers in order
    (``backbone.body`` of FPN models, ``backbone.features`` of SSD), so the extractor's
    tensors are the classifier's first ones; each pair must agree in shape and kind.
    """
    backbone = model.backbone
    extractor = next((getattr(backbone, a) for a in ("body", "features") if hasattr(backbone, a)), backbone)
    source = [(k, v) for k, v in _read_state_dict(path).items() if not k.endswith("num_batches_tracked")]
    target = [k for k in extractor.state_dict() if not k.endswith("num_batches_tracked")]
    if len(source) < len(target):
        raise ValueError(f"backbone_weights {path} has {len(source)} tensors, the backbone needs {len(target)}")
    wanted = extractor.state_dict()
    mapped = {}
    for key, (src_key, value) in zip(target, source, strict=False):
        if value.shape != wanted[key].shape or key.rsplit(".", 1)[-1] != src_key.rsplit(".", 1)[-1]:
            raise ValueError(f"backbone_weights {path}: {src_key} {tuple(value.shape)} does not fit the backbone's "
                             f"{key} {tuple(wanted[key].shape)}; give the weights of the classifier this builder "
                             "cuts its backbone from (ssdlite320_mobilenet_v3_large without weights builds a "
                             "reduced-tail MobileNetV3 that ImageNet weights do not fit)")
        mapped[key] = value
    extractor.load_state_dict(mapped, strict=True)  # BatchNorm fills a missing num_batches_tracked itself
