"""Wan 2.2 A14B's two experts: every row of every call goes to the expert its |t| belongs to."""

import json

import pytest
import torch

import twinloss
from adapter_backbones import TEXT_LEN, build_wan, wan_stock
from twinloss_adapters import wan
from twinloss_adapters.time_embedding import DEFAULT_MODULE_NAME

BOUNDARY = 0.875  # Wan 2.2 T2V A14B


def _experts(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)
    return build_wan(), build_wan()


def _perturb(model: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if DEFAULT_MODULE_NAME in name:
                parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))


def test_a_batch_straddling_the_boundary_matches_each_expert_on_its_rows() -> None:
    transformer, transformer_2 = _experts()
    model = wan.adapt_experts(transformer, transformer_2, BOUNDARY)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, 2, 4, 4, generator=generator)
    text = torch.randn(5, TEXT_LEN, 24, generator=generator)
    t = torch.tensor([0.95, 0.5, BOUNDARY, 0.2, 1.0])  # the boundary itself is high noise (pipeline: t >= boundary)
    high, low = torch.tensor([0, 2, 4]), torch.tensor([1, 3])
    assert model.uses_high_noise_expert(t).tolist() == [True, False, True, False, True]
    with torch.no_grad():
        actual = model(x, t, t, encoder_hidden_states=text)
        expected = torch.empty_like(x)
        expected[high] = wan_stock(transformer, x[high], t[high], {"encoder_hidden_states": text[high]})
        expected[low] = wan_stock(transformer_2, x[low], t[low], {"encoder_hidden_states": text[low]})
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    # The experts differ, so a wrong route would show.
    with torch.no_grad():
        swapped = wan_stock(transformer_2, x[high], t[high], {"encoder_hidden_states": text[high]})
    assert (swapped - expected[high]).abs().max() > 1e-3

    # Routing follows |t| (the twin trajectory too); r does not route; each expert's own TwinFlow embedding acts.
    _perturb(model)
    signed_t = torch.tensor([-0.95, 0.5, -0.9, -0.2, 1.0])
    r = torch.tensor([-0.1, 0.0, -0.9, -0.2, 0.3])
    with torch.no_grad():
        routed = model(x, signed_t, r, encoder_hidden_states=text)
        by_hand_high = model.high_noise(x[high], signed_t[high], r[high], encoder_hidden_states=text[high])
        by_hand_low = model.low_noise(x[low], signed_t[low], r[low], encoder_hidden_states=text[low])
    torch.testing.assert_close(routed[high], by_hand_high, rtol=0, atol=0)
    torch.testing.assert_close(routed[low], by_hand_low, rtol=0, atol=0)


def test_every_model_call_in_the_loss_routes_per_row_and_both_experts_train() -> None:
    transformer, transformer_2 = _experts()
    model = wan.adapt_experts(transformer, transformer_2, BOUNDARY)
    seen = {"high": [], "low": []}
    transformer.register_forward_pre_hook(lambda _, args, kwargs: seen["high"].append(kwargs["timestep"]), with_kwargs=True)
    transformer_2.register_forward_pre_hook(lambda _, args, kwargs: seen["low"].append(kwargs["timestep"]), with_kwargs=True)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, 2, 4, 4, generator=generator)
    cond = {"encoder_hidden_states": torch.randn(8, TEXT_LEN, 24, generator=generator)}
    uncond = {"encoder_hidden_states": torch.zeros(8, TEXT_LEN, 24)}
    loss_fn = twinloss.TwinFlowLoss(guidance_scale=0.5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    twins = [expert.get_submodule(DEFAULT_MODULE_NAME) for expert in (transformer, transformer_2)]
    before = [[p.detach().clone() for p in twin.parameters()] for twin in twins]
    for step in range(2):
        out = loss_fn(model, x, cond=cond, uncond=uncond, generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        loss_fn.teacher.update(model)
        assert torch.isfinite(out.loss)
    assert seen["high"] and seen["low"]
    assert all(bool((timestep >= 1000 * BOUNDARY).all()) for timestep in seen["high"])
    assert all(bool((timestep < 1000 * BOUNDARY).all()) for timestep in seen["low"])
    for twin, initial in zip(twins, before, strict=True):
        assert any((p - p0).abs().max() > 0 for p, p0 in zip(twin.parameters(), initial, strict=True))


def test_extras_round_trip_unadapt_and_bad_inputs() -> None:
    transformer, transformer_2 = _experts()
    model = wan.adapt_experts(transformer, transformer_2, BOUNDARY)
    _perturb(model)
    x, text = torch.randn(2, 4, 2, 4, 4), torch.randn(2, TEXT_LEN, 24)
    t, r = torch.tensor([0.9, 0.3]), torch.tensor([0.1, 0.3])
    with torch.no_grad():
        expected = model(x, t, r, encoder_hidden_states=text)
    extras = model.extra_state_dict()
    assert {key.split(".")[0] for key in extras} == {"high_noise", "low_noise"}
    fresh = wan.adapt_experts(*_experts(), BOUNDARY)
    fresh.load_extra_state_dict(extras)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t, r, encoder_hidden_states=text), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="outside high_noise"):
        fresh.load_extra_state_dict({**extras, "transformer.x": torch.zeros(1)})

    with pytest.raises(ValueError, match="must lead with the batch"):
        model(x, t, t, encoder_hidden_states=text[:1])
    with pytest.raises(ValueError, match=r"\|r\| <= \|t\|"):
        model(x, t, t + 0.05, encoder_hidden_states=text)
    with pytest.raises(ValueError, match="boundary_ratio must lie"):
        wan.adapt_experts(*_experts(), 1.0)
    with pytest.raises(ValueError, match="same module"):
        wan.adapt_experts(transformer, transformer, BOUNDARY)
    stock, stock_2 = model.unadapt()
    assert stock is transformer and stock_2 is transformer_2
    assert not hasattr(transformer, DEFAULT_MODULE_NAME) and not hasattr(transformer_2, DEFAULT_MODULE_NAME)
    # A failed second adaptation leaves the first transformer stock.
    adapted_already = wan.adapt(transformer_2)
    with pytest.raises(ValueError, match="already"):
        wan.adapt_experts(transformer, transformer_2, BOUNDARY)
    assert not hasattr(transformer, DEFAULT_MODULE_NAME)
    adapted_already.unadapt()


def test_from_pretrained_experts_reads_both_subfolders_and_the_boundary(tmp_path) -> None:
    transformer, transformer_2 = _experts()
    transformer.save_pretrained(tmp_path / "transformer")
    transformer_2.save_pretrained(tmp_path / "transformer_2")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "boundary_ratio": 0.9}))
    model = wan.from_pretrained_experts(str(tmp_path))
    assert model.boundary_ratio == 0.9
    x, text, t = torch.randn(2, 4, 2, 4, 4), torch.randn(2, TEXT_LEN, 24), torch.tensor([0.95, 0.5])
    with torch.no_grad():
        actual = model(x, t, t, encoder_hidden_states=text)
        torch.testing.assert_close(actual[:1], wan_stock(transformer, x[:1], t[:1], {"encoder_hidden_states": text[:1]}))
        torch.testing.assert_close(actual[1:], wan_stock(transformer_2, x[1:], t[1:], {"encoder_hidden_states": text[1:]}))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "boundary_ratio": None}))
    with pytest.raises(ValueError, match="no boundary_ratio"):
        wan.from_pretrained_experts(str(tmp_path))
