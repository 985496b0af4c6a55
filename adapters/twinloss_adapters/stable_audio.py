r"""Stable Audio Open (``StableAudioDiTModel``, ``StableAudioPipeline``) as a twinloss model on the cosine path.

Stable Audio is trained with a v-objective and sampled by
``CosineDPMSolverMultistepScheduler`` in EDM form (``sigma_data = 1``): the
sample is ``y = x + sigma z``, the model sees
``c_in y = y / sqrt(1 + sigma^2)`` at the timestep
``precondition_noise(sigma) = atan(sigma) 2 / pi``, and its output ``F`` gives
the data estimate ``c_skip y + c_out F`` with ``c_skip = 1 / (1 + sigma^2)``
and ``c_out = -sigma / sqrt(1 + sigma^2)``. With ``theta = atan(sigma)`` and
``t = 2 theta / pi``:

.. math::
    c_\text{in}\, y = \cos\theta\, x + \sin\theta\, z = x_t \text{ of } \texttt{CosinePath} \text{ at } t,
    \qquad \hat x = \cos\theta\, x_t - \sin\theta\, F,

so the timestep *is* twinloss's time on :class:`twinloss.paths.CosinePath`
(``a = sin(pi t / 2)``, ``b = cos(pi t / 2)``), the model's input is that
path's ``x_t``, and ``F = cos(theta) z - sin(theta) x`` is the v-prediction,
whose time derivative of ``x_t`` is

.. math:: \frac{d x_t}{d t} = \frac{\pi}{2} (\cos\theta\, z - \sin\theta\, x) = \frac{\pi}{2} F.

The adapter therefore feeds ``timestep = |t|`` and returns ``(pi / 2) F``
(``TimeConvention(scale=1, output_scale=pi / 2)``): the velocity on the cosine
path. Train it with ``TwinFlowLoss(path=CosinePath())``; the pipeline's
``sigma_max = 500`` is ``t = 0.99873``, and ``t = 1`` (pure noise) is
accepted too.

The DiT has no adaLN: the timestep's embedding ``timestep_proj(time_proj(t))``
``[B, D]`` is added to the projected global (duration) token that is prepended
to the sequence. The TwinFlow embeddings are added to ``timestep_proj``'s
output, so they reach every token through that global token.

Conditioning:

* ``encoder_hidden_states`` ``[B, L, cross_attention_input_dim]``: the
  pipeline's ``text_audio_duration_embeds`` (T5 states with the start and end
  duration tokens), required;
* ``global_hidden_states`` ``[B, G, global_states_input_dim]``: the
  pipeline's ``audio_duration_embeds`` (``G = 1``), required.

Latents are ``[B, C, T]`` (the audio VAE's channels and frames); the rotary
embedding spans the ``G + T`` tokens, as in the pipeline.
"""

import math
from collections.abc import Mapping

from torch import Tensor

from twinloss_adapters._imports import require_diffusers
from twinloss_adapters.base import (
    AdaptedTransformer,
    check_backbone_class,
    check_velocity_channels,
    pipeline_from_pretrained,
    unadapt,
)
from twinloss_adapters.conventions import TimeConvention

__all__ = ["StableAudioAdapter", "TIME_CONVENTION", "adapt", "from_pretrained", "unadapt"]

TIME_CONVENTION = TimeConvention(scale=1.0, output_scale=0.5 * math.pi)
"""``timestep = |t|`` on the cosine path; velocity ``(pi / 2)`` times the v-prediction."""


class StableAudioAdapter(AdaptedTransformer):
    """``StableAudioDiTModel`` behind the protocol; latents ``[B, C, T]``, time and velocity on the cosine path."""

    required_cond = ("encoder_hidden_states", "global_hidden_states")

    def __init__(self, transformer: object, *, target_time: bool = True, sign: bool = True) -> None:
        check_backbone_class(transformer, require_diffusers().StableAudioDiTModel)
        config = transformer.config
        check_velocity_channels(config.in_channels, config.out_channels)
        self.latent_channels = config.in_channels
        self.rotary_dim = config.attention_head_dim // 2  # the pipeline's rotary_embed_dim
        self.cond_widths = {
            "encoder_hidden_states": config.cross_attention_input_dim,
            "global_hidden_states": config.global_states_input_dim,
        }
        super().__init__(
            transformer,
            time_convention=TIME_CONVENTION,
            embedder_path="timestep_proj",
            embedding_dim=config.num_attention_heads * config.attention_head_dim,
            target_time=target_time,
            sign=sign,
        )

    def check_latent(self, x_t: Tensor) -> None:
        if x_t.ndim != 3 or x_t.shape[1] != self.latent_channels or x_t.shape[2] < 1:
            raise ValueError(
                f"x_t must be an audio latent [B, {self.latent_channels}, T] for this Stable Audio model, "
                f"got {tuple(x_t.shape)}"
            )

    def run_backbone(self, x_t: Tensor, timestep: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        """The pipeline's call: the rotary embedding over the global and audio tokens; the v-prediction."""
        global_states = cond["global_hidden_states"]
        if global_states.ndim != 3:
            raise ValueError(
                f"cond['global_hidden_states'] must be [B, G, D] (G = 1 in the pipeline), got {tuple(global_states.shape)}"
            )
        require_diffusers()
        from diffusers.models.embeddings import get_1d_rotary_pos_embed

        rotary = get_1d_rotary_pos_embed(
            self.rotary_dim, x_t.shape[2] + global_states.shape[1], use_real=True, repeat_interleave_real=False
        )
        return self.transformer(
            x_t,
            timestep,
            encoder_hidden_states=cond["encoder_hidden_states"],
            global_hidden_states=global_states,
            rotary_embedding=tuple(part.to(x_t.device) for part in rotary),
            return_dict=False,
        )[0]


def adapt(transformer: object, *, target_time: bool = True, sign: bool = True) -> StableAudioAdapter:
    """Adapt a ``StableAudioDiTModel`` in place and return the protocol model (cosine path; see the module).

    Raises:
        ValueError: if ``transformer`` is not a ``StableAudioDiTModel``, predicts
            another channel count than it takes, or is already adapted.
    """
    return StableAudioAdapter(transformer, target_time=target_time, sign=sign)


from_pretrained = pipeline_from_pretrained(StableAudioAdapter)
