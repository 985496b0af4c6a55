"""Every backbone adapter against its stock diffusers model (tiny random builds)."""

import pytest
import torch
from torch import nn

from adapter_backbones import CASES, OPENUNI_HEADS, BackboneCase, openuni_checkpoint
from twinloss_adapters.base import AdaptedTransformer
from twinloss_adapters.time_embedding import DEFAULT_MODULE_NAME

BATCH = 3


@pytest.fixture(params=sorted(CASES), ids=sorted(CASES))
def case(request: pytest.FixtureRequest) -> BackboneCase:
    return CASES[request.param]


def _inputs(case: BackboneCase, transformer: nn.Module, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, *case.latent_shape, generator=generator)
    cond = case.make_cond(transformer, BATCH, generator)
    return x, cond


def _build(case: BackboneCase, seed: int = 0) -> tuple[nn.Module, AdaptedTransformer]:
    torch.manual_seed(seed)
    transformer = case.build()
    return transformer, case.adapt(transformer)


def _stock(case: BackboneCase, adapted: AdaptedTransformer, x, t, cond):
    """What the stock stack computes for (x, t): the pipeline call, or OpenUni's SANA(projector(connector(h)))."""
    if case.stock_call is not None:
        return case.stock_call(adapted.transformer, x, t, cond)
    captions = adapted.projector(adapted.connector(cond["llm_hidden_states"]))
    return adapted.transformer(x, captions, 1000 * t, return_dict=False)[0]


def _perturb_twin_parameters(adapted: AdaptedTransformer, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in adapted.transformer.get_submodule(DEFAULT_MODULE_NAME).parameters():
            parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))


def test_matches_stock_at_r_equals_t(case: BackboneCase) -> None:
    transformer, adapted = _build(case)
    x, cond = _inputs(case, transformer)
    t = torch.tensor([1.0, 0.6, 0.05])
    with torch.no_grad():
        expected = _stock(case, adapted, x, t, cond)
        actual = adapted(x, t, t.clone(), **cond)
    assert actual.shape == x.shape
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_new_parameters_are_silent_at_creation_for_any_r_and_sign(case: BackboneCase) -> None:
    transformer, adapted = _build(case)
    x, cond = _inputs(case, transformer)
    t = torch.tensor([1.0, 0.6, 0.3])
    with torch.no_grad():
        base = adapted(x, t, t, **cond)
        jump = adapted(x, t, torch.tensor([0.0, 0.2, 0.1]), **cond)
        twin = adapted(x, -t, -t, **cond)
    if not case.native_target_time:  # a native flow-map model moves with r from the start
        torch.testing.assert_close(jump, base)
    torch.testing.assert_close(twin, base)


def test_output_depends_on_r_and_sign_once_perturbed(case: BackboneCase) -> None:
    transformer, adapted = _build(case)
    x, cond = _inputs(case, transformer)
    t = torch.tensor([1.0, 0.6, 0.3])
    with torch.no_grad():
        stock = _stock(case, adapted, x, t, cond)
    _perturb_twin_parameters(adapted)
    with torch.no_grad():
        at_t = adapted(x, t, t, **cond)
        to_data = adapted(x, t, torch.zeros(BATCH), **cond)
        halfway = adapted(x, t, t / 2, **cond)
        twin = adapted(x, -t, -t, **cond)
    # r = t, t > 0 stays the stock model: the gate (|t| - |r|) and the sign indicator are zero.
    torch.testing.assert_close(at_t, stock)
    for other in (to_data, halfway, twin):
        per_row = (other - at_t).flatten(1).abs().amax(dim=1)
        assert bool((per_row > 1e-4).all()), per_row
    assert (to_data - halfway).abs().max() > 1e-4


def test_gradients_reach_the_new_parameters_at_creation(case: BackboneCase) -> None:
    transformer, adapted = _build(case)
    x, cond = _inputs(case, transformer)
    t = torch.tensor([0.9, -0.6, 0.4])
    r = torch.tensor([0.1, -0.2, 0.4])
    adapted(x, t, r, **cond).square().mean().backward()
    twin = transformer.get_submodule(DEFAULT_MODULE_NAME)
    if case.native_target_time:  # only the sign embedding is added
        assert twin.target_time_mlp is None and twin.negative_time_embedding.grad.abs().sum() > 0
        return
    last = twin.target_time_mlp[-1]
    for name, parameter in (("last weight", last.weight), ("last bias", last.bias), ("sign", twin.negative_time_embedding)):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    # Only the last layer is zero-initialised; the first one learns as soon as the last one moves.
    first = twin.target_time_mlp[0]
    torch.testing.assert_close(first.weight.grad, torch.zeros_like(first.weight))
    adapted.zero_grad()
    _perturb_twin_parameters(adapted)
    adapted(x, t, r, **cond).square().mean().backward()
    assert first.weight.grad.abs().sum() > 0


def test_state_dict_round_trip(case: BackboneCase) -> None:
    transformer, adapted = _build(case)
    _perturb_twin_parameters(adapted)
    x, cond = _inputs(case, transformer)
    t, r = torch.tensor([0.9, -0.6, 0.4]), torch.tensor([0.1, -0.2, 0.4])
    with torch.no_grad():
        expected = adapted(x, t, r, **cond)
    _, fresh = _build(case, seed=7)
    fresh.load_state_dict(adapted.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t, r, **cond), expected)
    extras = adapted.extra_state_dict()
    assert extras and all(key.startswith(adapted.extra_prefixes()) for key in extras)
    _, only_extras = _build(case, seed=0)
    only_extras.load_extra_state_dict(extras)
    with torch.no_grad():
        torch.testing.assert_close(only_extras(x, t, r, **cond), expected)
    with pytest.raises(ValueError, match="missing"):
        only_extras.load_extra_state_dict({})


def test_unadapt_restores_the_stock_class(case: BackboneCase) -> None:
    transformer, adapted = _build(case)
    stock_keys = set(transformer.state_dict()) - {
        key for key in transformer.state_dict() if DEFAULT_MODULE_NAME in key.split(".")  # LTX-2 has a nested one
    }
    x, cond = _inputs(case, transformer)
    t = torch.tensor([0.9, 0.6, 0.4])
    with torch.no_grad():
        expected = _stock(case, adapted, x, t, cond)
    _perturb_twin_parameters(adapted)
    module = __import__(f"twinloss_adapters.{case.module_name}", fromlist=["unadapt"])
    restored = module.unadapt(adapted)
    assert restored is transformer
    assert set(restored.state_dict()) == stock_keys
    assert not hasattr(restored, DEFAULT_MODULE_NAME)
    with torch.no_grad():
        torch.testing.assert_close(_stock(case, adapted, x, t, cond), expected)
    # A stock transformer can be adapted again afterwards.
    case.adapt(restored)


def test_missing_and_unknown_cond_keys_raise(case: BackboneCase) -> None:
    transformer, adapted = _build(case)
    x, cond = _inputs(case, transformer)
    t = torch.full((BATCH,), 0.5)
    required = adapted.required_cond[0]
    missing = {key: value for key, value in cond.items() if key != required}
    with pytest.raises(ValueError, match=f"cond is missing .*{required}"):
        adapted(x, t, t, **missing)
    with pytest.raises(ValueError, match="does not accept"):
        adapted(x, t, t, **cond, encoder_hidden_state=cond[required])
    with pytest.raises(ValueError, match=rf"cond\['{required}'\] must lead with the batch"):
        adapted(x, t, t, **{**cond, required: cond[required][:1]})


def test_wrong_latent_shapes_raise(case: BackboneCase) -> None:
    transformer, adapted = _build(case)
    _, cond = _inputs(case, transformer)
    t = torch.full((BATCH,), 0.5)
    assert case.wrong_latent_shapes
    for shape in case.wrong_latent_shapes:
        with pytest.raises(ValueError, match="x_t"):
            adapted(torch.zeros(BATCH, *shape), t, t, **cond)


def test_times_outside_the_protocol_raise(case: BackboneCase) -> None:
    transformer, adapted = _build(case)
    x, cond = _inputs(case, transformer)
    t = torch.full((BATCH,), 0.5)
    with pytest.raises(ValueError, match=r"\|r\| <= \|t\|"):
        adapted(x, t, t + 0.1, **cond)
    with pytest.raises(ValueError, match="sign of t"):
        adapted(x, t, -t / 2, **cond)
    with pytest.raises(ValueError, match=r"\|t\| <= 1"):
        adapted(x, t * 3, t, **cond)
    with pytest.raises(ValueError, match="t must have shape"):
        adapted(x, t[:2], t[:2], **cond)


def test_declared_capabilities_are_enforced(case: BackboneCase) -> None:
    torch.manual_seed(0)
    transformer = case.build()
    module = __import__(f"twinloss_adapters.{case.module_name}", fromlist=["adapt"])
    if case.name == "openuni":
        plain = module.adapt(transformer, openuni_checkpoint(), num_heads=OPENUNI_HEADS, target_time=False, sign=False)
    else:
        plain = module.adapt(transformer, target_time=False, sign=False)
    assert not hasattr(transformer, DEFAULT_MODULE_NAME)
    x, cond = _inputs(case, transformer)
    t = torch.full((BATCH,), 0.5)
    with pytest.raises(ValueError, match="target_time=False"):
        plain(x, t, t / 2, **cond)
    with pytest.raises(ValueError, match="sign=False"):
        plain(x, -t, -t, **cond)
    with pytest.raises(ValueError, match="lacks"):
        plain.capabilities.require(target_time=True, sign=True)
    assert plain(x, t, t, **cond).shape == x.shape


def test_unknown_backbone_class_and_double_adaptation_raise(case: BackboneCase) -> None:
    transformer, _ = _build(case)
    with pytest.raises(ValueError, match="already"):
        case.adapt(transformer)
    other = CASES["wan" if case.build is not CASES["wan"].build else "sana"].build()
    with pytest.raises(ValueError, match="must be a diffusers"):
        case.adapt(other)


@pytest.mark.parametrize("name", sorted(name for name, native in CASES.items() if native.native_target_time))
def test_native_flow_map_run_backbone_is_the_adapter_at_r_equal_t(name: str) -> None:
    """A native flow-map adapter's run_backbone (no target time given) is the stock call at r = t."""
    case = CASES[name]
    transformer, adapted = _build(case)
    _perturb_twin_parameters(adapted)  # the sign embedding moved: it must still add nothing at t > 0
    x, cond = _inputs(case, transformer)
    t = torch.tensor([0.9, 0.5, 0.2])
    with torch.no_grad():
        expected = adapted(x, t, t, **cond)
        raw = adapted.run_backbone(x, adapted.time_convention.to_backbone(t), cond)
    assert torch.equal(adapted.time_convention.to_twinloss_velocity(raw), expected)
