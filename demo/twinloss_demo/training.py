"""The training loop the demo and the examples share: Adam on a :class:`~twinloss.TwinFlowLoss`.

Application code, not library: a real trainer brings its own loop (``docs/training.md``).
"""

from collections.abc import Callable

import torch
from torch import Tensor, nn

from twinloss.averaging import WeightAverage
from twinloss.loss import TwinFlowLoss
from twinloss.teachers import Teacher

__all__ = ["DrawBatch", "train"]

DrawBatch = Callable[[torch.Generator], tuple[Tensor, dict[str, Tensor] | None, dict[str, Tensor] | None]]
"""``draw_batch(generator) -> (x, cond, uncond)``: one training batch."""


def train(
    model: nn.Module,
    loss_fn: TwinFlowLoss,
    draw_batch: DrawBatch,
    *,
    steps: int,
    lr: float,
    generator: torch.Generator,
    teacher: Teacher | None = None,
    average: WeightAverage | None = None,
    grad_clip: float = 1.0,
    progress: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Adam on ``loss_fn(model, x, cond=..., uncond=...)`` for ``steps`` steps.

    ``draw_batch(generator) -> (x, cond, uncond)``; ``teacher.update(model)``
    and ``average.update(model)`` (the weights to sample from) run after each
    optimizer step when given. Returns the losses.
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        x, cond, uncond = draw_batch(generator)
        out = loss_fn(model, x, cond=cond, uncond=uncond, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        if teacher is not None:
            teacher.update(model)
        if average is not None:
            average.update(model)
        losses.append(float(out.loss.detach()))
        if progress is not None:
            progress(step, losses[-1])
    return losses
