r"""``TwinFlowLoss``: the partitioned TwinFlow recipe with one grad-carrying forward.

One call computes (docs/method.md, section 2)

.. math::
    L = \underbrace{\tfrac1B \textstyle\sum_{\text{real}} w(t, r)\,\rho(F_\theta, T)}_{\text{base}}
      + \underbrace{\tfrac1B \textstyle\sum_{\text{fake}} \rho(F_\theta, z - x_\text{fake})}_{\text{adv}}
      + c_\text{rect}\, \underbrace{\mathrm{mean}_\text{one-step}\, \rho\big(F_\theta, \mathrm{sg}(F_\theta - \Delta v)\big)}_{\text{rectify}}

with ``T`` the guided RCGM target, ``w`` the tangent time weight and
:math:`\Delta v = \mathrm{clamp}(F(y, -s, -s) - F(y, s, s))` the gap between
the fake and the real velocity fields at re-noised one-step samples ``y``.

``forward`` is the list of steps; each formula lives in
:mod:`twinloss.targets`, each model call goes through
:class:`~twinloss.evaluator.StepEvaluator`. Model calls per step (full recipe,
default settings), in order: without grad one for the fake samples, one
batched cond/uncond guidance call and ``estimate_order`` RCGM calls; then the
one call with grad (the whole batch); then without grad one batched fake/real
rectification call (it needs the prediction). Running the teacher passes
first keeps their working memory off the grad-carrying forward's activations.

Random numbers, in this order, from ``generator`` (or the global stream):
``t`` and ``u`` (the trajectory), the fake samples' noise ``z'``, the
interpolation noise ``z``, then after the main forward the rectification
noise ``z''`` and time ``s``. Every model pass starts from the random state
left after ``z`` (see :class:`~twinloss._random.RandomState`).
"""

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float, Int, Shaped
from torch import Tensor, nn

from twinloss import presets
from twinloss._checks import check_guidance_interval, check_instance, check_int, check_real
from twinloss._random import RandomState
from twinloss._tensors import at_least_float32
from twinloss.distances import BarronDistance, Distance, L2Distance
from twinloss.evaluator import StepEvaluator, check_not_stock_transformer
from twinloss.paths import AffinePath, LinearPath
from twinloss.protocol import (
    Conditioning,
    VelocityModel,
    check_conditioning,
    check_model_keywords,
    check_uncond_matches,
    concat_conditioning,
    conditioned_rows,
    select_rows,
    with_first_rows_appended,
)
from twinloss.targets import (
    fake_samples,
    data_guidance_target,
    guidance_free_velocity,
    guidance_target,
    clamp_rate,
    clamped_correction_target,
    image_free_guidance_target,
    rcgm_residual,
    tangent_time_weight,
    unchecked_rcgm_displacement,
    velocity_gap,
)
from twinloss.teachers import MovingAverageTeacher, OnlineTeacher, Teacher
from twinloss.time_distributions import BetaTime, LogitNormalTime, ShiftedTime, TimeDistribution
from twinloss.trajectory import GroupShares, Trajectory, TrajectorySampler

__all__ = [
    "CONDITIONED_RECTIFY_SHIFT", "DEFAULT_GUIDANCE_INTERVAL", "FINITE_CHECKS", "REAL_GROUPS", "RELEASED_GUIDANCE",
    "UNGUIDED_SHARES", "TangentTimeWeight", "TwinFlowLoss", "TwinFlowOutput", "default_rectify_time",
    "default_shares", "guides_near_noise",
]

FINITE_CHECKS = ("raise", "report", "off")
"""Values of ``TwinFlowLoss(check_finite=...)`` (docs/errors.md)."""

REAL_GROUPS = ("one_step", "multi_step", "any_step")
"""The groups interpolated from real data (every group but ``fake``)."""

CONDITIONED_RECTIFY_SHIFT = 1 / 3
"""The resolution shift of the uniform ``s`` that :func:`default_rectify_time` gives a conditioned batch
without guidance (median ``s`` 1/4)."""

PassEvaluator = StepEvaluator | Callable[[str, Tensor, Tensor, Tensor, dict[str, Tensor]], Tensor]
"""What runs a model pass, ``evaluate(name, x, t, r, cond)``: the step's
:class:`~twinloss.evaluator.StepEvaluator`, or a wrapper of it (the health
module's own, a benchmark's that changes one pass)."""

Rows = slice | Int[Tensor, " rows"]
"""Rows of a batch, as :meth:`~twinloss.trajectory.Trajectory.rows` gives them."""


def _checked_guidance_groups(groups: object, guidance_scale: float, shares: GroupShares) -> tuple[str, ...]:
    """``guidance_groups`` as a tuple of distinct real group names, in batch order, or a ``ValueError``.

    A choice other than the default must be able to guide a row: a
    multi-step or any-step group with a positive share.
    """
    if not (isinstance(groups, tuple | list) and all(isinstance(name, str) for name in groups)):
        raise ValueError(f"guidance_groups must be a tuple of group names among {REAL_GROUPS}, got {groups!r}")
    if "fake" in groups:
        raise ValueError(
            "guidance_groups cannot include 'fake': fake rows regress on z - x_fake, the fake field's own "
            f"velocity, which the guidance term does not apply to; choose among {REAL_GROUPS}"
        )
    unknown = [name for name in groups if name not in REAL_GROUPS]
    if unknown:
        raise ValueError(f"guidance_groups must name groups among {REAL_GROUPS}, got unknown {unknown}")
    if len(set(groups)) != len(groups):
        raise ValueError(f"guidance_groups names a group twice: {tuple(groups)}")
    if not groups and guidance_scale > 0:
        raise ValueError(
            f"guidance_groups is empty, so guidance_scale={guidance_scale} would guide no row; "
            "build the loss with guidance_scale=0 to train without guidance"
        )
    if guidance_scale == 0 and groups and set(groups) != set(REAL_GROUPS):
        raise ValueError(
            f"guidance_groups={tuple(groups)} is given, but guidance_scale=0 runs no guidance pass; "
            "pass guidance_scale > 0 or leave guidance_groups at its default"
        )
    guidable = [name for name in groups if name != "one_step" and getattr(shares, name) > 0]
    if guidance_scale > 0 and set(groups) != set(REAL_GROUPS) and not guidable:
        raise ValueError(
            f"guidance_groups={tuple(groups)} guides no row: one-step rows sit at t = 1, outside the open "
            f"guidance_interval, and the shares {shares.as_dict()} give the other named groups no row; "
            "name a multi_step or any_step group with a positive share, or pass guidance_scale=0"
        )
    return tuple(name for name in REAL_GROUPS if name in groups)


def _check_components(
    shares: object, time_distribution: object, path: object, distance: object, rectify_time: object,
    rectify_distance: object,
) -> None:
    """A ``ValueError`` naming the first component argument that is neither ``None`` (its default) nor of its kind."""
    kinds = (
        ("shares", shares, GroupShares), ("time_distribution", time_distribution, TimeDistribution),
        ("path", path, AffinePath), ("distance", distance, Distance), ("rectify_time", rectify_time, TimeDistribution),
        ("rectify_distance", rectify_distance, Distance),
    )
    for name, value, kind in kinds:
        if value is not None:
            check_instance(value, name, kind)


DEFAULT_GUIDANCE_INTERVAL = (0.2, 0.7)
"""The default ``guidance_interval``: guidance on the middle of the path, ``0.2 < t < 0.7`` (docs/quality.md,
"Thirtieth round" and "Thirty-first round")."""
RELEASED_GUIDANCE: Mapping[str, Any] = MappingProxyType({"guidance_scale": 0.5, "guidance_interval": (0.0, 1.0)})
"""The guidance of the authors' released step (docs/method.md, step 4): ``w = 0.5`` on every real row at
``0 < t < 1``, CFG 2 with the online teacher, with the quarters and the logit-normal law of ``s`` it selects
(:func:`guides_near_noise`). This library's default until the thirty-first round of issue 12, and the recipe
every benchmark run named "defaults" was measured with: ``TwinFlowLoss(**RELEASED_GUIDANCE)`` (read-only)."""
UNUSED_SETTING_DEFAULTS: dict[str, object] = {
    "guidance_interval": DEFAULT_GUIDANCE_INTERVAL, "rectify_clamp": 1.0, "estimate_step": 0.01, "residual_clamp": 1.0,
}
"""The defaults of the settings that a switched-off pass never reads (see :func:`_check_unused_settings`)."""


def _check_unused_settings(
    *, guidance_scale: float, guidance_interval: tuple[float, float], rectify_weight: float, rectify_clamp: float,
    estimate_order: int, estimate_step: float, residual_clamp: float,
) -> None:
    """A ``ValueError`` naming a setting changed from its default for a pass the loss switches off.

    ``guidance_scale=0`` runs no guidance pass, ``rectify_weight=0`` no
    rectification and ``estimate_order=0`` no RCGM chain, so a value chosen
    for them would be silently ignored.
    """
    unused = (
        (guidance_scale == 0, "guidance_interval", guidance_interval, "guidance_scale=0 runs no guidance pass"),
        (rectify_weight == 0, "rectify_clamp", rectify_clamp, "rectify_weight=0 runs no rectification"),
        (estimate_order == 0, "estimate_step", estimate_step, "estimate_order=0 runs no RCGM chain"),
        (estimate_order == 0, "residual_clamp", residual_clamp, "estimate_order=0 runs no RCGM chain"),
    )
    for off, name, value, reason in unused:
        if off and value != UNUSED_SETTING_DEFAULTS[name]:
            raise ValueError(f"{name}={value} is given, but {reason}; leave {name} at its default")


RECTIFY_FIELDS = ("guided", "guidance_free")
GUIDANCE_DIFFERENCES = ("teacher", "data")


def _require_scale_inside_unit_interval(setting: str, guidance_scale: float, why: str) -> None:
    """A ``ValueError`` naming ``setting`` unless ``0 < guidance_scale < 1``, the range it needs (``why``)."""
    if guidance_scale == 0:
        name = setting.split("=")[0]
        raise ValueError(f"{setting} is given, but guidance_scale=0 runs no guidance pass; leave {name} at its default")
    if guidance_scale >= 1:
        raise ValueError(f"guidance_scale must be < 1 with {setting} ({why}), got {guidance_scale}")


def _check_guidance_difference(difference: object, guidance_scale: float, image_free: bool) -> None:
    """A ``ValueError`` naming ``guidance_difference`` when its value is unknown or the configuration cannot honour it."""
    if difference not in GUIDANCE_DIFFERENCES:
        raise ValueError(f"guidance_difference must be one of {GUIDANCE_DIFFERENCES}, got {difference!r}")
    if difference == "teacher":
        return
    _require_scale_inside_unit_interval("guidance_difference='data'", guidance_scale,
                                        "its gain is w / (1 - w), CFG 1 / (1 - w)")
    if image_free:
        raise ValueError("guidance_difference='data' reads the data velocity v, which image_free=True drops: "
                         "pass guidance_difference='teacher'")


def _check_feedback_balance(
    balance: bool, guidance_scale: float, difference: str, image_free: bool, guidance_teacher: Teacher
) -> None:
    """A ``ValueError`` naming ``balance_guidance_feedback`` when the configuration has no feedback to balance."""
    if not balance:
        return
    _require_scale_inside_unit_interval("balance_guidance_feedback=True", guidance_scale,
                                        "the guided rows' weight is 1 / (1 - w)")
    if difference != "teacher" or image_free:
        raise ValueError("balance_guidance_feedback=True balances the feedback of the teacher's guidance difference "
                         "on the data rows: pass guidance_difference='teacher' and image_free=False")
    if not isinstance(guidance_teacher, (OnlineTeacher, MovingAverageTeacher)):
        raise ValueError(
            f"balance_guidance_feedback=True undoes the feedback of a guidance teacher that follows the model "
            f"(the online model or a moving average of it), but the guidance teacher "
            f"{type(guidance_teacher).__name__} has fixed weights and feeds nothing back: leave "
            "balance_guidance_feedback at its default"
        )


TWIN_ROWS = ("all", "conditioned")


def _check_twin_rows(
    twin_rows: object, guidance_scale: float, image_free: bool, shares: GroupShares, rectify_weight: float
) -> None:
    """A ``ValueError`` naming ``twin_rows`` when its value is unknown or the configuration cannot honour it."""
    if twin_rows not in TWIN_ROWS:
        raise ValueError(f"twin_rows must be one of {TWIN_ROWS}, got {twin_rows!r}")
    if twin_rows == "all":
        return
    if guidance_scale == 0:
        raise ValueError("twin_rows='conditioned' keeps the twin terms off the null-conditioned rows, whose field only "
                         "the guidance target reads, but guidance_scale=0 runs no guidance pass: leave twin_rows "
                         "at its default")
    if image_free:
        raise ValueError("twin_rows='conditioned' weighs the fake and rectification rows by their conditioning, but "
                         "image_free=True trains every row on the model's samples: pass image_free=False")
    if shares.fake == 0 and rectify_weight == 0:
        raise ValueError("twin_rows='conditioned' selects the rows of the twin terms, but this loss has none "
                         "(shares.fake=0 and rectify_weight=0): leave twin_rows at its default")


UNGUIDED_SHARES = GroupShares(one_step=7 / 24, multi_step=7 / 24, any_step=7 / 24, fake=1 / 8)
"""The default partition without guidance: a fake share of 1/8, the three real groups 7/24 each."""


def guides_near_noise(guidance_scale: float, guidance_interval: tuple[float, float] = DEFAULT_GUIDANCE_INTERVAL) -> bool:
    r"""Whether the guided target reaches the noise end of the path: ``guidance_scale > 0`` and an interval
    ``(low, 1)``.

    The default partition (:func:`default_shares`) and law of ``s``
    (:func:`default_rectify_time`) follow this, not the scale alone. With
    guidance up to the noise end (the authors' ``(0, 1)``) the field the
    rectification compares against is guided everywhere it reads it, and
    the quarters and the logit-normal law were better there. With guidance
    on the middle of the path (the default ``(0.2, 0.7)``) the field near the
    data is the plain conditional one, and the unguided partition and law
    were better: the twin terms went from 0.047 FD behind RCGM-only to level
    on the real patches and from level to 4.0 FD ahead on the digits
    (docs/quality.md, "Thirtieth round").

    Raises:
        ValueError: naming ``guidance_scale`` or ``guidance_interval`` for a value out of range.
    """
    _checked_scale(guidance_scale)
    return guidance_scale > 0 and check_guidance_interval(guidance_interval)[1] == 1.0


def default_shares(guidance_scale: float, guidance_interval: tuple[float, float] = DEFAULT_GUIDANCE_INTERVAL) -> GroupShares:
    r"""The group partition when ``shares`` is not given.

    With guidance up to the noise end (:func:`guides_near_noise`) equal
    quarters, the authors' balance :math:`\lambda = 1/2` (the twin groups
    ``one_step`` and ``fake`` get half of each batch). Otherwise, as without
    guidance, the fake group gets 1/8 of
    the batch and the three real groups 7/24 each
    (:data:`UNGUIDED_SHARES`): the rectification keeps its one-step rows and
    the fake field, which shares every weight with the real one, gets half
    the rows. Without guidance that partition was better than the quarters
    or even with them on every benchmark (ring, shapes, the real patches at
    both budgets and widths, the digits; docs/quality.md, "Sixth round" to
    "Tenth round"); with guidance on the whole path it was worse on the real
    patches, so the quarters stay there. Both partitions give every group a
    row from a batch of 4 on.

    Raises:
        ValueError: naming ``guidance_scale`` or ``guidance_interval`` for a value out of range.
    """
    return GroupShares() if guides_near_noise(guidance_scale, guidance_interval) else UNGUIDED_SHARES


def _checked_scale(guidance_scale: object) -> float:
    """``guidance_scale`` as a float, or a ``ValueError`` naming it if it is not a finite number >= 0."""
    if not check_real(guidance_scale, "guidance_scale") >= 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale}")
    return float(guidance_scale)


def default_rectify_time(
    guidance_scale: float, *, conditioned: bool, guidance_interval: tuple[float, float] = DEFAULT_GUIDANCE_INTERVAL
) -> TimeDistribution:
    r"""The law of the rectification's time ``s`` when ``rectify_time`` is not given.

    * With guidance up to the noise end (:func:`guides_near_noise`): the logit-normal
      :math:`s = \sigma(n)`, :math:`n \sim N(0, 1)` (``LogitNormalTime(0, 1)``),
      which spends the rectification's unit pushes in the middle of the path
      rather than evenly along it.
    * Otherwise (no guidance, or guidance on an interval below ``t = 1``), on a batch that carries a
      conditioning (``cond``):
      the uniform draw shifted towards the data,
      :math:`s = u / (3 - 2u)`, :math:`u \sim U(0, 1)` (``ShiftedTime(1/3)``,
      median 1/4). A class label fixes the sample's global structure, and
      what the gap has left to correct is detail, which it reads
      repeatably only near the data.
    * Otherwise, without a conditioning: the authors' uniform
      draw, :math:`s \sim U(0, 1)` (``BetaTime(1, 1)``). Which mode an
      unconditional sample lands in is decided at high noise, and a law
      that starves the middle of the path loses those pushes.

    Each law was better than the others (or even with them) on every
    benchmark of its kind, and the shift towards the data was 0.40 FD
    worse on the one unconditional benchmark (docs/quality.md, "Seventh
    round", "Eighth round" and "Twelfth round").

    Args:
        guidance_scale: the loss's ``w`` (a finite number >= 0).
        conditioned: whether the batch comes with a (non-empty) ``cond``.
        guidance_interval: the loss's ``guidance_interval``.

    Raises:
        ValueError: naming ``guidance_scale`` or ``guidance_interval`` for a value out of range.
    """
    if guides_near_noise(guidance_scale, guidance_interval):
        return LogitNormalTime(0.0, 1.0)
    return ShiftedTime(CONDITIONED_RECTIFY_SHIFT) if conditioned else BetaTime(1.0, 1.0)


def _check_rectify_field(
    field: object, guidance_scale: float, rectify_weight: float, guidance_groups: tuple[str, ...], image_free: bool
) -> None:
    """A ``ValueError`` naming ``rectify_field`` when its value is unknown or the configuration cannot honour it."""
    if field not in RECTIFY_FIELDS:
        raise ValueError(f"rectify_field must be one of {RECTIFY_FIELDS}, got {field!r}")
    if field == "guided":
        return
    reasons = [
        (guidance_scale == 0, "guidance_scale=0 puts no guidance in the field to take out"),
        (rectify_weight == 0, "rectify_weight=0 runs no rectification"),
        ("multi_step" not in guidance_groups,
         f"guidance_groups={guidance_groups} leaves the multi-step rows, which train F(y, s, s), unguided"),
        (image_free, "image_free=True trains no field of the form v + w (G_c - G_u)"),
    ]
    for failed, reason in reasons:
        if failed:
            raise ValueError(f"rectify_field='guidance_free' cannot be honoured: {reason}; use rectify_field='guided'")


class TangentTimeWeight(nn.Module):
    r"""Per-row weight :math:`1 + \tan\big((1 - (|t| - |r|))\,\pi / \text{divisor}\big)`
    (:func:`~twinloss.targets.tangent_time_weight`).

    Equal to 1 for the one-jump rows (``t - r = 1``) and about 4.08 for
    ``r = t`` with the *default* divisor 2.5 (must exceed 2, where tan diverges).
    """

    def __init__(self, divisor: float = 2.5) -> None:
        super().__init__()
        if not (divisor > 2.0 and math.isfinite(divisor)):
            raise ValueError(f"divisor must be a finite number > 2, got {divisor}")
        self.divisor = float(divisor)

    def forward(
        self, t: Float[Tensor, " batch"], r: Float[Tensor, " batch"]
    ) -> Float[Tensor, " batch"]:
        return tangent_time_weight(t, r, self.divisor)


@dataclass(frozen=True)
class TwinFlowOutput:
    """What one loss evaluation returns.

    Attributes:
        loss: the scalar to back-propagate.
        terms: detached scalars for logging: ``loss = base + adv +
            rectify_weight * rectify``; ``base/<group>`` are per-group means of
            the weighted distance.
        model_calls: model evaluations made (with and without grad).
        sample_evaluations: rows evaluated, summed over all model calls.
        grad_sample_evaluations: rows evaluated with grad (the batch size).
        calls_per_pass: model calls per pass (``fake``, ``guidance``,
            ``rcgm``, ``main``, ``rectify``; see :mod:`twinloss.evaluator`).
        clamp_rates: detached fractions of this step's corrections that
            reached their clamp, for the passes that ran: ``"residual"``,
            the entries of the RCGM residual ``R`` on the real rows with
            ``|R| >= residual_clamp``, and ``"rectify"``, the entries of the
            velocity gap ``dv`` with ``|dv| >= rectify_clamp``
            (read without a device sync until logged; ``docs/health.md``).
        nonfinite_source: with ``check_finite="report"``, the first source of
            a NaN or infinity in this step: an input (``"x"``,
            ``"cond['key']"``, ``"uncond['key']"``), a pass (``"fake"``,
            ``"guidance"``, ``"rcgm"``, ``"main"``, ``"rectify"``) or
            ``"loss"`` (the arithmetic after the passes); ``None`` when all
            were finite or the check is off.
    """

    loss: Float[Tensor, ""]
    terms: dict[str, Tensor] = field(repr=False)
    model_calls: int
    sample_evaluations: int
    grad_sample_evaluations: int
    calls_per_pass: dict[str, int] = field(default_factory=dict)
    nonfinite_source: str | None = None
    clamp_rates: dict[str, Tensor] = field(default_factory=dict, repr=False)

    @property
    def finite(self) -> bool:
        """Whether the checked step was finite: skip ``backward`` and the optimizer step when False."""
        return self.nonfinite_source is None


class TwinFlowLoss(nn.Module):
    r"""The TwinFlow training objective (Cheng et al., ICLR 2026), full recipe.

    Call as ``loss_fn(model, x, cond=..., uncond=..., generator=...)``; the
    model is passed at call time and never stored (see
    :class:`~twinloss.protocol.VelocityModel` for its contract). Variants are
    factories, so no argument is ever silently replaced:
    :meth:`rcgm` (any-step base only), :meth:`plain_flow_matching` and
    :meth:`from_preset` (the authors' released configurations).

    Args:
        shares: the group partition (*default* :func:`default_shares`:
            equal quarters with guidance up to the noise end, a fake share of
            1/8 otherwise, the default's guidance on the middle included).
        fake_rows: where the fake group's rows come from. ``"from_batch"``
            (*default*, the authors' recipe): the last ``shares.fake`` of the
            batch's rows, whose data is replaced by the model's one-jump
            samples, so that share of ``x`` is never trained on (only its
            conditioning is read). ``"added"``: every row of ``x`` is a real
            row, split between the real groups in the proportions of their
            shares, and :math:`n = \lfloor B f / (1 - f) + 1/2 \rfloor`
            fake rows (``f = shares.fake``) are appended, with the
            conditioning of the batch's first ``n`` rows (of ``cond`` and
            ``uncond``): the same step as ``"from_batch"`` on ``B + n`` rows,
            at that cost, without drawing data that is thrown away; and the
            real rows are the ones :meth:`rcgm` trains with the same shares'
            real part, so the twin terms are an addition to RCGM's step, not
            a share of it (docs/method.md, section 2.1). Needs
            ``0 < shares.fake < 1`` and ``image_free=False``.
        time_distribution: law of ``t`` (*default* uniform, ``Beta(1, 1)``).
        multi_step_gap: ``r = t - u t g`` for multi-step rows (*default* 0.05).
        path: the interpolation path (*default* linear).
        distance: per-row ``rho`` (*default* Barron, ``alpha=1, c=1e-3``).
        time_weight: per-row weight of real rows: ``"tangent"`` (*default*,
            a fresh :class:`TangentTimeWeight` with divisor 2.5), an instance,
            or ``None`` to weigh every row 1.
        teacher: evaluator of both the guidance and the RCGM passes; shorthand
            for passing the same teacher as ``guidance_teacher`` and
            ``rcgm_teacher`` (give either this or those). A loss whose passes
            share one teacher (the default, an online one) has it as
            ``loss_fn.teacher`` and saves it under ``teacher.``; separate
            teachers are saved under ``guidance_teacher.`` and
            ``rcgm_teacher.``. Either way ``loss_fn.guidance_teacher`` and
            ``loss_fn.rcgm_teacher`` name them and
            :meth:`update_teachers` updates each once.
        guidance_teacher: evaluator of the guidance pass (*default* online
            model under no_grad). The authors' LoRA and image-free recipes use
            the base model here.
        rcgm_teacher: evaluator of the RCGM chain (*default* online model
            under no_grad); it must see ``r`` and the sign, so a base model
            that ignores them does not belong here.
        estimate_step: RCGM step ``d`` (*default* 0.01).
        estimate_order: RCGM Euler jumps ``N`` (*default* 2); ``0`` skips the
            RCGM chain and regresses on the (guided) velocity ``v`` directly.
        residual_clamp: bound on the RCGM residual (*default* 1).
        guidance_scale: ``w`` of the guidance-enhanced target
            :math:`v + w (F_c - F_u)` (*default* 0.2, CFG 1.25 with the online
            teacher, on ``guidance_interval``; the authors' is 0.5 on the
            whole path, see the presets; 0 disables it and skips
            its pass). Needs ``uncond`` when > 0; with 0 a given ``uncond``
            is still checked but not read, so a trainer may pass its null
            conditioning whatever the scale (the sampler, whose scale defaults
            to 0, refuses it instead). With the online (or an EMA)
            teacher it is classifier-free guidance of scale
            :math:`1 / (1 - w)` at the fixed point (docs/method.md, step 4):
            the null-label rows learn :math:`F_u = v_u`, the conditional ones
            :math:`F_c = v_c + w (F_c - v_u)`, so
            :math:`F_c = v_u + (v_c - v_u) / (1 - w)`; ``w = 0.5`` is CFG 2,
            0.8 is CFG 5, and ``w >= 1`` has no fixed point. The online
            teacher also multiplies the errors of its own :math:`F_c - F_u`
            by :math:`1 / (1 - w)` and trains on them, which made 1-NFE
            quality degrade with training on the real-patch benchmark. With
            a fixed teacher (:class:`~twinloss.FrozenTeacher` of the
            pretrained weights) it is CFG :math:`1 + w` of that teacher,
            with no feedback (docs/quality.md, "Which guidance setting").
            Where guidance can sharpen the classes the twin terms add
            adherence on top of that CFG (the rectification towards the
            guided field guides further; measured on the digits benchmark),
            so the same class adherence comes at a smaller ``w`` than for
            RCGM alone: choose ``w`` by the adherence you want
            (docs/quality.md, "Fifth round").
        guidance_interval: open interval of ``t`` where guidance applies
            (*default* ``(0.2, 0.7)``, the middle of the path; the authors'
            ``(0, 1)`` guides every row but the one-step rows at ``t = 1``).
            Which end it reaches sets the default partition and law of ``s``
            (:func:`guides_near_noise`). With the default, the twin terms were
            ahead of their RCGM-only ablation on the real patches and the
            digits and behind it on the ring only at noise level (less than
            without guidance), and 1-NFE
            FD fell to a quarter of the authors' setting's on the patches at
            the same class accuracy (docs/quality.md, "Thirty-first round").
        guidance_groups: the real groups whose rows get the guided target
            (*default* all of ``"one_step"``, ``"multi_step"``,
            ``"any_step"``: the authors' recipe); rows of the other groups
            keep ``v``, and the RCGM chain starts from that mixed velocity.
            One-step rows sit at ``t = 1``, outside the open interval, so
            naming them changes nothing. ``("any_step",)`` reads the
            guidance direction from an unguided instantaneous field (CFG
            about :math:`1 + w`, no feedback): it kept the guidance-off
            1-NFE quality on the real-patch benchmark, gave the best guided
            FD on the digits and was even with the default on the ring
            (docs/quality.md, "Which guidance setting").
        guidance_difference: where step 4's guidance difference is read.
            ``"teacher"`` (*default*, the authors' recipe): the guidance
            teacher's :math:`v + w (G_c - G_u)`, one call on the conditional
            and the null conditioning. ``"data"``: the row's own velocity,
            :math:`v + \frac{w}{1 - w} (v - G_u)`
            (:func:`~twinloss.targets.data_guidance_target`, guidance-free
            training's target, Chen et al. 2025), one call on the null
            conditioning only, and rows whose ``cond`` equals ``uncond`` (the
            dropped labels) keep ``v``. It trains CFG :math:`1 / (1 - w)`,
            the online teacher's fixed point, with any teacher, and reads no
            conditional velocity, so nothing that pushes :math:`F_c` (the
            twin terms do) is fed back into its own target; on the ring
            benchmark that feedback was two fifths of the twin terms'
            guided deficit against RCGM-only. ``guidance_scale=1/3`` (CFG
            1.5) put TwinFlow ahead of RCGM-only on the digits without a
            copy of the weights (docs/quality.md, "Nineteenth round"). Needs
            ``0 < guidance_scale < 1`` and ``image_free=False``.
        balance_guidance_feedback: weigh the base term of each guided row whose
            ``cond`` is not the null one by :math:`1 / (1 - w)` (*default*
            False, the authors' recipe). A guidance teacher that follows the
            model (the default online one, or a moving average) puts
            :math:`w F_c` into :math:`F_c`'s own target, so the data pulls a
            displacement of :math:`F_c` back at the rate :math:`1 - w`, and a
            lasting push on the conditional field (the twin terms push it)
            settles :math:`1 / (1 - w)` times as far as on an unguided row.
            The weight restores the unguided rate without a copy of the
            weights or another pass; the fixed point, CFG :math:`1 / (1 - w)`,
            is unchanged (under L2 the weighted gradient is that of the fixed
            target :math:`(v - w F_u) / (1 - w)`). Needs ``0 < guidance_scale < 1``,
            ``guidance_difference="teacher"``, ``image_free=False`` and a
            guidance teacher that follows the model (a fixed one,
            :class:`~twinloss.FrozenTeacher`, feeds nothing back). Measured
            (docs/quality.md, "Twenty-second round"): a third of the ring
            benchmark's guided deficit against RCGM-only, the share the
            data difference takes; at ``w = 0.5`` it also reached CFG 2
            faster and cost FD on the real patches and the digits.
        twin_rows: the rows the twin terms train. ``"all"`` (*default*, the
            authors' recipe): every fake row and every one-step row of the
            rectification. ``"conditioned"``: those whose ``cond`` is the null
            one (the dropped labels) weigh 0 in ``L_adv`` and in the
            rectification's mean (the other rows keep their weight, so each
            row pushes as before), and the twin terms never push the
            unconditional field :math:`F_u` that the guidance target reads.
            At the online teacher's fixed point
            :math:`F_c = (v_c - w F_u) / (1 - w)`, a push on :math:`F_u` moves
            the conditional field by :math:`w / (1 - w)` times as much, against
            it. The null rows' fake samples are still drawn (that pass keeps
            its size). Needs ``guidance_scale > 0`` (nothing else reads
            :math:`F_u`), ``image_free=False`` and twin terms (a fake share
            or ``rectify_weight > 0``). Measured (docs/quality.md,
            "Twenty-third round"): a diagnostic that did not help. On the ring
            benchmark's guided deficit against RCGM-only it moved SW by
            -0.005 ± 0.006 with the online teacher and -0.001 ± 0.002 with
            the balanced one (10 seeds), so the direct push on :math:`F_u` is
            not what a fixed guidance teacher removes.
        image_free: the authors' ``use_image_free`` (*default* False): every
            row is interpolated from the online model's own one-step samples
            instead of ``x`` (only ``x``'s shape and dtype are used), and the
            guided rows regress on the guidance teacher's classifier-free
            guided velocity :math:`F_u + w (F_c - F_u)`
            (:func:`~twinloss.targets.image_free_guidance_target`). Needs
            ``guidance_scale > 0``.
        rectify_weight: ``c_rect`` (*default* 0.5; 0 skips the pass).
        rectify_clamp: bound on the velocity gap ``dv`` (*default* 1).
        rectify_field: the real field of the rectification's gap
            ``dv = F(y, -s, -s) - real``: ``"guided"`` (*default*, the
            authors' recipe) is the model's own :math:`F_c(y, s, s)`, which
            step 4 trains towards the guided field, the flow of no
            distribution; ``"guidance_free"`` takes step 4's guidance back
            out, :math:`F_c - w (G_c - G_u)` with ``G`` the guidance teacher
            at ``(y, s, s)``, on the rows whose ``s`` lies inside
            ``guidance_interval`` (:func:`~twinloss.targets.guidance_free_velocity`;
            with the online teacher the conditional data velocity at the
            fixed point). With the default online teacher its :math:`G_u`
            joins the rectification's call (no extra call, up to half as many
            rows again in it), with any other one more guidance pass. With
            guidance the default's gap cannot close; the guidance-free field
            beat the default at the same ``w`` on the digits benchmark, but
            by giving most of the guidance back, and at equal class
            adherence it was behind RCGM-only at every scale
            (docs/quality.md, "Fifth round"): an option for experiments, not
            a recommendation. Needs ``guidance_scale > 0``, ``rectify_weight > 0``,
            ``"multi_step"`` in ``guidance_groups`` (the rows that train
            :math:`F(y, s, s)`) and ``image_free=False``.
        rectify_time: law of the re-noising time ``s`` of step 7, at which the
            gap ``dv`` is read (*default* ``None``: for each batch,
            :func:`default_rectify_time`, which follows the guidance and the
            conditioning: ``LogitNormalTime(0, 1)`` with guidance up to the
            noise end (:func:`guides_near_noise`); otherwise, the default's
            guidance on the middle included, ``ShiftedTime(1/3)``, towards the
            data, on a batch passed with ``cond``, and the authors' uniform
            ``Beta(1, 1)`` on one without; independent of ``time_distribution``). The Barron
            distance pushes every row with a unit direction, so the law
            decides where along the path the pushes go. :meth:`rectify_law`
            names the law a batch gets. Pass ``BetaTime()`` for the authors'
            uniform draw in every case (the presets do).
            Needs ``rectify_weight > 0``.
        rectify_distance: per-row ``rho`` of step 7 (*default* ``distance``,
            the authors' recipe). Under the Barron distance every one-step
            row is pushed by the same amount along its gap; under
            :class:`~twinloss.distances.L2Distance` the push is proportional
            to the gap. Without guidance ``rectify_distance=L2Distance()``
            with ``rectify_weight=2`` was the one setting ahead of RCGM-only
            at every checkpoint on the real-image patches (twenty seeds), and
            it lost the unconditional shapes and the digits
            (docs/quality.md, "Eleventh round"). Needs ``rectify_weight > 0``.
        share_random_stream: run every model pass from the random state of
            the main forward (matching dropout masks) and leave the global RNG
            as one forward would (*default* True).
        check_finite: the finite-value policy (docs/errors.md): ``"raise"``
            (*default*) raises a ValueError naming the first input or pass
            that held NaN or infinity; ``"report"`` returns it in
            :attr:`TwinFlowOutput.nonfinite_source` so a trainer can skip the
            step; ``"off"`` checks nothing. Checked: ``x``, the floating
            ``cond`` / ``uncond`` tensors, every pass output and the loss,
            with one device sync per step.

    Raises:
        ValueError: naming the argument, for a value out of range or one the
            configuration could not honour (a teacher for a pass that never
            runs, ``rectify_weight > 0`` without one-step rows, ...).
    """

    def __init__(
        self,
        *,
        shares: GroupShares | None = None,
        fake_rows: Literal["from_batch", "added"] = "from_batch",
        time_distribution: TimeDistribution | None = None,
        multi_step_gap: float = 0.05,
        path: AffinePath | None = None,
        distance: Distance | None = None,
        time_weight: TangentTimeWeight | Literal["tangent"] | None = "tangent",
        teacher: Teacher | None = None,
        guidance_teacher: Teacher | None = None,
        rcgm_teacher: Teacher | None = None,
        estimate_step: float = 0.01,
        estimate_order: int = 2,
        residual_clamp: float = 1.0,
        guidance_scale: float = 0.2,
        guidance_interval: tuple[float, float] = DEFAULT_GUIDANCE_INTERVAL,
        guidance_groups: tuple[str, ...] = REAL_GROUPS,
        guidance_difference: Literal["teacher", "data"] = "teacher",
        balance_guidance_feedback: bool = False,
        twin_rows: Literal["all", "conditioned"] = "all",
        image_free: bool = False,
        rectify_weight: float = 0.5,
        rectify_clamp: float = 1.0,
        rectify_field: Literal["guided", "guidance_free"] = "guided",
        rectify_time: TimeDistribution | None = None,
        rectify_distance: Distance | None = None,
        share_random_stream: bool = True,
        check_finite: Literal["raise", "report", "off"] = "raise",
    ) -> None:
        super().__init__()
        if check_finite not in FINITE_CHECKS:
            raise ValueError(f"check_finite must be one of {FINITE_CHECKS}, got {check_finite!r}")
        _check_components(shares, time_distribution, path, distance, rectify_time, rectify_distance)
        if not (0.0 < check_real(estimate_step, "estimate_step") < 1.0):
            raise ValueError(f"estimate_step must lie in (0, 1), got {estimate_step}")
        self.estimate_order = check_int(estimate_order, "estimate_order", minimum=0)
        for name, value in (("residual_clamp", residual_clamp), ("rectify_clamp", rectify_clamp)):
            if not check_real(value, name) > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        _checked_scale(guidance_scale)
        if not check_real(rectify_weight, "rectify_weight") >= 0:
            raise ValueError(f"rectify_weight must be a finite number >= 0, got {rectify_weight}")
        low, high = check_guidance_interval(guidance_interval)
        _check_unused_settings(
            guidance_scale=guidance_scale, guidance_interval=(low, high), rectify_weight=rectify_weight,
            rectify_clamp=rectify_clamp, estimate_order=estimate_order, estimate_step=estimate_step,
            residual_clamp=residual_clamp,
        )
        if time_weight == "tangent":
            time_weight = TangentTimeWeight()
        elif not (time_weight is None or isinstance(time_weight, TangentTimeWeight)):
            raise ValueError(f"time_weight must be 'tangent', a TangentTimeWeight or None, got {time_weight!r}")
        shares = shares if shares is not None else default_shares(guidance_scale, (low, high))
        if rectify_weight > 0 and shares.one_step == 0:
            raise ValueError(
                f"rectify_weight={rectify_weight} acts on one-step rows, but shares.one_step is 0: "
                "pass rectify_weight=0"
            )
        self.guidance_groups = _checked_guidance_groups(guidance_groups, guidance_scale, shares)
        _check_rectify_field(rectify_field, guidance_scale, rectify_weight, self.guidance_groups, image_free)
        _check_guidance_difference(guidance_difference, guidance_scale, image_free)
        if rectify_time is not None and rectify_weight == 0:
            raise ValueError("rectify_time sets the rectification's times, which rectify_weight=0 switches off")
        if rectify_distance is not None and rectify_weight == 0:
            raise ValueError("rectify_distance sets the rectification's distance, which rectify_weight=0 switches off")
        if image_free and fake_rows == "added":
            raise ValueError(
                "fake_rows='added' keeps every row of x as data, but image_free=True trains on no data row: "
                "pass fake_rows='from_batch'"
            )
        if image_free and guidance_scale == 0:
            raise ValueError(
                "image_free=True regresses on the guidance teacher's guided velocity, which "
                "guidance_scale=0 switches off: pass guidance_scale > 0"
            )

        self.trajectory = TrajectorySampler(time_distribution, shares, multi_step_gap, fake_rows)
        self.path = path if path is not None else LinearPath()
        self.distance = distance if distance is not None else BarronDistance()
        self.time_weight = time_weight
        self._set_teachers(
            teacher, guidance_teacher, rcgm_teacher,
            guidance_used=guidance_scale > 0, rcgm_used=self.estimate_order > 0,
        )
        _check_feedback_balance(balance_guidance_feedback, guidance_scale, guidance_difference, image_free,
                                self.guidance_teacher)
        self.balance_guidance_feedback = balance_guidance_feedback
        _check_twin_rows(twin_rows, guidance_scale, image_free, shares, rectify_weight)
        self.twin_rows = twin_rows
        self.estimate_step = float(estimate_step)
        self.residual_clamp = float(residual_clamp)
        self.guidance_scale = float(guidance_scale)
        self.guidance_interval = (float(low), float(high))
        self.guidance_difference = guidance_difference
        self.image_free = bool(image_free)
        self.rectify_weight = float(rectify_weight)
        self.rectify_clamp = float(rectify_clamp)
        self.rectify_field = rectify_field
        self.rectify_time = rectify_time
        if rectify_time is None:  # registered, so the loss's repr names both
            self.unconditioned_rectify_time = default_rectify_time(
                guidance_scale, conditioned=False, guidance_interval=(low, high))
            self.conditioned_rectify_time = default_rectify_time(
                guidance_scale, conditioned=True, guidance_interval=(low, high))
        self.rectify_distance = rectify_distance if rectify_distance is not None else self.distance
        self.share_random_stream = share_random_stream
        self.check_finite = check_finite

    def rectify_law(self, *, conditioned: bool) -> TimeDistribution:
        """The law of step 7's ``s`` on a batch with (``conditioned``) or without a ``cond``: ``rectify_time``
        if one was given, else :func:`default_rectify_time`'s law for this loss's guidance."""
        if self.rectify_time is not None:
            return self.rectify_time
        return self.conditioned_rectify_time if conditioned else self.unconditioned_rectify_time

    # ------------------------------------------------------------- factories
    @classmethod
    def rcgm(cls, **kwargs) -> "TwinFlowLoss":
        """The any-step base alone (RCGM): no fake group, no rectification.

        Takes the constructor's arguments except the twin ones
        (``rectify_weight``, ``rectify_clamp``, ``rectify_field``,
        ``rectify_time``, ``rectify_distance``, ``image_free``); ``shares`` defaults to thirds over
        ``one_step``, ``multi_step``, ``any_step`` and must give the ``fake``
        group nothing.

        Raises:
            ValueError: naming a twin argument, or ``shares`` with a fake share.
        """
        for name in ("rectify_weight", "rectify_clamp", "rectify_field", "rectify_time", "rectify_distance",
                     "image_free", "twin_rows"):
            if name in kwargs:
                raise ValueError(f"{name} belongs to the twin terms, which TwinFlowLoss.rcgm has none of")
        shares = kwargs.pop("shares", None)
        if shares is None:
            shares = GroupShares(one_step=1 / 3, multi_step=1 / 3, any_step=1 / 3, fake=0.0)
        elif shares.fake != 0:
            raise ValueError(f"shares must give the fake group nothing in TwinFlowLoss.rcgm, got fake={shares.fake}")
        return cls(shares=shares, rectify_weight=0.0, **kwargs)

    @classmethod
    def plain_flow_matching(cls, **kwargs) -> "TwinFlowLoss":
        """Textbook flow matching: every row at ``r = t`` with target ``v``.

        The baseline for benchmarks, one model call per step: l2 distance,
        unit weights and no guidance by default (each may be passed:
        ``distance``, ``time_weight``, ``guidance_scale`` with
        ``guidance_interval`` and ``guidance_teacher``, ``time_distribution``,
        ``path``, ``share_random_stream``, ``check_finite``).

        Raises:
            ValueError: naming an argument that flow matching fixes (shares,
                the multi-step gap, the RCGM and twin settings).
        """
        fixed = ("shares", "multi_step_gap", "estimate_order", "estimate_step", "residual_clamp", "teacher",
                 "rcgm_teacher", "rectify_weight", "rectify_clamp", "rectify_field", "rectify_time",
                 "rectify_distance", "image_free", "twin_rows")
        for name in fixed:
            if name in kwargs:
                raise ValueError(f"{name} is fixed by TwinFlowLoss.plain_flow_matching; build TwinFlowLoss(...) instead")
        defaults = dict(distance=L2Distance(), time_weight=None, guidance_scale=0.0)
        return cls(
            shares=GroupShares(one_step=0.0, multi_step=1.0, any_step=0.0, fake=0.0),
            multi_step_gap=0.0, estimate_order=0, rectify_weight=0.0, **{**defaults, **kwargs},
        )

    @classmethod
    def from_preset(
        cls,
        name: presets.PresetName,
        *,
        teacher: Teacher | None = None,
        guidance_teacher: Teacher | None = None,
    ) -> "TwinFlowLoss":
        """One of the authors' released training configurations (``src/configs/*.yaml``).

        ``name`` is the file's stem (:data:`twinloss.presets.PRESETS`); the
        preset's ``ema_decay`` decides which teacher it needs:

        * ``0``: the online model for both passes; pass no teacher;
        * in ``(0, 1)``: an average with that decay for both passes, passed as
          ``teacher=`` (:class:`~twinloss.EMATeacher`, ``ShardedEMATeacher``
          under FSDP, ``twinloss_adapters.lora.LoRAEMATeacher`` for LoRA);
        * ``1``: fixed weights for the guidance pass, passed as
          ``guidance_teacher=`` (:class:`~twinloss.FrozenTeacher` of the
          pretrained model, ``twinloss_adapters.lora.BaseModelTeacher`` for
          LoRA); the RCGM chain uses the online model.

        Raises:
            ValueError: naming ``name``, ``teacher`` or ``guidance_teacher``
                when the preset is unknown or the teacher it needs is missing,
                of the wrong kind, or not needed.
        """
        return cls(**presets.loss_arguments(name, teacher=teacher, guidance_teacher=guidance_teacher))

    # ------------------------------------------------------------- teachers
    def _set_teachers(
        self,
        teacher: Teacher | None,
        guidance_teacher: Teacher | None,
        rcgm_teacher: Teacher | None,
        *,
        guidance_used: bool,
        rcgm_used: bool,
    ) -> None:
        """Register the teachers: under ``teacher`` when one serves both passes, else under their pass names."""
        if teacher is not None and (guidance_teacher is not None or rcgm_teacher is not None):
            raise ValueError(
                "teacher sets both the guidance and the RCGM teacher; pass either teacher or "
                "guidance_teacher / rcgm_teacher"
            )
        if guidance_teacher is not None and not guidance_used:
            raise ValueError("guidance_teacher is given, but guidance_scale=0 runs no guidance pass")
        if rcgm_teacher is not None and not rcgm_used:
            raise ValueError("rcgm_teacher is given, but estimate_order=0 runs no RCGM chain")
        if teacher is not None and not (guidance_used or rcgm_used):
            raise ValueError("teacher is given, but guidance_scale=0 and estimate_order=0 run no teacher pass")
        for argument, value in (("teacher", teacher), ("rcgm_teacher", rcgm_teacher)):
            if rcgm_used and value is not None and not value.reads_target_time:
                raise ValueError(
                    f"{argument} {type(value).__name__} ignores r and the sign of t, so it cannot evaluate "
                    "the RCGM chain; pass it as guidance_teacher= (the RCGM chain then uses the online model)"
                )
        if teacher is None and guidance_teacher is rcgm_teacher:  # none given, or one object for both
            teacher = guidance_teacher if guidance_teacher is not None else OnlineTeacher()
        if teacher is not None:
            self.teacher = teacher  # one module, saved once under "teacher."
            self._teachers = {"guidance": teacher, "rcgm": teacher}
        else:
            self._teachers = {
                "guidance": guidance_teacher if guidance_teacher is not None else OnlineTeacher(),
                "rcgm": rcgm_teacher if rcgm_teacher is not None else OnlineTeacher(),
            }
            # nn.Module.__setattr__ registers them (state under "guidance_teacher." and
            # "rcgm_teacher."); reading the names goes through the properties below.
            self.guidance_teacher = self._teachers["guidance"]
            self.rcgm_teacher = self._teachers["rcgm"]

    @property
    def guidance_teacher(self) -> Teacher:
        """The evaluator of the guidance pass."""
        return self._teachers["guidance"]

    @property
    def rcgm_teacher(self) -> Teacher:
        """The evaluator of the RCGM chain."""
        return self._teachers["rcgm"]

    def update_teachers(self, model: VelocityModel) -> None:
        """``update(model)`` on each distinct teacher once; call it after every optimizer step."""
        for teacher in self._distinct_teachers():
            teacher.update(model)

    def _distinct_teachers(self) -> list[Teacher]:
        guidance, rcgm = self._teachers["guidance"], self._teachers["rcgm"]
        return [guidance] if guidance is rcgm else [guidance, rcgm]

    @property
    def shares(self) -> GroupShares:
        return self.trajectory.shares

    @property
    def min_batch_size(self) -> int:
        return self.trajectory.min_batch_size()

    # ------------------------------------------------------------------ checks
    def _check_inputs(
        self,
        model: VelocityModel,
        x: Tensor,
        cond: Conditioning | None,
        uncond: Conditioning | None,
        generator: object,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        if not isinstance(x, Tensor):
            raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if x.ndim < 2:
            raise ValueError(f"x must have shape [B, ...] with at least 2 dims, got {tuple(x.shape)}")
        batch = x.shape[0]
        check_not_stock_transformer(model)
        if not (generator is None or isinstance(generator, torch.Generator)):
            raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__} {generator!r}")
        if generator is not None and generator.device.type != x.device.type:
            raise ValueError(f"generator is on {generator.device}, but x is on {x.device}; create it on x's device")
        if batch < self.min_batch_size:
            raise ValueError(
                f"x has batch size {batch}, but the group shares {self.shares.as_dict()} "
                f"need at least {self.min_batch_size} rows"
            )
        cond = check_conditioning(cond, batch, name="cond", x=x)
        check_model_keywords(model, cond, name="cond")
        if self.guidance_scale > 0 and uncond is None:
            raise ValueError(
                f"uncond is required when guidance_scale={self.guidance_scale} > 0; pass the "
                "null conditioning, or build the loss with guidance_scale=0"
            )
        if uncond is None:
            return cond, None
        uncond = check_conditioning(uncond, batch, name="uncond", x=x)
        check_uncond_matches(cond, uncond)
        return cond, uncond

    # ------------------------------------------------------------------- steps
    def forward(
        self,
        model: VelocityModel,
        x: Shaped[Tensor, " batch *shape"],
        *,
        cond: Conditioning | None = None,
        uncond: Conditioning | None = None,
        generator: torch.Generator | None = None,
    ) -> TwinFlowOutput:
        """One TwinFlow loss evaluation on the batch ``x`` (never modified): the steps of docs/method.md."""
        cond, uncond = self._check_inputs(model, x, cond, uncond, generator)
        work = at_least_float32(x.dtype)  # targets in >= float32
        traj = self.trajectory(x.shape[0], device=x.device, dtype=work, generator=generator)
        fake_noise = self._fake_noise(x, traj, work, generator)
        rows = (traj.t.shape[0], *x.shape[1:])  # x's rows, and the added fake rows after them
        noise = torch.randn(rows, device=x.device, dtype=work, generator=generator)
        # every model pass starts from the random state left after the loss's own draws above
        evaluate = StepEvaluator(
            model, guidance_teacher=self.guidance_teacher, rcgm_teacher=self.rcgm_teacher,
            input_dtype=x.dtype, output_dtype=work,
            random_state=RandomState(x.device) if self.share_random_stream else None,
            check_finite=self.check_finite != "off", batch_shape=tuple(x.shape),
        )
        evaluate.watch_inputs(x, cond, uncond)
        real = traj.rows(*REAL_GROUPS)
        added = self.trajectory.added_rows(x.shape[0])
        cond = with_first_rows_appended(cond, added)
        uncond = None if uncond is None else with_first_rows_appended(uncond, added)

        x_rows = self._training_rows(evaluate, x.to(work), fake_noise, traj, cond)  # 1. fake samples
        del fake_noise
        point = self.path.sample(x_rows, noise, traj.t)  # 2. interpolate at |t|
        x_t, v = point.x_t, point.velocity
        del point, noise, x_rows  # the peak comes after the main forward
        v_real = self._guided_velocity(evaluate, x_t, v, traj, real, cond, uncond)  # 4. guidance
        displacement = self._rcgm_displacement(evaluate, x_t, v_real, traj, real, cond)  # 5a. RCGM chain
        prediction = evaluate("main", x_t, traj.t, traj.r, cond)  # 3. the only call with grad
        clamp_rates: dict[str, Tensor] = {}
        target = self._regression_target(prediction, v, v_real, displacement, traj, real, clamp_rates)  # 5b.
        del displacement, v, v_real
        weighted = self._row_weights(traj, cond, uncond) * self.distance(prediction, target)  # 6. base loss per row
        del target
        rectify = self._rectify(evaluate, x_t, prediction, traj, cond, uncond, generator, clamp_rates)  # 7.
        return self._output(weighted, rectify, traj, real, evaluate, clamp_rates)  # 8. total

    def _fake_noise(
        self, x: Tensor, traj: Trajectory, work: torch.dtype, generator: torch.Generator | None
    ) -> Float[Tensor, " rows *shape"] | None:
        """``z'`` for the rows made from the online model's samples: the fake group, or every row if image-free."""
        rows = x.shape[0] if self.image_free else traj.size("fake")
        if rows == 0:
            return None
        return torch.randn((rows, *x.shape[1:]), device=x.device, dtype=work, generator=generator)

    def _training_rows(
        self,
        evaluate: StepEvaluator,
        x: Float[Tensor, " batch *shape"],
        fake_noise: Tensor | None,
        traj: Trajectory,
        cond: dict[str, Tensor],
    ) -> Float[Tensor, " rows *shape"]:
        """Step 1: the data each row is interpolated from; fake rows hold the model's one-jump samples.

        ``rows`` is ``batch``, or ``batch`` plus the fake rows with ``fake_rows="added"``.
        """
        if fake_noise is None:
            return x
        rows = slice(None) if self.image_free else traj.groups["fake"]
        ones = torch.ones(fake_noise.shape[0], device=x.device, dtype=x.dtype)
        velocity = evaluate("fake", fake_noise, ones, torch.zeros_like(ones), select_rows(cond, rows))
        samples = fake_samples(fake_noise, velocity)
        if self.image_free:
            return samples
        if self.trajectory.fake_rows == "added":
            return torch.cat([x, samples])
        rows = x.clone()  # never written into the caller's x
        rows[traj.groups["fake"]] = samples
        return rows

    def _guided_velocity(
        self,
        evaluate: StepEvaluator,
        x_t: Tensor,
        v: Tensor,
        traj: Trajectory,
        real: Rows,
        cond: dict[str, Tensor],
        uncond: dict[str, Tensor] | None,
    ) -> Float[Tensor, " real *shape"]:
        """Step 4: the real rows' velocity, guided on the rows of ``guidance_groups`` whose ``t``
        lies inside ``guidance_interval`` (and, for ``guidance_difference="data"``, whose ``cond`` is not
        the null one); no guidance pass when no row qualifies."""
        v_real = v[real]
        if self.guidance_scale == 0 or uncond is None or traj.count(*self.guidance_groups) == 0:
            return v_real
        rows = self.guided_rows(traj)
        if self.guidance_difference == "data":  # the null rows keep v: they train F_u, which the target reads
            rows = rows & conditioned_rows(cond, uncond)
        positions = rows[real].nonzero().squeeze(1)  # among the real rows
        if positions.numel() == 0:
            return v_real
        inside = positions + real.start if isinstance(real, slice) else real[positions]
        x_in, t_in = x_t[inside], traj.t[inside]
        if self.guidance_difference == "data":
            uncond_velocity = evaluate("guidance", x_in, t_in, t_in, select_rows(uncond, inside))
            return v_real.index_copy(0, positions, data_guidance_target(v[inside], uncond_velocity,
                                                                         self.guidance_scale))
        both = evaluate(
            "guidance", torch.cat([x_in, x_in]), torch.cat([t_in, t_in]), torch.cat([t_in, t_in]),
            concat_conditioning(select_rows(cond, inside), select_rows(uncond, inside)),
        )
        cond_velocity, uncond_velocity = both.chunk(2)
        if self.image_free:
            guided = image_free_guidance_target(cond_velocity, uncond_velocity, self.guidance_scale)
        else:
            guided = guidance_target(v[inside], cond_velocity, uncond_velocity, self.guidance_scale)
        return v_real.index_copy(0, positions, guided)

    def guided_rows(self, traj: Trajectory) -> Bool[Tensor, " batch"]:
        """The rows that get the guided target: rows of ``guidance_groups`` with ``low < t < high``."""
        low, high = self.guidance_interval
        in_groups = torch.zeros_like(traj.t, dtype=torch.bool)
        for name in self.guidance_groups:
            in_groups[traj.groups[name]] = True
        return in_groups & (traj.t > low) & (traj.t < high)

    def _rcgm_displacement(
        self,
        evaluate: StepEvaluator,
        x_t: Tensor,
        v_real: Tensor,
        traj: Trajectory,
        real: Rows,
        cond: dict[str, Tensor],
    ) -> Float[Tensor, " real *shape"] | None:
        """Step 5a: the RCGM teacher's displacement for the real rows (``None`` when RCGM is off)."""
        if self.estimate_order == 0 or v_real.shape[0] == 0:
            return None
        cond_real = select_rows(cond, real)

        def rcgm_teacher(x_in: Tensor, t_in: Tensor, r_in: Tensor) -> Tensor:
            return evaluate("rcgm", x_in, t_in, r_in, cond_real)

        # The trajectory sampler gives 0 <= r <= t <= 1 by construction: skip
        # the public function's check (a device sync per step on a GPU).
        return unchecked_rcgm_displacement(
            rcgm_teacher, x_t[real], traj.t[real], traj.r[real], v_real,
            step=self.estimate_step, order=self.estimate_order,
        )

    def _regression_target(
        self,
        prediction: Tensor,
        v: Tensor,
        v_real: Tensor,
        displacement: Tensor | None,
        traj: Trajectory,
        real: Rows,
        clamp_rates: dict[str, Tensor],
    ) -> Float[Tensor, " batch *shape"]:
        """Step 5b: the RCGM target on real rows, ``v = z - x_fake`` (L_adv) on fake rows; detached.

        Records the residual's clamp rate in ``clamp_rates["residual"]``.
        """
        target_real = v_real
        if displacement is not None:
            residual = rcgm_residual(traj.t[real], traj.r[real], v_real, prediction[real], displacement,
                                     step=self.estimate_step)
            clamp_rates["residual"] = clamp_rate(residual, self.residual_clamp)
            target_real = clamped_correction_target(prediction[real], residual, clamp=self.residual_clamp)
            del residual
        target = v.detach().clone()
        target[real] = target_real
        return target

    def _row_weights(
        self, traj: Trajectory, cond: dict[str, Tensor], uncond: dict[str, Tensor] | None
    ) -> Float[Tensor, " batch"]:
        r"""Step 6: the time weight on real rows (1 everywhere without one), 1 on fake rows; with
        ``balance_guidance_feedback``, times :math:`1 / (1 - w)` on the guided rows whose ``cond`` is not the null one;
        with ``twin_rows="conditioned"``, 0 on the fake rows whose ``cond`` is the null one.

        The online target :math:`v + w\,\mathrm{sg}(F_c - F_u)` moves by :math:`w\,\delta` when :math:`F_c`
        does by :math:`\delta`, so its residual, and the pull back, shrink to :math:`(1 - w)\,\delta`; the
        weight restores the rate of an unguided row. Under L2 the weighted gradient is
        :math:`F_c - (v - w F_u) / (1 - w)`, that of a fixed target at the same fixed point (CFG
        :math:`1 / (1 - w)`). Null rows' target is ``v`` whatever the teacher, so they keep weight 1.
        """
        fake = torch.zeros_like(traj.t, dtype=torch.bool)
        fake[traj.groups["fake"]] = True
        weights = torch.ones_like(traj.t)
        if self.time_weight is not None:
            weights = torch.where(fake, weights, self.time_weight(traj.t, traj.r))
        if self.balance_guidance_feedback and uncond is not None:
            balanced = self.guided_rows(traj) & conditioned_rows(cond, uncond)
            weights = torch.where(balanced, weights / (1.0 - self.guidance_scale), weights)
        if self.twin_rows == "conditioned" and uncond is not None:
            weights = torch.where(fake & ~conditioned_rows(cond, uncond), torch.zeros_like(weights), weights)
        return weights

    def _rectify(
        self,
        evaluate: PassEvaluator,
        x_t: Tensor,
        prediction: Tensor,
        traj: Trajectory,
        cond: dict[str, Tensor],
        uncond: dict[str, Tensor] | None,
        generator: torch.Generator | None,
        clamp_rates: dict[str, Tensor],
    ) -> Float[Tensor, ""]:
        r"""Step 7: :math:`\rho(F_\theta, \mathrm{sg}(F_\theta - \mathrm{clamp}(\Delta v)))` averaged over the
        one-step rows (with ``twin_rows="conditioned"``, those whose ``cond`` is the null one count 0); records the
        gap's clamp rate in ``clamp_rates["rectify"]``."""
        one = traj.groups["one_step"]
        if self.rectify_weight == 0 or traj.size("one_step") == 0:
            return prediction.new_zeros(())
        velocity = prediction[one]
        x_hat = self.path.jump(x_t[one], velocity, traj.t[one], traj.r[one]).detach()
        z = torch.randn(x_hat.shape, device=x_hat.device, dtype=x_hat.dtype, generator=generator)
        law = self.rectify_law(conditioned=bool(cond))
        s = law(x_hat.shape[0], device=x_hat.device, dtype=x_hat.dtype, generator=generator)
        y = self.path.sample(x_hat, z, s).x_t
        cond_one = select_rows(cond, one)
        if self.rectify_field == "guidance_free" and uncond is not None:
            fake_velocity, real_velocity = self._gap_fields_guidance_free(
                evaluate, y, s, cond_one, select_rows(uncond, one))
        else:
            signed = torch.cat([-s, s])
            both = evaluate("rectify", torch.cat([y, y]), signed, signed, concat_conditioning(cond_one, cond_one))
            fake_velocity, real_velocity = both.chunk(2)
        gap = velocity_gap(fake_velocity, real_velocity, velocity.dtype)
        del fake_velocity, real_velocity
        clamp_rates["rectify"] = clamp_rate(gap, self.rectify_clamp)
        target = clamped_correction_target(velocity, gap, clamp=self.rectify_clamp)
        per_row = self.rectify_distance(velocity, target)
        if self.twin_rows == "conditioned" and uncond is not None:
            per_row = per_row * conditioned_rows(cond_one, select_rows(uncond, one)).to(per_row.dtype)
        return per_row.mean()

    def _gap_fields_guidance_free(
        self,
        evaluate: PassEvaluator,
        y: Tensor,
        s: Tensor,
        cond_one: dict[str, Tensor],
        uncond_one: dict[str, Tensor],
    ) -> tuple[Tensor, Tensor]:
        r"""``rectify_field="guidance_free"``: the fake field and the real one with step 4's guidance taken out
        on the rows whose ``s`` lies inside ``guidance_interval``.

        With the plain online guidance teacher its :math:`G_c(y, s, s)` is the
        rectify pass's own real half, so :math:`G_u` joins that call (one call
        on ``[y, y, y_in]``); any other teacher gets its own guidance pass.
        With ``guidance_difference="data"`` step 4 trained
        :math:`F_c = v_c + \frac{w}{1-w}(v_c - G_u)`, so :math:`G_c` is the
        online :math:`F_c` itself whatever the teacher (the guidance-free field
        :math:`(1 - w) F_c + w G_u` is :math:`v_c`), only :math:`G_u` is read,
        and null rows are left as they are.
        ``evaluate(name, x, t, r, cond)`` runs a pass: the step's
        :class:`~twinloss.evaluator.StepEvaluator`, or the health module's own.
        """
        low, high = self.guidance_interval
        rows = (s > low) & (s < high)
        if self.guidance_difference == "data":
            rows = rows & conditioned_rows(cond_one, uncond_one)
        inside = rows.nonzero().squeeze(1)
        y_in, s_in = y[inside], s[inside]
        uncond_in = select_rows(uncond_one, inside)
        online = type(self.guidance_teacher) is OnlineTeacher
        if online:
            times = torch.cat([-s, s, s_in])
            out = evaluate("rectify", torch.cat([y, y, y_in]), times, times,
                           concat_conditioning(cond_one, cond_one, uncond_in))
            fake_velocity, real_velocity, uncond_velocity = out.split([s.shape[0], s.shape[0], s_in.shape[0]])
            cond_velocity = real_velocity[inside]
        else:
            signed = torch.cat([-s, s])
            both = evaluate("rectify", torch.cat([y, y]), signed, signed, concat_conditioning(cond_one, cond_one))
            fake_velocity, real_velocity = both.chunk(2)
            if inside.numel() == 0:
                return fake_velocity, real_velocity
            if self.guidance_difference == "data":
                free = guidance_free_velocity(real_velocity[inside], real_velocity[inside],
                                              evaluate("guidance", y_in, s_in, s_in, uncond_in), self.guidance_scale)
                return fake_velocity, real_velocity.index_copy(0, inside, free)
            guided = evaluate("guidance", torch.cat([y_in, y_in]), torch.cat([s_in, s_in]), torch.cat([s_in, s_in]),
                              concat_conditioning(select_rows(cond_one, inside), uncond_in))
            cond_velocity, uncond_velocity = guided.chunk(2)
        free = guidance_free_velocity(real_velocity[inside], cond_velocity, uncond_velocity, self.guidance_scale)
        return fake_velocity, real_velocity.index_copy(0, inside, free)

    def _output(
        self,
        weighted: Float[Tensor, " batch"],
        rectify: Tensor,
        traj: Trajectory,
        real: Rows,
        evaluate: StepEvaluator,
        clamp_rates: dict[str, Tensor],
    ) -> TwinFlowOutput:
        """Step 8: ``L = base + adv + c_rect * rectify``, the logged terms and the call counts."""
        batch = weighted.shape[0]
        base = weighted[real].sum() / batch
        adv = weighted[traj.groups["fake"]].sum() / batch
        loss = base + adv + self.rectify_weight * rectify
        terms = {"loss": loss, "base": base, "adv": adv, "rectify": rectify}
        for name in REAL_GROUPS:
            if traj.size(name):
                terms[f"base/{name}"] = weighted[traj.groups[name]].mean()
        evaluate.watch("loss", loss)
        source = evaluate.nonfinite_source()  # the step's one device sync
        if source is not None and self.check_finite == "raise":
            what = f"{source} contains" if source in ("x", "loss") or "[" in source else f"the {source} pass produced"
            raise ValueError(
                f"{what} NaN or infinite values (check_finite='raise'); pass check_finite='report' to get "
                "TwinFlowOutput.finite and skip such steps (docs/errors.md)"
            )
        used = {id(teacher): teacher for name, teacher in self._teachers.items() if evaluate.calls[name]}
        for teacher in used.values():
            teacher.record_use()
        return TwinFlowOutput(
            loss=loss,
            terms={name: value.detach() for name, value in terms.items()},
            model_calls=evaluate.total_calls,
            sample_evaluations=evaluate.total_rows,
            grad_sample_evaluations=evaluate.rows["main"],
            calls_per_pass=dict(evaluate.calls),
            nonfinite_source=source,
            clamp_rates=clamp_rates,
        )
