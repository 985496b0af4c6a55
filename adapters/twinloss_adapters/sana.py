"""SANA and SANA-Sprint (``SanaTransformer2DModel``) as a twinloss model.

Stock SANA is called by ``SanaPipeline`` with ``timestep = 1000 t *
config.timestep_scale`` (flow matching, ``t = 1`` noise) and predicts the
flow-match velocity ``z - x``, the twinloss velocity.

SANA-Sprint is the same class built with ``guidance_embeds=True``.
``SanaSprintPipeline`` draws a TrigFlow angle ``s`` and calls the transformer
with the flow time ``t = sin s / (cos s + sin s)`` itself, in ``[0, 1]``, on the
flow interpolant ``x_t = t z + (1 - t) x`` (its input rescaling
``sqrt(t^2 + (1 - t)^2)`` turns the TrigFlow state into exactly that), and
with ``guidance = guidance_scale * config.guidance_embeds_scale`` (0.1). Its
raw output is again ``z - x`` (the pipeline's output transform turns it into
the TrigFlow velocity). So a Sprint model is a flow model in ``[0, 1]`` time
units; the adapter takes the user-facing ``guidance_scale`` (e.g. 4.5) and
applies ``guidance_embeds_scale`` itself, as the pipeline does.

The time embedding
``time_embed.emb.timestep_embedder`` (or ``time_embed.timestep_embedder`` when
built with ``guidance_embeds``) feeds ``time_embed.linear``, the adaLN-single
modulation of every block and the output norm: the TwinFlow embeddings are
added there, before any modulation.

Conditioning (all batch-leading):

* ``encoder_hidden_states`` ``[B, L, caption_channels]``, required;
* ``encoder_attention_mask`` ``[B, L]`` (1 keep, 0 pad), optional;
* ``guidance`` ``[B]``, the pipeline's ``guidance_scale`` (e.g. 4.5), required
  exactly when the model has guidance embeddings (SANA-Sprint).
"""

from collections.abc import Mapping

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

__all__ = ["SanaAdapter", "adapt", "from_pretrained", "unadapt"]


def _stock_class() -> type:
    return require_diffusers().SanaTransformer2DModel


class SanaAdapter(AdaptedTransformer):
    """``SanaTransformer2DModel`` behind the protocol; latents ``[B, C, H, W]``."""

    required_cond = ("encoder_hidden_states",)
    optional_cond = ("encoder_attention_mask",)

    def __init__(self, transformer: object, *, target_time: bool = True, sign: bool = True) -> None:
        check_backbone_class(transformer, _stock_class())
        config = transformer.config
        check_velocity_channels(config.in_channels, config.out_channels or config.in_channels)
        guidance = bool(config.guidance_embeds)
        # SanaSprintPipeline: timestep in [0, 1]; SanaPipeline: 1000 t * timestep_scale.
        time_scale = 1.0 if guidance else 1000.0 * float(config.timestep_scale)
        self.guidance_embeds_scale = float(config.guidance_embeds_scale) if guidance else None
        self.cond_widths = {"encoder_hidden_states": config.caption_channels}
        self.cond_masks = {"encoder_attention_mask": "encoder_hidden_states"}
        super().__init__(
            transformer,
            time_convention=TimeConvention(scale=time_scale),
            embedder_path="time_embed.timestep_embedder" if guidance else "time_embed.emb.timestep_embedder",
            embedding_dim=config.num_attention_heads * config.attention_head_dim,
            target_time=target_time,
            sign=sign,
            guidance_inputs=("guidance",) if guidance else (),
        )

    def check_latent(self, x_t: Tensor) -> None:
        config = self.transformer.config
        check_image_latent(x_t, config.in_channels, config.patch_size, "SANA")

    def run_backbone(self, x_t: Tensor, timestep: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        guidance = cond.get("guidance")
        if guidance is not None:
            guidance = guidance * self.guidance_embeds_scale  # SanaSprintPipeline's embedded guidance
        return self.transformer(
            hidden_states=x_t,
            encoder_hidden_states=cond["encoder_hidden_states"],
            timestep=timestep,
            guidance=guidance,
            encoder_attention_mask=cond.get("encoder_attention_mask"),
            return_dict=False,
        )[0]


def adapt(transformer: object, *, target_time: bool = True, sign: bool = True) -> SanaAdapter:
    """Adapt a ``SanaTransformer2DModel`` in place and return the protocol model.

    Args:
        transformer: the stock diffusers SANA transformer (LoRA layers injected
            through diffusers' ``add_adapter`` are fine).
        target_time: add the gated target-time embedding (needed for ``r != t``).
        sign: add the sign embedding (needed for the twin trajectory ``t < 0``).

    Raises:
        ValueError: if ``transformer`` is not a ``SanaTransformer2DModel``, is
            already adapted, or predicts a different channel count.
    """
    return SanaAdapter(transformer, target_time=target_time, sign=sign)


from_pretrained = pipeline_from_pretrained(SanaAdapter)
