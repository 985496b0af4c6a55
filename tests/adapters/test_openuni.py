"""OpenUni as released: connector key layout and math, loading, freezing, and the LLM query wiring."""

import math

import pytest
import torch
from peft import LoraConfig

from adapter_backbones import LLM_WIDTH, OPENUNI_HEADS, QUERIES, build_sana, openuni_checkpoint
from twinloss_adapters import lora, openuni

HEADS = 4  # the dedicated tests use more heads than the shared case (head width 4)


def _reference_captions(checkpoint: dict[str, torch.Tensor], hidden: torch.Tensor, heads: int) -> torch.Tensor:
    """OpenUni's connector then projector, written out in float64 from the raw released keys."""
    state = {key: value.double() for key, value in checkpoint.items()}

    def layer_norm(x, prefix):
        mean = x.mean(-1, keepdim=True)
        variance = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(variance + 1e-6) * state[prefix + ".weight"] + state[prefix + ".bias"]

    def linear(x, prefix):
        return x @ state[prefix + ".weight"].T + state[prefix + ".bias"]

    def gelu_tanh(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    x = hidden.double()
    batch, queries, width = x.shape
    head_dim = width // heads
    layer = 0
    while f"connector.layers.{layer}.layer_norm1.weight" in state:
        prefix = f"connector.layers.{layer}."
        normed = layer_norm(x, prefix + "layer_norm1")
        q, k, v = (
            linear(normed, prefix + f"self_attn.{name}").reshape(batch, queries, heads, head_dim).transpose(1, 2)
            for name in ("q_proj", "k_proj", "v_proj")
        )
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
        attended = (weights @ v).transpose(1, 2).reshape(batch, queries, width)
        x = x + linear(attended, prefix + "self_attn.out_proj")
        x = x + linear(gelu_tanh(linear(layer_norm(x, prefix + "layer_norm2"), prefix + "mlp.fc1")), prefix + "mlp.fc2")
        layer += 1
    assert layer == 2
    return linear(x, "projector")


def test_released_checkpoint_loads_and_matches_a_float64_derivation_of_the_connector_and_projector() -> None:
    torch.manual_seed(0)
    transformer = build_sana()
    checkpoint = openuni_checkpoint(num_layers=2, seed=3)
    for key, value in checkpoint.items():  # LayerNorm affine away from (1, 0), so it is exercised
        if "layer_norm" in key:
            value.add_(1.0 if key.endswith("weight") else 0.3)
    model = openuni.adapt(transformer, checkpoint, num_heads=HEADS)
    assert model.meta_queries.shape == (QUERIES, LLM_WIDTH)
    torch.testing.assert_close(model.meta_queries, checkpoint["meta_queries"], rtol=0, atol=0)
    hidden = torch.randn(3, QUERIES, LLM_WIDTH, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        captions = model.caption_embeddings(hidden)
    expected = _reference_captions(checkpoint, hidden, HEADS)
    torch.testing.assert_close(captions.double(), expected, rtol=1e-5, atol=1e-5)

    x, t = torch.randn(3, 4, 8, 8), torch.tensor([1.0, 0.5, 0.2])
    with torch.no_grad():
        stock = transformer(x, captions, 1000 * t, return_dict=False)[0]
        from_reference = transformer(x, expected.float(), 1000 * t, return_dict=False)[0]
        actual = model(x, t, t, llm_hidden_states=hidden)
    torch.testing.assert_close(actual, stock, rtol=0, atol=0)
    torch.testing.assert_close(actual, from_reference, rtol=1e-4, atol=1e-4)
    # The adapter's own state dict has the released layout (plus the TwinFlow embedding).
    released = {key: value for key, value in model.state_dict().items() if "twinflow_time_embedding" not in key}
    assert {key for key in released if not key.startswith("transformer.")} == set(checkpoint)


def test_checkpoint_transformer_keys_load_into_sana() -> None:
    torch.manual_seed(0)
    released_sana = build_sana()
    checkpoint = {**openuni_checkpoint(), **{f"transformer.{k}": v for k, v in released_sana.state_dict().items()}}
    torch.manual_seed(1)
    transformer = build_sana()
    model = openuni.adapt(transformer, checkpoint, num_heads=OPENUNI_HEADS)
    for key, value in released_sana.state_dict().items():
        torch.testing.assert_close(transformer.state_dict()[key], value, rtol=0, atol=0)
    hidden, x, t = torch.randn(2, QUERIES, LLM_WIDTH), torch.randn(2, 4, 8, 8), torch.tensor([0.9, 0.3])
    with torch.no_grad():
        expected = released_sana(x, model.caption_embeddings(hidden), 1000 * t, return_dict=False)[0]
        torch.testing.assert_close(model(x, t, t, llm_hidden_states=hidden), expected, rtol=0, atol=0)


def test_connector_and_projector_are_frozen_by_default_and_train_on_request() -> None:
    hidden, x = torch.randn(2, QUERIES, LLM_WIDTH), torch.randn(2, 4, 8, 8)
    t, r = torch.tensor([0.9, -0.6]), torch.tensor([0.2, -0.1])
    for train_connector in (False, True):
        torch.manual_seed(0)
        model = openuni.adapt(build_sana(), openuni_checkpoint(), num_heads=OPENUNI_HEADS, train_connector=train_connector)
        model(x, t, r, llm_hidden_states=hidden).square().mean().backward()
        for module in (model.connector, model.projector):
            for name, parameter in module.named_parameters():
                assert parameter.requires_grad is train_connector, name
                assert (parameter.grad is not None and bool(parameter.grad.abs().sum() > 0)) is train_connector, name
        assert not model.meta_queries.requires_grad and model.meta_queries.grad is None
        assert model.transformer.proj_out.weight.grad.abs().sum() > 0  # SANA trains
    # LoRA keeps a frozen connector frozen (it is not put into modules_to_save).
    torch.manual_seed(0)
    frozen = lora.add_lora(
        openuni.adapt(build_sana(), openuni_checkpoint(), num_heads=OPENUNI_HEADS),
        LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"]),
    )
    trainable = [name for name, parameter in frozen.named_parameters() if parameter.requires_grad]
    assert trainable and not [name for name in trainable if "connector" in name or "projector" in name]


def test_bad_checkpoints_raise_and_leave_the_transformer_untouched() -> None:
    torch.manual_seed(0)
    transformer = build_sana()
    before = {key: value.clone() for key, value in transformer.state_dict().items()}
    good = openuni_checkpoint()
    sana_keys = {f"transformer.{k}": v + 1 for k, v in transformer.state_dict().items()}
    partial_sana = dict(list(sana_keys.items())[:-1])
    cases = [
        ({**good, "lmm.language_model.embed.weight": torch.zeros(2)}, "outside OpenUni's released groups"),
        ({k: v for k, v in good.items() if k != "meta_queries"}, "no 'meta_queries'"),
        ({k: v for k, v in good.items() if not k.startswith("projector.")}, r"no projector\.\* keys"),
        ({k: v for k, v in good.items() if k != "connector.layers.0.mlp.fc2.bias"}, r"missing \['connector.layers.0.mlp.fc2.bias'\]"),
        ({**good, "connector.layers.0.mlp.fc2.bias": torch.zeros(3)}, "shapes do not match"),
        (openuni_checkpoint(caption_channels=20), "caption_channels is 24"),
        ({**good, "meta_queries": torch.zeros(QUERIES, LLM_WIDTH + 1)}, "meta_queries must be"),
        ({**good, **partial_sana}, r"transformer\.\* keys do not match"),
    ]
    for checkpoint, message in cases:
        with pytest.raises(ValueError, match=message):
            openuni.adapt(transformer, checkpoint, num_heads=OPENUNI_HEADS)
        assert not hasattr(transformer, "twinflow_time_embedding")
    with pytest.raises(ValueError, match="num_heads must divide"):
        openuni.adapt(transformer, good)  # the released 24 heads do not divide the tiny width 16
    for key, value in transformer.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    model = openuni.adapt(transformer, {**good, **partial_sana, **sana_keys}, num_heads=OPENUNI_HEADS)
    with pytest.raises(ValueError, match=r"llm_hidden_states'\] must be floating-point with last dim 16"):
        model(torch.randn(2, 4, 8, 8), torch.full((2,), 0.5), torch.full((2,), 0.5), llm_hidden_states=torch.randn(2, QUERIES, 8))


def test_query_states_from_the_llm_do_not_depend_on_prompt_padding() -> None:
    from transformers import Qwen2Config, Qwen2Model

    torch.manual_seed(0)
    llm = Qwen2Model(
        Qwen2Config(vocab_size=8, hidden_size=LLM_WIDTH, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    ).eval()
    model = openuni.adapt(build_sana(), openuni_checkpoint(), num_heads=OPENUNI_HEADS)
    prompt = torch.randn(1, 3, LLM_WIDTH)
    pad = torch.randn(1, 2, LLM_WIDTH)  # garbage in padded slots must not matter
    inputs = openuni.llm_query_inputs(torch.cat([pad, prompt], 1), torch.tensor([[0, 0, 1, 1, 1]]), model.meta_queries)
    torch.testing.assert_close(inputs["position_ids"], torch.tensor([[0, 0, 0, 1, 2, 3, 4, 5, 6]]))
    assert inputs["attention_mask"].tolist() == [[0, 0, 1, 1, 1, 1, 1, 1, 1]]
    with torch.no_grad():
        unpadded = openuni.query_hidden_states(llm, prompt, torch.ones(1, 3), model.meta_queries)
        left = openuni.query_hidden_states(llm, torch.cat([pad, prompt], 1), torch.tensor([[0, 0, 1, 1, 1]]), model.meta_queries)
        right = openuni.query_hidden_states(llm, torch.cat([prompt, pad], 1), torch.tensor([[1, 1, 1, 0, 0]]), model.meta_queries)
    assert unpadded.shape == (1, QUERIES, LLM_WIDTH)
    torch.testing.assert_close(left, unpadded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(right, unpadded, rtol=1e-5, atol=1e-5)
    # The queries see the prompt: another prompt changes them.
    with torch.no_grad():
        other = openuni.query_hidden_states(llm, prompt + 1, torch.ones(1, 3), model.meta_queries)
    assert (other - unpadded).abs().max() > 1e-3
    with pytest.raises(ValueError, match="prompt_mask"):
        openuni.llm_query_inputs(prompt, torch.ones(1, 4), model.meta_queries)


def test_released_widths_load_with_the_default_heads_and_epsilon() -> None:
    """OpenUni-L's real shapes (one of its six layers): width 1536, MLP 8960, 256 queries, captions 2304."""
    from diffusers import SanaTransformer2DModel

    checkpoint = openuni_checkpoint(width=1536, intermediate=8960, caption_channels=2304, queries=256)
    transformer = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32,
        caption_channels=2304, sample_size=8,
    )
    model = openuni.adapt(transformer, checkpoint)
    attention = model.connector.layers[0].self_attn
    assert attention.num_heads == 24 and model.connector.layers[0].layer_norm1.eps == 1e-6
    assert model.meta_queries.shape == (256, 1536) and model.projector.out_features == 2304
    assert all(not parameter.requires_grad for parameter in model.connector.parameters())
    t = torch.tensor([0.7])
    out = model(torch.randn(1, 4, 8, 8), t, t, llm_hidden_states=torch.randn(1, 8, 1536))
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()
