r"""LTX-Video with conditioning frames (``LTXConditionPipeline``) on the stock ``LTXVideoTransformer3DModel``.

``LTXConditionPipeline`` differs from ``LTXPipeline`` in two ways the model sees:

* positions: it passes ``video_coords`` ``[B, 3, F H W]`` instead of the grid
  size and rotary scale: latent frame ``f``, row ``h`` and column ``w`` at
  ``(max(8 f + 1 - 8, 0) / frame_rate, 32 h, 32 w)`` for the VAE's
  compressions 8 (time) and 32 (space), the causal first frame at time 0;
* times: one timestep per token, ``min(1000 t, 1000 (1 - m))`` with ``m`` the
  condition's strength on that token's frame (0 on the frames it generates).

An image or video condition at frame index 0 (image to video, video
continuation) *replaces* the first latent frames. With strength ``m`` the
pipeline starts them at ``lerp(noise, condition, m)``, the condition at the
noise level ``c = 1 - m``, holds them there while ``t > c`` (timestep
``1000 c``, never updated) and generates them with the rest of the video
from ``t = c`` on; strength 1 holds them at the condition itself. An image
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
* ``condition_strength`` ``[B]``, optional, with ``condition_latent``: its
  strength ``m`` per row, ``0 < m <= 1`` (*default* 1, the pipeline's);
* ``keyframe_latents`` ``[B, C, K, H, W]`` with ``keyframe_frames``
  ``[B, K]``, optional and together: ``K`` image conditions of strength 1,
  latent ``k`` (one latent frame, normalised as above) at pixel frame index
  ``keyframe_frames[:, k]``, a whole number >= 1 (the pipeline's
  ``frame_index``; frame 0 is ``condition_latent``'s). They are prepended in
  order, as the pipeline prepends its conditions;
* ``video_condition_latent`` ``[B, C, n, H, W]``, ``n >= 2``, with
  ``video_condition_frame`` ``[B]``, optional and together: a video of
  strength 1 at pixel frame index ``k >= 1``. As the pipeline splits it, its
  first two latent frames are prepended after the keyframes, at pixel frames
  ``k`` and ``k + 1``, and the other ``n - 2`` replace the latent frames from
  ``k // 8 + 2`` on (8 the VAE's temporal compression), which must lie inside
  ``x_t`` and apart from ``condition_latent``'s.

**The replaced frames on the protocol's path** (``condition_latent``'s and a
later video's) run on the pipeline's clock, each at its level
``min(|t|, 1 - m)``: the stock timestep ``1000 min(|t|, 1 - m)``, the twin
times ``(sign(t) min(|t|, 1 - m), sign(r) min(|r|, 1 - m))``, the state read
off the line from the condition through ``x_t`` and the velocity sliding
along it while held (:mod:`twinloss_adapters.held_frames`). A sampler thus
passes ``lerp(z, x_c, m)`` at level ``1 - m`` and ends a strength-1 frame at
the condition; train with the condition as the video's frames there.
Keyframes are data on both trajectories and not part of the
state: their tokens get ``(t, r) = (0, 0)``, the stock timestep 0 as in the
pipeline, no jump and no sign.

Not expressed: keyframes and later videos with strength below 1 (the
pipeline generates their prepended tokens with the video's, so they would
have to be part of the state), more than one later video per call, and the
pipeline's ``image_cond_noise_scale`` jitter of the condition during
sampling (a sampler may pass the jittered latent as ``condition_latent`` or
``keyframe_latents``).
"""

from collections.abc import Mapping

import torch
from jaxtyping import Float
from torch import Tensor

from twinloss_adapters.base import pipeline_from_pretrained, unadapt
from twinloss_adapters.held_frames import condition_level, held_frames_velocity
from twinloss_adapters.ltx_video import LTXVideoAdapter
from twinloss_adapters.packing import pack_video_patches, unpack_video_patches

__all__ = [
    "CONDITION", "KEYFRAMES", "KEYFRAME_FRAMES", "PREFIX_FRAMES", "STRENGTH", "VIDEO", "VIDEO_FRAME",
    "LTXConditionAdapter", "adapt", "from_pretrained", "unadapt",
]

CONDITION = "condition_latent"
"""The conditioning key of the first frames' latent ``[B, C, F_c, H, W]``."""

STRENGTH = "condition_strength"
"""The conditioning key of the condition's strength per row ``[B]``, ``0 < m <= 1`` (1 when absent)."""

KEYFRAMES = "keyframe_latents"
"""The conditioning key of the keyframes' latents ``[B, C, K, H, W]``, one latent frame each."""

KEYFRAME_FRAMES = "keyframe_frames"
"""The conditioning key of the keyframes' pixel frame indices ``[B, K]`` (whole numbers >= 1)."""

VIDEO = "video_condition_latent"
"""The conditioning key of a video condition at a later frame index ``[B, C, n, H, W]``, ``n >= 2`` latent frames."""

VIDEO_FRAME = "video_condition_frame"
"""The conditioning key of that video's pixel frame index per row ``[B]`` (a whole number >= 1)."""

PREFIX_FRAMES = 2
"""The latent frames of a later video condition that the pipeline prepends (its ``num_prefix_latent_frames``)."""


class LTXConditionAdapter(LTXVideoAdapter):
    """``LTXVideoTransformer3DModel`` called as ``LTXConditionPipeline`` calls it; latents ``[B, C, F, H, W]``.

    Args: as :class:`~twinloss_adapters.ltx_video.LTXVideoAdapter`.
    """

    optional_cond = (*LTXVideoAdapter.optional_cond, CONDITION, STRENGTH, KEYFRAMES, KEYFRAME_FRAMES, VIDEO, VIDEO_FRAME)
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
        for key, least in ((CONDITION, 1), (KEYFRAMES, 1), (VIDEO, PREFIX_FRAMES)):
            latent = cond.get(key)
            if latent is not None and (latent.ndim != 5 or latent.shape[1] != self.latent_channels or latent.shape[2] < least):
                raise ValueError(
                    f"cond[{key!r}] must be [B, {self.latent_channels}, frames, H, W] with frames >= {least}, "
                    f"got {tuple(latent.shape)}" + (f" (an image at a later frame is cond[{KEYFRAMES!r}])" if key == VIDEO else "")
                )
        strength = cond.get(STRENGTH)
        if strength is not None and CONDITION not in cond:
            raise ValueError(f"cond[{STRENGTH!r}] needs cond[{CONDITION!r}]: it is the strength of that condition")
        if strength is not None and (strength.shape != (batch_size,) or not bool(((strength > 0) & (strength <= 1)).all())):
            raise ValueError(
                f"cond[{STRENGTH!r}] must be [B] = [{batch_size}] with 0 < strength <= 1 (a strength of 0 would "
                f"ignore the condition), got shape {tuple(strength.shape)} and values {strength.tolist()}"
            )
        for latents, frames, shape in ((KEYFRAMES, KEYFRAME_FRAMES, "[B, K]"), (VIDEO, VIDEO_FRAME, "[B]")):
            if (latents in cond) != (frames in cond):
                given, absent = (latents, frames) if latents in cond else (frames, latents)
                raise ValueError(f"cond[{given!r}] needs cond[{absent!r}]: a condition there is a latent and its frame index")
            if latents not in cond:
                continue
            expected = cond[latents].shape[:1] + (cond[latents].shape[2:3] if latents == KEYFRAMES else ())
            if cond[frames].shape != expected:
                raise ValueError(
                    f"cond[{frames!r}] must be {shape} = {list(expected)}, one pixel frame index per row"
                    f"{' and keyframe' if latents == KEYFRAMES else ''} of cond[{latents!r}], got {tuple(cond[frames].shape)}"
                )
            if not bool(((cond[frames] >= 1) & (cond[frames] == cond[frames].round())).all()):
                raise ValueError(
                    f"cond[{frames!r}] must hold whole numbers >= 1 (pixel frame indices; frame 0 is "
                    f"cond[{CONDITION!r}]'s), got {cond[frames].tolist()}"
                )

    def _check_grid(self, key: str, latent: Tensor, x_t: Tensor) -> None:
        if latent.shape[3:] != x_t.shape[3:]:
            raise ValueError(
                f"cond[{key!r}] spans {tuple(latent.shape[3:])} (height, width); x_t spans "
                f"{tuple(x_t.shape[3:])}: expected the same height and width"
            )

    def prepended(self, x_t: Tensor, cond: Mapping[str, Tensor]) -> tuple[Tensor, Tensor] | None:
        """What the pipeline prepends to the video's tokens, as one-frame latents ``[B, C, P, H, W]`` and their pixel
        frame indices ``[B, P]`` (``None`` when nothing is): the keyframes, then the first :data:`PREFIX_FRAMES`
        latent frames of a later video condition at pixel frames ``k`` and ``k + 1``, where the pipeline's
        ``_scale_video_ids`` places a two-frame latent (the causal frame at ``k``, the next one pixel frame later).

        Raises:
            ValueError: if their height and width are not those of ``x_t``.
        """
        latents, frames = [], []
        if KEYFRAMES in cond:
            self._check_grid(KEYFRAMES, cond[KEYFRAMES], x_t)
            latents.append(cond[KEYFRAMES])
            frames.append(cond[KEYFRAME_FRAMES].to(torch.float32))
        if VIDEO in cond:
            self._check_grid(VIDEO, cond[VIDEO], x_t)
            latents.append(cond[VIDEO][:, :, :PREFIX_FRAMES])
            index = cond[VIDEO_FRAME].to(torch.float32)
            frames.append(torch.stack([index + offset for offset in range(PREFIX_FRAMES)], dim=1))
        if not latents:
            return None
        return torch.cat(latents, dim=2).to(x_t.dtype), torch.cat(frames, dim=1)

    def conditioned_frames(self, x_t: Tensor, cond: Mapping[str, Tensor]) -> int:
        """How many leading latent frames ``condition_latent`` replaces (0 without it).

        Raises:
            ValueError: if it has more frames than ``x_t`` or another height and width.
        """
        if CONDITION not in cond:
            return 0
        condition = cond[CONDITION]
        self._check_grid(CONDITION, condition, x_t)
        if condition.shape[2] > x_t.shape[2]:
            raise ValueError(
                f"cond[{CONDITION!r}] spans {condition.shape[2]} frames; x_t has {x_t.shape[2]}: expected at most as many"
            )
        return condition.shape[2]

    def video_starts(self, x_t: Tensor, cond: Mapping[str, Tensor]) -> list[int]:
        """Per row, the first latent frame a later video replaces: the pipeline's ``start_frame = k // c_t + 2``
        (``c_t`` the VAE's temporal compression); empty without a later video or with one of two frames only.

        Raises:
            ValueError: if its replaced frames do not fit into ``x_t`` or overlap ``condition_latent``'s.
        """
        rest = cond[VIDEO].shape[2] - PREFIX_FRAMES if VIDEO in cond else 0
        if not rest:
            return []
        self._check_grid(VIDEO, cond[VIDEO], x_t)
        frames, first = x_t.shape[2], self.conditioned_frames(x_t, cond)
        starts = []
        for row, index in enumerate(cond[VIDEO_FRAME].tolist()):
            start = int(index) // self.vae_compression[0] + PREFIX_FRAMES
            if start + rest > frames:
                raise ValueError(
                    f"cond[{VIDEO!r}] at pixel frame {int(index)} (cond[{VIDEO_FRAME!r}], row {row}) replaces "
                    f"latent frames {start}..{start + rest - 1}; x_t has {frames}: trim the video or move it earlier"
                )
            if start < first:
                raise ValueError(
                    f"cond[{VIDEO!r}] at pixel frame {int(index)} (row {row}) replaces latent frame {start}, "
                    f"which cond[{CONDITION!r}] replaces too: expected conditions on distinct frames"
                )
            starts.append(start)
        return starts

    def frame_strengths(self, x_t: Tensor, cond: Mapping[str, Tensor]) -> Float[Tensor, "batch frames"]:
        """Each latent frame's strength ``[B, F]``: ``condition_strength`` (*default* 1) on ``condition_latent``'s
        frames, 1 on a later video's, 0 on the frames generated from noise."""
        strength = torch.zeros(x_t.shape[:1] + x_t.shape[2:3], dtype=torch.float32, device=x_t.device)
        first = self.conditioned_frames(x_t, cond)
        strength[:, :first] = cond[STRENGTH].to(torch.float32)[:, None] if STRENGTH in cond else 1.0
        rest = cond[VIDEO].shape[2] - PREFIX_FRAMES if VIDEO in cond else 0
        for row, start in enumerate(self.video_starts(x_t, cond)):
            strength[row, start : start + rest] = 1.0
        return strength

    def frame_conditions(self, x_t: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        """The condition that replaces each latent frame of ``x_t``, ``[B, C, F, H, W]`` (0 on the generated ones)."""
        latent = torch.zeros_like(x_t)
        first = self.conditioned_frames(x_t, cond)
        latent[:, :, :first] = cond[CONDITION].to(x_t.dtype) if first else 0.0
        for row, start in enumerate(self.video_starts(x_t, cond)):
            rest = cond[VIDEO][row, :, PREFIX_FRAMES:]
            latent[row, :, start : start + rest.shape[1]] = rest.to(x_t.dtype)
        return latent

    def conditioning_mask(self, x_t: Tensor, cond: Mapping[str, Tensor]) -> Float[Tensor, "batch tokens"]:
        """The pipeline's ``conditioning_mask``: 1 on the prepended tokens, each frame's strength on its tokens.

        Token order as the pipeline's: the prepended tokens first, then those
        of ``x_t`` (frame, row, column).
        """
        prepended = self.prepended(x_t, cond)
        count = 0 if prepended is None else prepended[0].shape[2]
        strength = self.frame_strengths(x_t, cond)
        mask = torch.cat([strength.new_ones(strength.shape[0], count), strength], dim=1)
        return mask.repeat_interleave(x_t.shape[3] * x_t.shape[4], dim=1)

    def token_times(
        self, x_t: Tensor, times: Float[Tensor, " batch"], cond: Mapping[str, Tensor]
    ) -> Float[Tensor, "batch tokens"]:
        """Each token's signed time for the rows' ``times``: 0 on the prepended tokens, :func:`condition_level` at
        its frame's hold ``1 - m`` elsewhere (the row's time on a frame generated from noise, ``m = 0``)."""
        prepended = self.prepended(x_t, cond)
        count = 0 if prepended is None else prepended[0].shape[2]
        strength = self.frame_strengths(x_t, cond).to(times.dtype)
        per_frame = torch.cat([times.new_zeros(times.shape[0], count), condition_level(times[:, None], 1 - strength)], 1)
        return per_frame.repeat_interleave(x_t.shape[3] * x_t.shape[4], dim=1)

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
        """The row's ``(t, r)``; with any condition one pair per token, batch-major (:meth:`token_times`)."""
        if not any(key in cond for key in (CONDITION, KEYFRAMES, VIDEO)):
            return t, r
        return self.token_times(x_t, t, cond).flatten(), self.token_times(x_t, r, cond).flatten()

    def velocity(self, x_t: Tensor, t: Tensor, r: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        """The stock call with each replaced frame on its own clock
        (:func:`~twinloss_adapters.held_frames.held_frames_velocity`, held at ``1 - m``)."""
        if CONDITION not in cond and VIDEO not in cond:
            return super().velocity(x_t, t, r, cond)
        hold = 1 - self.frame_strengths(x_t, cond)
        return held_frames_velocity(lambda state: super(LTXConditionAdapter, self).velocity(state, t, r, cond),
                                    x_t, t, r, self.frame_conditions(x_t, cond), hold)

    def run_backbone(self, x_t: Tensor, timestep: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        """The pipeline's call: the prepended tokens first, per-token timesteps ``min(timestep, 1000 (1 - mask))``;
        their prediction dropped. ``x_t`` already holds each replaced frame at its level (:meth:`forward`)."""
        prepended = self.prepended(x_t, cond)
        count = 0 if prepended is None else prepended[0].shape[2]
        timesteps = timestep[:, None]  # the pipeline's [B, 1] without a condition
        tokens, coords = pack_video_patches(x_t), self.video_coords(x_t)
        if prepended is not None:
            tokens = torch.cat([pack_video_patches(prepended[0]), tokens], dim=1)
            coords = torch.cat([self.keyframe_coords(x_t, prepended[1]), coords], dim=2)
        if any(key in cond for key in (CONDITION, KEYFRAMES, VIDEO)):
            ceiling = (1 - self.conditioning_mask(x_t, cond)) * self.time_convention.scale
            timesteps = torch.minimum(timesteps, ceiling.to(timesteps.dtype))
        tokens = self.transformer(
            hidden_states=tokens,
            encoder_hidden_states=cond["encoder_hidden_states"],
            timestep=timesteps,
            encoder_attention_mask=cond.get("encoder_attention_mask"),
            video_coords=coords,
            return_dict=False,
        )[0]
        frames, height, width = x_t.shape[2:]
        return unpack_video_patches(tokens[:, count * height * width:], frames, height, width)


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
