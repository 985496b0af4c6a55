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

Wan 2.2 TI2V 5B's per-token timesteps (the pipelines' ``expand_timesteps``)
are served by :mod:`twinloss_adapters.wan_ti2v`.

Wan 2.2 A14B has two experts: ``WanPipeline`` runs ``transformer`` (high
noise) at timesteps ``>= boundary_ratio * 1000`` and ``transformer_2`` (low
noise) below. :func:`adapt_experts` adapts both and returns a
:class:`WanExpertsModel`, which sends every row of every call to the expert
its ``|t|`` belongs to, so each model call of the loss (a batch mixing times on
both sides of the boundary) and of the sampler routes per row.
"""

from collections.abc import Mapping

import json
import math
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor, nn

from twinloss._tensors import at_least_float32
from twinloss_adapters._imports import require_diffusers
from twinloss_adapters.base import (
    AdaptedTransformer,
    check_backbone_class,
    check_video_latent,
    pipeline_from_pretrained,
    unadapt,
)
from twinloss_adapters.conventions import TimeConvention

__all__ = ["WanAdapter", "WanExpertsModel", "adapt", "adapt_experts", "from_pretrained", "from_pretrained_experts", "unadapt"]


def time_embedding_arguments(config: object) -> dict[str, object]:
    """Where a Wan-architecture transformer (Wan, AnyFlow) takes the TwinFlow embeddings, and its time units.

    ``timestep = 1000 t``; ``condition_embedder.time_embedder`` returns ``temb``
    of width ``num_attention_heads * attention_head_dim``.
    """
    return {
        "time_convention": TimeConvention(scale=1000.0),
        "embedder_path": "condition_embedder.time_embedder",
        "embedding_dim": config.num_attention_heads * config.attention_head_dim,
    }


def _stock_class() -> type:
    return require_diffusers().WanTransformer3DModel


class WanAdapter(AdaptedTransformer):
    """``WanTransformer3DModel`` behind the protocol; latents ``[B, C, F, H, W]``."""

    required_cond = ("encoder_hidden_states",)
    per_token_timesteps = False
    """The stock call takes one timestep per token (:class:`~twinloss_adapters.wan_ti2v.WanTI2VAdapter`)."""

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
            transformer, **time_embedding_arguments(config), target_time=target_time, sign=sign,
            per_token_time=self.per_token_timesteps,
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


class WanExpertsModel(nn.Module):
    r"""Wan 2.2's two experts behind one protocol model, routed per row by ``|t|``.

    Row ``i`` goes to ``high_noise`` when its backbone timestep
    ``1000 |t_i| >= 1000 * boundary_ratio`` (``WanPipeline``'s test, in its
    units), else to ``low_noise``; each expert runs once on its rows and the
    outputs are put back in batch order. The target time ``r`` does not route:
    a jump from ``t = 1`` to ``r = 0`` runs on the high-noise expert, as the
    pipeline's first step does.

    Args:
        high_noise: the adapted ``transformer``.
        low_noise: the adapted ``transformer_2``.
        boundary_ratio: the pipeline's ``boundary_ratio`` in ``(0, 1)``
            (0.875 for Wan 2.2 T2V A14B, 0.9 for I2V A14B).
    """

    expert_subfolders = {"high_noise": "transformer", "low_noise": "transformer_2"}
    """Each expert's attribute -> its folder in a pipeline repository (and in a saved LoRA, see ``lora.add_lora``)."""

    def __init__(self, high_noise: WanAdapter, low_noise: WanAdapter, boundary_ratio: float) -> None:
        super().__init__()
        for name, expert in (("high_noise", high_noise), ("low_noise", low_noise)):
            if not isinstance(expert, WanAdapter):
                raise ValueError(f"{name} must be a WanAdapter (see wan.adapt), got {type(expert).__name__}")
        if high_noise.transformer is low_noise.transformer:
            raise ValueError("high_noise and low_noise wrap the same transformer; pass transformer and transformer_2")
        if high_noise.capabilities != low_noise.capabilities:
            raise ValueError(
                f"the experts were adapted differently: {high_noise.capabilities} vs {low_noise.capabilities}"
            )
        if high_noise.required_cond != low_noise.required_cond:
            raise ValueError(
                f"the experts take different conditioning: {high_noise.required_cond} vs {low_noise.required_cond}"
            )
        if not (0.0 < boundary_ratio < 1.0 and math.isfinite(boundary_ratio)):
            raise ValueError(f"boundary_ratio must lie in (0, 1), got {boundary_ratio}")
        self.high_noise = high_noise
        self.low_noise = low_noise
        self.boundary_ratio = float(boundary_ratio)
        self.capabilities = high_noise.capabilities
        self.time_convention = high_noise.time_convention

    def uses_high_noise_expert(self, t: Float[Tensor, " batch"]) -> Tensor:
        """Boolean ``[B]``: rows the pipeline would give to ``transformer``."""
        timestep = self.time_convention.to_backbone(t.to(at_least_float32(t.dtype)))
        return timestep >= self.boundary_ratio * self.time_convention.scale

    def forward(
        self, x_t: Tensor, t: Float[Tensor, " batch"], r: Float[Tensor, " batch"], **cond: Tensor
    ) -> Tensor:
        """``F(x_t, t, r)``, each row from its expert; arguments and errors as :meth:`WanAdapter.forward`."""
        batch_size = x_t.shape[0] if x_t.ndim else 0
        if t.shape != (batch_size,):
            raise ValueError(f"t must have shape [B] = [{batch_size}], got {tuple(t.shape)}")
        self.capabilities.check_times(t, r)  # before any row is selected
        self.high_noise.check_cond(cond, batch_size)
        high = self.uses_high_noise_expert(t)
        rows = [(self.high_noise, high.nonzero().squeeze(1)), (self.low_noise, (~high).nonzero().squeeze(1))]
        outputs, order = [], []
        for expert, index in rows:
            if index.numel() == batch_size:
                return expert(x_t, t, r, **cond)
            if index.numel():
                outputs.append(expert(x_t[index], t[index], r[index], **{k: v[index] for k, v in cond.items()}))
                order.append(index)
        return torch.cat(outputs)[torch.argsort(torch.cat(order))]

    def extra_state_dict(self) -> dict[str, Tensor]:
        """Both experts' added parameters, under ``high_noise.`` and ``low_noise.``."""
        return {
            f"{name}.{key}": value
            for name in ("high_noise", "low_noise")
            for key, value in getattr(self, name).extra_state_dict().items()
        }

    def load_extra_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Load what :meth:`extra_state_dict` saved; ValueError on missing or foreign keys."""
        unexpected = sorted(key for key in state if not key.startswith(("high_noise.", "low_noise.")))
        if unexpected:
            raise ValueError(f"state has keys {unexpected[:5]} outside high_noise.* and low_noise.*")
        for name in ("high_noise", "low_noise"):
            prefix = f"{name}."
            getattr(self, name).load_extra_state_dict(
                {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
            )

    def unadapt(self) -> tuple[nn.Module, nn.Module]:
        """Un-adapt both experts; return the stock ``(transformer, transformer_2)``."""
        return self.high_noise.unadapt(), self.low_noise.unadapt()


def adapt_experts(
    transformer: object,
    transformer_2: object,
    boundary_ratio: float,
    *,
    target_time: bool = True,
    sign: bool = True,
) -> WanExpertsModel:
    """Adapt Wan 2.2 A14B's high-noise ``transformer`` and low-noise ``transformer_2`` in place and route between them.

    Raises:
        ValueError: if either is not a ``WanTransformer3DModel`` or is
            already adapted, they are the same module or take different
            conditioning, or ``boundary_ratio`` is outside ``(0, 1)``.
    """
    if transformer is transformer_2:
        raise ValueError("transformer and transformer_2 are the same module; Wan 2.2 A14B has two experts")
    if not (0.0 < boundary_ratio < 1.0 and math.isfinite(boundary_ratio)):
        raise ValueError(f"boundary_ratio must lie in (0, 1), got {boundary_ratio}")
    high_noise = adapt(transformer, target_time=target_time, sign=sign)
    adapted = [high_noise]
    try:
        adapted.append(adapt(transformer_2, target_time=target_time, sign=sign))
        return WanExpertsModel(high_noise, adapted[1], boundary_ratio)
    except ValueError:
        for expert in adapted:  # leave the caller's transformers as they were
            expert.unadapt()
        raise


def from_pretrained_experts(pretrained_model_name_or_path: str, **kwargs: object) -> WanExpertsModel:
    """Load a local Wan 2.2 A14B pipeline folder's two experts (each with :func:`from_pretrained`) and its ``boundary_ratio``.

    ``boundary_ratio`` is read from the folder's ``model_index.json``.

    Raises:
        ValueError: if ``model_index.json`` has no ``boundary_ratio`` (a
            single-expert Wan: use :func:`from_pretrained`).
    """
    index = json.loads((Path(pretrained_model_name_or_path) / "model_index.json").read_text())
    boundary_ratio = index.get("boundary_ratio")
    if boundary_ratio is None:
        raise ValueError(
            f"{pretrained_model_name_or_path}/model_index.json has no boundary_ratio: a single-expert Wan, "
            "load it with wan.from_pretrained"
        )
    return WanExpertsModel(
        from_pretrained(pretrained_model_name_or_path, subfolder="transformer", **kwargs),
        from_pretrained(pretrained_model_name_or_path, subfolder="transformer_2", **kwargs),
        float(boundary_ratio),
    )


def adapt(transformer: object, *, target_time: bool = True, sign: bool = True) -> WanAdapter:
    """Adapt a ``WanTransformer3DModel`` in place and return the protocol model.

    Raises:
        ValueError: if ``transformer`` is not a ``WanTransformer3DModel`` or is already adapted.
    """
    return WanAdapter(transformer, target_time=target_time, sign=sign)


from_pretrained = pipeline_from_pretrained(WanAdapter)
