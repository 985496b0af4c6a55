r"""Latent frames a condition replaces, each on its own clock (LTX-Video's conditions, Wan 2.2 TI2V's first frame).

Image-to-video pipelines replace latent frames with a condition ``x_c`` of
strength ``m`` and run those frames on a clock of their own: they start at
``lerp(noise, x_c, m)``, the condition at the noise level ``c = 1 - m``, stay
there while ``t > c`` (timestep ``1000 c``, never updated) and are generated
with the rest of the video from ``t = c`` on. Strength 1 (``c = 0``) holds a
frame at the condition for the whole run; a frame generated from noise has
``c = 1`` and runs on the video's clock.

The protocol's state is the interpolant ``x_t = |t| z + (1 - |t|) x`` on
every frame, so on a replaced frame it sits on the line from the condition
(when the video's frames there are the condition, as in image-to-video
training) through the noise. The frame's level is ``min(|t|, c)``; the
backbone reads the state at that level, taken off the line,

.. math:: p = x_c + \frac{\min(|t|, c)}{|t|} \,(x_t - x_c)

(``lerp(z, x_c, m)`` while held, ``x_t`` itself once generated), and the
average velocity of the jump from ``|t|`` to ``|r|`` slides along the line in
the held part and is the backbone's ``F`` in the generated part,

.. math:: u = \phi F(p) + (1 - \phi) \frac{x_t - x_c}{|t|}, \qquad
   \phi = \frac{\min(|t|, c) - \min(|r|, c)}{|t| - |r|}
   \quad (\phi = [\,|t| \le c\,] \text{ when } r = t).

So a sampler started from noise passes ``lerp(z, x_c, m)`` at level ``c``, as
the pipeline starts there, and a strength-1 frame (``phi = 0``) ends at ``x_c``
(up to rounding): the sample's frame is the condition. The loss sends
gradient through a replaced frame only in its generated share ``phi`` (none at
strength 1), and its target there is met while the frame is held. When ``c``
lies on a sampler's time grid, its Euler steps are the pipeline's loop; off
the grid the pipeline carries a held frame from level ``c`` into the next
step as if it sat at that step's time, which this does not copy.
"""

from collections.abc import Callable

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["condition_level", "generated_share", "held_frames_velocity"]


def condition_level(time: Float[Tensor, "..."], hold: Float[Tensor, "..."]) -> Float[Tensor, "..."]:
    r"""A replaced frame's time on its own clock, held at the level ``c = 1 - m``: :math:`\operatorname{sign}(t) \min(|t|, c)`."""
    return time.sign() * torch.minimum(time.abs(), hold)


def generated_share(t: Float[Tensor, "..."], r: Float[Tensor, "..."], hold: Float[Tensor, "..."]) -> Float[Tensor, "..."]:
    r"""The share of the jump from ``|t|`` to ``|r|`` in which a frame held at level ``c`` is generated,

    .. math:: \phi = \frac{\min(|t|, c) - \min(|r|, c)}{|t| - |r|},

    and its limit ``[|t| <= c]`` when ``|r| = |t|`` (the pipelines update a
    held frame from the step whose ``t`` reaches ``c``). 1 exactly where
    ``c = 1``.
    """
    start, stop = t.abs(), r.abs()
    jump = start - stop
    moving = jump > 0
    share = (torch.minimum(start, hold) - torch.minimum(stop, hold)) / torch.where(moving, jump, 1.0)
    return torch.where(moving, share, (start <= hold).to(share.dtype))


def held_frames_velocity(
    velocity_at: Callable[[Tensor], Tensor],
    x_t: Float[Tensor, "batch channels frames height width"],
    t: Float[Tensor, " batch"],
    r: Float[Tensor, " batch"],
    condition: Float[Tensor, "batch channels frames height width"],
    hold: Float[Tensor, "batch frames"],
) -> Float[Tensor, "batch channels frames height width"]:
    r"""The average velocity of ``x_t`` from ``t`` to ``r`` with each frame on its own clock (module docstring).

    Args:
        velocity_at: the backbone's ``F`` of a state, called once with ``p``
            (each frame at its level; the caller feeds it the per-frame times).
        x_t: the protocol's state.
        t, r: the rows' signed times.
        condition: ``x_c`` on the replaced frames (any finite value elsewhere).
        hold: each frame's level ``c = 1 - m``: 0 at strength 1, 1 on the frames generated from noise
            (there ``p = x_t`` and ``u = F`` exactly).
    """
    start = t.abs().to(x_t.dtype).view(-1, 1, 1, 1, 1)
    level = hold.to(x_t.dtype)[:, None, :, None, None]
    divisor = start.clamp_min(torch.finfo(x_t.dtype).tiny)  # |t| > c >= 0 wherever the line is read
    offset = x_t - condition
    velocity = velocity_at(torch.where(start > level, condition + (torch.minimum(start, level) / divisor) * offset, x_t))
    share = generated_share(t[:, None], r[:, None], hold.to(t.dtype)).to(velocity.dtype)[:, None, :, None, None]
    return torch.where(share == 1, velocity, share * velocity + (1 - share) * offset / divisor)
