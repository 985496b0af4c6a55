"""Time distributions: moments against closed forms, explicit generators, ranges."""

import math

import pytest
import torch
from torch.testing import assert_close

from twinloss import BetaTime, KumaraswamyTime, LogitNormalTime, ShiftedTime
from twinloss.time_distributions import kumaraswamy_warp, sample_gamma

N = 40_000


@pytest.mark.parametrize("concentration", [0.4, 1.0, 2.5])
def test_gamma_moments(concentration):
    g = torch.Generator().manual_seed(0)
    draws = sample_gamma(concentration, N, device="cpu", dtype=torch.float64, generator=g)
    # Gamma(k, 1): mean k, variance k
    assert abs(draws.mean().item() - concentration) < 4 * math.sqrt(concentration / N)
    assert abs(draws.var().item() / concentration - 1) < 0.06


@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (2.0, 5.0), (0.5, 0.5)])
def test_beta_moments(alpha, beta):
    g = torch.Generator().manual_seed(1)
    t = BetaTime(alpha, beta)(N, dtype=torch.float64, generator=g)
    mean = alpha / (alpha + beta)
    var = alpha * beta / ((alpha + beta) ** 2 * (alpha + beta + 1))
    assert 0 <= t.min() and t.max() <= 1
    assert abs(t.mean().item() - mean) < 4 * math.sqrt(var / N)
    assert abs(t.var().item() / var - 1) < 0.05


def test_logit_normal_is_sigmoid_of_normal():
    t = LogitNormalTime(mean=0.3, std=0.8)(N, generator=torch.Generator().manual_seed(2))
    logits = torch.logit(t.double())
    assert abs(logits.mean().item() - 0.3) < 0.02
    assert abs(logits.std().item() - 0.8) < 0.02


def test_shift_formula_and_direction():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    base = BetaTime()(1000, generator=g1)
    shifted = ShiftedTime(3.0)(1000, generator=g2)
    assert_close(shifted, 3 * base / (1 + 2 * base))
    assert shifted.mean() > base.mean()  # mass moves towards noise


def test_resolution_shift_keeps_the_ends_and_matches_the_quotient_in_float64():
    from twinloss.time_distributions import resolution_shift

    t = torch.tensor([0.0, 1e-6, 0.25, 0.5, 0.9, 1.0], dtype=torch.float64)
    for shift in (0.3, 1.0, 3.0, 1e6):
        shifted = resolution_shift(t, shift)
        assert shifted.dtype == torch.float64 and shifted[0] == 0 and shifted[-1] == 1
        assert_close(shifted, shift * t / (1 + (shift - 1) * t), rtol=1e-12, atol=1e-15)
    assert resolution_shift(t.float(), 3.0).dtype == torch.float32


def test_kumaraswamy_warp_endpoints_and_monotone():
    u = torch.linspace(0, 1, 101, dtype=torch.float64)
    w = kumaraswamy_warp(u, 1.5, 2.0, 0.7)
    assert w[0] == 0 and w[-1] == 1
    assert bool((w[1:] >= w[:-1]).all())
    assert_close(kumaraswamy_warp(u, 1.0, 1.0, 1.0), u)
    t = KumaraswamyTime(1.5, 2.0, 0.7)(500, generator=torch.Generator().manual_seed(0))
    assert 0 <= t.min() and t.max() <= 1


@pytest.mark.parametrize(
    "dist", [BetaTime(2.0, 3.0), LogitNormalTime(), ShiftedTime(2.0), KumaraswamyTime(2.0, 2.0, 1.0)],
    ids=lambda d: type(d).__name__,
)
def test_same_generator_same_times(dist):
    a = dist(64, generator=torch.Generator().manual_seed(7))
    b = dist(64, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert a.shape == (64,) and a.dtype == torch.float32


@pytest.mark.parametrize(
    "make,name",
    [
        (lambda: BetaTime(0.0, 1.0), "alpha"),
        (lambda: BetaTime(1.0, -2.0), "beta"),
        (lambda: LogitNormalTime(std=0.0), "std"),
        (lambda: ShiftedTime(shift=-1.0), "shift"),
        (lambda: KumaraswamyTime(a=float("nan")), "a"),
    ],
)
def test_bad_parameters_name_the_argument(make, name):
    with pytest.raises(ValueError, match=rf"^{name} "):
        make()


@pytest.mark.parametrize("batch_size", [-1, True])  # non-ints: the type hints reject them first under test
def test_every_time_distribution_rejects_a_bad_batch_size(batch_size):
    from twinloss.time_distributions import BetaTime, KumaraswamyTime, LogitNormalTime, ShiftedTime

    for dist in (BetaTime(), BetaTime(2.0, 3.0), LogitNormalTime(), ShiftedTime(), KumaraswamyTime()):
        with pytest.raises(ValueError, match="^batch_size must be an int >= 0"):
            dist(batch_size)
        assert dist(0).shape == (0,)
