"""Time-unit conversions and capability checks."""

import pytest
import torch

from twinloss_adapters.conventions import Capabilities, TimeConvention


@pytest.mark.parametrize(
    ("convention", "expected"),
    [
        (TimeConvention(scale=1000.0), [1000.0, 250.0, 0.0, 250.0]),
        (TimeConvention(scale=1.0), [1.0, 0.25, 0.0, 0.25]),
        (TimeConvention(scale=1000.0, reversed=True), [0.0, 750.0, 1000.0, 750.0]),
    ],
)
def test_backbone_timestep_uses_the_unsigned_time(convention: TimeConvention, expected: list[float]) -> None:
    t = torch.tensor([1.0, 0.25, 0.0, -0.25], dtype=torch.float64)
    torch.testing.assert_close(convention.to_backbone(t), torch.tensor(expected, dtype=torch.float64))


def test_output_sign() -> None:
    velocity = torch.randn(2, 3)
    torch.testing.assert_close(TimeConvention().to_twinloss_velocity(velocity), velocity)
    torch.testing.assert_close(TimeConvention(output_sign=-1).to_twinloss_velocity(velocity), -velocity)


def test_output_scale_multiplies_the_prediction_and_composes_with_the_sign() -> None:
    velocity = torch.randn(2, 3)
    scaled = TimeConvention(output_scale=1.5, output_sign=-1).to_twinloss_velocity(velocity)
    torch.testing.assert_close(scaled, -1.5 * velocity, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"scale": 0.0}, "scale"), ({"output_sign": 2}, "output_sign"), ({"output_scale": 0.0}, "output_scale"),
     ({"output_scale": float("inf")}, "output_scale")],
)
def test_invalid_conventions_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TimeConvention(**kwargs)


def test_capability_checks() -> None:
    full = Capabilities(target_time=True, sign=True)
    full.check_times(torch.tensor([1.0, -0.5]), torch.tensor([0.0, -0.5]))
    full.require(target_time=True, sign=True)
    with pytest.raises(ValueError, match="same shape"):
        full.check_times(torch.ones(2), torch.ones(3))
    with pytest.raises(ValueError, match="float"):
        full.check_times(torch.ones(2, dtype=torch.int64), torch.ones(2, dtype=torch.int64))
    no_r = Capabilities(target_time=False, sign=True)
    no_r.check_times(torch.tensor([0.5, -0.5]), torch.tensor([0.5, -0.5]))
    with pytest.raises(ValueError, match="target_time=False"):
        no_r.check_times(torch.tensor([0.5]), torch.tensor([0.2]))
    with pytest.raises(ValueError, match=r"lacks \['target_time'\]"):
        no_r.require(target_time=True)
    no_sign = Capabilities(target_time=True, sign=False)
    with pytest.raises(ValueError, match="sign=False"):
        no_sign.check_times(torch.tensor([-0.5]), torch.tensor([-0.2]))
