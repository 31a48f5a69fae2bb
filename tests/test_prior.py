from __future__ import annotations

import pytest
import torch
from conftest import TinyBNAdapter, make_tiny_yolo

from diode.inversion.prior import estimate_class_prior
from diode.inversion.sampler import BBoxSampler


def _biased_yolo(cls: int, *, shift: float = 3.0, objectness: float = 0.0):  # noqa: ANN202
    """The tiny YOLO with ``shift`` added to class ``cls``'s logit bias (and to objectness) in every head."""
    teacher = make_tiny_yolo(0)
    with torch.no_grad():
        for conv, bn in teacher.model.conv_layers():
            if bn is None:  # a head: per anchor (x, y, w, h, obj, classes...)
                b = conv.bias.view(3, 5 + teacher.num_classes)
                b[:, 5 + cls] += shift
                b[:, 4] += objectness
    return teacher


@pytest.mark.parametrize("cls", [0, 1])  # unbiased, the prior ranks class 2 first
def test_loss_method_ranks_the_biased_class_first(cls: int) -> None:
    teacher = _biased_yolo(cls)
    state = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    prior = estimate_class_prior(teacher)
    assert prior.dtype == torch.float64 and prior.shape == (3,)
    assert torch.isclose(prior.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert int(prior.argmax()) == cls
    assert all(torch.equal(v, teacher.model.state_dict()[k]) for k, v in state.items())  # teacher untouched
    assert torch.equal(prior, estimate_class_prior(teacher))  # reproducible
    flatter = estimate_class_prior(teacher, temperature=50.0)
    assert int(flatter.argmax()) == cls and flatter.max() < prior.max()


def test_loss_method_works_for_any_adapter() -> None:
    teacher = TinyBNAdapter(num_classes=4)
    with torch.no_grad():
        teacher.model[-1].bias[1] += 2.0  # the per-class map of class 1 is raised everywhere
    assert int(estimate_class_prior(teacher, image_size=32).argmax()) == 1


def test_detections_method_ranks_the_biased_class_first() -> None:
    teacher = _biased_yolo(1, objectness=4.0)
    prior = estimate_class_prior(teacher, method="detections", image_size=(48, 64))
    assert int(prior.argmax()) == 1 and torch.isclose(prior.sum(), torch.tensor(1.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="detects nothing"):
        estimate_class_prior(TinyBNAdapter(), method="detections")


def test_bias_method_temperature_and_smoothing() -> None:
    teacher = TinyBNAdapter(num_classes=3)
    bias = [0.0, 2.0, -1.0]
    prior = estimate_class_prior(teacher, method="bias", bias=bias)
    assert torch.allclose(prior, torch.softmax(torch.tensor(bias, dtype=torch.float64), dim=0))
    hot = estimate_class_prior(teacher, method="bias", bias=bias, temperature=0.01)
    assert hot[1] > 0.999
    smooth = estimate_class_prior(teacher, method="bias", bias=bias, temperature=0.01, smoothing=0.3)
    assert torch.allclose(smooth.min(), torch.tensor(0.1, dtype=torch.float64), atol=1e-6)
    sampler = BBoxSampler.onebox(num_classes=3, class_prior=hot)
    labels = torch.cat([t["labels"] for t in sampler.sample(32, generator=torch.Generator().manual_seed(0))])
    assert labels.unique().tolist() == [1]


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [({"method": "bias"}, "bias is used"), ({"bias": [1.0, 2.0, 3.0]}, "bias is used"),
     ({"method": "bias", "bias": [1.0, 2.0]}, "3 finite numbers"), ({"method": "guess"}, "method"),
     ({"temperature": 0}, "temperature"), ({"smoothing": 1.5}, "smoothing"), ({"num_images": 0}, "num_images"),
     ({"image_size": (0, 8)}, "image_size"), ({"method": "detections", "conf": 1.0}, "conf")],
)
def test_rejects_bad_options(kwargs: dict, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        estimate_class_prior(TinyBNAdapter(num_classes=3), **kwargs)
