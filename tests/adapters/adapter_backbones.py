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
