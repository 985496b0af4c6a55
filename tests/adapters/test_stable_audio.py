"""Stable Audio: the pipeline's EDM v-prediction is twinloss's velocity on the cosine path, times pi / 2."""

import math

import torch

import twinloss
from adapter_backbones import build_stable_audio, perturb_twin_embedding, stable_audio_cond, stable_audio_pipeline_call
from twinloss.paths import CosinePath
from twinloss_adapters import stable_audio
from twinloss_adapters.time_embedding import DEFAULT_MODULE_NAME

BATCH = 2


def _scheduler_sigmas() -> tuple[object, torch.Tensor, torch.Tensor]:
    """The preconditioning of StableAudioPipeline's scheduler at 4 steps: the scheduler, its sigmas and timesteps.

    ``CosineDPMSolverMultistepScheduler`` needs ``torchsde`` (absent here); its ``precondition_inputs`` and
    ``precondition_outputs`` are copied from ``EDMEulerScheduler``, used here with the cosine scheduler's
    defaults (``sigma_min = 0.3``, ``sigma_max = 500``, ``sigma_data = 1``, exponential schedule, v-prediction).
    Its timesteps are its ``precondition_noise``: ``sigma.atan() / pi * 2``.
    """
    from diffusers import EDMEulerScheduler

    scheduler = EDMEulerScheduler(
        sigma_min=0.3, sigma_max=500.0, sigma_data=1.0, sigma_schedule="exponential", prediction_type="v_prediction"
    )
    scheduler.set_timesteps(4)
    sigmas = scheduler.sigmas[:-1]
    return scheduler, sigmas, sigmas.atan() / math.pi * 2


def _adapted() -> tuple[torch.nn.Module, stable_audio.StableAudioAdapter]:
    torch.manual_seed(0)
    transformer = build_stable_audio()
    model = stable_audio.adapt(transformer)
    perturb_twin_embedding(transformer)
    return transformer, model


def test_the_schedulers_model_input_and_timestep_are_the_cosine_paths_x_t_and_time_in_float64() -> None:
    scheduler, sigmas, timesteps = _scheduler_sigmas()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 4, 6, generator=generator, dtype=torch.float64)
    z = torch.randn(BATCH, 4, 6, generator=generator, dtype=torch.float64)
    for sigma, timestep in zip(sigmas.double(), timesteps, strict=True):
        t = torch.full((BATCH,), 2 / math.pi * math.atan(sigma.item()), dtype=torch.float64)
        model_input = scheduler.precondition_inputs(x + sigma * z, sigma)  # the VE sample y = x + sigma z, scaled
        torch.testing.assert_close(model_input, CosinePath().sample(x, z, t).x_t, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(timestep.double(), t[0], rtol=1e-6, atol=1e-6)  # the float32 timestep fed


def test_adapter_is_the_pipelines_call_at_r_equals_t_bit_exactly_and_its_velocity_gives_the_schedulers_data() -> None:
    transformer, model = _adapted()
    scheduler, sigmas, timesteps = _scheduler_sigmas()
    generator = torch.Generator().manual_seed(1)
    cond = stable_audio_cond(transformer, BATCH, generator)
    for sigma, timestep in zip(sigmas, timesteps, strict=True):
        y = torch.randn(BATCH, 4, 6, generator=generator) * (sigma**2 + 1) ** 0.5  # the sampler's latents
        x_t = scheduler.precondition_inputs(y, sigma)  # scale_model_input
        t = timestep.expand(BATCH)
        with torch.no_grad():
            prediction = stable_audio_pipeline_call(transformer, x_t, t, cond)  # one timestep per row
            broadcast = stable_audio_pipeline_call(transformer, x_t, timestep.unsqueeze(0), cond)  # the literal [1]
            velocity = model(x_t, t, t.clone(), **cond)
        torch.testing.assert_close(velocity, prediction * (0.5 * math.pi), rtol=0, atol=0)
        # The pipeline's [1] timestep embeds one row and broadcasts it: the same values up to float32 rounding.
        torch.testing.assert_close(broadcast, prediction, rtol=1e-5, atol=1e-6)
        expected_data = scheduler.precondition_outputs(y.double(), prediction.double(), sigma.double())
        t64 = torch.full((BATCH,), 2 / math.pi * math.atan(sigma.item()), dtype=torch.float64)
        data = CosinePath().velocity_to_data(x_t.double(), velocity.double(), t64)
        torch.testing.assert_close(data, expected_data, rtol=1e-5, atol=1e-5)


def test_twin_times_reach_the_output_through_the_timestep_projection() -> None:
    transformer, model = _adapted()
    generator = torch.Generator().manual_seed(2)
    cond = stable_audio_cond(transformer, BATCH, generator)
    x_t = torch.randn(BATCH, 4, 6, generator=generator)
    t = torch.tensor([0.9, 0.4])
    seen = []
    handle = transformer.timestep_proj.register_forward_hook(lambda module, args, output: seen.append(output))
    with torch.no_grad():
        model(x_t, -t, -0.5 * t, **cond)
        handle.remove()
        stock = transformer.timestep_proj(transformer.time_proj(t))
        twin = transformer.get_submodule(DEFAULT_MODULE_NAME)(-t, -0.5 * t)
        at_t = model(x_t, t, t.clone(), **cond)
        jumped = model(x_t, -t, -0.5 * t, **cond)
    torch.testing.assert_close(seen[0], stock + twin, rtol=1e-6, atol=1e-6)
    assert twin.abs().max() > 1e-2 and (jumped - at_t).abs().max() > 1e-3


def test_twinflow_steps_on_the_cosine_path_train_the_twin_embedding() -> None:
    torch.manual_seed(0)
    transformer = build_stable_audio()
    model = stable_audio.adapt(transformer)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 6, generator=generator)
    cond = stable_audio_cond(transformer, 4, generator)
    loss_fn = twinloss.TwinFlowLoss(path=CosinePath(), guidance_scale=0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    twin = transformer.get_submodule(DEFAULT_MODULE_NAME)
    initial = [p.detach().clone() for p in twin.parameters()]
    losses = []
    for _ in range(2):
        out = loss_fn(model, x, cond=cond, generator=torch.Generator().manual_seed(1))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert all(math.isfinite(loss) for loss in losses) and losses[0] != losses[1]
    assert any((p - p0).abs().max() > 0 for p, p0 in zip(twin.parameters(), initial, strict=True))
