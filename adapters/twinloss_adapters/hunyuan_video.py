"""HunyuanVideo (``HunyuanVideoTransformer3DModel``) as a twinloss model.

``HunyuanVideoPipeline`` calls the transformer on video latents
``[B, C, F, H, W]`` as they are (it patchifies inside), with
``timestep = 1000 t`` (flow matching, ``t = 1`` noise) and, for the released
guidance-distilled model, ``guidance = 1000 w`` for an embedded guidance scale
``w``; it predicts ``z - x``. ``time_text_embed`` sums the time, guidance and
pooled-text embeddings into the ``temb`` every block modulates with; the
TwinFlow embeddings are added to its ``timestep_embedder`` output, inside that
sum. (The text token refiner keeps its own time embedding of ``|t|``: it
refines the prompt, and the paper's change is to the modulation.)

Conditioning:

* ``encoder_hidden_states`` ``[B, L, text_embed_dim]`` (LLaMA), required;
* ``pooled_projections`` ``[B, pooled_projection_dim]`` (CLIP), required;
* ``encoder_attention_mask`` ``[B, L]`` (1 keep, 0 pad), optional: all ones
  when absent (the stock class needs one);
* ``guidance`` ``[B]``, the embedded guidance scale ``w`` (e.g. 6.0; the
  adapter multiplies by 1000 as the pipeline does), required exactly when the
  model has guidance embeddings.

Only the text-to-video layout is supported: the image-to-video variants
(``image_condition_type`` ``"latent_concat"`` or ``"token_replace"``) take an
image latent the protocol has no slot for, and ``token_replace`` embeds a
second timestep through the same embedder; both are rejected.
"""

from collections.abc import Mapping

import torch
from torch import Tensor

from twinloss_adapters._imports import require_diffusers
from twinloss_adapters.base import (
    AdaptedTransformer,
    check_backbone_class,
    check_velocity_channels,
    check_video_latent,
    pipeline_from_pretrained,
    unadapt,
)
from twinloss_adapters.conventions import TimeConvention

__all__ = ["HunyuanVideoAdapter", "adapt", "check_prefix_mask", "from_pretrained", "unadapt"]

GUIDANCE_SCALE = 1000.0  # HunyuanVideoPipeline embeds guidance_scale * 1000


def _stock_class() -> type:
    return require_diffusers().HunyuanVideoTransformer3DModel


class HunyuanVideoAdapter(AdaptedTransformer):
    """``HunyuanVideoTransformer3DModel`` behind the protocol; latents ``[B, C, F, H, W]``."""

    required_cond = ("encoder_hidden_states", "pooled_projections")
    optional_cond = ("encoder_attention_mask",)

    def __init__(self, transformer: object, *, target_time: bool = True, sign: bool = True) -> None:
        check_backbone_class(transformer, _stock_class())
        config = transformer.config
        self._read_channels(config)
        self.patch, self.patch_t = config.patch_size, config.patch_size_t
        self.cond_widths = {"encoder_hidden_states": config.text_embed_dim, "pooled_projections": config.pooled_projection_dim}
        self.cond_masks = {"encoder_attention_mask": "encoder_hidden_states"}
        super().__init__(
            transformer,
            time_convention=TimeConvention(scale=1000.0),
            embedder_path="time_text_embed.timestep_embedder",
            embedding_dim=config.num_attention_heads * config.attention_head_dim,
            target_time=target_time,
            sign=sign,
            guidance_inputs=("guidance",) if config.guidance_embeds else (),
        )

    def _read_channels(self, config: object) -> None:
        """Check the text-to-video channel layout and set ``latent_channels`` (the image-to-video adapter overrides it)."""
        if config.image_condition_type is not None:
            raise ValueError(
                f"transformer has image_condition_type={config.image_condition_type!r} (an image-to-video variant); "
                "the HunyuanVideo adapter supports the text-to-video model (image_condition_type=None)"
            )
        check_velocity_channels(config.in_channels, config.out_channels or config.in_channels)
        self.latent_channels = config.in_channels

    def check_latent(self, x_t: Tensor) -> None:
        check_video_latent(x_t, self.latent_channels, (self.patch_t, self.patch, self.patch), "HunyuanVideo")

    def run_backbone(self, x_t: Tensor, timestep: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        text = cond["encoder_hidden_states"]
        mask = cond.get("encoder_attention_mask")
        if mask is None:
            mask = torch.ones(text.shape[:2], device=text.device, dtype=torch.long)
        else:
            check_prefix_mask(mask)
        guidance = cond.get("guidance")
        return self.transformer(
            hidden_states=x_t,
            timestep=timestep,
            encoder_hidden_states=text,
            encoder_attention_mask=mask,
            pooled_projections=cond["pooled_projections"],
            guidance=None if guidance is None else GUIDANCE_SCALE * guidance,
            return_dict=False,
        )[0]


def check_prefix_mask(mask: Tensor) -> None:
    """Refuse a text mask the stock transformer would misread (one device sync).

    ``HunyuanVideoTransformer3DModel`` pools the prompt as
    ``sum(mask * text) / sum(mask)`` (NaN for an all-zero row) and keeps the
    first ``sum(mask)`` text tokens for attention (a mask with holes is read
    as a prefix of that length). ``HunyuanVideoPipeline`` never gives either:
    its LLaMA template leaves tokens even for an empty prompt, and padding
    comes last.

    Raises:
        ValueError: naming the first row whose mask is all zero or not of the
            form ``1 ... 1 0 ... 0``.
    """
    keep = mask != 0
    bad = (~keep.any(dim=1)) | (keep[:, 1:] & ~keep[:, :-1]).any(dim=1)
    rows = bad.nonzero().flatten().tolist()
    if rows:
        raise ValueError(
            f"cond['encoder_attention_mask'] row {rows[0]} is {mask[rows[0]].tolist()}: HunyuanVideo needs at least "
            "one kept token and padding only at the end (1 ... 1 0 ... 0), as HunyuanVideoPipeline's template "
            "gives even for an empty prompt; an all-zero row would return NaN"
        )


def adapt(transformer: object, *, target_time: bool = True, sign: bool = True) -> HunyuanVideoAdapter:
    """Adapt a ``HunyuanVideoTransformer3DModel`` in place and return the protocol model.

    Raises:
        ValueError: if ``transformer`` is not a ``HunyuanVideoTransformer3DModel``,
            is an image-to-video variant, or is already adapted.
    """
    return HunyuanVideoAdapter(transformer, target_time=target_time, sign=sign)


from_pretrained = pipeline_from_pretrained(HunyuanVideoAdapter)
