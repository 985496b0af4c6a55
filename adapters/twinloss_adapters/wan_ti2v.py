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

The twin times on the conditioned frame: it is data, not noise, on both
trajectories, so its tokens get ``(t, r) = (0, 0)``: the stock timestep 0 as
in the pipeline, no jump and no sign, hence exactly the pipeline's modulation
there at every ``(t, r)`` and on both trajectories. It does not move either:
the adapter returns the velocity 0 on that frame (the pipeline discards its
prediction there and puts the condition back), so a sampler leaves that frame
of its state as it is and the loss sends no gradient through it. The sample's
first frame is the condition: put ``first_frame_latent`` there, as the
pipeline does after its last step.
"""

from collections.abc import Mapping

import torch
from jaxtyping import Float
from torch import Tensor

from twinloss_adapters._imports import require_diffusers
from twinloss_adapters.base import check_backbone_class, pipeline_from_pretrained, unadapt
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

    def run_backbone(self, x_t: Tensor, timestep: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        """The pipeline's call: the first frame replaced by the condition, ``[B, tokens]`` timesteps; velocity 0 there."""
        first_frame = cond.get(FIRST_FRAME)
        hidden_states = x_t
        if first_frame is not None:
            if first_frame.shape[3:] != x_t.shape[3:]:
                raise ValueError(
                    f"cond[{FIRST_FRAME!r}] spans {tuple(first_frame.shape[3:])} but x_t spans {tuple(x_t.shape[3:])}"
                )
            hidden_states = torch.cat([first_frame.to(x_t.dtype), x_t[:, :, 1:]], dim=2)
        prediction = self.transformer(
            hidden_states=hidden_states,
            timestep=timestep[:, None] * self.noisy_tokens(x_t, cond),
            encoder_hidden_states=cond["encoder_hidden_states"],
            encoder_hidden_states_image=cond.get("encoder_hidden_states_image"),
            return_dict=False,
        )[0]
        if first_frame is None:
            return prediction
        return torch.cat([torch.zeros_like(prediction[:, :, :1]), prediction[:, :, 1:]], dim=2)


def adapt(transformer: object, *, target_time: bool = True, sign: bool = True) -> WanTI2VAdapter:
    """Adapt a Wan 2.2 TI2V ``WanTransformer3DModel`` in place and return the protocol model.

    Raises:
        ValueError: if ``transformer`` is not a ``WanTransformer3DModel``, is
            already adapted, concatenates a condition along channels or has a
            temporal patch other than 1.
    """
    return WanTI2VAdapter(transformer, target_time=target_time, sign=sign)


from_pretrained = pipeline_from_pretrained(WanTI2VAdapter)
