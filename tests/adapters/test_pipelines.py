"""Stock diffusers pipelines driven by TwinFlow equal AnyStepSampler on the same noise and conditioning.

Each case builds the stock pipeline around a tiny adapted transformer (twin
embeddings moved off zero so that the target time matters), passes
``prompt_embeds`` and the initial ``latents`` in the pipeline's own layout, and
compares ``output_type="latent"`` with :class:`twinloss.AnyStepSampler` run on
the adapted model seen in that same layout (so few mode's fresh noise is drawn
in the same order).
"""

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn
from torch.testing import assert_close

import twinloss
from twinloss_adapters.packing import pack_image_patches, pack_video_patches, unpack_image_patches, unpack_video_patches
from twinloss_adapters.pipelines import twinflow_pipeline
from twinloss_adapters.scheduler import TwinFlowScheduler

from adapter_backbones import CASES, TEXT_LEN

BATCH = 2


def _randn(generator: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=generator)


def _mask() -> Tensor:
    mask = torch.ones(BATCH, TEXT_LEN)
    mask[0, -2:] = 0
    return mask


@dataclass(frozen=True)
class PipelineCase:
    """A stock pipeline, its call, and the map between its latent layout and the adapter's."""

    backbone: str
    build: Callable[[nn.Module], object]
    latent_shape: tuple[int, ...]  # the adapter's [C, (F,) H, W]
    call_kwargs: Callable[[torch.Generator], dict]  # prompt embeds, sizes, guidance
    adapter_cond: Callable[[dict], dict[str, Tensor]]
    to_pipeline: Callable[[Tensor], Tensor] = lambda x: x
    from_pipeline: Callable[[Tensor], Tensor] = lambda x: x


def _sana(transformer: nn.Module) -> object:
    from diffusers import SanaPipeline

    return SanaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer, scheduler=TwinFlowScheduler())


def _qwen_image(transformer: nn.Module) -> object:
    from diffusers import QwenImagePipeline

    return QwenImagePipeline(scheduler=TwinFlowScheduler(), vae=None, text_encoder=None, tokenizer=None, transformer=transformer)


def _flux(transformer: nn.Module) -> object:
    from diffusers import FluxPipeline

    return FluxPipeline(
        scheduler=TwinFlowScheduler(), vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
        tokenizer_2=None, transformer=transformer,
    )


def _sd3(transformer: nn.Module) -> object:
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=TwinFlowScheduler(), vae=None, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    )


def _wan(transformer: nn.Module) -> object:
    from diffusers import WanPipeline

    return WanPipeline(tokenizer=None, text_encoder=None, transformer=transformer, vae=None, scheduler=TwinFlowScheduler())


def _ltx(transformer: nn.Module) -> object:
    from diffusers import LTXPipeline

    return LTXPipeline(scheduler=TwinFlowScheduler(), vae=None, text_encoder=None, tokenizer=None, transformer=transformer)


def _hunyuan_video(transformer: nn.Module) -> object:
    from diffusers import HunyuanVideoPipeline

    return HunyuanVideoPipeline(
        text_encoder=None, tokenizer=None, transformer=transformer, vae=None, scheduler=TwinFlowScheduler(),
        text_encoder_2=None, tokenizer_2=None,
    )


def _text(generator: torch.Generator) -> Tensor:
    return _randn(generator, BATCH, TEXT_LEN, 24)


PIPELINES = {
    "SanaPipeline": PipelineCase(
        "sana", _sana, (4, 8, 8),
        lambda g: dict(prompt_embeds=_text(g), prompt_attention_mask=_mask(), guidance_scale=1.0, height=256, width=256,
                       use_resolution_binning=False),
        lambda kw: {"encoder_hidden_states": kw["prompt_embeds"], "encoder_attention_mask": kw["prompt_attention_mask"]},
    ),
    "QwenImagePipeline": PipelineCase(
        "qwen_image", _qwen_image, (4, 8, 8),
        lambda g: dict(prompt_embeds=_text(g), prompt_embeds_mask=_mask(), height=64, width=64),
        lambda kw: {"encoder_hidden_states": kw["prompt_embeds"], "encoder_hidden_states_mask": kw["prompt_embeds_mask"]},
        to_pipeline=lambda x: pack_image_patches(x, 2),
        from_pipeline=lambda x: unpack_image_patches(x, 8, 8, 2),
    ),
    "FluxPipeline": PipelineCase(
        "flux", _flux, (4, 8, 8),
        lambda g: dict(prompt_embeds=_text(g), pooled_prompt_embeds=_randn(g, BATCH, 12), guidance_scale=3.5, height=64, width=64),
        lambda kw: {"encoder_hidden_states": kw["prompt_embeds"], "pooled_projections": kw["pooled_prompt_embeds"],
                    "guidance": torch.full((BATCH,), 3.5)},
        to_pipeline=lambda x: pack_image_patches(x, 2),
        from_pipeline=lambda x: unpack_image_patches(x, 8, 8, 2),
    ),
    "StableDiffusion3Pipeline": PipelineCase(
        "sd3", _sd3, (4, 8, 8),
        lambda g: dict(prompt_embeds=_text(g), pooled_prompt_embeds=_randn(g, BATCH, 12), guidance_scale=1.0, height=64, width=64),
        lambda kw: {"encoder_hidden_states": kw["prompt_embeds"], "pooled_projections": kw["pooled_prompt_embeds"]},
    ),
    "WanPipeline": PipelineCase(
        "wan", _wan, (4, 2, 4, 4),
        lambda g: dict(prompt_embeds=_text(g), guidance_scale=1.0, height=32, width=32, num_frames=5),
        lambda kw: {"encoder_hidden_states": kw["prompt_embeds"]},
    ),
    "LTXPipeline": PipelineCase(
        "ltx_video", _ltx, (4, 2, 4, 4),
        lambda g: dict(prompt_embeds=_text(g), prompt_attention_mask=_mask(), guidance_scale=1.0, height=128, width=128,
                       num_frames=9),
        lambda kw: {"encoder_hidden_states": kw["prompt_embeds"], "encoder_attention_mask": kw["prompt_attention_mask"]},
        to_pipeline=lambda x: pack_video_patches(x),
        from_pipeline=lambda x: unpack_video_patches(x, 2, 4, 4),
    ),
    "HunyuanVideoPipeline": PipelineCase(
        "hunyuan_video", _hunyuan_video, (4, 2, 4, 4),
        lambda g: dict(prompt_embeds=_text(g), pooled_prompt_embeds=_randn(g, BATCH, 12), prompt_attention_mask=_mask(),
                       guidance_scale=6.0, height=32, width=32, num_frames=5),
        lambda kw: {"encoder_hidden_states": kw["prompt_embeds"], "encoder_attention_mask": kw["prompt_attention_mask"],
                    "pooled_projections": kw["pooled_prompt_embeds"], "guidance": torch.full((BATCH,), 6.0)},
    ),
}

SETTINGS = {
    "1nfe_few": (1, dict(mode="few")),
    "2nfe_few_gaps_eta": (2, dict(mode="few", stochastic_ratio=0.5, start_gap=0.001, end_gap=0.6)),
    "4nfe_any_warp": (4, dict(mode="any", kumaraswamy=(1.17, 0.8, 1.1))),
}


def _move_twin_weights_off_zero(transformer: nn.Module, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in transformer.twinflow_time_embedding.parameters():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))


@pytest.fixture(scope="module", params=list(PIPELINES))
def built(request):
    case = PIPELINES[request.param]
    torch.manual_seed(0)
    backbone = CASES[case.backbone]
    adapted = backbone.adapt(backbone.build())
    _move_twin_weights_off_zero(adapted.transformer)
    pipeline = case.build(adapted.transformer)
    pipeline.set_progress_bar_config(disable=True)
    return case, adapted, pipeline


def _in_pipeline_layout(case: PipelineCase, adapted: nn.Module) -> Callable[..., Tensor]:
    """The adapted model as a velocity model over the pipeline's latent layout."""

    def velocity(x_t: Tensor, t: Tensor, r: Tensor, **cond: Tensor) -> Tensor:
        return case.to_pipeline(adapted(case.from_pipeline(x_t), t, r, **cond))

    return velocity


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_pipeline_latents_equal_any_step_sampler(built, setting):
    case, adapted, pipeline = built
    steps, options = SETTINGS[setting]
    generate = twinflow_pipeline(pipeline, steps=steps, **options)
    inputs = torch.Generator().manual_seed(11)
    kwargs = case.call_kwargs(inputs)
    noise = case.to_pipeline(torch.randn(BATCH, *case.latent_shape, generator=inputs))

    out = generate(**kwargs, latents=noise, output_type="latent", generator=torch.Generator().manual_seed(5))
    latents = out[0] if isinstance(out, tuple) else (out.images if hasattr(out, "images") else out.frames)

    sampler = twinloss.AnyStepSampler(steps, **options)
    expected = sampler(
        _in_pipeline_layout(case, adapted), noise, cond=case.adapter_cond(kwargs), generator=torch.Generator().manual_seed(5)
    ).sample
    assert latents.shape == noise.shape
    assert_close(latents, expected, rtol=2e-5, atol=2e-5)
    assert not torch.equal(latents, noise)
