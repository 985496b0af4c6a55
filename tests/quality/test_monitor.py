"""DiversityMonitor on exact Gaussian flows: one that collapses at 1 NFE and one that does not.

For data ``N(0, s^2 I)`` on the linear path, ``x_t`` has std ``sigma(t) = sqrt(t^2 + (1-t)^2 s^2)``
and the exact flow map is the rescaling ``x_r = sigma(r) / sigma(t) x_t``. Hence

* the exact *average* velocity ``F(x, t, r) = (1 - sigma(r)/sigma(t)) x / (t - r)`` gives
  1-NFE samples with the data's law (no collapse);
* the *instantaneous* velocity used as a one-step jump (what plain flow matching learns,
  ``F(x, t, r) = F(x, t, t)``) maps all noise to the mean at 1 NFE: a full collapse,
  while its 50-step Euler samples keep the data's spread.
"""

import warnings

import pytest
import torch
from torch import Tensor, nn

from twinloss.monitor import DiversityMonitor, DiversityReport, ModeCollapseWarning

DATA_STD = 0.7


def _sigma(t: Tensor) -> Tensor:
    return torch.sqrt(t**2 + (1 - t) ** 2 * DATA_STD**2)


class GaussianFlow(nn.Module):
    """Exact two-time field of N(0, s^2 I); ``average=False`` ignores r (flow matching's field)."""

    def __init__(self, average: bool, shrink: float = 1.0) -> None:
        super().__init__()
        self.average = average
        self.shrink = shrink  # scales the 1-NFE output: a partial collapse

    def forward(self, x_t: Tensor, t: Tensor, r: Tensor) -> Tensor:
        t = t.abs().reshape(-1, *([1] * (x_t.ndim - 1)))
        r = r.abs().reshape(-1, *([1] * (x_t.ndim - 1)))
        instantaneous = (t - (1 - t) * DATA_STD**2) / _sigma(t) ** 2 * x_t
        if not self.average:
            return instantaneous
        gap = t - r
        scale = _sigma(r) / _sigma(t)
        scale = torch.where(r == 0, self.shrink * scale, scale)
        average = (1 - scale) * x_t / gap.clamp(min=1e-12)
        return torch.where(gap > 1e-6, average, instantaneous)


def _noise(n: int = 400, shape: tuple[int, ...] = (2,)) -> Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(0))


def test_healthy_one_step_model_is_not_flagged():
    monitor = DiversityMonitor(_noise(), multi_steps=50)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ModeCollapseWarning)
        report = monitor(GaussianFlow(average=True), step=10)
    assert isinstance(report, DiversityReport) and report.step == 10
    assert not report.collapsed
    assert abs(report.pairwise_ratio - 1.0) < 0.05
    assert report.one_step_to_multi_step < 0.05


def test_flow_matching_field_collapses_at_one_step_and_is_flagged():
    monitor = DiversityMonitor(_noise(), multi_steps=50, collapse_fraction=0.5)
    with pytest.warns(ModeCollapseWarning, match="at step 3"):
        report = monitor(GaussianFlow(average=False), step=3)
    assert report.collapsed and report.ratio < 0.01
    # The multi-step samples keep the data's spread: mean pairwise distance of N(0, s^2 I) in 2-D
    # is s * sqrt(pi) (the distance of two independent draws is Rayleigh with scale s * sqrt(2)).
    assert abs(report.multi_step_pairwise - DATA_STD * torch.pi**0.5) < 0.1


@pytest.mark.parametrize("fraction, flagged", [(0.5, True), (0.25, False)])
def test_partial_collapse_is_judged_against_the_configured_fraction(fraction, flagged):
    monitor = DiversityMonitor(_noise(), collapse_fraction=fraction, warn=False)
    report = monitor(GaussianFlow(average=True, shrink=0.3))
    assert abs(report.pairwise_ratio - 0.3) < 0.02
    assert report.collapsed is flagged


def test_within_mode_figures_with_centers_and_fixed_noise():
    centers = torch.tensor([[-3.0, 0.0], [3.0, 0.0]])
    monitor = DiversityMonitor(_noise(), centers=centers, warn=False)
    model = GaussianFlow(average=True)
    first, second = monitor(model), monitor(model)
    assert first == second  # the same fixed noise every call
    assert first.within_mode_ratio is not None and abs(first.within_mode_ratio - 1.0) < 0.05
    assert first.one_step_coverage == first.multi_step_coverage == 1.0
    collapsed = monitor(GaussianFlow(average=False))
    assert collapsed.collapsed and collapsed.within_mode_ratio < 0.01


def test_monitor_keeps_train_mode_and_caller_noise():
    noise = _noise(64, (1, 4, 4))
    kept = noise.clone()
    model = GaussianFlow(average=True).train()
    report = DiversityMonitor(noise, warn=False)(model)
    assert model.training and torch.equal(noise, kept) and not report.collapsed


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(noise=torch.zeros(1, 2)), "noise"),
        (dict(noise=torch.zeros(8, 2), collapse_fraction=0.0), "collapse_fraction"),
        (dict(noise=torch.zeros(8, 2), multi_steps=1), "multi_steps"),
        (dict(noise=torch.zeros(8, 2), centers=torch.zeros(3, 5)), "centers"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DiversityMonitor(**kwargs)
