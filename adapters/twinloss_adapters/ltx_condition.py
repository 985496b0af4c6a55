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
  order, as the pipeline prepends its conditions.

**The conditioned frames on the protocol's path.** The protocol's state is
the interpolant ``x_t = |t| z + (1 - |t|) x`` on every frame, so on a
conditioned frame it sits on the line from the condition ``x_c`` (when the
video's first frames are the condition, as in image-to-video training)
through the noise. Each conditioned token runs on its own clock, the
pipeline's: its level is ``min(|t|, c)``. The adapter feeds the backbone the
state at that level, read off the line,

.. math:: p = x_c + \frac{\min(|t|, c)}{|t|} \,(x_t - x_c),

(``lerp(z, x_c, m)`` while held; ``x_t`` itself once generated), at the
stock timestep ``1000 min(|t|, c)`` and the twin times
``(sign(t) min(|t|, c), sign(r) min(|r|, c))``, and returns the average
velocity of the jump from ``|t|`` to ``|r|``: the held part of the jump slides
along the line, the generated part is the backbone's ``F``,

.. math:: u = \phi F + (1 - \phi) \frac{x_t - x_c}{|t|}, \qquad
   \phi = \frac{\min(|t|, c) - \min(|r|, c)}{|t| - |r|}
   \quad (\phi = [\,|t| \le c\,] \text{ when } r = t),

the share of the jump the token is generated in. So a sampler started from
noise passes ``lerp(z, x_c, m)`` at level ``c``, as the pipeline starts
there, and a strength-1 condition (``c = 0``, ``phi = 0``) ends at ``x_c``
(up to rounding): the sample's first frames are the condition. When ``c``
lies on a sampler's time grid its Euler steps are the pipeline's loop; off
the grid the pipeline carries the held frame from level ``c`` into the next
step as if it sat at that step's time, which the adapter does not copy. The loss sends
gradient through a conditioned frame only in its generated share ``phi``
(none at strength 1), and its target there is met exactly while the
frame is held. Keyframes are data on both trajectories and not part of the
state: their tokens get ``(t, r) = (0, 0)``, the stock timestep 0 as in the
pipeline, no jump and no sign.

Not expressed: keyframes with strength below 1 (the pipeline generates
their tokens with the video's, so they would have to be part of the
state), a video (several frames) as a condition at a later frame index
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

__all__ = [
    "CONDITION", "KEYFRAMES", "KEYFRAME_FRAMES", "STRENGTH", "LTXConditionAdapter", "adapt", "condition_level",
    "from_pretrained", "generated_share", "unadapt",
]

CONDITION = "condition_latent"
"""The conditioning key of the first frames' latent ``[B, C, F_c, H, W]``."""

STRENGTH = "condition_strength"
"""The conditioning key of the condition's strength per row ``[B]``, ``0 < m <= 1`` (1 when absent)."""

KEYFRAMES = "keyframe_latents"
"""The conditioning key of the keyframes' latents ``[B, C, K, H, W]``, one latent frame each."""

KEYFRAME_FRAMES = "keyframe_frames"
"""The conditioning key of the keyframes' pixel frame indices ``[B, K]`` (whole numbers >= 1)."""


def condition_level(time: Float[Tensor, " batch"], hold: Float[Tensor, " batch"]) -> Float[Tensor, " batch"]:
    r"""A conditioned frame's time on its own clock, held at the level ``c = 1 - m``: :math:`\operatorname{sign}(t) \min(|t|, c)`."""
    return time.sign() * torch.minimum(time.abs(), hold)


def generated_share(
    t: Float[Tensor, " batch"], r: Float[Tensor, " batch"], hold: Float[Tensor, " batch"]
) -> Float[Tensor, " batch"]:
    r"""The share of the jump from ``|t|`` to ``|r|`` in which a frame held at level ``c`` is generated,

    .. math:: \phi = \frac{\min(|t|, c) - \min(|r|, c)}{|t| - |r|},

    and its limit ``[|t| <= c]`` when ``|r| = |t|`` (the pipeline updates a
    held token from the step whose ``t`` reaches ``c``).
    """
    start, stop = t.abs(), r.abs()
    jump = start - stop
    moving = jump > 0
    share = (torch.minimum(start, hold) - torch.minimum(stop, hold)) / torch.where(moving, jump, 1.0)
    return torch.where(moving, share, (start <= hold).to(share.dtype))


class LTXConditionAdapter(LTXVideoAdapter):
    """``LTXVideoTransformer3DModel`` called as ``LTXConditionPipeline`` calls it; latents ``[B, C, F, H, W]``.

    Args: as :class:`~twinloss_adapters.ltx_video.LTXVideoAdapter`.
    """

    optional_cond = (*LTXVideoAdapter.optional_cond, CONDITION, STRENGTH, KEYFRAMES, KEYFRAME_FRAMES)
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
        strength = cond.get(STRENGTH)
        if strength is not None and condition is None:
            raise ValueError(f"cond[{STRENGTH!r}] needs cond[{CONDITION!r}]: it is the strength of that condition")
        if strength is not None and (strength.shape != (batch_size,) or not bool(((strength > 0) & (strength <= 1)).all())):
            raise ValueError(
                f"cond[{STRENGTH!r}] must be [B] = [{batch_size}] with 0 < strength <= 1 (a strength of 0 would "
                f"ignore the condition), got shape {tuple(strength.shape)} and values {strength.tolist()}"
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

    def hold(self, t: Float[Tensor, " batch"], cond: Mapping[str, Tensor]) -> Float[Tensor, " batch"]:
        """The level ``c = 1 - m`` each row holds its condition at: 0 at the default strength 1."""
        strength = cond.get(STRENGTH)
        return torch.zeros_like(t) if strength is None else 1.0 - strength.to(t.dtype)

    def conditioning_mask(self, x_t: Tensor, cond: Mapping[str, Tensor]) -> Float[Tensor, "batch tokens"]:
        """The pipeline's ``conditioning_mask``: 1 on the keyframes, ``m`` on the conditioned frames, 0 elsewhere.

        Token order as the pipeline's: the keyframes' tokens first, then those
        of ``x_t`` (frame, row, column).
        """
        frames, height, width = x_t.shape[2:]
        keyframes, conditioned = self.keyframe_count(x_t, cond), self.conditioned_frames(x_t, cond)
        mask = torch.zeros(x_t.shape[0], keyframes + frames, dtype=torch.float32, device=x_t.device)
        mask[:, :keyframes] = 1.0
        strength = cond.get(STRENGTH)
        mask[:, keyframes : keyframes + conditioned] = 1.0 if strength is None else strength.float()[:, None]
        return mask.repeat_interleave(height * width, dim=1)

    def token_times(
        self, x_t: Tensor, times: Float[Tensor, " batch"], cond: Mapping[str, Tensor]
    ) -> Float[Tensor, "batch tokens"]:
        """Each token's signed time for the rows' ``times``: 0 on the keyframes, :func:`condition_level` on the
        conditioned frames, the row's time elsewhere."""
        frames, height, width = x_t.shape[2:]
        keyframes, conditioned = self.keyframe_count(x_t, cond), self.conditioned_frames(x_t, cond)
        per_frame = times[:, None].repeat(1, keyframes + frames)
        per_frame[:, :keyframes] = 0.0
        if conditioned:
            per_frame[:, keyframes : keyframes + conditioned] = condition_level(times, self.hold(times, cond))[:, None]
        return per_frame.repeat_interleave(height * width, dim=1)

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
        """The row's ``(t, r)``; with a condition or keyframes one pair per token, batch-major (:meth:`token_times`)."""
        if CONDITION not in cond and KEYFRAMES not in cond:
            return t, r
        return self.token_times(x_t, t, cond).flatten(), self.token_times(x_t, r, cond).flatten()

    def forward(self, x_t: Tensor, t: Float[Tensor, " batch"], r: Float[Tensor, " batch"], **cond: Tensor) -> Tensor:
        r"""As :meth:`AdaptedTransformer.forward`; on the conditioned frames the backbone reads the state at their
        own level and the velocity slides along the line to the condition while they are held (module docstring):

        .. math:: u = \phi F(p) + (1 - \phi) (x_t - x_c) / |t|, \qquad p = x_c + \frac{\min(|t|, c)}{|t|} (x_t - x_c).
        """
        if CONDITION not in cond:
            return super().forward(x_t, t, r, **cond)
        self.check_call(x_t, t, r, cond)
        conditioned, hold = self.conditioned_frames(x_t, cond), self.hold(t, cond)
        shape = (-1, 1, 1, 1, 1)
        start, level = t.abs().to(x_t.dtype).view(shape), hold.to(x_t.dtype).view(shape)
        divisor = start.clamp_min(torch.finfo(x_t.dtype).tiny)  # |t| > c >= 0 wherever the line is read
        frames, condition = x_t[:, :, :conditioned], cond[CONDITION].to(x_t.dtype)
        offset = frames - condition
        on_line = condition + (torch.minimum(start, level) / divisor) * offset
        state = torch.cat([torch.where(start > level, on_line, frames), x_t[:, :, conditioned:]], dim=2)
        velocity = super().forward(state, t, r, **cond)
        share = generated_share(t, r, hold).to(velocity.dtype).view(shape)
        line = offset / divisor
        generated = velocity[:, :, :conditioned]
        mixed = torch.where(share == 1, generated, share * generated + (1 - share) * line)
        return torch.cat([mixed, velocity[:, :, conditioned:]], dim=2)

    def run_backbone(self, x_t: Tensor, timestep: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        """The pipeline's call: keyframe tokens prepended, per-token timesteps ``min(timestep, 1000 (1 - mask))``;
        the keyframes' prediction dropped. ``x_t`` already holds each conditioned frame at its level (:meth:`forward`)."""
        keyframes = self.keyframe_count(x_t, cond)
        timesteps = timestep[:, None]  # the pipeline's [B, 1] without a condition
        tokens, coords = pack_video_patches(x_t), self.video_coords(x_t)
        if keyframes:
            tokens = torch.cat([pack_video_patches(cond[KEYFRAMES].to(x_t.dtype)), tokens], dim=1)
            coords = torch.cat([self.keyframe_coords(x_t, cond[KEYFRAME_FRAMES]), coords], dim=2)
        if CONDITION in cond or keyframes:
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
        return unpack_video_patches(tokens[:, keyframes * height * width:], frames, height, width)


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
