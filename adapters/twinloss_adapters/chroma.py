"""Chroma (``ChromaTransformer2DModel``) as a twinloss model.

``ChromaPipeline`` packs ``[B, C, H, W]`` latents into 2x2 patches as Flux
does (position ids ``(0, row, col)`` per patch, zeros per text token), calls
the transformer with ``timestep = t`` in ``[0, 1]`` (the class multiplies by
1000) and uses the prediction as ``z - x``. Chroma has no guidance input.

Chroma modulates per modulation slot: its ``distilled_guidance_layer`` (the
"approximator") maps, for every one of its ``L`` modulation slots, the time
features and the slot's index features to that slot's shift, scale or gate,
``[B, L, D]``. There is no single ``[B, D]`` time embedding to hook, so the
TwinFlow embeddings go in through the per-token injection
(:class:`~twinloss_adapters.time_embedding.PerTokenTimeEmbeddingInjection`)
at the approximator's input projection ``distilled_guidance_layer.in_proj``,
where the time features enter linearly: every slot gets the same
``Delta e(t, r)``, and the approximator's residual layers turn it into a
slot-specific change.

Conditioning:

* ``encoder_hidden_states`` ``[B, L, joint_attention_dim]`` (T5), required;
* ``attention_mask`` ``[B, L]``, optional: the pipeline's text mask (ones up
  to and including the first padding token); the adapter appends ones for
  the image tokens as the pipeline does.
"""

from collections.abc import Mapping

import torch
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
from twinloss_adapters.flux import PACKING_PATCH, packed_latent_channels  # ChromaPipeline packs as FluxPipeline
from twinloss_adapters.packing import (
    pack_image_patches,
    patch_grid_ids,
    unpack_image_patches,
)

__all__ = ["ChromaAdapter", "adapt", "from_pretrained", "unadapt"]



def _stock_class() -> type:
    return require_diffusers().ChromaTransformer2DModel


class ChromaAdapter(AdaptedTransformer):
    """``ChromaTransformer2DModel`` behind the protocol; latents ``[B, C, H, W]``."""

    required_cond = ("encoder_hidden_states",)
    optional_cond = ("attention_mask",)

    def __init__(self, transformer: object, *, target_time: bool = True, sign: bool = True) -> None:
        check_backbone_class(transformer, _stock_class())
        config = transformer.config
        self.latent_channels = packed_latent_channels(transformer, "Chroma")
        self.cond_widths = {"encoder_hidden_states": config.joint_attention_dim}
        self.cond_masks = {"attention_mask": "encoder_hidden_states"}
        super().__init__(
            transformer,
            time_convention=TimeConvention(scale=1.0),
            embedder_path="distilled_guidance_layer.in_proj",
            embedding_dim=config.approximator_hidden_dim,
            target_time=target_time,
            sign=sign,
            per_token_time=True,
        )

    def check_latent(self, x_t: Tensor) -> None:
        check_image_latent(x_t, self.latent_channels, PACKING_PATCH, "Chroma", layout=" (unpacked latents)")

    def run_backbone(self, x_t: Tensor, timestep: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        batch_size, _, height, width = x_t.shape
        grid_height, grid_width = height // PACKING_PATCH, width // PACKING_PATCH
        text = cond["encoder_hidden_states"]
        mask = cond.get("attention_mask")
        if mask is not None:  # ChromaPipeline._prepare_attention_mask: image tokens are always attended
            image_tokens = torch.ones(batch_size, grid_height * grid_width, device=mask.device, dtype=torch.bool)
            mask = torch.cat([mask, image_tokens], dim=1)
        tokens = self.transformer(
            hidden_states=pack_image_patches(x_t, PACKING_PATCH),
            encoder_hidden_states=text,
            timestep=timestep,
            img_ids=patch_grid_ids(grid_height, grid_width, device=x_t.device, dtype=x_t.dtype),
            txt_ids=text.new_zeros(text.shape[1], 3, dtype=x_t.dtype),
            attention_mask=mask,
            return_dict=False,
        )[0]
        return unpack_image_patches(tokens, height, width, PACKING_PATCH)


def adapt(transformer: object, *, target_time: bool = True, sign: bool = True) -> ChromaAdapter:
    """Adapt a ``ChromaTransformer2DModel`` in place and return the protocol model.

    Raises:
        ValueError: if ``transformer`` is not a ``ChromaTransformer2DModel``,
            has a non-Chroma channel layout, or is already adapted.
    """
    return ChromaAdapter(transformer, target_time=target_time, sign=sign)


from_pretrained = pipeline_from_pretrained(ChromaAdapter)
