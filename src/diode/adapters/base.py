"""The detector adapter protocol: what diode needs from any detector."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn


@runtime_checkable
class DetectorAdapter(Protocol):
    """A detector wrapped for diode.

    Images are float ``[B, 3, H, W]`` RGB in ``[0, 1]``; the adapter owns any
    normalization. Targets and predictions are ``list[dict[str, Tensor]]`` with
    ``"boxes"`` ``[N, 4]`` xyxy in input pixels and ``"labels"`` int64 ``[N]``
    (predictions add ``"scores"`` ``[N]``).
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

    def forward(self, images: Tensor) -> Any:
        """Raw outputs of the detector for ``images`` (differentiable)."""
        ...

    def task_loss(self, raw: Any, targets: list[dict[str, Tensor]]) -> Tensor:
        """Scalar detection loss of ``raw`` outputs against ``targets``."""
        ...

    def predict(self, images: Tensor, *, conf: float = 0.25, iou: float = 0.45) -> list[dict[str, Tensor]]:
        """Post-processed detections, one dict per image (boxes, scores, labels)."""
        ...

    def bn_layers(self) -> list[nn.Module]:
        """The BatchNorm layers whose statistics DeepInversion matches, in forward order."""
        ...
