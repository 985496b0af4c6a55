"""SANA-Sprint (``guidance_embeds=True``): the adapter makes SanaSprintPipeline's own transformer calls."""

import math

import pytest
import torch

from adapter_backbones import TEXT_LEN, build_sana, build_sana_sprint
from twinloss_adapters import sana

GUIDANCE_SCALE = 4.5  # SanaSprintPipeline's user-facing default


def test_sprint_adapter_reproduces_every_transformer_call_of_the_sprint_pipeline() -> None:
    from diffusers import SanaSprintPipeline, SCMScheduler

    torch.manual_seed(0)
    transformer = build_sana_sprint()
    model = sana.adapt(transformer)
    calls = []
    transformer.register_forward_hook(lambda _, args, kwargs, out: calls.append((args, kwargs, out)), with_kwargs=True)
    pipeline = SanaSprintPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer, scheduler=SCMScheduler())
    text, mask = torch.randn(2, TEXT_LEN, 24), torch.ones(2, TEXT_LEN)
    mask[0, -2:] = 0
    pipeline(
        prompt_embeds=text, prompt_attention_mask=mask, num_inference_steps=2, height=256, width=256,
        max_timesteps=math.pi / 2,  # the default 1.57080 overshoots pi / 2: t = 1.0000037, outside |t| <= 1
        guidance_scale=GUIDANCE_SCALE, output_type="latent", use_resolution_binning=False,
        generator=torch.Generator().manual_seed(0),
    )
    assert len(calls) == 2
    stock_calls = list(calls)
    for (latent,), kwargs, (expected,) in stock_calls:
        t = kwargs["timestep"]
        assert float(t.max()) <= 1.0 + 1e-6  # the pipeline passes the flow time itself, in [0, 1]
        with torch.no_grad():
            actual = model(
                latent, t, t, encoder_hidden_states=text, encoder_attention_mask=mask,
                guidance=torch.full((2,), GUIDANCE_SCALE),
            )
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_sprint_raw_output_is_the_flow_velocity_of_the_trigflow_state() -> None:
    """The pipeline's output transform maps ``v = z - x`` at ``t = sin s / (cos s + sin s)`` to ``cos s z - sin s x``."""
    generator = torch.Generator().manual_seed(0)
    x, z = torch.randn(2, 6, dtype=torch.float64, generator=generator), torch.randn(2, 6, dtype=torch.float64, generator=generator)
    for s in (0.2, 0.9, 1.3, math.pi / 2):
        t = math.sin(s) / (math.cos(s) + math.sin(s))
        norm = math.sqrt(t**2 + (1 - t) ** 2)
        trigflow_state = math.cos(s) * x + math.sin(s) * z
        model_input = trigflow_state * norm  # the pipeline's latent_model_input (sigma_data divided out)
        torch.testing.assert_close(model_input, t * z + (1 - t) * x)
        velocity = z - x
        trigflow_velocity = ((1 - 2 * t) * model_input + (1 - 2 * t + 2 * t**2) * velocity) / norm
        torch.testing.assert_close(trigflow_velocity, math.cos(s) * z - math.sin(s) * x)


def test_sprint_requires_guidance_and_plain_sana_rejects_it() -> None:
    torch.manual_seed(0)
    model = sana.adapt(build_sana_sprint())
    assert model.capabilities.guidance_inputs == ("guidance",)
    x, text, t = torch.randn(2, 4, 8, 8), torch.randn(2, TEXT_LEN, 24), torch.full((2,), 0.5)
    with pytest.raises(ValueError, match="missing \\['guidance'\\]"):
        model(x, t, t, encoder_hidden_states=text)
    plain = sana.adapt(build_sana())
    assert plain.capabilities.guidance_inputs == ()
    with pytest.raises(ValueError, match="without guidance embeddings"):
        plain(x, t, t, encoder_hidden_states=text, guidance=torch.ones(2))

