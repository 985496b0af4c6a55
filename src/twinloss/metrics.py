r"""Sample-quality and diversity figures for small generative models.

Every function compares a set of generated samples with a set of reference
(held-out) samples, both ``[N, ...]``; trailing dims are flattened, so the same
functions serve 2-D points, images, clips and sequences.

* :func:`sliced_wasserstein`: average over random directions :math:`\theta`
  of the 1-D Wasserstein-``p`` distance between the projections
  :math:`\theta^\top x`. For two sets that differ by a shift ``c`` it is
  :math:`\|c\| / \sqrt{D}` (``p = 2``, many directions).
* :func:`mmd_rbf`: the (biased, V-statistic) squared maximum mean discrepancy
  with a sum of Gaussian kernels; exactly 0 for identical sets.
* :func:`frechet_distance`: the Fréchet (2-Wasserstein) distance between the
  Gaussian fits of two feature sets, as in FID.
* :class:`RandomConvFeatures` and :func:`image_frechet_distance`: a Fréchet
  distance for small images in the feature space of a *fixed random-weight*
  conv net (seeded, never trained). It is not comparable with FID numbers
  from Inception; it is comparable across runs of this library, because the
  same seed always builds the same network.
* :func:`mode_statistics`: for data drawn from a mixture with known centres,
  assign each sample to its nearest centre and report mode coverage, the
  *mode weight error* (total variation between the samples' and the data's
  mode weights) and the *diversity ratio*: within-mode spread of the samples
  over that of the data (1 is ideal; near 0 is mode collapse onto the
  centres, > 1 is blur).
* :func:`mode_balancing_weights`: per-sample weights that give each mode
  the data's weight; passed to :func:`sliced_wasserstein` as ``x_weights``,
  the distance reads the shape of the modes without the error in their
  weights.
* :func:`within_mode_spread`: the per-mode spread behind :func:`mode_statistics` and the monitor.
* :func:`mean_pairwise_distance`: a model-free diversity figure.
"""

import math
from dataclasses import dataclass, field

import torch
from einops import rearrange
from jaxtyping import Float, Int
from torch import Tensor, nn

from twinloss._checks import check_int
from twinloss._tensors import at_least_float32

__all__ = [
    "ModeStatistics",
    "RandomConvFeatures",
    "frechet_distance",
    "image_frechet_distance",
    "mean_pairwise_distance",
    "mmd_rbf",
    "mode_balancing_weights",
    "mode_statistics",
    "nearest_mode",
    "sliced_wasserstein",
    "within_mode_spread",
]


def _flat(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {type(x).__name__}")
    if x.ndim < 2 or x.shape[0] < 1:
        raise ValueError(f"{name} must have shape [N, ...] with N >= 1, got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return rearrange(x, "n ... -> n (...)").to(at_least_float32(x.dtype))


def _same_width(x: Tensor, y: Tensor, names: tuple[str, str]) -> None:
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same number of features per sample, "
            f"got {x.shape[1]} and {y.shape[1]}"
        )


def _quantiles(values: Tensor, levels: Tensor) -> Tensor:
    """Linear-interpolation quantiles of each column of sorted ``values`` ``[N, P]``."""
    n = values.shape[0]
    position = levels * n - 0.5  # the k-th sorted value sits at level (k + 0.5) / n
    low = position.floor().clamp(0, n - 1).long()
    high = (low + 1).clamp(max=n - 1)
    frac = (position - low.to(position.dtype)).clamp(0, 1).unsqueeze(1)
    return values[low] * (1 - frac) + values[high] * frac


def sliced_wasserstein(
    x: Float[Tensor, " n *shape_x"],
    y: Float[Tensor, " m *shape_y"],
    *,
    projections: int = 256,
    p: float = 2.0,
    generator: torch.Generator | None = None,
    x_weights: Float[Tensor, " n_weights"] | None = None,
) -> Float[Tensor, ""]:
    r"""Sliced Wasserstein-``p`` distance :math:`\big(\mathbb E_\theta W_p^p(\theta^\top x, \theta^\top y)\big)^{1/p}`.

    Directions are uniform on the unit sphere. Sets of different sizes are
    compared through their quantile functions at ``max(n, m)`` levels.

    With ``x_weights`` the points of ``x`` carry those probabilities (``y``'s
    stay equal), and each 1-D distance is the exact one between the two step
    quantile functions, :math:`\int_0^1 |F_x^{-1}(u) - F_y^{-1}(u)|^p\,du`,
    summed over the intervals between both sets' cumulative weights. Equal
    weights on sets of equal size give the unweighted figure.

    Args:
        x, y: sample sets (trailing dims flattened; same feature count).
        projections: number of random directions (>= 1; *default* 256).
        p: order (>= 1; *default* 2).
        generator: draws the directions; pass a seeded one for a repeatable figure.
        x_weights: ``[n]`` non-negative weights of the points of ``x`` with a
            positive sum (normalised here); *default* equal.
    """
    check_int(projections, "projections", minimum=1)
    if not (p >= 1 and math.isfinite(p)):
        raise ValueError(f"p must be a finite number >= 1, got {p}")
    a, b = _flat(x, "x"), _flat(y, "y")
    _same_width(a, b, ("x", "y"))
    dtype = torch.promote_types(a.dtype, b.dtype)
    a, b = a.to(dtype), b.to(dtype)
    directions = torch.randn(a.shape[1], projections, generator=generator, dtype=dtype).to(a.device)
    directions = directions / directions.norm(dim=0, keepdim=True)
    if x_weights is not None:
        weights = _probabilities(x_weights, a.shape[0]).to(device=a.device, dtype=torch.float64)
        return _weighted_sliced_wasserstein(a @ directions, weights, b @ directions, p).to(dtype)
    pa, pb = (a @ directions).sort(dim=0).values, (b @ directions).sort(dim=0).values
    if pa.shape[0] != pb.shape[0]:
        count = max(pa.shape[0], pb.shape[0])
        levels = (torch.arange(count, device=a.device, dtype=dtype) + 0.5) / count
        pa, pb = _quantiles(pa, levels), _quantiles(pb, levels)
    return (pa - pb).abs().pow(p).mean().pow(1.0 / p)


def _probabilities(weights: Tensor, count: int) -> Tensor:
    """``weights`` checked (``[count]``, finite, non-negative, positive sum) and divided by their sum."""
    if not isinstance(weights, Tensor) or weights.shape != (count,):
        shape = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(f"x_weights must be a tensor of shape [{count}] (one weight per point of x), got {shape}")
    w = weights.to(torch.float64)
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or not float(w.sum()) > 0:
        raise ValueError("x_weights must be finite and non-negative with a positive sum")
    return w / w.sum()


def _weighted_sliced_wasserstein(pa: Tensor, weights: Tensor, pb: Tensor, p: float) -> Tensor:
    r""":math:`\big(\operatorname{mean}_\theta \int_0^1 |F_a^{-1} - F_b^{-1}|^p\,du\big)^{1/p}` for projections
    ``pa`` ``[n, P]`` weighted by ``weights`` and ``pb`` ``[m, P]`` weighted equally, in float64.

    Both quantile functions are steps; between consecutive breakpoints (the
    two sets' cumulative weights, merged) both are constant, so the integral
    is a sum over those intervals of their length times the gap's power.
    """
    pa, pb = pa.to(torch.float64).T, pb.to(torch.float64).T  # [P, n], [P, m]
    order = pa.argsort(dim=1)
    values_a = pa.gather(1, order)
    cumulative_a = weights[order].cumsum(dim=1)
    values_b = pb.sort(dim=1).values
    m = values_b.shape[1]
    cumulative_b = (torch.arange(1, m + 1, dtype=torch.float64, device=pb.device) / m).expand_as(values_b)
    breaks = torch.cat([cumulative_a, cumulative_b], dim=1).clamp(max=1.0).sort(dim=1).values
    lengths = torch.diff(breaks, dim=1, prepend=torch.zeros_like(breaks[:, :1]))
    middles = (breaks - lengths / 2).contiguous()
    index_a = torch.searchsorted(cumulative_a.contiguous(), middles).clamp(max=values_a.shape[1] - 1)
    index_b = torch.searchsorted(cumulative_b.contiguous(), middles).clamp(max=m - 1)
    gap = (values_a.gather(1, index_a) - values_b.gather(1, index_b)).abs().pow(p)
    return (lengths * gap).sum(dim=1).mean().pow(1.0 / p)


def _median_bandwidth(a: Tensor, b: Tensor) -> float:
    pooled = torch.cat([a, b])[:2048]
    distances = torch.cdist(pooled, pooled)
    off_diagonal = distances[~torch.eye(pooled.shape[0], dtype=torch.bool, device=pooled.device)]
    median = float(off_diagonal.median()) if off_diagonal.numel() else 1.0
    return median if median > 0 else 1.0


def mmd_rbf(
    x: Float[Tensor, " n *shape_x"],
    y: Float[Tensor, " m *shape_y"],
    *,
    bandwidths: tuple[float, ...] | None = None,
    unbiased: bool = False,
) -> Float[Tensor, ""]:
    r"""Squared MMD with the kernel :math:`k(a, b) = \frac1K\sum_k \exp(-\|a - b\|^2 / (2 \sigma_k^2))`.

    *Default*: the biased (V-statistic) estimate
    :math:`\overline{k(x, x')} + \overline{k(y, y')} - 2\,\overline{k(x, y)}`,
    the means over all pairs: non-negative, and exactly 0 when the two sets
    are identical.

    ``unbiased=True``: the U-statistic, whose within-set means leave out the
    pairs of a point with itself (:math:`n(n-1)` and :math:`m(m-1)` pairs).
    Its expectation is the population MMD², so two independent draws of one
    distribution score 0 on average at any sample size (single values can be
    negative and are not clipped), and no sampler can score below that in
    expectation. Needs at least two samples per set.

    Args:
        x, y: sample sets (trailing dims flattened; same feature count).
        bandwidths: kernel widths :math:`\sigma_k` (each > 0). *Default*: the
            median pairwise distance of the pooled sets times
            ``(0.5, 1, 2)``; pass fixed widths to compare runs with each other.
        unbiased: the U-statistic instead of the V-statistic.
    """
    a, b = _flat(x, "x"), _flat(y, "y")
    _same_width(a, b, ("x", "y"))
    dtype = torch.promote_types(a.dtype, b.dtype)
    a, b = a.to(dtype), b.to(dtype)
    if bandwidths is None:
        median = _median_bandwidth(a, b)
        bandwidths = (0.5 * median, median, 2.0 * median)
    if len(bandwidths) == 0 or not all(w > 0 and math.isfinite(w) for w in bandwidths):
        raise ValueError(f"bandwidths must be a non-empty tuple of finite numbers > 0, got {bandwidths}")

    if unbiased and min(a.shape[0], b.shape[0]) < 2:
        raise ValueError(f"unbiased=True needs at least 2 samples per set, got {a.shape[0]} and {b.shape[0]}")

    def pair_mean(kernel: Tensor, without_self_pairs: bool) -> Tensor:
        if not without_self_pairs:
            return kernel.mean()
        n = kernel.shape[0]
        return (kernel.sum() - kernel.diagonal().sum()) / (n * (n - 1))

    def kernel_mean(u: Tensor, v: Tensor, *, without_self_pairs: bool = False) -> Tensor:
        squared = torch.cdist(u, v).square()
        means = [pair_mean(torch.exp(-squared / (2 * w * w)), without_self_pairs) for w in bandwidths]
        return torch.stack(means).mean()

    within = kernel_mean(a, a, without_self_pairs=unbiased) + kernel_mean(b, b, without_self_pairs=unbiased)
    value = within - 2 * kernel_mean(a, b)
    return value if unbiased else value.clamp(min=0)


def _sqrtm_psd(matrix: Tensor) -> Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(
    x: Float[Tensor, "n features_x"], y: Float[Tensor, "m features_y"]
) -> Float[Tensor, ""]:
    r"""Squared Fréchet distance of the Gaussian fits of two feature sets (FID's formula).

    .. math::
        \|\mu_x - \mu_y\|^2 + \mathrm{tr}\big(\Sigma_x + \Sigma_y
        - 2 (\Sigma_x^{1/2} \Sigma_y \Sigma_x^{1/2})^{1/2}\big)

    computed in float64 with symmetric eigendecompositions. Needs at least
    two samples per set.
    """
    a, b = _flat(x, "x").double(), _flat(y, "y").double()
    _same_width(a, b, ("x", "y"))
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"frechet_distance needs at least 2 samples per set, got {a.shape[0]} and {b.shape[0]}")
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], a.shape[1]), torch.cov(b.T).reshape(b.shape[1], b.shape[1])
    root_a = _sqrtm_psd(cov_a)
    cross = _sqrtm_psd(root_a @ cov_b @ root_a)
    value = (mean_a - mean_b).square().sum() + torch.trace(cov_a + cov_b - 2 * cross)
    return value.clamp(min=0).to(torch.float32)


class RandomConvFeatures(nn.Module):
    """A fixed random-weight conv net that maps small images to feature vectors.

    Three 3x3 conv layers (stride 1, 2, 2) with a fixed random init drawn from
    ``torch.Generator().manual_seed(seed)``, each followed by a ReLU; the
    features are the per-channel mean and standard deviation of every
    layer, concatenated. The weights are never trained, so the feature space
    (and every distance measured in it) is the same in every run with the same
    ``seed``, ``in_channels`` and ``width``. Works for any ``H, W >= 4``.

    Args:
        in_channels: image channels ``C`` (>= 1).
        width: channels of the first layer (doubled per layer; *default* 32).
        seed: the seed of the weights (*default* 0).
    """

    def __init__(self, in_channels: int = 1, width: int = 32, seed: int = 0) -> None:
        super().__init__()
        check_int(in_channels, "in_channels", minimum=1)
        check_int(width, "width", minimum=1)
        generator = torch.Generator().manual_seed(seed)
        channels = (in_channels, width, 2 * width, 4 * width)
        self.layers = nn.ModuleList()
        for k, stride in enumerate((1, 2, 2)):
            conv = nn.Conv2d(channels[k], channels[k + 1], 3, stride=stride, padding=1)
            fan_in = channels[k] * 9
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * math.sqrt(2.0 / fan_in))
                conv.bias.zero_()
            conv.requires_grad_(False)
            self.layers.append(conv)
        self.in_channels = in_channels
        self.seed = seed

    @property
    def num_features(self) -> int:
        return 2 * sum(layer.out_channels for layer in self.layers)

    @torch.no_grad()
    def forward(self, images: Float[Tensor, "batch channels height width"]) -> Float[Tensor, "batch features"]:
        if images.shape[1] != self.in_channels:
            raise ValueError(f"images must have {self.in_channels} channels, got shape {tuple(images.shape)}")
        h = images.to(torch.float32)
        features = []
        for layer in self.layers:
            h = torch.relu(layer(h))
            features += [h.mean(dim=(2, 3)), h.std(dim=(2, 3), correction=0)]
        return torch.cat(features, dim=1)


def image_frechet_distance(
    x: Float[Tensor, "n channels height width"],
    y: Float[Tensor, "m channels height_y width_y"],
    *,
    features: RandomConvFeatures | None = None,
) -> Float[Tensor, ""]:
    """Fréchet distance of two image sets in a :class:`RandomConvFeatures` space.

    *Default* extractor: ``RandomConvFeatures(in_channels=C, width=32, seed=0)``.
    """
    if x.ndim != 4 or y.ndim != 4:
        raise ValueError(f"x and y must be image batches [N, C, H, W], got {tuple(x.shape)} and {tuple(y.shape)}")
    if features is None:
        features = RandomConvFeatures(in_channels=x.shape[1]).to(x.device)
    return frechet_distance(features(x), features(y))


def nearest_mode(
    samples: Float[Tensor, "n dim"], centers: Float[Tensor, "modes dim"]
) -> Int[Tensor, " n"]:
    """Index of the nearest centre (Euclidean) for every sample."""
    a, c = _flat(samples, "samples"), _flat(centers, "centers")
    _same_width(a, c, ("samples", "centers"))
    return torch.cdist(a, c.to(a.dtype)).argmin(dim=1)


def within_mode_spread(
    points: Float[Tensor, "n dim"], labels: Int[Tensor, " n"], modes: int, *, min_count: int = 2
) -> Float[Tensor, " modes"]:
    r"""Per-mode spread: the mean squared distance of a mode's points to their own mean.

    .. math::
        s_k = \frac{1}{n_k} \sum_{i:\, \ell_i = k} \|p_i - \bar p_k\|^2,

    with :math:`\bar p_k` the mean of the :math:`n_k` points labelled ``k``;
    NaN where :math:`n_k <` ``min_count``. Labels outside ``[0, modes)`` belong
    to no mode and are ignored.
    """
    check_int(min_count, "min_count", minimum=1)
    spread = torch.full((modes,), float("nan"), dtype=points.dtype, device=points.device)
    for k in range(modes):
        members = points[labels == k]
        if members.shape[0] >= min_count:
            spread[k] = (members - members.mean(0)).square().sum(1).mean()
    return spread


@dataclass(frozen=True)
class ModeStatistics:
    """How generated samples spread over the modes of a known mixture.

    Attributes:
        diversity_ratio: :math:`\\sqrt{\\bar s_\\text{samples} / \\bar s_\\text{data}}`,
            with :math:`\\bar s` the within-mode mean squared distance to the
            mode mean, averaged over the modes both sets populate. 1 is ideal,
            near 0 means samples collapse onto points, > 1 means blur.
        coverage: fraction of modes holding at least ``min_share`` of their
            fair share ``n / modes`` of the samples.
        off_mode_fraction: fraction of samples farther than ``radius`` from
            every centre (0 without a radius): the samples between the modes.
        mode_weight_error: :math:`\\tfrac12 \\sum_k |p_k - q_k|`, the total
            variation distance between the samples' mode weights :math:`p`
            and the data's :math:`q` (0 is ideal, 1 is disjoint modes).
        mode_fractions: fraction of the samples assigned to each mode (:math:`p`).
        data_mode_fractions: fraction of the data assigned to each mode (:math:`q`).
        within_spread_samples: per-mode spread of the samples (NaN if unpopulated).
        within_spread_data: per-mode spread of the reference data.
    """

    diversity_ratio: float
    coverage: float
    off_mode_fraction: float
    mode_weight_error: float
    mode_fractions: tuple[float, ...]
    data_mode_fractions: tuple[float, ...]
    within_spread_samples: tuple[float, ...] = field(repr=False)
    within_spread_data: tuple[float, ...] = field(repr=False)


def mode_statistics(
    samples: Float[Tensor, "n dim_samples"],
    data: Float[Tensor, "m dim_data"],
    centers: Float[Tensor, "modes dim"],
    *,
    min_share: float = 0.1,
    min_count: int = 2,
    radius: float | None = None,
) -> ModeStatistics:
    """Mode coverage and within-mode diversity ratio of ``samples`` against ``data``.

    Each sample and data point is assigned to its nearest centre.

    Args:
        samples: generated samples. data: reference samples of the mixture.
        centers: the mixture's mode centres.
        min_share: a mode is covered when it holds at least this fraction of
            its fair share of the samples (*default* 0.1).
        min_count: modes with fewer assigned points are left out of the
            spread average (*default* 2).
        radius: when given, only points within ``radius`` of their centre
            enter the spreads (in samples and data alike), so a few samples
            stranded between modes do not read as diversity; their share is
            ``off_mode_fraction``.
    """
    if not (0.0 < min_share <= 1.0):
        raise ValueError(f"min_share must lie in (0, 1], got {min_share}")
    check_int(min_count, "min_count", minimum=2)
    if radius is not None and not (radius > 0 and math.isfinite(radius)):
        raise ValueError(f"radius must be a finite number > 0, got {radius}")
    a, d, c = _flat(samples, "samples"), _flat(data, "data"), _flat(centers, "centers")
    _same_width(a, c, ("samples", "centers"))
    _same_width(d, c, ("data", "centers"))
    modes = c.shape[0]
    sample_labels, data_labels = nearest_mode(a, c), nearest_mode(d, c)
    counts = torch.bincount(sample_labels, minlength=modes).to(torch.float64)
    fractions = counts / a.shape[0]
    data_fractions = torch.bincount(data_labels, minlength=modes).to(torch.float64) / d.shape[0]
    coverage = float((counts >= min_share * a.shape[0] / modes).to(torch.float64).mean())
    off_mode = 0.0
    if radius is not None:
        sample_near = (a - c[sample_labels]).norm(dim=1) <= radius
        data_near = (d - c[data_labels]).norm(dim=1) <= radius
        off_mode = float(1.0 - sample_near.to(torch.float64).mean())
        # Points outside the radius get the label ``modes``, which no spread reads.
        sample_labels = torch.where(sample_near, sample_labels, modes)
        data_labels = torch.where(data_near, data_labels, modes)
    spread_samples = within_mode_spread(a, sample_labels, modes, min_count=min_count)
    spread_data = within_mode_spread(d, data_labels, modes, min_count=min_count)
    both = ~(spread_samples.isnan() | spread_data.isnan())
    if bool(both.any()):
        ratio = math.sqrt(float(spread_samples[both].mean()) / max(float(spread_data[both].mean()), 1e-30))
    else:
        ratio = 0.0
    return ModeStatistics(
        diversity_ratio=ratio,
        coverage=coverage,
        off_mode_fraction=off_mode,
        mode_weight_error=0.5 * float((fractions - data_fractions).abs().sum()),
        mode_fractions=tuple(fractions.tolist()),
        data_mode_fractions=tuple(data_fractions.tolist()),
        within_spread_samples=tuple(spread_samples.tolist()),
        within_spread_data=tuple(spread_data.tolist()),
    )


def mode_balancing_weights(
    samples: Float[Tensor, "n dim_samples"],
    data: Float[Tensor, "m dim_data"],
    centers: Float[Tensor, "modes dim"],
) -> Float[Tensor, " n"]:
    r"""Per-sample weights that give each mode the data's weight: :math:`w_i = q_k / n_k` for a sample in mode :math:`k`.

    Each sample and data point goes to its nearest centre; :math:`q_k` is the
    data's share of mode :math:`k` and :math:`n_k` the number of samples
    assigned to it. Weighted this way (``sliced_wasserstein(samples, data,
    x_weights=...)``) the samples weigh the modes exactly as the data do, so
    the distance reads the shape of each mode without the error in their
    weights (:attr:`ModeStatistics.mode_weight_error`). The weights sum to 1.

    Raises:
        ValueError: when a mode holds data but no sample, so no weight can move onto it.
    """
    a, d, c = _flat(samples, "samples"), _flat(data, "data"), _flat(centers, "centers")
    _same_width(a, c, ("samples", "centers"))
    _same_width(d, c, ("data", "centers"))
    modes = c.shape[0]
    sample_labels = nearest_mode(a, c)
    shares = torch.bincount(nearest_mode(d, c), minlength=modes).to(torch.float64) / d.shape[0]
    counts = torch.bincount(sample_labels, minlength=modes).to(torch.float64)
    empty = ((counts == 0) & (shares > 0)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"samples hold no point of modes {empty}, which carry data ({shares[empty].tolist()})")
    return (shares / counts.clamp(min=1))[sample_labels]


def mean_pairwise_distance(x: Float[Tensor, " n *shape"], *, max_samples: int = 2048) -> Float[Tensor, ""]:
    """Mean Euclidean distance between distinct samples (the first ``max_samples``).

    A model-free diversity figure: 0 for a collapsed generator.
    """
    a = _flat(x, "x")[:max_samples]
    n = a.shape[0]
    if n < 2:
        raise ValueError(f"mean_pairwise_distance needs at least 2 samples, got {n}")
    return torch.cdist(a, a).sum() / (n * (n - 1))
