"""AnyFlow (``AnyFlowTransformer3DModel``), a native two-time flow-map video model, as a twinloss model.

``AnyFlowPipeline`` calls the transformer on per-frame latents
``[B, F, C, H, W]`` with two per-frame timesteps ``[B, F]``: the source
``timestep = 1000 t`` and the target ``r_timestep = 1000 r`` (flow matching,
``t = 1`` noise); the flow-map Euler step ``x_r = x_t - (t - r) u`` reads the
prediction as the average velocity ``u = z - x``. The model therefore already
embeds the target time, and the adapter passes ``r`` to its own
``r_timestep`` input: TwinFlow fine-tuning adds only the sign of ``t``.

The sign embedding is added to ``condition_embedder.time_embedder``'s output,
which feeds both the blocks' modulation (``time_proj``) and the output
shift/scale. That embedder sees the ``[B, F]`` timestep flattened to
``B * F`` rows, so the adapter uses the per-token injection
(:class:`~twinloss_adapters.time_embedding.PerTokenTimeEmbeddingInjection`).
The adapter takes and returns the twinloss video layout ``[B, C, F, H, W]``
and gives every frame the row's time.

Conditioning:

* ``encoder_hidden_states`` ``[B, L, text_dim]`` (umT5), required;
* ``encoder_hidden_states_image`` ``[B, L_img, image_dim]``, required exactly
  when the model was built with ``image_dim``.
"""

from collections.abc import Mapping

from torch import Tensor

from twinloss_adapters._imports import require_diffusers
from twinloss_adapters.base import (
    check_backbone_class,
    check_velocity_channels,
    check_video_latent,
    pipeline_from_pretrained,
    unadapt,
)
from twinloss_adapters.native_flow_map import FlowMapAdapter
from twinloss_adapters.wan import time_embedding_arguments

__all__ = ["AnyFlowAdapter", "adapt", "from_pretrained", "unadapt"]


def _stock_class() -> type:
    return require_diffusers().AnyFlowTransformer3DModel


class AnyFlowAdapter(FlowMapAdapter):
    """``AnyFlowTransformer3DModel`` behind the protocol; latents ``[B, C, F, H, W]``.

    Args:
        transformer: the stock transformer.
        target_time: accept ``r != t`` (the model embeds ``r`` natively; no
            module is added for it). With False, ``r`` must equal ``t``.
        sign: add the sign embedding (needed for TwinFlow training).
    """

    required_cond = ("encoder_hidden_states",)

    def __init__(self, transformer: object, *, target_time: bool = True, sign: bool = True) -> None:
        check_backbone_class(transformer, _stock_class())
        config = transformer.config
        check_velocity_channels(config.in_channels, config.out_channels or config.in_channels)
        self.cond_widths = {"encoder_hidden_states": config.text_dim}
        if config.image_dim is not None:
            self.required_cond = ("encoder_hidden_states", "encoder_hidden_states_image")
            self.cond_widths = {**self.cond_widths, "encoder_hidden_states_image": config.image_dim}
        self.latent_channels = config.in_channels
        super().__init__(
            transformer, **time_embedding_arguments(config), target_time=target_time, sign=sign, per_token_time=True
        )

    def check_latent(self, x_t: Tensor) -> None:
        check_video_latent(x_t, self.latent_channels, tuple(self.transformer.config.patch_size), "AnyFlow")

    def run_flow_map(
        self, x_t: Tensor, timestep: Tensor, target_timestep: Tensor, cond: Mapping[str, Tensor]
    ) -> Tensor:
        frames = x_t.shape[2]
        velocity = self.transformer(
            hidden_states=x_t.permute(0, 2, 1, 3, 4),
            timestep=timestep[:, None].expand(-1, frames),
            r_timestep=target_timestep[:, None].expand(-1, frames),
            encoder_hidden_states=cond["encoder_hidden_states"],
            encoder_hidden_states_image=cond.get("encoder_hidden_states_image"),
            return_dict=False,
        )[0]
        return velocity.permute(0, 2, 1, 3, 4)


def adapt(transformer: object, *, target_time: bool = True, sign: bool = True) -> AnyFlowAdapter:
    """Adapt an ``AnyFlowTransformer3DModel`` in place and return the protocol model.

    Raises:
        ValueError: if ``transformer`` is not an ``AnyFlowTransformer3DModel``,
            predicts another channel count, or is already adapted.
    """
    return AnyFlowAdapter(transformer, target_time=target_time, sign=sign)


from_pretrained = pipeline_from_pretrained(AnyFlowAdapter)
