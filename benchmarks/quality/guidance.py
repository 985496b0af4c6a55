r"""Guidance against the twin terms: variants of where the guidance enters, on the patch benchmark.

Each variant is a benchmark-side subclass of ``twinloss.TwinFlowLoss`` (the
library's loss is not edited); every run logs ``twinloss.health`` signals
(term gradient norms and their cosines with the base gradient) at each
checkpoint. With ``w`` the guidance scale, ``F_c`` / ``F_u`` the model's
conditional / unconditional outputs:

* ``w 0.2``: a smaller scale;
* ``interval (0.2, 0.7)``: guidance only for ``0.2 < t < 0.7``;
* ``multi-step rows only`` / ``any-step rows only``: the guided velocity
  replaces ``v`` only in one group's targets (the RCGM chain of the other
  groups starts from the unguided ``v``);
* ``unguided real field in rectification``: the real velocity of the
  rectification gap is :math:`(1 - w) F_c + w F_u` instead of :math:`F_c`.
  With self-guidance at its fixed point :math:`F_c = v_c + w (F_c - F_u)`,
  :math:`F_u = v_u`, this recovers the unguided conditional velocity
  :math:`v_c`, the only one that is the velocity of a distribution;
* ``guided fake field``: the fake rows regress on
  :math:`v + w (F_c - F_u)` evaluated at their own negative times, so the fake
  field is self-guided like the real one and the gap compares like with like.

    PYTHONPATH=src python benchmarks/quality/guidance.py --seed 0 --skip-main --skip-fm
"""

import inspect
import sys
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import patches  # noqa: E402

import twinloss  # noqa: E402
from twinloss.protocol import concat_conditioning  # noqa: E402


class _Batch(twinloss.TwinFlowLoss):
    """Remembers the batch's size and unconditional labels for the overrides below."""

    def forward(self, model, x, *, cond=None, uncond=None, generator=None):
        self._batch_size = x.shape[0]
        self._uncond = uncond
        return super().forward(model, x, cond=cond, uncond=uncond, generator=generator)


class GuidanceOnOneGroup(_Batch):
    """Guided velocity in the targets of ``group``'s rows only."""

    def __init__(self, group: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.group = group

    def _teacher_passes(self, no_grad_call, x_t, t, r, v, cond, uncond):
        guided, _ = super()._teacher_passes(no_grad_call, x_t, t, r, v, cond, uncond)
        counts = self.shares.counts(self._batch_size)
        start = 0
        for name in ("one_step", "multi_step", "any_step"):
            if name == self.group:
                break
            start += counts[name]
        rows = slice(start, start + counts[self.group])
        mixed = v.clone()
        mixed[rows] = guided[rows]
        scale, self.guidance_scale = self.guidance_scale, 0.0
        try:
            return super()._teacher_passes(no_grad_call, x_t, t, r, mixed, cond, None)
        finally:
            self.guidance_scale = scale


class UnguidedRealFieldInRectification(_Batch):
    r"""Rectification gap :math:`F(y, -s, -s) - [(1 - w) F_c(y, s, s) + w F_u(y, s, s)]`."""

    def _rectify(self, no_grad_call, x_t, prediction, traj, cond_one, generator):
        one = traj.groups["one_step"]
        if self.rectify_weight == 0 or traj.size("one_step") == 0:
            return prediction.new_zeros(())
        uncond_one = {key: value[one] for key, value in self._uncond.items()}
        velocity = prediction[one]
        x_hat = self.path.jump(x_t[one], velocity, traj.t[one], traj.r[one]).detach()
        z = torch.randn(x_hat.shape, device=x_hat.device, dtype=x_hat.dtype, generator=generator)
        s = torch.rand(x_hat.shape[0], device=x_hat.device, dtype=x_hat.dtype, generator=generator)
        y = self.path.sample(x_hat, z, s).x_t
        signed = torch.cat([-s, s, s])
        both = no_grad_call(
            torch.cat([y, y, y]), signed, signed, concat_conditioning(cond_one, cond_one, uncond_one), False
        )
        fake_velocity, cond_velocity, uncond_velocity = both.chunk(3)
        w = self.guidance_scale
        real_velocity = (1 - w) * cond_velocity + w * uncond_velocity
        gap = (fake_velocity - real_velocity).clamp(-self.rectify_clamp, self.rectify_clamp)
        return self.distance(velocity, (velocity - gap).detach()).mean()


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


class GuidedFakeField(twinloss.TwinFlowLoss):
    def forward(self, model, x, *, cond=None, uncond=None, generator=None):
        wrapped = _FakeRowsGuided(model, self.guidance_scale, patches.NULL)
        return super().forward(wrapped, x, cond=cond, uncond=uncond, generator=generator)


VARIANTS = {
    "TwinFlow w 0.2": lambda: twinloss.TwinFlowLoss(guidance_scale=0.2),
    "TwinFlow w 0.8": lambda: twinloss.TwinFlowLoss(guidance_scale=0.8),
    "TwinFlow w 0.5, interval (0.2, 0.7)": lambda: twinloss.TwinFlowLoss(guidance_interval=(0.2, 0.7)),
    "TwinFlow w 0.5, multi-step rows only": lambda: GuidanceOnOneGroup("multi_step"),
    "TwinFlow w 0.5, any-step rows only": lambda: GuidanceOnOneGroup("any_step"),
    "TwinFlow w 0.5, unguided real field in rectification": lambda: UnguidedRealFieldInRectification(),
    "TwinFlow w 0.5, guided fake field": lambda: GuidedFakeField(),
}

if __name__ == "__main__":
    patches.main(VARIANTS, tag="guidance")
