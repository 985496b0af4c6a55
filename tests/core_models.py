"""Small velocity fields that satisfy the twinloss protocol, and a training loop for them, for the core tests."""

import math

import torch
from torch import Tensor, nn


class TinyVelocityNet(nn.Module):
    """An MLP velocity field for any trailing shape ``[B, *shape]``.

    Time features are ``(t, r, t - r, sin, cos)`` of the *signed* times, so the
    sign of the twin trajectory reaches the network. An optional class label
    ``y`` (with a null class ``num_classes``) exercises conditioning.
    """

    def __init__(self, shape: tuple[int, ...], hidden: int = 32, num_classes: int = 4, dropout: float = 0.0):
        super().__init__()
        self.shape = tuple(shape)
        features = math.prod(self.shape)
        self.label = nn.Embedding(num_classes + 1, 8)
        self.net = nn.Sequential(
            nn.Linear(features + 5 + 8, hidden),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, features),
        )

    def forward(self, x_t: Tensor, t: Tensor, r: Tensor, y: Tensor | None = None) -> Tensor:
        batch = x_t.shape[0]
        times = torch.stack([t, r, t - r, torch.sin(3 * t), torch.cos(3 * r)], dim=1)
        label = self.label(y) if y is not None else self.label.weight.new_zeros(batch, 8)
        h = torch.cat([x_t.reshape(batch, -1), times.to(x_t.dtype), label.to(x_t.dtype)], dim=1)
        return self.net(h).reshape(x_t.shape)


class GaussianFlow(nn.Module):
    r"""The exact two-time field of the linear path for data ``N(mu, s^2 I)``.

    The marginal at time ``t`` is ``N((1 - t) mu, sigma_t^2)`` with
    ``sigma_t^2 = t^2 + (1 - t)^2 s^2``; the probability-flow map is affine,
    ``x_r = mu_r + (sigma_r / sigma_t)(x_t - mu_t)``, so the average velocity
    is ``F = (x_t - x_r) / (t - r)`` and, at ``r = t``, its limit
    ``-mu + (sigma_t' / sigma_t)(x_t - mu_t)``.
    """

    def __init__(self, mu: float = 0.7, s: float = 0.5):
        super().__init__()
        self.mu, self.s = mu, s
        self.dummy = nn.Parameter(torch.zeros(()))

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt(t**2 + (1 - t) ** 2 * self.s**2)

    def forward(self, x_t: Tensor, t: Tensor, r: Tensor) -> Tensor:
        t = t.abs().reshape(-1, *([1] * (x_t.ndim - 1))).to(x_t.dtype)
        r = r.abs().reshape(-1, *([1] * (x_t.ndim - 1))).to(x_t.dtype)
        mu_t, mu_r = (1 - t) * self.mu, (1 - r) * self.mu
        x_r = mu_r + self.sigma(r) / self.sigma(t) * (x_t - mu_t)
        d_sigma = (t - (1 - t) * self.s**2) / self.sigma(t)
        instantaneous = -self.mu + d_sigma / self.sigma(t) * (x_t - mu_t)
        span = t - r
        average = (x_t - x_r) / torch.where(span > 0, span, torch.ones_like(span))
        return torch.where(span > 0, average, instantaneous) + 0 * self.dummy


def labelled_training_steps(count: int, model: nn.Module, loss_fn, optimizer: torch.optim.Optimizer,
                            generator: torch.Generator, *, shape: tuple[int, ...], batch: int = 8) -> list[float]:
    """``count`` optimizer steps on standard-normal data of ``shape`` with labels ``y`` in 0-3 (null class 4),
    each followed by ``loss_fn.update_teachers(model)``; the data comes from the global torch RNG, the loss's
    noise from ``generator``. Returns each step's loss."""
    losses = []
    for _ in range(count):
        x = torch.randn(batch, *shape)
        y = torch.randint(0, 4, (batch,))
        out = loss_fn(model, x, cond={"y": y}, uncond={"y": torch.full_like(y, 4)}, generator=generator)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        loss_fn.update_teachers(model)
        losses.append(out.loss.item())
    return losses
