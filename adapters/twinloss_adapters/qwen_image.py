"""Qwen-Image (``QwenImageTransformer2DModel``) as a twinloss model.

``QwenImagePipeline`` packs ``[B, C, H, W]`` latents into 2x2 patches
(``[B, HW/4, 4C]``), passes ``img_shapes = [[(1, H/2, W/2)]] * B`` for the
rotary embedding and calls the transformer with ``timestep = t`` in ``[0, 1]``
(the class scales by 1000 inside its ``Timesteps``). It predicts ``z - x``.
The TwinFlow embeddings are added to ``time_text_embed.timestep_embedder``,
whose output is the ``temb`` every block modulates with.

The adapter takes and returns latents as ``[B, C, H, W]`` (for the 5-D VAE
layout ``[B, C, 1, H, W]``, squeeze the frame axis) and builds ``img_shapes``
from ``H, W``. Conditioning:

* ``encoder_hidden_states`` ``[B, L, joint_attention_dim]``, required;
* ``encoder_hidden_states_mask`` ``[B, L]`` (1 valid, 0 padding), optional.

Edit (``zero_cond_t``) and layered (``use_layer3d_rope``,
``use_additional_t_cond``) variants carry reference-image tokens with their own
times; they are rejected with a ValueError rather than half-supported.
"""

from collections.abc import Mapping

from torch import Tensor, nn

from twinloss_adapters._imports import require_diffusers
from twinloss_adapters.base import AdaptedTransformer, check_backbone_class, unadapt
from twinloss_adapters.conventions import TimeConvention
from twinloss_adapters.packing import pack_image_patches, unpack_image_patches

__all__ = ["QwenImageAdapter", "adapt", "from_pretrained", "unadapt"]

UNSUPPORTED_FLAGS = ("zero_cond_t", "use_layer3d_rope", "use_additional_t_cond", "guidance_embeds")


def _stock_class() -> type:
    return require_diffusers().QwenImageTransformer2DModel


class QwenImageAdapter(AdaptedTransformer):
    """``QwenImageTransformer2DModel`` behind the protocol; latents ``[B, C, H, W]``."""

    required_cond = ("encoder_hidden_states",)
    optional_cond = ("encoder_hidden_states_mask",)

    def __init__(self, transformer: object, *, target_time: bool = True, sign: bool = True) -> None:
        check_backbone_class(transformer, _stock_class())
        config = transformer.config
        enabled = [flag for flag in UNSUPPORTED_FLAGS if getattr(config, flag, False)]
        if enabled:
            raise ValueError(
                f"transformer has {enabled} set; the Qwen-Image adapter supports the text-to-image "
                "model only (edit/layered variants condition extra tokens on their own times)"
            )
        patch = config.patch_size
        self.latent_channels = config.in_channels // (patch * patch)
        if self.latent_channels * patch * patch != config.in_channels or transformer.out_channels != self.latent_channels:
            raise ValueError(
                f"transformer maps {config.in_channels} packed channels to {transformer.out_channels}; "
                f"expected in_channels = out_channels * patch_size**2 (patch_size {patch})"
            )
        self.cond_widths = {"encoder_hidden_states": config.joint_attention_dim}
        self.cond_masks = {"encoder_hidden_states_mask": "encoder_hidden_states"}
        super().__init__(
            transformer,
            time_convention=TimeConvention(scale=1.0),
            embedder_path="time_text_embed.timestep_embedder",
            embedding_dim=transformer.inner_dim,
            target_time=target_time,
            sign=sign,
        )

    def check_latent(self, x_t: Tensor) -> None:
        patch = self.transformer.config.patch_size
        if x_t.ndim != 4 or x_t.shape[1] != self.latent_channels:
            raise ValueError(
                f"x_t must be [B, {self.latent_channels}, H, W] (unpacked latents) for this Qwen-Image model, "
                f"got {tuple(x_t.shape)}"
            )
        if x_t.shape[2] % patch or x_t.shape[3] % patch:
            raise ValueError(f"x_t height and width must be multiples of {patch} for patch packing, got {tuple(x_t.shape)}")

    def run_backbone(self, x_t: Tensor, timestep: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        patch = self.transformer.config.patch_size
        batch_size, _, height, width = x_t.shape
        img_shapes = [[(1, height // patch, width // patch)]] * batch_size
        tokens = self.transformer(
            hidden_states=pack_image_patches(x_t, patch),
            encoder_hidden_states=cond["encoder_hidden_states"],
            encoder_hidden_states_mask=cond.get("encoder_hidden_states_mask"),
            timestep=timestep,
            img_shapes=img_shapes,
            return_dict=False,
        )[0]
        return unpack_image_patches(tokens, height, width, patch)


def adapt(transformer: object, *, target_time: bool = True, sign: bool = True) -> QwenImageAdapter:
    """Adapt a ``QwenImageTransformer2DModel`` in place and return the protocol model.

    Raises:
        ValueError: if ``transformer`` is not a ``QwenImageTransformer2DModel``,
            is an edit/layered variant, or is already adapted.
    """
    return QwenImageAdapter(transformer, target_time=target_time, sign=sign)



def from_pretrained(
    pretrained_model_name_or_path: str, *, subfolder: str | None = "transformer", **kwargs: object
) -> QwenImageAdapter:
    """Load a Qwen-Image transformer with ``from_pretrained`` and adapt it."""
    transformer = _stock_class().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
    return adapt(transformer)
