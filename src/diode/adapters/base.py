"""The detector adapter protocol: what diode needs from any detector."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

#: Layer types whose running statistics DeepInversion matches (subclasses included).
BN_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
                                         FrozenBatchNorm2d)


@runtime_checkable
class DetectorAdapter(Protocol):
    """A detector wrapped for diode.

    Images are float ``[B, 3, H, W]`` RGB in ``[0, 1]``; the adapter owns any
    normalization and padding. Targets and predictions are
    ``list[dict[str, Tensor]]`` with ``"boxes"`` ``[N, 4]`` xyxy in input pixels
    and ``"labels"`` int64 ``[N]`` in ``[0, num_classes)`` (predictions add
    ``"scores"`` ``[N]``); an adapter whose model uses another label space
    (background at 0, 91-id COCO) maps to and from it.
    """

    @property
    def model(self) -> nn.Module:
        """The underlying ``nn.Module`` (its parameters' device is the adapter's device)."""
        ...

    @property
    def num_classes(self) -> int:
        """Number of classes; labels are ``0 .. num_classes - 1``."""
        ...

    @property
    def class_names(self) -> list[str]:
        """One name per class."""
        ...

    @property
    def size_divisor(self) -> int:
        """Inputs whose height and width are multiples of this run without padding (1: any size).

        Generic code (the distiller's image size check, the synthesizer's stage sizes)
        asks this instead of looking inside the model.
        """
        ...

    def forward(self, images: Tensor) -> Any:
        """Raw outputs of the detector for ``images`` (differentiable), with BatchNorm in eval mode."""
        ...

    def task_loss(self, raw: Any, targets: list[dict[str, Tensor]], *,
                  generator: torch.Generator | None = None) -> Tensor:
        """Scalar detection loss of ``raw`` outputs against ``targets``.

        ``generator`` is the only source of any random draw the loss makes (proposal or
        anchor sampling), so a seeded synthesis is reproducible; BatchNorm running
        statistics never change.
        """
        ...

    def predict(self, images: Tensor, *, conf: float = 0.25, iou: float = 0.45) -> list[dict[str, Tensor]]:
        """Post-processed detections, one dict per image (boxes, scores, labels)."""
        ...

    def bn_layers(self) -> list[nn.Module]:
        """The BatchNorm layers whose statistics DeepInversion matches, in forward order."""
        ...

    def synthesis_defaults(self) -> dict[str, Any]:
        """:class:`~diode.DeepInversionLoss` options that suit this detector (``{}``: the generic defaults).

        Keys are loss options (``w_task``, ``w_bn``, ``first_bn_weight``, ``w_tv1``, ...);
        explicit arguments to the loss win over these.
        """
        ...
