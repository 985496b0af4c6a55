"""LTX-2 (``LTX2VideoTransformer3DModel``), joint video and audio, as a twinloss model.

``LTX2Pipeline`` denoises a video latent ``[B, C, F, H, W]`` and an audio
latent ``[B, C_a, L, M]`` (``M`` mel bins) together. It packs them into
token sequences (video ``[B, F H W, C]``, audio ``[B, L, C_a M]``), gives the
transformer their rotary coordinates, and calls it with one
``timestep = 1000 t`` for both streams (``sigma`` the same, flow matching,
``t = 1`` noise); both predictions are ``z - x``.

twinloss has one ``x_t`` per call, so the adapter takes the two token
sequences concatenated, ``[B, F H W + L, D]`` with
``D = in_channels = audio_in_channels`` (128 for the released models), video
tokens first. :func:`pack_audio_video` and :func:`unpack_audio_video` convert
from and to the two latents; :func:`coordinates` builds the rotary
coordinates the pipeline passes, which also tell the adapter where the video
tokens end.

TwinFlow embeddings go into both streams' main time embeddings:
``time_embed.emb.timestep_embedder`` (video) and
``audio_time_embed.emb.timestep_embedder`` (audio, its own width), each
feeding its stream's block and output modulation. The four audio-video
cross-attention modulations keep their own embeddings of ``|t|``.

Conditioning (batch-leading):

* ``encoder_hidden_states``, ``audio_encoder_hidden_states``
  ``[B, L_text, caption_channels]`` (the pipeline's connector outputs), required;
* ``video_coords`` ``[B, 3, F H W, 2]`` and ``audio_coords`` ``[B, 1, L, 2]``
  (see :func:`coordinates`), required;
* ``encoder_attention_mask`` ``[B, L_text]``, optional, and
  ``audio_encoder_attention_mask``, optional: the video mask when absent (the
  pipeline passes one mask for both).
"""

from collections.abc import Mapping

import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor, nn

from twinloss_adapters._imports import require_diffusers
from twinloss_adapters.base import (
    AdaptedTransformer,
    check_backbone_class,
    pipeline_from_pretrained,
    unadapt_transformer,
)
from twinloss_adapters.ltx_video import time_embedding_arguments
from twinloss_adapters.packing import pack_video_patches, unpack_video_patches
from twinloss_adapters.time_embedding import (
    DEFAULT_MODULE_NAME,
    find_injection,
    inject_time_embedding,
)

__all__ = [
    "LTX2Adapter",
    "adapt",
    "coordinates",
    "from_pretrained",
    "pack_audio_video",
    "unadapt",
    "unpack_audio_video",
]

AUDIO_EMBEDDER_ROOT = "audio_time_embed"
AUDIO_EMBEDDER_PATH = "emb.timestep_embedder"


def _stock_class() -> type:
    return require_diffusers().LTX2VideoTransformer3DModel


def pack_audio_video(
    video: Float[Tensor, "batch channels frames height width"], audio: Float[Tensor, "batch audio_channels length mel"]
) -> Float[Tensor, "batch tokens features"]:
    """The adapter's ``x`` from the two latents: ``[B, F H W + L, C]`` in LTX2Pipeline's packing (patch sizes 1)."""
    return torch.cat([pack_video_patches(video), rearrange(audio, "b c l m -> b l (c m)")], dim=1)


def unpack_audio_video(
    tokens: Float[Tensor, "batch tokens features"], frames: int, height: int, width: int, mel_bins: int
) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`pack_audio_video`: ``(video [B, C, F, H, W], audio [B, C_a, L, M])``."""
    video_tokens = frames * height * width
    video = unpack_video_patches(tokens[:, :video_tokens], frames, height, width)
    audio = rearrange(tokens[:, video_tokens:], "b l (c m) -> b c l m", m=mel_bins)
    return video, audio


def coordinates(
    transformer: nn.Module, batch_size: int, frames: int, height: int, width: int, audio_length: int, *, fps: float = 24.0
) -> dict[str, Tensor]:
    """The rotary coordinates LTX2Pipeline passes, as ``cond`` entries ``video_coords`` and ``audio_coords``.

    ``fps`` is the pipeline's conditioning frame rate (its ``frame_rate``, *default* 24).
    """
    device = next(transformer.parameters()).device
    return {
        "video_coords": transformer.rope.prepare_video_coords(batch_size, frames, height, width, device, fps=fps),
        "audio_coords": transformer.audio_rope.prepare_audio_coords(batch_size, audio_length, device),
    }


class LTX2Adapter(AdaptedTransformer):
    """``LTX2VideoTransformer3DModel`` behind the protocol; ``x_t`` is the joint token sequence ``[B, N_video + N_audio, D]``."""

    required_cond = ("encoder_hidden_states", "audio_encoder_hidden_states", "video_coords", "audio_coords")
    optional_cond = ("encoder_attention_mask", "audio_encoder_attention_mask")

    def __init__(self, transformer: object, *, target_time: bool = True, sign: bool = True) -> None:
        check_backbone_class(transformer, _stock_class())
        config = transformer.config
        channels = {config.in_channels, config.out_channels or config.in_channels}
        channels |= {config.audio_in_channels, config.audio_out_channels or config.audio_in_channels}
        if len(channels) != 1:
            raise ValueError(
                f"transformer has video channels {config.in_channels}->{config.out_channels} and audio channels "
                f"{config.audio_in_channels}->{config.audio_out_channels}; the joint token layout needs one width"
            )
        self.token_width = config.in_channels
        # LTX-2.0 projects both prompts from caption_channels; without prompt embeddings they go to the cross-attentions as they are
        self.cond_widths = (
            {"encoder_hidden_states": config.caption_channels, "audio_encoder_hidden_states": config.caption_channels}
            if config.use_prompt_embeddings
            else {"encoder_hidden_states": config.cross_attention_dim, "audio_encoder_hidden_states": config.audio_cross_attention_dim}
        )
        self.cond_masks = {
            "encoder_attention_mask": "encoder_hidden_states", "audio_encoder_attention_mask": "audio_encoder_hidden_states",
        }
        super().__init__(transformer, **time_embedding_arguments(config), target_time=target_time, sign=sign)
        self.audio_injection = None
        if target_time or sign:
            self.audio_injection = inject_time_embedding(
                transformer.get_submodule(AUDIO_EMBEDDER_ROOT),
                AUDIO_EMBEDDER_PATH,
                config.audio_num_attention_heads * config.audio_attention_head_dim,
                target_time=target_time,
                sign=sign,
            )

    def extra_prefixes(self) -> tuple[str, ...]:
        return (*super().extra_prefixes(), f"transformer.{AUDIO_EMBEDDER_ROOT}.{DEFAULT_MODULE_NAME}.")

    def check_latent(self, x_t: Tensor) -> None:
        if x_t.ndim != 3 or x_t.shape[2] != self.token_width:
            raise ValueError(
                f"x_t must be the joint video+audio tokens [B, N_video + N_audio, {self.token_width}] "
                f"(see ltx2.pack_audio_video), got {tuple(x_t.shape)}"
            )

    def check_cond(self, cond: Mapping[str, Tensor], batch_size: int) -> None:
        super().check_cond(cond, batch_size)
        video, audio = cond["video_coords"], cond["audio_coords"]
        if video.ndim != 4 or video.shape[1::2] != (3, 2) or audio.ndim != 4 or audio.shape[1::2] != (1, 2):
            raise ValueError(
                "cond['video_coords'] must be [B, 3, N_video, 2] and cond['audio_coords'] [B, 1, N_audio, 2] "
                f"(see ltx2.coordinates), got {tuple(video.shape)} and {tuple(audio.shape)}"
            )

    def run_backbone(self, x_t: Tensor, timestep: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        video_coords, audio_coords = cond["video_coords"], cond["audio_coords"]
        video_tokens, audio_tokens = video_coords.shape[2], audio_coords.shape[2]
        if video_tokens + audio_tokens != x_t.shape[1]:
            raise ValueError(
                f"x_t has {x_t.shape[1]} tokens but the coordinates describe {video_tokens} video + "
                f"{audio_tokens} audio tokens"
            )
        mask = cond.get("encoder_attention_mask")
        audio_mask = cond.get("audio_encoder_attention_mask", mask)
        video, audio = self.transformer(
            hidden_states=x_t[:, :video_tokens],
            audio_hidden_states=x_t[:, video_tokens:],
            encoder_hidden_states=cond["encoder_hidden_states"],
            audio_encoder_hidden_states=cond["audio_encoder_hidden_states"],
            timestep=timestep,
            sigma=timestep,  # LTX2Pipeline passes the same value (read by LTX-2.3's prompt modulation)
            encoder_attention_mask=mask,
            audio_encoder_attention_mask=audio_mask,
            video_coords=video_coords,
            audio_coords=audio_coords,
            use_cross_timestep=True,  # the pipeline's default
            return_dict=False,
        )
        return torch.cat([video, audio], dim=1)

    def forward(self, x_t: Tensor, t: Float[Tensor, " batch"], r: Float[Tensor, " batch"], **cond: Tensor) -> Tensor:
        """Return ``F(x_t, t, r)`` with the TwinFlow embeddings in both streams (see :meth:`AdaptedTransformer.forward`)."""
        if self.audio_injection is None:
            return super().forward(x_t, t, r, **cond)
        with self.audio_injection.times(t, r):
            return super().forward(x_t, t, r, **cond)

    def unadapt(self) -> nn.Module:
        return unadapt(self)


def unadapt(adapted: object) -> nn.Module:
    """Remove both TwinFlow injections; return the stock ``LTX2VideoTransformer3DModel``.

    Accepts the adapted model or the adapted transformer.

    Raises:
        ValueError: if ``adapted`` is neither.
    """
    if isinstance(adapted, LTX2Adapter):
        transformer = adapted.transformer
    elif isinstance(adapted, _stock_class()) and find_injection(adapted) is not None:
        transformer = adapted
    else:
        raise ValueError(
            f"adapted must be a model returned by ltx2.adapt() or its transformer, got {type(adapted).__name__}"
        )
    audio_injection = find_injection(transformer.get_submodule(AUDIO_EMBEDDER_ROOT))
    if audio_injection is not None:
        audio_injection.remove()
    return unadapt_transformer(transformer)


def adapt(transformer: object, *, target_time: bool = True, sign: bool = True) -> LTX2Adapter:
    """Adapt an ``LTX2VideoTransformer3DModel`` in place and return the protocol model.

    Raises:
        ValueError: if ``transformer`` is not an ``LTX2VideoTransformer3DModel``,
            its video and audio token widths differ, or it is already adapted.
    """
    return LTX2Adapter(transformer, target_time=target_time, sign=sign)


from_pretrained = pipeline_from_pretrained(LTX2Adapter)
