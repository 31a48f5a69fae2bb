from __future__ import annotations

import copy

import pytest
import torch
from conftest import TinyBNAdapter, make_tiny_yolo, onebox_targets

from diode.inversion.competition import CompetitionTerm
from diode.inversion.loss import DeepInversionLoss


def _images(seed: int = 0, n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)


def test_gradient_reaches_images_and_value_is_bounded() -> None:
    teacher, student = make_tiny_yolo(0), make_tiny_yolo(1)
    term = CompetitionTerm(student, teacher=teacher)
    images, targets = _images(), onebox_targets(2)
    value = term(images, teacher.forward(images), targets)
    assert value.shape == () and value.dtype == torch.float32
    assert -1 <= float(value.detach()) <= 1 and float(value.detach()) != 0
    value.backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in student.model.parameters())  # the caller's student is not touched
    assert all(p.grad is None for p in term.student.model.parameters())


def test_zero_value_and_gradient_when_the_student_is_the_teacher() -> None:
    teacher = make_tiny_yolo(0)
    term = CompetitionTerm(copy.deepcopy(teacher), teacher=teacher)
    images, targets = _images(), onebox_targets(2)
    value = term(images, teacher.forward(images), targets)
    value.backward()
    assert float(value.detach()) == 0.0
    assert images.grad is not None and images.grad.abs().max() < 1e-6


def test_minimizing_widens_the_students_loss_gap() -> None:
    teacher, student = make_tiny_yolo(0), make_tiny_yolo(2)
    term = CompetitionTerm(student, teacher=teacher)
    targets = onebox_targets(2)
    x = _images(3)
    opt = torch.optim.Adam([x], lr=0.05)
    values = []
    for _ in range(15):
        value = term(x, teacher.forward(x), targets)
        values.append(float(value.detach()))
        opt.zero_grad()
        value.backward()
        opt.step()
        with torch.no_grad():
            x.clamp_(0, 1)
    assert values[-1] < values[0] - 0.05


def test_update_copies_the_students_weights_and_never_changes_the_caller() -> None:
    teacher, student = make_tiny_yolo(0), make_tiny_yolo(1)
    student.model.train().requires_grad_(True)
    term = CompetitionTerm(student, teacher=teacher)
    assert student.model.training and all(p.requires_grad for p in student.model.parameters())
    assert not term.student.model.training
    images, targets = _images(), onebox_targets(2)
    before = term(images, teacher.forward(images), targets)
    student.model.load_state_dict(teacher.model.state_dict())  # the student "learns" the teacher
    assert torch.equal(term(images, teacher.forward(images), targets), before)  # not seen before update()
    term.update(student)
    assert float(term(images, teacher.forward(images), targets).detach()) == 0.0


def test_extra_term_of_the_inversion_loss() -> None:
    teacher, student = make_tiny_yolo(0), make_tiny_yolo(1)
    term = CompetitionTerm(student, teacher=teacher, generator=torch.Generator().manual_seed(0))
    plain = DeepInversionLoss(teacher)
    loss = DeepInversionLoss(teacher, terms={"competition": (2.0, term)})
    images, targets = _images(), onebox_targets(2)
    total, parts = loss(images, targets)
    base, _ = plain(images, targets)
    assert torch.allclose(total, base + 2.0 * parts["competition"], atol=1e-5)
    assert -1 <= float(parts["competition"]) < 0


def test_rejects_mismatched_classes_and_bad_options() -> None:
    with pytest.raises(ValueError, match="classes"):
        CompetitionTerm(TinyBNAdapter(num_classes=2), teacher=make_tiny_yolo(0))
    with pytest.raises(ValueError, match="eps"):
        CompetitionTerm(make_tiny_yolo(1), teacher=make_tiny_yolo(0), eps=0)
    with pytest.raises(TypeError, match="generator"):
        CompetitionTerm(make_tiny_yolo(1), teacher=make_tiny_yolo(0), generator=0)  # type: ignore[arg-type]
