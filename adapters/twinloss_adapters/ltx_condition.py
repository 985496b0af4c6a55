"""LTX-Video with conditioning frames (``LTXConditionPipeline``) on the stock ``LTXVideoTransformer3DModel``.

``LTXConditionPipeline`` differs from ``LTXPipeline`` in two ways the model sees:

* positions: it passes ``video_coords`` ``[B, 3, F H W]`` instead of the grid
  size and rotary scale: latent frame ``f``, row ``h`` and column ``w`` at
  ``(max(8 f + 1 - 8, 0) / frame_rate, 32 h, 32 w)`` for the VAE's
  compressions 8 (time) and 32 (space), the causal first frame at time 0;
* times: one timestep per token, ``min(1000 t, 1000 (1 - m))`` with ``m`` the
  condition's strength on that token's frame (0 on the frames it generates).

An image or video condition at frame index 0 with strength 1 (image to
video, video continuation) *replaces* the first latent frames with the
condition's latent and gives their tokens the timestep 0. An image
condition at a later frame index ``k`` with strength 1 (a keyframe) is
*prepended*: its latent's tokens go before the video's, at the timestep 0,
with the coordinates of pixel frame ``k`` (time ``k / frame_rate``), and
the pipeline drops their prediction. The transformer
embeds the ``[B, F H W]`` timesteps into per-token modulation and the TwinFlow
embedding is added per token
(:class:`~twinloss_adapters.time_embedding.PerTokenTimeEmbeddingInjection`).
Time units, the prediction ``z - x`` and the text input are LTX-Video's
(:mod:`twinloss_adapters.ltx_video`).

Conditioning: as LTX-Video, plus

* ``condition_latent`` ``[B, C, F_c, H, W]``, optional, ``F_c <= F``: the
  latent of the first ``F_c`` frames (the pipeline's ``condition_latents``,
  normalised with the VAE's mean and std);
* ``keyframe_latents`` ``[B, C, K, H, W]`` with ``keyframe_frames``
  ``[B, K]``, optional and together: ``K`` image conditions, latent ``k``
  (one latent frame, normalised as above) at pixel frame index
  ``keyframe_frames[:, k]``, a whole number >= 1 (the pipeline's
  ``frame_index``; frame 0 is ``condition_latent``'s). They are prepended in
  order, as the pipeline prepends its conditions.

The twin times on the conditioned frames and the keyframes: they are data,
not noise, on both trajectories, so their tokens get ``(t, r) = (0, 0)``: the
stock timestep 0 as in the pipeline, no jump and no sign, hence exactly the
pipeline's modulation there at every ``(t, r)`` and on both trajectories.
They do not move either: the adapter returns the velocity 0 on the
conditioned frames (the pipeline never updates those tokens: its
``tokens_to_denoise_mask`` is false on them), so a sampler keeps those frames
of its state and the loss sends no gradient through them; the keyframes are
not part of the state at all. Put ``condition_latent`` into the sample's
first frames, as the pipeline's output has it.

Not expressed: strengths below 1 (tokens held at the intermediate time
``1 - m``), a video (several frames) as a condition at a later frame index
(the pipeline splits it between a prepended frame and replaced ones), and
the pipeline's ``image_cond_noise_scale`` jitter of the condition during
sampling (a sampler may pass the jittered latent as ``condition_latent`` or
``keyframe_latents``).
"""

from collections.abc import Mapping

import torch
from jaxtyping import Float
from torch import Tensor

from twinloss_adapters.base import pipeline_from_pretrained, unadapt
from twinloss_adapters.ltx_video import LTXVideoAdapter
from twinloss_adapters.packing import pack_video_patches, unpack_video_patches

__all__ = ["CONDITION", "KEYFRAMES", "KEYFRAME_FRAMES", "LTXConditionAdapter", "adapt", "from_pretrained", "unadapt"]

CONDITION = "condition_latent"
"""The conditioning key of the first frames' latent ``[B, C, F_c, H, W]``."""

KEYFRAMES = "keyframe_latents"
"""The conditioning key of the keyframes' latents ``[B, C, K, H, W]``, one latent frame each."""

KEYFRAME_FRAMES = "keyframe_frames"
"""The conditioning key of the keyframes' pixel frame indices ``[B, K]`` (whole numbers >= 1)."""


class LTXConditionAdapter(LTXVideoAdapter):
    """``LTXVideoTransformer3DModel`` called as ``LTXConditionPipeline`` calls it; latents ``[B, C, F, H, W]``.

    Args: as :class:`~twinloss_adapters.ltx_video.LTXVideoAdapter`.
    """

    optional_cond = (*LTXVideoAdapter.optional_cond, CONDITION, KEYFRAMES, KEYFRAME_FRAMES)
    per_token_timesteps = True

    def check_config(self, config: object) -> None:
        """Raise ValueError unless both patch sizes are 1 (the pipeline's ``video_coords`` assume it)."""
        patches = (config.patch_size, config.patch_size_t)
        if patches != (1, 1):
            raise ValueError(
                f"transformer has (patch_size, patch_size_t) = {patches}; LTXConditionPipeline's "
                "video_coords are built for patches of 1"
            )

    def check_cond(self, cond: Mapping[str, Tensor], batch_size: int) -> None:
        super().check_cond(cond, batch_size)
        condition = cond.get(CONDITION)
        if condition is not None and (
            condition.ndim != 5 or condition.shape[1] != self.latent_channels or condition.shape[2] < 1
        ):
            raise ValueError(
                f"cond[{CONDITION!r}] must be [B, {self.latent_channels}, F_c, H, W] with F_c >= 1, "
                f"got {tuple(condition.shape)}"
            )
        if (KEYFRAMES in cond) != (KEYFRAME_FRAMES in cond):
            given, absent = (KEYFRAMES, KEYFRAME_FRAMES) if KEYFRAMES in cond else (KEYFRAME_FRAMES, KEYFRAMES)
            raise ValueError(f"cond[{given!r}] needs cond[{absent!r}]: a keyframe is a latent and its frame index")
        if KEYFRAMES not in cond:
            return
        latents, frames = cond[KEYFRAMES], cond[KEYFRAME_FRAMES]
        if latents.ndim != 5 or latents.shape[1] != self.latent_channels or latents.shape[2] < 1:
            raise ValueError(
                f"cond[{KEYFRAMES!r}] must be [B, {self.latent_channels}, K, H, W] with K >= 1, "
                f"got {tuple(latents.shape)}"
            )
        if frames.shape != latents.shape[:1] + latents.shape[2:3]:
            raise ValueError(
                f"cond[{KEYFRAME_FRAMES!r}] must be [B, K] = {[latents.shape[0], latents.shape[2]]}, one frame "
                f"index per keyframe of cond[{KEYFRAMES!r}], got {tuple(frames.shape)}"
            )
        if not bool(((frames >= 1) & (frames == frames.round())).all()):
            raise ValueError(
                f"cond[{KEYFRAME_FRAMES!r}] must hold whole numbers >= 1 (pixel frame indices; frame 0 is "
                f"cond[{CONDITION!r}]'s), got {frames.tolist()}"
            )

    def conditioned_frames(self, x_t: Tensor, cond: Mapping[str, Tensor]) -> int:
        """How many leading latent frames ``cond['condition_latent']`` replaces (0 without it).

        Raises:
            ValueError: if the condition has more frames than ``x_t`` or another height and width.
        """
        condition = cond.get(CONDITION)
        if condition is None:
            return 0
        if condition.shape[2] > x_t.shape[2] or condition.shape[3:] != x_t.shape[3:]:
            raise ValueError(
                f"cond[{CONDITION!r}] spans {tuple(condition.shape[2:])} (frames, height, width); x_t spans "
                f"{tuple(x_t.shape[2:])}: expected at most as many frames and the same height and width"
            )
        return condition.shape[2]

    def keyframe_count(self, x_t: Tensor, cond: Mapping[str, Tensor]) -> int:
        """How many keyframes ``cond`` prepends (0 without them).

        Raises:
            ValueError: if their height and width are not those of ``x_t``.
        """
        keyframes = cond.get(KEYFRAMES)
        if keyframes is None:
            return 0
        if keyframes.shape[3:] != x_t.shape[3:]:
            raise ValueError(
                f"cond[{KEYFRAMES!r}] spans {tuple(keyframes.shape[3:])} (height, width); x_t spans "
                f"{tuple(x_t.shape[3:])}: expected the same height and width"
            )
        return keyframes.shape[2]

    def noisy_tokens(self, x_t: Tensor, cond: Mapping[str, Tensor]) -> Float[Tensor, " tokens"]:
        """1 for each token the transformer sees that carries noise, 0 on the keyframes and the conditioned frames.

        Token order as the pipeline's: the keyframes' tokens first, then those
        of ``x_t`` (frame, row, column). The pipeline's ``1 - conditioning_mask``
        for strength-1 conditions.
        """
        frames, height, width = x_t.shape[2:]
        keyframes = self.keyframe_count(x_t, cond)
        noisy = torch.ones(keyframes + frames, height * width, dtype=torch.float32, device=x_t.device)
        noisy[: keyframes + self.conditioned_frames(x_t, cond)] = 0.0
        return noisy.flatten()

    def keyframe_coords(self, x_t: Tensor, frames: Tensor) -> Float[Tensor, "batch 3 tokens"]:
        r"""The pipeline's ``video_coords`` of keyframes at pixel frames ``frames`` ``[B, K]``: each a one-frame grid,

        .. math:: (h, w) \mapsto \big(k / \text{fps},\; c_s h,\; c_s w\big)

        (the causal first frame of a one-frame latent sits at pixel 0, then
        moves to ``k``), keyframe after keyframe.
        """
        height, width = x_t.shape[3:]
        spatial = self.vae_compression[1]
        rows, columns = torch.meshgrid(torch.arange(height, device=x_t.device), torch.arange(width, device=x_t.device),
                                       indexing="ij")
        grid = torch.stack([rows.flatten() * spatial, columns.flatten() * spatial]).float()  # [2, H W]
        batch, count = frames.shape
        time = (frames.to(torch.float32) * (1.0 / self.frame_rate))[:, :, None].expand(batch, count, height * width)
        space = grid[None, :, None, :].expand(batch, 2, count, height * width)
        return torch.cat([time[:, None], space], dim=1).flatten(2)  # [B, 3, K H W], keyframe-major

    def video_coords(self, x_t: Tensor) -> Float[Tensor, "batch 3 tokens"]:
        r"""``LTXConditionPipeline``'s ``video_coords`` for the latent grid of ``x_t``.

        .. math:: (f, h, w) \mapsto \big(\max(c_t f + 1 - c_t, 0) / \text{fps},\; c_s h,\; c_s w\big)

        with ``c_t, c_s`` the VAE's temporal and spatial compressions: integer
        arithmetic, then float32, as the pipeline's ``_prepare_video_ids`` and
        ``_scale_video_ids`` do.
        """
        frames, height, width = x_t.shape[2:]
        temporal, spatial = self.vae_compression
        axes = (torch.arange(size, device=x_t.device) for size in (frames, height, width))
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij")).flatten(1)  # [3, F H W], integers
        grid = grid * torch.tensor([temporal, spatial, spatial], device=x_t.device)[:, None]
        grid[0] = (grid[0] + 1 - temporal).clamp(min=0)
        coords = grid.float()
        coords[0] = coords[0] * (1.0 / self.frame_rate)
        return coords.expand(x_t.shape[0], -1, -1)

    def injection_times(
        self, x_t: Tensor, t: Float[Tensor, " batch"], r: Float[Tensor, " batch"], cond: Mapping[str, Tensor]
    ) -> tuple[Float[Tensor, " n"], Float[Tensor, " n"]]:
        """The row's ``(t, r)``; with a condition or keyframes one pair per token, batch-major, ``(0, 0)`` on them."""
        if CONDITION not in cond and KEYFRAMES not in cond:
            return t, r
        noisy = self.noisy_tokens(x_t, cond).to(t.dtype)
        return (t[:, None] * noisy).flatten(), (r[:, None] * noisy).flatten()

    def run_backbone(self, x_t: Tensor, timestep: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        """The pipeline's call: keyframe tokens prepended, the first frames replaced by the condition, per-token
        timesteps; the keyframes' prediction dropped and the velocity 0 on the conditioned frames."""
        conditioned, keyframes = self.conditioned_frames(x_t, cond), self.keyframe_count(x_t, cond)
        hidden_states, timesteps = x_t, timestep[:, None]  # the pipeline's [B, 1] without a condition
        if conditioned:
            hidden_states = torch.cat([cond[CONDITION].to(x_t.dtype), x_t[:, :, conditioned:]], dim=2)
        tokens, coords = pack_video_patches(hidden_states), self.video_coords(x_t)
        if keyframes:
            tokens = torch.cat([pack_video_patches(cond[KEYFRAMES].to(x_t.dtype)), tokens], dim=1)
            coords = torch.cat([self.keyframe_coords(x_t, cond[KEYFRAME_FRAMES]), coords], dim=2)
        if conditioned or keyframes:
            timesteps = timesteps * self.noisy_tokens(x_t, cond)
        tokens = self.transformer(
            hidden_states=tokens,
            encoder_hidden_states=cond["encoder_hidden_states"],
            timestep=timesteps,
            encoder_attention_mask=cond.get("encoder_attention_mask"),
            video_coords=coords,
            return_dict=False,
        )[0]
        frames, height, width = x_t.shape[2:]
        prediction = unpack_video_patches(tokens[:, keyframes * height * width:], frames, height, width)
        if not conditioned:
            return prediction
        return torch.cat([torch.zeros_like(prediction[:, :, :conditioned]), prediction[:, :, conditioned:]], dim=2)


def adapt(
    transformer: object,
    *,
    target_time: bool = True,
    sign: bool = True,
    frame_rate: float = 25.0,
    vae_temporal_compression: int = 8,
    vae_spatial_compression: int = 32,
) -> LTXConditionAdapter:
    """Adapt an ``LTXVideoTransformer3DModel`` in place for ``LTXConditionPipeline``'s call; return the protocol model.

    Raises:
        ValueError: as :func:`twinloss_adapters.ltx_video.adapt`, and for patch sizes other than 1.
    """
    return LTXConditionAdapter(
        transformer,
        target_time=target_time,
        sign=sign,
        frame_rate=frame_rate,
        vae_temporal_compression=vae_temporal_compression,
        vae_spatial_compression=vae_spatial_compression,
    )


from_pretrained = pipeline_from_pretrained(LTXConditionAdapter)
