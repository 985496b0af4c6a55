"""Wan 2.1 / 2.2 (``WanTransformer3DModel``) as a twinloss model.

``WanPipeline`` calls the transformer on video latents ``[B, C, F, H, W]``
with ``timestep = 1000 t`` (flow matching, ``t = 1`` noise); it predicts
``z - x``. ``condition_embedder.time_embedder`` produces ``temb``, from which
``condition_embedder.time_proj`` computes every block's modulation and the
output norm takes its shift/scale: the TwinFlow embeddings are added there.

Conditioning:

* ``encoder_hidden_states`` ``[B, L, text_dim]`` (umT5), required;
* ``encoder_hidden_states_image`` ``[B, L_img, image_dim]`` (CLIP image
  tokens), required exactly for image-to-video models (``image_dim`` set);
* ``latent_condition`` ``[B, in_channels - out_channels, F, H, W]``, required
  exactly when the model takes extra input channels (Wan I2V concatenates
  the encoded first frame and its mask to the noisy latent); it is
  concatenated along channels before the call, so ``x_t`` and the velocity
  keep the ``out_channels`` layout.

Per-token timesteps (Wan 2.2 TI2V's ``[B, tokens]`` timestep) are not used:
twinloss gives one time per row.
"""

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from twinloss_adapters._imports import require_diffusers
from twinloss_adapters.base import AdaptedTransformer, check_backbone_class, check_video_latent, unadapt
from twinloss_adapters.conventions import TimeConvention

__all__ = ["WanAdapter", "adapt", "from_pretrained", "unadapt"]


def _stock_class() -> type:
    return require_diffusers().WanTransformer3DModel


class WanAdapter(AdaptedTransformer):
    """``WanTransformer3DModel`` behind the protocol; latents ``[B, C, F, H, W]``."""

    required_cond = ("encoder_hidden_states",)

    def __init__(self, transformer: object, *, target_time: bool = True, sign: bool = True) -> None:
        check_backbone_class(transformer, _stock_class())
        config = transformer.config
        self.latent_channels = config.out_channels or config.in_channels
        self.condition_channels = config.in_channels - self.latent_channels
        if self.condition_channels < 0:
            raise ValueError(
                f"transformer takes {config.in_channels} channels but predicts {self.latent_channels}; "
                "expected in_channels >= out_channels"
            )
        required = ["encoder_hidden_states"]
        if config.image_dim is not None:
            required.append("encoder_hidden_states_image")
        if self.condition_channels:
            required.append("latent_condition")
        self.required_cond = tuple(required)
        self.cond_widths = {"encoder_hidden_states": config.text_dim}
        super().__init__(
            transformer,
            time_convention=TimeConvention(scale=1000.0),
            embedder_path="condition_embedder.time_embedder",
            embedding_dim=config.num_attention_heads * config.attention_head_dim,
            target_time=target_time,
            sign=sign,
        )

    def check_latent(self, x_t: Tensor) -> None:
        check_video_latent(x_t, self.latent_channels, tuple(self.transformer.config.patch_size), "Wan")

    def check_cond(self, cond: Mapping[str, Tensor], batch_size: int) -> None:
        super().check_cond(cond, batch_size)
        if self.condition_channels:
            condition = cond["latent_condition"]
            if condition.ndim != 5 or condition.shape[1] != self.condition_channels:
                raise ValueError(
                    f"cond['latent_condition'] must be [B, {self.condition_channels}, F, H, W], "
                    f"got {tuple(condition.shape)}"
                )

    def run_backbone(self, x_t: Tensor, timestep: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        hidden_states = x_t
        if self.condition_channels:
            condition = cond["latent_condition"]
            if condition.shape[2:] != x_t.shape[2:]:
                raise ValueError(
                    f"cond['latent_condition'] spans {tuple(condition.shape[2:])} but x_t spans {tuple(x_t.shape[2:])}"
                )
            hidden_states = torch.cat([x_t, condition.to(x_t.dtype)], dim=1)
        return self.transformer(
            hidden_states=hidden_states,
            timestep=timestep,
            encoder_hidden_states=cond["encoder_hidden_states"],
            encoder_hidden_states_image=cond.get("encoder_hidden_states_image"),
            return_dict=False,
        )[0]


def adapt(transformer: object, *, target_time: bool = True, sign: bool = True) -> WanAdapter:
    """Adapt a ``WanTransformer3DModel`` in place and return the protocol model.

    Raises:
        ValueError: if ``transformer`` is not a ``WanTransformer3DModel`` or is already adapted.
    """
    return WanAdapter(transformer, target_time=target_time, sign=sign)



def from_pretrained(
    pretrained_model_name_or_path: str, *, subfolder: str | None = "transformer", **kwargs: object
) -> WanAdapter:
    """Load a Wan transformer with ``from_pretrained`` and adapt it."""
    transformer = _stock_class().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
    return adapt(transformer)
