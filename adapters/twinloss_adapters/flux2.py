"""FLUX.2 (``Flux2Transformer2DModel``, dev and Klein) as a twinloss model.

``Flux2Pipeline`` works on the VAE latent after its 2x2 patchify and batch
norm, ``[B, C, H, W]`` with ``C = in_channels`` (128 for the released
models). It flattens that to tokens ``[B, H W, C]``, gives every token a 4-axis
position id ``(T, H, W, L)`` (image ``(0, row, col, 0)``, text
``(0, 0, 0, index)``) and calls the transformer with ``timestep = t`` in
``[0, 1]`` (the class multiplies by 1000) and, for guidance-distilled models,
the raw ``guidance_scale`` (also x1000 inside). It predicts ``z - x``.

``time_guidance_embed.timestep_embedder`` gives the time embedding that
(plus the guidance embedding) feeds every shared modulation; the TwinFlow
embeddings are added to its output.

Conditioning:

* ``encoder_hidden_states`` ``[B, L, joint_attention_dim]`` (Mistral / Qwen3),
  required;
* ``guidance`` ``[B]``, the pipeline's ``guidance_scale`` (e.g. 4.0), required
  exactly when the model has guidance embeddings (dev; Klein has none);
* ``image_latents`` ``[B, C, H', W']`` or ``[B, N, C, H', W']``, optional:
  reference images for editing, in the same latent space. As in the pipeline,
  reference ``i`` gets position ids ``(10 (i + 1), row, col, 0)``, its tokens
  follow the target's, and the prediction keeps only the target tokens.
"""

from collections.abc import Mapping

import torch
from einops import rearrange
from torch import Tensor

from twinloss_adapters._imports import require_diffusers
from twinloss_adapters.base import (
    AdaptedTransformer,
    check_backbone_class,
    check_image_latent,
    pipeline_from_pretrained,
    unadapt,
)
from twinloss_adapters.conventions import TimeConvention

__all__ = ["Flux2Adapter", "adapt", "flux2_position_ids", "from_pretrained", "unadapt"]

REFERENCE_TIME_STRIDE = 10  # Flux2Pipeline._prepare_image_ids: reference i sits at T = 10 + 10 i


def _stock_class() -> type:
    return require_diffusers().Flux2Transformer2DModel


def flux2_position_ids(
    time: int, height: int, width: int, length: int, *, device: torch.device
) -> Tensor:
    """FLUX.2 position ids ``[height * width * length, 4]``: every ``(time, row, col, index)``, row-major."""
    axes = [torch.arange(size, device=device) for size in (height, width, length)]
    grid = torch.meshgrid(*axes, indexing="ij")
    spatial = torch.stack([axis.reshape(-1) for axis in grid], dim=-1)
    return torch.cat([torch.full_like(spatial[:, :1], time), spatial], dim=-1)


class Flux2Adapter(AdaptedTransformer):
    """``Flux2Transformer2DModel`` behind the protocol; latents ``[B, C, H, W]``."""

    required_cond = ("encoder_hidden_states",)
    optional_cond = ("image_latents",)

    def __init__(self, transformer: object, *, target_time: bool = True, sign: bool = True) -> None:
        check_backbone_class(transformer, _stock_class())
        config = transformer.config
        if config.patch_size != 1 or transformer.out_channels != config.in_channels:
            raise ValueError(
                f"transformer has patch_size {config.patch_size} and maps {config.in_channels} channels to "
                f"{transformer.out_channels}; the FLUX.2 pipeline layout needs patch_size 1 and equal counts"
            )
        self.cond_widths = {"encoder_hidden_states": config.joint_attention_dim}
        super().__init__(
            transformer,
            time_convention=TimeConvention(scale=1.0),
            embedder_path="time_guidance_embed.timestep_embedder",
            embedding_dim=transformer.inner_dim,
            target_time=target_time,
            sign=sign,
            guidance_inputs=("guidance",) if config.guidance_embeds else (),
        )

    def check_latent(self, x_t: Tensor) -> None:
        channels = self.transformer.config.in_channels  # patch_size 1: any height and width
        check_image_latent(x_t, channels, 1, "FLUX.2", layout=" (the pipeline's patchified latent)")

    def check_cond(self, cond: Mapping[str, Tensor], batch_size: int) -> None:
        super().check_cond(cond, batch_size)
        reference = cond.get("image_latents")
        channels = self.transformer.config.in_channels
        if reference is not None and (reference.ndim not in (4, 5) or reference.shape[-3] != channels):
            raise ValueError(
                f"cond['image_latents'] must be [B, {channels}, H, W] or [B, N, {channels}, H, W], "
                f"got {tuple(reference.shape)}"
            )

    def run_backbone(self, x_t: Tensor, timestep: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        _, _, height, width = x_t.shape
        text = cond["encoder_hidden_states"]
        tokens = rearrange(x_t, "b c h w -> b (h w) c")
        ids = [flux2_position_ids(0, height, width, 1, device=x_t.device)]
        reference = cond.get("image_latents")
        if reference is not None:
            references = reference.unsqueeze(1) if reference.ndim == 4 else reference
            reference_tokens = rearrange(references, "b n c h w -> b (n h w) c").to(tokens.dtype)
            tokens = torch.cat([tokens, reference_tokens], dim=1)
            ids += [
                flux2_position_ids(REFERENCE_TIME_STRIDE * (index + 1), *references.shape[-2:], 1, device=x_t.device)
                for index in range(references.shape[1])
            ]
        output = self.transformer(
            hidden_states=tokens,
            encoder_hidden_states=text,
            timestep=timestep,
            img_ids=torch.cat(ids),
            txt_ids=flux2_position_ids(0, 1, 1, text.shape[1], device=x_t.device),
            guidance=cond.get("guidance"),
            return_dict=False,
        )[0]
        return rearrange(output[:, : height * width], "b (h w) c -> b c h w", h=height)


def adapt(transformer: object, *, target_time: bool = True, sign: bool = True) -> Flux2Adapter:
    """Adapt a ``Flux2Transformer2DModel`` in place and return the protocol model.

    Raises:
        ValueError: if ``transformer`` is not a ``Flux2Transformer2DModel``,
            has a non-pipeline layout, or is already adapted.
    """
    return Flux2Adapter(transformer, target_time=target_time, sign=sign)


from_pretrained = pipeline_from_pretrained(Flux2Adapter)
