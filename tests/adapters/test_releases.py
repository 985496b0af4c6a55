"""The authors' released time embeddings (TwinFlow-Qwen-Image-v1.0, TwinFlow-Z-Image-Turbo-exp) and the Z-Image adapter.

The forward of each release is re-derived here from the authors' formulas, in
float64 from the weights (sinusoids written out by hand), and compared with
what the adapted stock class computes. Checkpoints with the released key
layout are synthesised on tiny builds.
"""

import json
import math
import re
from collections.abc import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import twinloss
from adapter_backbones import CASES
from twinloss_adapters import qwen_image, z_image
from twinloss_adapters.base import AdaptedTransformer
from twinloss_adapters.conventions import TimeConvention
from twinloss_adapters.time_embedding import DEFAULT_MODULE_NAME

BATCH = 3
RELEASE = "twinflow_release"
QWEN_SECOND = "time_text_embed_2"  # the released key names, spelled out rather than imported
Z_SECOND = "t_embedder_2"


# --- the authors' formulas, written out -----------------------------------------------------


def sinusoids(value: Tensor) -> Tensor:
    """``[cos(v w_k), sin(v w_k)]``, ``w_k = 10000^(-k/128)``, 256 features in float64 (both releases' embedders)."""
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(128, dtype=torch.float64) / 128)
    angles = value.double()[:, None] * frequencies[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def mlp(weights: dict[str, Tensor], first: str, second: str, features: Tensor) -> Tensor:
    """``W2 silu(W1 f + b1) + b2`` in float64."""
    hidden = torch.nn.functional.silu(features @ weights[f"{first}.weight"].double().T + weights[f"{first}.bias"].double())
    return hidden @ weights[f"{second}.weight"].double().T + weights[f"{second}.bias"].double()


def qwen_release_temb(transformer: nn.Module, t: Tensor, r: Tensor) -> Tensor:
    """Qwen-Image release: ``E1(t) + (t - r) E2(r)``, ``E(u) = MLP(sinusoids(1000 u))``, signed times."""
    weights = transformer.state_dict()
    stock = mlp(weights, "time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
                sinusoids(1000 * t.double()))
    second = mlp(weights, f"{QWEN_SECOND}.timestep_embedder.linear_1", f"{QWEN_SECOND}.timestep_embedder.linear_2",
                 sinusoids(1000 * r.double()))
    return stock + (t - r).double()[:, None] * second


def z_release_temb(transformer: nn.Module, t: Tensor, r: Tensor) -> Tensor:
    """Z-Image release: ``tau(u) = sign(u)(1 - |u|)``; ``E1(1000 |tau_t|) + |tau_t - tau_r| E2(1000 (tau_r - tau_t))``."""
    weights = transformer.state_dict()
    tau_t = torch.sign(t.double()) * (1 - t.double().abs())
    tau_r = torch.sign(r.double()) * (1 - r.double().abs())
    stock = mlp(weights, "t_embedder.mlp.0", "t_embedder.mlp.2", sinusoids(1000 * tau_t.abs()))
    second = mlp(weights, f"{Z_SECOND}.mlp.0", f"{Z_SECOND}.mlp.2", sinusoids(1000 * (tau_r - tau_t)))
    return stock + (tau_t - tau_r).abs()[:, None] * second


RELEASES = {
    # name: (adapter module, embedder whose output is the time embedding, its consumer in block 0, derivation)
    "qwen_image": (qwen_image, "time_text_embed", "transformer_blocks.0.img_mod", qwen_release_temb),
    "z_image": (z_image, "t_embedder", "layers.0.adaLN_modulation", z_release_temb),
}


def _release(name: str, seed: int = 0) -> tuple[AdaptedTransformer, dict[str, Tensor], Tensor]:
    torch.manual_seed(seed)
    transformer = CASES[name].build()
    adapted = RELEASES[name][0].adapt(transformer, time_embedding=RELEASE)
    generator = torch.Generator().manual_seed(seed)
    _perturb(adapted.transformer.get_submodule(QWEN_SECOND if name == "qwen_image" else Z_SECOND), generator)
    x = torch.randn(BATCH, *CASES[name].latent_shape, generator=generator)
    return adapted, CASES[name].make_cond(transformer, BATCH, generator), x


def _perturb(module: nn.Module, generator: torch.Generator, scale: float = 0.3) -> None:
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


def _forward_with_temb(name: str, adapted: AdaptedTransformer, x: Tensor, t: Tensor, cond: dict, temb: Tensor) -> Tensor:
    """The stock call with the time embedding replaced by ``temb``: the authors' forward from their formula."""
    embedder = adapted.transformer.get_submodule(RELEASES[name][1])
    handle = embedder.register_forward_hook(lambda module, args, output: temb.to(output.dtype))
    try:
        return CASES[name].stock_call(adapted.transformer, x, t.abs(), cond)
    finally:
        handle.remove()


# Rows: a jump to data (r = 0 exactly), a jump on the real side, the twin trajectory with a jump.
TIMES = (torch.tensor([1.0, 0.7, -0.6]), torch.tensor([0.0, 0.3, -0.2]))


@pytest.mark.parametrize("name", sorted(RELEASES))
def test_release_modulation_and_output_match_the_authors_formula(name: str) -> None:
    adapted, cond, x = _release(name)
    _, _, consumer, derive = RELEASES[name]
    t, r = TIMES
    captured = []
    handle = adapted.transformer.get_submodule(consumer).register_forward_pre_hook(
        lambda module, args: captured.append(args[0].detach().clone())
    )
    with torch.no_grad():
        actual = adapted(x, t, r, **cond)
    handle.remove()
    expected_temb = derive(adapted.transformer, t, r)
    torch.testing.assert_close(captured[0].double(), expected_temb, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        expected = _forward_with_temb(name, adapted, x, t, cond, expected_temb)
    # float32 model against a float64 embedding: the 1e-5 embedding error grows through the blocks.
    torch.testing.assert_close(actual, expected, rtol=1e-3, atol=1e-3)


def test_z_image_release_maps_r_zero_to_its_noise_end_as_the_authors_code_does() -> None:
    """``sign(0) = 0``: at ``r = 0`` the release's target time is 0 (noise), so at ``t = 1`` the gate is 0."""
    adapted, cond, x = _release("z_image")
    t = torch.tensor([1.0, 0.5, 0.5])
    r = torch.tensor([0.0, 0.0, 1e-6])
    temb = z_release_temb(adapted.transformer, t, r)
    stock_temb = z_release_temb(adapted.transformer, t, t)
    torch.testing.assert_close(temb[0], stock_temb[0], rtol=0, atol=0)
    # r = 0 and r -> 0+ differ: the second embedder sees -500 and +500 with gates 0.5 and 0.5.
    assert (temb[1] - temb[2]).abs().max() > 1e-3
    with torch.no_grad():
        stock = CASES["z_image"].stock_call(adapted.transformer, x, t, cond)
        at_data = adapted(x, t, r, **cond)
    torch.testing.assert_close(at_data[0], stock[0], rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(RELEASES))
def test_release_second_embedder_starts_as_a_copy_and_keeps_the_stock_model_at_r_equals_t(name: str) -> None:
    torch.manual_seed(0)
    transformer = CASES[name].build()
    module, embedder_path, _, _ = RELEASES[name]
    stock_state = {key: value.clone() for key, value in transformer.get_submodule(embedder_path).state_dict().items()}
    adapted = module.adapt(transformer, time_embedding=RELEASE)
    second = transformer.get_submodule(QWEN_SECOND if name == "qwen_image" else Z_SECOND)
    assert second is not transformer.get_submodule(embedder_path)
    for key, value in second.state_dict().items():
        torch.testing.assert_close(value, stock_state[key], rtol=0, atol=0)
    assert all(parameter.requires_grad for parameter in second.parameters())
    assert adapted.time_embedding_kind == RELEASE
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, *CASES[name].latent_shape, generator=generator)
    cond = CASES[name].make_cond(transformer, BATCH, generator)
    t = torch.tensor([1.0, 0.6, 0.05])
    with torch.no_grad():
        torch.testing.assert_close(adapted(x, t, t, **cond), CASES[name].stock_call(transformer, x, t, cond), rtol=0, atol=0)
        # Initialised as a copy, the second embedder is live at once: r != t changes the output.
        assert (adapted(x, t, t / 2, **cond) - adapted(x, t, t, **cond)).abs().max() > 1e-4


def test_qwen_image_release_sees_the_sign_through_the_stock_embedder() -> None:
    adapted, cond, x = _release("qwen_image")
    assert adapted.time_convention == TimeConvention(scale=1.0, signed=True)
    assert not hasattr(adapted.transformer, DEFAULT_MODULE_NAME)
    t = torch.full((BATCH,), 0.5)
    with torch.no_grad():
        assert (adapted(x, -t, -t, **cond) - adapted(x, t, t, **cond)).abs().max() > 1e-4


def test_z_image_release_is_blind_to_the_sign_at_r_equals_t_until_the_sign_embedding_learns() -> None:
    adapted, cond, x = _release("z_image")
    t = torch.full((BATCH,), 0.5)
    with torch.no_grad():
        torch.testing.assert_close(adapted(x, -t, -t, **cond), adapted(x, t, t, **cond), rtol=0, atol=0)
    assert adapted.injection.module_names == (Z_SECOND, DEFAULT_MODULE_NAME)
    _perturb(adapted.transformer.get_submodule(DEFAULT_MODULE_NAME), torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (adapted(x, -t, -t, **cond) - adapted(x, t, t, **cond)).abs().max() > 1e-4
    torch.manual_seed(0)
    bare = z_image.adapt(CASES["z_image"].build(), time_embedding=RELEASE, sign=False)
    assert bare.injection.module_names == (Z_SECOND,)
    with pytest.raises(ValueError, match="sign=False"):
        bare(x, -t, -t, **cond)


@pytest.mark.parametrize("name", sorted(RELEASES))
def test_release_option_rejects_what_it_cannot_honour(name: str) -> None:
    module = RELEASES[name][0]
    with pytest.raises(ValueError, match="target_time=False"):
        module.adapt(CASES[name].build(), time_embedding=RELEASE, target_time=False)
    with pytest.raises(ValueError, match="time_embedding must be one of"):
        module.adapt(CASES[name].build(), time_embedding="twinflow_v2")
    adapted, _, _ = _release(name)
    stock_keys = set(CASES[name].build().state_dict())
    assert set(module.unadapt(adapted).state_dict()) == stock_keys


def test_signed_time_convention_keeps_the_sign_and_refuses_reversed() -> None:
    t = torch.tensor([0.25, -0.5])
    torch.testing.assert_close(TimeConvention(scale=2.0, signed=True).to_backbone(t), torch.tensor([0.5, -1.0]))
    with pytest.raises(ValueError, match="signed=True needs reversed=False"):
        TimeConvention(reversed=True, signed=True)


# --- loading the released key layout ----------------------------------------------------------


def _write_release_checkpoint(name: str, folder, *, shard: bool = False) -> dict[str, Tensor]:
    """A stock checkpoint of a tiny build plus a second embedder under the released key names.

    As the authors' ``*Wrapper`` subclasses save it: their class name in the config.
    """
    torch.manual_seed(0)
    transformer = CASES[name].build()
    transformer.save_pretrained(folder, max_shard_size="200KB" if shard else "10GB")
    config = json.loads((folder / "config.json").read_text())  # the authors saved their subclass
    config["_class_name"] += "Wrapper"
    (folder / "config.json").write_text(json.dumps(config))
    embedder_path = RELEASES[name][1]
    second_name = QWEN_SECOND if name == "qwen_image" else Z_SECOND
    generator = torch.Generator().manual_seed(5)
    extra = {
        f"{second_name}.{key}": torch.randn(value.shape, generator=generator)
        for key, value in transformer.get_submodule(embedder_path).state_dict().items()
    }
    index_path = folder / "diffusion_pytorch_model.safetensors.index.json"
    if shard:
        assert index_path.exists()
        index = json.loads(index_path.read_text())
        shard_file = sorted(set(index["weight_map"].values()))[0]
        index["weight_map"].update({key: shard_file for key in extra})
        index_path.write_text(json.dumps(index))
        target = folder / shard_file
    else:
        assert not index_path.exists()
        target = folder / "diffusion_pytorch_model.safetensors"
    save_file({**load_file(target), **extra}, target)
    return extra


@pytest.mark.parametrize(("name", "shard"), [("qwen_image", False), ("z_image", True)])
def test_released_checkpoint_loads_by_key_name_into_the_stock_class(name: str, shard: bool, tmp_path) -> None:
    extra = _write_release_checkpoint(name, tmp_path, shard=shard)
    module = RELEASES[name][0]
    adapted = module.from_pretrained(str(tmp_path), subfolder=None, time_embedding=RELEASE)
    assert type(adapted.transformer) is type(CASES[name].build())
    state = adapted.transformer.state_dict()
    for key, value in extra.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)
    torch.manual_seed(0)
    reference = CASES[name].build().state_dict()
    for key, value in reference.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)
    # The loaded model computes exactly what the release adapted in memory with those weights computes (whose
    # output the authors' formula checks, test_release_modulation_and_output_match_the_authors_formula).
    in_memory = module.adapt(CASES[name].build(), time_embedding=RELEASE)
    in_memory.transformer.load_state_dict(state)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, *CASES[name].latent_shape, generator=generator)
    cond = CASES[name].make_cond(adapted.transformer, BATCH, generator)
    t, r = TIMES
    with torch.no_grad():
        assert torch.equal(adapted(x, t, r, **cond), in_memory(x, t, r, **cond))


def _rewrite(folder, edit: Callable[[dict[str, Tensor]], dict[str, Tensor]]) -> None:
    path = folder / "diffusion_pytorch_model.safetensors"
    save_file(edit(load_file(path)), path)


def test_released_checkpoint_with_missing_mis_shaped_or_unplaced_keys_raises(tmp_path) -> None:
    key = f"{QWEN_SECOND}.timestep_embedder.linear_2.bias"
    cases = {
        "missing": (lambda state: {k: v for k, v in state.items() if k != key}, f"lacks the release keys .*{key}"),
        "mis-shaped": (lambda state: {**state, key: torch.zeros(3)}, f"mis-shaped release keys .*{key}: \\(3,\\)"),
        "unplaced": (lambda state: {**state, "time_text_embed_3.bias": torch.zeros(3)}, "time_text_embed_3.bias"),
    }
    for label, (edit, message) in cases.items():
        folder = tmp_path / label
        _write_release_checkpoint("qwen_image", folder)
        _rewrite(folder, edit)
        with pytest.raises(ValueError, match=message):
            qwen_image.from_pretrained(str(folder), subfolder=None, time_embedding=RELEASE)


@pytest.mark.parametrize("name", sorted(RELEASES))
def test_default_time_embedding_refuses_a_released_checkpoint_instead_of_dropping_its_keys(name: str, tmp_path) -> None:
    extra = _write_release_checkpoint(name, tmp_path)
    with pytest.raises(ValueError, match=rf"{re.escape(sorted(extra)[0])}.*time_embedding='twinflow_release'"):
        RELEASES[name][0].from_pretrained(str(tmp_path), subfolder=None)


@pytest.mark.parametrize("name", sorted(RELEASES))
def test_adapter_class_from_pretrained_refuses_a_released_checkpoint_and_loads_it_with_the_release_kind(
    name: str, tmp_path
) -> None:
    extra = _write_release_checkpoint(name, tmp_path)
    adapter_class = type(RELEASES[name][0].adapt(CASES[name].build()))
    with pytest.raises(ValueError, match=rf"{re.escape(sorted(extra)[0])}.*time_embedding='twinflow_release'"):
        adapter_class.from_pretrained(tmp_path)
    adapted = adapter_class.from_pretrained(tmp_path, time_embedding=RELEASE)
    assert adapted.time_embedding_kind == RELEASE
    state = adapted.transformer.state_dict()
    for key, value in extra.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)


def test_release_load_honours_the_adapter_options_and_refuses_arguments_it_cannot_honour(tmp_path) -> None:
    _write_release_checkpoint("z_image", tmp_path)
    adapted = z_image.from_pretrained(str(tmp_path), subfolder=None, time_embedding=RELEASE, sign=False)
    assert not adapted.capabilities.sign
    assert adapted.construction_arguments["sign"] is False
    assert adapted.injection.module_names == (Z_SECOND,)  # no sign embedding was added
    with pytest.raises(ValueError, match=re.escape("got arguments ['sing'] that it cannot honour")):
        z_image.from_pretrained(str(tmp_path), subfolder=None, time_embedding=RELEASE, sing=False)


def test_release_model_with_trained_sign_embedding_round_trips_through_save_pretrained(tmp_path) -> None:
    adapted, cond, x = _release("z_image")
    _perturb(adapted.transformer.get_submodule(DEFAULT_MODULE_NAME), torch.Generator().manual_seed(4))
    adapted.transformer.save_pretrained(tmp_path)
    reloaded = z_image.from_pretrained(str(tmp_path), subfolder=None, time_embedding=RELEASE)
    t, r = TIMES
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x, t, r, **cond), adapted(x, t, r, **cond), rtol=0, atol=0)
        torch.testing.assert_close(reloaded(x, -t, -t, **cond), adapted(x, -t, -t, **cond), rtol=0, atol=0)
    # A partial sign embedding is refused rather than half-loaded.
    _rewrite(tmp_path, lambda state: {k: v for k, v in state.items() if not k.startswith(DEFAULT_MODULE_NAME)}
             | {f"{DEFAULT_MODULE_NAME}.unknown": torch.zeros(1)})
    with pytest.raises(ValueError, match=f"{DEFAULT_MODULE_NAME}.unknown"):
        z_image.from_pretrained(str(tmp_path), subfolder=None, time_embedding=RELEASE)


@pytest.mark.parametrize("name", sorted(RELEASES))
def test_release_model_saved_by_twinloss_reloads_bit_exact_and_refuses_the_default_kind(name: str, tmp_path) -> None:
    adapted, cond, x = _release(name)
    for module_name in adapted.injection.module_names:
        _perturb(adapted.transformer.get_submodule(module_name), torch.Generator().manual_seed(5))
    adapted.save_pretrained(tmp_path)
    reloaded = RELEASES[name][0].from_pretrained(str(tmp_path), subfolder=None, time_embedding=RELEASE)
    assert reloaded.time_embedding_kind == RELEASE
    t, r = TIMES
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x, t, r, **cond), adapted(x, t, r, **cond), rtol=0, atol=0)
        torch.testing.assert_close(reloaded(x, -t, -t, **cond), adapted(x, -t, -t, **cond), rtol=0, atol=0)
    with pytest.raises(ValueError, match="time_embedding='twinflow_release'"):
        RELEASES[name][0].from_pretrained(str(tmp_path), subfolder=None)


# --- training and sampling ----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(RELEASES))
def test_release_trains_under_twinflow_loss_and_samples_its_one_step_formula(name: str) -> None:
    adapted, cond, x = _release(name)
    x, cond = torch.cat([x, x[:1]]), {key: torch.cat([value, value[:1]]) for key, value in cond.items()}  # batch 4
    second_name = QWEN_SECOND if name == "qwen_image" else Z_SECOND
    trained = [second_name] + ([DEFAULT_MODULE_NAME] if name == "z_image" else [])
    before = {n: [p.detach().clone() for p in adapted.transformer.get_submodule(n).parameters()] for n in trained}
    loss_fn = twinloss.TwinFlowLoss(guidance_scale=0.0)
    optimizer = torch.optim.SGD(adapted.parameters(), lr=1e-2)
    losses = []
    for _ in range(2):
        out = loss_fn(adapted, x, cond=cond, generator=torch.Generator().manual_seed(1))
        optimizer.zero_grad()
        out.loss.backward()
        for module_name in trained:
            grads = [p.grad for p in adapted.transformer.get_submodule(module_name).parameters()]
            assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0, module_name
        optimizer.step()
        loss_fn.teacher.update(adapted)
        losses.append(out.loss.item())
    assert all(math.isfinite(loss) for loss in losses) and losses[0] != losses[1], losses
    for module_name, old in before.items():
        new = list(adapted.transformer.get_submodule(module_name).parameters())
        assert any((p - p0).abs().max() > 0 for p, p0 in zip(new, old, strict=True)), module_name

    # One step from noise: x_hat = z - F(z, 1, 0), F from the authors' formula.
    noise = torch.randn(2, *CASES[name].latent_shape, generator=torch.Generator().manual_seed(2))
    two = {key: value[:2] for key, value in cond.items()}
    with torch.no_grad():
        sample = twinloss.AnyStepSampler(steps=1)(adapted, noise, cond=two, generator=torch.Generator().manual_seed(3)).sample
        t, r = torch.ones(2), torch.zeros(2)
        velocity = _forward_with_temb(name, adapted, noise, t, two, RELEASES[name][3](adapted.transformer, t, r))
    torch.testing.assert_close(sample, noise - velocity, rtol=1e-3, atol=1e-3)


# --- the Z-Image adapter against ZImagePipeline --------------------------------------------------


def test_z_image_adapter_reproduces_every_transformer_call_of_z_image_pipeline() -> None:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline

    torch.manual_seed(0)
    transformer = CASES["z_image"].build()
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8,), latent_channels=4, norm_num_groups=8)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    pipeline = ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, transformer=transformer)
    calls = []
    handle = transformer.register_forward_hook(
        lambda module, args, kwargs, output: calls.append((args, [o.clone() for o in output[0]])), with_kwargs=True
    )
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randn(5, 24, generator=generator), torch.randn(3, 24, generator=generator)]
    negatives = [torch.randn(4, 24, generator=generator), torch.randn(2, 24, generator=generator)]
    pipeline(
        prompt_embeds=prompts, negative_prompt_embeds=negatives, guidance_scale=2.0, height=16, width=16,
        sigmas=[1.0, 0.75], num_inference_steps=2, output_type="latent", generator=generator,
    )
    handle.remove()
    assert len(calls) == 2
    adapted = z_image.adapt(transformer)
    for (latents, timestep, captions), outputs in calls:
        x_t = torch.stack(latents).squeeze(2)
        length = max(len(c) for c in captions)
        padded = torch.stack([torch.cat([c, c.new_zeros(length - len(c), c.shape[1])]) for c in captions])
        mask = torch.stack([torch.arange(length) < len(c) for c in captions]).float()
        t = 1 - timestep
        with torch.no_grad():
            velocity = adapted(x_t, t, t, encoder_hidden_states=padded, encoder_attention_mask=mask)
        torch.testing.assert_close(velocity, -torch.stack(outputs).squeeze(2), rtol=0, atol=0)
    assert calls[0][0][1].tolist() == [0.0] * 4 and calls[1][0][1].tolist() == [0.25] * 4


@pytest.mark.parametrize("name", sorted(RELEASES))
def test_release_under_lora_trains_lora_and_the_released_modules_only(name: str) -> None:
    from peft import LoraConfig

    from twinloss_adapters.lora import add_lora

    adapted, cond, x = _release(name)
    released = [QWEN_SECOND] if name == "qwen_image" else [Z_SECOND, DEFAULT_MODULE_NAME]
    model = add_lora(adapted, LoraConfig(r=2, target_modules=["to_q", "to_k"], init_lora_weights="gaussian"))
    assert sorted(model.peft_config["default"].modules_to_save) == sorted(released)
    t, r = TIMES
    model(x, t, r, **cond).square().mean().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad <= trainable
    assert all("lora_" in n or ".modules_to_save.default." in n for n in trainable), trainable
    assert any("lora_B" in n for n in with_grad)  # B starts at zero; its gradient does not
    for module_name in released:
        assert any(f"{module_name}.modules_to_save.default." in n for n in with_grad), module_name
