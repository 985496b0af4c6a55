r"""Any-step sampling from a two-time velocity field (docs/method.md, section 5).

A schedule ``s_0 >= s_1 >= ... >= s_K = 0`` (:func:`time_schedule`) is walked
by one step function per mode, all with the k-diffusion head
``step(velocity_fn, x, s, s_next, *, generator)``, where
``velocity_fn(x, s, r)`` returns :math:`F(x, s, r)` for 0-d times ``s, r``:

* :func:`few_step`: jump to data, :math:`\hat x = x - s F(x, s, 0)`, then
  re-noise to :math:`s'` with :math:`z' = \sqrt{1-\eta}\,\hat z + \sqrt{\eta}\,\epsilon`.
  One step from ``s = 1`` is the 1-NFE generator :math:`z - F(z, 1, 0)`.
* :func:`any_step`: :math:`x \leftarrow x - (s - s') F(x, s, s')`.
* :func:`multi_step`: Euler on the instantaneous field :math:`F(x, s, s)`,
  with an optional Heun (second-order) correction.

:class:`AnyStepSampler` walks a schedule with one of them; the diffusers
``TwinFlowScheduler`` (``twinloss_adapters.scheduler``) calls the same step
functions, one per pipeline step.
"""

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
from jaxtyping import Float, Shaped
from torch import Tensor, nn

from twinloss._tensors import at_least_float32
from twinloss._checks import check_guidance_interval, check_int
from twinloss.evaluator import StepEvaluator
from twinloss.paths import AffinePath, LinearPath
from twinloss.protocol import (
    Conditioning,
    VelocityModel,
    check_conditioning,
    check_model_keywords,
    check_uncond_matches,
    concat_conditioning,
)
from twinloss.targets import guidance_target
from twinloss.time_distributions import kumaraswamy_warp, resolution_shift

__all__ = [
    "SAMPLER_MODES",
    "SAMPLER_PRESETS",
    "AnyStepSampler",
    "SamplerOutput",
    "SamplerPreset",
    "SamplerStep",
    "VelocityFn",
    "any_step",
    "check_sampler_settings",
    "few_step",
    "multi_step",
    "sampler_preset",
    "time_schedule",
]

SAMPLER_MODES = ("few", "any", "multi")

VelocityFn = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``(x, s, r) -> F(x, s, r)`` with 0-d times ``s`` and ``r``: the model with its conditioning bound."""


def time_schedule(
    steps: int,
    *,
    start_gap: float = 0.0,
    end_gap: float | None = None,
    kumaraswamy: tuple[float, float, float] | None = None,
    shift: float = 1.0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Float[Tensor, " knots"]:
    r"""Times ``s_0 > ... > s_K = 0`` for ``K = steps`` steps, built as the authors build them.

    A progress variable ``p`` runs uniformly from the start gap :math:`g_0`
    to :math:`1 - g_1` (``K`` knots when an end gap :math:`g_1 > 0` is given,
    else ``K + 1`` knots with the last dropped), is warped by the Kumaraswamy
    transform :math:`w(p) = (1 - (1 - p^a)^b)^c`, and

    .. math::
        s_k = 1 - w(p_k), \qquad s_K = 0.

    So ``start_gap=0.001`` starts at ``s_0 = 0.999`` and ``end_gap=g`` makes the
    last jump run from :math:`s_{K-1} = 1 - w(1 - g)` (``= g`` unwarped) to 0.
    Without gaps or warp the grid is uniform, ``[1, (K-1)/K, ..., 0]``. A
    ``shift`` other than 1 then moves every time through the resolution shift
    :math:`s_k \mapsto \sigma s_k / (1 + (\sigma - 1) s_k)`
    (:func:`~twinloss.time_distributions.resolution_shift`), as diffusers'
    flow-match schedulers shift theirs; 0 and 1 stay where they are.

    Args:
        steps: ``K >= 1``.
        start_gap: :math:`g_0` in ``[0, 1)`` (*default* 0).
        end_gap: :math:`g_1` in ``[0, 1)``; ``None`` or 0 for none. Needs
            ``steps >= 2`` (with one step the gap would have no knot to move).
        kumaraswamy: ``(a, b, c)``, each finite and > 0 (*default* identity).
        shift: the resolution shift :math:`\sigma`, finite and > 0 (*default* 1: none).

    Raises:
        ValueError: naming the argument that is out of range.
    """
    check_int(steps, "steps", minimum=1)
    if not (shift > 0 and math.isfinite(shift)):
        raise ValueError(f"shift must be a finite number > 0, got {shift}")
    if not (0.0 <= start_gap < 1.0):
        raise ValueError(f"start_gap must lie in [0, 1), got {start_gap}")
    end = 0.0 if end_gap is None else float(end_gap)
    if not (0.0 <= end < 1.0):
        raise ValueError(f"end_gap must lie in [0, 1), got {end_gap}")
    if end > 0 and steps < 2:
        raise ValueError("end_gap needs steps >= 2 (the last jump runs from the end gap to 0)")
    if start_gap + end >= 1.0:
        raise ValueError(f"start_gap + end_gap must stay below 1, got {start_gap} + {end}")
    if kumaraswamy is not None:
        if len(kumaraswamy) != 3 or not all(v > 0 and math.isfinite(v) for v in kumaraswamy):
            raise ValueError(f"kumaraswamy must be three finite numbers > 0 (a, b, c), got {kumaraswamy}")

    if end > 0:
        progress = torch.linspace(start_gap, 1.0 - end, steps, dtype=torch.float64)
    else:
        progress = torch.linspace(start_gap, 1.0, steps + 1, dtype=torch.float64)[:-1]
    if kumaraswamy is not None:
        progress = kumaraswamy_warp(progress, *kumaraswamy)
    times = torch.cat([1.0 - progress, progress.new_zeros(1)])
    if shift != 1.0:
        times = resolution_shift(times, shift)
    return times.to(device=device, dtype=dtype)


def check_sampler_settings(
    *,
    mode: str,
    stochastic_ratio: float | None,
    start_gap: float,
    end_gap: float | None,
    kumaraswamy: tuple[float, float, float] | None,
    steps: int = 2,
    heun: bool = False,
    shift: float = 1.0,
) -> None:
    """Raise ValueError naming the first sampler setting out of range (``heun`` needs multi mode).

    Shared by :class:`AnyStepSampler` and the diffusers ``TwinFlowScheduler``;
    the schedule arguments are checked through :func:`time_schedule` at
    ``steps`` (*default* 2, the fewest an end gap allows, for a scheduler
    whose step count comes with each pipeline call).
    """
    if mode not in SAMPLER_MODES:
        raise ValueError(f"mode must be one of {SAMPLER_MODES}, got {mode!r}")
    if stochastic_ratio is not None:
        if not (0.0 <= stochastic_ratio <= 1.0):
            raise ValueError(f"stochastic_ratio must lie in [0, 1], got {stochastic_ratio}")
        if mode != "few" and stochastic_ratio != 0.0:
            raise ValueError(
                f"stochastic_ratio={stochastic_ratio} applies to mode='few' only: mode={mode!r} never re-noises "
                "(its ratio is 0, the value the authors' any and multi presets give)"
            )
    if heun and mode != "multi":
        raise ValueError(f"heun=True applies to mode='multi' only, got mode={mode!r}")
    time_schedule(steps, start_gap=start_gap, end_gap=end_gap, kumaraswamy=kumaraswamy, shift=shift)


def resolve_stochastic_ratio(mode: str, stochastic_ratio: float | None) -> float:
    """The re-noising share ``eta`` a mode runs with: *default* 1 in few mode, 0 (no re-noising) in the others."""
    if stochastic_ratio is None:
        return 1.0 if mode == "few" else 0.0
    return float(stochastic_ratio)


# --- one step per mode ----------------------------------------------------------------


def few_step(
    velocity_fn: VelocityFn,
    x: Float[Tensor, " batch *shape"],
    s: Float[Tensor, ""],
    s_next: Float[Tensor, ""],
    *,
    generator: torch.Generator | list[torch.Generator] | None = None,
    stochastic_ratio: float = 1.0,
    path: AffinePath | None = None,
) -> Float[Tensor, " batch *shape"]:
    r"""Jump to data with :math:`F(x, s, 0)`, then re-noise to ``s_next``.

    .. math::
        \hat x = x - s F(x, s, 0), \quad
        \hat z = \frac{x - b_s \hat x}{a_s}, \quad
        z' = \sqrt{1-\eta}\,\hat z + \sqrt{\eta}\,\epsilon, \quad
        x' = a_{s'} z' + b_{s'} \hat x

    (``a``, ``b`` the noise and data coefficients of ``path``, *default*
    linear: ``a_s = s, b_s = 1 - s``). With ``s_next = 0`` it returns
    :math:`\hat x`; with :math:`\eta = 0` on the linear path
    :math:`x' = (s'/s)\,x + (1 - s'/s)\,\hat x`. ``eps`` is drawn with
    ``generator`` (one per row when a list is given) only when
    :math:`\eta > 0` and ``s_next > 0``.
    """
    path = path if path is not None else LinearPath()
    batch = x.shape[0]
    t = s.expand(batch)
    x_hat = path.jump(x, velocity_fn(x, s, s.new_zeros(())), t, s.new_zeros(batch))
    if float(s_next) <= 0.0:
        return x_hat
    z_next = path.data_to_noise(x, x_hat, t)
    if stochastic_ratio > 0:
        fresh = standard_normal_like(x, generator)
        z_next = math.sqrt(1 - stochastic_ratio) * z_next + math.sqrt(stochastic_ratio) * fresh
    return path.sample(x_hat, z_next, s_next.expand(batch)).x_t


def any_step(
    velocity_fn: VelocityFn,
    x: Float[Tensor, " batch *shape"],
    s: Float[Tensor, ""],
    s_next: Float[Tensor, ""],
    *,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> Float[Tensor, " batch *shape"]:
    r"""One any-step jump :math:`x' = x - (s - s') F(x, s, s')` (deterministic; ``generator`` unused)."""
    return x - (s - s_next) * velocity_fn(x, s, s_next)


def multi_step(
    velocity_fn: VelocityFn,
    x: Float[Tensor, " batch *shape"],
    s: Float[Tensor, ""],
    s_next: Float[Tensor, ""],
    *,
    generator: torch.Generator | list[torch.Generator] | None = None,
    heun: bool = False,
) -> Float[Tensor, " batch *shape"]:
    r"""Euler on the instantaneous field, :math:`x' = x - (s - s') F(x, s, s)`.

    With ``heun=True`` the slope is the mean of :math:`F(x, s, s)` and
    :math:`F(x', s', s')` at the Euler point (two calls), except on a step
    to ``s' = 0``, which stays Euler (one call): the field is never
    evaluated at ``t = 0``, as in k-diffusion's ``sample_heun`` and
    diffusers' ``FlowMatchHeunDiscreteScheduler``, so ``K`` Heun steps to
    data make ``2K - 1`` calls. Deterministic.
    """
    slope = velocity_fn(x, s, s)
    euler = x - (s - s_next) * slope
    if not heun or float(s_next) <= 0.0:
        return euler
    return x - (s - s_next) * 0.5 * (slope + velocity_fn(euler, s_next, s_next))


def standard_normal_like(
    x: Float[Tensor, " batch *shape"], generator: torch.Generator | list[torch.Generator] | None
) -> Float[Tensor, " batch *shape"]:
    """Fresh ``N(0, I)`` noise shaped like ``x``; a list of generators draws row ``i`` with ``generator[i]``."""
    if isinstance(generator, list):
        if len(generator) != x.shape[0]:
            raise ValueError(f"generator is a list of {len(generator)}; expected one per row ({x.shape[0]})")
        return torch.cat([standard_normal_like(x[:1], g) for g in generator])
    device = generator.device if generator is not None else x.device  # draw where the generator lives
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)


# --- presets --------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplerPreset:
    """A named sampler setting: the :class:`AnyStepSampler` keywords it stands for.

    Attributes:
        steps, mode, stochastic_ratio, start_gap, end_gap, kumaraswamy: as in
            :class:`AnyStepSampler`.
        source: where the numbers come from.
    """

    steps: int
    mode: str
    stochastic_ratio: float
    start_gap: float
    end_gap: float | None
    kumaraswamy: tuple[float, float, float] | None
    source: str = field(compare=False)

    def sampler_keywords(self) -> dict[str, object]:
        """The keywords of :class:`AnyStepSampler` (and of ``TwinFlowScheduler``) this preset sets."""
        keywords = asdict(self)
        del keywords["source"]
        return keywords


_INFERENCE = "inclusionAI/TwinFlow inference.py"
_CONFIGS = "inclusionAI/TwinFlow src/configs/*.yaml, sample block"
SAMPLER_PRESETS: dict[str, SamplerPreset] = {
    "qwenimage_4nfe": SamplerPreset(4, "few", 1.0, 0.001, 0.5, None, f"{_INFERENCE}, 4 NFE config"),
    "qwenimage_2nfe": SamplerPreset(2, "few", 1.0, 0.001, 0.6, None, f"{_INFERENCE}, 2 NFE config"),
    "config_few_2nfe": SamplerPreset(2, "few", 1.0, 0.001, 0.7, None, f"{_CONFIGS} (few-step sampling)"),
    "config_any_4nfe": SamplerPreset(4, "any", 0.0, 0.001, 0.5, None, f"{_CONFIGS} (any-step sampling)"),
    "config_multi_30": SamplerPreset(
        30, "multi", 0.0, 0.001, None, (1.17, 0.8, 1.1), f"{_CONFIGS} (multi-step sampling)"
    ),
}
"""The authors' released sampler settings. Their ``time_dist_ctrl`` is ``kumaraswamy``
(``[1, 1, 1]``, the identity, written ``None``), ``rfba_gap_steps`` is
``(start_gap, end_gap)``, ``stochast_ratio`` is ``stochastic_ratio``. Their any and
multi styles re-noise with ratio 0, which on the linear path is exactly
:func:`any_step` / :func:`multi_step`."""


def sampler_preset(name: str) -> SamplerPreset:
    """Look up :data:`SAMPLER_PRESETS`; ValueError naming the known presets otherwise."""
    if name not in SAMPLER_PRESETS:
        raise ValueError(f"preset {name!r} is unknown; known presets: {sorted(SAMPLER_PRESETS)}")
    return SAMPLER_PRESETS[name]


# --- the sampler ----------------------------------------------------------------------


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


@dataclass(frozen=True)
class SamplerStep:
    """What a per-step ``callback`` receives after step ``index`` (0-based).

    Attributes:
        index: the step just taken.
        s, s_next: its start and end times (0-d).
        x: the state at ``s_next``, in the sampler's working dtype.
    """

    index: int
    s: Tensor
    s_next: Tensor
    x: Tensor


class AnyStepSampler(nn.Module):
    """Few-, any- or multi-step sampling of a :class:`~twinloss.protocol.VelocityModel`.

    Args:
        steps: number of steps ``K`` (*default* 1: the 1-NFE generator).
        mode: ``"few"`` (*default*), ``"any"`` or ``"multi"``.
        stochastic_ratio: ``eta`` in ``[0, 1]`` of fresh noise when re-noising
            in few mode (*default* 1); the other modes never re-noise, so they
            accept only 0 (what the authors' any and multi presets pass).
        start_gap: start the walk at ``1 - start_gap`` (*default* 0).
        end_gap: stop the uniform walk early and jump from there to 0 (``steps >= 2``);
            see :func:`time_schedule`.
        kumaraswamy: ``(a, b, c)`` warp of the schedule's progress variable.
        shift: resolution shift of the schedule's times (*default* 1: none;
            see :func:`time_schedule`).
        heun: second-order correction in multi mode (two calls per step, one
            on the last step to 0: see :func:`multi_step`).
        guidance_scale: classifier-free guidance ``F_c + w (F_c - F_u)``
            through :func:`twinloss.targets.guidance_target` (*default* 0:
            none, the trained model has guidance baked in). ``uncond`` is
            required when it is > 0 and refused when it is 0 (it would be
            ignored).
        guidance_interval: ``(low, high)``: guide only the model calls
            whose time lies in the open interval ``low < s < high`` (each
            step's start time; Heun's correction call its end time), as the
            loss's ``guidance_interval`` guides only the rows inside it; a
            call outside is one conditional call (*default* None: every call).
            Guidance on the middle of the path (Kynkaanniemi et al., NeurIPS
            2024) samples a multi-step model like for like with a TwinFlow
            model trained with the same interval. Needs ``guidance_scale > 0``.
        return_trajectory: keep every intermediate state.
        path: the path used to re-noise in few mode (*default* linear); the
            other modes never re-noise, so they refuse it.
    """

    def __init__(
        self,
        steps: int = 1,
        *,
        mode: str = "few",
        stochastic_ratio: float | None = None,
        start_gap: float = 0.0,
        end_gap: float | None = None,
        kumaraswamy: tuple[float, float, float] | None = None,
        shift: float = 1.0,
        heun: bool = False,
        guidance_scale: float = 0.0,
        guidance_interval: tuple[float, float] | None = None,
        return_trajectory: bool = False,
        path: AffinePath | None = None,
    ) -> None:
        super().__init__()
        check_sampler_settings(
            mode=mode,
            stochastic_ratio=stochastic_ratio,
            start_gap=start_gap,
            end_gap=end_gap,
            kumaraswamy=kumaraswamy,
            steps=steps,
            heun=heun,
            shift=shift,
        )
        if not (guidance_scale >= 0 and math.isfinite(guidance_scale)):
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale}")
        if guidance_interval is not None:
            guidance_interval = check_guidance_interval(guidance_interval)
            if guidance_scale == 0:
                raise ValueError(
                    f"guidance_interval={guidance_interval} limits guidance, but guidance_scale=0 applies none: "
                    "pass guidance_scale > 0 or leave guidance_interval out"
                )
        if path is not None and mode != "few":
            raise ValueError(
                f"path is given, but mode={mode!r} never re-noises (its step x - (t - r) F holds on any path); "
                "path applies to mode='few' only"
            )
        self.steps = steps
        self.mode = mode
        self.stochastic_ratio = resolve_stochastic_ratio(mode, stochastic_ratio)
        self.start_gap = float(start_gap)
        self.end_gap = end_gap
        self.kumaraswamy = kumaraswamy
        self.shift = float(shift)
        self.heun = heun
        self.guidance_scale = float(guidance_scale)
        self.guidance_interval = guidance_interval
        self.return_trajectory = return_trajectory
        self.path = path if path is not None else LinearPath()

    @classmethod
    def from_preset(cls, name: str, **overrides: object) -> "AnyStepSampler":
        """A sampler with the settings of :data:`SAMPLER_PRESETS` ``[name]``.

        ``overrides`` may set the arguments a preset leaves open
        (``guidance_scale``, ``guidance_interval``, ``return_trajectory``, ``path``, ``heun``, ``shift``).

        Raises:
            ValueError: for an unknown name, or an override of a setting the
                preset fixes (steps, mode, ratio, gaps, warp): build the
                sampler directly to change those.
        """
        keywords = sampler_preset(name).sampler_keywords()
        fixed = sorted(set(overrides) & set(keywords))
        if fixed:
            raise ValueError(f"overrides {fixed} are fixed by preset {name!r}; build AnyStepSampler(...) directly")
        return cls(**keywords, **overrides)

    def schedule(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
        return time_schedule(
            self.steps,
            start_gap=self.start_gap,
            end_gap=self.end_gap,
            kumaraswamy=self.kumaraswamy,
            shift=self.shift,
            device=device,
            dtype=dtype,
        )

    def step_function(self) -> Callable[..., Tensor]:
        """The mode's step function with this sampler's options bound."""
        if self.mode == "few":
            return partial(few_step, stochastic_ratio=self.stochastic_ratio, path=self.path)
        if self.mode == "any":
            return any_step
        return partial(multi_step, heun=self.heun)

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
        if float(schedule[-1]) != 0.0:
            raise ValueError(f"schedule must end at time 0, where the sample is, got {schedule.tolist()}")

    @torch.no_grad()
    def forward(
        self,
        model: VelocityModel,
        noise: Shaped[Tensor, " batch *shape"],
        *,
        cond: Conditioning | None = None,
        uncond: Conditioning | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        schedule: Float[Tensor, " knots"] | None = None,
        callback: Callable[[SamplerStep], None] | None = None,
    ) -> SamplerOutput:
        """Walk the schedule from ``noise`` (at time ``schedule[0]``) to data.

        ``callback``, if given, is called after every step with a :class:`SamplerStep`.
        """
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
            check_uncond_matches(cond, uncond)  # as the loss: torch.cat would fail or silently promote
            both_cond = concat_conditioning(cond, uncond)
        elif uncond is not None:
            raise ValueError(
                "uncond was given, but guidance_scale=0 would ignore it: build the sampler with "
                "guidance_scale > 0 for classifier-free guidance, or leave uncond out"
            )

        work = at_least_float32(noise.dtype)
        if schedule is None:
            schedule = self.schedule(noise.device, work)
        else:
            self._check_schedule(schedule)
            schedule = schedule.to(device=noise.device, dtype=work)
        calls = 0

        def guided_at(s: Tensor) -> bool:
            if self.guidance_scale == 0:
                return False
            if self.guidance_interval is None:
                return True
            low, high = self.guidance_interval
            return low < float(s) < high

        def velocity(x: Tensor, s: Tensor, s_target: Tensor) -> Tensor:
            nonlocal calls
            calls += 1
            t = s.expand(batch).clone()
            r = s_target.expand(batch).clone()
            guided = guided_at(s)
            if not guided:
                out = model(x.to(noise.dtype), t, r, **cond)
            else:
                out = model(
                    torch.cat([x, x]).to(noise.dtype), torch.cat([t, t]), torch.cat([r, r]), **both_cond
                )
            StepEvaluator.checked("sampler", ((2 if guided else 1) * batch, *x.shape[1:]), out)
            out = out.to(work)
            if not guided:
                return out
            cond_velocity, uncond_velocity = out.chunk(2)
            return guidance_target(cond_velocity, cond_velocity, uncond_velocity, self.guidance_scale)

        step = self.step_function()
        x = noise.to(work)
        states = [noise] if self.return_trajectory else None
        for index, (s, s_next) in enumerate(zip(schedule[:-1], schedule[1:], strict=True)):
            x = step(velocity, x, s, s_next, generator=generator)
            if states is not None:
                states.append(x.to(noise.dtype))
            if callback is not None:
                callback(SamplerStep(index=index, s=s, s_next=s_next, x=x))
        return SamplerOutput(
            sample=x.to(noise.dtype),
            times=schedule,
            trajectory=tuple(states) if states is not None else None,
            model_calls=calls,
        )
