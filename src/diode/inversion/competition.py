"""Adaptive DeepInversion's competition term for detectors: favour images the student gets wrong.

Adaptive DeepInversion (Yin et al., 2020) adds to the inversion loss a term that rewards
disagreement between the teacher and a student on the synthesized images, and trains
the student on those images between batches, so each new batch carries knowledge the
student lacks. :class:`CompetitionTerm` is that term for any pair of detectors, through
the adapter protocol alone; it plugs into :class:`~diode.DeepInversionLoss` as an extra
named term.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from diode._utils import device_of
from diode.adapters.base import DetectorAdapter
from diode.inversion.synthesizer import _private_copy

__all__ = ["CompetitionTerm"]


class CompetitionTerm:
    """The negative relative gap between a student's and the teacher's task loss on the synthesis targets.

    On the augmented images ``x`` and targets ``y`` of an iteration, with ``L_T`` the
    teacher's task loss (from the raw outputs the loss already has) and ``L_S`` the
    student's (one forward of the student):

        ``competition = -(L_S - L_T) / (|L_S| + |L_T| + eps)``, in ``[-1, 1]``.

    Minimizing it (with a positive weight) moves the images towards where the student
    fails on labels the teacher gets right, like ADI's ``1 - JS(p_T, p_S)``, but for any
    two detectors: class maps of different heads cannot be compared, task losses on
    the same boxes can. The targets are the synthesis targets, which the task term
    drives the teacher to detect, so they stand in for the teacher's detections without
    an extra forward. The ratio makes the term unit-free (a weight transfers across
    detectors whose losses differ in scale) and bounded, like the JS divergence: it is 0
    when the student equals the teacher (and so is its gradient), and tends to -1 as the
    student's loss dwarfs the teacher's.

    The term uses a frozen private copy of ``student`` (eval mode, no parameter
    gradients), so synthesis never touches the caller's student; Adaptive DeepInversion
    alternates synthesis and student training, so refresh the copy with :meth:`update`
    after each training step::

        term = diode.CompetitionTerm(student, teacher=teacher)
        loss = diode.DeepInversionLoss(teacher, terms={"competition": (0.5, term)})
        synth = diode.Synthesizer(teacher, loss=loss)
        for b in range(num_batches):
            result = synth.run(sampler.sample(batch_size, generator=g), generator=g)
            train_student_on(result.images)   # e.g. diode.Distiller on the images so far
            term.update(student)              # the next batch competes with the new student

    Args:
        student: the student detector (any :class:`~diode.DetectorAdapter`).
        teacher: the teacher whose raw outputs the loss passes in.
        generator: seeds any random draw the two ``task_loss`` calls make (the same
            draws for both, so identical models agree exactly); ``None`` passes ``None``.
        eps: added to the denominator (both losses at 0 give 0).
    """

    def __init__(self, student: DetectorAdapter, *, teacher: DetectorAdapter,
                 generator: torch.Generator | None = None, eps: float = 1e-8) -> None:
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if not (isinstance(eps, (int, float)) and eps > 0):
            raise ValueError(f"eps must be a number > 0, got {eps!r}")
        if student.num_classes != teacher.num_classes:
            raise ValueError(f"the student has {student.num_classes} classes and the teacher {teacher.num_classes}: "
                             "the competition term compares their losses on the same labels")
        self.teacher = teacher
        self.generator = generator
        self.eps = float(eps)
        self._student = _private_copy(student, channels_last=False, compile=False)

    @property
    def student(self) -> DetectorAdapter:
        """The frozen copy of the student that the term runs."""
        return self._student

    def update(self, student: DetectorAdapter) -> None:
        """Copy ``student``'s current weights and buffers into the term's frozen copy.

        Raises:
            RuntimeError: ``student`` has another architecture than the one the term was built with.
        """
        with torch.no_grad():
            self._student.model.load_state_dict(student.model.state_dict())

    def __call__(self, images: Tensor, raw: Any, targets: list[dict[str, Tensor]]) -> Tensor:
        """The competition value for one iteration.

        Args:
            images: ``[B, 3, H, W]`` augmented images in ``[0, 1]`` (gradients flow back to them).
            raw: the teacher's raw outputs on ``images``.
            targets: the augmented targets, ``"boxes"`` ``[N, 4]`` xyxy pixels and ``"labels"`` ``[N]``.

        Returns:
            A float32 scalar in ``[-1, 1]`` on ``images``' device.
        """
        device = device_of(self._student)
        seed = None if self.generator is None else int(torch.randint(0, 2**62, (1,), generator=self.generator))
        l_t = self.teacher.task_loss(raw, targets, generator=_seeded(seed, images.device))
        x = images.to(device)
        y = [{k: v.to(device) for k, v in t.items()} for t in targets]
        l_s = self._student.task_loss(self._student.forward(x), y, generator=_seeded(seed, device))
        l_s = l_s.to(images.device, torch.float32)
        l_t = l_t.to(torch.float32)
        return -(l_s - l_t) / (l_s.abs() + l_t.abs() + self.eps)

    def __repr__(self) -> str:
        return f"CompetitionTerm(student={type(self._student).__name__}, teacher={type(self.teacher).__name__})"


def _seeded(seed: int | None, device: torch.device) -> torch.Generator | None:
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)
