r"""Affine probability paths between data and noise.

One time convention for all of twinloss: ``t = 1`` is noise, ``t = 0`` is
data, and an affine path mixes the two as

.. math::
    x_t = a(t)\, z + b(t)\, x, \qquad v_t = \dot a(t)\, z + \dot b(t)\, x,

with ``a(0) = 0, b(0) = 1``. A **negative** time marks the twin (fake)
trajectory: paths interpolate at ``|t|``, so a row at ``-t`` is interpolated
exactly as at ``t``; only the time handed to the model keeps its sign.

The linear path ``a = t, b = 1 - t`` (rectified flow) is the default and the
one every TwinFlow result uses; the cosine and variance-preserving paths are
provided for backbones trained on them.
"""

import abc
import math
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor, nn

from twinloss._tensors import per_row

__all__ = ["AffinePath", "CosinePath", "LinearPath", "PathCoefficients", "PathSample", "VPPath"]


@dataclass(frozen=True)
class PathCoefficients:
    """``a(t)``, ``b(t)`` and their time derivatives, each of shape ``[B]``."""

    noise: Float[Tensor, " batch"]
    data: Float[Tensor, " batch"]
    d_noise: Float[Tensor, " batch"]
    d_data: Float[Tensor, " batch"]


@dataclass(frozen=True)
class PathSample:
    """A point on the path and the conditional velocity that moves it."""

    x_t: Float[Tensor, " batch *shape"]
    velocity: Float[Tensor, " batch *shape"]
    t: Float[Tensor, " batch"]


class AffinePath(nn.Module, abc.ABC):
    """A path ``x_t = a(t) z + b(t) x``; subclasses give ``a``, ``b`` and derivatives."""

    @abc.abstractmethod
    def coefficients(self, t: Float[Tensor, " batch"]) -> PathCoefficients:
        """``a``, ``b``, ``da/dt``, ``db/dt`` at ``t`` in ``[0, 1]``."""

    def sample(
        self,
        x: Float[Tensor, " batch *shape"],
        z: Float[Tensor, " batch *shape"],
        t: Float[Tensor, " batch"],
    ) -> PathSample:
        """Interpolate at ``|t|`` and return ``x_t`` with velocity ``a' z + b' x``."""
        c = self.coefficients(t.abs())
        x_t = per_row(c.noise, x) * z + per_row(c.data, x) * x
        velocity = per_row(c.d_noise, x) * z + per_row(c.d_data, x) * x
        return PathSample(x_t=x_t, velocity=velocity, t=t)

    def velocity_to_data(
        self,
        x_t: Float[Tensor, " batch *shape"],
        velocity: Float[Tensor, " batch *shape"],
        t: Float[Tensor, " batch"],
    ) -> Float[Tensor, " batch *shape"]:
        r"""Data estimate from an instantaneous velocity: :math:`\hat x = (a v - a' x_t) / (a b' - a' b)`."""
        return self._solve(x_t, velocity, t, for_data=True)

    def velocity_to_noise(
        self,
        x_t: Float[Tensor, " batch *shape"],
        velocity: Float[Tensor, " batch *shape"],
        t: Float[Tensor, " batch"],
    ) -> Float[Tensor, " batch *shape"]:
        r"""Noise estimate from an instantaneous velocity: :math:`\hat z = (b' x_t - b v) / (a b' - a' b)`."""
        return self._solve(x_t, velocity, t, for_data=False)

    def _solve(self, x_t: Tensor, velocity: Tensor, t: Tensor, *, for_data: bool) -> Tensor:
        """One unknown of ``x_t = a z + b x``, ``v = a' z + b' x`` by Cramer's rule: ``x`` (``for_data``) or ``z``."""
        c = self.coefficients(t.abs())
        det = per_row(c.noise * c.d_data - c.d_noise * c.data, x_t)
        if for_data:
            return (per_row(c.noise, x_t) * velocity - per_row(c.d_noise, x_t) * x_t) / det
        return (per_row(c.d_data, x_t) * x_t - per_row(c.data, x_t) * velocity) / det

    def data_to_noise(
        self,
        x_t: Float[Tensor, " batch *shape"],
        x_hat: Float[Tensor, " batch *shape"],
        t: Float[Tensor, " batch"],
    ) -> Float[Tensor, " batch *shape"]:
        r"""The noise consistent with ``x_t`` and a data estimate: :math:`\hat z = (x_t - b\,\hat x) / a`.

        Undefined at ``t = 0`` (``a = 0``), where ``x_t`` holds no noise.
        """
        c = self.coefficients(t.abs())
        return (x_t - per_row(c.data, x_t) * x_hat) / per_row(c.noise, x_t)

    @staticmethod
    def jump(
        x_t: Float[Tensor, " batch *shape"],
        average_velocity: Float[Tensor, " batch *shape"],
        t: Float[Tensor, " batch"],
        r: Float[Tensor, " batch"],
    ) -> Float[Tensor, " batch *shape"]:
        r"""Follow an average velocity from ``|t|`` to ``|r|``: :math:`x_r = x_t - (t - r) F`.

        With ``r = 0`` this is the one-step data estimate ``x_hat = x_t - t F``.
        """
        return x_t - per_row(t.abs() - r.abs(), x_t) * average_velocity


class LinearPath(AffinePath):
    r"""Rectified-flow path :math:`x_t = t z + (1 - t) x`, velocity :math:`z - x` (default)."""

    def coefficients(self, t: Float[Tensor, " batch"]) -> PathCoefficients:
        one = torch.ones_like(t)
        return PathCoefficients(noise=t, data=1 - t, d_noise=one, d_data=-one)


class CosinePath(AffinePath):
    r"""Trigonometric path :math:`a = \sin(\pi t / 2)`, :math:`b = \cos(\pi t / 2)`."""

    def coefficients(self, t: Float[Tensor, " batch"]) -> PathCoefficients:
        angle = 0.5 * math.pi * t
        return PathCoefficients(
            noise=torch.sin(angle),
            data=torch.cos(angle),
            d_noise=0.5 * math.pi * torch.cos(angle),
            d_data=-0.5 * math.pi * torch.sin(angle),
        )


class VPPath(AffinePath):
    r"""Variance-preserving path of the VP-SDE with a linear noise rate.

    .. math::
        b(t) = \exp\!\big(-\tfrac12 B(t)\big),\quad a(t) = \sqrt{1 - b(t)^2},\quad
        B(t) = \beta_\min t + \tfrac12 (\beta_\max - \beta_\min) t^2.

    Args:
        beta_min: noise rate at ``t = 0`` (> 0).
        beta_max: noise rate at ``t = 1`` (>= ``beta_min``).
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0) -> None:
        super().__init__()
        if not beta_min > 0:
            raise ValueError(f"beta_min must be > 0, got {beta_min}")
        if not beta_max >= beta_min:
            raise ValueError(f"beta_max must be >= beta_min={beta_min}, got {beta_max}")
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)

    def coefficients(self, t: Float[Tensor, " batch"]) -> PathCoefficients:
        integral = self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2
        rate = self.beta_min + (self.beta_max - self.beta_min) * t
        data = torch.exp(-0.5 * integral)
        noise = torch.sqrt(-torch.expm1(-integral))  # sqrt(1 - b^2), accurate near t = 0
        d_data = -0.5 * rate * data
        d_noise = 0.5 * rate * data**2 / noise
        return PathCoefficients(noise=noise, data=data, d_noise=d_noise, d_data=d_data)
