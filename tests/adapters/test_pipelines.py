"""Stock diffusers pipelines driven by TwinFlow equal AnyStepSampler on the same noise and conditioning.

Each case builds the stock pipeline around a tiny adapted transformer (twin
embeddings moved off zero so that the target time matters), passes
``prompt_embeds`` and the initial ``latents`` in the pipeline's own layout, and
compares ``output_type="latent"`` with :class:`twinloss.AnyStepSampler` run on
the adapted model seen in that same layout (so few mode's fresh noise is drawn
in the same order).
"""

import argparse
import functools
import importlib
import inspect
import math
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
from hub_cache import cache_repository

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
    pixels: tuple[int, ...]  # one decoded sample with output_type="pt"
    to_pipeline: Callable[[Tensor], Tensor] = lambda x: x
    from_pipeline: Callable[[Tensor], Tensor] = lambda x: x


# Tiny random VAEs (a few thousand weights): spatial x2 for the image pipelines (x4 for SANA, whose sizes are multiples of 32),
# the release's x8 / x4 (Wan, HunyuanVideo) and x32 / x8 (LTX, whose rope scale depends on it) for video.


def _image_kl_vae() -> nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
        latent_channels=4, norm_num_groups=4, layers_per_block=1, shift_factor=0.0,
    )


def _sana(transformer: nn.Module) -> object:
    from diffusers import AutoencoderDC, SanaPipeline

    vae = AutoencoderDC(
        latent_channels=4, attention_head_dim=2, encoder_block_types=("ResBlock",) * 3,
        decoder_block_types=("ResBlock",) * 3, encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
        encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1), encoder_qkv_multiscales=((), (), ()),
        decoder_qkv_multiscales=((), (), ()), upsample_block_type="interpolate", downsample_block_type="Conv",
        decoder_norm_types="rms_norm", decoder_act_fns="silu",
    )
    return SanaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=TwinFlowScheduler())


def _qwen_image(transformer: nn.Module) -> object:
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline

    vae = AutoencoderKLQwenImage(
        base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    )
    return QwenImagePipeline(scheduler=TwinFlowScheduler(), vae=vae, text_encoder=None, tokenizer=None, transformer=transformer)


def _flux(transformer: nn.Module) -> object:
    from diffusers import FluxPipeline

    return FluxPipeline(
        scheduler=TwinFlowScheduler(), vae=_image_kl_vae(), text_encoder=None, tokenizer=None, text_encoder_2=None,
        tokenizer_2=None, transformer=transformer,
    )


def _sd3(transformer: nn.Module) -> object:
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=TwinFlowScheduler(), vae=_image_kl_vae(), text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    )


def _wan(transformer: nn.Module) -> object:
    from diffusers import AutoencoderKLWan, WanPipeline

    vae = AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    )
    return WanPipeline(tokenizer=None, text_encoder=None, transformer=transformer, vae=vae, scheduler=TwinFlowScheduler())


def _ltx_vae() -> nn.Module:
    from diffusers import AutoencoderKLLTXVideo

    return AutoencoderKLLTXVideo(
        latent_channels=4, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
    )


def _ltx(transformer: nn.Module) -> object:
    from diffusers import LTXPipeline

    return LTXPipeline(scheduler=TwinFlowScheduler(), vae=_ltx_vae(), text_encoder=None, tokenizer=None, transformer=transformer)


def _hunyuan_video(transformer: nn.Module) -> object:
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoPipeline

    vae = AutoencoderKLHunyuanVideo(
        latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4, up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
    )
    return HunyuanVideoPipeline(
        text_encoder=None, tokenizer=None, transformer=transformer, vae=vae, scheduler=TwinFlowScheduler(),
        text_encoder_2=None, tokenizer_2=None,
    )


def _text(generator: torch.Generator) -> Tensor:
    return _randn(generator, BATCH, TEXT_LEN, 24)


PIPELINES = {
    "SanaPipeline": PipelineCase(
        "sana", _sana, (4, 8, 8),
        lambda g: dict(prompt_embeds=_text(g), prompt_attention_mask=_mask(), guidance_scale=1.0, height=32, width=32,
                       use_resolution_binning=False),
        lambda kw: {"encoder_hidden_states": kw["prompt_embeds"], "encoder_attention_mask": kw["prompt_attention_mask"]},
        pixels=(3, 32, 32),
    ),
    "QwenImagePipeline": PipelineCase(
        "qwen_image", _qwen_image, (4, 8, 8),
        lambda g: dict(prompt_embeds=_text(g), prompt_embeds_mask=_mask(), height=16, width=16),
        lambda kw: {"encoder_hidden_states": kw["prompt_embeds"], "encoder_hidden_states_mask": kw["prompt_embeds_mask"]},
        pixels=(3, 16, 16),
        to_pipeline=lambda x: pack_image_patches(x, 2),
        from_pipeline=lambda x: unpack_image_patches(x, 8, 8, 2),
    ),
    "FluxPipeline": PipelineCase(
        "flux", _flux, (4, 8, 8),
        lambda g: dict(prompt_embeds=_text(g), pooled_prompt_embeds=_randn(g, BATCH, 12), guidance_scale=3.5, height=16, width=16),
        lambda kw: {"encoder_hidden_states": kw["prompt_embeds"], "pooled_projections": kw["pooled_prompt_embeds"],
                    "guidance": torch.full((BATCH,), 3.5)},
        pixels=(3, 16, 16),
        to_pipeline=lambda x: pack_image_patches(x, 2),
        from_pipeline=lambda x: unpack_image_patches(x, 8, 8, 2),
    ),
    "StableDiffusion3Pipeline": PipelineCase(
        "sd3", _sd3, (4, 8, 8),
        lambda g: dict(prompt_embeds=_text(g), pooled_prompt_embeds=_randn(g, BATCH, 12), guidance_scale=1.0, height=16, width=16),
        lambda kw: {"encoder_hidden_states": kw["prompt_embeds"], "pooled_projections": kw["pooled_prompt_embeds"]},
        pixels=(3, 16, 16),
    ),
    "WanPipeline": PipelineCase(
        "wan", _wan, (4, 2, 4, 4),
        lambda g: dict(prompt_embeds=_text(g), guidance_scale=1.0, height=32, width=32, num_frames=5),
        lambda kw: {"encoder_hidden_states": kw["prompt_embeds"]},
        pixels=(5, 3, 32, 32),
    ),
    "LTXPipeline": PipelineCase(
        "ltx_video", _ltx, (4, 2, 4, 4),
        lambda g: dict(prompt_embeds=_text(g), prompt_attention_mask=_mask(), guidance_scale=1.0, height=128, width=128,
                       num_frames=9),
        lambda kw: {"encoder_hidden_states": kw["prompt_embeds"], "encoder_attention_mask": kw["prompt_attention_mask"]},
        pixels=(9, 3, 128, 128),
        to_pipeline=lambda x: pack_video_patches(x),
        from_pipeline=lambda x: unpack_video_patches(x, 2, 4, 4),
    ),
    "HunyuanVideoPipeline": PipelineCase(
        "hunyuan_video", _hunyuan_video, (4, 2, 4, 4),
        lambda g: dict(prompt_embeds=_text(g), pooled_prompt_embeds=_randn(g, BATCH, 12), prompt_attention_mask=_mask(),
                       guidance_scale=6.0, height=32, width=32, num_frames=5),
        lambda kw: {"encoder_hidden_states": kw["prompt_embeds"], "encoder_attention_mask": kw["prompt_attention_mask"],
                    "pooled_projections": kw["pooled_prompt_embeds"], "guidance": torch.full((BATCH,), 6.0)},
        pixels=(5, 3, 32, 32),
    ),
}



def _z_image(transformer: nn.Module) -> object:
    from diffusers import ZImagePipeline

    return ZImagePipeline(scheduler=TwinFlowScheduler(), vae=_image_kl_vae(), text_encoder=None, tokenizer=None, transformer=transformer)


def _kept_caption_tokens(text: Tensor, mask: Tensor) -> list[Tensor]:
    """ZImagePipeline's prompt_embeds: one ``[L_i, D]`` tensor of kept tokens per image."""
    return [row[keep.bool()] for row, keep in zip(text, mask, strict=True)]


if "z_image" in CASES:  # the Z-Image adapter (twinloss_adapters.z_image) is present
    PIPELINES["ZImagePipeline"] = PipelineCase(
        "z_image", _z_image, (4, 8, 8),
        lambda g: dict(prompt_embeds=_kept_caption_tokens(_text(g), _mask()), guidance_scale=0.0, height=16, width=16),
        lambda kw: {"encoder_hidden_states": torch.nn.utils.rnn.pad_sequence(kw["prompt_embeds"], batch_first=True),
                    "encoder_attention_mask": _mask()[:, : max(len(row) for row in kw["prompt_embeds"])]},
        pixels=(3, 16, 16),
    )

SETTINGS = {
    "1nfe_few": (1, dict(mode="few")),
    "2nfe_few_gaps_eta": (2, dict(mode="few", stochastic_ratio=0.5, start_gap=0.001, end_gap=0.6)),
    "4nfe_any_warp": (4, dict(mode="any", kumaraswamy=(1.17, 0.8, 1.1))),
    "2step_multi_heun": (2, dict(mode="multi", heun=True)),  # 3 transformer calls: the last step is Euler
}


def _move_twin_weights_off_zero(adapted: nn.Module, seed: int = 3) -> None:
    """Every weight adapting added (twinloss's or a release's embedder) gets random values."""
    generator = torch.Generator().manual_seed(seed)
    parameters = dict(adapted.named_parameters())
    with torch.no_grad():
        for name in adapted.extra_state_dict():
            parameters[name].copy_(0.3 * torch.randn(parameters[name].shape, generator=generator))


@pytest.fixture(scope="module", params=list(PIPELINES))
def built(request):
    case = PIPELINES[request.param]
    torch.manual_seed(0)
    backbone = CASES[case.backbone]
    adapted = backbone.adapt(backbone.build())
    _move_twin_weights_off_zero(adapted)
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



PASS_MU = ("FluxPipeline", "QwenImagePipeline", "LTXPipeline", "StableDiffusion3Pipeline", "ZImagePipeline")
"""Pipelines that compute a resolution shift ``mu`` from the latent size and hand it to ``set_timesteps``
(SD3 only when the scheduler's config sets ``use_dynamic_shifting``)."""


def test_dynamic_shifting_samples_at_the_times_shifted_by_the_pipelines_mu_or_asks_for_one(built, monkeypatch):
    case, adapted, pipeline = built
    options = dict(mode="any", use_dynamic_shifting=True)
    generate = twinflow_pipeline(pipeline, steps=3, **options)
    passed = []
    set_timesteps = generate.scheduler.set_timesteps

    @functools.wraps(set_timesteps)  # pipelines inspect its signature for `sigmas`
    def recording(*args, **kwargs):
        passed.append(kwargs.get("mu"))
        return set_timesteps(*args, **kwargs)

    monkeypatch.setattr(generate.scheduler, "set_timesteps", recording)
    inputs = torch.Generator().manual_seed(11)
    kwargs = case.call_kwargs(inputs)
    noise = case.to_pipeline(torch.randn(BATCH, *case.latent_shape, generator=inputs))
    if type(pipeline).__name__ not in PASS_MU:
        with pytest.raises(ValueError, match="^mu must be passed when use_dynamic_shifting is True"):
            generate(**kwargs, latents=noise, output_type="latent")
        return
    out = generate(**kwargs, latents=noise, output_type="latent")
    latents = out[0] if isinstance(out, tuple) else (out.images if hasattr(out, "images") else out.frames)
    (mu,) = passed
    shift = math.exp(mu)
    assert shift != 1.0
    sampler = twinloss.AnyStepSampler(3, mode="any", shift=shift)
    expected = sampler(_in_pipeline_layout(case, adapted), noise, cond=case.adapter_cond(kwargs)).sample
    assert_close(latents, expected, rtol=2e-5, atol=2e-5)
    unshifted = twinloss.AnyStepSampler(3, mode="any")(_in_pipeline_layout(case, adapted), noise,
                                                         cond=case.adapter_cond(kwargs)).sample
    assert not torch.allclose(latents, unshifted, rtol=1e-4, atol=1e-4)


def test_prompt_embeddings_in_pixels_out_with_the_generator_honoured(built):
    case, _, pipeline = built
    generate = twinflow_pipeline(pipeline, preset="qwenimage_2nfe")
    kwargs = case.call_kwargs(torch.Generator().manual_seed(11))

    def pixels(seed):
        out = generate(**kwargs, output_type="pt", generator=torch.Generator().manual_seed(seed))
        return out.images if hasattr(out, "images") else out.frames

    first, again, other = pixels(0), pixels(0), pixels(1)
    assert first.shape == (BATCH, *case.pixels) and bool(torch.isfinite(first).all())
    assert torch.equal(first, again) and not torch.equal(first, other)

# --- a pipeline with its own tokenizer, text encoder and VAE: prompt in, video out -------------


def _tiny_ltx_pipeline():
    from diffusers import LTXPipeline
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    words = ["[PAD]", "[UNK]", "</s>", "a", "red", "cat", "on", "the", "moon", "dog"]
    vocabulary = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="[UNK]"))
    vocabulary.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=vocabulary, pad_token="[PAD]", unk_token="[UNK]", eos_token="</s>", model_max_length=TEXT_LEN
    )
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(words), d_model=24, d_kv=8, d_ff=32, num_layers=1, num_heads=2)).eval()
    vae = _ltx_vae()
    torch.manual_seed(0)
    case = CASES["ltx_video"]
    adapted = case.adapt(case.build())
    _move_twin_weights_off_zero(adapted)
    pipeline = LTXPipeline(
        scheduler=TwinFlowScheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=adapted.transformer
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline, adapted


def test_prompt_to_video_with_a_tokenizer_text_encoder_and_vae():
    pipeline, adapted = _tiny_ltx_pipeline()
    generate = twinflow_pipeline(pipeline, preset="qwenimage_2nfe")
    prompts = ["a red cat", "a dog on the moon"]
    size = dict(guidance_scale=1.0, height=128, width=128, num_frames=9, max_sequence_length=TEXT_LEN)
    latents = generate(prompts, **size, output_type="latent", generator=torch.Generator().manual_seed(0)).frames

    # the same run by hand: the generator draws the initial noise, then every re-noising
    embeds, mask, _, _ = pipeline.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=TEXT_LEN)
    generator = torch.Generator().manual_seed(0)
    noise = pack_video_patches(torch.randn(2, 4, 2, 4, 4, generator=generator))
    layout = PIPELINES["LTXPipeline"]
    expected = twinloss.AnyStepSampler.from_preset("qwenimage_2nfe")(
        _in_pipeline_layout(layout, adapted), noise, cond={"encoder_hidden_states": embeds, "encoder_attention_mask": mask},
        generator=generator,
    ).sample
    assert_close(latents, expected, rtol=2e-5, atol=2e-5)

    video = generate(prompts, **size, output_type="pt", generator=torch.Generator().manual_seed(0)).frames
    again = generate(prompts, **size, output_type="pt", generator=torch.Generator().manual_seed(0)).frames
    other = generate(prompts, **size, output_type="pt", generator=torch.Generator().manual_seed(1)).frames
    assert video.shape == (2, 9, 3, 128, 128) and torch.equal(video, again) and not torch.equal(video, other)


# --- guidance, multi mode, saving, errors (SANA) ---------------------------------------------------


def _sana_pipeline():
    torch.manual_seed(0)
    adapted = CASES["sana"].adapt(CASES["sana"].build())
    _move_twin_weights_off_zero(adapted)
    pipeline = _sana(adapted.transformer)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline, adapted


def test_pipeline_guidance_is_the_sampler_guidance_shifted_by_one():
    """The pipeline's F_u + g (F_c - F_u) is AnyStepSampler's F_c + (g - 1)(F_c - F_u) in one doubled batch."""
    pipeline, adapted = _sana_pipeline()
    inputs = torch.Generator().manual_seed(11)
    text, negative, noise = _text(inputs), _text(inputs), torch.randn(BATCH, 4, 8, 8, generator=inputs)
    generate = twinflow_pipeline(pipeline, steps=2, mode="multi")
    latents = generate(
        prompt_embeds=text, prompt_attention_mask=_mask(), negative_prompt=None, negative_prompt_embeds=negative,
        negative_prompt_attention_mask=torch.ones(BATCH, TEXT_LEN), guidance_scale=2.5, height=32, width=32,
        use_resolution_binning=False, latents=noise, output_type="latent",
    ).images
    expected = twinloss.AnyStepSampler(2, mode="multi", guidance_scale=1.5)(
        adapted, noise, cond={"encoder_hidden_states": text, "encoder_attention_mask": _mask()},
        uncond={"encoder_hidden_states": negative, "encoder_attention_mask": torch.ones(BATCH, TEXT_LEN)},
    ).sample
    assert_close(latents, expected, rtol=2e-5, atol=2e-5)


def test_pipeline_saves_the_twinflow_scheduler_and_loads_it_back(tmp_path):
    from diffusers import DiffusionPipeline

    pipeline, _ = _sana_pipeline()
    twinflow_pipeline(pipeline, preset="config_any_4nfe")
    pipeline.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path, tokenizer=None, text_encoder=None)
    assert type(loaded.scheduler) is TwinFlowScheduler
    assert loaded.scheduler.config.mode == "any" and loaded.scheduler.config.end_gap == 0.5
    loaded.scheduler.set_timesteps(4)
    assert_close(loaded.scheduler.sigmas, twinloss.AnyStepSampler.from_preset("config_any_4nfe").schedule())


def test_two_twinflow_pipelines_on_one_stock_pipeline_each_sample_with_their_own_scheduler():
    """A second twinflow_pipeline on the same pipeline does not take over the first one's mode."""
    from twinloss_adapters.flow_map import find_flow_map_call

    pipeline, adapted = _sana_pipeline()
    few = twinflow_pipeline(pipeline, steps=2, mode="few")
    any_step = twinflow_pipeline(pipeline, steps=2, mode="any")
    kwargs = PIPELINES["SanaPipeline"].call_kwargs(torch.Generator().manual_seed(11))
    cond = PIPELINES["SanaPipeline"].adapter_cond(kwargs)
    noise = torch.randn(BATCH, 4, 8, 8, generator=torch.Generator().manual_seed(12))
    for generate, mode in ((few, "few"), (any_step, "any"), (few, "few")):
        latents = generate(**kwargs, latents=noise, output_type="latent", generator=torch.Generator().manual_seed(5)).images
        expected = twinloss.AnyStepSampler(2, mode=mode)(adapted, noise, cond=cond, generator=torch.Generator().manual_seed(5))
        assert_close(latents, expected.sample, rtol=2e-5, atol=2e-5)
    assert pipeline.scheduler is any_step.scheduler  # outside calls: the latest binding, as before the calls
    assert find_flow_map_call(pipeline.transformer).target_time == any_step.scheduler.target_time


def test_a_preset_pipeline_refuses_another_step_count_also_after_save_and_reload(tmp_path):
    from diffusers import DiffusionPipeline

    pipeline, adapted = _sana_pipeline()
    generate = twinflow_pipeline(pipeline, preset="qwenimage_2nfe")
    kwargs = PIPELINES["SanaPipeline"].call_kwargs(torch.Generator().manual_seed(11))
    noise = torch.randn(BATCH, 4, 8, 8, generator=torch.Generator().manual_seed(12))
    with pytest.raises(ValueError, match="^num_inference_steps=3 conflicts with steps=2"):
        generate(**kwargs, latents=noise, output_type="latent", num_inference_steps=3)
    pipeline.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path, transformer=adapted.transformer, tokenizer=None, text_encoder=None)
    loaded.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="^steps=3 conflicts with the scheduler's config steps=2"):
        twinflow_pipeline(loaded, scheduler=loaded.scheduler, steps=3)
    reloaded = twinflow_pipeline(loaded, scheduler=loaded.scheduler)  # the preset's two steps and end gap
    assert reloaded.steps == 2
    latents = reloaded(**kwargs, latents=noise, output_type="latent", generator=torch.Generator().manual_seed(5)).images
    expected = twinloss.AnyStepSampler.from_preset("qwenimage_2nfe")(
        adapted, noise, cond=PIPELINES["SanaPipeline"].adapter_cond(kwargs), generator=torch.Generator().manual_seed(5)
    ).sample
    assert_close(latents, expected, rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="^num_inference_steps=3 conflicts with steps=2"):
        reloaded(**kwargs, latents=noise, output_type="latent", num_inference_steps=3)


def test_pipeline_refusals_name_what_is_wrong():
    from diffusers import SanaPipeline

    pipeline, adapted = _sana_pipeline()
    with pytest.raises(ValueError, match="^steps=2 conflicts with preset 'qwenimage_4nfe'"):
        twinflow_pipeline(pipeline, preset="qwenimage_4nfe", steps=2)
    with pytest.raises(ValueError, match="^pass one of preset, scheduler or scheduler options"):
        twinflow_pipeline(pipeline, preset="qwenimage_4nfe", mode="any")
    stock = SanaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=CASES["sana"].build(), scheduler=TwinFlowScheduler())
    with pytest.raises(ValueError, match="^pipeline.transformer is not adapted"):
        twinflow_pipeline(stock)
    with pytest.raises(ValueError, match="^pipeline is a Namespace"):
        twinflow_pipeline(argparse.Namespace(transformer=adapted.transformer))
    generate = twinflow_pipeline(pipeline, steps=2)
    with pytest.raises(ValueError, match="^sigmas: TwinFlowScheduler takes its times from its config"):
        generate(
            prompt_embeds=_text(torch.Generator()), prompt_attention_mask=_mask(), guidance_scale=1.0, height=32,
            width=32, use_resolution_binning=False, output_type="latent", sigmas=[1.0, 0.2],
        )


def test_a_lora_model_generates_through_its_pipeline_like_the_sampler():
    """The pipeline drives the base transformer that carries the LoRA layers and peft's copy of the twin modules."""
    peft = pytest.importorskip("peft")
    from twinloss_adapters import lora

    torch.manual_seed(0)
    adapted = CASES["sana"].adapt(CASES["sana"].build())
    model = lora.add_lora(adapted, peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"]))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:  # LoRA and the trained copy of the twin embedding
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    pipeline = _sana(adapted.transformer)
    pipeline.set_progress_bar_config(disable=True)
    inputs = torch.Generator().manual_seed(11)
    kwargs = PIPELINES["SanaPipeline"].call_kwargs(inputs)
    noise = torch.randn(BATCH, 4, 8, 8, generator=inputs)
    latents = twinflow_pipeline(pipeline, steps=2)(
        **kwargs, latents=noise, output_type="latent", generator=torch.Generator().manual_seed(5)
    ).images
    cond = PIPELINES["SanaPipeline"].adapter_cond(kwargs)
    expected = twinloss.AnyStepSampler(2)(model, noise, cond=cond, generator=torch.Generator().manual_seed(5)).sample
    assert_close(latents, expected, rtol=2e-5, atol=2e-5)
    with model.disable_adapter():  # the base model samples differently: the LoRA was in the pipeline's calls
        base = twinloss.AnyStepSampler(2)(model, noise, cond=cond, generator=torch.Generator().manual_seed(5)).sample
    assert not torch.allclose(latents, base, atol=1e-3)



@pytest.mark.parametrize("backbone,pipeline_name", [("qwen_image", "QwenImagePipeline"), ("z_image", "ZImagePipeline")])
def test_released_time_embeddings_generate_through_their_pipelines(backbone, pipeline_name):
    """The authors' releases (time_embedding="twinflow_release") sample through the stock pipeline like the sampler."""
    if pipeline_name not in PIPELINES:
        pytest.skip(f"no {backbone} adapter in tests/adapters/adapter_backbones.py")
    module = importlib.import_module(f"twinloss_adapters.{backbone}")
    if "time_embedding" not in inspect.signature(module.adapt).parameters:
        pytest.skip(f"twinloss_adapters.{backbone} has no release option")
    case = PIPELINES[pipeline_name]
    torch.manual_seed(0)
    adapted = module.adapt(CASES[backbone].build(), time_embedding="twinflow_release")
    _move_twin_weights_off_zero(adapted)
    pipeline = case.build(adapted.transformer)
    pipeline.set_progress_bar_config(disable=True)
    inputs = torch.Generator().manual_seed(11)
    kwargs = case.call_kwargs(inputs)
    noise = case.to_pipeline(torch.randn(BATCH, *case.latent_shape, generator=inputs))
    generate = twinflow_pipeline(pipeline, preset="qwenimage_4nfe")
    out = generate(**kwargs, latents=noise, output_type="latent", generator=torch.Generator().manual_seed(5))
    expected = twinloss.AnyStepSampler.from_preset("qwenimage_4nfe")(
        _in_pipeline_layout(case, adapted), noise, cond=case.adapter_cond(kwargs), generator=torch.Generator().manual_seed(5)
    ).sample
    assert_close(out.images, expected, rtol=2e-5, atol=2e-5)


def test_a_saved_twinflow_pipeline_reloads_and_generates_the_same_images(tmp_path):
    """Train-save-reload-generate: pipe.save_pretrained keeps the twin weights and the scheduler; the adapter reloads them."""
    from diffusers import SanaPipeline
    from twinloss_adapters import sana

    if not hasattr(sana.SanaAdapter, "save_pretrained"):
        pytest.skip("adapter persistence (twinloss_adapters.persistence) is not in this tree")
    pipeline, _ = _sana_pipeline()
    generate = twinflow_pipeline(pipeline, preset="qwenimage_2nfe")
    kwargs = PIPELINES["SanaPipeline"].call_kwargs(torch.Generator().manual_seed(11))
    before = generate(**kwargs, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    pipeline.save_pretrained(tmp_path)
    assert (tmp_path / "transformer" / "twinloss_config.json").is_file()  # the adapter's options, saved with it

    model = sana.from_pretrained(str(tmp_path))  # subfolder="transformer": the twin weights, strictly
    reloaded = SanaPipeline.from_pretrained(tmp_path, transformer=model.transformer, tokenizer=None, text_encoder=None)
    assert type(reloaded.scheduler) is TwinFlowScheduler
    reloaded.set_progress_bar_config(disable=True)
    after = twinflow_pipeline(reloaded, scheduler=reloaded.scheduler, steps=2)(
        **kwargs, output_type="pt", generator=torch.Generator().manual_seed(0)
    ).images
    assert torch.equal(after, before)


def test_a_twinflow_pipeline_on_the_hub_loads_by_repository_id_and_generates_the_same_images(tmp_path):
    """The Hub path (a repository id, not a directory), served from a cache the test writes, offline."""
    from diffusers import SanaPipeline
    from twinloss_adapters import sana

    pipeline, _ = _sana_pipeline()
    generate = twinflow_pipeline(pipeline, preset="qwenimage_2nfe")
    kwargs = PIPELINES["SanaPipeline"].call_kwargs(torch.Generator().manual_seed(11))
    before = generate(**kwargs, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    pipeline.save_pretrained(tmp_path / "saved")
    hub = cache_repository(tmp_path / "hub", "twinloss-test/tiny-sana-twinflow", tmp_path / "saved")

    model = sana.from_pretrained("twinloss-test/tiny-sana-twinflow", **hub)
    reloaded = SanaPipeline.from_pretrained(
        "twinloss-test/tiny-sana-twinflow", transformer=model.transformer, tokenizer=None, text_encoder=None, **hub)
    assert type(reloaded.scheduler) is TwinFlowScheduler
    reloaded.set_progress_bar_config(disable=True)
    after = twinflow_pipeline(reloaded, scheduler=reloaded.scheduler, steps=2)(
        **kwargs, output_type="pt", generator=torch.Generator().manual_seed(0)
    ).images
    assert torch.equal(after, before)
    with pytest.raises(ValueError, match="not-cached"):  # the cache served it: another repository id is not there
        sana.from_pretrained("twinloss-test/not-cached", **hub)


def test_a_reloaded_lora_generates_through_the_pipeline_of_its_base(tmp_path):
    """lora.load_lora onto a fresh stock base: the pipeline built on that base samples the loaded LoRA model."""
    peft = pytest.importorskip("peft")
    from twinloss_adapters import lora

    if not hasattr(lora, "load_lora"):
        pytest.skip("lora.load_lora is not in this tree")
    torch.manual_seed(0)
    transformer = CASES["sana"].build()
    stock_state = {key: value.clone() for key, value in transformer.state_dict().items()}
    model = lora.add_lora(CASES["sana"].adapt(transformer), peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"]))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(tmp_path)

    fresh = CASES["sana"].build()
    fresh.load_state_dict(stock_state)
    base = CASES["sana"].adapt(fresh)
    loaded = lora.load_lora(base, tmp_path)
    pipeline = _sana(base.transformer)
    pipeline.set_progress_bar_config(disable=True)
    kwargs = PIPELINES["SanaPipeline"].call_kwargs(torch.Generator().manual_seed(11))
    noise = torch.randn(BATCH, 4, 8, 8, generator=torch.Generator().manual_seed(12))
    latents = twinflow_pipeline(pipeline, steps=2)(
        **kwargs, latents=noise, output_type="latent", generator=torch.Generator().manual_seed(5)
    ).images
    cond = PIPELINES["SanaPipeline"].adapter_cond(kwargs)
    for sampled in (model, loaded):  # the trained model and the reloaded one
        expected = twinloss.AnyStepSampler(2)(sampled, noise, cond=cond, generator=torch.Generator().manual_seed(5)).sample
        assert_close(latents, expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("mode", ["few", "any", "multi"])
def test_a_bfloat16_pipeline_whose_timesteps_round_still_gets_each_steps_target_time(mode, monkeypatch):
    """Flux casts the timestep to the latents' dtype (999 becomes 1000 in bfloat16): the knot is still found."""
    case = PIPELINES["FluxPipeline"]
    torch.manual_seed(0)
    adapted = CASES["flux"].adapt(CASES["flux"].build())
    _move_twin_weights_off_zero(adapted)
    pipeline = case.build(adapted.transformer).to(torch.bfloat16)
    pipeline.set_progress_bar_config(disable=True)
    kwargs = {key: value.to(torch.bfloat16) if isinstance(value, Tensor) else value
              for key, value in case.call_kwargs(torch.Generator().manual_seed(11)).items()}
    seen = []
    record = adapted.injection.times
    monkeypatch.setattr(adapted.injection, "times", lambda t, r: seen.append((t.clone(), r.clone())) or record(t, r))

    generate = twinflow_pipeline(pipeline, steps=3, mode=mode, start_gap=0.001)
    latents = generate(**kwargs, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    knots = generate.scheduler.sigmas.tolist()  # [0.999, 0.666, 0.333, 0]
    assert latents.dtype == torch.bfloat16 and bool(torch.isfinite(latents).all()) and len(seen) == 3
    for k, (t, r) in enumerate(seen):
        assert float((t - knots[k]).abs().max()) < 4e-3  # the bfloat16-rounded current time
        expected = {"few": torch.zeros_like(t), "any": torch.full_like(t, knots[k + 1]), "multi": t}[mode]
        assert torch.equal(r, expected)
