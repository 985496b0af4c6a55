"""Flux (``FluxTransformer2DModel``) as a twinloss model.

``FluxPipeline`` packs ``[B, C, H, W]`` latents into 2x2 patches
(``[B, HW/4, 4C]``), builds position ids ``img_ids = (0, row, col)`` per patch
and ``txt_ids = 0`` per text token, and calls the transformer with
``timestep = t`` in ``[0, 1]`` (the class multiplies by 1000). It predicts
``z - x``. ``time_text_embed`` sums the time, (guidance) and pooled-text
embeddings into the ``temb`` every block modulates with; the TwinFlow
embeddings are added to its ``timestep_embedder`` output, inside that sum.

The adapter takes and returns ``[B, C, H, W]`` and builds both id tensors from
the latent and text shapes. Conditioning:

* ``encoder_hidden_states`` ``[B, L, joint_attention_dim]`` (T5), required;
* ``pooled_projections`` ``[B, pooled_projection_dim]`` (CLIP), required;
* ``guidance`` ``[B]`` (the embedded guidance scale, e.g. 3.5), required
  exactly when the model has guidance embeddings (Flux-dev).
"""

from collections.abc import Mapping

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
from twinloss_adapters.packing import pack_image_patches, patch_grid_ids, unpack_image_patches

__all__ = ["FluxAdapter", "adapt", "from_pretrained", "unadapt"]

PACKING_PATCH = 2  # FluxPipeline packs 2x2 latent patches outside the transformer


def packed_latent_channels(transformer: object, pipeline: str) -> int:
    """The latent channels ``C`` of a Flux-layout transformer (Flux, Flux Kontext, Chroma).

    Its pipeline packs 2x2 latent patches outside the transformer, so the
    transformer has ``patch_size = 1`` and ``in_channels = out_channels = 4 C``.

    Raises:
        ValueError: naming the patch size or the channel counts otherwise;
            ``pipeline`` names the pipeline in the message.
    """
    config = transformer.config
    if config.patch_size != 1:
        raise ValueError(f"transformer has patch_size {config.patch_size}; the {pipeline} pipeline layout needs 1")
    latent_channels = config.in_channels // PACKING_PATCH**2
    if latent_channels * PACKING_PATCH**2 != config.in_channels or transformer.out_channels != config.in_channels:
        raise ValueError(
            f"transformer maps {config.in_channels} packed channels to {transformer.out_channels}; "
            "expected equal counts divisible by 4 (2x2 packing)"
        )
    return latent_channels


def _stock_class() -> type:
    return require_diffusers().FluxTransformer2DModel


class FluxAdapter(AdaptedTransformer):
    """``FluxTransformer2DModel`` behind the protocol; latents ``[B, C, H, W]``."""

    required_cond = ("encoder_hidden_states", "pooled_projections")

    def __init__(self, transformer: object, *, target_time: bool = True, sign: bool = True) -> None:
        check_backbone_class(transformer, _stock_class())
        config = transformer.config
        self.latent_channels = packed_latent_channels(transformer, "Flux")
        guidance = bool(config.guidance_embeds)
        self.cond_widths = {"encoder_hidden_states": config.joint_attention_dim, "pooled_projections": config.pooled_projection_dim}
        super().__init__(
            transformer,
            time_convention=TimeConvention(scale=1.0),
            embedder_path="time_text_embed.timestep_embedder",
            embedding_dim=transformer.inner_dim,
            target_time=target_time,
            sign=sign,
            guidance_inputs=("guidance",) if guidance else (),
        )

    def check_latent(self, x_t: Tensor) -> None:
        check_image_latent(x_t, self.latent_channels, PACKING_PATCH, "Flux", layout=" (unpacked latents)")

    def run_backbone(self, x_t: Tensor, timestep: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        _, _, height, width = x_t.shape
        text = cond["encoder_hidden_states"]
        img_ids = patch_grid_ids(height // PACKING_PATCH, width // PACKING_PATCH, device=x_t.device, dtype=x_t.dtype)
        txt_ids = text.new_zeros(text.shape[1], 3, dtype=x_t.dtype)
        tokens = self.transformer(
            hidden_states=pack_image_patches(x_t, PACKING_PATCH),
            encoder_hidden_states=text,
            pooled_projections=cond["pooled_projections"],
            timestep=timestep,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=cond.get("guidance"),
            return_dict=False,
        )[0]
        return unpack_image_patches(tokens, height, width, PACKING_PATCH)


def adapt(transformer: object, *, target_time: bool = True, sign: bool = True) -> FluxAdapter:
    """Adapt a ``FluxTransformer2DModel`` in place and return the protocol model.

    Raises:
        ValueError: if ``transformer`` is not a ``FluxTransformer2DModel``,
            has a non-Flux channel layout, or is already adapted.
    """
    return FluxAdapter(transformer, target_time=target_time, sign=sign)


from_pretrained = pipeline_from_pretrained(FluxAdapter)
