r"""Per-row distances ``rho(prediction, target) -> [B]``, computed in float32.

* :class:`L2Distance`: the mean squared error over all non-batch dims.
* :class:`BarronDistance` (*default*): Barron's robust loss with the weight
  held fixed (stop-gradient), so its gradient is an adaptively scaled l2:

  .. math::
      \rho = \frac{\mathrm{mse}\cdot \mathrm{sg}(w)}{c}, \qquad
      w = \Big(\frac{\mathrm{mse}}{c^2 |\alpha - 2|} + 1\Big)^{(\alpha - 2)/2}.

  With ``alpha = 1`` it behaves like a root-mean-square error for large
  errors; ``alpha = 2`` gives ``w = 1``, a scaled l2.
"""

import abc
import math

from jaxtyping import Float
from torch import Tensor, nn

from twinloss._tensors import at_least_float32

__all__ = ["BarronDistance", "Distance", "L2Distance", "mean_squared_error"]


def mean_squared_error(
    prediction: Float[Tensor, " batch *shape"], target: Float[Tensor, " batch *shape"]
) -> Float[Tensor, " batch"]:
    """Row-wise mean of ``(prediction - target)^2`` in at least float32."""
    dtype = at_least_float32(prediction.dtype)
    error = prediction.to(dtype) - target.to(dtype)
    return error.square().reshape(error.shape[0], -1).mean(dim=1)  # mean over all but the batch dim


class Distance(nn.Module, abc.ABC):
    """A per-row distance; subclasses implement :meth:`forward`."""

    @abc.abstractmethod
    def forward(
        self, prediction: Float[Tensor, " batch *shape"], target: Float[Tensor, " batch *shape"]
    ) -> Float[Tensor, " batch"]:
        """Distance of each row of ``prediction`` to the same row of ``target``."""


class L2Distance(Distance):
    """Mean squared error per row."""

    def forward(
        self, prediction: Float[Tensor, " batch *shape"], target: Float[Tensor, " batch *shape"]
    ) -> Float[Tensor, " batch"]:
        return mean_squared_error(prediction, target)


class BarronDistance(Distance):
    """Barron's robust distance with a detached weight (*default* ``alpha=1, c=1e-3``).

    Args:
        alpha: shape parameter; ``2`` is l2, ``1`` pseudo-Huber-like (any finite value).
        c: scale below which errors count quadratically (> 0).
    """

    def __init__(self, alpha: float = 1.0, c: float = 1e-3) -> None:
        super().__init__()
        if not math.isfinite(alpha):
            raise ValueError(f"alpha must be finite, got {alpha}")
        if not (c > 0 and math.isfinite(c)):
            raise ValueError(f"c must be a finite number > 0, got {c}")
        self.alpha = float(alpha)
        self.c = float(c)

    def forward(
        self, prediction: Float[Tensor, " batch *shape"], target: Float[Tensor, " batch *shape"]
    ) -> Float[Tensor, " batch"]:
        mse = mean_squared_error(prediction, target)
        if self.alpha == 2.0:
            return mse / self.c
        scale = self.c**2 * abs(self.alpha - 2.0)
        weight = (mse.detach() / scale + 1.0) ** ((self.alpha - 2.0) / 2.0)
        return mse * weight / self.c
