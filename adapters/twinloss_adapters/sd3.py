"""Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel``) as a twinloss model.

``StableDiffusion3Pipeline`` calls the transformer on ``[B, C, H, W]``
latents with ``timestep = 1000 t`` (flow matching, ``t = 1`` noise); it
predicts ``z - x``. ``time_text_embed`` sums the time and pooled-text
embeddings into the ``temb`` of every adaLN-zero modulation; the TwinFlow
embeddings are added to its ``timestep_embedder`` output, inside that sum.

Conditioning:

* ``encoder_hidden_states`` ``[B, L, joint_attention_dim]``, required;
* ``pooled_projections`` ``[B, pooled_projection_dim]``, required.
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

__all__ = ["SD3Adapter", "adapt", "from_pretrained", "unadapt"]


def _stock_class() -> type:
    return require_diffusers().SD3Transformer2DModel


class SD3Adapter(AdaptedTransformer):
    """``SD3Transformer2DModel`` behind the protocol; latents ``[B, C, H, W]``."""

    required_cond = ("encoder_hidden_states", "pooled_projections")

    def __init__(self, transformer: object, *, target_time: bool = True, sign: bool = True) -> None:
        check_backbone_class(transformer, _stock_class())
        config = transformer.config
        check_velocity_channels(config.in_channels, transformer.out_channels)
        self.cond_widths = {"encoder_hidden_states": config.joint_attention_dim, "pooled_projections": config.pooled_projection_dim}
        super().__init__(
            transformer,
            time_convention=TimeConvention(scale=1000.0),
            embedder_path="time_text_embed.timestep_embedder",
            embedding_dim=transformer.inner_dim,
            target_time=target_time,
            sign=sign,
        )

    def check_latent(self, x_t: Tensor) -> None:
        config = self.transformer.config
        patch = config.patch_size
        check_image_latent(x_t, config.in_channels, patch, "SD3")
        limit = config.pos_embed_max_size
        if limit is not None and max(x_t.shape[2], x_t.shape[3]) // patch > limit:
            raise ValueError(
                f"x_t spans {x_t.shape[2] // patch}x{x_t.shape[3] // patch} patches; "
                f"this model's positional embedding covers at most {limit}x{limit}"
            )

    def run_backbone(self, x_t: Tensor, timestep: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        return self.transformer(
            hidden_states=x_t,
            encoder_hidden_states=cond["encoder_hidden_states"],
            pooled_projections=cond["pooled_projections"],
            timestep=timestep,
            return_dict=False,
        )[0]


def adapt(transformer: object, *, target_time: bool = True, sign: bool = True) -> SD3Adapter:
    """Adapt an ``SD3Transformer2DModel`` in place and return the protocol model.

    Raises:
        ValueError: if ``transformer`` is not an ``SD3Transformer2DModel`` or is already adapted.
    """
    return SD3Adapter(transformer, target_time=target_time, sign=sign)


from_pretrained = pipeline_from_pretrained(SD3Adapter)
