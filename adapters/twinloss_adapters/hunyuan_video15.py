"""HunyuanVideo 1.5 (``HunyuanVideo15Transformer3DModel``), text- and image-to-video, as a twinloss model.

``HunyuanVideo15Pipeline`` and ``HunyuanVideo15ImageToVideoPipeline`` call the
transformer on ``[latents, condition latents, condition mask]`` concatenated
along channels (``in_channels = 2 C + 1``), with ``timestep = 1000 t`` (flow
matching, ``t = 1`` noise), two text streams (Qwen2.5-VL and ByT5) and SigLIP
image embeddings; the prediction is ``z - x``. Text-to-video passes zeros for
the condition latents, the mask and the image embeddings; image-to-video puts
the encoded first frame in frame 0 of the condition latents and ones in frame
0 of the mask. There is no guidance input (the pipelines use a guider).

``time_embed.timestep_embedder`` gives the ``temb`` of every block and of the
output norm; the TwinFlow embeddings are added to its output (the text token
refiner keeps its own time embedding of ``|t|``). The mean-flow variants
(``use_meanflow=True``, step-distilled checkpoints) embed the next timestep
themselves (``timestep_r = 1000 r``): for them ``adapt`` returns a
:class:`~twinloss_adapters.native_flow_map.FlowMapAdapter` that passes ``r`` there
and adds only the sign.

Conditioning:

* ``encoder_hidden_states`` ``[B, L, text_embed_dim]``, required, with
  optional ``encoder_attention_mask`` ``[B, L]`` (all ones if absent);
* ``encoder_hidden_states_2`` ``[B, L2, text_embed_2_dim]`` (ByT5), required,
  with optional ``encoder_attention_mask_2`` ``[B, L2]`` (all ones if absent);
* ``image_embeds`` ``[B, N, image_embed_dim]`` (SigLIP), optional: zeros with
  ``N = vision_tokens`` (text-to-video) if absent;
* ``latent_condition`` ``[B, C + 1, F, H, W]`` (condition latents and mask),
  optional: zeros (text-to-video) if absent.
"""

from collections.abc import Mapping

import torch
from torch import Tensor

from twinloss_adapters._imports import require_diffusers
from twinloss_adapters.base import (
    AdaptedTransformer,
    check_backbone_class,
    check_latent_condition,
    check_video_latent,
    latent_concat_channels,
    unadapt,
)
from twinloss_adapters.conventions import TimeConvention
from twinloss_adapters.native_flow_map import FlowMapAdapter

__all__ = ["HunyuanVideo15Adapter", "HunyuanVideo15MeanFlowAdapter", "adapt", "from_pretrained", "unadapt"]

VISION_TOKENS = 729  # HunyuanVideo15Pipeline.vision_num_semantic_tokens: SigLIP tokens, zeros for text-to-video
TIME_CONVENTION = TimeConvention(scale=1000.0)


def _stock_class() -> type:
    return require_diffusers().HunyuanVideo15Transformer3DModel


class _HunyuanVideo15Inputs:
    """The layout checks and the stock call shared by both adapters."""

    required_cond = ("encoder_hidden_states", "encoder_hidden_states_2")
    optional_cond = ("encoder_attention_mask", "encoder_attention_mask_2", "image_embeds", "latent_condition")
    transformer: torch.nn.Module

    def _read_config(self, transformer: object, vision_tokens: int) -> None:
        check_backbone_class(transformer, _stock_class())
        if vision_tokens < 1:
            raise ValueError(f"vision_tokens must be positive, got {vision_tokens}")
        config = transformer.config
        self.latent_channels, self.condition_channels = latent_concat_channels(
            config.in_channels, config.out_channels, "the HunyuanVideo 1.5 pipeline"
        )
        self.vision_tokens = vision_tokens
        self.cond_widths = {"encoder_hidden_states": config.text_embed_dim, "encoder_hidden_states_2": config.text_embed_2_dim}
        self.cond_masks = {"encoder_attention_mask": "encoder_hidden_states", "encoder_attention_mask_2": "encoder_hidden_states_2"}

    @staticmethod
    def _injection_arguments(transformer: object) -> dict[str, object]:
        """Where the TwinFlow embeddings go and how time is converted (the same for both adapters)."""
        config = transformer.config
        return {
            "time_convention": TIME_CONVENTION,
            "embedder_path": "time_embed.timestep_embedder",
            "embedding_dim": config.num_attention_heads * config.attention_head_dim,
        }

    def check_latent(self, x_t: Tensor) -> None:
        config = self.transformer.config
        patch = (config.patch_size_t, config.patch_size, config.patch_size)
        check_video_latent(x_t, self.latent_channels, patch, "HunyuanVideo 1.5")

    def check_cond(self, cond: Mapping[str, Tensor], batch_size: int) -> None:
        super().check_cond(cond, batch_size)
        if "latent_condition" in cond:
            check_latent_condition(cond["latent_condition"], self.condition_channels)

    def _call_stock(
        self, x_t: Tensor, timestep: Tensor, timestep_r: Tensor | None, cond: Mapping[str, Tensor]
    ) -> Tensor:
        batch_size = x_t.shape[0]
        condition = cond.get("latent_condition")
        if condition is None:
            condition = x_t.new_zeros(batch_size, self.condition_channels, *x_t.shape[2:])
        check_latent_condition(condition, self.condition_channels, x_t)
        image_embeds = cond.get("image_embeds")
        if image_embeds is None:
            image_embeds = x_t.new_zeros(batch_size, self.vision_tokens, self.transformer.config.image_embed_dim)
        text, text_2 = cond["encoder_hidden_states"], cond["encoder_hidden_states_2"]
        mask, mask_2 = cond.get("encoder_attention_mask"), cond.get("encoder_attention_mask_2")
        return self.transformer(
            hidden_states=torch.cat([x_t, condition.to(x_t.dtype)], dim=1),
            timestep=timestep.to(x_t.dtype),  # the pipelines cast t to the latent dtype
            timestep_r=None if timestep_r is None else timestep_r.to(x_t.dtype),
            encoder_hidden_states=text,
            encoder_attention_mask=text.new_ones(text.shape[:2]) if mask is None else mask,
            encoder_hidden_states_2=text_2,
            encoder_attention_mask_2=text_2.new_ones(text_2.shape[:2]) if mask_2 is None else mask_2,
            image_embeds=image_embeds,
            return_dict=False,
        )[0]


class HunyuanVideo15Adapter(_HunyuanVideo15Inputs, AdaptedTransformer):
    """``HunyuanVideo15Transformer3DModel`` (``use_meanflow=False``) behind the protocol; latents ``[B, C, F, H, W]``.

    Args:
        transformer: the stock transformer.
        target_time, sign: which TwinFlow embeddings to add.
        vision_tokens: SigLIP tokens of the zero image embedding used when
            ``image_embeds`` is absent (*default* 729, the pipeline's).
    """

    def __init__(
        self, transformer: object, *, target_time: bool = True, sign: bool = True, vision_tokens: int = VISION_TOKENS
    ) -> None:
        self._read_config(transformer, vision_tokens)
        if transformer.config.use_meanflow:
            raise ValueError("transformer has use_meanflow=True; adapt it with HunyuanVideo15MeanFlowAdapter (adapt() does)")
        super().__init__(transformer, **self._injection_arguments(transformer), target_time=target_time, sign=sign)

    def run_backbone(self, x_t: Tensor, timestep: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        return self._call_stock(x_t, timestep, None, cond)


class HunyuanVideo15MeanFlowAdapter(_HunyuanVideo15Inputs, FlowMapAdapter):
    """A mean-flow HunyuanVideo 1.5 (``use_meanflow=True``): ``r`` goes to ``timestep_r``; only the sign is added.

    Args:
        transformer: the stock transformer.
        target_time: accept ``r != t``; sign: add the sign embedding.
        vision_tokens: as for :class:`HunyuanVideo15Adapter`.
    """

    def __init__(
        self, transformer: object, *, target_time: bool = True, sign: bool = True, vision_tokens: int = VISION_TOKENS
    ) -> None:
        self._read_config(transformer, vision_tokens)
        if not transformer.config.use_meanflow:
            raise ValueError("transformer has use_meanflow=False; adapt it with HunyuanVideo15Adapter (adapt() does)")
        super().__init__(transformer, **self._injection_arguments(transformer), target_time=target_time, sign=sign)

    def run_flow_map(
        self, x_t: Tensor, timestep: Tensor, target_timestep: Tensor, cond: Mapping[str, Tensor]
    ) -> Tensor:
        return self._call_stock(x_t, timestep, target_timestep, cond)


def adapt(
    transformer: object, *, target_time: bool = True, sign: bool = True, vision_tokens: int = VISION_TOKENS
) -> HunyuanVideo15Adapter | HunyuanVideo15MeanFlowAdapter:
    """Adapt a ``HunyuanVideo15Transformer3DModel`` in place and return the protocol model.

    A mean-flow model (``use_meanflow=True``) gets :class:`HunyuanVideo15MeanFlowAdapter`.

    Raises:
        ValueError: if ``transformer`` is not a ``HunyuanVideo15Transformer3DModel``,
            its channels do not follow the pipelines' layout, or it is already adapted.
    """
    check_backbone_class(transformer, _stock_class())
    adapter_class = HunyuanVideo15MeanFlowAdapter if transformer.config.use_meanflow else HunyuanVideo15Adapter
    return adapter_class(transformer, target_time=target_time, sign=sign, vision_tokens=vision_tokens)


def from_pretrained(
    pretrained_model_name_or_path: str, *, subfolder: str | None = "transformer", **kwargs: object
) -> HunyuanVideo15Adapter | HunyuanVideo15MeanFlowAdapter:
    """The adapter class's ``from_pretrained``, with a pipeline repository's ``subfolder`` default; see ``docs/saving.md``.

    The class is chosen from the checkpoint's ``config.json`` as :func:`adapt`
    chooses it: :class:`HunyuanVideo15MeanFlowAdapter` if ``use_meanflow``,
    else :class:`HunyuanVideo15Adapter`. ``kwargs`` are the adapter's options
    (``target_time``, ``sign``, ``vision_tokens``) and the stock loader's.
    """
    from twinloss_adapters.persistence import hub_arguments as select_hub_arguments

    hub_arguments = select_hub_arguments(kwargs)
    config = _stock_class().load_config(pretrained_model_name_or_path, subfolder=subfolder, **hub_arguments)
    adapter_class = HunyuanVideo15MeanFlowAdapter if config.get("use_meanflow", False) else HunyuanVideo15Adapter
    return adapter_class.from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
