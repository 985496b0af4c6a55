r"""Any-step sampling from a two-time velocity field (ALGORITHM.md, section 5).

A schedule ``1 = s_0 >= s_1 >= ... >= s_K = 0`` is walked in one of three modes:

* ``few``: jump to data, :math:`\hat x = x - s_k F(x, s_k, 0)`, then re-noise to
  :math:`s_{k+1}` with :math:`z' = \sqrt{1-\eta}\,\hat z + \sqrt{\eta}\,\epsilon`.
  ``steps=1`` is the 1-NFE generator :math:`z - F(z, 1, 0)`.
* ``any``: :math:`x \leftarrow x - (s_k - s_{k+1}) F(x, s_k, s_{k+1})`.
* ``multi``: Euler on the instantaneous field :math:`F(x, s_k, s_k)`, with an
  optional Heun (second-order) correction.
"""

import math
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Shaped
from torch import Tensor, nn

from twinloss.evaluator import StepEvaluator
from twinloss.paths import AffinePath, LinearPath
from twinloss.protocol import (
    Conditioning,
    VelocityModel,
    check_conditioning,
    check_model_keywords,
    concat_conditioning,
)
from twinloss.time_distributions import kumaraswamy_warp

__all__ = ["SAMPLER_MODES", "AnyStepSampler", "SamplerOutput", "time_schedule"]

SAMPLER_MODES = ("few", "any", "multi")


def time_schedule(
    steps: int,
    *,
    end_gap: float | None = None,
    kumaraswamy: tuple[float, float, float] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Float[Tensor, " knots"]:
    r"""Times ``s_0 = 1 > ... > s_K = 0`` for ``K = steps`` steps.

    Uniform by default; ``kumaraswamy=(a, b, c)`` warps the uniform grid by
    :math:`(1 - (1 - u^a)^b)^c`; ``end_gap=g`` ends the walk early, placing
    :math:`s_{K-1} = g` and jumping from there straight to 0.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if end_gap is not None:
        if steps < 2:
            raise ValueError("end_gap needs steps >= 2 (the last jump runs from end_gap to 0)")
        if not (0.0 < end_gap < 1.0):
            raise ValueError(f"end_gap must lie in (0, 1), got {end_gap}")
    if kumaraswamy is not None:
        if len(kumaraswamy) != 3 or not all(v > 0 and math.isfinite(v) for v in kumaraswamy):
            raise ValueError(f"kumaraswamy must be three finite numbers > 0 (a, b, c), got {kumaraswamy}")

    walked = steps if end_gap is None else steps - 1
    u = torch.linspace(1.0, 0.0, walked + 1, dtype=torch.float64)
    if kumaraswamy is not None:
        u = kumaraswamy_warp(u, *kumaraswamy)
    if end_gap is not None:
        u = torch.cat([end_gap + (1.0 - end_gap) * u, u.new_zeros(1)])
    return u.to(device=device, dtype=dtype)


@dataclass(frozen=True)
class SamplerOutput:
    """A sampling run.

    Attributes:
        sample: the final state at time 0, in the noise's dtype and shape.
        times: the schedule walked, ``[K + 1]``.
        trajectory: the state at every schedule time (``K + 1`` tensors,
            noise first) if requested, else ``None``.
        model_calls: model evaluations made (a batched cond/uncond pair is one).
    """

    sample: Tensor
    times: Tensor
    trajectory: tuple[Tensor, ...] | None = field(repr=False)
    model_calls: int


class AnyStepSampler(nn.Module):
    """Few-, any- or multi-step sampling of a :class:`~twinloss.protocol.VelocityModel`.

    Args:
        steps: number of steps ``K`` (*default* 1: the 1-NFE generator).
        mode: ``"few"`` (*default*), ``"any"`` or ``"multi"``.
        stochastic_ratio: ``eta`` in ``[0, 1]`` of fresh noise when re-noising
            in few mode (*default* 1).
        end_gap: stop the uniform walk at this time and jump to 0 (``steps >= 2``).
        kumaraswamy: ``(a, b, c)`` warp of the schedule.
        heun: second-order correction in multi mode (two calls per step).
        guidance_scale: classifier-free guidance ``F_c + w (F_c - F_u)``
            (*default* 0: none, the trained model has guidance baked in).
        return_trajectory: keep every intermediate state.
        path: the path used to re-noise in few mode (*default* linear).
    """

    def __init__(
        self,
        steps: int = 1,
        *,
        mode: str = "few",
        stochastic_ratio: float = 1.0,
        end_gap: float | None = None,
        kumaraswamy: tuple[float, float, float] | None = None,
        heun: bool = False,
        guidance_scale: float = 0.0,
        return_trajectory: bool = False,
        path: AffinePath | None = None,
    ) -> None:
        super().__init__()
        if mode not in SAMPLER_MODES:
            raise ValueError(f"mode must be one of {SAMPLER_MODES}, got {mode!r}")
        if not (0.0 <= stochastic_ratio <= 1.0):
            raise ValueError(f"stochastic_ratio must lie in [0, 1], got {stochastic_ratio}")
        if heun and mode != "multi":
            raise ValueError(f"heun=True applies to mode='multi' only, got mode={mode!r}")
        if not (guidance_scale >= 0 and math.isfinite(guidance_scale)):
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale}")
        time_schedule(steps, end_gap=end_gap, kumaraswamy=kumaraswamy)  # validates the three
        self.steps = steps
        self.mode = mode
        self.stochastic_ratio = float(stochastic_ratio)
        self.end_gap = end_gap
        self.kumaraswamy = kumaraswamy
        self.heun = heun
        self.guidance_scale = float(guidance_scale)
        self.return_trajectory = return_trajectory
        self.path = path if path is not None else LinearPath()

    def schedule(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
        return time_schedule(
            self.steps, end_gap=self.end_gap, kumaraswamy=self.kumaraswamy, device=device, dtype=dtype
        )

    @staticmethod
    def _check_schedule(schedule: Tensor) -> None:
        if not isinstance(schedule, Tensor) or schedule.ndim != 1 or schedule.numel() < 2:
            raise ValueError("schedule must be a 1-D tensor of at least two times")
        if not bool(torch.isfinite(schedule).all()):
            raise ValueError("schedule contains non-finite times")
        if float(schedule[0]) > 1.0 or float(schedule[-1]) < 0.0:
            raise ValueError(f"schedule must lie in [0, 1], got {schedule.tolist()}")
        if bool((schedule[1:] > schedule[:-1]).any()):
            raise ValueError(
                f"schedule must be non-increasing (no target time r > t), got {schedule.tolist()}"
            )

    @torch.no_grad()
    def forward(
        self,
        model: VelocityModel,
        noise: Shaped[Tensor, "batch *shape"],
        *,
        cond: Conditioning | None = None,
        uncond: Conditioning | None = None,
        generator: torch.Generator | None = None,
        schedule: Float[Tensor, " knots"] | None = None,
    ) -> SamplerOutput:
        """Walk the schedule from ``noise`` (at time ``schedule[0]``) to data."""
        if not isinstance(noise, Tensor) or not noise.is_floating_point() or noise.ndim < 2:
            raise ValueError("noise must be a floating-point tensor of shape [B, ...]")
        if not bool(torch.isfinite(noise).all()):
            raise ValueError("noise contains NaN or infinite values")
        batch = noise.shape[0]
        cond = check_conditioning(cond, batch, name="cond")
        check_model_keywords(model, cond, name="cond")
        if self.guidance_scale > 0:
            if uncond is None:
                raise ValueError(f"uncond is required when guidance_scale={self.guidance_scale} > 0")
            uncond = check_conditioning(uncond, batch, name="uncond")
            both_cond = concat_conditioning(cond, uncond)

        work = torch.promote_types(noise.dtype, torch.float32)
        if schedule is None:
            schedule = self.schedule(noise.device, work)
        else:
            self._check_schedule(schedule)
            schedule = schedule.to(device=noise.device, dtype=work)
        calls = 0

        def velocity(x: Tensor, s: Tensor, s_target: Tensor) -> Tensor:
            nonlocal calls
            calls += 1
            t = s.expand(batch).clone()
            r = s_target.expand(batch).clone()
            if self.guidance_scale == 0:
                out = model(x.to(noise.dtype), t, r, **cond)
            else:
                out = model(
                    torch.cat([x, x]).to(noise.dtype), torch.cat([t, t]), torch.cat([r, r]), **both_cond
                )
            StepEvaluator.checked("sampler", ((1 if self.guidance_scale == 0 else 2) * batch, *x.shape[1:]), out)
            out = out.to(work)
            if self.guidance_scale == 0:
                return out
            cond_velocity, uncond_velocity = out.chunk(2)
            return cond_velocity + self.guidance_scale * (cond_velocity - uncond_velocity)

        x = noise.to(work)
        states = [noise] if self.return_trajectory else None
        zero = schedule.new_zeros(())
        for s, s_next in zip(schedule[:-1], schedule[1:]):
            if self.mode == "few":
                x = self._few_step(x, velocity(x, s, zero), s, s_next, generator)
            elif self.mode == "any":
                x = x - (s - s_next) * velocity(x, s, s_next)
            else:
                slope = velocity(x, s, s)
                euler = x - (s - s_next) * slope
                if self.heun:
                    euler = x - (s - s_next) * 0.5 * (slope + velocity(euler, s_next, s_next))
                x = euler
            if states is not None:
                states.append(x.to(noise.dtype))
        return SamplerOutput(
            sample=x.to(noise.dtype),
            times=schedule,
            trajectory=tuple(states) if states is not None else None,
            model_calls=calls,
        )

    def _few_step(
        self, x: Tensor, average_velocity: Tensor, s: Tensor, s_next: Tensor, generator: torch.Generator | None
    ) -> Tensor:
        """Jump to data, then re-noise to ``s_next`` with a mix of predicted and fresh noise."""
        batch = x.shape[0]
        t, r = s.expand(batch), s.new_zeros(batch)
        x_hat = self.path.jump(x, average_velocity, t, r)
        if float(s_next) <= 0.0:
            return x_hat
        z_next = self.path.data_to_noise(x, x_hat, t)
        if self.stochastic_ratio > 0:
            fresh = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
            z_next = math.sqrt(1 - self.stochastic_ratio) * z_next + math.sqrt(self.stochastic_ratio) * fresh
        return self.path.sample(x_hat, z_next, s_next.expand(batch)).x_t
