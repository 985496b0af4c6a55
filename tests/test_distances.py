"""Per-row distances in float32, Barron's weight detached."""

import pytest
import torch
from torch.testing import assert_close

from twinloss import BarronDistance, L2Distance


def test_l2_is_rowwise_mean_squared_error():
    p, q = torch.randn(2, 5, 3, 4, dtype=torch.float64).unbind(0)
    assert_close(L2Distance()(p, q), ((p - q) ** 2).mean(dim=(1, 2)))


def test_computed_in_float32_for_low_precision():
    p = torch.randn(4, 8).to(torch.bfloat16)
    q = torch.randn(4, 8).to(torch.bfloat16)
    out = BarronDistance()(p, q)
    assert out.dtype == torch.float32
    assert_close(L2Distance()(p, q), ((p.float() - q.float()) ** 2).mean(1))


def test_barron_value_and_detached_weight():
    p = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    q = torch.randn(6, 10, dtype=torch.float64)
    c = 1e-3
    out = BarronDistance(alpha=1.0, c=c)(p, q)
    mse = ((p - q) ** 2).mean(1)
    weight = (mse / (c**2) + 1) ** -0.5
    assert_close(out, mse * weight / c)
    out.sum().backward()
    # the weight is held fixed: gradient = weight / c * d(mse)/dp
    expected = (weight / c)[:, None] * 2 * (p - q) / 10
    assert_close(p.grad, expected.detach())


def test_barron_alpha_two_is_scaled_l2():
    p, q = torch.randn(2, 3, 7).unbind(0)
    assert_close(BarronDistance(alpha=2.0, c=0.5)(p, q), L2Distance()(p, q) / 0.5)


def test_bad_parameters():
    with pytest.raises(ValueError, match="^c "):
        BarronDistance(c=0.0)
    with pytest.raises(ValueError, match="^alpha "):
        BarronDistance(alpha=float("inf"))
