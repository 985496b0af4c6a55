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
]


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
    r"""``Gamma(concentration, 1)`` draws through an explicit generator.

    Marsaglia and Tsang's squeeze method (2000) for ``k >= 1``; for ``k < 1``
    the boost :math:`G_k = G_{k+1} U^{1/k}`. ``torch.distributions`` cannot
    take a generator, which reproducible training needs.
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
    if boost:
        u = torch.rand(batch_size, device=device, dtype=torch.float64, generator=generator)
        out = out * u ** (1.0 / concentration)
    return out.to(dtype)


class BetaTime(TimeDistribution):
    """``t ~ Beta(alpha, beta)``; the default ``Beta(1, 1)`` is uniform on ``[0, 1]``."""

    def __init__(self, alpha: float = 1.0, beta: float = 1.0) -> None:
        super().__init__()
        self.alpha = _check_positive("alpha", alpha)
        self.beta = _check_positive("beta", beta)

    def sample(
        self, batch_size: int, device: torch.device | str, dtype: torch.dtype, generator: torch.Generator | None
    ) -> Float[Tensor, " batch"]:
        if self.alpha == 1.0 and self.beta == 1.0:
            return torch.rand(batch_size, device=device, dtype=dtype, generator=generator)
        kw = dict(device=device, dtype=torch.float64, generator=generator)
        a = sample_gamma(self.alpha, batch_size, **kw)
        b = sample_gamma(self.beta, batch_size, **kw)
        return (a / (a + b)).to(dtype)


class LogitNormalTime(TimeDistribution):
    """``t = sigmoid(mean + std * n)``, ``n ~ N(0, 1)``."""

    def __init__(self, mean: float = 0.0, std: float = 1.0) -> None:
        super().__init__()
        if not math.isfinite(mean):
            raise ValueError(f"mean must be finite, got {mean}")
        self.mean = float(mean)
        self.std = _check_positive("std", std)

    def sample(
        self, batch_size: int, device: torch.device | str, dtype: torch.dtype, generator: torch.Generator | None
    ) -> Float[Tensor, " batch"]:
        n = torch.randn(batch_size, device=device, dtype=torch.float32, generator=generator)
        return torch.sigmoid(self.mean + self.std * n).to(dtype)


class ShiftedTime(TimeDistribution):
    r"""Resolution shift of a base distribution: :math:`t' = s t / (1 + (s - 1) t)`.

    ``shift > 1`` moves mass towards noise, as large images need (SD3, Flux).
    """

    def __init__(self, shift: float = 3.0, base: TimeDistribution | None = None) -> None:
        super().__init__()
        self.shift = _check_positive("shift", shift)
        self.base = base if base is not None else BetaTime()

    def sample(
        self, batch_size: int, device: torch.device | str, dtype: torch.dtype, generator: torch.Generator | None
    ) -> Float[Tensor, " batch"]:
        t = self.base(batch_size, device=device, dtype=dtype, generator=generator)
        return self.shift * t / (1 + (self.shift - 1) * t)


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
        return kumaraswamy_warp(u, self.a, self.b, self.c)
