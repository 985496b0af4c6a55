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

``time_embedding="twinflow_release"`` reproduces TwinFlow-Qwen-Image-v1.0:
signed ``t`` goes to the stock embedder (a signed
:class:`~twinloss_adapters.conventions.TimeConvention`) and a copy of it,
``time_text_embed_2``, adds ``(t - r) E_2(r)``
(:func:`~twinloss_adapters.time_embedding.qwen_image_release_delta`).
:func:`from_pretrained` loads the release by key name.

Edit (``zero_cond_t``) and layered (``use_layer3d_rope``,
``use_additional_t_cond``) variants carry reference-image tokens with their own
times; they are rejected with a ValueError rather than half-supported.
"""

from collections.abc import Mapping

from torch import Tensor

from twinloss_adapters import releases
from twinloss_adapters._imports import require_diffusers
from twinloss_adapters.base import (
    RELEASE_TIME_EMBEDDING,
    TWINFLOW_TIME_EMBEDDING,
    AdaptedTransformer,
    check_backbone_class,
    check_image_latent,
    check_time_embedding_kind,
    unadapt,
)
from twinloss_adapters.conventions import TimeConvention
from twinloss_adapters.packing import pack_image_patches, unpack_image_patches
from twinloss_adapters.time_embedding import QWEN_IMAGE_RELEASE_NAME, qwen_image_release

__all__ = ["QwenImageAdapter", "adapt", "from_pretrained", "unadapt"]

UNSUPPORTED_FLAGS = ("zero_cond_t", "use_layer3d_rope", "use_additional_t_cond", "guidance_embeds")


def _stock_class() -> type:
    return require_diffusers().QwenImageTransformer2DModel


class QwenImageAdapter(AdaptedTransformer):
    """``QwenImageTransformer2DModel`` behind the protocol; latents ``[B, C, H, W]``."""

    required_cond = ("encoder_hidden_states",)
    optional_cond = ("encoder_hidden_states_mask",)
    rejected_flags: tuple[str, ...] = UNSUPPORTED_FLAGS  # the edit adapter accepts zero_cond_t

    from_pretrained = releases.adapter_from_pretrained(_stock_class, QWEN_IMAGE_RELEASE_NAME)

    def __init__(
        self,
        transformer: object,
        *,
        target_time: bool = True,
        sign: bool = True,
        time_embedding: str = TWINFLOW_TIME_EMBEDDING,
    ) -> None:
        check_backbone_class(transformer, _stock_class())
        check_time_embedding_kind(time_embedding)
        release = qwen_image_release() if time_embedding == RELEASE_TIME_EMBEDDING else None
        config = transformer.config
        enabled = [flag for flag in self.rejected_flags if getattr(config, flag, False)]
        if enabled:
            raise ValueError(
                f"transformer has {enabled} set; {type(self).__name__} does not support it (edit models, "
                "zero_cond_t included: twinloss_adapters.qwen_image_edit; layered variants: not supported)"
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
            time_convention=TimeConvention(scale=1.0, signed=release is not None),
            embedder_path="time_text_embed" if release is not None else "time_text_embed.timestep_embedder",
            embedding_dim=transformer.inner_dim,
            target_time=target_time,
            sign=sign,
            release=release,
        )

    def check_latent(self, x_t: Tensor) -> None:
        patch = self.transformer.config.patch_size
        check_image_latent(x_t, self.latent_channels, patch, "Qwen-Image", layout=" (unpacked latents)")

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


def adapt(
    transformer: object,
    *,
    target_time: bool = True,
    sign: bool = True,
    time_embedding: str = TWINFLOW_TIME_EMBEDDING,
) -> QwenImageAdapter:
    """Adapt a ``QwenImageTransformer2DModel`` in place and return the protocol model.

    Args:
        transformer: the stock diffusers Qwen-Image transformer.
        target_time: embed the target time (must stay True for the release).
        sign: accept the twin trajectory ``t < 0``.
        time_embedding: ``"twinflow"`` (twinloss's zero-init embedding) or
            ``"twinflow_release"`` (TwinFlow-Qwen-Image-v1.0's, initialised as
            a copy of the stock embedder, as the authors do). Recorded as
            ``adapted.time_embedding_kind``.

    Raises:
        ValueError: if ``transformer`` is not a ``QwenImageTransformer2DModel``,
            is an edit/layered variant, or is already adapted; for an unknown
            ``time_embedding``, or ``target_time=False`` with the release.
    """
    return QwenImageAdapter(transformer, target_time=target_time, sign=sign, time_embedding=time_embedding)


from_pretrained = releases.pipeline_from_pretrained(
    QwenImageAdapter, _stock_class, QWEN_IMAGE_RELEASE_NAME, release="TwinFlow-Qwen-Image-v1.0"
)
