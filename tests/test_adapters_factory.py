from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_YOLO_CFG

from diode.adapters.factory import create_adapter


def test_unknown_spec_lists_the_forms() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'nope'.*tv:BUILDER.*registered: yolov3-tiny"):
        create_adapter("nope")


def test_darknet_spec_builds_a_student_and_reloads_its_state_dict(tmp_path: Path) -> None:
    cfg = tmp_path / "tiny.cfg"
    cfg.write_text(TINY_YOLO_CFG)
    student = create_adapter(f"darknet:{cfg}", num_classes=2, trainable=True)
    assert student.model.training and all(p.requires_grad for p in student.model.parameters())
    assert student.num_classes == 2
    torch.save(student.model.state_dict(), tmp_path / "student.pt")
    again = create_adapter(f"darknet:{cfg}", weights=tmp_path / "student.pt")
    assert again.num_classes == 2 and not again.model.training
    for key, value in student.model.state_dict().items():
        assert torch.equal(value, again.model.state_dict()[key])


def test_weights_that_do_not_fit_are_named(tmp_path: Path) -> None:
    cfg = tmp_path / "tiny.cfg"
    cfg.write_text(TINY_YOLO_CFG)
    torch.save({"bogus.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="no module_list"):
        create_adapter(f"darknet:{cfg}", weights=tmp_path / "other.pt")
    with pytest.raises(ValueError, match="does not exist"):
        create_adapter(f"darknet:{cfg}", weights=tmp_path / "missing.pt")
