"""Lumina-Image 2.0 (``Lumina2Transformer2DModel``) as a twinloss model.

``Lumina2Pipeline`` runs its clock the other way round: it calls the
transformer with ``timestep = 1 - sigma`` (``0`` is noise, ``1`` is data, no
x1000; the class embeds the value as it is) and negates the prediction before
the flow-match Euler step, so the transformer predicts ``x - z``. The adapter
states both in its :class:`~twinloss_adapters.conventions.TimeConvention`
(``scale=1, reversed=True, output_sign=-1``).

``time_caption_embed.timestep_embedder`` gives the ``temb`` (width
``min(hidden_size, 1024)``) that every modulated block and the output norm
consume; the TwinFlow embeddings are added to its output.

Conditioning:

* ``encoder_hidden_states`` ``[B, L, cap_feat_dim]`` (Gemma), required;
* ``encoder_attention_mask`` ``[B, L]`` (1 keep, 0 pad; any dtype, read as
  bool), optional: all ones when absent (the stock class needs one). Kept
  tokens must come first, as the Gemma tokenizer pads on the right.
"""

from collections.abc import Mapping

import torch
from torch import Tensor

from twinloss_adapters._imports import require_diffusers
from twinloss_adapters.base import (
    AdaptedTransformer,
    check_backbone_class,
    check_image_latent,
    check_velocity_channels,
    pipeline_from_pretrained,
    unadapt,
)
from twinloss_adapters.conventions import TimeConvention

__all__ = ["Lumina2Adapter", "adapt", "from_pretrained", "unadapt"]

TIME_EMBEDDING_WIDTH_LIMIT = 1024  # Lumina2CombinedTimestepCaptionEmbedding embeds time in min(hidden_size, 1024)


def _stock_class() -> type:
    return require_diffusers().Lumina2Transformer2DModel


class Lumina2Adapter(AdaptedTransformer):
    """``Lumina2Transformer2DModel`` behind the protocol; latents ``[B, C, H, W]``."""

    required_cond = ("encoder_hidden_states",)
    optional_cond = ("encoder_attention_mask",)

    def __init__(self, transformer: object, *, target_time: bool = True, sign: bool = True) -> None:
        check_backbone_class(transformer, _stock_class())
        config = transformer.config
        check_velocity_channels(config.in_channels, transformer.out_channels)
        self.cond_widths = {"encoder_hidden_states": config.cap_feat_dim}
        self.cond_masks = {"encoder_attention_mask": "encoder_hidden_states"}
        super().__init__(
            transformer,
            time_convention=TimeConvention(scale=1.0, reversed=True, output_sign=-1),
            embedder_path="time_caption_embed.timestep_embedder",
            embedding_dim=min(config.hidden_size, TIME_EMBEDDING_WIDTH_LIMIT),
            target_time=target_time,
            sign=sign,
        )

    def check_latent(self, x_t: Tensor) -> None:
        config = self.transformer.config
        check_image_latent(x_t, config.in_channels, config.patch_size, "Lumina2")

    def run_backbone(self, x_t: Tensor, timestep: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        text = cond["encoder_hidden_states"]
        mask = cond.get("encoder_attention_mask")
        # The stock class counts kept tokens with mask.sum(); a float mask would give float lengths.
        mask = torch.ones(text.shape[:2], device=text.device, dtype=torch.bool) if mask is None else mask.bool()
        return self.transformer(
            hidden_states=x_t,
            timestep=timestep,
            encoder_hidden_states=text,
            encoder_attention_mask=mask,
            return_dict=False,
        )[0]


def adapt(transformer: object, *, target_time: bool = True, sign: bool = True) -> Lumina2Adapter:
    """Adapt a ``Lumina2Transformer2DModel`` in place and return the protocol model.

    Raises:
        ValueError: if ``transformer`` is not a ``Lumina2Transformer2DModel``,
            predicts another channel count, or is already adapted.
    """
    return Lumina2Adapter(transformer, target_time=target_time, sign=sign)


from_pretrained = pipeline_from_pretrained(Lumina2Adapter)
