"""LTX-Video (``LTXVideoTransformer3DModel``) as a twinloss model.

``LTXPipeline`` packs video latents ``[B, C, F, H, W]`` into tokens
``[B, F H W, C]`` (patch sizes 1), passes the latent grid size and a rotary
interpolation scale ``(temporal_compression / frame_rate, spatial_compression,
spatial_compression)``, and calls the transformer with ``timestep = 1000 t``
(flow matching, ``t = 1`` noise); it predicts ``z - x``. Its adaLN-single
``time_embed`` embeds time in ``time_embed.emb.timestep_embedder`` and then
projects to the modulation: the TwinFlow embeddings are added to that
embedder's output.

Conditioning:

* ``encoder_hidden_states`` ``[B, L, caption_channels]`` (T5), required;
* ``encoder_attention_mask`` ``[B, L]`` (1 keep, 0 pad), optional.
"""

from collections.abc import Mapping

from torch import Tensor

from twinloss_adapters._imports import require_diffusers
from twinloss_adapters.base import (
    AdaptedTransformer,
    check_backbone_class,
    check_video_latent,
    pipeline_from_pretrained,
    unadapt,
)
from twinloss_adapters.conventions import TimeConvention
from twinloss_adapters.packing import pack_video_patches, unpack_video_patches

__all__ = ["LTXVideoAdapter", "adapt", "from_pretrained", "unadapt"]


def time_embedding_arguments(config: object) -> dict[str, object]:
    """Where an LTX transformer (LTX-Video, LTX-2's video stream) takes the TwinFlow embeddings, and its time units.

    ``timestep = 1000 t``; ``time_embed.emb.timestep_embedder`` returns the
    embedding of width ``num_attention_heads * attention_head_dim``.
    """
    return {
        "time_convention": TimeConvention(scale=1000.0),
        "embedder_path": "time_embed.emb.timestep_embedder",
        "embedding_dim": config.num_attention_heads * config.attention_head_dim,
    }


def _stock_class() -> type:
    return require_diffusers().LTXVideoTransformer3DModel


class LTXVideoAdapter(AdaptedTransformer):
    """``LTXVideoTransformer3DModel`` behind the protocol; latents ``[B, C, F, H, W]``.

    Args:
        transformer: the stock transformer.
        target_time, sign: which TwinFlow embeddings to add.
        frame_rate: frames per second of the videos (*default* 25, the
            pipeline's default); sets the temporal rotary scale.
        vae_temporal_compression, vae_spatial_compression: the VAE's
            compression ratios (*default* 8 and 32, LTX-Video's VAE).
    """

    required_cond = ("encoder_hidden_states",)
    optional_cond = ("encoder_attention_mask",)
    per_token_timesteps = False
    """The stock call takes one timestep per token (:class:`~twinloss_adapters.ltx_condition.LTXConditionAdapter`)."""

    def __init__(
        self,
        transformer: object,
        *,
        target_time: bool = True,
        sign: bool = True,
        frame_rate: float = 25.0,
        vae_temporal_compression: int = 8,
        vae_spatial_compression: int = 32,
    ) -> None:
        check_backbone_class(transformer, _stock_class())
        if frame_rate <= 0:
            raise ValueError(f"frame_rate must be positive, got {frame_rate}")
        if vae_temporal_compression < 1 or vae_spatial_compression < 1:
            raise ValueError(
                "vae_temporal_compression and vae_spatial_compression must be >= 1, got "
                f"{vae_temporal_compression} and {vae_spatial_compression}"
            )
        config = transformer.config
        self.check_config(config)
        self.patch, self.patch_t = config.patch_size, config.patch_size_t
        self.latent_channels = config.in_channels // (self.patch * self.patch * self.patch_t)
        if self.latent_channels * self.patch * self.patch * self.patch_t != config.in_channels or (
            config.out_channels != config.in_channels
        ):
            raise ValueError(
                f"transformer maps {config.in_channels} packed channels to {config.out_channels}; "
                "expected equal counts divisible by patch_size**2 * patch_size_t"
            )
        self.frame_rate = frame_rate
        self.vae_compression = (vae_temporal_compression, vae_spatial_compression)
        self.rope_interpolation_scale = (
            vae_temporal_compression / frame_rate,
            float(vae_spatial_compression),
            float(vae_spatial_compression),
        )
        self.cond_widths = {"encoder_hidden_states": config.caption_channels}
        self.cond_masks = {"encoder_attention_mask": "encoder_hidden_states"}
        super().__init__(
            transformer, **time_embedding_arguments(config), target_time=target_time, sign=sign,
            per_token_time=self.per_token_timesteps,
        )

    def check_config(self, config: object) -> None:
        """Raise ValueError for a transformer config the pipeline's call cannot serve (none for ``LTXPipeline``)."""

    def check_latent(self, x_t: Tensor) -> None:
        check_video_latent(x_t, self.latent_channels, (self.patch_t, self.patch, self.patch), "LTX-Video")

    def run_backbone(self, x_t: Tensor, timestep: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        frames, height, width = x_t.shape[2:]
        tokens = self.transformer(
            hidden_states=pack_video_patches(x_t, self.patch, self.patch_t),
            encoder_hidden_states=cond["encoder_hidden_states"],
            timestep=timestep,
            encoder_attention_mask=cond.get("encoder_attention_mask"),
            num_frames=frames // self.patch_t,
            height=height // self.patch,
            width=width // self.patch,
            rope_interpolation_scale=self.rope_interpolation_scale,
            return_dict=False,
        )[0]
        return unpack_video_patches(tokens, frames, height, width, self.patch, self.patch_t)


def adapt(
    transformer: object,
    *,
    target_time: bool = True,
    sign: bool = True,
    frame_rate: float = 25.0,
    vae_temporal_compression: int = 8,
    vae_spatial_compression: int = 32,
) -> LTXVideoAdapter:
    """Adapt an ``LTXVideoTransformer3DModel`` in place and return the protocol model.

    Raises:
        ValueError: if ``transformer`` is not an ``LTXVideoTransformer3DModel``,
            a rotary argument is out of range, or it is already adapted.
    """
    return LTXVideoAdapter(
        transformer,
        target_time=target_time,
        sign=sign,
        frame_rate=frame_rate,
        vae_temporal_compression=vae_temporal_compression,
        vae_spatial_compression=vae_spatial_compression,
    )


from_pretrained = pipeline_from_pretrained(LTXVideoAdapter)
