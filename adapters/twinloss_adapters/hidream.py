"""HiDream-I1 (``HiDreamImageTransformer2DModel``) as a twinloss model.

``HiDreamImagePipeline`` calls the transformer on ``[B, C, H, W]`` latents
(it patchifies inside) with ``timesteps = 1000 t`` (flow matching, ``t = 1``
noise) and negates the prediction before the Euler step: the transformer
predicts ``x - z``, so the adapter's convention has ``output_sign=-1``.
``t_embedder.timestep_embedder`` gives the time embedding that is summed with
the pooled-text embedding into the ``temb`` of every adaLN modulation; the
TwinFlow embeddings are added to its output.

In training mode (unless the config sets ``force_inference_output``) the stock
class returns its patches as ``[B, C, tokens, p * p]`` instead of the image;
the adapter lays them out as ``[B, C, H, W]`` either way. Train in training
mode: in eval mode the stock mixture-of-experts runs its routed experts under
``torch.no_grad`` (``MOEFeedForwardSwiGLU.moe_infer``), so no gradient passes
through them (the shared expert and the modulation still carry one).

Conditioning (batch-leading, as the protocol asks):

* ``encoder_hidden_states_t5`` ``[B, L_t5, caption_channels[0]]``, required;
* ``encoder_hidden_states_llama3`` ``[B, N, L_llama, caption_channels[1]]``:
  the Llama hidden states of ``N`` layers, of which the model reads the
  ``llama_layers`` of its config; required. (The pipeline stacks them
  layer-first, ``[N, B, ...]``; the adapter moves the layer axis there.)
* ``pooled_embeds`` ``[B, text_emb_dim]`` (CLIP), required.
"""

from collections.abc import Mapping

from einops import rearrange
from torch import Tensor

from twinloss_adapters._imports import require_diffusers
from twinloss_adapters.base import (
    AdaptedTransformer,
    check_backbone_class,
    check_image_latent,
    check_velocity_channels,
    pipeline_from_pretrained,
    unadapt,
)
from twinloss_adapters.conventions import TimeConvention

__all__ = ["HiDreamAdapter", "adapt", "from_pretrained", "unadapt"]


def _stock_class() -> type:
    return require_diffusers().HiDreamImageTransformer2DModel


class HiDreamAdapter(AdaptedTransformer):
    """``HiDreamImageTransformer2DModel`` behind the protocol; latents ``[B, C, H, W]``."""

    required_cond = ("encoder_hidden_states_t5", "encoder_hidden_states_llama3", "pooled_embeds")

    def __init__(self, transformer: object, *, target_time: bool = True, sign: bool = True) -> None:
        check_backbone_class(transformer, _stock_class())
        config = transformer.config
        check_velocity_channels(config.in_channels, transformer.out_channels)
        self.llama_layers_needed = max(config.llama_layers) + 1
        t5_width, llama_width = config.caption_channels  # the class projects T5 with [0] and each Llama layer with [1]
        self.cond_widths = {
            "encoder_hidden_states_t5": t5_width,
            "encoder_hidden_states_llama3": llama_width,
            "pooled_embeds": config.text_emb_dim,
        }
        super().__init__(
            transformer,
            time_convention=TimeConvention(scale=1000.0, output_sign=-1),
            embedder_path="t_embedder.timestep_embedder",
            embedding_dim=transformer.inner_dim,
            target_time=target_time,
            sign=sign,
        )

    def check_latent(self, x_t: Tensor) -> None:
        config = self.transformer.config
        patch = config.patch_size
        check_image_latent(x_t, config.in_channels, patch, "HiDream")
        tokens = (x_t.shape[2] // patch) * (x_t.shape[3] // patch)
        if tokens > self.transformer.max_seq:
            raise ValueError(
                f"x_t spans {tokens} patches; this model's max_resolution allows at most {self.transformer.max_seq}"
            )

    def check_cond(self, cond: Mapping[str, Tensor], batch_size: int) -> None:
        super().check_cond(cond, batch_size)
        llama = cond["encoder_hidden_states_llama3"]
        if llama.ndim != 4 or llama.shape[1] < self.llama_layers_needed:
            raise ValueError(
                "cond['encoder_hidden_states_llama3'] must be [B, N, L, D] with N >= "
                f"{self.llama_layers_needed} Llama layers (the config reads layers {list(self.transformer.config.llama_layers)}), "
                f"got {tuple(llama.shape)}"
            )

    def run_backbone(self, x_t: Tensor, timestep: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        _, _, height, width = x_t.shape
        patch = self.transformer.config.patch_size
        output = self.transformer(
            hidden_states=x_t,
            timesteps=timestep,
            encoder_hidden_states_t5=cond["encoder_hidden_states_t5"],
            encoder_hidden_states_llama3=cond["encoder_hidden_states_llama3"].movedim(1, 0),
            pooled_embeds=cond["pooled_embeds"],
            return_dict=False,
        )[0]
        if self.transformer.training and not self.transformer.config.force_inference_output:
            # The training-mode layout [B, C, tokens (padded to max_seq if not square), p * p].
            grid_h, grid_w = height // patch, width // patch
            output = rearrange(
                output[:, :, : grid_h * grid_w], "b c (h w) (ph pw) -> b c (h ph) (w pw)", h=grid_h, ph=patch
            )
        return output


def adapt(transformer: object, *, target_time: bool = True, sign: bool = True) -> HiDreamAdapter:
    """Adapt a ``HiDreamImageTransformer2DModel`` in place and return the protocol model.

    Raises:
        ValueError: if ``transformer`` is not a ``HiDreamImageTransformer2DModel``,
            predicts another channel count, or is already adapted.
    """
    return HiDreamAdapter(transformer, target_time=target_time, sign=sign)


from_pretrained = pipeline_from_pretrained(HiDreamAdapter)
