r"""OpenUni as released: SANA driven by a multimodal LLM through meta queries and a connector.

OpenUni (Wu et al. 2025) appends ``Q`` learnable *meta queries* to the prompt
of a frozen multimodal LLM (InternVL3), takes the LLM's last hidden states at
those queries, and maps them into SANA's caption space:

.. math::
    h = \mathrm{LLM}([\,e_\text{prompt};\ m\,])_{[-Q:]}, \qquad
    c = W_p\, \mathrm{Enc}_N(h) + b_p, \qquad
    F(x_t, t, r; h) = \mathrm{SANA}(x_t, t, r;\ c),

with ``Enc_N`` a stack of ``N`` CLIP-style pre-norm encoder layers at the LLM
width (:class:`OpenUniConnector`) and ``W_p`` the separate ``projector``.
TwinFlow's OpenUni runs freeze the LLM, the meta queries, the connector and the
projector, and train SANA only; that is this adapter's default
(``train_connector=True`` trains the connector and projector too).

The LLM stays outside the adapter (run it once per batch, under ``no_grad``):
:func:`llm_query_inputs` builds its inputs from the prompt embeddings and the
adapter's ``meta_queries``, exactly as OpenUni does, and
:func:`query_hidden_states` runs a ``transformers`` language model on them.

Conditioning (batch-leading):

* ``llm_hidden_states`` ``[B, Q, llm_hidden_size]``: the LLM's hidden states at
  the meta queries, required (all ``Q`` are valid: OpenUni masks none of them);
* ``guidance`` ``[B]``, exactly when SANA has guidance embeddings.

The adapter's state dict has the released checkpoint's layout (``transformer.*``
SANA, ``connector.*``, ``projector.*``, ``meta_queries``) plus the TwinFlow
embedding under ``transformer.twinflow_time_embedding.*``; :func:`adapt` builds
the stack from a released checkpoint (e.g. OpenUni's
``openuni_l_internvl3_2b_sana_1_6b_512_hf_blip3o60k.pth``, loaded with
``torch.load``).
"""

import math
import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float
from torch import Tensor, nn

from twinloss_adapters.base import check_backbone_class, unadapt
from twinloss_adapters.persistence import mis_shaped_keys
from twinloss_adapters.sana import SanaAdapter, _stock_class

__all__ = [
    "OpenUniAdapter",
    "OpenUniConnector",
    "adapt",
    "llm_query_inputs",
    "query_hidden_states",
    "unadapt",
]

RELEASED_NUM_HEADS = 24  # OpenUni-L (InternVL3-2B + SANA-1.6B 512px): 1536 wide, 24 heads
RELEASED_NUM_QUERIES = 256
RELEASED_LAYER_NORM_EPS = 1e-6
RELEASED_MODULES = ("transformer.", "connector.", "projector.")
META_QUERIES = "meta_queries"


class ConnectorAttention(nn.Module):
    r"""Bidirectional multi-head self-attention with separate ``q/k/v/out`` projections.

    .. math:: \mathrm{out}\big(\mathrm{softmax}(q k^\top / \sqrt{d_\text{head}})\, v\big)
    """

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, states: Float[Tensor, "batch queries dim"]) -> Float[Tensor, "batch queries dim"]:
        query, key, value = (
            rearrange(projection(states), "b l (h d) -> b h l d", h=self.num_heads)
            for projection in (self.q_proj, self.k_proj, self.v_proj)
        )
        attended = F.scaled_dot_product_attention(query, key, value)
        return self.out_proj(rearrange(attended, "b h l d -> b l (h d)"))


class ConnectorMLP(nn.Module):
    """``fc2(gelu_tanh(fc1(x)))``."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, states: Float[Tensor, "batch queries dim"]) -> Float[Tensor, "batch queries dim"]:
        return self.fc2(F.gelu(self.fc1(states), approximate="tanh"))


class ConnectorLayer(nn.Module):
    r"""One pre-norm encoder layer: ``x + Attn(LN_1 x)``, then ``+ MLP(LN_2 x)``."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_heads: int, layer_norm_eps: float) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.self_attn = ConnectorAttention(hidden_size, num_heads)
        self.layer_norm2 = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.mlp = ConnectorMLP(hidden_size, intermediate_size)

    def forward(self, states: Float[Tensor, "batch queries dim"]) -> Float[Tensor, "batch queries dim"]:
        states = states + self.self_attn(self.layer_norm1(states))
        return states + self.mlp(self.layer_norm2(states))


class OpenUniConnector(nn.Module):
    r"""OpenUni's released connector: ``N`` encoder layers at the LLM width, no final norm.

    Keys ``layers.{i}.layer_norm1``, ``layers.{i}.self_attn.{q,k,v,out}_proj``,
    ``layers.{i}.layer_norm2``, ``layers.{i}.mlp.fc{1,2}``, as in the released
    checkpoint under ``connector.``.

    Args:
        hidden_size: the LLM width (*released* 1536).
        intermediate_size: MLP width (*released* 8960).
        num_layers: encoder depth (*released* 6).
        num_heads: attention heads, dividing ``hidden_size`` (*released* 24).
        layer_norm_eps: LayerNorm epsilon (*released* 1e-6).
    """

    def __init__(
        self,
        hidden_size: int = 1536,
        intermediate_size: int = 8960,
        num_layers: int = 6,
        num_heads: int = RELEASED_NUM_HEADS,
        layer_norm_eps: float = RELEASED_LAYER_NORM_EPS,
    ) -> None:
        super().__init__()
        if hidden_size < 1 or intermediate_size < 1:
            raise ValueError(
                f"hidden_size and intermediate_size must be positive, got {hidden_size}, {intermediate_size}"
            )
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if num_heads < 1 or hidden_size % num_heads:
            raise ValueError(f"num_heads must divide hidden_size {hidden_size}, got {num_heads}")
        if not (layer_norm_eps > 0 and math.isfinite(layer_norm_eps)):
            raise ValueError(f"layer_norm_eps must be positive and finite, got {layer_norm_eps}")
        self.hidden_size = hidden_size
        self.layers = nn.ModuleList(
            [ConnectorLayer(hidden_size, intermediate_size, num_heads, layer_norm_eps) for _ in range(num_layers)]
        )

    def forward(self, hidden_states: Float[Tensor, "batch queries dim"]) -> Float[Tensor, "batch queries dim"]:
        """Encode the query hidden states ``[B, Q, hidden_size]`` (no mask: every query is valid)."""
        if hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(
                f"hidden_states must end with hidden_size {self.hidden_size}, got {tuple(hidden_states.shape)}"
            )
        states = hidden_states
        for layer in self.layers:
            states = layer(states)
        return states


class OpenUniAdapter(SanaAdapter):
    """SANA behind the protocol, conditioned through OpenUni's connector and projector; latents ``[B, C, H, W]``.

    Args:
        transformer: the stock ``SanaTransformer2DModel``.
        connector: maps ``[B, Q, D]`` LLM query states to ``[B, Q, D]``
            (:class:`OpenUniConnector`).
        projector: ``nn.Linear(D, caption_channels)``.
        num_queries: number of meta queries ``Q`` (*released* 256); the
            ``[Q, D]`` parameter ``meta_queries`` starts as OpenUni initialises
            it, ``N(0, 1 / D)``, and is never trained here (it is the LLM's input).
        train_connector: train the connector and projector with SANA
            (*default* False: frozen, as the authors train).
        target_time, sign: which TwinFlow embeddings to add.
    """

    required_cond = ("llm_hidden_states",)
    optional_cond = ()

    def __init__(
        self,
        transformer: object,
        connector: object,
        projector: object,
        *,
        num_queries: int = RELEASED_NUM_QUERIES,
        train_connector: bool = False,
        target_time: bool = True,
        sign: bool = True,
    ) -> None:
        if not isinstance(connector, nn.Module):
            raise ValueError(f"connector must be an nn.Module, got {type(connector).__name__}")
        if not isinstance(projector, nn.Linear):
            raise ValueError(f"projector must be an nn.Linear, got {type(projector).__name__}")
        if num_queries < 1:
            raise ValueError(f"num_queries must be >= 1, got {num_queries}")
        check_backbone_class(transformer, _stock_class())
        caption_channels = transformer.config.caption_channels
        if projector.out_features != caption_channels:
            raise ValueError(
                f"projector maps to {projector.out_features} features; SANA's caption_channels is {caption_channels}"
            )
        super().__init__(transformer, target_time=target_time, sign=sign)
        self.connector = connector.requires_grad_(train_connector)
        self.projector = projector.requires_grad_(train_connector)
        width = projector.in_features  # the connector's hidden size: the LLM states' width
        self.cond_widths = {"llm_hidden_states": width}  # SANA's text keys are built here, not taken from cond
        self.cond_masks = {}
        queries = torch.randn(num_queries, width, dtype=projector.weight.dtype, device=projector.weight.device)
        self.meta_queries = nn.Parameter(queries / math.sqrt(width), requires_grad=False)

    def extra_prefixes(self) -> tuple[str, ...]:
        return (*super().extra_prefixes(), "connector.", "projector.", META_QUERIES)

    def caption_embeddings(
        self, llm_hidden_states: Float[Tensor, "batch queries llm_dim"]
    ) -> Float[Tensor, "batch queries caption_dim"]:
        """``projector(connector(h))``: SANA's ``encoder_hidden_states``."""
        if llm_hidden_states.ndim != 3 or llm_hidden_states.shape[-1] != self.projector.in_features:
            raise ValueError(
                f"cond['llm_hidden_states'] must be [B, Q, {self.projector.in_features}], "
                f"got {tuple(llm_hidden_states.shape)}"
            )
        return self.projector(self.connector(llm_hidden_states.to(self.projector.weight.dtype)))

    def run_backbone(self, x_t: Tensor, timestep: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        sana_cond = {"encoder_hidden_states": self.caption_embeddings(cond["llm_hidden_states"])}
        if "guidance" in cond:
            sana_cond["guidance"] = cond["guidance"]
        return super().run_backbone(x_t, timestep, sana_cond)


def llm_query_inputs(
    prompt_embeds: Float[Tensor, "batch prompt dim"],
    prompt_mask: Tensor,
    meta_queries: Float[Tensor, "queries dim"],
) -> dict[str, Tensor]:
    """The language model's inputs: the prompt followed by the meta queries, as OpenUni builds them.

    ``inputs_embeds = [prompt_embeds; meta_queries]``, the attention mask
    extended by ones, and ``position_ids = cumsum(mask) - 1`` (clamped at 0), so
    padded prompt tokens neither shift nor reach the queries.

    Args:
        prompt_embeds: the embedded prompt ``[B, L, D]`` (padding anywhere).
        prompt_mask: ``[B, L]``, 1 for tokens, 0 for padding.
        meta_queries: the adapter's ``meta_queries`` ``[Q, D]``.

    Returns:
        ``inputs_embeds [B, L + Q, D]``, ``attention_mask [B, L + Q]`` (long)
        and ``position_ids [B, L + Q]``.
    """
    if prompt_mask.shape != prompt_embeds.shape[:2]:
        raise ValueError(f"prompt_mask must be [B, L] = {tuple(prompt_embeds.shape[:2])}, got {tuple(prompt_mask.shape)}")
    if meta_queries.shape[-1] != prompt_embeds.shape[-1]:
        raise ValueError(
            f"meta_queries width {meta_queries.shape[-1]} differs from the prompt embeddings' {prompt_embeds.shape[-1]}"
        )
    batch_size = prompt_embeds.shape[0]
    queries = meta_queries.to(prompt_embeds.dtype).expand(batch_size, -1, -1)
    mask = torch.cat([prompt_mask.long(), prompt_mask.new_ones(batch_size, queries.shape[1], dtype=torch.long)], dim=1)
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return {
        "inputs_embeds": torch.cat([prompt_embeds, queries], dim=1),
        "attention_mask": mask,
        "position_ids": position_ids,
    }


def query_hidden_states(
    language_model: nn.Module,
    prompt_embeds: Float[Tensor, "batch prompt dim"],
    prompt_mask: Tensor,
    meta_queries: Float[Tensor, "queries dim"],
) -> Float[Tensor, "batch queries dim"]:
    """``llm_hidden_states`` for :class:`OpenUniAdapter`: the last hidden states at the meta queries.

    ``language_model`` is the LLM body (for InternVL3, ``lmm.language_model.model``,
    a ``transformers`` decoder returning ``last_hidden_state``). Gradients flow
    as the caller's mode allows; wrap the call in ``torch.no_grad()`` for the
    frozen LLM.
    """
    inputs = llm_query_inputs(prompt_embeds, prompt_mask, meta_queries)
    output = language_model(**inputs, return_dict=True)
    return output.last_hidden_state[:, -meta_queries.shape[0] :]


def _connector_layout(connector_state: Mapping[str, Tensor]) -> tuple[int, int, int]:
    """``(hidden_size, intermediate_size, num_layers)`` read from released connector weights."""
    indices = {int(match.group(1)) for key in connector_state if (match := re.match(r"layers\.(\d+)\.", key))}
    if not indices or indices != set(range(len(indices))):
        raise ValueError(
            f"checkpoint's connector.* keys must be connector.layers.0 ... connector.layers.N-1, got layers {sorted(indices)}"
        )
    try:
        hidden_size = connector_state["layers.0.self_attn.q_proj.weight"].shape[0]
        intermediate_size = connector_state["layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as error:
        raise ValueError(f"checkpoint lacks connector.{error.args[0]}") from error
    return hidden_size, intermediate_size, len(indices)


def _check_matches(expected: Mapping[str, Tensor], state: Mapping[str, Tensor], prefix: str) -> None:
    """Raise ValueError naming ``prefix`` keys unless ``state`` has exactly the keys and shapes of ``expected``."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint's {prefix}* keys do not match the model: missing {[prefix + k for k in missing][:5]}, "
            f"unexpected {[prefix + k for k in unexpected][:5]}"
        )
    mismatched = mis_shaped_keys(expected, state, prefix)
    if mismatched:
        raise ValueError(f"checkpoint shapes do not match the model: {mismatched[:5]}")


def _load_exactly(module: nn.Module, state: Mapping[str, Tensor], prefix: str) -> None:
    """Load ``state`` into ``module`` after :func:`_check_matches`."""
    _check_matches(module.state_dict(), state, prefix)
    module.load_state_dict(dict(state))


def adapt(
    transformer: object,
    checkpoint: Mapping[str, Tensor],
    *,
    num_heads: int = RELEASED_NUM_HEADS,
    layer_norm_eps: float = RELEASED_LAYER_NORM_EPS,
    train_connector: bool = False,
    target_time: bool = True,
    sign: bool = True,
) -> OpenUniAdapter:
    """Build OpenUni from a released checkpoint and adapt its SANA in place.

    The connector's depth and widths and the number of meta queries are read
    from the weights; ``num_heads`` cannot be, so it is an argument.

    Args:
        transformer: the stock ``SanaTransformer2DModel`` (OpenUni's base SANA).
        checkpoint: the released state dict: ``connector.*``, ``projector.*``
            and ``meta_queries`` required; ``transformer.*`` optional (a full
            SANA state dict, loaded into ``transformer``).
        num_heads: connector attention heads (*released* 24).
        layer_norm_eps: connector LayerNorm epsilon (*released* 1e-6).
        train_connector: train the connector and projector (*default* False).
        target_time, sign: which TwinFlow embeddings to add.

    Raises:
        ValueError: for a key outside the four released groups, a missing
            group, keys or shapes that do not match, a projector that does
            not map to SANA's ``caption_channels``, or a transformer that is
            not a stock SANA. Nothing is loaded into ``transformer`` unless
            every check passes.
    """
    check_backbone_class(transformer, _stock_class())
    unknown = sorted(key for key in checkpoint if not key.startswith(RELEASED_MODULES) and key != META_QUERIES)
    if unknown:
        raise ValueError(
            f"checkpoint has keys {unknown[:5]} outside OpenUni's released groups "
            f"{[*RELEASED_MODULES, META_QUERIES]}; remove them (e.g. LLM weights) before loading"
        )
    groups = {
        prefix: {key[len(prefix) :]: value for key, value in checkpoint.items() if key.startswith(prefix)}
        for prefix in RELEASED_MODULES
    }
    for required in ("connector.", "projector."):
        if not groups[required]:
            raise ValueError(f"checkpoint has no {required}* keys; OpenUni needs the released connector and projector")
    if META_QUERIES not in checkpoint:
        raise ValueError("checkpoint has no 'meta_queries'")
    reference = next(transformer.parameters())
    hidden_size, intermediate_size, num_layers = _connector_layout(groups["connector."])
    connector = OpenUniConnector(hidden_size, intermediate_size, num_layers, num_heads, layer_norm_eps)
    _load_exactly(connector, groups["connector."], "connector.")
    projector_weight = groups["projector."].get("weight")
    if projector_weight is None or projector_weight.ndim != 2:
        raise ValueError("checkpoint lacks a 2-D projector.weight")
    projector = nn.Linear(projector_weight.shape[1], projector_weight.shape[0])
    _load_exactly(projector, groups["projector."], "projector.")
    meta_queries = checkpoint[META_QUERIES]
    if meta_queries.ndim != 2 or meta_queries.shape[1] != hidden_size:
        raise ValueError(
            f"checkpoint's meta_queries must be [Q, {hidden_size}] (the connector's width), got {tuple(meta_queries.shape)}"
        )
    sana_state = groups["transformer."]
    if sana_state:
        _check_matches(transformer.state_dict(), sana_state, "transformer.")
    adapted = OpenUniAdapter(
        transformer,
        connector.to(device=reference.device, dtype=reference.dtype),
        projector.to(device=reference.device, dtype=reference.dtype),
        num_queries=meta_queries.shape[0],
        train_connector=train_connector,
        target_time=target_time,
        sign=sign,
    )
    with torch.no_grad():
        adapted.meta_queries.copy_(meta_queries)
    if sana_state:  # checked above; only the TwinFlow embedding's keys are absent
        adapted.transformer.load_state_dict(dict(sana_state), strict=False)
    return adapted
