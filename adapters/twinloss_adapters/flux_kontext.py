"""FLUX.1 Kontext (``FluxTransformer2DModel`` with reference-image tokens) as a twinloss model.

``FluxKontextPipeline`` runs the Flux transformer exactly as ``FluxPipeline``
does (2x2 packing, ``timestep = t`` in ``[0, 1]``, raw ``guidance``, ``z - x``)
and appends the packed latent of the reference image after the target tokens,
with position ids ``(1, row, col)`` instead of ``(0, row, col)``; it keeps the
prediction of the target tokens only. The TwinFlow embeddings are added where
the Flux adapter adds them (``time_text_embed.timestep_embedder``); the
reference tokens are modulated with the same ``temb``, as in the stock call.

Conditioning: as :mod:`twinloss_adapters.flux`, plus

* ``image_latents`` ``[B, C, H', W']``, optional: the reference image's VAE
  latent (unpacked, same channels as ``x_t``, even ``H'`` and ``W'``).
"""

from collections.abc import Mapping

import torch
from torch import Tensor

from twinloss_adapters.base import pipeline_from_pretrained, unadapt
from twinloss_adapters.flux import PACKING_PATCH, FluxAdapter
from twinloss_adapters.packing import (
    pack_image_patches,
    patch_grid_ids,
    unpack_image_patches,
)

__all__ = ["FluxKontextAdapter", "adapt", "from_pretrained", "unadapt"]

REFERENCE_ID = 1.0  # FluxKontextPipeline: image_ids[..., 0] = 1 for the reference tokens


class FluxKontextAdapter(FluxAdapter):
    """A Flux Kontext ``FluxTransformer2DModel`` behind the protocol; latents ``[B, C, H, W]``."""

    optional_cond = ("image_latents",)

    def check_cond(self, cond: Mapping[str, Tensor], batch_size: int) -> None:
        super().check_cond(cond, batch_size)
        image = cond.get("image_latents")
        if image is not None and (
            image.ndim != 4 or image.shape[1] != self.latent_channels or image.shape[2] % 2 or image.shape[3] % 2
        ):
            raise ValueError(
                f"cond['image_latents'] must be [B, {self.latent_channels}, H', W'] with even H' and W', "
                f"got {tuple(image.shape)}"
            )

    def run_backbone(self, x_t: Tensor, timestep: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        _, _, height, width = x_t.shape
        text = cond["encoder_hidden_states"]
        tokens = pack_image_patches(x_t, PACKING_PATCH)
        ids = patch_grid_ids(height // PACKING_PATCH, width // PACKING_PATCH, device=x_t.device, dtype=x_t.dtype)
        image = cond.get("image_latents")
        if image is not None:
            image_ids = patch_grid_ids(
                image.shape[2] // PACKING_PATCH, image.shape[3] // PACKING_PATCH, device=x_t.device, dtype=x_t.dtype
            )
            image_ids[:, 0] = REFERENCE_ID
            tokens = torch.cat([tokens, pack_image_patches(image.to(x_t.dtype), PACKING_PATCH)], dim=1)
            ids = torch.cat([ids, image_ids])
        output = self.transformer(
            hidden_states=tokens,
            encoder_hidden_states=text,
            pooled_projections=cond["pooled_projections"],
            timestep=timestep,
            img_ids=ids,
            txt_ids=text.new_zeros(text.shape[1], 3, dtype=x_t.dtype),
            guidance=cond.get("guidance"),
            return_dict=False,
        )[0]
        target_tokens = (height // PACKING_PATCH) * (width // PACKING_PATCH)
        return unpack_image_patches(output[:, :target_tokens], height, width, PACKING_PATCH)


def adapt(transformer: object, *, target_time: bool = True, sign: bool = True) -> FluxKontextAdapter:
    """Adapt a Flux Kontext ``FluxTransformer2DModel`` in place and return the protocol model.

    Raises:
        ValueError: if ``transformer`` is not a ``FluxTransformer2DModel``,
            has a non-Flux channel layout, or is already adapted.
    """
    return FluxKontextAdapter(transformer, target_time=target_time, sign=sign)


from_pretrained = pipeline_from_pretrained(FluxKontextAdapter)
