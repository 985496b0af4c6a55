"""Qwen-Image-Edit 2509 (several references) and 2511 (zero_cond_t) against QwenImageEditPlusPipeline's call."""

import pytest
import torch

from adapter_backbones import REFERENCE_SHAPE, TEXT_LEN, qwen_image_edit_cond, qwen_image_edit_stock
from twinloss_adapters import qwen_image, qwen_image_edit
from twinloss_adapters.time_embedding import DEFAULT_MODULE_NAME

BATCH = 3


def _build(zero_cond_t: bool = False) -> torch.nn.Module:
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(4, 6, 6), zero_cond_t=zero_cond_t,
    )


def _inputs(transformer: torch.nn.Module, references: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 4, 8, 8, generator=generator)
    cond = qwen_image_edit_cond(transformer, BATCH, generator)
    if references > 1:
        cond["reference_latents_2"] = torch.randn(BATCH, 4, 6, 4, generator=generator)
    return x, cond


@pytest.mark.parametrize("zero_cond_t", [False, True], ids=["edit_2509", "edit_2511"])
def test_two_references_match_the_pipeline_call_at_r_equals_t(zero_cond_t: bool) -> None:
    transformer = _build(zero_cond_t)
    x, cond = _inputs(transformer, references=2)
    t = torch.tensor([1.0, 0.6, 0.05])
    with torch.no_grad():
        expected = qwen_image_edit_stock(transformer, x, t, cond)
        without_second = qwen_image_edit_stock(transformer, x, t, {k: v for k, v in cond.items() if k != "reference_latents_2"})
    model = qwen_image_edit.adapt(transformer)
    with torch.no_grad():
        actual = model(x, t, t.clone(), **cond)
    assert actual.shape == x.shape
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert (expected - without_second).abs().max() > 1e-4  # the second reference is seen


def test_zero_cond_t_adds_the_twin_embedding_to_the_target_time_only() -> None:
    transformer = _build(zero_cond_t=True)
    x, cond = _inputs(transformer)
    model = qwen_image_edit.adapt(transformer)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in transformer.get_submodule(DEFAULT_MODULE_NAME).parameters():
            parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))
    embeddings = []
    transformer.time_text_embed.timestep_embedder.register_forward_hook(lambda _, args, out: embeddings.append(out))
    t, r = torch.tensor([0.9, -0.6, 0.4]), torch.tensor([0.1, -0.6, 0.4])
    with torch.no_grad():
        stock = qwen_image_edit_stock(transformer, x, t.abs(), cond)
        stock_embedding = embeddings.pop()
        moved = model(x, t, r, **cond)
        twin_embedding = embeddings.pop()
    assert twin_embedding.shape == (2 * BATCH, transformer.inner_dim)  # [target times; reference time 0]
    torch.testing.assert_close(twin_embedding[BATCH:], stock_embedding[BATCH:], rtol=0, atol=0)
    changed = (twin_embedding[:BATCH] - stock_embedding[:BATCH]).abs().amax(dim=1)
    assert changed.tolist()[2] == 0.0 and bool((changed[:2] > 1e-4).all())  # row 2: r = t, t > 0
    per_row = (moved - stock).flatten(1).abs().amax(dim=1)
    assert per_row[2] == 0 and bool((per_row[:2] > 1e-5).all())


def test_reference_latents_are_checked() -> None:
    model = qwen_image_edit.adapt(_build())
    x, cond = _inputs(model.transformer)
    t = torch.full((BATCH,), 0.5)
    with pytest.raises(ValueError, match="cond is missing .*reference_latents"):
        model(x, t, t, **{k: v for k, v in cond.items() if k != "reference_latents"})
    with pytest.raises(ValueError, match="in order"):
        model(x, t, t, **cond, reference_latents_3=cond["reference_latents"])
    with pytest.raises(ValueError, match=r"cond\['reference_latents'\] must be an unpacked latent"):
        model(x, t, t, **{**cond, "reference_latents": torch.zeros(BATCH, 16, 4, 4)})
    with pytest.raises(ValueError, match="multiples of 2"):
        model(x, t, t, **{**cond, "reference_latents": torch.zeros(BATCH, 4, 5, 4)})
    with pytest.raises(ValueError, match="zero_cond_t"):
        qwen_image.adapt(_build(zero_cond_t=True))  # the text-to-image adapter points to this module


def test_from_pretrained_loads_an_edit_2511_transformer(tmp_path) -> None:
    transformer = _build(zero_cond_t=True)
    transformer.save_pretrained(tmp_path / "transformer")
    model = qwen_image_edit.from_pretrained(str(tmp_path))
    assert model.zero_cond_t
    x, cond = _inputs(transformer)
    t = torch.tensor([0.9, 0.3, 0.5])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, t, **cond), qwen_image_edit_stock(transformer, x, t, cond), rtol=0, atol=0)
    assert REFERENCE_SHAPE[1:] != x.shape[2:] and TEXT_LEN == cond["encoder_hidden_states"].shape[1]
