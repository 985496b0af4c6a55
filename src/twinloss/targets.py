r"""The formulas of one TwinFlow step, each a pure function (docs/method.md, section 2).

============================================ ===================================
step                                         function
============================================ ===================================
1. fake samples ``x_hat(F(z', 1, 0))``       :func:`fake_samples`
4. guidance-enhanced target                  :func:`guidance_target`,
                                             :func:`data_guidance_target`,
                                             :func:`image_free_guidance_target`
5. RCGM any-step target                      :func:`rcgm_target` (=
                                             :func:`rcgm_displacement` then
                                             :func:`rcgm_residual_target`)
6. per-row time weight                       :func:`tangent_time_weight`
7. rectification target                      :func:`rectification_target`
7. its guidance-free real field (optional)   :func:`guidance_free_velocity`
============================================ ===================================

None of them calls a model: the model evaluations of a step are made by
:class:`~twinloss.evaluator.StepEvaluator` and passed in, so each formula can
be checked alone against a closed form.
"""

import math
from collections.abc import Callable

import torch
from jaxtyping import Float
from torch import Tensor

from twinloss._tensors import per_row

__all__ = [
    "clamp_rate",
    "clamped_correction_target",
    "data_guidance_target",
    "fake_samples",
    "guidance_free_velocity",
    "guidance_target",
    "image_free_guidance_target",
    "rcgm_displacement",
    "rcgm_residual",
    "rcgm_residual_target",
    "rcgm_target",
    "rectification_target",
    "tangent_time_weight",
    "velocity_gap",
]

TeacherField = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``(x, t, r) -> F(x, t, r)``: the teacher with its conditioning bound."""


def fake_samples(
    noise: Float[Tensor, " batch *shape"], velocity: Float[Tensor, " batch *shape"]
) -> Float[Tensor, " batch *shape"]:
    r"""Step 1: the online model's one-jump samples :math:`x_\text{fake} = z' - F(z', 1, 0)`.

    The jump :math:`x_r = x_t - (t - r) F` from ``t = 1`` to ``r = 0``, which
    is the same on every affine path (the jump only reads the average
    velocity); ``velocity`` is :math:`F(z', 1, 0)`, evaluated without grad.
    """
    return noise - velocity.to(noise.dtype)


def guidance_target(
    velocity: Float[Tensor, " batch *shape"],
    cond_velocity: Float[Tensor, " batch *shape"],
    uncond_velocity: Float[Tensor, " batch *shape"],
    scale: float,
) -> Float[Tensor, " batch *shape"]:
    r"""Step 4: guidance-enhanced target :math:`v + w (F_\text{cond} - F_\text{uncond})`.

    ``F`` is the guidance teacher's instantaneous velocity at ``(x_t, t, t)``
    with and without the conditioning.
    """
    return velocity + scale * (cond_velocity.to(velocity.dtype) - uncond_velocity.to(velocity.dtype))


def data_guidance_target(
    velocity: Float[Tensor, " batch *shape"],
    uncond_velocity: Float[Tensor, " batch *shape"],
    scale: float,
) -> Float[Tensor, " batch *shape"]:
    r"""Step 4, ``guidance_difference="data"``: :math:`v + \frac{w}{1 - w} (v - F_\text{uncond})`, for ``0 <= w < 1``.

    The guidance difference is read from the row's own velocity ``v`` instead
    of the teacher's conditional one: guidance-free training's target for the
    sampling model (Chen et al., ICML 2025, "Visual Generation Without
    Guidance", with their temperature :math:`\beta = 1 - w`). In expectation
    over the data at :math:`(x_t, c)` it is
    :math:`v_c + \frac{w}{1 - w} (v_c - F_u)`; with :math:`F_u = v_u` that is
    CFG of scale :math:`1 / (1 - w)`, the online teacher's fixed point
    (:func:`guidance_target`) reached without reading the conditional field,
    so nothing that pushes :math:`F_c` returns in its own target.
    """
    gain = scale / (1 - scale)
    return velocity + gain * (velocity - uncond_velocity.to(velocity.dtype))


def guidance_free_velocity(
    velocity: Float[Tensor, " batch *shape"],
    cond_velocity: Float[Tensor, " batch *shape"],
    uncond_velocity: Float[Tensor, " batch *shape"],
    scale: float,
) -> Float[Tensor, " batch *shape"]:
    r"""Step 7, ``rectify_field="guidance_free"``: the model's field with step 4's guidance taken out,
    :math:`F - w (G_\text{cond} - G_\text{uncond})`.

    ``velocity`` is the online model's conditional :math:`F(y, s, s)`, ``G``
    the guidance teacher at the same point. Rows trained on step 4's target
    learn :math:`F = v + w (G_c - G_u)`, so this is the velocity :math:`v` they
    would have learned without guidance. With the online teacher
    (:math:`G = F`) it is :math:`(1 - w) F_c + w F_u`, which at the fixed point
    :math:`F_c = v_u + (v_c - v_u) / (1 - w)`, :math:`F_u = v_u` is the
    conditional data velocity :math:`v_c`: the flow of a distribution, which
    the guided field is not.
    """
    return guidance_target(velocity, cond_velocity, uncond_velocity, -scale)  # the same term, subtracted


def image_free_guidance_target(
    cond_velocity: Float[Tensor, " batch *shape"],
    uncond_velocity: Float[Tensor, " batch *shape"],
    scale: float,
) -> Float[Tensor, " batch *shape"]:
    r"""Step 4, image-free: the teacher's classifier-free-guided velocity
    :math:`F_\text{uncond} + w (F_\text{cond} - F_\text{uncond})`.

    The authors' ``use_image_free`` (with their fixed teacher,
    ``ema_decay_rate: 1``): the data velocity ``v`` is dropped, the target is
    the teacher's guided field alone, so no training image is needed (the
    interpolated rows come from the online model's own one-step samples).
    """
    return uncond_velocity + scale * (cond_velocity.to(uncond_velocity.dtype) - uncond_velocity)


@torch.no_grad()
def rcgm_target(
    teacher: TeacherField,
    x_t: Float[Tensor, " batch *shape"],
    t: Float[Tensor, " batch"],
    r: Float[Tensor, " batch"],
    velocity: Float[Tensor, " batch *shape"],
    prediction: Float[Tensor, " batch *shape"],
    *,
    step: float = 0.01,
    order: int = 2,
    clamp: float = 1.0,
) -> Float[Tensor, " batch *shape"]:
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
    x_t: Float[Tensor, " batch *shape"],
    t: Float[Tensor, " batch"],
    r: Float[Tensor, " batch"],
    velocity: Float[Tensor, " batch *shape"],
    *,
    step: float = 0.01,
    order: int = 2,
) -> Float[Tensor, " batch *shape"]:
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
        jump = per_row(s - s_next, x) * teacher(x, s, s_next).to(x.dtype)
        x = x - jump
        displacement = displacement + jump
        s = s_next
    return displacement


@torch.no_grad()
def rcgm_residual(
    t: Float[Tensor, " batch"],
    r: Float[Tensor, " batch"],
    velocity: Float[Tensor, " batch *shape"],
    prediction: Float[Tensor, " batch *shape"],
    displacement: Float[Tensor, " batch *shape"],
    *,
    step: float = 0.01,
) -> Float[Tensor, " batch *shape"]:
    r"""Step 3 of :func:`rcgm_target`, unclamped: :math:`R = ((t - r) F_\theta - D) / d - v` for
    :math:`t - r \ge d`, else :math:`R = F_\theta - v` (in ``velocity``'s dtype)."""
    prediction = prediction.detach().to(velocity.dtype)
    span = t - r
    long_jump = per_row(span >= step, velocity)
    return torch.where(
        long_jump,
        (per_row(span, velocity) * prediction - displacement) / step - velocity,
        prediction - velocity,
    )


@torch.no_grad()
def clamped_correction_target(
    prediction: Float[Tensor, " batch *shape"], correction: Float[Tensor, " batch *shape"], *, clamp: float
) -> Float[Tensor, " batch *shape"]:
    r""":math:`T = \mathrm{sg}(F_\theta) - \mathrm{clamp}(C, -c, c)` (in ``correction``'s dtype).

    Both of TwinFlow's corrective targets have this form: the RCGM residual
    ``C = R`` (step 5) and the rectification's velocity gap ``C = dv``
    (step 7). Regressing :math:`F_\theta` on ``T`` moves it by ``clamp(C)``.
    """
    return prediction.detach().to(correction.dtype) - correction.clamp(-clamp, clamp)


def clamp_rate(correction: Tensor, clamp: float) -> Float[Tensor, ""]:
    """The fraction of entries of ``correction`` that reach the clamp, ``|C| >= c`` (detached; no sync)."""
    return (correction.detach().abs() >= clamp).float().mean()


@torch.no_grad()
def rcgm_residual_target(
    t: Float[Tensor, " batch"],
    r: Float[Tensor, " batch"],
    velocity: Float[Tensor, " batch *shape"],
    prediction: Float[Tensor, " batch *shape"],
    displacement: Float[Tensor, " batch *shape"],
    *,
    step: float = 0.01,
    clamp: float = 1.0,
) -> Float[Tensor, " batch *shape"]:
    r"""Steps 3-4 of :func:`rcgm_target`: :math:`T = \mathrm{sg}(F_\theta) - \mathrm{clamp}(R)`."""
    residual = rcgm_residual(t, r, velocity, prediction, displacement, step=step)
    return clamped_correction_target(prediction, residual, clamp=clamp)


def tangent_time_weight(
    t: Float[Tensor, " batch"], r: Float[Tensor, " batch"], divisor: float = 2.5
) -> Float[Tensor, " batch"]:
    r"""Step 6: the per-row weight :math:`1 + \tan\big((1 - (|t| - |r|))\,\pi / \text{divisor}\big)`.

    Equal to 1 for the one-jump rows (``|t| - |r| = 1``) and about 4.08 for
    ``r = t`` with the *default* divisor 2.5 (it must exceed 2, where tan
    diverges at ``r = t``).
    """
    return 1.0 + torch.tan((1.0 - (t.abs() - r.abs())) * math.pi / divisor)


def velocity_gap(
    fake_velocity: Float[Tensor, " batch *shape"],
    real_velocity: Float[Tensor, " batch *shape"],
    dtype: torch.dtype,
) -> Float[Tensor, " batch *shape"]:
    r"""Step 7's gap :math:`\Delta v = F(y, -s, -s) - F(y, s, s)`, the fake field minus the real one, in ``dtype``."""
    return fake_velocity.detach().to(dtype) - real_velocity.detach().to(dtype)


@torch.no_grad()
def rectification_target(
    prediction: Float[Tensor, " batch *shape"],
    fake_velocity: Float[Tensor, " batch *shape"],
    real_velocity: Float[Tensor, " batch *shape"],
    *,
    clamp: float = 1.0,
) -> Float[Tensor, " batch *shape"]:
    r"""Step 7: :math:`\mathrm{sg}\big(F_\theta - \mathrm{clamp}(F(y, -s, -s) - F(y, s, s), -c, c)\big)`.

    Regressing the one-step prediction :math:`F_\theta` on this target has
    gradient :math:`\Delta v = \mathrm{clamp}(F_\text{fake} - F_\text{real})`,
    the gap between the fake and the real velocity fields at the re-noised
    one-step samples ``y`` (*default* clamp ``c = 1``).
    """
    gap = velocity_gap(fake_velocity, real_velocity, prediction.dtype)
    return clamped_correction_target(prediction, gap, clamp=clamp)
