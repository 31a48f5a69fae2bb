from __future__ import annotations

import pytest
import torch
from torch import nn

from diode._utils import check_int, check_number, derive_seed, device_of


def test_device_of_takes_parameters_then_buffers_and_names_an_empty_model() -> None:
    assert device_of(nn.Linear(2, 2)) == torch.device("cpu")
    only_buffers = nn.BatchNorm2d(3, affine=False)
    assert device_of(only_buffers) == torch.device("cpu")
    with pytest.raises(ValueError, match="student has no parameters"):
        device_of(nn.Identity(), "student")


def test_derive_seed_depends_only_on_the_keys() -> None:
    assert derive_seed(0, 1) == derive_seed(0, 1)
    assert derive_seed(0, 1) != derive_seed(1, 0)
    assert 0 <= derive_seed(2**40, 7) < 2**63


def test_validators_name_the_argument() -> None:
    check_int("epochs", 3, 1)
    with pytest.raises(ValueError, match="epochs must be an int >= 1"):
        check_int("epochs", True, 1)
    check_number("lr", 0.1, 0.0, float("inf"), open_low=True, open_high=True)
    with pytest.raises(ValueError, match=r"lr must be a finite number in \(0.0, inf\)"):
        check_number("lr", 0.0, 0.0, float("inf"), open_low=True, open_high=True)
    with pytest.raises(ValueError, match="conf"):
        check_number("conf", float("nan"), 0.0, 1.0)


def test_adapter_device_falls_back_to_buffers() -> None:
    from torch import nn

    from diode.adapters._common import ModelAdapter

    adapter = ModelAdapter()
    adapter.model = nn.BatchNorm2d(3, affine=False)  # running statistics only: buffers, no parameters
    assert adapter.device == torch.device("cpu")
