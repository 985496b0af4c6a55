"""LoRA through peft: what trains, what is saved, and the two memory-free teachers."""

import pytest
import torch
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict

import twinloss
from adapter_backbones import CASES, BackboneCase, train_steps
from twinloss_adapters import lora
from twinloss_adapters.time_embedding import DEFAULT_MODULE_NAME

BATCH = 4
TARGETS = ["to_q", "to_k", "to_v"]


def _config() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=4, target_modules=list(TARGETS), init_lora_weights="gaussian")


def _inputs(case: BackboneCase, transformer: torch.nn.Module, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, *case.latent_shape, generator=generator)
    return x, case.make_cond(transformer, BATCH, generator)


def _lora_model(case: BackboneCase, seed: int = 0):
    torch.manual_seed(seed)
    transformer = case.build()
    adapted = case.adapt(transformer)
    return transformer, adapted, lora.add_lora(adapted, _config())


def _perturb_trainable(model: torch.nn.Module, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))


T = torch.tensor([0.9, 0.7, -0.6, 1.0])
R = torch.tensor([0.2, 0.7, -0.6, 0.0])


@pytest.mark.parametrize("name", sorted(CASES))
def test_only_lora_and_twin_parameters_train(name: str) -> None:
    case = CASES[name]
    transformer, _, model = _lora_model(case)
    x, cond = _inputs(case, transformer)
    model(x, T, R, **cond).square().mean().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad <= trainable
    for parameter_name in trainable:
        assert "lora_" in parameter_name or f"{DEFAULT_MODULE_NAME}.modules_to_save" in parameter_name or (
            name == "openuni" and "connector.modules_to_save" in parameter_name
        ), parameter_name
    assert any("lora_B" in n for n in with_grad)  # B starts at zero; its gradient does not
    if not case.native_target_time:
        assert any(f"{DEFAULT_MODULE_NAME}.modules_to_save.default.target_time_mlp.2" in n for n in with_grad)
    assert any("negative_time_embedding" in n for n in with_grad)
    frozen = [p for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)


def test_lora_state_dict_carries_the_twin_embedding() -> None:
    case = CASES["sana"]
    transformer, _, model = _lora_model(case)
    _perturb_trainable(model)
    x, cond = _inputs(case, transformer)
    with torch.no_grad():
        expected = model(x, T, R, **cond)
    saved = get_peft_model_state_dict(model)
    assert any(DEFAULT_MODULE_NAME in key for key in saved)
    assert any("lora_A" in key for key in saved)
    _, _, fresh = _lora_model(case, seed=0)  # same base weights, fresh LoRA and twin modules
    set_peft_model_state_dict(fresh, saved)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, T, R, **cond), expected)


def test_add_lora_does_not_modify_the_config_and_checks_inputs() -> None:
    case = CASES["sana"]
    torch.manual_seed(0)
    transformer = case.build()
    config = _config()
    model = lora.add_lora(case.adapt(transformer), config)
    assert config.modules_to_save is None
    assert model.peft_config["default"].modules_to_save == [DEFAULT_MODULE_NAME]
    with pytest.raises(ValueError, match="adapt\\(\\)"):
        lora.add_lora(case.build(), _config())
    with pytest.raises(ValueError, match="LoraConfig"):
        lora.add_lora(case.adapt(case.build()), {"r": 4})


def test_adapter_works_on_a_transformer_with_injected_lora() -> None:
    case = CASES["sana"]
    torch.manual_seed(0)
    transformer = case.build()
    transformer.add_adapter(_config())  # diffusers' own peft integration, as in its LoRA scripts
    _perturb_trainable(transformer)
    x, cond = _inputs(case, transformer)
    t = torch.tensor([0.9, 0.5, 0.3, 1.0])
    with torch.no_grad():
        stock = case.stock_call(transformer, x, t, cond)
    adapted = case.adapt(transformer)
    with torch.no_grad():
        torch.testing.assert_close(adapted(x, t, t, **cond), stock)


def test_adapt_rejects_a_peft_model() -> None:
    case = CASES["sana"]
    _, adapted, model = _lora_model(case)
    from twinloss_adapters import sana

    with pytest.raises(ValueError, match="PeftModel"):
        sana.adapt(model)


def test_base_model_teacher_is_the_stock_model() -> None:
    case = CASES["flux"]
    torch.manual_seed(0)
    transformer = case.build()
    x, cond = _inputs(case, transformer)
    with torch.no_grad():
        stock = case.stock_call(transformer, x, T.abs(), cond)
    model = lora.add_lora(case.adapt(transformer), _config())
    _perturb_trainable(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    teacher_out = lora.BaseModelTeacher()(model, x, T, T, cond)
    torch.testing.assert_close(teacher_out, stock)
    assert not teacher_out.requires_grad
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    with torch.no_grad():
        assert (model(x, T, T, **cond) - stock).abs().max() > 1e-4  # the online model has moved
    with pytest.raises(ValueError, match="PeftModel"):
        lora.BaseModelTeacher()(model.get_base_model(), x, T, T, cond)


def test_lora_ema_teacher_averages_only_the_adapter() -> None:
    case = CASES["sana"]
    transformer, _, model = _lora_model(case)
    base_count = sum(p.numel() for p in transformer.parameters())
    teacher = lora.LoRAEMATeacher(target_decay=0.99)
    teacher.attach(model)
    flags_online = {n: p.requires_grad for n, p in model.named_parameters() if "twinflow_ema" not in n}
    adapter_names = [n for n in model.peft_config]
    assert adapter_names == ["default", "twinflow_ema"]
    # No second copy of the base: only adapter-sized parameters were added.
    added = sum(p.numel() for n, p in model.named_parameters() if "twinflow_ema" in n)
    online = sum(p.numel() for n, p in model.named_parameters() if ".default." in n)
    assert added == online
    assert sum(p.numel() for p in transformer.parameters()) == base_count + added
    assert all(not p.requires_grad for n, p in model.named_parameters() if "twinflow_ema" in n)

    x, cond = _inputs(case, transformer)
    pairs = list(teacher._pairs.values())
    _perturb_trainable(model, seed=4)
    first = [online.detach().clone() for online, _ in pairs]
    teacher.update(model)  # decay 0: copy
    for (_, ema), value in zip(pairs, first, strict=True):
        torch.testing.assert_close(ema, value)
    assert teacher.decay == pytest.approx(0.495)
    _perturb_trainable(model, seed=5)
    second = [online.detach().clone() for online, _ in pairs]
    teacher.update(model)
    for (_, ema), old, new in zip(pairs, first, second, strict=True):
        torch.testing.assert_close(ema, 0.495 * old + 0.505 * new)

    # The teacher evaluates the EMA adapter, and leaves the trained one active and trainable.
    with torch.no_grad():
        online_out = model(x, T, R, **cond)
    teacher_out = teacher(model, x, T, R, cond)
    assert model.active_adapter == "default"
    assert {n: p.requires_grad for n, p in model.named_parameters() if "twinflow_ema" not in n} == flags_online
    assert (teacher_out - online_out).abs().max() > 1e-5
    model.set_adapter("twinflow_ema")
    with torch.no_grad():
        torch.testing.assert_close(teacher_out, model(x, T, R, **cond))
    model.set_adapter("default")

    # state_dict round trip into a new run.
    state = teacher.state_dict()
    _, _, resumed_model = _lora_model(case)
    resumed_model.load_state_dict(model.state_dict(), strict=False)
    resumed = lora.LoRAEMATeacher(target_decay=0.99)
    resumed.load_state_dict(state)
    resumed.attach(resumed_model)
    assert resumed.decay == teacher.decay and resumed.num_updates == 2
    torch.testing.assert_close(resumed(resumed_model, x, T, R, cond), teacher_out)
    with pytest.raises(ValueError, match="decay"):
        lora.LoRAEMATeacher(target_decay=0.9).load_state_dict(state)
    with pytest.raises(ValueError, match="target_decay"):
        lora.LoRAEMATeacher(target_decay=1.0)


@pytest.mark.parametrize("teacher_class", [lora.BaseModelTeacher, lora.LoRAEMATeacher])
def test_twinflow_steps_with_a_lora_teacher(teacher_class: type) -> None:
    case = CASES["wan"]
    transformer, _, model = _lora_model(case)
    x, cond = _inputs(case, transformer)
    uncond = {key: torch.zeros_like(value) for key, value in cond.items()}
    # the base model ignores r: it guides, the online model runs the RCGM chain
    argument = "guidance_teacher" if teacher_class is lora.BaseModelTeacher else "teacher"
    loss_fn = twinloss.TwinFlowLoss(**{argument: teacher_class()}, guidance_scale=0.5)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-3)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad and "twinflow_ema" not in n}
    losses = train_steps(loss_fn, model, x, cond, uncond, optimizer, after_step=lambda out: loss_fn.update_teachers(model))
    assert all(torch.isfinite(torch.tensor(losses))) and len(set(losses)) == 3, losses
    for n, p in model.named_parameters():
        if n in frozen:
            torch.testing.assert_close(p, frozen[n], rtol=0, atol=0)
    sample = twinloss.AnyStepSampler(steps=1)(model, torch.randn_like(x), cond=cond).sample
    assert sample.shape == x.shape
