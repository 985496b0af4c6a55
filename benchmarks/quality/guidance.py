r"""Guidance against the twin terms: variants of where the guidance enters (any conditional ``curves.py`` task).

The group placements are the loss's own ``guidance_groups`` option; the
rectification and fake-field variants are benchmark-side subclasses of
``BenchmarkLoss`` (the library's loss is not edited); the first round (issue 12)
also logged ``twinloss.health`` signals at each
checkpoint. With ``w`` the guidance scale, ``F_c`` / ``F_u`` the model's
conditional / unconditional outputs:

* ``w 0.2``: a smaller scale;
* ``interval (0.2, 0.7)``: guidance only for ``0.2 < t < 0.7``;
* ``multi-step rows only`` / ``any-step rows only``:
  ``TwinFlowLoss(guidance_groups=(group,))``, the guided velocity replaces
  ``v`` only in one group's targets (the RCGM chain of the other groups
  starts from the unguided ``v``);
* ``unguided real field in rectification``: the real velocity of the
  rectification gap is :math:`(1 - w) F_c + w F_u` instead of :math:`F_c`.
  With self-guidance at its fixed point :math:`F_c = v_c + w (F_c - F_u)`,
  :math:`F_u = v_u`, this recovers the unguided conditional velocity
  :math:`v_c`, the only one that is the velocity of a distribution. A
  benchmark-side subclass in the first three rounds (one batched call on
  ``[y, y, y]``), the loss's own ``rectify_field="guidance_free"`` since the
  fourth (the same field from a second guidance pass);
* ``guided fake field``: the fake rows regress on
  :math:`v + w (F_c - F_u)` evaluated at their own negative times, so the fake
  field is self-guided like the real one and the gap compares like with like.

Added with issue 12's second round (``curves.py`` protocol, so every
variant's file sits beside the default methods' in ``results/curves``):

* ``frozen teacher w 0.5`` / ``w 0.25``: the guidance pass evaluated by the
  pretrained weights (``twinloss.FrozenTeacher``), so the target
  :math:`v + w (P_c - P_u)` is CFG of scale :math:`1 + w` of a fixed field,
  with no feedback from the model being trained;
* ``image-free CFG 1.25, frozen teacher``: the authors' ``use_image_free``
  with the base model as guidance teacher (their ``openuni_full_imgfree``
  recipe, at a scale this data tolerates);
* ``guided rectification only``: no guidance in any base target; the
  rectification's real field is :math:`F_c + w (F_c - F_u)` of the online
  model (DMD2's guided real score), so only the distribution-matching term
  sees guidance;
* ``rectify weight 0.25`` / ``1``, ``rectification l2`` (the gap's gradient
  proportional to its size instead of the Barron distance's unit-normalised
  direction) and ``fake share 1/8``: how hard the twin terms push, without
  guidance;
* ``residual clamp 3``: the RCGM residual clamped at 3 instead of 1 (about
  half of its entries sit at 1 on this data, ``docs/health.md``).

Added with the fourth round (the digits task):

* ``no rectification``: the fake group and its ``L_adv`` kept, the
  rectification switched off (``rectify_weight=0``): which of the two twin
  terms a difference from RCGM-only comes from.

    export PYTHONPATH=$PWD/src:$PWD/adapters:$PWD/demo
    python benchmarks/quality/guidance.py --task patches --seed 0 --skip-fm --methods "frozen teacher"
    python benchmarks/quality/guidance.py --task patches --seed 0 --skip-fm     # every variant

Guided runs stored before the eighth round of issue 12 used the
rectification's uniform ``s``, the default then; the default with guidance
is now ``LogitNormalTime(0, 1)``. Pass ``rectify_time=BetaTime()`` to
reproduce them.
"""

import inspect
import sys
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import curves  # noqa: E402
from common import BenchmarkLoss  # noqa: E402

import twinloss  # noqa: E402
from twinloss.protocol import concat_conditioning, select_rows  # noqa: E402


class _RectifyWithRealField:
    """A step's evaluator whose ``rectify`` pass returns ``real_field(F_c, F_u)`` as its real half.

    The loss's rectify pass is one call on ``[y, y]`` at ``[-s, s]`` with the
    one-step rows' conditioning twice; this makes it one call on ``[y, y, y]``
    at ``[-s, s, s]`` with ``cond, cond, uncond`` and combines the last two.
    Every other pass goes to the step's own evaluator.
    """

    def __init__(self, evaluate, uncond_one: dict[str, Tensor], real_field) -> None:
        self.evaluate, self.uncond_one, self.real_field = evaluate, uncond_one, real_field

    def __call__(self, name, x_t, t, r, cond):
        if name != "rectify":
            return self.evaluate(name, x_t, t, r, cond)
        y, s = x_t.chunk(2)[1], t.chunk(2)[1]
        three = self.evaluate(
            name, torch.cat([x_t, y]), torch.cat([t, s]), torch.cat([r, s]), concat_conditioning(cond, self.uncond_one)
        )
        fake_velocity, cond_velocity, uncond_velocity = three.chunk(3)
        return torch.cat([fake_velocity, self.real_field(cond_velocity, uncond_velocity)])


class _RealFieldInRectification(BenchmarkLoss):
    """A loss whose rectification gap uses ``self.real_field(F_c, F_u)`` (defined by each subclass) as the real field."""

    def _rectify(self, evaluate, x_t, prediction, traj, cond, uncond, generator, clamp_rates):
        uncond_one = select_rows(uncond, traj.groups["one_step"])
        mixed = _RectifyWithRealField(evaluate, uncond_one, self.real_field)
        return super()._rectify(mixed, x_t, prediction, traj, cond, uncond, generator, clamp_rates)


class _FakeRowsGuided:
    r"""The model with :math:`w (F_c - F_u)` (no grad) subtracted from the fake rows of the grad call.

    ``rho(F - w sg(F_c - F_u), v) = rho(F, v + w sg(F_c - F_u))`` for a distance
    of the difference, so this is the fake rows regressing on a guided target.
    """

    def __init__(self, model, scale: float, null: int) -> None:
        self.model, self.scale, self.null = model, scale, null
        self.__signature__ = inspect.signature(model.forward)

    def __call__(self, x_t: Tensor, t: Tensor, r: Tensor, **cond: Tensor) -> Tensor:
        out = self.model(x_t, t, r, **cond)
        if not (torch.is_grad_enabled() and out.requires_grad):
            return out
        fake = (t < 0).nonzero().squeeze(1)
        if fake.numel() == 0:
            return out
        with torch.no_grad():
            y = cond["y"][fake]
            both = self.model(
                torch.cat([x_t[fake], x_t[fake]]), torch.cat([t[fake], t[fake]]), torch.cat([r[fake], r[fake]]),
                y=torch.cat([y, torch.full_like(y, self.null)]),
            )
            cond_velocity, uncond_velocity = both.chunk(2)
        shift = torch.zeros_like(out)
        shift[fake] = self.scale * (cond_velocity - uncond_velocity).to(out.dtype)
        return out - shift


class GuidedFakeField(BenchmarkLoss):
    def forward(self, model, x, *, cond=None, uncond=None, generator=None):
        if uncond is None or "y" not in uncond:
            raise ValueError("GuidedFakeField needs uncond={'y': null labels} to find the task's null class")
        wrapped = _FakeRowsGuided(model, self.guidance_scale, int(uncond["y"][0]))
        return super().forward(wrapped, x, cond=cond, uncond=uncond, generator=generator)


class GuidedRectificationOnly(_RealFieldInRectification):
    r"""Unguided base targets; rectification gap :math:`F(y, -s, -s) - [F_c + w (F_c - F_u)](y, s, s)`."""

    def __init__(self, rectify_guidance: float, **kwargs) -> None:
        super().__init__(guidance_scale=0.0, **kwargs)
        self.rectify_guidance = rectify_guidance

    def real_field(self, cond_velocity: Tensor, uncond_velocity: Tensor) -> Tensor:
        return cond_velocity + self.rectify_guidance * (cond_velocity - uncond_velocity)


class RectificationDistance(BenchmarkLoss):
    """The rectification term under its own distance (``TwinFlowLoss(rectify_distance=...)`` since the eleventh
    round; these runs subclassed the loss before it had the option, with the same computation)."""

    def __init__(self, rectify_distance: twinloss.Distance, **kwargs) -> None:
        super().__init__(rectify_distance=rectify_distance, **kwargs)


def RectificationL2(**kwargs) -> RectificationDistance:
    """The rectification under l2: its gradient is proportional to the gap, not the Barron distance's unit direction."""
    return RectificationDistance(twinloss.L2Distance(), **kwargs)


BenchmarkLoss, FrozenTeacher = BenchmarkLoss, twinloss.FrozenTeacher
QUARTERS = twinloss.GroupShares()
"""The partition of the unguided variants below: equal quarters, the default without guidance when they ran
(since the tenth round it is a fake share of 1/8, ``curves.py``'s ``TwinFlow w 0``, whose runs include the
second round's ``TwinFlow w 0, fake share 1/8``)."""
UNIFORM_S = twinloss.BetaTime()
"""The law of ``s`` of every variant below with a rectification: the authors' uniform draw, the default with
and without guidance when they ran (written out: since the eighth round the guided default is logit-normal,
since the twelfth a conditioned batch without guidance draws ``s`` towards the data)."""
VARIANTS = {
    "TwinFlow w 0.2": lambda pretrained: BenchmarkLoss(guidance_scale=0.2, rectify_time=UNIFORM_S),
    "TwinFlow w 0.8": lambda pretrained: BenchmarkLoss(guidance_scale=0.8, rectify_time=UNIFORM_S),
    "TwinFlow w 0.5, interval (0.2, 0.7)": lambda pretrained: BenchmarkLoss(guidance_interval=(0.2, 0.7), rectify_time=UNIFORM_S),
    "TwinFlow w 0.5, multi-step rows only": lambda pretrained: BenchmarkLoss(guidance_groups=("multi_step",), rectify_time=UNIFORM_S),
    "TwinFlow w 0.5, any-step rows only": lambda pretrained: BenchmarkLoss(
        guidance_groups=("any_step",), rectify_time=UNIFORM_S),
    "RCGM only w 0.5, any-step rows only": lambda pretrained: BenchmarkLoss.rcgm(guidance_groups=("any_step",)),
    "TwinFlow w 0.5, unguided real field in rectification": lambda pretrained: BenchmarkLoss(
        rectify_field="guidance_free", rectify_time=UNIFORM_S),
    "TwinFlow w 0.5, guided fake field": lambda pretrained: GuidedFakeField(rectify_time=UNIFORM_S),
    "TwinFlow frozen teacher w 0.5": lambda pretrained: BenchmarkLoss(
        guidance_teacher=FrozenTeacher(pretrained), rectify_time=UNIFORM_S),
    "RCGM only frozen teacher w 0.5": lambda pretrained: BenchmarkLoss.rcgm(guidance_teacher=FrozenTeacher(pretrained)),
    "TwinFlow frozen teacher w 0.25": lambda pretrained: BenchmarkLoss(
        guidance_scale=0.25, guidance_teacher=FrozenTeacher(pretrained), rectify_time=UNIFORM_S),
    "TwinFlow image-free CFG 1.25, frozen teacher": lambda pretrained: BenchmarkLoss(
        image_free=True, guidance_scale=1.25, guidance_teacher=FrozenTeacher(pretrained), rectify_time=UNIFORM_S),
    "TwinFlow guided rectification only w 0.5": lambda pretrained: GuidedRectificationOnly(
        0.5, shares=QUARTERS, rectify_time=UNIFORM_S),
    "TwinFlow w 0, rectify weight 0.25": lambda pretrained: BenchmarkLoss(
        guidance_scale=0.0, rectify_weight=0.25, shares=QUARTERS, rectify_time=UNIFORM_S),
    "TwinFlow w 0, rectify weight 1": lambda pretrained: BenchmarkLoss(
        guidance_scale=0.0, rectify_weight=1.0, shares=QUARTERS, rectify_time=UNIFORM_S),
    "TwinFlow w 0, rectification l2": lambda pretrained: RectificationL2(
        guidance_scale=0.0, rectify_weight=1.0, shares=QUARTERS, rectify_time=UNIFORM_S),
    "TwinFlow w 0, l2 rectification with fake share 1/8": lambda pretrained: RectificationL2(
        guidance_scale=0.0, rectify_weight=1.0,
        shares=twinloss.GroupShares(one_step=7 / 24, multi_step=7 / 24, any_step=7 / 24, fake=1 / 8), rectify_time=UNIFORM_S),
    "TwinFlow w 0, rectification Barron c 0.1": lambda pretrained: RectificationDistance(
        twinloss.BarronDistance(alpha=1.0, c=0.1), guidance_scale=0.0, shares=QUARTERS, rectify_time=UNIFORM_S),
    "TwinFlow w 0, residual clamp 3": lambda pretrained: BenchmarkLoss(
        guidance_scale=0.0, residual_clamp=3.0, shares=QUARTERS, rectify_time=UNIFORM_S),
    "TwinFlow w 0.5, no rectification": lambda pretrained: BenchmarkLoss(rectify_weight=0.0),
    "TwinFlow w 0, no rectification": lambda pretrained: BenchmarkLoss(guidance_scale=0.0, rectify_weight=0.0, shares=QUARTERS),
    "RCGM only w 0, residual clamp 3": lambda pretrained: BenchmarkLoss.rcgm(guidance_scale=0.0, residual_clamp=3.0),
}

if __name__ == "__main__":
    curves.main(VARIANTS)
