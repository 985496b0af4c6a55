r"""``TwinFlowLoss``: the partitioned TwinFlow recipe with one grad-carrying forward.

One call computes (ALGORITHM.md, section 2)

.. math::
    L = \underbrace{\tfrac1B \textstyle\sum_{\text{real}} w(t, r)\,\rho(F_\theta, T)}_{\text{base}}
      + \underbrace{\tfrac1B \textstyle\sum_{\text{fake}} \rho(F_\theta, z - x_\text{fake})}_{\text{adv}}
      + c_\text{rect}\, \underbrace{\mathrm{mean}_\text{one-step}\, \rho\big(F_\theta, \mathrm{sg}(F_\theta - \Delta v)\big)}_{\text{rectify}}

with ``T`` the guided RCGM target, ``w`` the tangent time weight and
:math:`\Delta v = \mathrm{clamp}(F(y, -s, -s) - F(y, s, s))` the gap between
the fake and the real velocity fields at re-noised one-step samples ``y``.

Model calls per step (full recipe, default settings), in order: without grad
one for the fake samples, one batched cond/uncond guidance call and
``estimate_order`` RCGM calls; then the one call with grad (the whole batch);
then without grad one batched fake/real rectification call (it needs the
prediction). Running the teacher passes first keeps their working memory off
the grad-carrying forward's activations.
"""

import contextlib
import math
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Shaped
from torch import Tensor, nn

from twinloss._random import RandomState
from twinloss.distances import BarronDistance, Distance, L2Distance
from twinloss.paths import AffinePath, LinearPath
from twinloss.protocol import (
    Conditioning,
    VelocityModel,
    check_conditioning,
    check_model_keywords,
    concat_conditioning,
    select_rows,
)
from twinloss.targets import guidance_target, rcgm_residual_target, unchecked_rcgm_displacement
from twinloss.teachers import OnlineTeacher, Teacher
from twinloss.time_distributions import TimeDistribution
from twinloss.trajectory import GroupShares, Trajectory, TrajectorySampler

__all__ = ["MODES", "TangentTimeWeight", "TwinFlowLoss", "TwinFlowOutput"]

MODES = ("twinflow", "rcgm", "flow_matching")


class TangentTimeWeight(nn.Module):
    r"""Per-row weight :math:`1 + \tan\big((1 - (|t| - |r|))\,\pi / \text{divisor}\big)`.

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
        return 1.0 + torch.tan((1.0 - (t.abs() - r.abs())) * math.pi / self.divisor)


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
    """

    loss: Float[Tensor, ""]
    terms: dict[str, Tensor] = field(repr=False)
    model_calls: int
    sample_evaluations: int
    grad_sample_evaluations: int


class _CallCounter:
    """Evaluates the model and counts calls and rows."""

    def __init__(self, model: VelocityModel, dtype: torch.dtype) -> None:
        self.model = model
        self.dtype = dtype
        self.calls = 0
        self.rows = 0

    def count(self, x: Tensor) -> None:
        self.calls += 1
        self.rows += x.shape[0]

    def __call__(self, x: Tensor, t: Tensor, r: Tensor, cond: Conditioning) -> Tensor:
        self.count(x)
        out = self.model(x.to(self.dtype), t, r, **cond)
        if not isinstance(out, Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"model must return a velocity of shape {tuple(x.shape)}, got {got}")
        return out


class TwinFlowLoss(nn.Module):
    r"""The TwinFlow training objective (Cheng et al., ICLR 2026).

    Call as ``loss_fn(model, x, cond=..., uncond=..., generator=...)``; the
    model is passed at call time and never stored (see
    :class:`~twinloss.protocol.VelocityModel` for its contract).

    Args:
        mode: ``"twinflow"`` (full recipe), ``"rcgm"`` (any-step base only: no
            fake group, no rectification) or ``"flow_matching"`` (every row at
            ``r = t`` with target ``v``; guidance still applies if enabled).
        shares: the group partition (*default* equal); in ``"rcgm"`` mode the
            fake share is dropped and the rest renormalised.
        time_distribution: law of ``t`` (*default* uniform, ``Beta(1, 1)``).
        multi_step_gap: ``r = t - u t g`` for multi-step rows (*default* 0.05).
        path: the interpolation path (*default* linear).
        distance: per-row ``rho`` (*default* Barron, ``alpha=1, c=1e-3``).
        time_weight: per-row weight of real rows (*default* tangent, divisor
            2.5); ``None`` weighs every row 1.
        teacher: evaluator of the guidance and RCGM passes (*default* online
            model under no_grad).
        estimate_step: RCGM step ``d`` (*default* 0.01).
        estimate_order: RCGM Euler jumps ``N`` (*default* 2).
        residual_clamp: bound on the RCGM residual (*default* 1).
        guidance_scale: ``w`` of the guidance-enhanced target (*default* 0.5;
            0 disables it and skips its pass). Needs ``uncond`` when > 0.
        guidance_interval: open interval of ``t`` where guidance applies
            (*default* ``(0, 1)``, which leaves ``t = 1`` rows alone).
        rectify_weight: ``c_rect`` (*default* 0.5; 0 skips the pass).
        rectify_clamp: bound on the velocity gap ``dv`` (*default* 1).
        share_random_stream: run every no-grad pass from the random state of
            the main forward (matching dropout masks) and leave the global RNG
            as one forward would (*default* True).
        check_finite: reject non-finite ``x`` (one device sync; *default* True).
    """

    def __init__(
        self,
        *,
        mode: str = "twinflow",
        shares: GroupShares | None = None,
        time_distribution: TimeDistribution | None = None,
        multi_step_gap: float = 0.05,
        path: AffinePath | None = None,
        distance: Distance | None = None,
        time_weight: TangentTimeWeight | None = TangentTimeWeight(),
        teacher: Teacher | None = None,
        estimate_step: float = 0.01,
        estimate_order: int = 2,
        residual_clamp: float = 1.0,
        guidance_scale: float = 0.5,
        guidance_interval: tuple[float, float] = (0.0, 1.0),
        rectify_weight: float = 0.5,
        rectify_clamp: float = 1.0,
        share_random_stream: bool = True,
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not (0.0 < estimate_step < 1.0):
            raise ValueError(f"estimate_step must lie in (0, 1), got {estimate_step}")
        if isinstance(estimate_order, bool) or not isinstance(estimate_order, int) or estimate_order < 1:
            raise ValueError(f"estimate_order must be an int >= 1, got {estimate_order!r}")
        for name, value in (("residual_clamp", residual_clamp), ("rectify_clamp", rectify_clamp)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        for name, value in (("guidance_scale", guidance_scale), ("rectify_weight", rectify_weight)):
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        low, high = guidance_interval
        if not (0.0 <= low < high <= 1.0):
            raise ValueError(f"guidance_interval must satisfy 0 <= low < high <= 1, got {guidance_interval}")

        shares = shares if shares is not None else GroupShares()
        if mode == "rcgm":
            kept = 1.0 - shares.fake
            if kept <= 0:
                raise ValueError("shares give every row to the fake group, which mode='rcgm' drops")
            shares = GroupShares(
                one_step=shares.one_step / kept,
                multi_step=shares.multi_step / kept,
                any_step=shares.any_step / kept,
                fake=0.0,
            )
        elif mode == "flow_matching":
            shares, multi_step_gap = GroupShares(0.0, 1.0, 0.0, 0.0), 0.0
        self.mode = mode
        self.trajectory = TrajectorySampler(time_distribution, shares, multi_step_gap)
        self.path = path if path is not None else LinearPath()
        self.distance = distance if distance is not None else BarronDistance()
        self.time_weight = time_weight
        self.teacher = teacher if teacher is not None else OnlineTeacher()
        self.estimate_step = float(estimate_step)
        self.estimate_order = estimate_order
        self.residual_clamp = float(residual_clamp)
        self.guidance_scale = float(guidance_scale)
        self.guidance_interval = (float(low), float(high))
        self.rectify_weight = float(rectify_weight) if mode == "twinflow" else 0.0
        self.rectify_clamp = float(rectify_clamp)
        self.share_random_stream = share_random_stream
        self.check_finite = check_finite

    @classmethod
    def plain_flow_matching(cls, **kwargs) -> "TwinFlowLoss":
        """Textbook flow matching: ``r = t``, l2, unit weights, no guidance.

        The baseline for benchmarks: one model call per step.
        """
        defaults = dict(
            mode="flow_matching", distance=L2Distance(), time_weight=None, guidance_scale=0.0
        )
        return cls(**{**defaults, **kwargs})

    @property
    def shares(self) -> GroupShares:
        return self.trajectory.shares

    @property
    def min_batch_size(self) -> int:
        return self.shares.min_batch_size()

    # ------------------------------------------------------------------ checks
    def _check_inputs(
        self,
        model: VelocityModel,
        x: Tensor,
        cond: Conditioning | None,
        uncond: Conditioning | None,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        if not isinstance(x, Tensor):
            raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if x.ndim < 2:
            raise ValueError(f"x must have shape [B, ...] with at least 2 dims, got {tuple(x.shape)}")
        if self.check_finite and not bool(torch.isfinite(x).all()):
            raise ValueError("x contains NaN or infinite values")
        batch = x.shape[0]
        if batch < self.min_batch_size:
            raise ValueError(
                f"x has batch size {batch}, but the group shares {self.shares.as_dict()} "
                f"need at least {self.min_batch_size} rows"
            )
        cond = check_conditioning(cond, batch, name="cond")
        check_model_keywords(model, cond, name="cond")
        if self.guidance_scale > 0 and uncond is None:
            raise ValueError(
                f"uncond is required when guidance_scale={self.guidance_scale} > 0; pass the "
                "null conditioning, or build the loss with guidance_scale=0"
            )
        if uncond is None:
            return cond, None
        uncond = check_conditioning(uncond, batch, name="uncond")
        if set(uncond) != set(cond):
            raise ValueError(f"uncond must have the keys of cond {sorted(cond)}, got {sorted(uncond)}")
        return cond, uncond

    # ------------------------------------------------------------------- steps
    def forward(
        self,
        model: VelocityModel,
        x: Shaped[Tensor, "batch *shape"],
        *,
        cond: Conditioning | None = None,
        uncond: Conditioning | None = None,
        generator: torch.Generator | None = None,
    ) -> TwinFlowOutput:
        """One TwinFlow loss evaluation on the batch ``x`` (never modified)."""
        cond, uncond = self._check_inputs(model, x, cond, uncond)
        work = torch.promote_types(x.dtype, torch.float32)  # targets in >= float32
        device = x.device
        call = _CallCounter(model, x.dtype)
        random_state = RandomState(device) if self.share_random_stream else None

        def no_grad_call(x_in: Tensor, t: Tensor, r: Tensor, c: Conditioning, teacher: bool) -> Tensor:
            context = random_state.replay() if random_state is not None else contextlib.nullcontext()
            with context, torch.no_grad():
                if teacher:
                    call.count(x_in)
                    return self.teacher(model, x_in.to(x.dtype), t, r, c).to(work)
                return call(x_in, t, r, c).to(work)

        traj = self.trajectory(x.shape[0], device=device, dtype=work, generator=generator)
        groups, t, r = traj.groups, traj.t, traj.r
        real = slice(0, groups["fake"].start)

        # 1. Fake samples: one jump of the online model from fresh noise (no grad).
        x_rows = x.to(work)
        if traj.size("fake"):
            fake = groups["fake"]
            z_gen = torch.randn(x[fake].shape, device=device, dtype=work, generator=generator)
            ones = torch.ones(z_gen.shape[0], device=device, dtype=work)
            velocity_gen = no_grad_call(z_gen, ones, torch.zeros_like(ones), select_rows(cond, fake), False)
            x_fake = self.path.jump(z_gen, velocity_gen, ones, torch.zeros_like(ones))
            x_rows = torch.cat([x_rows[real], x_fake])
            del z_gen, velocity_gen, x_fake  # no-grad outputs must not live through the step

        # 2. Interpolate every row at |t|; conditional velocity v.
        z = torch.randn(x_rows.shape, device=device, dtype=work, generator=generator)
        point = self.path.sample(x_rows, z, t)
        x_t, v = point.x_t, point.velocity
        del point, z, x_rows  # not needed past here; the peak comes after the main forward

        # 4-5a. Teacher passes of the real rows (no grad): the guided velocity and
        # the RCGM chain's displacement need no prediction, so they run before
        # the main forward and their working memory never stacks on its
        # activations (the rectification pass needs the prediction and comes after).
        v_real, displacement = self._teacher_passes(
            no_grad_call, x_t[real], t[real], r[real], v[real],
            select_rows(cond, real), None if uncond is None else select_rows(uncond, real),
        )

        # 3. The main forward: the only model call that carries grad.
        prediction = call(x_t, t, r, cond).to(work)

        # 5b. RCGM target of the real rows from the prediction and the displacement.
        if displacement is None:
            target_real = v_real
        else:
            target_real = rcgm_residual_target(
                t[real], r[real], v_real, prediction[real], displacement,
                step=self.estimate_step, clamp=self.residual_clamp,
            )
            del displacement
        target = torch.cat([target_real, v[groups["fake"]]])

        # 6. Base loss: weighted distance per row, fake rows (L_adv) at weight 1.
        per_row = self.distance(prediction, target.detach())
        del target_real, target, v, v_real  # the rectification pass runs after this point
        weight = torch.ones_like(per_row)
        if self.time_weight is not None:
            weight = torch.cat([self.time_weight(t[real], r[real]), weight[groups["fake"]]])
        weighted = weight * per_row
        batch = x.shape[0]
        base = weighted[real].sum() / batch
        adv = weighted[groups["fake"]].sum() / batch

        # 7. Rectification of the one-step rows.
        rectify = self._rectify(
            no_grad_call, x_t, prediction, traj, select_rows(cond, groups["one_step"]), generator
        )
        loss = base + adv + self.rectify_weight * rectify

        terms = {"loss": loss, "base": base, "adv": adv, "rectify": rectify}
        for name, rows in groups.items():
            if name != "fake" and rows.stop > rows.start:
                terms[f"base/{name}"] = weighted[rows].mean()
        return TwinFlowOutput(
            loss=loss,
            terms={name: value.detach() for name, value in terms.items()},
            model_calls=call.calls,
            sample_evaluations=call.rows,
            grad_sample_evaluations=batch,
        )

    def _teacher_passes(
        self,
        no_grad_call,
        x_t: Tensor,
        t: Tensor,
        r: Tensor,
        v: Tensor,
        cond: dict[str, Tensor],
        uncond: dict[str, Tensor] | None,
    ) -> tuple[Tensor, Tensor | None]:
        """Steps 4 (guidance) and 5 up to the displacement (RCGM chain) for the real rows.

        Returns the (guided) velocity and the teacher's displacement, or
        ``None`` for it when no RCGM target is needed (flow-matching mode or no
        real rows).
        """
        if x_t.shape[0] == 0:
            return v, None
        if self.guidance_scale > 0 and uncond is not None:
            low, high = self.guidance_interval
            rows = ((t > low) & (t < high)).nonzero().squeeze(1)
            if rows.numel():
                x_in = x_t[rows]
                t_in = torch.cat([t[rows], t[rows]])
                both = no_grad_call(
                    torch.cat([x_in, x_in]), t_in, t_in,
                    concat_conditioning(select_rows(cond, rows), select_rows(uncond, rows)), True,
                )
                cond_velocity, uncond_velocity = both.chunk(2)
                guided = guidance_target(v[rows], cond_velocity, uncond_velocity, self.guidance_scale)
                v = v.index_copy(0, rows, guided)
                # Free the guidance outputs (2x the real rows) before the RCGM chain.
                del both, cond_velocity, uncond_velocity, guided, x_in
        if self.mode == "flow_matching":
            return v, None

        def teacher(x_in: Tensor, t_in: Tensor, r_in: Tensor) -> Tensor:
            return no_grad_call(x_in, t_in, r_in, cond, True)

        # The trajectory sampler gives 0 <= r <= t <= 1 by construction: skip
        # the public function's check (a device sync per step on a GPU).
        displacement = unchecked_rcgm_displacement(
            teacher, x_t, t, r, v, step=self.estimate_step, order=self.estimate_order
        )
        return v, displacement

    def _rectify(
        self,
        no_grad_call,
        x_t: Tensor,
        prediction: Tensor,
        traj: Trajectory,
        cond_one: dict[str, Tensor],
        generator: torch.Generator | None,
    ) -> Tensor:
        r"""Step 7: :math:`\rho(F_\theta, \mathrm{sg}(F_\theta - \Delta v))` on one-step rows."""
        one = traj.groups["one_step"]
        if self.rectify_weight == 0 or traj.size("one_step") == 0:
            return prediction.new_zeros(())
        velocity = prediction[one]
        x_hat = self.path.jump(x_t[one], velocity, traj.t[one], traj.r[one]).detach()
        z = torch.randn(x_hat.shape, device=x_hat.device, dtype=x_hat.dtype, generator=generator)
        s = torch.rand(x_hat.shape[0], device=x_hat.device, dtype=x_hat.dtype, generator=generator)
        y = self.path.sample(x_hat, z, s).x_t
        signed = torch.cat([-s, s])
        both = no_grad_call(torch.cat([y, y]), signed, signed, concat_conditioning(cond_one, cond_one), False)
        fake_velocity, real_velocity = both.chunk(2)
        gap = (fake_velocity - real_velocity).clamp(-self.rectify_clamp, self.rectify_clamp)
        return self.distance(velocity, (velocity - gap).detach()).mean()

