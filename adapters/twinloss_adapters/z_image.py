"""Z-Image (``ZImageTransformer2DModel``) as a twinloss model.

``ZImagePipeline`` counts time the other way round and predicts the opposite
velocity: it calls the transformer with ``timestep = 1 - t`` (``t = 1`` noise;
the class multiplies by ``config.t_scale`` = 1000 inside) and uses
``-output`` as the flow-match velocity ``z - x``. The transformer takes lists:
one latent ``[C, 1, H, W]`` and one caption ``[L_i, cap_feat_dim]`` (its valid
tokens only) per image, with ``patch_size=2, f_patch_size=1``. The TwinFlow
embeddings are added to ``t_embedder``, whose output is the ``adaln_input``
every modulated block and the final layer use.

The adapter takes and returns latents as ``[B, C, H, W]``. Conditioning:

* ``encoder_hidden_states`` ``[B, L, cap_feat_dim]``, required;
* ``encoder_attention_mask`` ``[B, L]`` (1 keep, 0 drop), optional: the
  kept tokens of each row form its caption, as the pipeline's
  ``prompt_embeds[i][mask[i]]``.

``time_embedding="twinflow_release"`` reproduces TwinFlow-Z-Image-Turbo-exp:
a copy of the stock embedder, ``t_embedder_2``, adds
:func:`~twinloss_adapters.time_embedding.z_image_release_delta`. That
embedding cannot tell ``t`` from ``-t`` at ``r = t``; with ``sign=True``
(the default) twinloss's zero-init sign embedding is added for TwinFlow
training, which leaves the release's outputs unchanged until trained.
"""

from collections.abc import Mapping

import torch
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
from twinloss_adapters.time_embedding import Z_IMAGE_RELEASE_NAME, z_image_release

__all__ = ["ZImageAdapter", "adapt", "from_pretrained", "unadapt"]

PATCH_SIZE = 2
FRAME_PATCH_SIZE = 1
"""The patch sizes ``ZImagePipeline`` calls the transformer with."""


def _stock_class() -> type:
    return require_diffusers().ZImageTransformer2DModel


class ZImageAdapter(AdaptedTransformer):
    """``ZImageTransformer2DModel`` behind the protocol; latents ``[B, C, H, W]``."""

    required_cond = ("encoder_hidden_states",)
    optional_cond = ("encoder_attention_mask",)

    from_pretrained = releases.adapter_from_pretrained(_stock_class, Z_IMAGE_RELEASE_NAME)

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
        config = transformer.config
        patch_pairs = list(zip(config.all_patch_size, config.all_f_patch_size, strict=True))
        if (PATCH_SIZE, FRAME_PATCH_SIZE) not in patch_pairs:
            raise ValueError(
                f"transformer has patch sizes {patch_pairs}; ZImagePipeline calls it with "
                f"(patch_size, f_patch_size) = {(PATCH_SIZE, FRAME_PATCH_SIZE)}"
            )
        release = z_image_release(config.t_scale) if time_embedding == RELEASE_TIME_EMBEDDING else None
        self.cond_widths = {"encoder_hidden_states": config.cap_feat_dim}
        self.cond_masks = {"encoder_attention_mask": "encoder_hidden_states"}
        super().__init__(
            transformer,
            time_convention=TimeConvention(scale=1.0, reversed=True, output_sign=-1),
            embedder_path="t_embedder",
            embedding_dim=transformer.t_embedder.mlp[-1].out_features,
            target_time=target_time,
            sign=sign,
            release=release,
        )

    def check_latent(self, x_t: Tensor) -> None:
        check_image_latent(x_t, self.transformer.config.in_channels, PATCH_SIZE, "Z-Image")

    def run_backbone(self, x_t: Tensor, timestep: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        captions = cond["encoder_hidden_states"]
        mask = cond.get("encoder_attention_mask")
        if mask is not None:  # its [B, L] shape checked by check_cond (cond_masks)
            caption_list = [row[keep.bool()] for row, keep in zip(captions, mask, strict=True)]
        else:
            caption_list = list(captions.unbind(dim=0))
        outputs = self.transformer(
            list(x_t.unsqueeze(2).unbind(dim=0)),
            timestep,
            caption_list,
            patch_size=PATCH_SIZE,
            f_patch_size=FRAME_PATCH_SIZE,
            return_dict=False,
        )[0]
        return torch.stack(outputs, dim=0).squeeze(2)


def adapt(
    transformer: object,
    *,
    target_time: bool = True,
    sign: bool = True,
    time_embedding: str = TWINFLOW_TIME_EMBEDDING,
) -> ZImageAdapter:
    """Adapt a ``ZImageTransformer2DModel`` in place and return the protocol model.

    Args:
        transformer: the stock diffusers Z-Image transformer.
        target_time: embed the target time (must stay True for the release).
        sign: accept the twin trajectory ``t < 0`` (adds the sign embedding).
        time_embedding: ``"twinflow"`` (twinloss's zero-init embedding) or
            ``"twinflow_release"`` (TwinFlow-Z-Image-Turbo-exp's, initialised
            as a copy of the stock embedder, as the authors do). Recorded as
            ``adapted.time_embedding_kind``.

    Raises:
        ValueError: if ``transformer`` is not a ``ZImageTransformer2DModel``,
            lacks the pipeline's patch sizes or is already adapted; for an
            unknown ``time_embedding``, or ``target_time=False`` with the release.
    """
    return ZImageAdapter(transformer, target_time=target_time, sign=sign, time_embedding=time_embedding)


from_pretrained = releases.pipeline_from_pretrained(
    ZImageAdapter, _stock_class, Z_IMAGE_RELEASE_NAME, release="TwinFlow-Z-Image-Turbo-exp"
)
