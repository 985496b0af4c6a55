"""OpenUni: SANA driven by a multimodal LLM through a connector.

OpenUni (Wu et al. 2025) freezes a multimodal LLM (InternVL3), appends
learnable query tokens to the prompt, and feeds the LLM's last hidden states
at those queries through a small trainable *connector* into SANA's caption
space; SANA then generates as usual. TwinFlow's OpenUni results train exactly
this stack. The LLM and its queries stay outside the adapter (run them once
per batch, under ``no_grad`` when frozen); the adapter takes their hidden
states as conditioning and owns the connector, which trains with the model:

    ``F(x_t, t, r; h) = SANA(x_t, t, r; connector(h))``.

Conditioning (batch-leading):

* ``llm_hidden_states`` ``[B, Q, llm_hidden_size]``: the LLM's hidden states
  at the query tokens, required;
* ``llm_attention_mask`` ``[B, Q]`` (1 keep, 0 pad), optional; used both by
  the connector and as SANA's caption mask;
* ``guidance`` ``[B]``, exactly when SANA has guidance embeddings.

:class:`OpenUniConnector` is OpenUni's "encode then project" layout (a
bidirectional pre-norm transformer at the LLM width, then a linear map to
``caption_channels``) built from torch layers. OpenUni's released checkpoints
use Qwen2-style layers (RMSNorm, rotary, SwiGLU) under their own key names; to
load those, pass your own connector module: any ``nn.Module`` mapping
``(hidden_states [B, Q, D], attention_mask [B, Q] | None)`` to
``[B, Q, caption_channels]`` works.
"""

from collections.abc import Mapping

import torch
from jaxtyping import Float
from torch import Tensor, nn

from twinloss_adapters.base import unadapt
from twinloss_adapters.sana import SanaAdapter

__all__ = ["OpenUniAdapter", "OpenUniConnector", "adapt", "unadapt"]


class OpenUniConnector(nn.Module):
    r"""LLM query hidden states to SANA caption embeddings.

    .. math::
        c = W_\text{out}\, \mathrm{LN}(\mathrm{Enc}_N(h)) + b_\text{out},

    with ``Enc_N`` ``num_layers`` pre-norm bidirectional transformer layers of
    width ``llm_hidden_size``.

    Args:
        llm_hidden_size: width of the LLM hidden states.
        caption_channels: SANA's ``config.caption_channels``.
        num_layers: encoder depth (*default* 6, OpenUni's).
        num_heads: attention heads; must divide ``llm_hidden_size``.
        mlp_ratio: feed-forward width over ``llm_hidden_size``.
    """

    def __init__(
        self,
        llm_hidden_size: int,
        caption_channels: int,
        *,
        num_layers: int = 6,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        if llm_hidden_size < 1 or caption_channels < 1:
            raise ValueError(
                f"llm_hidden_size and caption_channels must be positive, got {llm_hidden_size}, {caption_channels}"
            )
        if num_layers < 0:
            raise ValueError(f"num_layers must be >= 0, got {num_layers}")
        if num_heads < 1 or llm_hidden_size % num_heads:
            raise ValueError(f"num_heads must divide llm_hidden_size {llm_hidden_size}, got {num_heads}")
        if mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {mlp_ratio}")
        self.llm_hidden_size = llm_hidden_size
        self.caption_channels = caption_channels
        self.layers = nn.ModuleList(
            [
                nn.TransformerEncoderLayer(
                    llm_hidden_size,
                    num_heads,
                    dim_feedforward=int(llm_hidden_size * mlp_ratio),
                    dropout=0.0,
                    activation="gelu",
                    batch_first=True,
                    norm_first=True,
                )
                for _ in range(num_layers)
            ]
        )
        self.norm = nn.LayerNorm(llm_hidden_size)
        self.projector = nn.Linear(llm_hidden_size, caption_channels)

    def forward(
        self,
        hidden_states: Float[Tensor, "batch queries llm_dim"],
        attention_mask: Tensor | None = None,
    ) -> Float[Tensor, "batch queries caption_dim"]:
        """Map query hidden states ``[B, Q, D]`` (mask ``[B, Q]``, 1 keep) to ``[B, Q, caption_channels]``."""
        if hidden_states.shape[-1] != self.llm_hidden_size:
            raise ValueError(
                f"hidden_states must end with llm_hidden_size {self.llm_hidden_size}, got {tuple(hidden_states.shape)}"
            )
        padding = None if attention_mask is None else ~attention_mask.to(torch.bool)
        states = hidden_states.to(self.projector.weight.dtype)
        for layer in self.layers:
            states = layer(states, src_key_padding_mask=padding)
        return self.projector(self.norm(states))


class OpenUniAdapter(SanaAdapter):
    """SANA plus a connector, behind the protocol; latents ``[B, C, H, W]``."""

    required_cond = ("llm_hidden_states",)
    optional_cond = ("llm_attention_mask",)

    def __init__(
        self, transformer: object, connector: object, *, target_time: bool = True, sign: bool = True
    ) -> None:
        if not isinstance(connector, nn.Module):
            raise ValueError(f"connector must be an nn.Module, got {type(connector).__name__}")
        super().__init__(transformer, target_time=target_time, sign=sign)
        self.connector = connector

    def extra_prefixes(self) -> tuple[str, ...]:
        return (*super().extra_prefixes(), "connector.")

    def caption_embeddings(self, cond: Mapping[str, Tensor]) -> Tensor:
        """``connector(llm_hidden_states)``, checked against SANA's caption width."""
        mask = cond.get("llm_attention_mask")
        hidden = cond["llm_hidden_states"]
        captions = self.connector(hidden) if mask is None else self.connector(hidden, mask)
        expected = self.transformer.config.caption_channels
        if captions.ndim != 3 or captions.shape[:2] != hidden.shape[:2] or captions.shape[-1] != expected:
            raise ValueError(
                f"connector returned {tuple(captions.shape)}; expected [B, Q, caption_channels] = "
                f"[{hidden.shape[0]}, {hidden.shape[1]}, {expected}]"
            )
        return captions

    def run_backbone(self, x_t: Tensor, timestep: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        sana_cond = {"encoder_hidden_states": self.caption_embeddings(cond)}
        if "llm_attention_mask" in cond:
            sana_cond["encoder_attention_mask"] = cond["llm_attention_mask"]
        if "guidance" in cond:
            sana_cond["guidance"] = cond["guidance"]
        return super().run_backbone(x_t, timestep, sana_cond)


def adapt(
    transformer: object, connector: object, *, target_time: bool = True, sign: bool = True
) -> OpenUniAdapter:
    """Adapt a ``SanaTransformer2DModel`` in place and attach an OpenUni connector.

    Args:
        transformer: the stock SANA transformer.
        connector: maps LLM query hidden states to SANA caption embeddings
            (e.g. :class:`OpenUniConnector`); it is registered on the adapter
            and saved, trained and moved with it.
        target_time, sign: which TwinFlow embeddings to add.

    Raises:
        ValueError: if ``transformer`` is not a SANA transformer or
            ``connector`` is not a module.
    """
    return OpenUniAdapter(transformer, connector, target_time=target_time, sign=sign)

