"""LoRA on Wan 2.2 A14B's two experts: each its LoRA and twin modules, both teachers per expert, save and reload."""

import json

import pytest
import torch
from peft import LoraConfig

import twinloss
from adapter_backbones import TEXT_LEN, build_wan, wan_stock
from twinloss_adapters import lora, wan
from twinloss_adapters.time_embedding import DEFAULT_MODULE_NAME

BOUNDARY = 0.875
T = torch.tensor([0.95, 0.5, -0.9, -0.3])  # two rows on each expert, one of each on the twin trajectory
R = torch.tensor([0.2, 0.5, -0.4, -0.1])
HIGH, LOW = [0, 2], [1, 3]


def _config() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights="gaussian")


def _stock_experts(tmp_path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same two random experts on every call: built once, saved, then loaded fresh."""
    if not (tmp_path / "stock" / "transformer_2").exists():
        torch.manual_seed(0)
        build_wan().save_pretrained(tmp_path / "stock" / "transformer")
        build_wan().save_pretrained(tmp_path / "stock" / "transformer_2")
    from diffusers import WanTransformer3DModel

    return tuple(WanTransformer3DModel.from_pretrained(tmp_path / "stock" / name) for name in ("transformer", "transformer_2"))


def _inputs() -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 2, 4, 4, generator=generator)
    cond = {"encoder_hidden_states": torch.randn(4, TEXT_LEN, 24, generator=generator)}
    return x, cond, {"encoder_hidden_states": torch.zeros(4, TEXT_LEN, 24)}


def _trained(tmp_path, steps: int = 2) -> tuple[lora.LoRAExperts, lora.LoRAEMATeacher, tuple[torch.nn.Module, torch.nn.Module]]:
    stock = _stock_experts(tmp_path)
    model = lora.add_lora(wan.adapt_experts(*stock, BOUNDARY), _config())
    teacher = lora.LoRAEMATeacher(target_decay=0.9)
    loss_fn = twinloss.TwinFlowLoss(guidance_teacher=lora.BaseModelTeacher(), rcgm_teacher=teacher, guidance_scale=0.5)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, cond, uncond = _inputs()
    for step in range(steps):
        out = loss_fn(model, x, cond=cond, uncond=uncond, generator=torch.Generator().manual_seed(step))
        assert torch.isfinite(out.loss)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        loss_fn.update_teachers(model)
    return model, teacher, stock


def test_only_each_experts_lora_and_twin_modules_train_and_loss_steps_move_both(tmp_path) -> None:
    stock = _stock_experts(tmp_path)
    frozen_before = {name: p.detach().clone() for expert in stock for name, p in expert.named_parameters()}
    model = lora.add_lora(wan.adapt_experts(*stock, BOUNDARY), _config())
    assert isinstance(model, lora.LoRAExperts)
    x, cond, _ = _inputs()
    model(x, T, R, **cond).square().mean().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad <= trainable
    for name in trainable:
        assert "lora_" in name or f"{DEFAULT_MODULE_NAME}.modules_to_save.default" in name, name
    for expert in ("high_noise", "low_noise"):
        assert any(n.startswith(f"experts.{expert}.") and "lora_B" in n for n in with_grad), expert
        assert any(n.startswith(f"experts.{expert}.") and "target_time_mlp.2" in n for n in with_grad), expert

    trained, _, trained_stock = _trained(tmp_path)
    moved = {expert: False for expert in ("high_noise", "low_noise")}
    initial = dict(model.named_parameters())
    assert {n for n, p in trained.named_parameters() if p.requires_grad} == trainable
    for name, parameter in trained.named_parameters():
        if "lora_B" in name and ".default." in name:  # zero at creation in both models: only training moves them
            moved[name.split(".")[1]] |= bool((parameter - initial[name]).abs().max() > 0)
    assert moved == {"high_noise": True, "low_noise": True}
    # the base weights of both experts stayed (peft keeps them as base_layer)
    base = {n.replace("base_layer.", ""): p for e in trained_stock for n, p in e.named_parameters() if "lora_" not in n}
    for name, value in frozen_before.items():
        assert torch.equal(base[name], value), name


def test_base_model_teacher_is_each_stock_expert_on_its_rows(tmp_path) -> None:
    model, _, _ = _trained(tmp_path)
    reference = _stock_experts(tmp_path)  # never adapted
    x, cond, _ = _inputs()
    teacher_out = lora.BaseModelTeacher()(model, x, T, R, cond)
    with torch.no_grad():
        for rows, expert in ((HIGH, reference[0]), (LOW, reference[1])):
            expected = wan_stock(expert, x[rows], T[rows].abs(), {"encoder_hidden_states": cond["encoder_hidden_states"][rows]})
            torch.testing.assert_close(teacher_out[rows], expected, rtol=0, atol=0)
        assert (model(x, T, R, **cond) - teacher_out).abs().max() > 1e-4  # the trained experts differ
    assert model.active_adapter == "default"


def test_lora_ema_and_teacher_state_save_and_reload_exactly_per_expert(tmp_path) -> None:
    model, teacher, _ = _trained(tmp_path)
    x, cond, _ = _inputs()
    with torch.no_grad():
        expected = model(x, T, R, **cond)
    expected_ema = teacher(model, x, T, R, cond)
    assert (expected_ema - expected).abs().max() > 1e-6  # the EMA lags behind
    model.save_pretrained(tmp_path / "lora")
    for folder in (tmp_path / "lora", tmp_path / "lora" / "twinflow_ema"):
        assert json.loads((folder / lora.EXPERTS_CONFIG_NAME).read_text())["boundary_ratio"] == BOUNDARY
        assert (folder / "transformer" / "adapter_model.safetensors").is_file()
        assert (folder / "transformer_2" / "adapter_model.safetensors").is_file()

    reloaded = lora.load_lora(wan.adapt_experts(*_stock_experts(tmp_path), BOUNDARY), tmp_path / "lora")
    ema = lora.load_lora(wan.adapt_experts(*_stock_experts(tmp_path), BOUNDARY), tmp_path / "lora" / "twinflow_ema")
    with torch.no_grad():
        assert torch.equal(reloaded(x, T, R, **cond), expected)
        assert torch.equal(ema(x, T, R, **cond), expected_ema)
    assert not any(p.requires_grad for p in reloaded.parameters())
    resumed = lora.LoRAEMATeacher(target_decay=0.9)  # a resumed run: the teacher's state onto the reloaded experts
    resumed.load_state_dict(teacher.state_dict())
    resumed.attach(reloaded)
    assert torch.equal(resumed(reloaded, x, T, R, cond), expected_ema)

    with pytest.raises(ValueError, match="boundary_ratio"):
        lora.load_lora(wan.adapt_experts(*_stock_experts(tmp_path), 0.9), tmp_path / "lora")
    swapped = tmp_path / "swapped"  # an expert's LoRA missing a twin module's weights is refused, naming keys
    (swapped / "transformer").mkdir(parents=True)
    (swapped / "transformer_2").mkdir()
    for file in (tmp_path / "lora" / "transformer").iterdir():
        if file.is_file():
            (swapped / "transformer" / file.name).write_bytes(file.read_bytes())
            (swapped / "transformer_2" / file.name).write_bytes(file.read_bytes())
    from safetensors.torch import load_file, save_file

    weights = load_file(swapped / "transformer_2" / "adapter_model.safetensors")
    save_file({k: v for k, v in weights.items() if DEFAULT_MODULE_NAME not in k}, swapped / "transformer_2" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=DEFAULT_MODULE_NAME):
        lora.load_lora(wan.adapt_experts(*_stock_experts(tmp_path), BOUNDARY), swapped)

    lora.save_merged(model, tmp_path / "merged")
    merged = wan.from_pretrained_experts(str(tmp_path / "merged"))
    assert merged.boundary_ratio == BOUNDARY
    with torch.no_grad():
        torch.testing.assert_close(merged(x, T, R, **cond), expected, rtol=1e-4, atol=1e-5)
