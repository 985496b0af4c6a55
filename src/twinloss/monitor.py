r"""Watch 1-NFE diversity during training: :class:`DiversityMonitor`.

Fast generators lose diversity first (docs/method.md, section 6). Call the
monitor every ``N`` training steps; each call draws 1-NFE samples and
multi-step samples of the model from the *same fixed noise* and compares
their spread:

* ``pairwise``: mean pairwise distance of each sample set (model-free);
* ``within_mode`` (when the mode ``centers`` of the data are known): the RMS
  distance of the samples to the mean of the mode they fall in.

The 1-NFE/multi-step ratio of each figure is reported, and when the smallest
ratio falls below ``collapse_fraction`` the report is flagged
(``collapsed=True``) and a :class:`ModeCollapseWarning` is issued::

    monitor = DiversityMonitor(noise=torch.randn(512, 2, generator=g))
    for step in range(steps):
        ...
        if step % 500 == 0:
            report = monitor(model, step=step)
            log(report.as_dict())
"""

import math
import warnings
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor, nn

from twinloss import metrics
from twinloss._checks import check_int
from twinloss.protocol import Conditioning, VelocityModel, check_conditioning
from twinloss.sampling import AnyStepSampler

__all__ = ["DiversityMonitor", "DiversityReport", "ModeCollapseWarning"]


class ModeCollapseWarning(UserWarning):
    """1-NFE samples are much less diverse than multi-step samples of the same model."""


@dataclass(frozen=True)
class DiversityReport:
    """One monitor reading.

    Attributes:
        step: the training step given by the caller (``None`` if not given).
        one_step_pairwise: mean pairwise distance of the 1-NFE samples.
        multi_step_pairwise: the same for the multi-step samples.
        pairwise_ratio: ``one_step_pairwise / multi_step_pairwise``.
        one_step_within_mode, multi_step_within_mode: RMS within-mode spread
            (``None`` without ``centers``).
        within_mode_ratio: their ratio (``None`` without ``centers``).
        one_step_coverage, multi_step_coverage: fraction of modes each set
            populates (``None`` without ``centers``).
        ratio: the smallest of the ratios, compared with ``collapse_fraction``.
        collapse_fraction: the threshold in force.
        collapsed: ``ratio < collapse_fraction``.
        one_step_to_multi_step: sliced Wasserstein distance between the two
            sample sets (fixed projections): how far 1 NFE is from multi-step.
    """

    step: int | None
    one_step_pairwise: float
    multi_step_pairwise: float
    pairwise_ratio: float
    one_step_within_mode: float | None
    multi_step_within_mode: float | None
    within_mode_ratio: float | None
    one_step_coverage: float | None
    multi_step_coverage: float | None
    ratio: float
    collapse_fraction: float
    collapsed: bool
    one_step_to_multi_step: float

    def as_dict(self) -> dict[str, float | int | bool | None]:
        """Flat dictionary for a logger."""
        return dict(self.__dict__)


def _ratio(numerator: float, denominator: float) -> float:
    if denominator <= 0:
        return 1.0 if numerator <= 0 else math.inf
    return numerator / denominator


def _within_mode(samples: Tensor, centers: Tensor, min_count: int = 2) -> tuple[float, float]:
    """RMS distance to the own mode's mean (over populated modes) and the populated fraction."""
    flat = samples.reshape(samples.shape[0], -1).to(torch.float32)
    modes = centers.shape[0]
    labels = metrics.nearest_mode(flat, centers)
    spreads = metrics.within_mode_spread(flat, labels, modes, min_count=min_count)
    measured = spreads[~spreads.isnan()]
    spread = math.sqrt(float(measured.double().mean())) if measured.numel() else 0.0
    populated = int((torch.bincount(labels, minlength=modes) >= 1).sum())
    return spread, populated / modes


class DiversityMonitor:
    """Compare 1-NFE with multi-step diversity on a fixed noise batch.

    Args:
        noise: the fixed noise ``[N, ...]`` (N >= 2) used at every call; draw
            it once with a seeded generator.
        cond: fixed conditioning for the model (batch-leading, ``N`` rows).
        multi_steps: Euler steps of the multi-step reference (*default* 50).
        collapse_fraction: warn when 1-NFE diversity falls below this
            fraction of the multi-step one (*default* 0.5), in ``(0, 1]``.
        centers: mode centres ``[K, ...]`` of the data, when known, to add the
            within-mode figures (flattened like the samples).
        warn: issue a :class:`ModeCollapseWarning` on collapse (*default* True;
            the flag in the report is set either way).
        seed: seed of the sliced-Wasserstein projections (*default* 0).
    """

    def __init__(
        self,
        noise: Float[Tensor, " samples *shape"],
        *,
        cond: Conditioning | None = None,
        multi_steps: int = 50,
        collapse_fraction: float = 0.5,
        centers: Float[Tensor, " modes *center_shape"] | None = None,
        warn: bool = True,
        seed: int = 0,
    ) -> None:
        if not noise.is_floating_point() or noise.ndim < 2 or noise.shape[0] < 2:
            raise ValueError(f"noise must be a floating-point tensor [N, ...] with N >= 2, got {tuple(noise.shape)}")
        if not (0.0 < collapse_fraction <= 1.0):
            raise ValueError(f"collapse_fraction must lie in (0, 1], got {collapse_fraction}")
        check_int(multi_steps, "multi_steps", minimum=2)
        if centers is not None and math.prod(centers.shape[1:]) != math.prod(noise.shape[1:]):
            raise ValueError(
                f"centers must have one point per mode shaped like a sample {tuple(noise.shape[1:])}, "
                f"got {tuple(centers.shape)}"
            )
        self.noise = noise.detach().clone()
        self.cond = {key: value.detach().clone() for key, value in check_conditioning(cond, noise.shape[0], name="cond").items()}
        self.collapse_fraction = float(collapse_fraction)
        self.centers = None if centers is None else centers.detach().reshape(centers.shape[0], -1).to(torch.float32).clone()
        self.warn = warn
        self.seed = seed
        self.one_step = AnyStepSampler(1)
        self.multi_step = AnyStepSampler(multi_steps, mode="multi")

    @torch.no_grad()
    def __call__(self, model: VelocityModel, *, step: int | None = None) -> DiversityReport:
        """Sample, measure and (on collapse) warn. The model's train/eval mode is restored."""
        was_training = isinstance(model, nn.Module) and model.training
        if isinstance(model, nn.Module):
            model.eval()
        try:
            one = self.one_step(model, self.noise, cond=self.cond).sample
            multi = self.multi_step(model, self.noise, cond=self.cond).sample
        finally:
            if was_training:
                model.train()
        if not (bool(torch.isfinite(one).all()) and bool(torch.isfinite(multi).all())):
            raise ValueError("the model produced non-finite samples; diversity cannot be measured")
        one_pairwise = float(metrics.mean_pairwise_distance(one))
        multi_pairwise = float(metrics.mean_pairwise_distance(multi))
        ratios = [_ratio(one_pairwise, multi_pairwise)]
        within = (None, None, None, None, None)
        if self.centers is not None:
            centers = self.centers.to(one.device)
            one_spread, one_coverage = _within_mode(one, centers)
            multi_spread, multi_coverage = _within_mode(multi, centers)
            within_ratio = _ratio(one_spread, multi_spread)
            ratios += [within_ratio, _ratio(one_coverage, multi_coverage)]
            within = (one_spread, multi_spread, within_ratio, one_coverage, multi_coverage)
        ratio = min(ratios)
        collapsed = ratio < self.collapse_fraction
        distance = float(
            metrics.sliced_wasserstein(
                one.to(torch.float32), multi.to(torch.float32), generator=torch.Generator().manual_seed(self.seed)
            )
        )
        report = DiversityReport(
            step=step,
            one_step_pairwise=one_pairwise,
            multi_step_pairwise=multi_pairwise,
            pairwise_ratio=ratios[0],
            one_step_within_mode=within[0],
            multi_step_within_mode=within[1],
            within_mode_ratio=within[2],
            one_step_coverage=within[3],
            multi_step_coverage=within[4],
            ratio=ratio,
            collapse_fraction=self.collapse_fraction,
            collapsed=collapsed,
            one_step_to_multi_step=distance,
        )
        if collapsed and self.warn:
            where = "" if step is None else f" at step {step}"
            warnings.warn(
                f"possible mode collapse{where}: 1-NFE diversity is {ratio:.2f} of the multi-step one "
                f"(threshold {self.collapse_fraction}); pairwise ratio {report.pairwise_ratio:.2f}"
                + ("" if report.within_mode_ratio is None else f", within-mode ratio {report.within_mode_ratio:.2f}"),
                ModeCollapseWarning,
                stacklevel=2,
            )
        return report
