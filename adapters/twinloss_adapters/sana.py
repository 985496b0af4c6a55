"""SANA (``SanaTransformer2DModel``) as a twinloss model.

Stock SANA is called by ``SanaPipeline`` with ``timestep = 1000 t *
config.timestep_scale`` (flow matching, ``t = 1`` noise) and predicts the
flow-match velocity ``z - x``, the twinloss velocity. Its time embedding
``time_embed.emb.timestep_embedder`` (or ``time_embed.timestep_embedder`` when
built with ``guidance_embeds``) feeds ``time_embed.linear``, the adaLN-single
modulation of every block and the output norm: the TwinFlow embeddings are
added there, before any modulation.

Conditioning (all batch-leading):

* ``encoder_hidden_states`` ``[B, L, caption_channels]``, required;
* ``encoder_attention_mask`` ``[B, L]`` (1 keep, 0 pad), optional;
* ``guidance`` ``[B]``, required exactly when the model has guidance embeddings.
"""

from collections.abc import Mapping

from torch import Tensor, nn

from twinloss_adapters._imports import require_diffusers
from twinloss_adapters.base import AdaptedTransformer, check_backbone_class, unadapt
from twinloss_adapters.conventions import TimeConvention

__all__ = ["SanaAdapter", "adapt", "from_pretrained", "unadapt"]


def _stock_class() -> type:
    return require_diffusers().SanaTransformer2DModel


class SanaAdapter(AdaptedTransformer):
    """``SanaTransformer2DModel`` behind the protocol; latents ``[B, C, H, W]``."""

    required_cond = ("encoder_hidden_states",)
    optional_cond = ("encoder_attention_mask",)

    def __init__(self, transformer: object, *, target_time: bool = True, sign: bool = True) -> None:
        check_backbone_class(transformer, _stock_class())
        config = transformer.config
        out_channels = config.out_channels or config.in_channels
        if out_channels != config.in_channels:
            raise ValueError(
                f"transformer predicts {out_channels} channels for {config.in_channels} input channels; "
                "a velocity must have the latent's shape"
            )
        guidance = bool(config.guidance_embeds)
        self.cond_widths = {"encoder_hidden_states": config.caption_channels}
        self.cond_masks = {"encoder_attention_mask": "encoder_hidden_states"}
        super().__init__(
            transformer,
            time_convention=TimeConvention(scale=1000.0 * float(config.timestep_scale)),
            embedder_path="time_embed.timestep_embedder" if guidance else "time_embed.emb.timestep_embedder",
            embedding_dim=config.num_attention_heads * config.attention_head_dim,
            target_time=target_time,
            sign=sign,
            guidance_inputs=("guidance",) if guidance else (),
        )

    def check_latent(self, x_t: Tensor) -> None:
        config = self.transformer.config
        patch = config.patch_size
        if x_t.ndim != 4 or x_t.shape[1] != config.in_channels:
            raise ValueError(
                f"x_t must be [B, {config.in_channels}, H, W] for this SANA model, got {tuple(x_t.shape)}"
            )
        if x_t.shape[2] % patch or x_t.shape[3] % patch:
            raise ValueError(f"x_t height and width must be multiples of patch_size {patch}, got {tuple(x_t.shape)}")

    def run_backbone(self, x_t: Tensor, timestep: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        return self.transformer(
            hidden_states=x_t,
            encoder_hidden_states=cond["encoder_hidden_states"],
            timestep=timestep,
            guidance=cond.get("guidance"),
            encoder_attention_mask=cond.get("encoder_attention_mask"),
            return_dict=False,
        )[0]


def adapt(transformer: object, *, target_time: bool = True, sign: bool = True) -> SanaAdapter:
    """Adapt a ``SanaTransformer2DModel`` in place and return the protocol model.

    Args:
        transformer: the stock diffusers SANA transformer (LoRA layers injected
            through diffusers' ``add_adapter`` are fine).
        target_time: add the gated target-time embedding (needed for ``r != t``).
        sign: add the sign embedding (needed for the twin trajectory ``t < 0``).

    Raises:
        ValueError: if ``transformer`` is not a ``SanaTransformer2DModel``, is
            already adapted, or predicts a different channel count.
    """
    return SanaAdapter(transformer, target_time=target_time, sign=sign)



def from_pretrained(
    pretrained_model_name_or_path: str, *, subfolder: str | None = "transformer", **kwargs: object
) -> SanaAdapter:
    """Load a SANA transformer with ``from_pretrained`` and adapt it (target time and sign on)."""
    transformer = _stock_class().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
    return adapt(transformer)
