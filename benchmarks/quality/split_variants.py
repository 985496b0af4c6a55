r"""Variants of the twin terms run against the ring's class split (issue 12, fourteenth round).

After thirteen rounds the default guided recipe loses the ring to its
RCGM-only ablation (SW +0.017 ± 0.005 over 1x-3x, 49 seeds), all of it in
how the one-step samples split each class between its two opposite modes.
``mode_split.py`` shows that the split is the velocity field's: the model's
own 50-step ODE splits each class as its one-step map does, at every
checkpoint. Each variant below is the guided default loss (``TwinFlowLoss()``, or without guidance where its name says ``w 0``)
with one thing changed, on ``curves.py``'s pretrained weights and batches
(results beside theirs in ``results/curves``; the counterparts are
``curves.py``'s ``TwinFlow defaults`` and ``RCGM only, defaults``):

* how hard the rectification pushes: ``l2 rectification weight 2``
  (``rectify_distance=L2Distance()``, ``rectify_weight=2``, the switch that
  passes every unguided check on the issue's patches, eleventh round) and
  ``rectify weight 0.25`` (the default unit push at half the weight);
* what the fake rows do alone: ``no rectification`` (``rectify_weight=0``:
  the fake field is trained and never read);
* where the fake field is trained: ``fake times from s`` (the fake rows take
  ``t = -s`` with ``s`` from the conditioned law of the rectification's
  time instead of the batch's uniform law, :class:`FakeTimesFrom`), with
  and without guidance;
* how many rows anchor the real field: ``twin share 1/3, default law of s``
  (``GroupShares.from_twin_share(1/3)``: the multi-step and any-step rows
  two thirds of the batch, as in RCGM-only, instead of half), and its
  converse, ``RCGM only, defaults, one-step half`` (RCGM-only whose
  multi-step and any-step rows are half the batch, as in the default);
* both of the two that halved the ring's deficit (fifteenth round):
  ``twin share 1/3, fake times from s``;
* a smaller guidance scale, the one the guidance advice recommends for small
  class-conditional data (fifth round): ``TwinFlow defaults at w 0.2`` and
  its ablation ``RCGM only, defaults at w 0.2`` (online, CFG 1.25; the
  rest of the guided defaults unchanged), sixteenth round;
* fake rows that take no data row: ``TwinFlow defaults, extra fake rows``
  and ``TwinFlow w 0, extra fake rows`` (``fake_rows="added"``: the data
  rows split between the three real groups as RCGM-only splits them, and
  the fake rows, whose data the recipe replaces by samples anyway, appended
  in the default's ratio), and with the fake rows at the rectification's
  times as well (``TwinFlow defaults, extra fake rows, fake times from
  s``) or with the rectification off (``TwinFlow defaults, extra fake rows,
  no rectification``), seventeenth round;
* what evaluates the guidance pass, with the RCGM-only counterpart of each
  (eighteenth round): ``frozen guidance teacher`` (the pretrained weights,
  :class:`~twinloss.FrozenTeacher`: a fixed ``F_c - F_u``, CFG ``1 + w``, no
  feedback from the model being trained) and ``average as guidance
  teacher`` (a power-profile weight average with the sampling average's
  profile, updated after every step: the online direction without its
  latest fluctuations); the frozen teacher with added fake rows as well
  (``TwinFlow defaults, extra fake rows, frozen guidance teacher``);
* where the guidance difference is read (nineteenth round): ``data guidance
  difference`` (``guidance_difference="data"``: ``v + w / (1 - w) (v - G_u)``,
  no conditional teacher velocity) at the default ``w = 0.5`` (CFG 2) and at
  ``w = 1/3`` (CFG 1.5), with the RCGM-only counterpart of each, and at
  ``w = 1/3`` with ``G_u`` from the frozen pretrained weights;
* where along the path the guidance applies (twentieth round): ``guidance
  interval (0.2, 0.7)`` (``guidance_interval=(0.2, 0.7)``: the guided target
  only on rows with ``0.2 < t < 0.7``, the middle of the path that
  Kynkaanniemi et al. (NeurIPS 2024) found guidance helps in; the plain
  velocity near the noise, where the ring decides each class's split, and
  near the data), and ``guidance interval (0, 0.7)`` (the guided target
  everywhere but near the noise), each with its RCGM-only counterpart;
* the two no-copy settings combined, and the other end (twenty-first
  round): ``data guidance difference at w 1/3, guidance interval (0.2,
  0.7)`` (the nineteenth round's target at CFG 1.5, only on the middle of
  the path) and ``guidance interval (0.2, 1)`` (the online target
  everywhere but near the data), each with its RCGM-only counterpart;
* the online teacher's feedback balanced by a weight (twenty-second round):
  ``balanced guidance feedback`` (``balance_guidance_feedback=True``: the
  guided rows' base term weighed by ``1 / (1 - w)``, so a push on ``F_c`` is
  pulled back at the unguided rate; no copy of the weights, no extra pass),
  at the default ``w = 0.5`` (CFG 2) and at ``w = 1/3`` (CFG 1.5, the
  frozen teacher's), each with its RCGM-only counterpart;
* what the frozen teacher's gain on the ring is made of (twenty-third
  round): ``twin terms on labelled rows`` (``twin_rows="conditioned"``: the
  fake and rectification rows whose label is the null one weigh 0, so the
  twin terms never push ``F_u``), with the online teacher and with the
  balanced one at ``w = 1/3`` (their RCGM-only counterparts are the pairs
  without it); ``guidance on any-step rows`` (``guidance_groups=("any_step",)``:
  no feedback, CFG ``1 + w``, the direction read from the online weights)
  and ``any-step rows guided by the frozen teacher`` (the same rows, the
  direction read from the pretrained weights), each with its RCGM-only
  counterpart;
* where the frozen teacher's gain sits (twenty-fourth round): ``guidance on
  multi-step rows`` (``guidance_groups=("multi_step",)``: the rows that
  train the instantaneous field ``F(x, t, t)``, whose online target feeds
  back, CFG ``1 / (1 - w)``), ``multi-step rows guided by the frozen
  teacher`` (the same rows, CFG ``1 + w``, the direction read from the
  pretrained weights) and ``multi-step rows guided by the data
  difference at w 1/3`` (the same rows, CFG 1.5, the direction read from
  the data with no copy of the weights), each with its RCGM-only
  counterpart;
* which rows' chain reads the EMA (twenty-eighth round): ``one-step chain on
  an EMA 0.99`` (the one-step rows, which train the 1-NFE map
  ``F(z, 1, 0)``, read their chain from an EMA; every other real row reads
  the online model, as does the guidance pass), with and without guidance,
  ``multi-step chain on an EMA 0.99`` (only the multi-step rows, which
  train the instantaneous field ``F(x, t, t)``) and ``any-step chain on an
  EMA 0.99`` (only the any-step rows, which train the jumps ``F(x, t, r)``
  with ``0 <= r < t``), each with its RCGM-only counterpart
  (:class:`GroupChainLoss`); and the chain on every row read from the
  EMA's unconditional field plus the online model's class direction,
  ``RCGM chain on an EMA 0.99, online class direction``
  (:class:`SplitFieldTeacher`: the guided field's drift is along the class
  direction, which this chain reads without lag), and its converse,
  ``RCGM chain online, class direction from an EMA 0.99`` (the online
  unconditional field plus the average's class direction); and the chain
  read from the EMA only on the jumps that start at high noise, where the
  ring decides each class's split, ``RCGM chain on an EMA 0.99 above t 0.5``
  (:class:`TimeSplitTeacher`, twenty-ninth round), and its converse, ``RCGM
  chain on an EMA 0.99 below t 0.5`` (the EMA on the jumps that start near
  the data); and the chain read from a double EMA that follows a steady
  drift of the weights without lag, ``RCGM chain on a double EMA 0.99``
  (:class:`DoubleEMATeacher`); and the chain a quarter of the way from the
  online field to the EMA's, ``RCGM chain a quarter of the way to an EMA
  0.99`` (:class:`BlendedTeacher`: the same average, a softer pull), and
  a thirty-second of the way, where the amplified mismatch stays below the
  field;
* guidance on the middle of the path with the unguided default's other
  settings (thirtieth round): ``guidance interval (0.2, 0.7), unguided
  partition and law of s`` (``guidance_interval=(0.2, 0.7)``, a fake share
  of 1/8, :data:`~twinloss.loss.UNGUIDED_SHARES`, and ``s`` towards the
  data, ``ShiftedTime(1/3)``), and each of the two alone (``unguided
  partition``, ``unguided law of s``); their RCGM-only counterpart is
  ``RCGM only, defaults, guidance interval (0.2, 0.7)``, which neither
  setting changes; and the same at a smaller scale, ``TwinFlow defaults at
  w 0.2, guidance interval (0.2, 0.7), unguided partition and law of s``
  (thirty-first round: the online teacher's fixed point is CFG 1.25 on the
  middle), with its ablation ``RCGM only, defaults at w 0.2, guidance
  interval (0.2, 0.7)``.

    export PYTHONPATH=$PWD/src:$PWD/adapters:$PWD/demo OMP_NUM_THREADS=1
    python benchmarks/quality/split_variants.py --task ring --seed 40 --skip-fm --eval 16000 --methods "no rectification"
    python benchmarks/quality/mode_split.py --seed 40 --methods "RCGM only, defaults, one-step half"
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import curves  # noqa: E402
from common import BenchmarkLoss  # noqa: E402
import torch  # noqa: E402
from torch.func import functional_call  # noqa: E402

from twinloss import (  # noqa: E402
    EMATeacher, FrozenTeacher, GroupShares, L2Distance, ShiftedTime, Teacher, TimeDistribution, WeightAverage,
)
from twinloss.loss import UNGUIDED_SHARES  # noqa: E402
from twinloss.protocol import select_rows  # noqa: E402
from twinloss.targets import unchecked_rcgm_displacement  # noqa: E402
from twinloss.teachers import MovingAverageTeacher, as_module  # noqa: E402
from twinloss.trajectory import Trajectory, TrajectorySampler  # noqa: E402


class FakeTimesFrom(TrajectorySampler):
    """A trajectory sampler whose fake rows take ``t = r = -s``, ``s`` from ``fake_law``, not the batch's law."""

    def __init__(self, sampler: TrajectorySampler, fake_law: TimeDistribution) -> None:
        super().__init__(sampler.time_distribution, sampler.shares, sampler.multi_step_gap, sampler.fake_rows)
        self.fake_law = fake_law

    def forward(self, batch_size: int, *, device="cpu", dtype=torch.float32, generator=None) -> Trajectory:
        trajectory = super().forward(batch_size, device=device, dtype=dtype, generator=generator)
        fake = trajectory.groups["fake"]
        times = -self.fake_law(fake.stop - fake.start, device=device, dtype=dtype, generator=generator)
        t, r = trajectory.t.clone(), trajectory.r.clone()
        t[fake], r[fake] = times, times
        return Trajectory(t=t, r=r, groups=trajectory.groups)


ONE_STEP_HALF = GroupShares(one_step=1 / 2, multi_step=1 / 4, any_step=1 / 4, fake=0.0)
"""RCGM-only with the default's anchor: the multi-step and any-step rows half the batch, as in the guided quarters."""


GUIDANCE_INTERVAL = (0.2, 0.7)
"""The middle of the path (``t`` is the noise level): in the EDM parametrisation of Kynkaanniemi et al. (NeurIPS
2024), ``sigma = t / (1 - t)`` in ``(0.25, 2.33)``, about where they found guidance to help."""


def fake_times_from_rectify_law(guidance_scale: float, **settings) -> BenchmarkLoss:
    """The default loss at ``guidance_scale`` (with ``settings`` changed) whose fake field is trained at the times
    the rectification reads it (the conditioned law of ``s``: every task here that runs it has a class label)."""
    loss = BenchmarkLoss(guidance_scale=guidance_scale, **settings)
    loss.trajectory = FakeTimesFrom(loss.trajectory, loss.rectify_law(conditioned=True))
    return loss


def average_guided(make_loss) -> tuple[BenchmarkLoss, WeightAverage]:
    """The loss from ``make_loss(guidance_teacher=...)`` whose guidance pass reads a power-profile weight average
    (the sampling average's profile), updated after every step: the target's ``F_c - F_u`` without the online
    model's latest fluctuations."""
    average = common.averages()["power"]
    return make_loss(guidance_teacher=average), average


def ema_taught(make_loss, decay: float, *, guidance: str = "ema", **settings) -> curves.MethodFactory:
    """``make_loss(**settings)`` whose RCGM chain reads an EMA of the online weights with target ``decay``,
    updated after every step; the rectification still reads the online model. The authors' full fine-tunes keep
    such a copy (``sd35_full`` 0.99, ``openuni_full`` 0.999): every target near ``t = 1`` then reads a field that
    moves slower than the one it trains. ``guidance`` says what the guidance pass reads: ``"ema"`` the same EMA
    (the authors' setting), ``"online"`` the online model (the library's default teacher), ``"frozen"`` the
    pretrained weights (CFG ``1 + w``)."""
    if guidance not in ("ema", "online", "frozen"):
        raise ValueError(f"guidance must be 'ema', 'online' or 'frozen', got {guidance!r}")

    def build(pretrained):
        teacher = EMATeacher(decay)
        teachers = {"ema": {"teacher": teacher},
                    "online": {"rcgm_teacher": teacher},
                    "frozen": {"rcgm_teacher": teacher, "guidance_teacher": FrozenTeacher(pretrained)}}[guidance]
        return make_loss(**teachers, **settings), teacher
    return build


class GroupChainLoss(BenchmarkLoss):
    """A :class:`~BenchmarkLoss` whose RCGM chain reads ``average`` on the rows of ``average_groups`` and
    the online model on the other real rows: step 5's displacement ``D`` per group. Everything else (guidance
    pass, rectification) reads what the settings say. The loop updates ``average`` after every step."""

    def __init__(self, *, average: EMATeacher, average_groups: tuple[str, ...], **settings) -> None:
        super().__init__(**settings)
        unknown = set(average_groups) - {"one_step", "multi_step", "any_step"}
        if not average_groups or unknown:
            raise ValueError(f"average_groups must name real groups, got {average_groups!r}")
        if self.estimate_order == 0:
            raise ValueError("average_groups sets the RCGM chain's teacher, which estimate_order=0 switches off")
        self.average = average
        self.average_groups = tuple(average_groups)

    def _rcgm_displacement(self, evaluate, x_t, v_real, traj, real, cond):
        displacement = super()._rcgm_displacement(evaluate, x_t, v_real, traj, real, cond)  # online, every row
        chosen = torch.zeros_like(traj.t, dtype=torch.bool)
        for name in self.average_groups:
            chosen[traj.groups[name]] = True
        positions = chosen[real].nonzero().squeeze(1)  # among the real rows
        if displacement is None or positions.numel() == 0:
            return displacement
        inside = torch.arange(traj.t.shape[0], device=traj.t.device)[real][positions]
        cond_inside = select_rows(cond, inside)

        def averaged_field(x_in, t_in, r_in):
            out = self.average(evaluate.model, x_in.to(evaluate.input_dtype), t_in, r_in, cond_inside)
            return out.to(evaluate.output_dtype)

        own = unchecked_rcgm_displacement(averaged_field, x_t[inside], traj.t[inside], traj.r[inside],
                                          v_real[positions], step=self.estimate_step, order=self.estimate_order)
        return displacement.index_copy(0, positions, own)


def group_chain_taught(objective: str, decay: float, groups: tuple[str, ...], **settings) -> curves.MethodFactory:
    """``objective`` (``"twinflow"`` or ``"rcgm"``) with ``settings``, whose RCGM chain reads an EMA of the online
    weights with target ``decay`` on the rows of ``groups`` alone (:class:`GroupChainLoss`)."""
    make_loss = {"twinflow": GroupChainLoss, "rcgm": GroupChainLoss.rcgm}[objective]

    def build(pretrained):
        teacher = EMATeacher(decay)
        return make_loss(average=teacher, average_groups=groups, **settings), teacher
    return build


class SplitFieldTeacher(Teacher):
    r"""The RCGM chain's teacher that reads the unconditional field and the class direction from different weights.

    With ``class_direction="online"`` it is :math:`F_{\bar\theta}(x, t, r, \varnothing) + F_\theta(x, t, r, c) -
    F_\theta(x, t, r, \varnothing)`: the EMA's unconditional field plus the online model's class direction. With
    guidance the online field runs ahead of its average along the guidance direction (twenty-eighth round,
    ``teacher_lag.py``): CFG ``1 / (1 - w)`` is being trained in, and this teacher reads that direction without lag.
    With ``class_direction="average"`` it is the converse, :math:`F_\theta(x, t, r, \varnothing) +
    F_{\bar\theta}(x, t, r, c) - F_{\bar\theta}(x, t, r, \varnothing)`: the online unconditional field plus the
    average's class direction, where the twenty-eighth round found the ring's gain. On a row whose label is the
    null one it is the unconditional field's reader alone. ``null_label`` is the model's null class; :meth:`update`
    updates the average.
    """

    def __init__(self, average: EMATeacher, null_label: int, class_direction: str = "online") -> None:
        super().__init__()
        if class_direction not in ("online", "average"):
            raise ValueError(f"class_direction must be 'online' or 'average', got {class_direction!r}")
        self.average = average
        self.null_label = null_label
        self.class_direction = class_direction

    def forward(self, model, x_t, t, r, cond):
        labels = cond["y"]
        null = torch.full_like(labels, self.null_label)
        with torch.no_grad():
            both = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([r, r]), y=torch.cat([labels, null]))
        online_conditional, online_unconditional = both.chunk(2)
        if self.class_direction == "online":
            return self.average(model, x_t, t, r, {"y": null}) + online_conditional - online_unconditional
        averaged = self.average(model, torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([r, r]),
                                {"y": torch.cat([labels, null])})
        averaged_conditional, averaged_unconditional = averaged.chunk(2)
        return online_unconditional + averaged_conditional - averaged_unconditional

    def update(self, model) -> None:
        self.average.update(model)


class TimeSplitTeacher(Teacher):
    r"""The RCGM chain's teacher that reads ``average`` on one side of a time along the path and the online model on
    the other: with ``averaged_end="noise"``, :math:`F_{\bar\theta}(x, t, r)` on the jumps that start above
    :math:`\tau` (``split``, :math:`t > \tau`) and :math:`F_\theta(x, t, r)` on the others; with
    ``averaged_end="data"`` the converse, the average on the jumps that start at or below :math:`\tau`.

    The ring's split of each class between its two modes is decided at high noise (fourteenth round), and an EMA
    chain on every row closes most of the ring's gap while it costs the guided patches and digits FD (twenty-sixth
    to twenty-eighth rounds), on every group of rows alike. This teacher asks whether the two sides part along the
    path instead: at ``split = 0.5`` a one-step row's chain (order 2) reads ``F(x, 0.99, 0.495)`` from one side and
    ``F(x, 0.495, 0)`` from the other. :meth:`update` updates the average.
    """

    def __init__(self, average: EMATeacher, split: float, averaged_end: str = "noise") -> None:
        super().__init__()
        if not 0.0 < split < 1.0:
            raise ValueError(f"split must be a time in (0, 1), got {split!r}")
        if averaged_end not in ("noise", "data"):
            raise ValueError(f"averaged_end must be 'noise' or 'data', got {averaged_end!r}")
        self.average = average
        self.split = split
        self.averaged_end = averaged_end

    def forward(self, model, x_t, t, r, cond):
        with torch.no_grad():
            field = model(x_t, t, r, **cond)
        noisy = t > self.split
        chosen = (noisy if self.averaged_end == "noise" else ~noisy).nonzero().squeeze(1)
        if chosen.numel() == 0:
            return field
        averaged = self.average(model, x_t[chosen], t[chosen], r[chosen], select_rows(cond, chosen))
        return field.index_copy(0, chosen, averaged.to(field.dtype))

    def update(self, model) -> None:
        self.average.update(model)


class DoubleEMATeacher(MovingAverageTeacher):
    r"""The RCGM chain's teacher read from a double EMA of the online weights (Mulloy's DEMA):

    .. math::
        \bar\theta \leftarrow d\,\bar\theta + (1 - d)\,\theta, \qquad
        \bar{\bar\theta} \leftarrow d\,\bar{\bar\theta} + (1 - d)\,\bar\theta, \qquad
        \theta_\text{teacher} = 2\,\bar\theta - \bar{\bar\theta},

    with :class:`~twinloss.EMATeacher`'s warm-up of ``d``. An EMA lags weights that drift at a steady rate ``a``
    per step by ``d / (1 - d)`` steps, and its average of the average by twice that, so :math:`2\bar\theta -
    \bar{\bar\theta}` follows a steady drift without lag, while it still smooths the step-to-step
    fluctuations over about the same length. The EMA chain's gain on the ring is a pull back against the twin
    terms' fluctuations of each class's split; its cost on the guided patches and digits may be the lag behind
    the drift guidance trains in (CFG ``1 / (1 - w)`` into a field that starts at CFG 1). This teacher keeps the
    first and removes the second, to first order.
    """

    def __init__(self, target_decay: float = 0.99) -> None:
        super().__init__(target_decay)
        self.average: dict[str, torch.Tensor] = {}
        self.average_of_average: dict[str, torch.Tensor] = {}
        self.weights: dict[str, torch.Tensor] = {}

    def update(self, model) -> None:
        params = {name: p.detach() for name, p in as_module(model, "DoubleEMATeacher").named_parameters()}
        if not self.average:
            self.average, self.average_of_average = self.start_average(params), self.start_average(params)
        for name, p in params.items():
            self.average[name].lerp_(p.to(self.average[name].dtype), self.average_weight)
            self.average_of_average[name].lerp_(self.average[name], self.average_weight)
            self.weights[name] = (2 * self.average[name] - self.average_of_average[name]).to(p.dtype)
        self.advance()

    def forward(self, model, x_t, t, r, cond):
        with torch.no_grad():
            if not self.weights:  # first use before any update: the current weights
                return model(x_t, t, r, **cond)
            return functional_call(as_module(model, "DoubleEMATeacher"), self.weights, (x_t, t, r), dict(cond))


class BlendedTeacher(Teacher):
    r"""The RCGM chain's teacher that moves the online field a fraction :math:`\lambda` (``weight``) of the way to
    the average's: :math:`F_\theta(x, t, r) + \lambda\,(F_{\bar\theta}(x, t, r) - F_\theta(x, t, r))`.

    Step 5's residual divides the chain by the step ``d``, so a chain read from other weights pulls
    :math:`F_\theta(x_t, t, r)` towards them with a mismatch amplified by :math:`(t - r) / d` (up to 100 at the
    default step): a stiff spring, cut only by the clamp. An EMA of ten steps (0.9) costs the guided patches
    nearly what one of a hundred does (twenty-seventh round), which says the spring's stiffness, not the length
    of the average, sets the cost. This teacher keeps the hundred-step average that the ring's gain needs and
    softens the spring by :math:`\lambda`. :meth:`update` updates the average.
    """

    def __init__(self, average: EMATeacher, weight: float) -> None:
        super().__init__()
        if not 0.0 < weight < 1.0:
            raise ValueError(f"weight must lie in (0, 1), got {weight!r}")
        self.average = average
        self.weight = weight

    def forward(self, model, x_t, t, r, cond):
        with torch.no_grad():
            field = model(x_t, t, r, **cond)
        return field.lerp(self.average(model, x_t, t, r, cond).to(field.dtype), self.weight)

    def update(self, model) -> None:
        self.average.update(model)


def chain_taught(make_loss, make_teacher) -> curves.MethodFactory:
    """``make_loss()`` whose RCGM chain reads ``make_teacher(pretrained)``, a teacher the loop updates after every
    step; the guidance pass and the rectification read the online model."""

    def build(pretrained):
        teacher = make_teacher(pretrained)
        return make_loss(rcgm_teacher=teacher), teacher
    return build


def split_field(make_loss, decay: float, class_direction: str) -> curves.MethodFactory:
    """The chain on :class:`SplitFieldTeacher` over an EMA of target ``decay`` (:func:`chain_taught`)."""
    return chain_taught(make_loss, lambda pretrained: SplitFieldTeacher(
        EMATeacher(decay), null_label=pretrained.num_classes, class_direction=class_direction))


ONE_STEP_CHAIN = ("one_step",)
MULTI_STEP_CHAIN = ("multi_step",)
ANY_STEP_CHAIN = ("any_step",)


def both_objectives(label: str, *, frozen_teacher: bool = False, **settings) -> dict[str, curves.MethodFactory]:
    """``TwinFlow defaults, {label}`` and its RCGM-only ablation ``RCGM only, defaults, {label}``: both default
    losses with ``settings`` changed, and with ``frozen_teacher`` guided by a copy of the pretrained weights."""

    def factory(make_loss) -> curves.MethodFactory:
        def build(pretrained):
            teacher = {"guidance_teacher": FrozenTeacher(pretrained)} if frozen_teacher else {}
            return make_loss(**settings, **teacher)
        return build

    return {f"TwinFlow defaults, {label}": factory(BenchmarkLoss),
            f"RCGM only, defaults, {label}": factory(BenchmarkLoss.rcgm)}


VARIANTS: dict[str, curves.MethodFactory] = {
    "TwinFlow defaults, l2 rectification weight 2": lambda pretrained: BenchmarkLoss(
        rectify_distance=L2Distance(), rectify_weight=2.0),
    "TwinFlow defaults, rectify weight 0.25": lambda pretrained: BenchmarkLoss(rectify_weight=0.25),
    "TwinFlow defaults, no rectification": lambda pretrained: BenchmarkLoss(rectify_weight=0.0),
    "TwinFlow defaults, fake times from s": lambda pretrained: fake_times_from_rectify_law(0.5),
    "TwinFlow w 0, fake times from s": lambda pretrained: fake_times_from_rectify_law(0.0),
    "TwinFlow defaults, twin share 1/3, default law of s": lambda pretrained: BenchmarkLoss(
        shares=GroupShares.from_twin_share(1 / 3)),
    "TwinFlow defaults, twin share 1/3, fake times from s": lambda pretrained: fake_times_from_rectify_law(
        0.5, shares=GroupShares.from_twin_share(1 / 3)),
    "RCGM only, defaults, one-step half": lambda pretrained: BenchmarkLoss.rcgm(shares=ONE_STEP_HALF),
    "TwinFlow defaults at w 0.2": lambda pretrained: BenchmarkLoss(guidance_scale=0.2),
    "RCGM only, defaults at w 0.2": lambda pretrained: BenchmarkLoss.rcgm(guidance_scale=0.2),
    "TwinFlow defaults, extra fake rows": lambda pretrained: BenchmarkLoss(fake_rows="added"),
    "TwinFlow w 0, extra fake rows": lambda pretrained: BenchmarkLoss(guidance_scale=0.0, fake_rows="added"),
    "TwinFlow defaults, extra fake rows, fake times from s": lambda pretrained: fake_times_from_rectify_law(
        0.5, fake_rows="added"),
    "TwinFlow defaults, extra fake rows, no rectification": lambda pretrained: BenchmarkLoss(
        fake_rows="added", rectify_weight=0.0),
    "TwinFlow defaults, frozen guidance teacher": lambda pretrained: BenchmarkLoss(
        guidance_teacher=FrozenTeacher(pretrained)),
    "RCGM only, defaults, frozen guidance teacher": lambda pretrained: BenchmarkLoss.rcgm(
        guidance_teacher=FrozenTeacher(pretrained)),
    "TwinFlow defaults, extra fake rows, frozen guidance teacher": lambda pretrained: BenchmarkLoss(
        fake_rows="added", guidance_teacher=FrozenTeacher(pretrained)),
    "TwinFlow defaults, average as guidance teacher": lambda pretrained: average_guided(BenchmarkLoss),
    "RCGM only, defaults, average as guidance teacher": lambda pretrained: average_guided(BenchmarkLoss.rcgm),
    "TwinFlow defaults, data guidance difference": lambda pretrained: BenchmarkLoss(guidance_difference="data"),
    "RCGM only, defaults, data guidance difference": lambda pretrained: BenchmarkLoss.rcgm(guidance_difference="data"),
    "TwinFlow defaults, data guidance difference at w 1/3": lambda pretrained: BenchmarkLoss(
        guidance_difference="data", guidance_scale=1 / 3),
    "RCGM only, defaults, data guidance difference at w 1/3": lambda pretrained: BenchmarkLoss.rcgm(
        guidance_difference="data", guidance_scale=1 / 3),
    "TwinFlow defaults, data guidance difference at w 1/3, frozen guidance teacher": lambda pretrained: BenchmarkLoss(
        guidance_difference="data", guidance_scale=1 / 3, guidance_teacher=FrozenTeacher(pretrained)),
    "TwinFlow defaults, guidance interval (0.2, 0.7)": lambda pretrained: BenchmarkLoss(
        guidance_interval=GUIDANCE_INTERVAL),
    "RCGM only, defaults, guidance interval (0.2, 0.7)": lambda pretrained: BenchmarkLoss.rcgm(
        guidance_interval=GUIDANCE_INTERVAL),
    "TwinFlow defaults, guidance interval (0, 0.7)": lambda pretrained: BenchmarkLoss(
        guidance_interval=(0.0, GUIDANCE_INTERVAL[1])),
    "RCGM only, defaults, guidance interval (0, 0.7)": lambda pretrained: BenchmarkLoss.rcgm(
        guidance_interval=(0.0, GUIDANCE_INTERVAL[1])),
    "TwinFlow defaults, data guidance difference at w 1/3, guidance interval (0.2, 0.7)": lambda pretrained: BenchmarkLoss(
        guidance_difference="data", guidance_scale=1 / 3, guidance_interval=GUIDANCE_INTERVAL),
    "RCGM only, defaults, data guidance difference at w 1/3, guidance interval (0.2, 0.7)": lambda pretrained: (
        BenchmarkLoss.rcgm(guidance_difference="data", guidance_scale=1 / 3, guidance_interval=GUIDANCE_INTERVAL)),
    "TwinFlow defaults, guidance interval (0.2, 1)": lambda pretrained: BenchmarkLoss(
        guidance_interval=(GUIDANCE_INTERVAL[0], 1.0)),
    "RCGM only, defaults, guidance interval (0.2, 1)": lambda pretrained: BenchmarkLoss.rcgm(
        guidance_interval=(GUIDANCE_INTERVAL[0], 1.0)),
    **both_objectives("balanced guidance feedback", balance_guidance_feedback=True),
    **both_objectives("balanced guidance feedback at w 1/3", balance_guidance_feedback=True, guidance_scale=1 / 3),
    **both_objectives("guidance on any-step rows", guidance_groups=("any_step",)),
    **both_objectives("any-step rows guided by the frozen teacher", frozen_teacher=True,
                      guidance_groups=("any_step",)),
    **both_objectives("guidance on multi-step rows", guidance_groups=("multi_step",)),
    **both_objectives("multi-step rows guided by the frozen teacher", frozen_teacher=True,
                      guidance_groups=("multi_step",)),
    **both_objectives("multi-step rows guided by the data difference at w 1/3", guidance_groups=("multi_step",),
                      guidance_difference="data", guidance_scale=1 / 3),
    "TwinFlow defaults, EMA teacher 0.99": ema_taught(BenchmarkLoss, 0.99),
    "RCGM only, defaults, EMA teacher 0.99": ema_taught(BenchmarkLoss.rcgm, 0.99),
    "TwinFlow defaults, EMA teacher 0.999": ema_taught(BenchmarkLoss, 0.999),
    "RCGM only, defaults, EMA teacher 0.999": ema_taught(BenchmarkLoss.rcgm, 0.999),
    "TwinFlow w 0, RCGM chain on an EMA 0.99": ema_taught(BenchmarkLoss, 0.99, guidance_scale=0.0),
    "RCGM only w 0, RCGM chain on an EMA 0.99": ema_taught(BenchmarkLoss.rcgm, 0.99, guidance_scale=0.0),
    "TwinFlow defaults, RCGM chain on an EMA 0.99, frozen guidance teacher": ema_taught(
        BenchmarkLoss, 0.99, guidance="frozen"),
    "RCGM only, defaults, RCGM chain on an EMA 0.99, frozen guidance teacher": ema_taught(
        BenchmarkLoss.rcgm, 0.99, guidance="frozen"),
    "TwinFlow defaults, RCGM chain on an EMA 0.99, online guidance teacher": ema_taught(
        BenchmarkLoss, 0.99, guidance="online"),
    "RCGM only, defaults, RCGM chain on an EMA 0.99, online guidance teacher": ema_taught(
        BenchmarkLoss.rcgm, 0.99, guidance="online"),
    "TwinFlow defaults, RCGM chain on an EMA 0.9, online guidance teacher": ema_taught(
        BenchmarkLoss, 0.9, guidance="online"),
    "RCGM only, defaults, RCGM chain on an EMA 0.9, online guidance teacher": ema_taught(
        BenchmarkLoss.rcgm, 0.9, guidance="online"),
    "TwinFlow w 0, RCGM chain on an EMA 0.9": ema_taught(BenchmarkLoss, 0.9, guidance_scale=0.0),
    "RCGM only w 0, RCGM chain on an EMA 0.9": ema_taught(BenchmarkLoss.rcgm, 0.9, guidance_scale=0.0),
    "TwinFlow defaults, one-step chain on an EMA 0.99": group_chain_taught("twinflow", 0.99, ONE_STEP_CHAIN),
    "RCGM only, defaults, one-step chain on an EMA 0.99": group_chain_taught("rcgm", 0.99, ONE_STEP_CHAIN),
    "TwinFlow w 0, one-step chain on an EMA 0.99": group_chain_taught(
        "twinflow", 0.99, ONE_STEP_CHAIN, guidance_scale=0.0),
    "RCGM only w 0, one-step chain on an EMA 0.99": group_chain_taught(
        "rcgm", 0.99, ONE_STEP_CHAIN, guidance_scale=0.0),
    "TwinFlow defaults, multi-step chain on an EMA 0.99": group_chain_taught("twinflow", 0.99, MULTI_STEP_CHAIN),
    "RCGM only, defaults, multi-step chain on an EMA 0.99": group_chain_taught("rcgm", 0.99, MULTI_STEP_CHAIN),
    "TwinFlow defaults, any-step chain on an EMA 0.99": group_chain_taught("twinflow", 0.99, ANY_STEP_CHAIN),
    "RCGM only, defaults, any-step chain on an EMA 0.99": group_chain_taught("rcgm", 0.99, ANY_STEP_CHAIN),
    "TwinFlow defaults, RCGM chain on an EMA 0.99, online class direction": split_field(
        BenchmarkLoss, 0.99, "online"),
    "RCGM only, defaults, RCGM chain on an EMA 0.99, online class direction": split_field(
        BenchmarkLoss.rcgm, 0.99, "online"),
    "TwinFlow defaults, RCGM chain online, class direction from an EMA 0.99": split_field(
        BenchmarkLoss, 0.99, "average"),
    "RCGM only, defaults, RCGM chain online, class direction from an EMA 0.99": split_field(
        BenchmarkLoss.rcgm, 0.99, "average"),
    "TwinFlow defaults, RCGM chain on an EMA 0.99 above t 0.5": chain_taught(BenchmarkLoss, lambda _: TimeSplitTeacher(EMATeacher(0.99), 0.5, "noise")),
    "RCGM only, defaults, RCGM chain on an EMA 0.99 above t 0.5": chain_taught(BenchmarkLoss.rcgm, lambda _: TimeSplitTeacher(EMATeacher(0.99), 0.5, "noise")),
    "TwinFlow defaults, RCGM chain on an EMA 0.99 below t 0.5": chain_taught(BenchmarkLoss, lambda _: TimeSplitTeacher(EMATeacher(0.99), 0.5, "data")),
    "RCGM only, defaults, RCGM chain on an EMA 0.99 below t 0.5": chain_taught(BenchmarkLoss.rcgm, lambda _: TimeSplitTeacher(EMATeacher(0.99), 0.5, "data")),
    "TwinFlow defaults, RCGM chain on a double EMA 0.99": chain_taught(BenchmarkLoss, lambda _: DoubleEMATeacher(0.99)),
    "RCGM only, defaults, RCGM chain on a double EMA 0.99": chain_taught(BenchmarkLoss.rcgm, lambda _: DoubleEMATeacher(0.99)),
    "TwinFlow defaults, RCGM chain a quarter of the way to an EMA 0.99": chain_taught(BenchmarkLoss, lambda _: BlendedTeacher(EMATeacher(0.99), 0.25)),
    "RCGM only, defaults, RCGM chain a quarter of the way to an EMA 0.99": chain_taught(BenchmarkLoss.rcgm, lambda _: BlendedTeacher(EMATeacher(0.99), 0.25)),
    "TwinFlow defaults, RCGM chain a thirty-second of the way to an EMA 0.99": chain_taught(BenchmarkLoss, lambda _: BlendedTeacher(EMATeacher(0.99), 1 / 32)),
    "RCGM only, defaults, RCGM chain a thirty-second of the way to an EMA 0.99": chain_taught(
        BenchmarkLoss.rcgm, lambda _: BlendedTeacher(EMATeacher(0.99), 1 / 32)),
    "TwinFlow defaults, twin terms on labelled rows": lambda pretrained: BenchmarkLoss(twin_rows="conditioned"),
    "TwinFlow defaults, balanced guidance feedback at w 1/3, twin terms on labelled rows": lambda pretrained: (
        BenchmarkLoss(balance_guidance_feedback=True, guidance_scale=1 / 3, twin_rows="conditioned")),
    "TwinFlow defaults, guidance interval (0.2, 0.7), unguided partition and law of s": lambda pretrained: (
        BenchmarkLoss(guidance_interval=(0.2, 0.7), shares=UNGUIDED_SHARES, rectify_time=ShiftedTime(1 / 3))),
    "TwinFlow defaults, guidance interval (0.2, 0.7), unguided partition": lambda pretrained: BenchmarkLoss(
        guidance_interval=(0.2, 0.7), shares=UNGUIDED_SHARES),
    "TwinFlow defaults, guidance interval (0.2, 0.7), unguided law of s": lambda pretrained: BenchmarkLoss(
        guidance_interval=(0.2, 0.7), rectify_time=ShiftedTime(1 / 3)),
    "TwinFlow defaults at w 0.2, guidance interval (0.2, 0.7), unguided partition and law of s": lambda pretrained: (
        BenchmarkLoss(guidance_scale=0.2, guidance_interval=(0.2, 0.7), shares=UNGUIDED_SHARES,
                     rectify_time=ShiftedTime(1 / 3))),
    "RCGM only, defaults at w 0.2, guidance interval (0.2, 0.7)": lambda pretrained: BenchmarkLoss.rcgm(
        guidance_scale=0.2, guidance_interval=(0.2, 0.7)),
    "TwinFlow defaults at w 0.2, guidance interval (0.2, 0.7), unguided partition and law of s, extra fake rows": (
        lambda pretrained: BenchmarkLoss(guidance_scale=0.2, guidance_interval=(0.2, 0.7), shares=UNGUIDED_SHARES,
                                         rectify_time=ShiftedTime(1 / 3), fake_rows="added")),
}


if __name__ == "__main__":
    curves.METHODS.clear()  # only the variants; the default methods are curves.py's own runs
    curves.main(extra_methods=VARIANTS)
