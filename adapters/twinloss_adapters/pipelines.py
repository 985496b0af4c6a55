"""Stock diffusers pipelines as 1-4 NFE TwinFlow generators (docs/inference.md).

One call::

    from twinloss_adapters import sana
    from twinloss_adapters.pipelines import twinflow_pipeline

    sana.adapt(pipe.transformer)                     # or the adapted model from training
    generate = twinflow_pipeline(pipe, preset="qwenimage_2nfe")   # or steps=1, mode="few", ...
    images = generate("a cat", generator=torch.Generator().manual_seed(0)).images

swaps in a :class:`~twinloss_adapters.scheduler.TwinFlowScheduler` (registered
on the pipeline, so ``pipe.save_pretrained`` writes it) and points the adapted
transformer's ``r_timestep`` hook at it: every transformer call the pipeline
makes, with its own text encoding, packing, ids and classifier-free-guidance
batching, then evaluates ``F(x, s_k, r_k)`` with the mode's target time, and
``scheduler.step`` takes the TwinFlow step, re-noising in few mode with the
call's ``generator``. The latents equal :class:`twinloss.AnyStepSampler`'s on
the same noise and conditioning.

Classifier-free guidance is the pipeline's own: its ``guidance_scale`` ``g``
(a doubled batch or a second call, as the pipeline does it) gives
:math:`F_u + g (F_c - F_u)`, which is ``AnyStepSampler(guidance_scale=g - 1)``.
TwinFlow models are trained with guidance baked in, so pass ``guidance_scale=1``
(SANA, SD3, Wan, LTX: CFG off) unless you want extra guidance; Flux and
HunyuanVideo's ``guidance_scale`` is an embedded input, not CFG.
"""

import contextlib
from collections.abc import Iterator

from torch import nn

from twinloss._checks import check_int
from twinloss.sampling import sampler_preset
from twinloss_adapters import scheduler as scheduler_module
from twinloss_adapters.flow_map import FlowMapCall, find_flow_map_call

__all__ = ["SUPPORTED_PIPELINES", "TwinFlowPipeline", "twinflow_pipeline"]

SUPPORTED_PIPELINES = (
    "SanaPipeline",
    "QwenImagePipeline",
    "FluxPipeline",
    "StableDiffusion3Pipeline",
    "WanPipeline",
    "LTXPipeline",
    "HunyuanVideoPipeline",
    "ZImagePipeline",
)
"""Pipelines that call the transformer with one current time per row (``timestep``, or Z-Image's
``t``) and step flow-match states with ``timesteps = 1000 s`` and the velocity ``z - x``: each is
tested against ``AnyStepSampler`` (Z-Image where its adapter is present)."""

TRANSFORMER_SLOTS = ("transformer", "transformer_2")  # Wan 2.2 carries a second expert


class TwinFlowPipeline:
    """A stock pipeline bound to a :class:`TwinFlowScheduler`; call it as the pipeline.

    Several may share one stock pipeline (say a few-step and a multi-step
    generator on one loaded model): each call binds this one's scheduler and
    ``r_timestep`` hook for its duration and restores what the pipeline
    carried before, so every ``TwinFlowPipeline`` samples with its own mode.
    Outside calls the stock pipeline carries the scheduler of the latest
    :func:`twinflow_pipeline` (what ``pipe(...)`` and ``pipe.save_pretrained``
    use).

    Attributes:
        pipeline: the stock pipeline.
        scheduler: the :class:`TwinFlowScheduler`.
        steps: ``num_inference_steps`` used when a call passes none.
    """

    def __init__(self, pipeline: object, scheduler: object, steps: int, calls: list[FlowMapCall]) -> None:
        self.pipeline = pipeline
        self.scheduler = scheduler
        self.steps = steps
        self._calls = calls

    def bind(self) -> None:
        """Make the stock pipeline carry this scheduler and point the transformers' ``r_timestep`` hooks at it."""
        self.pipeline.register_modules(scheduler=self.scheduler)
        for call in self._calls:
            call.target_time = self.scheduler.target_time

    @contextlib.contextmanager
    def _bound(self) -> Iterator[None]:
        previous = (self.pipeline.scheduler, [call.target_time for call in self._calls])
        self.bind()
        try:
            yield
        finally:
            scheduler, target_times = previous
            self.pipeline.register_modules(scheduler=scheduler)
            for call, target_time in zip(self._calls, target_times, strict=True):
                call.target_time = target_time

    def __call__(self, *args: object, **kwargs: object) -> object:
        """Run the pipeline with this scheduler (``num_inference_steps`` *default* ``self.steps``).

        The call's ``generator`` draws the initial noise (the pipeline does)
        and few mode's fresh noise at every re-noising (the scheduler does).
        """
        kwargs.setdefault("num_inference_steps", self.steps)
        with self._bound(), self.scheduler.noise_generator(kwargs.get("generator")):
            return self.pipeline(*args, **kwargs)


def _flow_map_calls(pipeline: object) -> list[FlowMapCall]:
    calls = []
    for slot in TRANSFORMER_SLOTS:
        transformer = getattr(pipeline, slot, None)
        if transformer is None:
            continue
        call = find_flow_map_call(transformer) if isinstance(transformer, nn.Module) else None
        if call is None:
            raise ValueError(
                f"pipeline.{slot} is not adapted; adapt it first (e.g. twinloss_adapters.sana.adapt(pipe.{slot})) "
                "or build the pipeline with the adapted model's .transformer"
            )
        calls.append(call)
    if not calls:
        raise ValueError("pipeline has no transformer")
    return calls


def twinflow_pipeline(
    pipeline: object,
    *,
    steps: int | None = None,
    preset: str | None = None,
    scheduler: object = None,
    **scheduler_config: object,
) -> TwinFlowPipeline:
    """Turn a stock diffusers pipeline with an adapted transformer into a TwinFlow generator.

    Args:
        pipeline: one of :data:`SUPPORTED_PIPELINES`, its ``transformer``
            adapted by the backbone's ``adapt`` (in place).
        steps: default ``num_inference_steps`` (*default* the preset's or the
            scheduler config's ``steps``, else 1). A preset (or a scheduler
            whose config sets ``steps``) fixes the count: another ``steps``
            here, or another ``num_inference_steps`` in a call, raises.
        preset: a name in ``twinloss.sampling.SAMPLER_PRESETS``.
        scheduler: a ready :class:`TwinFlowScheduler` (e.g. loaded with the pipeline).
        **scheduler_config: :class:`TwinFlowScheduler` arguments (``mode``,
            ``stochastic_ratio``, ``start_gap``, ``end_gap``, ``kumaraswamy``, ``heun``,
            ``shift``, ``use_dynamic_shifting``).

    Returns:
        The :class:`TwinFlowPipeline`; ``pipeline`` itself now carries the
        TwinFlow scheduler and the ``r_timestep`` binding. A second call on
        the same ``pipeline`` leaves the first ``TwinFlowPipeline`` sampling
        with its own scheduler (each binds its own for its calls).

    Raises:
        ValueError: for an unsupported pipeline class, a transformer that is
            not adapted, or conflicting ``preset`` / ``scheduler`` /
            ``scheduler_config`` / ``steps``.
    """
    name = type(pipeline).__name__
    if name not in SUPPORTED_PIPELINES:
        raise ValueError(f"pipeline is a {name}; twinflow_pipeline supports {list(SUPPORTED_PIPELINES)}")
    calls = _flow_map_calls(pipeline)
    given = [label for label, value in (("preset", preset), ("scheduler", scheduler)) if value is not None]
    if len(given) + bool(scheduler_config) > 1:
        raise ValueError(
            f"pass one of preset, scheduler or scheduler options, got {given + sorted(scheduler_config)}"
        )
    scheduler_class = scheduler_module.TwinFlowScheduler  # imports diffusers
    if preset is not None:
        preset_steps = sampler_preset(preset).steps
        if steps is not None and steps != preset_steps:
            raise ValueError(f"steps={steps} conflicts with preset {preset!r} ({preset_steps} steps)")
        steps = preset_steps
        scheduler = scheduler_class.from_preset(preset)
    elif scheduler is None:
        scheduler = scheduler_class(**scheduler_config)
    elif not isinstance(scheduler, scheduler_class):
        raise ValueError(f"scheduler must be a TwinFlowScheduler, got {type(scheduler).__name__}")
    fixed = scheduler.config.steps  # a preset's, also after the scheduler was saved and reloaded
    if fixed is not None:
        if steps is not None and steps != fixed:
            raise ValueError(f"steps={steps} conflicts with the scheduler's config steps={fixed}")
        steps = fixed
    steps = check_int(1 if steps is None else steps, "steps", minimum=1)
    generator = TwinFlowPipeline(pipeline, scheduler, steps, calls)
    generator.bind()
    return generator
