"""Wan 2.2 TI2V 5B (``WanTransformer3DModel`` under ``expand_timesteps=True``) as a twinloss model.

With the pipelines' ``expand_timesteps`` flag the transformer takes one
timestep per token, ``[B, F' H' W']`` (patches in frame, row, column order):
``1000 |t|`` on every token (``WanPipeline``, text to video), except that
``WanImageToVideoPipeline`` conditions on an image by *replacing* the first
latent frame with the image's latent and giving that frame's tokens the
timestep 0. The time embedder then returns ``[B, L, D]`` and every block and
the output norm modulate per token; the TwinFlow embedding is added per token
(:class:`~twinloss_adapters.time_embedding.PerTokenTimeEmbeddingInjection`).
Time units, the prediction ``z - x`` and the text input are Wan's
(:mod:`twinloss_adapters.wan`).

Conditioning: as Wan text-to-video, plus

* ``first_frame_latent`` ``[B, C, 1, H, W]``, optional: the image's latent,
  normalised with the VAE's mean and std (the pipeline's ``condition``).

The conditioned frame is held at the image for the whole run (strength 1):
the backbone reads the image there, its tokens get ``(t, r) = (0, 0)`` (the
stock timestep 0 as in the pipeline, no jump and no sign, hence exactly the
pipeline's modulation there at every ``(t, r)`` and on both trajectories), and
the velocity there slides along the line from the image through ``x_t``,
``(x_t - x_c) / |t|`` (:mod:`twinloss_adapters.held_frames` at ``c = 0``). So
a sampler ends that frame at the image, as the pipeline's output has it, the
loss sends no gradient through it, and its target there is met when the
video's first frame is the image.
"""

from collections.abc import Mapping

import torch
from jaxtyping import Float
from torch import Tensor

from twinloss_adapters._imports import require_diffusers
from twinloss_adapters.base import check_backbone_class, pipeline_from_pretrained, unadapt
from twinloss_adapters.held_frames import held_frames_velocity
from twinloss_adapters.wan import WanAdapter

__all__ = ["FIRST_FRAME", "WanTI2VAdapter", "adapt", "from_pretrained", "unadapt"]

FIRST_FRAME = "first_frame_latent"
"""The conditioning key of the image's latent ``[B, C, 1, H, W]``."""


class WanTI2VAdapter(WanAdapter):
    """A ``WanTransformer3DModel`` called with per-token timesteps (Wan 2.2 TI2V 5B); latents ``[B, C, F, H, W]``."""

    optional_cond = (FIRST_FRAME,)
    per_token_timesteps = True

    def __init__(self, transformer: object, *, target_time: bool = True, sign: bool = True) -> None:
        check_backbone_class(transformer, require_diffusers().WanTransformer3DModel)
        config = transformer.config
        if config.out_channels not in (None, config.in_channels):
            raise ValueError(
                f"transformer takes {config.in_channels} channels for {config.out_channels} predicted (Wan I2V's "
                "concatenated condition); Wan 2.2 TI2V replaces the first latent frame instead: use twinloss_adapters.wan"
            )
        if tuple(config.patch_size)[0] != 1:
            raise ValueError(
                f"transformer has patch_size {tuple(config.patch_size)}; per-token timesteps need a temporal patch "
                "of 1 (one latent frame per token frame)"
            )
        super().__init__(transformer, target_time=target_time, sign=sign)

    def check_cond(self, cond: Mapping[str, Tensor], batch_size: int) -> None:
        super().check_cond(cond, batch_size)
        first_frame = cond.get(FIRST_FRAME)
        if first_frame is not None and (first_frame.ndim != 5 or first_frame.shape[1:3] != (self.latent_channels, 1)):
            raise ValueError(
                f"cond[{FIRST_FRAME!r}] must be [B, {self.latent_channels}, 1, H, W] (one latent frame), "
                f"got {tuple(first_frame.shape)}"
            )

    def noisy_tokens(self, x_t: Tensor, cond: Mapping[str, Tensor]) -> Float[Tensor, " tokens"]:
        """1 for each token of ``x_t`` that carries noise, 0 for the conditioned first frame's tokens.

        In the transformer's token order: the pipeline's
        ``first_frame_mask[0][0][:, ::2, ::2].flatten()`` for the ``(1, 2, 2)``
        patch; all ones without ``cond['first_frame_latent']``.
        """
        _, patch_h, patch_w = self.transformer.config.patch_size
        frames, height, width = x_t.shape[2:]
        noisy = torch.ones(frames, height // patch_h, width // patch_w, dtype=torch.float32, device=x_t.device)
        if FIRST_FRAME in cond:
            noisy[0] = 0.0
        return noisy.flatten()

    def injection_times(
        self, x_t: Tensor, t: Float[Tensor, " batch"], r: Float[Tensor, " batch"], cond: Mapping[str, Tensor]
    ) -> tuple[Float[Tensor, " n"], Float[Tensor, " n"]]:
        """One ``(t, r)`` per token, batch-major: the row's, and ``(0, 0)`` on the conditioned first frame."""
        noisy = self.noisy_tokens(x_t, cond).to(t.dtype)
        return (t[:, None] * noisy).flatten(), (r[:, None] * noisy).flatten()

    def velocity(self, x_t: Tensor, t: Tensor, r: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        """The stock call; a conditioned first frame held at the image
        (:func:`~twinloss_adapters.held_frames.held_frames_velocity` at level 0)."""
        if FIRST_FRAME not in cond:
            return super().velocity(x_t, t, r, cond)
        first_frame = cond[FIRST_FRAME]
        if first_frame.shape[3:] != x_t.shape[3:]:
            raise ValueError(f"cond[{FIRST_FRAME!r}] spans {tuple(first_frame.shape[3:])} but x_t spans {tuple(x_t.shape[3:])}")
        condition = torch.zeros_like(x_t)
        condition[:, :, :1] = first_frame.to(x_t.dtype)
        hold = torch.ones(x_t.shape[:1] + x_t.shape[2:3], dtype=torch.float32, device=x_t.device)
        hold[:, 0] = 0.0
        return held_frames_velocity(lambda state: super(WanTI2VAdapter, self).velocity(state, t, r, cond),
                                    x_t, t, r, condition, hold)

    def run_backbone(self, x_t: Tensor, timestep: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        """The pipeline's call, ``[B, tokens]`` timesteps (0 on a conditioned first frame, which :meth:`forward`
        has set to the image)."""
        return self.transformer(
            hidden_states=x_t,
            timestep=timestep[:, None] * self.noisy_tokens(x_t, cond),
            encoder_hidden_states=cond["encoder_hidden_states"],
            encoder_hidden_states_image=cond.get("encoder_hidden_states_image"),
            return_dict=False,
        )[0]


def adapt(transformer: object, *, target_time: bool = True, sign: bool = True) -> WanTI2VAdapter:
    """Adapt a Wan 2.2 TI2V ``WanTransformer3DModel`` in place and return the protocol model.

    Raises:
        ValueError: if ``transformer`` is not a ``WanTransformer3DModel``, is
            already adapted, concatenates a condition along channels or has a
            temporal patch other than 1.
    """
    return WanTI2VAdapter(transformer, target_time=target_time, sign=sign)


from_pretrained = pipeline_from_pretrained(WanTI2VAdapter)
