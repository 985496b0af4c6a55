r"""Distributions of the training time ``t`` in ``[0, 1]`` (``t = 1`` is noise).

Each distribution is an ``nn.Module`` called as
``dist(batch_size, device=..., dtype=..., generator=...) -> t`` with ``t`` of
shape ``[B]``; every draw goes through the caller's ``torch.Generator``.

* :class:`BetaTime` -- ``Beta(alpha, beta)``; ``Beta(1, 1)`` is uniform (default).
* :class:`LogitNormalTime` -- ``sigmoid(N(mean, std))`` (SD3's choice).
* :class:`ShiftedTime` -- the resolution shift
  :math:`t \mapsto s t / (1 + (s - 1) t)` applied to another distribution.
* :class:`KumaraswamyTime` -- the Kumaraswamy warp of a uniform draw,
  :math:`(1 - (1 - u^a)^b)^c`.
"""

import abc
import math

import torch
from jaxtyping import Float
from torch import Tensor, nn

from twinloss._checks import check_int

__all__ = [
    "BetaTime",
    "KumaraswamyTime",
    "LogitNormalTime",
    "ShiftedTime",
    "TimeDistribution",
    "kumaraswamy_warp",
    "sample_gamma",
    "sample_log_gamma",
]

MIN_BETA_CONCENTRATION = 1e-300
"""The smallest ``alpha`` / ``beta`` :class:`BetaTime` accepts: below about
``4e-306`` the log of the boosted gamma draw, ``log U / k``, overflows float64
to ``-inf`` and two such logs give ``-inf + inf = NaN``."""


def _check_positive(name: str, value: float) -> float:
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


class TimeDistribution(nn.Module, abc.ABC):
    """A distribution over ``[0, 1]`` sampled with an explicit generator.

    Call it as ``dist(batch_size, device=..., dtype=..., generator=...)``; a
    subclass implements :meth:`sample` with the same arguments.
    """

    def forward(
        self,
        batch_size: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        generator: torch.Generator | None = None,
    ) -> Float[Tensor, " batch"]:
        """Draw ``batch_size`` times."""
        check_int(batch_size, "batch_size", minimum=0)
        return self.sample(batch_size, device, dtype, generator)

    @abc.abstractmethod
    def sample(
        self, batch_size: int, device: torch.device | str, dtype: torch.dtype, generator: torch.Generator | None
    ) -> Float[Tensor, " batch"]:
        """Draw ``batch_size`` times (arguments as :meth:`forward`'s, already checked)."""


def sample_gamma(
    concentration: float,
    batch_size: int,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    generator: torch.Generator | None,
) -> Float[Tensor, " batch"]:
    r"""``Gamma(concentration, 1)`` draws through an explicit generator: ``exp`` of :func:`sample_log_gamma`.

    For a small ``concentration`` most draws underflow to 0 (the log does not).
    """
    log_draws = sample_log_gamma(concentration, batch_size, device=device, generator=generator)
    return torch.exp(log_draws).to(dtype)


def sample_log_gamma(
    concentration: float,
    batch_size: int,
    *,
    device: torch.device | str,
    generator: torch.Generator | None,
) -> Float[Tensor, " batch"]:
    r"""``log G`` for ``G ~ Gamma(concentration, 1)``, in float64, through an explicit generator.

    Marsaglia and Tsang's squeeze method (2000) for ``k >= 1``; for ``k < 1``
    the boost :math:`G_k = G_{k+1} U^{1/k}`, taken in logs,
    :math:`\log G_k = \log G_{k+1} + \log U / k`, so it cannot underflow
    (``Gamma(1e-3)`` draws are below ``1e-300`` a quarter of the time).
    ``U`` is kept above the smallest normal float64, so the log is finite for
    ``k >= MIN_BETA_CONCENTRATION``. ``torch.distributions`` cannot take a
    generator, which reproducible training needs.
    """
    boost = concentration < 1
    k = concentration + 1 if boost else concentration
    d = k - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    out = torch.empty(batch_size, device=device, dtype=torch.float64)
    todo = torch.ones(batch_size, device=device, dtype=torch.bool)
    while bool(todo.any()):
        n = int(todo.sum())
        x = torch.randn(n, device=device, dtype=torch.float64, generator=generator)
        u = torch.rand(n, device=device, dtype=torch.float64, generator=generator)
        v = (1 + c * x) ** 3
        accept = (v > 0) & (
            torch.log(u) < 0.5 * x**2 + d - d * v + d * torch.log(v.clamp_min(1e-300))
        )
        idx = todo.nonzero().squeeze(1)
        out[idx[accept]] = (d * v)[accept]
        todo[idx[accept]] = False
    log_out = torch.log(out)
    if boost:
        u = torch.rand(batch_size, device=device, dtype=torch.float64, generator=generator)
        log_out = log_out + torch.log(u.clamp_min(torch.finfo(torch.float64).tiny)) / concentration
    return log_out


class BetaTime(TimeDistribution):
    r"""``t ~ Beta(alpha, beta)``; the default ``Beta(1, 1)`` is uniform on ``[0, 1]``.

    Drawn as :math:`t = \sigma(\log G_\alpha - \log G_\beta) = G_\alpha / (G_\alpha + G_\beta)`
    from log-gamma draws, which cannot underflow: ``Beta(1e-3, 1e-3)``, whose
    gamma draws are mostly 0 in any float, gives times in ``[0, 1]`` (mostly
    at the ends) instead of ``0 / 0``. ``alpha`` and ``beta`` must be at least
    :data:`MIN_BETA_CONCENTRATION`.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 1.0) -> None:
        super().__init__()
        self.alpha = _check_positive("alpha", alpha)
        self.beta = _check_positive("beta", beta)
        for name, value in (("alpha", self.alpha), ("beta", self.beta)):
            if value < MIN_BETA_CONCENTRATION:
                raise ValueError(
                    f"{name} must be >= {MIN_BETA_CONCENTRATION} (its log-gamma draws overflow float64 below), "
                    f"got {value}"
                )

    def sample(
        self, batch_size: int, device: torch.device | str, dtype: torch.dtype, generator: torch.Generator | None
    ) -> Float[Tensor, " batch"]:
        if self.alpha == 1.0 and self.beta == 1.0:
            return torch.rand(batch_size, device=device, dtype=dtype, generator=generator)
        log_a = sample_log_gamma(self.alpha, batch_size, device=device, generator=generator)
        log_b = sample_log_gamma(self.beta, batch_size, device=device, generator=generator)
        return torch.sigmoid(log_a - log_b).to(dtype)


class LogitNormalTime(TimeDistribution):
    """``t = sigmoid(mean + std * n)``, ``n ~ N(0, 1)``.

    ``|mean|`` and ``std`` are at most ``1e30``: the draw is computed in
    float32, where a larger value could overflow to ``inf`` and meet ``-inf``
    (NaN); the sigmoid is saturated beyond about 40 anyway.
    """

    def __init__(self, mean: float = 0.0, std: float = 1.0) -> None:
        super().__init__()
        if not (math.isfinite(mean) and abs(mean) <= 1e30):
            raise ValueError(f"mean must be a number in [-1e30, 1e30], got {mean}")
        self.mean = float(mean)
        self.std = _check_positive("std", std)
        if self.std > 1e30:
            raise ValueError(f"std must be a number in (0, 1e30], got {std}")

    def sample(
        self, batch_size: int, device: torch.device | str, dtype: torch.dtype, generator: torch.Generator | None
    ) -> Float[Tensor, " batch"]:
        n = torch.randn(batch_size, device=device, dtype=torch.float32, generator=generator)
        return torch.sigmoid(self.mean + self.std * n).to(dtype)


def resolution_shift(t: Float[Tensor, "*shape"], shift: float) -> Float[Tensor, "*shape"]:
    r"""The resolution shift of times in ``[0, 1]``: :math:`t' = s t / (1 + (s - 1) t)`.

    ``shift > 1`` moves times towards noise, as large images need (SD3, Flux).
    Computed in float64 as :math:`\sigma(\operatorname{logit} t + \log s)`, the
    same map, which keeps 0 and 1 fixed and which no accepted ``shift`` can
    turn into ``inf / inf`` (the quotient does for ``shift`` near the float
    limit). diffusers' dynamic (exponential) shift by ``mu`` is ``s = exp(mu)``.
    """
    return torch.sigmoid(torch.logit(t.double()) + math.log(shift)).to(t.dtype)


class ShiftedTime(TimeDistribution):
    r"""Resolution shift of a base distribution: :math:`t' = s t / (1 + (s - 1) t)` (:func:`resolution_shift`)."""

    def __init__(self, shift: float = 3.0, base: TimeDistribution | None = None) -> None:
        super().__init__()
        self.shift = _check_positive("shift", shift)
        self.base = base if base is not None else BetaTime()

    def sample(
        self, batch_size: int, device: torch.device | str, dtype: torch.dtype, generator: torch.Generator | None
    ) -> Float[Tensor, " batch"]:
        return resolution_shift(self.base(batch_size, device=device, dtype=dtype, generator=generator), self.shift)


def kumaraswamy_warp(
    u: Float[Tensor, "*shape"], a: float, b: float, c: float
) -> Float[Tensor, "*shape"]:
    r"""Monotone map of ``[0, 1]`` onto itself: :math:`(1 - (1 - u^a)^b)^c`."""
    return (1 - (1 - u.clamp(0, 1) ** a) ** b) ** c


class KumaraswamyTime(TimeDistribution):
    r"""``t = (1 - (1 - u^a)^b)^c`` with ``u ~ U(0, 1)``."""

    def __init__(self, a: float = 1.0, b: float = 1.0, c: float = 1.0) -> None:
        super().__init__()
        self.a = _check_positive("a", a)
        self.b = _check_positive("b", b)
        self.c = _check_positive("c", c)

    def sample(
        self, batch_size: int, device: torch.device | str, dtype: torch.dtype, generator: torch.Generator | None
    ) -> Float[Tensor, " batch"]:
        u = torch.rand(batch_size, device=device, dtype=dtype, generator=generator)
        # float64: an exponent beyond the range of a half-precision dtype must not overflow it
        return kumaraswamy_warp(u.double(), self.a, self.b, self.c).to(dtype)
