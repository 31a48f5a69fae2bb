from __future__ import annotations

import pytest
import torch

from diode._boxes import detections_as_targets, pack_targets, unpack_targets, validate_targets


def test_detections_as_targets_drops_degenerate_and_non_finite_boxes() -> None:
    det = {"boxes": torch.tensor([[0.0, 0.0, 5.0, 5.0], [3.0, 3.0, 3.0, 8.0], [float("nan"), 0, 1, 1]]),
           "scores": torch.tensor([0.9, 0.8, 0.7]), "labels": torch.tensor([1, 2, 0], dtype=torch.int32)}
    (t,) = detections_as_targets([det])
    assert t["boxes"].tolist() == [[0.0, 0.0, 5.0, 5.0]] and t["labels"].tolist() == [1]
    assert t["labels"].dtype == torch.long and set(t) == {"boxes", "labels"}


def test_pack_unpack_round_trip_and_validation_messages() -> None:
    targets = [{"boxes": torch.tensor([[1.0, 1.0, 4.0, 4.0]]), "labels": torch.tensor([0])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    back = unpack_targets(*pack_targets(targets), batch_size=2)
    assert torch.equal(back[0]["boxes"], targets[0]["boxes"]) and len(back[1]["boxes"]) == 0
    with pytest.raises(ValueError, match=r"targets\[0\] box 0 .* outside \[0, 1\)"):
        validate_targets([{"boxes": torch.tensor([[1.0, 1, 4, 4]]), "labels": torch.tensor([3])}], num_classes=1)
