"""ACE-Step 1.5 (``AceStepTransformer1DModel``), a music-generation flow DiT, as a twinloss model.

``AceStepPipeline`` denoises acoustic latents ``[B, T, acoustic_dim]`` (the
project's sequence layout ``[B, L, D]``; 25 latent frames per second) and
calls the transformer with ``timestep = t`` in ``[0, 1]`` (``t = 1`` noise;
the class scales by 1000 inside its sinusoid) and ``timestep_r = t``; the
Euler step ``x + (t_next - t) v`` reads the prediction as ``v = z - x``.

The class is a mean-flow model: a second embedder takes ``t - r``
(``time_embed_r``), so the adapter passes ``r`` to ``timestep_r`` and adds
only the sign embedding (:class:`~twinloss_adapters.native_flow_map.FlowMapAdapter`).
The sign goes into ``time_embed.linear_2``, whose output ``temb`` makes both
the blocks' six-way modulation (``time_proj``) and the output shift/scale.

Conditioning:

* ``encoder_hidden_states`` ``[B, L, encoder_hidden_size]``: the condition
  encoder's packed text, lyric and timbre sequence, required;
* ``context_latents`` ``[B, T, in_channels - acoustic_dim]``: source latents
  and chunk mask, concatenated (silence latents and ones for text-to-music),
  required.
"""

from collections.abc import Mapping

from torch import Tensor

from twinloss_adapters._imports import require_diffusers
from twinloss_adapters.base import check_backbone_class, pipeline_from_pretrained, unadapt
from twinloss_adapters.conventions import TimeConvention
from twinloss_adapters.native_flow_map import FlowMapAdapter

__all__ = ["AceStepAdapter", "adapt", "from_pretrained", "unadapt"]


def _stock_class() -> type:
    return require_diffusers().AceStepTransformer1DModel


class AceStepAdapter(FlowMapAdapter):
    """``AceStepTransformer1DModel`` behind the protocol; latents ``[B, T, acoustic_dim]``.

    Args:
        transformer: the stock transformer.
        target_time: accept ``r != t`` (passed to ``timestep_r``); with False,
            ``r`` must equal ``t``.
        sign: add the sign embedding (needed for TwinFlow training).
    """

    required_cond = ("encoder_hidden_states", "context_latents")

    def __init__(self, transformer: object, *, target_time: bool = True, sign: bool = True) -> None:
        check_backbone_class(transformer, _stock_class())
        config = transformer.config
        self.acoustic_dim = config.audio_acoustic_hidden_dim
        self.context_dim = config.in_channels - self.acoustic_dim
        if self.context_dim < 0:
            raise ValueError(
                f"transformer takes {config.in_channels} channels but predicts {self.acoustic_dim}; "
                "expected in_channels >= audio_acoustic_hidden_dim"
            )
        # the condition encoder's output feeds condition_embedder = Linear(encoder_hidden_size or hidden_size, ...)
        self.cond_widths = {"encoder_hidden_states": config.encoder_hidden_size or config.hidden_size}
        super().__init__(
            transformer,
            time_convention=TimeConvention(scale=1.0),
            embedder_path="time_embed.linear_2",
            embedding_dim=config.hidden_size,
            target_time=target_time,
            sign=sign,
        )

    def check_latent(self, x_t: Tensor) -> None:
        if x_t.ndim != 3 or x_t.shape[2] != self.acoustic_dim:
            raise ValueError(
                f"x_t must be acoustic latents [B, T, {self.acoustic_dim}] for this ACE-Step model, got {tuple(x_t.shape)}"
            )

    def check_cond(self, cond: Mapping[str, Tensor], batch_size: int) -> None:
        super().check_cond(cond, batch_size)
        context = cond["context_latents"]
        if context.ndim != 3 or context.shape[2] != self.context_dim:
            raise ValueError(
                f"cond['context_latents'] must be [B, T, {self.context_dim}] (source latents and chunk mask), "
                f"got {tuple(context.shape)}"
            )

    def run_flow_map(
        self, x_t: Tensor, timestep: Tensor, target_timestep: Tensor, cond: Mapping[str, Tensor]
    ) -> Tensor:
        context = cond["context_latents"]
        if context.shape[1] != x_t.shape[1]:
            raise ValueError(f"cond['context_latents'] spans {context.shape[1]} frames but x_t spans {x_t.shape[1]}")
        return self.transformer(
            hidden_states=x_t,
            timestep=timestep.to(x_t.dtype),  # the pipeline's dtype; the class feeds it to its Linear as is
            timestep_r=target_timestep.to(x_t.dtype),
            encoder_hidden_states=cond["encoder_hidden_states"],
            context_latents=context,
            return_dict=False,
        )[0]


def adapt(transformer: object, *, target_time: bool = True, sign: bool = True) -> AceStepAdapter:
    """Adapt an ``AceStepTransformer1DModel`` in place and return the protocol model.

    Raises:
        ValueError: if ``transformer`` is not an ``AceStepTransformer1DModel``,
            has fewer input than output channels, or is already adapted.
    """
    return AceStepAdapter(transformer, target_time=target_time, sign=sign)


from_pretrained = pipeline_from_pretrained(AceStepAdapter)
