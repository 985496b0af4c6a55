"""Closed-form checks of twinloss.metrics (float64 where the figure allows)."""

import math

import pytest
import torch
from torch.testing import assert_close

from twinloss import metrics


def _gaussian(n: int, dim: int, mean: float, std: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return mean + std * torch.randn(n, dim, generator=g, dtype=torch.float64)


def test_sliced_wasserstein_of_a_shift_is_norm_over_sqrt_dim():
    # Projections of x and x + c differ by theta.c exactly, so SW_2^2 = E(theta.c)^2 = |c|^2 / D.
    x = _gaussian(500, 4, 0.0, 1.0, seed=0)
    shift = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    value = metrics.sliced_wasserstein(x, x + shift, projections=5000, generator=torch.Generator().manual_seed(1))
    assert_close(value, shift.norm() / math.sqrt(4), rtol=0.02, atol=0)


def test_sliced_wasserstein_between_isotropic_gaussians():
    # W2^2 of N(m1, s1^2) vs N(m2, s2^2) in 1-D is (m1 - m2)^2 + (s1 - s2)^2; theta.(m1 - m2) has
    # mean square |dm|^2 / D over the sphere.
    dim = 3
    x = _gaussian(8000, dim, 0.0, 1.0, seed=2)
    y = _gaussian(8000, dim, 0.0, 2.0, seed=3) + torch.tensor([1.5, 0.0, 0.0], dtype=torch.float64)
    expected = math.sqrt(1.5**2 / dim + (2.0 - 1.0) ** 2)
    value = metrics.sliced_wasserstein(x, y, projections=300, generator=torch.Generator().manual_seed(4))
    assert_close(value, torch.tensor(expected, dtype=torch.float64), rtol=0.03, atol=0)


def test_sliced_wasserstein_identical_sets_and_unequal_sizes():
    x = _gaussian(300, 2, 0.0, 1.0, seed=5)
    assert float(metrics.sliced_wasserstein(x, x)) == 0.0
    # Unequal sizes go through quantiles: a set and its duplicate-each-point copy have the same law.
    doubled = torch.cat([x, x])
    assert float(metrics.sliced_wasserstein(x, doubled, generator=torch.Generator().manual_seed(0))) < 0.02


def test_mmd_identical_sets_is_zero_and_point_masses_match_closed_form():
    x = _gaussian(200, 3, 0.0, 1.0, seed=6)
    assert_close(metrics.mmd_rbf(x, x, bandwidths=(0.5, 1.0)), torch.tensor(0.0, dtype=torch.float64))
    a = torch.zeros(10, 2, dtype=torch.float64)
    b = torch.full((7, 2), 1.0, dtype=torch.float64)  # |a - b|^2 = 2
    sigma = 1.3
    expected = 2 - 2 * math.exp(-2 / (2 * sigma**2))
    assert_close(metrics.mmd_rbf(a, b, bandwidths=(sigma,)), torch.tensor(expected, dtype=torch.float64))


def test_mmd_between_gaussians_matches_closed_form():
    # For N(mu_i, s^2 I) and an RBF kernel of width w: E k(X, X') = (w^2 / (w^2 + 2 s^2))^(D/2),
    # E k(X, Y) = the same times exp(-|dmu|^2 / (2 (w^2 + 2 s^2))).
    dim, s, w, shift = 2, 0.5, 1.0, 0.8
    x = _gaussian(3000, dim, 0.0, s, seed=7)
    y = _gaussian(3000, dim, 0.0, s, seed=8) + torch.tensor([shift, 0.0], dtype=torch.float64)
    same = (w**2 / (w**2 + 2 * s**2)) ** (dim / 2)
    expected = 2 * same - 2 * same * math.exp(-(shift**2) / (2 * (w**2 + 2 * s**2)))
    assert_close(metrics.mmd_rbf(x, y, bandwidths=(w,)), torch.tensor(expected, dtype=torch.float64), rtol=0.08, atol=2e-3)


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    # Diagonal covariances commute: FD = |dmu|^2 + sum (s1 - s2)^2.
    g = torch.Generator().manual_seed(9)
    std_a = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    std_b = torch.tensor([1.5, 1.0, 0.5], dtype=torch.float64)
    mean_b = torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)
    a = torch.randn(50000, 3, generator=g, dtype=torch.float64) * std_a
    b = torch.randn(50000, 3, generator=g, dtype=torch.float64) * std_b + mean_b
    expected = mean_b.square().sum() + (std_a - std_b).square().sum()
    assert_close(metrics.frechet_distance(a, b).double(), expected, rtol=0.03, atol=0.02)
    assert float(metrics.frechet_distance(a, a)) < 1e-6


def test_random_conv_features_are_fixed_by_the_seed():
    images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    f1 = metrics.RandomConvFeatures(in_channels=3, seed=0)
    f2 = metrics.RandomConvFeatures(in_channels=3, seed=0)
    f3 = metrics.RandomConvFeatures(in_channels=3, seed=1)
    assert f1(images).shape == (8, f1.num_features)
    assert torch.equal(f1(images), f2(images))
    assert not torch.equal(f1(images), f3(images))
    assert not any(p.requires_grad for p in f1.parameters())


def test_image_frechet_distance_orders_a_small_and_a_large_corruption():
    g = torch.Generator().manual_seed(1)
    base = torch.rand(400, 1, 8, 8, generator=g)
    other = torch.rand(400, 1, 8, 8, generator=g)
    slightly = other + 0.05 * torch.randn(other.shape, generator=g)
    heavily = torch.randn(other.shape, generator=g)
    features = metrics.RandomConvFeatures(in_channels=1, width=8)
    small = float(metrics.image_frechet_distance(base, slightly, features=features))
    large = float(metrics.image_frechet_distance(base, heavily, features=features))
    assert 0 <= small < large


def test_mode_statistics_collapse_blur_and_coverage():
    g = torch.Generator().manual_seed(2)
    centers = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    labels = torch.randint(0, 4, (4000,), generator=g)
    data = centers[labels] + 0.1 * torch.randn(4000, 2, generator=g)
    same_law = centers[labels] + 0.1 * torch.randn(4000, 2, generator=g)
    stats = metrics.mode_statistics(same_law, data, centers)
    assert stats.coverage == 1.0 and abs(stats.diversity_ratio - 1.0) < 0.05
    assert abs(sum(stats.mode_fractions) - 1.0) < 1e-9

    blurred = centers[labels] + 0.3 * torch.randn(4000, 2, generator=g)  # 3x the spread
    assert abs(metrics.mode_statistics(blurred, data, centers).diversity_ratio - 3.0) < 0.15

    collapsed = centers[labels[:4000] % 2] + 1e-3 * torch.randn(4000, 2, generator=g)  # two modes, points
    stats = metrics.mode_statistics(collapsed, data, centers)
    assert stats.coverage == 0.5 and stats.diversity_ratio < 0.05


def test_mode_weight_error_is_the_total_variation_between_mode_weights():
    centers = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    data = centers[torch.tensor([0, 0, 1, 1, 2, 2, 2, 2])]  # weights 1/4, 1/4, 1/2
    samples = centers[torch.tensor([0, 0, 0, 1, 2, 2, 2, 2, 2, 2])]  # weights 3/10, 1/10, 6/10
    stats = metrics.mode_statistics(samples + 0.01, data, centers)
    assert stats.data_mode_fractions == (0.25, 0.25, 0.5)
    assert stats.mode_weight_error == pytest.approx(0.5 * (0.05 + 0.15 + 0.1), abs=1e-12)
    assert metrics.mode_statistics(data + 0.01, data, centers).mode_weight_error == 0.0


def _two_modes(weight: float, n: int, seed: int) -> torch.Tensor:
    """``n`` points, a share ``weight`` of them around (-2, 0) and the rest around (2, 0), std 0.1."""
    g = torch.Generator().manual_seed(seed)
    left = torch.rand(n, generator=g) < weight
    return torch.where(left[:, None], torch.tensor([-2.0, 0.0]), torch.tensor([2.0, 0.0])) + 0.1 * torch.randn(
        n, 2, generator=g
    )


def test_weighted_sliced_wasserstein_closed_form_in_one_dimension():
    # x = {0, 1}, y = {0, 0, 0, 1}: with equal weights the quantile functions differ by 1 on (1/2, 3/4],
    # so W2 = sqrt(1/4); weighted 3/4 and 1/4, x is y's law and the distance is 0.
    x, y = torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0], [0.0], [0.0], [1.0]])
    half = metrics.sliced_wasserstein(x, y, projections=8, x_weights=torch.tensor([1.0, 1.0]))
    assert float(half) == pytest.approx(0.5, abs=1e-12)
    assert float(metrics.sliced_wasserstein(x, y, projections=8, x_weights=torch.tensor([3.0, 1.0]))) == 0.0


def test_integer_weights_equal_repeating_the_points_and_equal_weights_change_nothing():
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    repeated = x[torch.tensor([0, 1, 1, 2, 2, 2])]
    for p in (1.0, 2.0):
        weighted = metrics.sliced_wasserstein(x, y, p=p, x_weights=torch.tensor([1.0, 2.0, 3.0]),
                                              generator=torch.Generator().manual_seed(0))
        plain = metrics.sliced_wasserstein(repeated, y, p=p, generator=torch.Generator().manual_seed(0))
        assert_close(weighted, plain, rtol=1e-10, atol=1e-12)
    equal = metrics.sliced_wasserstein(repeated, y, x_weights=torch.ones(6), generator=torch.Generator().manual_seed(0))
    assert_close(equal, metrics.sliced_wasserstein(repeated, y, generator=torch.Generator().manual_seed(0)))


def test_mode_balancing_weights_give_each_mode_the_data_share():
    centers = torch.tensor([[-2.0, 0.0], [2.0, 0.0]])
    data, samples = _two_modes(0.5, 4000, seed=0), _two_modes(0.7, 3000, seed=1)
    kept = samples.clone()
    weights = metrics.mode_balancing_weights(samples, data, centers)
    assert torch.equal(samples, kept) and weights.shape == (3000,)
    left, data_left = metrics.nearest_mode(samples, centers) == 0, metrics.nearest_mode(data, centers) == 0
    assert float(weights[left].sum()) == pytest.approx(float(data_left.double().mean()), abs=1e-12)
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-12)
    # Same shape, wrong weights (0.7 against 0.5 of the mass 4 apart): weighted, the distance is gone.
    wrong = float(metrics.sliced_wasserstein(samples, data, generator=torch.Generator().manual_seed(5)))
    fixed = float(metrics.sliced_wasserstein(samples, data, generator=torch.Generator().manual_seed(5),
                                             x_weights=weights))
    assert wrong > 1.0 and fixed < 0.02 * wrong


def test_mode_balancing_weights_refuse_a_mode_without_samples():
    centers = torch.tensor([[-2.0, 0.0], [2.0, 0.0]])
    with pytest.raises(ValueError, match=r"modes \[1\]"):
        metrics.mode_balancing_weights(_two_modes(1.0, 100, seed=0), _two_modes(0.5, 100, seed=1), centers)


def test_mean_pairwise_distance_closed_form():
    # Two points at distance 5: every distinct pair has distance 5.
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    assert_close(metrics.mean_pairwise_distance(x), torch.tensor(5.0))
    assert float(metrics.mean_pairwise_distance(torch.ones(10, 3))) == 0.0


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: metrics.sliced_wasserstein(torch.zeros(4, 2), torch.zeros(4, 3)), "same number of features"),
        (lambda: metrics.sliced_wasserstein(torch.zeros(4, 2), torch.zeros(4, 2), projections=0), "projections"),
        (lambda: metrics.mmd_rbf(torch.zeros(4, 2), torch.zeros(4, 2), bandwidths=(0.0,)), "bandwidths"),
        (lambda: metrics.mmd_rbf(torch.full((4, 2), float("nan")), torch.zeros(4, 2)), "NaN"),
        (lambda: metrics.frechet_distance(torch.zeros(1, 2), torch.zeros(4, 2)), "at least 2"),
        (lambda: metrics.mode_statistics(torch.zeros(4, 2), torch.zeros(4, 2), torch.zeros(2, 2), min_share=0.0), "min_share"),
        (lambda: metrics.sliced_wasserstein(torch.zeros(4, 2), torch.zeros(4, 2), x_weights=torch.ones(3)), "x_weights"),
        (lambda: metrics.sliced_wasserstein(torch.zeros(2, 2), torch.zeros(4, 2), x_weights=torch.tensor([1.0, -1.0])),
         "x_weights"),
        (lambda: metrics.sliced_wasserstein(torch.zeros(2, 2), torch.zeros(4, 2), x_weights=torch.zeros(2)), "x_weights"),
    ],
)
def test_bad_input_raises_value_error_naming_it(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_mode_statistics_radius_leaves_stranded_samples_out_of_the_spread():
    g = torch.Generator().manual_seed(3)
    centers = torch.tensor([[-2.0, 0.0], [2.0, 0.0]])
    labels = torch.randint(0, 2, (2000,), generator=g)
    data = centers[labels] + 0.1 * torch.randn(2000, 2, generator=g)
    same = centers[labels] + 0.1 * torch.randn(2000, 2, generator=g)
    stranded = torch.cat([same[:1800], torch.zeros(200, 2) + torch.tensor([0.0, 1.5])])  # 10% between modes
    without = metrics.mode_statistics(stranded, data, centers)
    within = metrics.mode_statistics(stranded, data, centers, radius=0.5)
    assert without.diversity_ratio > 3 and without.off_mode_fraction == 0.0
    assert abs(within.diversity_ratio - 1.0) < 0.06 and abs(within.off_mode_fraction - 0.1) < 1e-9


def _rbf_mean(u: torch.Tensor, v: torch.Tensor, sigma: float, skip_diagonal: bool) -> float:
    """Mean of exp(-|u_i - v_j|^2 / (2 sigma^2)) over all pairs, or over i != j, in float64 loops."""
    total, count = 0.0, 0
    for i, a in enumerate(u.tolist()):
        for j, b in enumerate(v.tolist()):
            if skip_diagonal and i == j:
                continue
            total += math.exp(-sum((p - q) ** 2 for p, q in zip(a, b, strict=True)) / (2 * sigma**2))
            count += 1
    return total / count


def test_unbiased_mmd_leaves_out_self_pairs_and_is_not_clipped():
    x, y = _gaussian(9, 2, 0.0, 1.0, seed=20), _gaussian(7, 2, 0.3, 1.0, seed=21)
    sigmas = (0.7, 1.5)
    expected = sum(
        _rbf_mean(x, x, w, True) + _rbf_mean(y, y, w, True) - 2 * _rbf_mean(x, y, w, False) for w in sigmas
    ) / len(sigmas)
    value = metrics.mmd_rbf(x, y, bandwidths=sigmas, unbiased=True)
    assert_close(value, torch.tensor(expected, dtype=torch.float64))
    # Two draws of one law: the U-statistic averages to 0, so single values fall below it; the V-statistic cannot.
    draws = [metrics.mmd_rbf(_gaussian(40, 2, 0.0, 1.0, seed=2 * k), _gaussian(40, 2, 0.0, 1.0, seed=2 * k + 1),
                             bandwidths=(1.0,), unbiased=True) for k in range(20)]
    assert min(float(d) for d in draws) < 0
    assert abs(float(torch.stack(draws).mean())) < 3 * float(torch.stack(draws).std()) / math.sqrt(20)


def test_unbiased_mmd_needs_two_samples_per_set():
    with pytest.raises(ValueError, match="unbiased=True needs at least 2 samples"):
        metrics.mmd_rbf(torch.zeros(1, 2), torch.zeros(5, 2), bandwidths=(1.0,), unbiased=True)
