r"""Regression targets of the TwinFlow base loss (ALGORITHM.md, steps 4-5).

Both functions run without grad and return float tensors a reader can match
line by line to the specification.
"""

from collections.abc import Callable

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["guidance_target", "rcgm_displacement", "rcgm_residual_target", "rcgm_target"]

TeacherField = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``(x, t, r) -> F(x, t, r)``: the teacher with its conditioning bound."""


def _per_row(values: Tensor, like: Tensor) -> Tensor:
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def guidance_target(
    velocity: Float[Tensor, "batch *shape"],
    cond_velocity: Float[Tensor, "batch *shape"],
    uncond_velocity: Float[Tensor, "batch *shape"],
    scale: float,
) -> Float[Tensor, "batch *shape"]:
    r"""Guidance-enhanced target :math:`v + w (F_\text{cond} - F_\text{uncond})`."""
    return velocity + scale * (cond_velocity.to(velocity.dtype) - uncond_velocity.to(velocity.dtype))


@torch.no_grad()
def rcgm_target(
    teacher: TeacherField,
    x_t: Float[Tensor, "batch *shape"],
    t: Float[Tensor, " batch"],
    r: Float[Tensor, " batch"],
    velocity: Float[Tensor, "batch *shape"],
    prediction: Float[Tensor, "batch *shape"],
    *,
    step: float = 0.01,
    order: int = 2,
    clamp: float = 1.0,
) -> Float[Tensor, "batch *shape"]:
    r"""The N-th order recursive consistency (RCGM) target for an any-step jump.

    With ``d = step``, ``v`` the (guided) conditional velocity and
    :math:`F_\theta` the main forward's prediction at ``(x_t, t, r)``:

    1. :math:`t_m = \max(t - d, r)`, :math:`x_m = x_t - d\,v`;
    2. integrate from :math:`t_m` to ``r`` in ``order`` equal Euler jumps with
       the teacher, :math:`D = \sum_k (s_k - s_{k+1}) F(x_{s_k}, s_k, s_{k+1})`;
    3. :math:`R = ((t - r) F_\theta - D) / d - v` if :math:`t - r \ge d`,
       else :math:`R = F_\theta - v`;
    4. :math:`T = \mathrm{sg}(F_\theta) - \mathrm{clamp}(R, -c, c)`.

    Regressing :math:`F_\theta` on ``T`` has gradient ``clamp(R)``: consistency
    gradient matching. For ``r = t`` the target is ``v`` up to the clamp.

    Args:
        teacher: ``(x, t, r) -> F`` evaluated without grad.
        x_t: interpolants; t, r: times with ``0 <= r <= t <= 1`` (real rows).
        velocity: the conditional (optionally guided) velocity ``v``.
        prediction: :math:`F_\theta` (detached here).
        step: ``d`` (*default* 0.01). order: Euler jumps ``N`` (*default* 2).
        clamp: bound ``c`` on the residual (*default* 1).

    Raises:
        ValueError: if any ``r > t`` or a time lies outside ``[0, 1]``.
    """
    displacement = rcgm_displacement(teacher, x_t, t, r, velocity, step=step, order=order)
    return rcgm_residual_target(t, r, velocity, prediction, displacement, step=step, clamp=clamp)


@torch.no_grad()
def rcgm_displacement(
    teacher: TeacherField,
    x_t: Float[Tensor, "batch *shape"],
    t: Float[Tensor, " batch"],
    r: Float[Tensor, " batch"],
    velocity: Float[Tensor, "batch *shape"],
    *,
    step: float = 0.01,
    order: int = 2,
) -> Float[Tensor, "batch *shape"]:
    r"""Steps 1-2 of :func:`rcgm_target`: the teacher's displacement ``D`` from ``t_m`` to ``r``.

    Needs no prediction, so :class:`~twinloss.TwinFlowLoss` runs it *before*
    the grad-carrying forward, when that forward's activations do not yet
    occupy memory.

    Raises:
        ValueError: if any ``r > t`` or a time lies outside ``[0, 1]``.
    """
    if bool(((r > t) | (r < 0) | (t > 1)).any()):  # one device sync on the valid path
        if bool((r > t).any()):
            raise ValueError("r must not exceed t in any row (the target time precedes the current)")
        raise ValueError("rcgm_target takes real-trajectory times with 0 <= r <= t <= 1")
    return unchecked_rcgm_displacement(teacher, x_t, t, r, velocity, step=step, order=order)


@torch.no_grad()
def unchecked_rcgm_displacement(
    teacher: TeacherField, x_t: Tensor, t: Tensor, r: Tensor, velocity: Tensor, *, step: float, order: int
) -> Tensor:
    """:func:`rcgm_displacement` without the time check: for times valid by construction."""
    t_mid = torch.maximum(t - step, r)
    x = x_t - step * velocity
    s = t_mid
    displacement = torch.zeros_like(x_t)
    for k in range(1, order + 1):
        s_next = t_mid - k * (t_mid - r) / order
        jump = _per_row(s - s_next, x) * teacher(x, s, s_next).to(x.dtype)
        x = x - jump
        displacement = displacement + jump
        s = s_next
    return displacement


@torch.no_grad()
def rcgm_residual_target(
    t: Float[Tensor, " batch"],
    r: Float[Tensor, " batch"],
    velocity: Float[Tensor, "batch *shape"],
    prediction: Float[Tensor, "batch *shape"],
    displacement: Float[Tensor, "batch *shape"],
    *,
    step: float = 0.01,
    clamp: float = 1.0,
) -> Float[Tensor, "batch *shape"]:
    r"""Steps 3-4 of :func:`rcgm_target`: :math:`T = \mathrm{sg}(F_\theta) - \mathrm{clamp}(R)`."""
    prediction = prediction.detach().to(velocity.dtype)
    span = t - r
    long_jump = _per_row(span >= step, velocity)
    residual = torch.where(
        long_jump,
        (_per_row(span, velocity) * prediction - displacement) / step - velocity,
        prediction - velocity,
    )
    return prediction - residual.clamp(-clamp, clamp)
