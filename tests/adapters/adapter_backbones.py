"""Tiny random-weight builds of every supported backbone, with their stock calls.

Each :class:`BackboneCase` builds a stock diffusers transformer from a tiny
config, draws a latent and conditioning for a batch, and calls the stock
model exactly as its diffusers pipeline would (packing, ids, time units).
The adapter must reproduce that call at ``r = t``.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from twinloss_adapters.openuni import META_QUERIES
from twinloss_adapters.packing import pack_image_patches, pack_video_patches, patch_grid_ids, unpack_image_patches, unpack_video_patches

TEXT_LEN = 5


@dataclass(frozen=True)
class BackboneCase:
    name: str
    build: Callable[[], nn.Module]
    adapt: Callable[[nn.Module], nn.Module]
    latent_shape: tuple[int, ...]
    make_cond: Callable[[nn.Module, int, torch.Generator], dict[str, Tensor]]
    stock_call: Callable[[nn.Module, Tensor, Tensor, dict[str, Tensor]], Tensor]
    wrong_latent_shapes: tuple[tuple[int, ...], ...] = field(default=())
    module: str | None = None  # the twinloss_adapters module, when it is not ``name``
    native_target_time: bool = False  # the stock model embeds r itself (AnyFlow): the adapter adds only the sign

    @property
    def module_name(self) -> str:
        return self.module or self.name


def _randn(generator: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=generator)


def _text_mask(batch: int) -> Tensor:
    mask = torch.ones(batch, TEXT_LEN)
    mask[0, -2:] = 0  # padded text in the first row
    return mask


# --- SANA ---------------------------------------------------------------------


def build_sana() -> nn.Module:
    from diffusers import SanaTransformer2DModel

    return SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32,
        caption_channels=24, sample_size=8, patch_size=1,
    )


def adapt_sana(transformer: nn.Module) -> nn.Module:
    from twinloss_adapters import sana

    return sana.adapt(transformer)


def sana_cond(transformer: nn.Module, batch: int, generator: torch.Generator) -> dict[str, Tensor]:
    return {"encoder_hidden_states": _randn(generator, batch, TEXT_LEN, 24), "encoder_attention_mask": _text_mask(batch)}


def sana_stock(transformer: nn.Module, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
    return transformer(x, cond["encoder_hidden_states"], 1000 * t, encoder_attention_mask=cond["encoder_attention_mask"], return_dict=False)[0]


# --- OpenUni (SANA + the released connector, projector and meta queries) -------------------

LLM_WIDTH = 16
QUERIES = 4
OPENUNI_HEADS = 2


def openuni_checkpoint(
    *, num_layers: int = 1, intermediate: int = 24, caption_channels: int = 24, seed: int = 0,
    width: int = LLM_WIDTH, queries: int = QUERIES,
) -> dict[str, Tensor]:
    """A state dict with the released OpenUni key names and shapes (tiny widths by default), random values."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {META_QUERIES: (queries, width), "projector.weight": (caption_channels, width), "projector.bias": (caption_channels,)}
    for index in range(num_layers):
        layer = f"connector.layers.{index}."
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[f"{layer}{norm}.weight"] = shapes[f"{layer}{norm}.bias"] = (width,)
        for projection in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{layer}self_attn.{projection}.weight"] = (width, width)
            shapes[f"{layer}self_attn.{projection}.bias"] = (width,)
        shapes.update({
            f"{layer}mlp.fc1.weight": (intermediate, width), f"{layer}mlp.fc1.bias": (intermediate,),
            f"{layer}mlp.fc2.weight": (width, intermediate), f"{layer}mlp.fc2.bias": (width,),
        })
    return {key: torch.randn(*shape, generator=generator) / shape[-1] ** 0.5 for key, shape in shapes.items()}


def build_openuni() -> nn.Module:
    return build_sana()


def adapt_openuni(transformer: nn.Module) -> nn.Module:
    from twinloss_adapters import openuni

    return openuni.adapt(transformer, openuni_checkpoint(), num_heads=OPENUNI_HEADS)


def openuni_cond(transformer: nn.Module, batch: int, generator: torch.Generator) -> dict[str, Tensor]:
    return {"llm_hidden_states": _randn(generator, batch, QUERIES, LLM_WIDTH)}


# --- Qwen-Image ----------------------------------------------------------------


def build_qwen_image() -> nn.Module:
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(4, 6, 6),
    )


def adapt_qwen_image(transformer: nn.Module) -> nn.Module:
    from twinloss_adapters import qwen_image

    return qwen_image.adapt(transformer)


def qwen_image_cond(transformer: nn.Module, batch: int, generator: torch.Generator) -> dict[str, Tensor]:
    return {"encoder_hidden_states": _randn(generator, batch, TEXT_LEN, 24), "encoder_hidden_states_mask": _text_mask(batch)}


def qwen_image_stock(transformer: nn.Module, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
    batch, _, height, width = x.shape
    tokens = transformer(
        hidden_states=pack_image_patches(x, 2), encoder_hidden_states=cond["encoder_hidden_states"],
        encoder_hidden_states_mask=cond["encoder_hidden_states_mask"], timestep=t,
        img_shapes=[[(1, height // 2, width // 2)]] * batch, return_dict=False,
    )[0]
    return unpack_image_patches(tokens, height, width, 2)


# --- Flux -------------------------------------------------------------------------


def build_flux() -> nn.Module:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=12, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )


def adapt_flux(transformer: nn.Module) -> nn.Module:
    from twinloss_adapters import flux

    return flux.adapt(transformer)


def flux_cond(transformer: nn.Module, batch: int, generator: torch.Generator) -> dict[str, Tensor]:
    return {
        "encoder_hidden_states": _randn(generator, batch, TEXT_LEN, 24),
        "pooled_projections": _randn(generator, batch, 12),
        "guidance": torch.full((batch,), 3.5),
    }


def flux_stock(transformer: nn.Module, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
    _, _, height, width = x.shape
    tokens = transformer(
        hidden_states=pack_image_patches(x, 2), encoder_hidden_states=cond["encoder_hidden_states"],
        pooled_projections=cond["pooled_projections"], timestep=t,
        img_ids=patch_grid_ids(height // 2, width // 2, device=x.device, dtype=x.dtype),
        txt_ids=torch.zeros(TEXT_LEN, 3), guidance=cond["guidance"], return_dict=False,
    )[0]
    return unpack_image_patches(tokens, height, width, 2)


# --- SD3 --------------------------------------------------------------------------


def build_sd3() -> nn.Module:
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=32,
        pooled_projection_dim=12, out_channels=4, pos_embed_max_size=8,
    )


def adapt_sd3(transformer: nn.Module) -> nn.Module:
    from twinloss_adapters import sd3

    return sd3.adapt(transformer)


def sd3_cond(transformer: nn.Module, batch: int, generator: torch.Generator) -> dict[str, Tensor]:
    return {"encoder_hidden_states": _randn(generator, batch, TEXT_LEN, 24), "pooled_projections": _randn(generator, batch, 12)}


def sd3_stock(transformer: nn.Module, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
    return transformer(
        hidden_states=x, encoder_hidden_states=cond["encoder_hidden_states"],
        pooled_projections=cond["pooled_projections"], timestep=1000 * t, return_dict=False,
    )[0]


# --- Wan ----------------------------------------------------------------------------


def build_wan() -> nn.Module:
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=24, freq_dim=32, ffn_dim=32, num_layers=1, rope_max_seq_len=32,
    )


def adapt_wan(transformer: nn.Module) -> nn.Module:
    from twinloss_adapters import wan

    return wan.adapt(transformer)


def wan_cond(transformer: nn.Module, batch: int, generator: torch.Generator) -> dict[str, Tensor]:
    return {"encoder_hidden_states": _randn(generator, batch, TEXT_LEN, 24)}


def wan_stock(transformer: nn.Module, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
    return transformer(hidden_states=x, timestep=1000 * t, encoder_hidden_states=cond["encoder_hidden_states"], return_dict=False)[0]


# --- LTX-Video ------------------------------------------------------------------------


def build_ltx_video() -> nn.Module:
    from diffusers import LTXVideoTransformer3DModel

    return LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2,
        attention_head_dim=12, cross_attention_dim=24, num_layers=1, caption_channels=24,
    )


def adapt_ltx_video(transformer: nn.Module) -> nn.Module:
    from twinloss_adapters import ltx_video

    return ltx_video.adapt(transformer)


def ltx_video_cond(transformer: nn.Module, batch: int, generator: torch.Generator) -> dict[str, Tensor]:
    return {"encoder_hidden_states": _randn(generator, batch, TEXT_LEN, 24), "encoder_attention_mask": _text_mask(batch)}


def ltx_video_stock(transformer: nn.Module, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
    _, _, frames, height, width = x.shape
    tokens = transformer(
        hidden_states=pack_video_patches(x), encoder_hidden_states=cond["encoder_hidden_states"],
        timestep=1000 * t, encoder_attention_mask=cond["encoder_attention_mask"],
        num_frames=frames, height=height, width=width, rope_interpolation_scale=(8 / 25, 32.0, 32.0),
        return_dict=False,
    )[0]
    return unpack_video_patches(tokens, frames, height, width)


# --- HunyuanVideo ----------------------------------------------------------------------


def build_hunyuan_video() -> nn.Module:
    from diffusers import HunyuanVideoTransformer3DModel

    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=24, pooled_projection_dim=12, rope_axes_dim=(2, 4, 4),
    )


def adapt_hunyuan_video(transformer: nn.Module) -> nn.Module:
    from twinloss_adapters import hunyuan_video

    return hunyuan_video.adapt(transformer)


def hunyuan_video_cond(transformer: nn.Module, batch: int, generator: torch.Generator) -> dict[str, Tensor]:
    return {
        "encoder_hidden_states": _randn(generator, batch, TEXT_LEN, 24), "encoder_attention_mask": _text_mask(batch),
        "pooled_projections": _randn(generator, batch, 12), "guidance": torch.full((batch,), 6.0),
    }


def hunyuan_video_stock(transformer: nn.Module, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
    return transformer(
        hidden_states=x, timestep=1000 * t, encoder_hidden_states=cond["encoder_hidden_states"],
        encoder_attention_mask=cond["encoder_attention_mask"], pooled_projections=cond["pooled_projections"],
        guidance=1000 * cond["guidance"], return_dict=False,
    )[0]


# --- Lumina2 ------------------------------------------------------------------------------


def build_lumina2() -> nn.Module:
    from diffusers import Lumina2Transformer2DModel

    return Lumina2Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=1, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(4, 6, 6), axes_lens=(16, 16, 16),
        cap_feat_dim=24,
    )


def adapt_lumina2(transformer: nn.Module) -> nn.Module:
    from twinloss_adapters import lumina2

    return lumina2.adapt(transformer)


def lumina2_cond(transformer: nn.Module, batch: int, generator: torch.Generator) -> dict[str, Tensor]:
    return {"encoder_hidden_states": _randn(generator, batch, TEXT_LEN, 24), "encoder_attention_mask": _text_mask(batch).long()}


def lumina2_stock(transformer: nn.Module, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
    # Lumina2Pipeline: timestep = 1 - sigma, and it negates the prediction.
    return -transformer(
        hidden_states=x, timestep=1 - t, encoder_hidden_states=cond["encoder_hidden_states"],
        encoder_attention_mask=cond["encoder_attention_mask"], return_dict=False,
    )[0]


# --- HiDream -------------------------------------------------------------------------------

HIDREAM_LLAMA_LAYERS = 3


def build_hidream() -> nn.Module:
    from diffusers import HiDreamImageTransformer2DModel

    return HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        caption_channels=[24, 16], text_emb_dim=12, num_routed_experts=2, num_activated_experts=1,
        axes_dims_rope=(8, 4, 4), max_resolution=(8, 8), llama_layers=[0, 2],
    )


def adapt_hidream(transformer: nn.Module) -> nn.Module:
    from twinloss_adapters import hidream

    return hidream.adapt(transformer)


def hidream_cond(transformer: nn.Module, batch: int, generator: torch.Generator) -> dict[str, Tensor]:
    return {
        "encoder_hidden_states_t5": _randn(generator, batch, TEXT_LEN, 24),
        "encoder_hidden_states_llama3": _randn(generator, batch, HIDREAM_LLAMA_LAYERS, TEXT_LEN, 16),
        "pooled_embeds": _randn(generator, batch, 12),
    }


def hidream_stock(transformer: nn.Module, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
    """HiDreamImagePipeline's call (Llama layers stacked first, prediction negated), read in eval mode."""
    was_training = transformer.training
    transformer.eval()  # the pipeline's layout; the training-mode layout is checked in test_new_backbones.py
    try:
        return -transformer(
            hidden_states=x, timesteps=1000 * t, encoder_hidden_states_t5=cond["encoder_hidden_states_t5"],
            encoder_hidden_states_llama3=cond["encoder_hidden_states_llama3"].movedim(1, 0),
            pooled_embeds=cond["pooled_embeds"], return_dict=False,
        )[0]
    finally:
        transformer.train(was_training)


# --- FLUX.2 ----------------------------------------------------------------------------------


def build_flux2() -> nn.Module:
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=24, timestep_guidance_channels=32, mlp_ratio=2.0, axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=True,
    )


def adapt_flux2(transformer: nn.Module) -> nn.Module:
    from twinloss_adapters import flux2

    return flux2.adapt(transformer)


def flux2_cond(transformer: nn.Module, batch: int, generator: torch.Generator) -> dict[str, Tensor]:
    return {"encoder_hidden_states": _randn(generator, batch, TEXT_LEN, 24), "guidance": torch.full((batch,), 4.0)}


def flux2_stock(transformer: nn.Module, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
    """Flux2Pipeline's call, with the pipeline's own packing and id helpers."""
    from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

    latent_ids = Flux2Pipeline._prepare_latent_ids(x)
    tokens = transformer(
        hidden_states=Flux2Pipeline._pack_latents(x), timestep=t, guidance=cond["guidance"],
        encoder_hidden_states=cond["encoder_hidden_states"],
        txt_ids=Flux2Pipeline._prepare_text_ids(cond["encoder_hidden_states"]), img_ids=latent_ids, return_dict=False,
    )[0]
    return Flux2Pipeline._unpack_latents_with_ids(tokens, latent_ids)


# --- Chroma (per-slot modulation) ------------------------------------------------------------


def build_chroma() -> nn.Module:
    from diffusers import ChromaTransformer2DModel

    return ChromaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=24, axes_dims_rope=(4, 6, 6), approximator_num_channels=16, approximator_hidden_dim=32,
        approximator_layers=1,
    )


def adapt_chroma(transformer: nn.Module) -> nn.Module:
    from twinloss_adapters import chroma

    return chroma.adapt(transformer)


def chroma_cond(transformer: nn.Module, batch: int, generator: torch.Generator) -> dict[str, Tensor]:
    return {"encoder_hidden_states": _randn(generator, batch, TEXT_LEN, 24), "attention_mask": _text_mask(batch)}


def chroma_stock(transformer: nn.Module, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
    """ChromaPipeline's call, with the pipeline's own packing, id and mask helpers."""
    from diffusers.pipelines.chroma.pipeline_chroma import ChromaPipeline

    batch, channels, height, width = x.shape
    image_tokens = (height // 2) * (width // 2)
    tokens = transformer(
        hidden_states=ChromaPipeline._pack_latents(x, batch, channels, height, width), timestep=t,
        encoder_hidden_states=cond["encoder_hidden_states"], txt_ids=torch.zeros(TEXT_LEN, 3),
        img_ids=ChromaPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, x.device, x.dtype),
        attention_mask=ChromaPipeline._prepare_attention_mask(None, batch, image_tokens, x.dtype, cond["attention_mask"]),
        return_dict=False,
    )[0]
    return ChromaPipeline._unpack_latents(tokens, height, width, 1)


# --- AnyFlow (native flow map: r is the model's own input) ----------------------------------------


def build_anyflow() -> nn.Module:
    from diffusers import AnyFlowTransformer3DModel

    return AnyFlowTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=24, freq_dim=32, ffn_dim=32, num_layers=1, rope_max_seq_len=32,
    )


def adapt_anyflow(transformer: nn.Module) -> nn.Module:
    from twinloss_adapters import anyflow

    return anyflow.adapt(transformer)


def anyflow_stock(transformer: nn.Module, x: Tensor, t: Tensor, cond: dict[str, Tensor], r: Tensor | None = None) -> Tensor:
    """AnyFlowPipeline's call: frames first, per-frame source and target timesteps in [0, 1000]."""
    r = t if r is None else r
    frames = x.shape[2]
    velocity = transformer(
        hidden_states=x.permute(0, 2, 1, 3, 4), timestep=(1000 * t)[:, None].repeat(1, frames),
        r_timestep=(1000 * r)[:, None].repeat(1, frames), encoder_hidden_states=cond["encoder_hidden_states"],
        return_dict=False,
    )[0]
    return velocity.permute(0, 2, 1, 3, 4)


# --- ACE-Step (audio, native mean-flow r input) ----------------------------------------------------

ACE_STEP_FRAMES = 9  # odd: the stock class pads to its patch size 2 and crops back


def build_ace_step() -> nn.Module:
    from diffusers import AceStepTransformer1DModel

    return AceStepTransformer1DModel(
        hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, in_channels=24, audio_acoustic_hidden_dim=8, patch_size=2, sliding_window=4, encoder_hidden_size=24,
    )


def adapt_ace_step(transformer: nn.Module) -> nn.Module:
    from twinloss_adapters import ace_step

    return ace_step.adapt(transformer)


def ace_step_cond(transformer: nn.Module, batch: int, generator: torch.Generator) -> dict[str, Tensor]:
    return {
        "encoder_hidden_states": _randn(generator, batch, TEXT_LEN, 24),
        "context_latents": _randn(generator, batch, ACE_STEP_FRAMES, 16),
    }


def ace_step_stock(transformer: nn.Module, x: Tensor, t: Tensor, cond: dict[str, Tensor], r: Tensor | None = None) -> Tensor:
    """AceStepPipeline's call: timestep and timestep_r in [0, 1] (equal in the pipeline)."""
    return transformer(
        hidden_states=x, timestep=t, timestep_r=t if r is None else r, encoder_hidden_states=cond["encoder_hidden_states"],
        context_latents=cond["context_latents"], return_dict=False,
    )[0]


# --- HunyuanVideo 1.5 (text- and image-to-video; the mean-flow variant takes r itself) ---------------

HUNYUAN_VIDEO15_VISION_TOKENS = 3


def build_hunyuan_video15(use_meanflow: bool = False) -> nn.Module:
    from diffusers import HunyuanVideo15Transformer3DModel

    return HunyuanVideo15Transformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1, num_refiner_layers=1,
        mlp_ratio=2.0, text_embed_dim=24, text_embed_2_dim=12, image_embed_dim=12, rope_axes_dim=(4, 6, 6),
        use_meanflow=use_meanflow,
    )


def adapt_hunyuan_video15(transformer: nn.Module) -> nn.Module:
    from twinloss_adapters import hunyuan_video15

    return hunyuan_video15.adapt(transformer, vision_tokens=HUNYUAN_VIDEO15_VISION_TOKENS)


def hunyuan_video15_cond(transformer: nn.Module, batch: int, generator: torch.Generator) -> dict[str, Tensor]:
    return {
        "encoder_hidden_states": _randn(generator, batch, TEXT_LEN, 24), "encoder_attention_mask": _text_mask(batch),
        "encoder_hidden_states_2": _randn(generator, batch, 4, 12),
    }


def hunyuan_video15_stock(
    transformer: nn.Module, x: Tensor, t: Tensor, cond: dict[str, Tensor], r: Tensor | None = None
) -> Tensor:
    """HunyuanVideo15Pipeline's text-to-video call: zero condition latents, mask and image embeddings."""
    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import (
        HunyuanVideo15Pipeline,
    )

    batch = x.shape[0]
    condition, mask = HunyuanVideo15Pipeline.prepare_cond_latents_and_mask(None, x, x.dtype, x.device)
    return transformer(
        hidden_states=torch.cat([x, condition, mask], dim=1), timestep=1000 * t,
        timestep_r=None if r is None else 1000 * r,
        encoder_hidden_states=cond["encoder_hidden_states"], encoder_attention_mask=cond["encoder_attention_mask"],
        encoder_hidden_states_2=cond["encoder_hidden_states_2"],
        encoder_attention_mask_2=torch.ones(batch, cond["encoder_hidden_states_2"].shape[1]),
        image_embeds=torch.zeros(batch, HUNYUAN_VIDEO15_VISION_TOKENS, 12), return_dict=False,
    )[0]


# --- FLUX.1 Kontext (reference-image tokens) -------------------------------------------------------


def adapt_flux_kontext(transformer: nn.Module) -> nn.Module:
    from twinloss_adapters import flux_kontext

    return flux_kontext.adapt(transformer)


def flux_kontext_cond(transformer: nn.Module, batch: int, generator: torch.Generator) -> dict[str, Tensor]:
    return {**flux_cond(transformer, batch, generator), "image_latents": _randn(generator, batch, 4, 4, 8)}


def flux_kontext_stock(transformer: nn.Module, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
    """FluxKontextPipeline's call, with the pipeline's own packing and id helpers."""
    from diffusers.pipelines.flux.pipeline_flux_kontext import FluxKontextPipeline

    batch, channels, height, width = x.shape
    image = cond["image_latents"]
    image_ids = FluxKontextPipeline._prepare_latent_image_ids(batch, image.shape[2] // 2, image.shape[3] // 2, x.device, x.dtype)
    image_ids[..., 0] = 1
    latent_ids = FluxKontextPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, x.device, x.dtype)
    tokens = FluxKontextPipeline._pack_latents(x, batch, channels, height, width)
    image_tokens = FluxKontextPipeline._pack_latents(image, batch, channels, image.shape[2], image.shape[3])
    output = transformer(
        hidden_states=torch.cat([tokens, image_tokens], dim=1), timestep=t, guidance=cond["guidance"],
        pooled_projections=cond["pooled_projections"], encoder_hidden_states=cond["encoder_hidden_states"],
        txt_ids=torch.zeros(TEXT_LEN, 3), img_ids=torch.cat([latent_ids, image_ids], dim=0), return_dict=False,
    )[0]
    return FluxKontextPipeline._unpack_latents(output[:, : tokens.shape[1]], height, width, 1)


# --- HunyuanVideo image-to-video (latent_concat) -----------------------------------------------------


def build_hunyuan_video_i2v() -> nn.Module:
    from diffusers import HunyuanVideoTransformer3DModel

    return HunyuanVideoTransformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=24, pooled_projection_dim=12, rope_axes_dim=(2, 4, 4), image_condition_type="latent_concat",
    )


def adapt_hunyuan_video_i2v(transformer: nn.Module) -> nn.Module:
    from twinloss_adapters import hunyuan_video_i2v

    return hunyuan_video_i2v.adapt(transformer)


def hunyuan_video_i2v_cond(transformer: nn.Module, batch: int, generator: torch.Generator) -> dict[str, Tensor]:
    """Text inputs plus HunyuanVideoImageToVideoPipeline's condition: image latent and mask in frame 0."""
    image = torch.zeros(batch, 4, 2, 4, 4)
    image[:, :, :1] = _randn(generator, batch, 4, 1, 4, 4)
    mask = torch.zeros(batch, 1, 2, 4, 4)
    mask[:, :, 0] = 1.0
    return {**hunyuan_video_cond(transformer, batch, generator), "latent_condition": torch.cat([image, mask], dim=1)}


def hunyuan_video_i2v_stock(transformer: nn.Module, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
    return hunyuan_video_stock(transformer, torch.cat([x, cond["latent_condition"]], dim=1), t, cond)


# --- LTX-2 (joint video + audio tokens) ------------------------------------------------------------

LTX2_VIDEO_GRID = (2, 2, 2)  # latent frames, height, width
LTX2_AUDIO_LENGTH = 3


def build_ltx2() -> nn.Module:
    from diffusers import LTX2VideoTransformer3DModel

    return LTX2VideoTransformer3DModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        audio_in_channels=8, audio_out_channels=8, audio_num_attention_heads=2, audio_attention_head_dim=4,
        audio_cross_attention_dim=8, num_layers=1, caption_channels=12,
    )


def adapt_ltx2(transformer: nn.Module) -> nn.Module:
    from twinloss_adapters import ltx2

    return ltx2.adapt(transformer)


def ltx2_cond(transformer: nn.Module, batch: int, generator: torch.Generator) -> dict[str, Tensor]:
    frames, height, width = LTX2_VIDEO_GRID
    return {
        "encoder_hidden_states": _randn(generator, batch, TEXT_LEN, 12),
        "audio_encoder_hidden_states": _randn(generator, batch, TEXT_LEN, 12),
        "encoder_attention_mask": _text_mask(batch),
        # LTX2Pipeline's coordinates, built by the model's own rotary helpers.
        "video_coords": transformer.rope.prepare_video_coords(batch, frames, height, width, torch.device("cpu"), fps=24.0),
        "audio_coords": transformer.audio_rope.prepare_audio_coords(batch, LTX2_AUDIO_LENGTH, torch.device("cpu")),
    }


def ltx2_stock(transformer: nn.Module, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
    """LTX2Pipeline's call on the video tokens and the audio tokens of the joint sequence."""
    frames, height, width = LTX2_VIDEO_GRID
    video_tokens = frames * height * width
    video, audio = transformer(
        hidden_states=x[:, :video_tokens], audio_hidden_states=x[:, video_tokens:],
        encoder_hidden_states=cond["encoder_hidden_states"], audio_encoder_hidden_states=cond["audio_encoder_hidden_states"],
        timestep=1000 * t, sigma=1000 * t, encoder_attention_mask=cond["encoder_attention_mask"],
        audio_encoder_attention_mask=cond["encoder_attention_mask"], num_frames=frames, height=height, width=width,
        fps=24.0, audio_num_frames=LTX2_AUDIO_LENGTH, use_cross_timestep=True, return_dict=False,
    )
    return torch.cat([video, audio], dim=1)


CASES = {
    "sana": BackboneCase("sana", build_sana, adapt_sana, (4, 8, 8), sana_cond, sana_stock, ((4, 8), (3, 8, 8))),
    "openuni": BackboneCase("openuni", build_openuni, adapt_openuni, (4, 8, 8), openuni_cond, None, ((4, 8), (3, 8, 8))),
    "qwen_image": BackboneCase(
        "qwen_image", build_qwen_image, adapt_qwen_image, (4, 8, 8), qwen_image_cond, qwen_image_stock,
        ((16, 8), (4, 7, 8), (16, 4, 4)),
    ),
    "flux": BackboneCase("flux", build_flux, adapt_flux, (4, 8, 8), flux_cond, flux_stock, ((4, 7, 8), (16, 4, 4))),
    "sd3": BackboneCase("sd3", build_sd3, adapt_sd3, (4, 8, 8), sd3_cond, sd3_stock, ((4, 7, 8), (4, 34, 34), (2, 8, 8))),
    "wan": BackboneCase("wan", build_wan, adapt_wan, (4, 2, 4, 4), wan_cond, wan_stock, ((4, 4, 4), (4, 2, 3, 4))),
    "ltx_video": BackboneCase(
        "ltx_video", build_ltx_video, adapt_ltx_video, (4, 2, 4, 4), ltx_video_cond, ltx_video_stock, ((4, 4, 4), (3, 2, 4, 4))
    ),
    "hunyuan_video": BackboneCase(
        "hunyuan_video", build_hunyuan_video, adapt_hunyuan_video, (4, 2, 4, 4), hunyuan_video_cond, hunyuan_video_stock,
        ((4, 4, 4), (3, 2, 4, 4)),
    ),
}


# --- Z-Image ------------------------------------------------------------------------------


def build_z_image() -> nn.Module:
    from diffusers import ZImageTransformer2DModel

    return ZImageTransformer2DModel(
        in_channels=4, dim=32, n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=24,
        axes_dims=[4, 6, 6], axes_lens=[64, 32, 32],
    )


def adapt_z_image(transformer: nn.Module) -> nn.Module:
    from twinloss_adapters import z_image

    return z_image.adapt(transformer)


def z_image_cond(transformer: nn.Module, batch: int, generator: torch.Generator) -> dict[str, Tensor]:
    return {"encoder_hidden_states": _randn(generator, batch, TEXT_LEN, 24), "encoder_attention_mask": _text_mask(batch)}


def z_image_stock(transformer: nn.Module, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
    """ZImagePipeline's call: lists of latents and kept caption tokens, timestep 1 - t, output negated."""
    captions = [row[keep.bool()] for row, keep in zip(cond["encoder_hidden_states"], cond["encoder_attention_mask"], strict=True)]
    outputs = transformer(list(x.unsqueeze(2).unbind(0)), 1 - t, captions, return_dict=False)[0]
    return -torch.stack(outputs).squeeze(2)


CASES["z_image"] = BackboneCase(
    "z_image", build_z_image, adapt_z_image, (4, 8, 8), z_image_cond, z_image_stock, ((4, 8), (3, 8, 8), (4, 7, 8))
)


# --- persistence: the module arguments a loader must be given (their architecture, not their weights) ---


def module_arguments(name: str) -> dict[str, nn.Module]:
    """Keyword arguments ``AdapterClass.from_pretrained`` needs besides the path (OpenUni: connector and projector)."""
    if name == "openuni":
        adapted = adapt_openuni(build_openuni())
        return {"connector": adapted.connector, "projector": adapted.projector}
    return {}


# --- Qwen-Image-Edit (reference-image tokens after the target's) -----------------------------------

REFERENCE_SHAPE = (4, 4, 8)  # a reference of another size than the target: its own img_shapes entry


def adapt_qwen_image_edit(transformer: nn.Module) -> nn.Module:
    from twinloss_adapters import qwen_image_edit

    return qwen_image_edit.adapt(transformer)


def qwen_image_edit_cond(transformer: nn.Module, batch: int, generator: torch.Generator) -> dict[str, Tensor]:
    return {**qwen_image_cond(transformer, batch, generator), "reference_latents": _randn(generator, batch, *REFERENCE_SHAPE)}


def qwen_image_edit_stock(transformer: nn.Module, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
    """QwenImageEditPlusPipeline's call (its own packing helpers), one or more references, output truncated."""
    from diffusers import QwenImageEditPlusPipeline as Pipeline

    batch, channels, height, width = x.shape
    references = [cond[key] for key in ("reference_latents", "reference_latents_2", "reference_latents_3") if key in cond]
    latents = Pipeline._pack_latents(x, batch, channels, height, width)
    packed = [Pipeline._pack_latents(ref, batch, channels, ref.shape[2], ref.shape[3]) for ref in references]
    img_shapes = [[(1, height // 2, width // 2), *[(1, ref.shape[2] // 2, ref.shape[3] // 2) for ref in references]]] * batch
    noise_pred = transformer(
        hidden_states=torch.cat([latents, *packed], dim=1), timestep=t, guidance=None,
        encoder_hidden_states_mask=cond.get("encoder_hidden_states_mask"), encoder_hidden_states=cond["encoder_hidden_states"],
        img_shapes=img_shapes, return_dict=False,
    )[0]
    noise_pred = noise_pred[:, : latents.size(1)]
    return Pipeline._unpack_latents(noise_pred, height * 8, width * 8, 8).squeeze(2)


CASES["qwen_image_edit"] = BackboneCase(
    "qwen_image_edit", build_qwen_image, adapt_qwen_image_edit, (4, 8, 8), qwen_image_edit_cond, qwen_image_edit_stock,
    ((16, 8), (4, 7, 8), (16, 4, 4)),
)


# --- SANA-Sprint (guidance_embeds=True: timestep in [0, 1], guidance x guidance_embeds_scale) ---------


def build_sana_sprint() -> nn.Module:
    from diffusers import SanaTransformer2DModel

    return SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=24,
        sample_size=8, guidance_embeds=True, qk_norm="rms_norm_across_heads", timestep_scale=1000.0,
    )


def sana_sprint_cond(transformer: nn.Module, batch: int, generator: torch.Generator) -> dict[str, Tensor]:
    return {**sana_cond(transformer, batch, generator), "guidance": torch.full((batch,), 4.5)}


def sana_sprint_stock(transformer: nn.Module, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
    """SanaSprintPipeline's call: the flow time itself, guidance_scale * guidance_embeds_scale."""
    return transformer(
        x, encoder_hidden_states=cond["encoder_hidden_states"], encoder_attention_mask=cond["encoder_attention_mask"],
        guidance=cond["guidance"] * transformer.config.guidance_embeds_scale, timestep=t, return_dict=False,
    )[0]


CASES["sana_sprint"] = BackboneCase(
    "sana_sprint", build_sana_sprint, adapt_sana, (4, 8, 8), sana_sprint_cond, sana_sprint_stock, ((4, 8), (3, 8, 8)),
    module="sana",
)


# --- the new backbones (backbones-new): definitions above, registered here ---

CASES["lumina2"] = BackboneCase(
    "lumina2", build_lumina2, adapt_lumina2, (4, 8, 8), lumina2_cond, lumina2_stock, ((4, 7, 8), (3, 8, 8), (4, 8))
)
CASES["hidream"] = BackboneCase(
    "hidream", build_hidream, adapt_hidream, (4, 8, 8), hidream_cond, hidream_stock, ((4, 7, 8), (3, 8, 8), (4, 10, 10))
)
CASES["flux2"] = BackboneCase("flux2", build_flux2, adapt_flux2, (8, 4, 4), flux2_cond, flux2_stock, ((4, 4, 4), (8, 4)))
CASES["chroma"] = BackboneCase("chroma", build_chroma, adapt_chroma, (4, 8, 8), chroma_cond, chroma_stock, ((4, 7, 8), (16, 4, 4)))
CASES["anyflow"] = BackboneCase(
    "anyflow", build_anyflow, adapt_anyflow, (4, 2, 4, 4), wan_cond, anyflow_stock, ((4, 4, 4), (4, 2, 3, 4)),
    native_target_time=True,
)
CASES["ace_step"] = BackboneCase(
    "ace_step", build_ace_step, adapt_ace_step, (ACE_STEP_FRAMES, 8), ace_step_cond, ace_step_stock,
    ((ACE_STEP_FRAMES, 7), (2, ACE_STEP_FRAMES, 8)), native_target_time=True,
)
CASES["hunyuan_video15"] = BackboneCase(
    "hunyuan_video15", build_hunyuan_video15, adapt_hunyuan_video15, (4, 2, 4, 4), hunyuan_video15_cond,
    hunyuan_video15_stock, ((4, 4, 4), (3, 2, 4, 4)),
)
CASES["flux_kontext"] = BackboneCase(
    "flux_kontext", build_flux, adapt_flux_kontext, (4, 8, 8), flux_kontext_cond, flux_kontext_stock,
    ((4, 7, 8), (16, 4, 4)),
)
CASES["hunyuan_video_i2v"] = BackboneCase(
    "hunyuan_video_i2v", build_hunyuan_video_i2v, adapt_hunyuan_video_i2v, (4, 2, 4, 4), hunyuan_video_i2v_cond,
    hunyuan_video_i2v_stock, ((4, 4, 4), (9, 2, 4, 4)),
)
CASES["ltx2"] = BackboneCase(
    "ltx2", build_ltx2, adapt_ltx2, (8 + LTX2_AUDIO_LENGTH, 8), ltx2_cond, ltx2_stock, ((11, 7), (2, 11, 8), (12, 8)),
)


# --- Wan 2.2 TI2V 5B (expand_timesteps: per-token timesteps, the first frame replaced by the image's latent) ---


def adapt_wan_ti2v(transformer: nn.Module) -> nn.Module:
    from twinloss_adapters import wan_ti2v

    return wan_ti2v.adapt(transformer)


def wan_ti2v_cond(transformer: nn.Module, batch: int, generator: torch.Generator) -> dict[str, Tensor]:
    return {**wan_cond(transformer, batch, generator), "first_frame_latent": _randn(generator, batch, 4, 1, 4, 4)}


def wan_ti2v_pipeline_call(transformer: nn.Module, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
    """WanImageToVideoPipeline's denoising-loop call with expand_timesteps=True, each row at its timestep ``1000 t``."""
    first_frame_mask = torch.ones(1, 1, *x.shape[2:], dtype=torch.float32)
    first_frame_mask[:, :, 0] = 0
    latent_model_input = (1 - first_frame_mask) * cond["first_frame_latent"] + first_frame_mask * x
    # The pipeline's temp_ts = (first_frame_mask[0][0][:, ::2, ::2] * t).flatten(), here with one t per row.
    timestep = first_frame_mask[0][0][:, ::2, ::2].flatten()[None, :] * (1000 * t)[:, None]
    return transformer(
        hidden_states=latent_model_input, timestep=timestep, encoder_hidden_states=cond["encoder_hidden_states"],
        return_dict=False,
    )[0]


def wan_ti2v_stock(transformer: nn.Module, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
    """The pipeline's call; on the conditioned first frame, which the pipeline holds at the image ``x_c``, the
    protocol's velocity along the line from ``x_c`` through ``x``: ``(x - x_c) / t``."""
    prediction = wan_ti2v_pipeline_call(transformer, x, t, cond)
    prediction[:, :, :1] = (x[:, :, :1] - cond["first_frame_latent"]) / t.view(-1, 1, 1, 1, 1)
    return prediction


CASES["wan_ti2v"] = BackboneCase(
    "wan_ti2v", build_wan, adapt_wan_ti2v, (4, 2, 4, 4), wan_ti2v_cond, wan_ti2v_stock, ((4, 4, 4), (4, 2, 3, 4)),
)


# --- LTX-Video conditioning (LTXConditionPipeline: per-token timesteps, the first frames replaced by a condition) ---


def adapt_ltx_condition(transformer: nn.Module) -> nn.Module:
    from twinloss_adapters import ltx_condition

    return ltx_condition.adapt(transformer)


KEYFRAME_INDEX = 9
"""The pixel frame of the generic case's keyframe (latent frame 2's first pixel frame)."""


def ltx_condition_cond(transformer: nn.Module, batch: int, generator: torch.Generator) -> dict[str, Tensor]:
    """A strength-1 condition at frame 0 and a keyframe at pixel frame :data:`KEYFRAME_INDEX`."""
    return {
        **ltx_video_cond(transformer, batch, generator), "condition_latent": _randn(generator, batch, 4, 1, 4, 4),
        "keyframe_latents": _randn(generator, batch, 4, 1, 4, 4),
        "keyframe_frames": torch.full((batch, 1), float(KEYFRAME_INDEX)),
    }


def ltx_condition_pipeline_call(
    transformer: nn.Module, x: Tensor, t: Tensor, cond: dict[str, Tensor], keyframes: tuple[tuple[Tensor, int], ...] = (),
    strength: Tensor | None = None, video: tuple[Tensor, int] | None = None,
) -> Tensor:
    """LTXConditionPipeline's denoising-loop call (its own helpers, its prepare_latents steps written out).

    Each row at its timestep ``1000 t``; ``cond['condition_latent']`` is a condition at frame index 0, and
    each ``(latent [B, C, 1, H, W], frame_index)`` of ``keyframes`` a strength-1 image condition at that
    later frame index, whose tokens the pipeline prepends and whose prediction it drops. Without either,
    the pipeline's text-to-video call. At strength 1 (``strength=None``) the condition replaces its frames
    of ``x``, as prepare_latents leaves them for the whole loop; with ``strength`` ``[B]`` ``x`` is the
    loop's latents as they stand, the conditioned frames included. ``video`` is ``(latent [B, C, n, H, W],
    frame_index)``, a strength-1 video condition at a later frame index, prepended after the keyframes:
    its first two latent frames go before the video's tokens, the rest replace latent frames from
    ``frame_index // 8 + 2`` on.
    """
    from diffusers import LTXConditionPipeline as Pipeline

    batch, _, frames, height, width = x.shape
    latents = x.clone()
    frames_mask = torch.zeros(batch, frames)
    condition = cond.get("condition_latent")
    if condition is not None:
        conditioned = condition.shape[2]
        if strength is None:
            latents[:, :, :conditioned] = torch.lerp(latents[:, :, :conditioned], condition, 1.0)
        frames_mask[:, :conditioned] = 1.0 if strength is None else strength[:, None]
    extra_latents, extra_ids, extra_masks = [], [], []
    for keyframe, frame_index in keyframes:
        keyframe = torch.lerp(torch.randn_like(keyframe), keyframe, 1.0)  # the pipeline blends noise at strength 1
        ids = Pipeline._prepare_video_ids(batch, keyframe.shape[2], height, width)
        extra_ids.append(Pipeline._scale_video_ids(ids, scale_factor=32, scale_factor_t=8, frame_index=frame_index))
        extra_latents.append(Pipeline._pack_latents(keyframe))
        extra_masks.append(torch.full(extra_latents[-1].shape[:2], 1.0))
    if video is not None:  # prepare_latents' branch for a video at frame_index > 0, num_prefix_latent_frames 2
        latent, frame_index = video
        if latent.shape[2] > 2:
            start_frame = frame_index // 8 + 2
            end_frame = start_frame + latent.shape[2] - 2
            latents[:, :, start_frame:end_frame] = torch.lerp(latents[:, :, start_frame:end_frame], latent[:, :, 2:], 1.0)
            frames_mask[:, start_frame:end_frame] = 1.0
        prefix = torch.lerp(torch.randn_like(latent[:, :, :2]), latent[:, :, :2], 1.0)
        ids = Pipeline._prepare_video_ids(batch, 2, height, width)
        extra_ids.append(Pipeline._scale_video_ids(ids, scale_factor=32, scale_factor_t=8, frame_index=frame_index))
        extra_latents.append(Pipeline._pack_latents(prefix))
        extra_masks.append(torch.full(extra_latents[-1].shape[:2], 1.0))
    video_ids = Pipeline._prepare_video_ids(batch, frames, height, width)
    conditioning_mask = frames_mask.gather(1, video_ids[:, 0])
    video_ids = Pipeline._scale_video_ids(video_ids, scale_factor=32, scale_factor_t=8, frame_index=0)
    tokens = torch.cat([*extra_latents, Pipeline._pack_latents(latents)], dim=1)
    video_coords = torch.cat([*extra_ids, video_ids], dim=2).float()
    conditioning_mask = torch.cat([*extra_masks, conditioning_mask], dim=1)
    video_coords[:, 0] = video_coords[:, 0] * (1.0 / 25)
    timestep = (1000 * t)[:, None].float()
    if condition is not None or keyframes or video is not None:
        timestep = torch.min(timestep, (1 - conditioning_mask) * 1000.0)
    tokens = transformer(
        hidden_states=tokens, encoder_hidden_states=cond["encoder_hidden_states"],
        timestep=timestep, encoder_attention_mask=cond["encoder_attention_mask"], video_coords=video_coords,
        return_dict=False,
    )[0]
    prepended = sum(latent.shape[1] for latent in extra_latents)
    return Pipeline._unpack_latents(tokens[:, prepended:], frames, height, width)


def ltx_condition_stock(transformer: nn.Module, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
    """The pipeline's call; on the strength-1 conditioned frames, which the pipeline holds at the condition ``x_c``,
    the protocol's velocity along the line from ``x_c`` through ``x``: ``(x - x_c) / t``."""
    keyframes = ()
    if "keyframe_latents" in cond:
        frames = cond["keyframe_frames"]
        assert bool((frames == frames[0, 0]).all()), "the pipeline takes one frame index per condition"
        latents = cond["keyframe_latents"]
        keyframes = tuple((latents[:, :, k : k + 1], int(frames[0, k])) for k in range(latents.shape[2]))
    cond = {key: value for key, value in cond.items() if key not in ("keyframe_latents", "keyframe_frames")}
    prediction = ltx_condition_pipeline_call(transformer, x, t, cond, keyframes)
    if "condition_latent" in cond:
        condition = cond["condition_latent"]
        prediction[:, :, : condition.shape[2]] = (x[:, :, : condition.shape[2]] - condition) / t.view(-1, 1, 1, 1, 1)
    return prediction


CASES["ltx_condition"] = BackboneCase(
    "ltx_condition", build_ltx_video, adapt_ltx_condition, (4, 2, 4, 4), ltx_condition_cond, ltx_condition_stock,
    ((4, 4, 4), (3, 2, 4, 4)),
)


# --- Stable Audio (v-prediction on the cosine path; the timestep embedding on a prepended global token) ---

STABLE_AUDIO_GLOBAL_WIDTH = 12


def build_stable_audio() -> nn.Module:
    from diffusers import StableAudioDiTModel

    return StableAudioDiTModel(
        sample_size=8, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        num_key_value_attention_heads=1, cross_attention_dim=16, time_proj_dim=16,
        global_states_input_dim=STABLE_AUDIO_GLOBAL_WIDTH, cross_attention_input_dim=24,
    )


def adapt_stable_audio(transformer: nn.Module) -> nn.Module:
    from twinloss_adapters import stable_audio

    return stable_audio.adapt(transformer)


def stable_audio_cond(transformer: nn.Module, batch: int, generator: torch.Generator) -> dict[str, Tensor]:
    return {
        "encoder_hidden_states": _randn(generator, batch, TEXT_LEN, 24),
        "global_hidden_states": _randn(generator, batch, 1, STABLE_AUDIO_GLOBAL_WIDTH),
    }


def stable_audio_pipeline_call(transformer: nn.Module, x: Tensor, timestep: Tensor, cond: dict[str, Tensor]) -> Tensor:
    """StableAudioPipeline's transformer call on the scaled model input ``x``, its rotary embedding over G + T tokens."""
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    global_states = cond["global_hidden_states"]
    rotary = get_1d_rotary_pos_embed(
        transformer.config.attention_head_dim // 2, x.shape[2] + global_states.shape[1], use_real=True,
        repeat_interleave_real=False,
    )
    return transformer(
        x, timestep, encoder_hidden_states=cond["encoder_hidden_states"], global_hidden_states=global_states,
        rotary_embedding=rotary, return_dict=False,
    )[0]


def stable_audio_stock(transformer: nn.Module, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
    """The pipeline's call with each row at its own timestep ``t``; its v-prediction as a cosine-path velocity."""
    import math

    return stable_audio_pipeline_call(transformer, x, t, cond) * (0.5 * math.pi)


CASES["stable_audio"] = BackboneCase(
    "stable_audio", build_stable_audio, adapt_stable_audio, (4, 6), stable_audio_cond, stable_audio_stock,
    ((4, 4, 6), (3, 6)),
)


def perturb_twin_embedding(transformer: nn.Module, seed: int = 5) -> None:
    """Make the twin embedding on ``transformer`` look trained: its target-time MLP and sign move off zero."""
    from twinloss_adapters.time_embedding import DEFAULT_MODULE_NAME

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in transformer.get_submodule(DEFAULT_MODULE_NAME).parameters():
            parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))


def train_steps(loss_fn, model: nn.Module, x: Tensor, cond: dict[str, Tensor], uncond: dict[str, Tensor], optimizer,
                steps: int = 3, after_step: Callable[[object], None] | None = None) -> list[float]:
    """``steps`` optimizer steps of ``loss_fn`` on one fixed batch and draw (generator seed 1); the losses.

    With the same draws every step, the loss moves only because the weights do. Every term must be finite.
    ``after_step`` receives each step's loss output after the optimizer step (teacher updates, checks).
    """
    losses = []
    for _ in range(steps):
        out = loss_fn(model, x, cond=cond, uncond=uncond, generator=torch.Generator().manual_seed(1))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step(out)
        losses.append(out.loss.item())
        assert all(torch.isfinite(term).all() for term in out.terms.values())
    return losses
