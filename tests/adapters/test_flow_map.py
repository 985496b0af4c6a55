"""diffusers' flow-map call on adapted transformers: ``transformer(..., timestep=, r_timestep=)``."""

import pytest
import torch
from diffusers import FlowMapEulerDiscreteScheduler
from torch.testing import assert_close

import twinloss
from twinloss_adapters.base import unadapt
from twinloss_adapters.packing import pack_image_patches, patch_grid_ids, unpack_image_patches

from adapter_backbones import CASES, TEXT_LEN


def _adapted(name):
    torch.manual_seed(0)
    case = CASES[name]
    adapted = case.adapt(case.build())
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in adapted.transformer.twinflow_time_embedding.parameters():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    return case, adapted


T = torch.tensor([0.9, 0.6])
R = torch.tensor([0.3, 0.0])


def test_sana_r_timestep_in_pipeline_units_is_the_adapter_call():
    case, adapted = _adapted("sana")
    x = torch.randn(2, *case.latent_shape)
    cond = case.make_cond(adapted.transformer, 2, torch.Generator().manual_seed(2))
    direct = adapted.transformer(  # timestep by position, as SanaTransformer2DModel.forward allows
        x, cond["encoder_hidden_states"], 1000 * T, r_timestep=1000 * R,
        encoder_attention_mask=cond["encoder_attention_mask"], return_dict=False,
    )[0]
    assert_close(direct, adapted(x, T, R, **cond))
    stock = case.stock_call(adapted.transformer, x, T, cond)  # no r_timestep: the stock model, r = t
    assert_close(stock, adapted(x, T, T, **cond))
    assert not torch.allclose(direct, stock)


def test_flux_r_timestep_in_its_unit_interval_is_the_adapter_call():
    case, adapted = _adapted("flux")
    x = torch.randn(2, *case.latent_shape)
    cond = case.make_cond(adapted.transformer, 2, torch.Generator().manual_seed(2))
    tokens = adapted.transformer(
        hidden_states=pack_image_patches(x, 2), encoder_hidden_states=cond["encoder_hidden_states"],
        pooled_projections=cond["pooled_projections"], timestep=T, r_timestep=R,
        img_ids=patch_grid_ids(4, 4, device=x.device, dtype=x.dtype), txt_ids=torch.zeros(TEXT_LEN, 3),
        guidance=cond["guidance"], return_dict=False,
    )[0]
    assert_close(unpack_image_patches(tokens, 8, 8, 2), adapted(x, T, R, **cond))


def test_diffusers_flow_map_scheduler_drives_an_adapted_wan_like_any_step_sampling():
    """The AnyFlow loop: transformer(timestep=t, r_timestep=r), scheduler.step(v, t, x, r_timestep=r)."""
    case, adapted = _adapted("wan")
    noise = torch.randn(2, *case.latent_shape)
    cond = case.make_cond(adapted.transformer, 2, torch.Generator().manual_seed(2))
    scheduler = FlowMapEulerDiscreteScheduler()
    scheduler.set_timesteps(3)
    x = noise
    for index, timestep in enumerate(scheduler.timesteps):
        t = timestep.float().expand(2)
        r = (scheduler.sigmas[index + 1] * 1000).float().expand(2)
        velocity = adapted.transformer(
            hidden_states=x, timestep=t, r_timestep=r, encoder_hidden_states=cond["encoder_hidden_states"],
            return_dict=False,
        )[0]
        x = scheduler.step(velocity, timestep, x, r_timestep=r[0], return_dict=False)[0]
    expected = twinloss.AnyStepSampler(3, mode="any")(adapted, noise, cond=cond).sample
    assert_close(x, expected, rtol=1e-5, atol=1e-5)


def test_r_timestep_errors_name_the_argument():
    case, adapted = _adapted("wan")
    x = torch.randn(2, *case.latent_shape)
    text = case.make_cond(adapted.transformer, 2, torch.Generator().manual_seed(2))["encoder_hidden_states"]
    call = lambda **times: adapted.transformer(hidden_states=x, encoder_hidden_states=text, return_dict=False, **times)  # noqa: E731
    with pytest.raises(ValueError, match=r"\|r\| <= \|t\|"):
        call(timestep=1000 * R, r_timestep=1000 * T)
    with pytest.raises(ValueError, match="^r_timestep must be a tensor"):
        call(timestep=1000 * T, r_timestep=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="^timestep must be a float tensor"):
        call(timestep=torch.zeros(2, 3), r_timestep=torch.zeros(2))


def test_unadapt_removes_the_r_timestep_keyword():
    case, adapted = _adapted("wan")
    transformer = unadapt(adapted)
    x = torch.randn(2, *case.latent_shape)
    text = case.make_cond(transformer, 2, torch.Generator().manual_seed(2))["encoder_hidden_states"]
    with pytest.raises(TypeError, match="r_timestep"):
        transformer(hidden_states=x, encoder_hidden_states=text, timestep=1000 * T, r_timestep=1000 * R)


def test_an_adapter_without_twin_embeddings_takes_r_timestep_only_at_r_equal_t():
    from twinloss_adapters import sana

    case = CASES["sana"]
    transformer = case.build()
    plain = sana.adapt(transformer, target_time=False, sign=False)
    x = torch.randn(2, *case.latent_shape)
    cond = case.make_cond(transformer, 2, torch.Generator().manual_seed(2))
    call = lambda r: transformer(  # noqa: E731
        x, cond["encoder_hidden_states"], timestep=1000 * T, r_timestep=1000 * r,
        encoder_attention_mask=cond["encoder_attention_mask"], return_dict=False,
    )[0]
    assert_close(call(T), plain(x, T, T, **cond))
    with pytest.raises(ValueError, match="adapted with target_time=False"):
        call(R)


def test_a_native_flow_map_backbone_keeps_its_own_r_timestep_input():
    from twinloss_adapters.flow_map import find_flow_map_call

    torch.manual_seed(0)
    case = CASES["anyflow"]
    adapted = case.adapt(case.build())
    assert adapted.flow_map_call is None and find_flow_map_call(adapted.transformer) is None
    x = torch.randn(2, *case.latent_shape)
    cond = case.make_cond(adapted.transformer, 2, torch.Generator().manual_seed(2))
    with torch.no_grad():  # the stock AnyFlow call with its own r_timestep is the adapter's F(x, t, r)
        assert_close(case.stock_call(adapted.transformer, x, T, cond, R), adapted(x, T, R, **cond))
