r"""Small generated data sets and a two-time MLP, shared by the demo, benchmarks and tests.

Nothing here is downloaded: every data set is drawn from a seeded
``torch.Generator``.

* :func:`ring_mixture`: ``modes`` Gaussians on a circle (the classic 2-D test
  of mode coverage), with labels for class-conditional training.
* :func:`checkerboard`: uniform points on the dark squares of a 4x4 board.
* :class:`ToyTimeEmbedding`: ``(t, r) -> [B, width]`` from log-spaced sinusoids of
  ``|t|`` and ``|t| - |r|``, plus a zero-initialised term for the sign of ``t``;
  the time input of every small model in the project (the diffusers adapters
  use :class:`twinloss_adapters.TwinTimeEmbedding` instead, a term added to a
  backbone's own time embedding).
* :class:`TimeMLP`: an MLP velocity field ``F(x_t, t, r, y=None)`` built on it,
  as the twinloss protocol requires.

The training loop the demo and examples share is ``twinloss_demo.training.train``.
"""

import math
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

__all__ = [
    "LabelledPoints",
    "TimeMLP",
    "ToyTimeEmbedding",
    "checkerboard",
    "log_spaced_sinusoids",
    "ring_centers",
    "ring_mixture",
]


def ring_centers(modes: int = 8, radius: float = 2.0) -> Float[Tensor, "modes 2"]:
    """``modes`` points evenly spaced on a circle of ``radius``."""
    if modes < 1:
        raise ValueError(f"modes must be >= 1, got {modes}")
    angle = torch.arange(modes, dtype=torch.float64) * (2 * math.pi / modes)
    return (radius * torch.stack([angle.cos(), angle.sin()], dim=1)).to(torch.float32)


@dataclass(frozen=True)
class LabelledPoints:
    """Points and the index of the mode (class) each was drawn from."""

    x: Float[Tensor, "n dim"]
    y: Int[Tensor, " n"]


def ring_mixture(
    n: int,
    *,
    modes: int = 8,
    radius: float = 2.0,
    std: float = 0.1,
    generator: torch.Generator | None = None,
) -> LabelledPoints:
    """``n`` points from an equal-weight mixture of isotropic Gaussians on a ring."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not std > 0:
        raise ValueError(f"std must be > 0, got {std}")
    y = torch.randint(0, modes, (n,), generator=generator)
    x = ring_centers(modes, radius)[y] + std * torch.randn(n, 2, generator=generator)
    return LabelledPoints(x=x, y=y)


def checkerboard(
    n: int, *, squares: int = 4, scale: float = 4.0, generator: torch.Generator | None = None
) -> Float[Tensor, "n 2"]:
    """``n`` points uniform on the dark squares of a ``squares x squares`` board of side ``scale``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if squares < 2 or squares % 2:
        raise ValueError(f"squares must be an even int >= 2, got {squares}")
    column = torch.randint(0, squares, (n,), generator=generator)
    row = 2 * torch.randint(0, squares // 2, (n,), generator=generator) + column % 2  # dark squares
    cells = torch.stack([column, row], dim=1)
    offset = torch.rand(n, 2, generator=generator)
    return ((cells + offset) / squares - 0.5) * scale


def log_spaced_sinusoids(
    value: Float[Tensor, " batch"], frequencies: int, max_frequency: float = 100.0
) -> Float[Tensor, "batch features"]:
    """``[sin(w_k v), cos(w_k v)]`` for ``frequencies`` geometric ``w_k`` in ``[1, max_frequency]``."""
    w = torch.logspace(0, math.log10(max_frequency), frequencies, device=value.device, dtype=value.dtype)
    angle = value.unsqueeze(1) * w
    return torch.cat([angle.sin(), angle.cos()], dim=1)


class ToyTimeEmbedding(nn.Module):
    r"""The two times of the protocol as one ``[B, width]`` embedding.

    .. math::

        e(t, r) = \mathrm{MLP}(\phi) + [t < 0]\, W_\text{twin} \phi, \qquad
        \phi = [\mathrm{emb}(|t|), \mathrm{emb}(|t| - |r|)]

    with ``emb`` the sinusoidal features of :func:`log_spaced_sinusoids`. Rows at
    ``t`` and ``-t`` see the same ``phi``; the twin (fake) rows, ``t < 0``, get
    one more term from a linear layer initialised to zero. As the adapters do
    (docs/method.md, section 1), a model pretrained on positive times therefore
    starts fine-tuning with a fake field equal to the real one, so the
    rectification gap starts at 0 instead of at noise.

    Args:
        width: embedding width.
        frequencies: sinusoidal frequencies per time input.
    """

    def __init__(self, width: int, frequencies: int = 16) -> None:
        super().__init__()
        if width < 1 or frequencies < 1:
            raise ValueError(f"width and frequencies must be >= 1, got width={width}, frequencies={frequencies}")
        self.frequencies = frequencies
        features = 4 * frequencies
        self.mlp = nn.Sequential(nn.Linear(features, width), nn.SiLU(), nn.Linear(width, width))
        self.twin = nn.Linear(features, width)
        nn.init.zeros_(self.twin.weight)
        nn.init.zeros_(self.twin.bias)

    def features(
        self, t: Float[Tensor, " batch"], r: Float[Tensor, " batch"], dtype: torch.dtype
    ) -> tuple[Float[Tensor, "batch features"], Float[Tensor, "batch 1"]]:
        """``phi`` and the twin indicator ``[t < 0]`` (a ``[B, 1]`` column)."""
        t_abs = t.abs().to(dtype)
        gap = t_abs - r.abs().to(dtype)
        phi = torch.cat([log_spaced_sinusoids(t_abs, self.frequencies), log_spaced_sinusoids(gap, self.frequencies)], dim=1)
        return phi, (t < 0).to(dtype).unsqueeze(1)

    def forward(
        self, t: Float[Tensor, " batch"], r: Float[Tensor, " batch"], dtype: torch.dtype
    ) -> Float[Tensor, "batch width"]:
        phi, twin = self.features(t, r, dtype)
        return self.mlp(phi) + twin * self.twin(phi)


def zero_linear(in_features: int, out_features: int) -> nn.Linear:
    """A linear layer initialised to zero without drawing from the global RNG (the other layers' init is unchanged)."""
    layer = torch.nn.utils.skip_init(nn.Linear, in_features, out_features)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class TimeMLP(nn.Module):
    r"""A two-time velocity field for ``[B, *shape]`` data (flattened internally).

    The :class:`ToyTimeEmbedding` of ``(t, r)`` is added to the first hidden
    layer; a class label ``y`` (with a null class ``num_classes``) is added the
    same way when ``num_classes > 0``.

    Args:
        shape: trailing data shape (e.g. ``(2,)``).
        width: hidden width. depth: hidden layers (>= 1).
        frequencies: sinusoidal frequencies per time input.
        num_classes: real classes (0: unconditional).
        twin_per_block: the twin (``t < 0``) rows also get a zero-initialised
            shift :math:`[t < 0] W_k \phi` before every residual block, as the
            sign embedding of a diffusion transformer reaches every block
            through its timestep conditioning (*default* False: the first
            layer only). Drawn without the global RNG, so a model built with
            it starts from the same weights as one built without.
    """

    def __init__(
        self,
        shape: tuple[int, ...] = (2,),
        *,
        width: int = 256,
        depth: int = 4,
        frequencies: int = 16,
        num_classes: int = 0,
        twin_per_block: bool = False,
    ) -> None:
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError(f"width and depth must be >= 1, got width={width}, depth={depth}")
        self.shape = tuple(shape)
        features = math.prod(self.shape)
        self.time = ToyTimeEmbedding(width, frequencies)
        self.label = nn.Embedding(num_classes + 1, width) if num_classes > 0 else None
        self.num_classes = num_classes
        self.input = nn.Linear(features, width)
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.SiLU(), nn.Linear(width, width)) for _ in range(depth - 1)]
        )
        self.output = nn.Sequential(nn.SiLU(), nn.Linear(width, features))
        self.twin_blocks = (
            nn.ModuleList([zero_linear(4 * frequencies, width) for _ in range(depth - 1)]) if twin_per_block else None
        )

    def forward(
        self,
        x_t: Float[Tensor, " batch *shape"],
        t: Float[Tensor, " batch"],
        r: Float[Tensor, " batch"],
        y: Int[Tensor, " batch"] | None = None,
    ) -> Float[Tensor, " batch *shape"]:
        h = self.input(x_t.reshape(x_t.shape[0], -1)) + self.time(t, r, x_t.dtype)
        if self.label is not None:
            labels = y if y is not None else torch.full_like(t, self.num_classes, dtype=torch.long)
            h = h + self.label(labels)
        phi, twin = self.time.features(t, r, x_t.dtype) if self.twin_blocks is not None else (None, None)
        for index, block in enumerate(self.blocks):
            if self.twin_blocks is not None:
                h = h + twin * self.twin_blocks[index](phi)
            h = h + block(h)
        return self.output(h).reshape(x_t.shape)
