r"""TwinFlow sampling as a diffusers scheduler (docs/inference.md).

:class:`TwinFlowScheduler` walks the schedule of :func:`twinloss.time_schedule`
with the step functions of :mod:`twinloss.sampling` (``few_step``,
``any_step``, ``multi_step``), one per pipeline step, so a stock diffusers
pipeline that calls ``scheduler.step(model_output, timestep, sample)`` samples
exactly as :class:`twinloss.AnyStepSampler` does.

A TwinFlow step needs the model evaluated at a target time ``r`` that depends
on the mode (few: ``r = 0``; any: ``r = s_{k+1}``; multi: ``r = s_k``).
:meth:`TwinFlowScheduler.target_time` gives it for the current step; the
adapted transformer's ``r_timestep`` hook asks for it on every call the
pipeline makes (``twinloss_adapters.pipelines`` connects the two).

Units: ``timesteps = num_train_timesteps * s`` as in every diffusers flow-match
scheduler; ``sigmas`` are the schedule times ``s_0, ..., s_K = 0``.

Heun (multi mode, ``heun=True``) lays its calls out as diffusers'
``FlowMatchHeunDiscreteScheduler`` does (``order = 2``): two model calls per
step except the last, the step to ``s_K = 0``, which is a plain Euler step
(the field is not evaluated at ``t = 0``), so ``2K - 1`` calls in all.
``timesteps`` lists every call, ``s_0, s_1, s_1, ..., s_{K-1}, s_{K-1}``, and
``sigmas`` follows them (the time of call ``i`` is ``sigmas[i]``, then a final
0), as pipelines that read ``sigmas[i]`` in their loop expect. The first call
of a step returns the Euler point, the second the corrected state of
:func:`twinloss.sampling.multi_step`, which takes the same Euler last step.
"""

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from twinloss._checks import check_int
from twinloss._tensors import at_least_float32
from twinloss.sampling import (
    any_step,
    check_sampler_settings,
    few_step,
    multi_step,
    resolve_stochastic_ratio,
    sampler_preset,
    time_schedule,
)
from twinloss_adapters._imports import require_diffusers

__all__ = ["TwinFlowScheduler", "TwinFlowSchedulerOutput"]  # noqa: F822 (TwinFlowScheduler: built on first access)

TIME_TOLERANCE = 1e-2
"""How far (twinloss units) a call's time may sit from the schedule knot: bf16 timesteps round by up to ~4e-3."""


@dataclass(frozen=True)
class TwinFlowSchedulerOutput:
    """What :meth:`TwinFlowScheduler.step` returns with ``return_dict=True``.

    Attributes:
        prev_sample: the state at the next schedule time, in the sample's dtype.
    """

    prev_sample: Tensor


class _TwinFlowSchedulerBody:
    """Few-, any- or multi-step TwinFlow sampling for diffusers pipelines.

    Saved and loaded with the pipeline (``scheduler/scheduler_config.json``).

    Args:
        num_train_timesteps: pipeline timestep units per unit of time (*default* 1000).
        mode: ``"few"`` (*default*), ``"any"`` or ``"multi"`` (see :mod:`twinloss.sampling`).
        stochastic_ratio: ``eta`` in ``[0, 1]``, the share of fresh noise when
            few mode re-noises (*default* ``None``: 1 in few mode); the other
            modes never re-noise and accept only 0.
        start_gap: the walk starts at ``1 - start_gap`` (*default* 0).
        end_gap: the last jump starts at ``1 - w(1 - end_gap)`` (*default*
            ``None``: no gap); needs at least two inference steps.
        kumaraswamy: ``(a, b, c)`` warp of the progress variable (*default* ``None``: identity).
        heun: Heun's second-order correction in multi mode, two model calls
            per step but one on the last, Euler step to 0 (*default* False;
            any other mode raises).
        shift: a static resolution shift of the times (*default* 1: none),
            as in diffusers' flow-match schedulers.
        use_dynamic_shifting: shift the times by ``exp(mu)`` with the ``mu``
            the pipeline passes to :meth:`set_timesteps` (Flux, Qwen-Image,
            LTX-Video and Z-Image compute it from the latent size, SD3 when
            this is set) instead of by
            ``shift`` (*default* False: TwinFlow samples at the times it was
            trained on, and a passed ``mu`` is not used, as in diffusers).
        steps: the step count the schedule is fixed to, as a preset fixes it
            (*default* ``None``: the count comes with each call).
            :meth:`set_timesteps` with another ``num_inference_steps`` raises;
            saved with the config, so a reloaded preset scheduler keeps it.

    Raises:
        ValueError: naming the argument that is out of range.
    """

    _compatibles: list = []
    order = 1

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        mode: str = "few",
        stochastic_ratio: float | None = None,
        start_gap: float = 0.0,
        end_gap: float | None = None,
        kumaraswamy: tuple[float, float, float] | list[float] | None = None,
        heun: bool = False,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        steps: int | None = None,
    ) -> None:
        check_int(num_train_timesteps, "num_train_timesteps", minimum=1)
        check_sampler_settings(
            mode=mode,
            stochastic_ratio=stochastic_ratio,
            heun=heun,
            steps=2 if steps is None else steps,  # 2: the fewest an end gap allows
            **self._schedule_keywords(),
        )
        if use_dynamic_shifting and shift != 1.0:
            raise ValueError(
                f"shift={shift} would be replaced by exp(mu) under use_dynamic_shifting=True: pass one of the two"
            )
        self.order = 2 if heun else 1  # model calls per step, read by pipelines' progress bars
        self.sigmas: Tensor | None = None
        self.timesteps: Tensor | None = None
        self.num_inference_steps: int | None = None
        self._knots: Tensor | None = None  # s_0, ..., s_K (``sigmas`` without Heun)
        self._heun_start: tuple[Tensor, Tensor] | None = None  # (x_k, F(x_k, s_k, s_k)) between a step's two calls
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self._generator: torch.Generator | list[torch.Generator] | None = None

    @classmethod
    def from_preset(cls, name: str, **config: object) -> "_TwinFlowSchedulerBody":
        """A scheduler with the steps, mode, ratio, gaps and warp of ``twinloss.sampling.SAMPLER_PRESETS[name]``.

        ``config`` may set the arguments the preset leaves open (``heun``,
        ``shift``, ``use_dynamic_shifting``, ``num_train_timesteps``). The
        preset's step count is kept as ``steps``: a pipeline call with
        another ``num_inference_steps`` raises, as
        ``AnyStepSampler.from_preset`` refuses another ``steps``.

        Raises:
            ValueError: for an unknown name, or ``config`` that sets what the
                preset fixes: build ``TwinFlowScheduler(...)`` directly to change it.
        """
        keywords = sampler_preset(name).sampler_keywords()
        fixed = sorted(set(config) & set(keywords))
        if fixed:
            raise ValueError(f"config {fixed} are fixed by preset {name!r}; build TwinFlowScheduler(...) directly")
        return cls(**keywords, **config)

    def _schedule_keywords(self) -> dict[str, object]:
        kumaraswamy = self.config.kumaraswamy
        return {
            "start_gap": float(self.config.start_gap),
            "end_gap": self.config.end_gap,
            "kumaraswamy": tuple(kumaraswamy) if kumaraswamy is not None else None,
            "shift": float(self.config.shift),
        }

    # --- the diffusers scheduler interface ------------------------------------------------

    @property
    def step_index(self) -> int | None:
        """The call about to be made (an index into ``timesteps``; the step itself without Heun).

        ``None`` before the first :meth:`step` after :meth:`set_timesteps`.
        """
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the walk at knot ``begin_index`` (pipelines call this with 0)."""
        self._begin_index = begin_index

    def scale_model_input(self, sample: Tensor, *args: object, **kwargs: object) -> Tensor:
        """Identity: flow-match inputs are not rescaled."""
        return sample

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: torch.device | str | None = None,
        sigmas: object = None,
        mu: float | None = None,
    ) -> None:
        """Build the schedule ``s_0, ..., s_K = 0`` for ``K = num_inference_steps`` from the config.

        Args:
            num_inference_steps: ``K`` (or ``len(sigmas)`` when only ``sigmas``
                is given; *default* the config's ``steps`` when neither is).
            device: where ``sigmas`` and ``timesteps`` live.
            sigmas: a sequence, array or tensor, accepted only as the uniform grid ``1, (K-1)/K, ..., 1/K``
                that Flux, Qwen-Image, LTX and HunyuanVideo pipelines pass by
                default; the times come from this scheduler's config.
            mu: the resolution shift those pipelines compute: the times are
                shifted by ``exp(mu)`` when the config sets
                ``use_dynamic_shifting`` (then it is required); otherwise
                unused, as in diffusers' ``FlowMatchEulerDiscreteScheduler``.

        Raises:
            ValueError: for custom ``sigmas`` (set ``start_gap``, ``end_gap``
                and ``kumaraswamy`` on the scheduler instead), a step count
                the config cannot honour (an end gap with one step, or not
                the config's ``steps``), or no ``mu`` under ``use_dynamic_shifting``.
        """
        fixed = self.config.steps
        if num_inference_steps is None:
            if sigmas is None and fixed is None:
                raise ValueError("num_inference_steps or sigmas must be given")
            num_inference_steps = len(sigmas) if sigmas is not None else fixed
        if fixed is not None and num_inference_steps != fixed:
            raise ValueError(
                f"num_inference_steps={num_inference_steps} conflicts with steps={fixed} in this TwinFlowScheduler's "
                "config (a preset's step count): call with that many steps, or build a scheduler without steps"
            )
        if sigmas is not None:
            given = torch.as_tensor(sigmas, dtype=torch.float64).flatten().cpu()
            uniform = torch.linspace(1.0, 0.0, num_inference_steps + 1, dtype=torch.float64)[:-1]
            if given.shape != uniform.shape or not torch.allclose(given, uniform, atol=1e-6, rtol=0):
                raise ValueError(
                    "sigmas: TwinFlowScheduler takes its times from its config (start_gap, end_gap, kumaraswamy); "
                    f"it accepts only the pipelines' default uniform grid, got {given.tolist()}"
                )
        keywords = self._schedule_keywords()
        if self.config.use_dynamic_shifting:
            if mu is None:
                raise ValueError("mu must be passed when use_dynamic_shifting is True (the times are shifted by exp(mu))")
            keywords["shift"] = math.exp(mu)
        schedule = time_schedule(num_inference_steps, **keywords, device=device or "cpu")
        self.num_inference_steps = num_inference_steps
        self._knots = schedule
        # Heun calls the model at s_k, then at s_{k+1}, except on the last step (Euler to s_K = 0):
        # s_0, s_1, s_1, ..., s_{K-1}, s_{K-1}, as diffusers' FlowMatchHeunDiscreteScheduler.
        call_times = schedule[:-1]
        if self.order == 2:
            call_times = torch.cat([torch.stack([schedule[:-2], schedule[1:-1]], 1).flatten(), schedule[-2:-1]])
        self.sigmas = torch.cat([call_times, schedule[-1:]])  # each call's time, then 0: the schedule without Heun
        self.timesteps = call_times * self.config.num_train_timesteps
        self._step_index = None
        self._begin_index = None
        self._heun_start = None

    def step(
        self,
        model_output: Float[Tensor, " batch *shape"],
        timestep: float | Tensor,
        sample: Float[Tensor, " batch *shape"],
        r_timestep: object = None,  # float | Tensor | None, checked by _check_r_timestep
        return_dict: bool = True,
        *,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> TwinFlowSchedulerOutput | tuple[Tensor]:
        """Take step ``k`` from ``s_k`` to ``s_{k+1}`` with the mode's step function (with Heun, half of it).

        The signature is diffusers' ``FlowMapEulerDiscreteScheduler.step``
        (``generator`` by keyword, as SANA's pipeline passes it).

        Args:
            model_output: the velocity the model returned at ``(sample, t,
                target_time(t))`` for this call's time ``t`` (``s_k``; with
                Heun's second call ``s_{k+1}``), in twinloss convention (``z - x``).
            timestep: ``timesteps[i]`` of this call (checked).
            sample: the state at ``s_k`` (Heun's second call: the Euler point it returned).
            r_timestep: where the step lands, in ``timesteps`` units (a number,
                a 0-d tensor or one per row): *default* and the only value
                accepted, the next knot ``num_train_timesteps * s_{k+1}``.
                The mode fixes both the model's target time and the landing
                time, so no other one can be honoured.
            generator: draws the fresh noise of few mode (*default*: the one
                bound by :meth:`noise_generator`, else the global RNG).

        Raises:
            ValueError: before :meth:`set_timesteps`, past the last step,
                when ``timestep`` is not the current knot, or when
                ``r_timestep`` is not the next one.
        """
        index = self._current_index()
        expected = float(self.timesteps[index])
        given = float(timestep.flatten()[0]) if isinstance(timestep, Tensor) else float(timestep)
        if abs(given - expected) > TIME_TOLERANCE * self.config.num_train_timesteps:
            raise ValueError(f"timestep {given} is not the current step's {expected} (step {index})")
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output must have the sample's shape {tuple(sample.shape)}, got {tuple(model_output.shape)}")
        step = self._step_of_call(index)
        if r_timestep is not None:
            self._check_r_timestep(r_timestep, step)
        work = at_least_float32(sample.dtype)
        s, s_next = self._knots[step].to(sample.device, work), self._knots[step + 1].to(sample.device, work)
        velocity = model_output.to(work)

        def evaluated(x: Tensor, s_call: Tensor, r_call: Tensor) -> Tensor:
            return velocity  # the pipeline evaluated the model at (sample, s, target_time) already

        mode = self.config.mode
        if mode == "few":
            x = few_step(
                evaluated,
                sample.to(work),
                s,
                s_next,
                generator=generator if generator is not None else self._generator,
                stochastic_ratio=resolve_stochastic_ratio(mode, self.config.stochastic_ratio),
            )
        elif self.order == 2 and step < self.num_inference_steps - 1:
            x = self._heun_call(velocity, sample.to(work), s, s_next, first=index % 2 == 0)
        else:
            x = (any_step if mode == "any" else multi_step)(evaluated, sample.to(work), s, s_next)
        self._step_index = index + 1
        prev_sample = x.to(sample.dtype)
        return TwinFlowSchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)

    def _check_r_timestep(self, r_timestep: object, step: int) -> None:
        """ValueError naming ``r_timestep`` unless it is the landing knot ``s_{k+1}`` of ``step`` (timesteps units)."""
        landing = float(self._knots[step + 1]) * self.config.num_train_timesteps
        if isinstance(r_timestep, bool) or not isinstance(r_timestep, (int, float, Tensor)):
            raise ValueError(
                f"r_timestep must be a number or a tensor in timesteps units, got {type(r_timestep).__name__} "
                "(pass generator= by keyword)"
            )
        given = torch.as_tensor(r_timestep, dtype=torch.float64).flatten().cpu()
        if given.numel() == 0 or bool(((given - landing).abs() > TIME_TOLERANCE * self.config.num_train_timesteps).any()):
            raise ValueError(
                f"r_timestep {given[:4].tolist()} cannot be honoured: TwinFlowScheduler's {self.config.mode!r} mode "
                f"lands step {step} on the next knot {landing:.6g} (the model's target time follows from it); "
                "leave r_timestep out or pass that value"
            )

    def _step_of_call(self, index: int) -> int:
        """The schedule step ``k`` (from ``s_k`` to ``s_{k+1}``) that call ``index`` belongs to."""
        return index // self.order  # Heun: calls 2k and 2k + 1, the last step's one call 2(K - 1)

    def _heun_call(self, velocity: Tensor, x: Tensor, s: Tensor, s_next: Tensor, *, first: bool) -> Tensor:
        """One of a Heun step's two calls: the Euler point, then :func:`multi_step` with ``heun=True``."""
        if first:
            self._heun_start = (x, velocity)
            return multi_step(lambda *_: velocity, x, s, s_next)
        if self._heun_start is None:
            raise ValueError("Heun's second call came without its first: call step once per timestep, in order")
        start, slope = self._heun_start
        self._heun_start = None
        slopes = iter((slope, velocity))  # F(x_k, s_k, s_k), then F at the Euler point at s_{k+1}
        return multi_step(lambda *_: next(slopes), start, s, s_next, heun=True)

    # --- what the adapted transformer asks ---------------------------------------------

    def target_time(self, t: Float[Tensor, " batch"]) -> Float[Tensor, " batch"]:
        """The target time ``r`` of the current call at times ``t`` (twinloss units).

        few: ``0``; any: ``min(s_{k+1}, t)``; multi: ``t`` itself.

        Raises:
            ValueError: before :meth:`set_timesteps`, past the last step, or
                if ``t`` is not the current call's time (``s_k``, or with
                Heun's second call ``s_{k+1}``) to within 1e-2.
        """
        index = self._current_index()
        knot = float(self.sigmas[index])
        if bool(((t - knot).abs() > TIME_TOLERANCE).any()):
            raise ValueError(
                f"the model was called at t = {t.flatten()[:4].tolist()}, but the scheduler's step {index} "
                f"starts at {knot:.6g}; drive the pipeline with this scheduler's timesteps"
            )
        mode = self.config.mode
        if mode == "few":
            return torch.zeros_like(t)
        if mode == "any":
            return torch.clamp(torch.full_like(t, float(self._knots[index + 1])), max=t)  # one call per step here
        return t.clone()

    @contextlib.contextmanager
    def noise_generator(self, generator: torch.Generator | list[torch.Generator] | None) -> Iterator[None]:
        """Draw few mode's fresh noise with ``generator`` in :meth:`step` calls that pass none.

        Stock pipelines other than SANA do not hand their ``generator`` to
        ``step``; ``TwinFlowPipeline`` binds it here for the pipeline call.
        """
        previous, self._generator = self._generator, generator
        try:
            yield
        finally:
            self._generator = previous

    def _current_index(self) -> int:
        if self.sigmas is None:
            raise ValueError("set_timesteps has not been called on this TwinFlowScheduler")
        index = self._step_index if self._step_index is not None else (self._begin_index or 0)
        if index >= len(self.timesteps):
            calls = f" ({len(self.timesteps)} calls)" if self.order == 2 else ""
            raise ValueError(f"the schedule has {self.num_inference_steps} steps{calls}; step {index} is past its end")
        return index

    def __len__(self) -> int:
        return self.config.num_train_timesteps


def _define_scheduler() -> type:
    """``TwinFlowScheduler``: the body above on diffusers' ``SchedulerMixin`` and ``ConfigMixin``.

    Built on first access, so importing this module does not import diffusers
    (``twinloss_adapters`` needs only torch until a diffusers class is used).
    """
    diffusers = require_diffusers()
    from diffusers.configuration_utils import register_to_config

    namespace = {
        "__init__": register_to_config(_TwinFlowSchedulerBody.__init__),
        "__module__": __name__,
        "__qualname__": "TwinFlowScheduler",
        "__doc__": _TwinFlowSchedulerBody.__doc__,
    }
    return type("TwinFlowScheduler", (_TwinFlowSchedulerBody, diffusers.SchedulerMixin, diffusers.ConfigMixin), namespace)


def __getattr__(name: str) -> type:
    if name == "TwinFlowScheduler":
        scheduler_class = _define_scheduler()
        globals()[name] = scheduler_class
        return scheduler_class
    if name == "SchedulerMixin":
        # DiffusionPipeline.from_pretrained looks a component's base class up in the component's own
        # module (model_index.json names "twinloss_adapters.scheduler") to pick its loading method.
        return require_diffusers().SchedulerMixin
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
