"""The helpers many modules share (twinloss._checks, twinloss._tensors) and the merged metric helpers."""

import math

import pytest
import torch
from torch.testing import assert_close

from twinloss import metrics
from twinloss._checks import check_int
from twinloss._tensors import at_least_float32, per_row
from twinloss.monitor import _within_mode


@pytest.mark.parametrize("value, minimum", [(0, 0), (3, 1), (2, 2)])
def test_check_int_returns_an_int_at_or_above_the_minimum(value, minimum):
    assert check_int(value, "steps", minimum=minimum) == value


@pytest.mark.parametrize("value", [0, -1, True, 1.0, 2.5, "3", None])
def test_check_int_rejects_bools_floats_strings_and_small_ints_naming_the_argument(value):
    with pytest.raises(ValueError, match=r"^steps must be an int >= 1, got "):
        check_int(value, "steps", minimum=1)


@pytest.mark.parametrize(
    "call, argument",
    [
        (lambda: metrics.sliced_wasserstein(torch.zeros(3, 2), torch.zeros(3, 2), projections=True), "projections"),
        (lambda: metrics.RandomConvFeatures(in_channels=0), "in_channels"),
        (lambda: metrics.RandomConvFeatures(width=0), "width"),
        (lambda: metrics.mode_statistics(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(1, 2), min_count=1), "min_count"),
    ],
)
def test_the_modules_that_moved_to_check_int_keep_its_message(call, argument):
    with pytest.raises(ValueError, match=rf"^{argument} must be an int >= \d+, got "):
        call()


@pytest.mark.parametrize("shape", [(4,), (4, 3), (4, 2, 5, 1)])
def test_per_row_broadcasts_one_value_per_row_over_the_trailing_dims(shape):
    values, like = torch.arange(4.0), torch.ones(shape)
    scaled = per_row(values, like) * like
    assert scaled.shape == like.shape
    for row in range(4):
        assert bool((scaled[row] == values[row]).all())


def test_per_row_is_a_view_of_the_values():
    values = torch.arange(3.0)
    assert per_row(values, torch.ones(3, 2, 2)).data_ptr() == values.data_ptr()


@pytest.mark.parametrize(
    "dtype, expected",
    [
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
    ],
)
def test_at_least_float32_raises_half_precisions_and_keeps_the_rest(dtype, expected):
    assert at_least_float32(dtype) == expected


def _spread_reference(points: torch.Tensor, labels: torch.Tensor, modes: int, min_count: int) -> list[float]:
    """Per-mode mean squared distance to the mode mean, in float64 Python loops."""
    result = []
    for k in range(modes):
        members = [p for p, label in zip(points.double().tolist(), labels.tolist(), strict=True) if label == k]
        if len(members) < min_count:
            result.append(math.nan)
            continue
        mean = [sum(column) / len(members) for column in zip(*members, strict=True)]
        result.append(sum(sum((a - m) ** 2 for a, m in zip(p, mean, strict=True)) for p in members) / len(members))
    return result


@pytest.mark.parametrize("min_count", [1, 2, 4])
def test_within_mode_spread_matches_a_float64_loop_and_ignores_unlabelled_points(min_count):
    g = torch.Generator().manual_seed(0)
    points = torch.randn(40, 3, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 6, (40,), generator=g)  # label 5 is "no mode" for modes=5
    labels[labels == 2] = 5  # mode 2 empty: NaN
    labels[:3] = 3
    labels[3:6] = 4
    spread = metrics.within_mode_spread(points, labels, 5, min_count=min_count)
    assert_close(spread, torch.tensor(_spread_reference(points, labels, 5, min_count), dtype=torch.float64), equal_nan=True)


def test_monitor_within_mode_figure_is_the_rms_of_populated_spreads_and_the_populated_fraction():
    g = torch.Generator().manual_seed(1)
    centers = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0], [5.0, 5.0]])
    samples = torch.cat([
        centers[0] + 0.3 * torch.randn(10, 2, generator=g),
        centers[1] + 0.7 * torch.randn(6, 2, generator=g),
        centers[2].unsqueeze(0),  # one sample: populated, no spread (min_count 2)
    ])
    labels = metrics.nearest_mode(samples, centers)
    reference = _spread_reference(samples, labels, 4, 2)
    measured = [value for value in reference if not math.isnan(value)]
    spread, populated = _within_mode(samples, centers)
    assert spread == pytest.approx(math.sqrt(sum(measured) / len(measured)), rel=1e-6)
    assert populated == 0.75
    assert _within_mode(centers[:1].expand(5, 2), centers) == (0.0, 0.25)
