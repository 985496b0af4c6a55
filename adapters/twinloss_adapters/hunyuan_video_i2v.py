"""HunyuanVideo image-to-video (``HunyuanVideoTransformer3DModel``, ``image_condition_type="latent_concat"``).

``HunyuanVideoImageToVideoPipeline`` with a ``latent_concat`` model calls the
transformer on ``[latents, image latents, mask]`` concatenated along channels
(``in_channels = 2 C + 1``): the encoded image in frame 0 of the image
latents (zeros after it) and ones in frame 0 of the mask. Time, guidance
(``1000 w``), text inputs and the prediction ``z - x`` are those of the
text-to-video model (:mod:`twinloss_adapters.hunyuan_video`), and so is the
place of the TwinFlow embeddings.

Conditioning: as :mod:`twinloss_adapters.hunyuan_video`, plus

* ``latent_condition`` ``[B, C + 1, F, H, W]`` (image latents and mask),
  required; it is concatenated after ``x_t``, so ``x_t`` and the velocity keep
  the ``C`` latent channels.

The ``token_replace`` variant is not supported: it overwrites the first
latent frame of ``x_t`` with the clean image and its prediction for that frame
is discarded by the pipeline, so the model has no velocity for part of ``x_t``.
"""

from collections.abc import Mapping

import torch
from torch import Tensor

from twinloss_adapters.base import check_latent_condition, latent_concat_channels, pipeline_from_pretrained, unadapt
from twinloss_adapters.hunyuan_video import HunyuanVideoAdapter

__all__ = ["HunyuanVideoImageToVideoAdapter", "adapt", "from_pretrained", "unadapt"]


class HunyuanVideoImageToVideoAdapter(HunyuanVideoAdapter):
    """A ``latent_concat`` HunyuanVideo image-to-video transformer behind the protocol; latents ``[B, C, F, H, W]``."""

    required_cond = ("encoder_hidden_states", "pooled_projections", "latent_condition")

    def _read_channels(self, config: object) -> None:
        if config.image_condition_type != "latent_concat":
            raise ValueError(
                f"transformer has image_condition_type={config.image_condition_type!r}; this adapter serves "
                "'latent_concat' (use twinloss_adapters.hunyuan_video for text-to-video; 'token_replace' is unsupported)"
            )
        self.latent_channels, self.condition_channels = latent_concat_channels(
            config.in_channels, config.out_channels, "latent_concat"
        )

    def check_cond(self, cond: Mapping[str, Tensor], batch_size: int) -> None:
        super().check_cond(cond, batch_size)
        check_latent_condition(cond["latent_condition"], self.condition_channels)

    def run_backbone(self, x_t: Tensor, timestep: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        condition = cond["latent_condition"]
        check_latent_condition(condition, self.condition_channels, x_t)
        return super().run_backbone(torch.cat([x_t, condition.to(x_t.dtype)], dim=1), timestep, cond)


def adapt(transformer: object, *, target_time: bool = True, sign: bool = True) -> HunyuanVideoImageToVideoAdapter:
    """Adapt a ``latent_concat`` HunyuanVideo image-to-video transformer in place and return the protocol model.

    Raises:
        ValueError: if ``transformer`` is not a ``HunyuanVideoTransformer3DModel``
            with ``image_condition_type="latent_concat"`` and the matching
            channels, or is already adapted.
    """
    return HunyuanVideoImageToVideoAdapter(transformer, target_time=target_time, sign=sign)


from_pretrained = pipeline_from_pretrained(HunyuanVideoImageToVideoAdapter)
