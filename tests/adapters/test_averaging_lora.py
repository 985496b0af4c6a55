"""LoRAWeightAverage: the sampling average of a LoRA run, kept as a second peft adapter."""

import pytest
import torch
from adapter_backbones import CASES
from peft import LoraConfig

import twinloss
from twinloss_adapters import lora
from twinloss_adapters.averaging import LoRAWeightAverage

BATCH = 4
T = torch.tensor([1.0, 0.7, 0.4, 1.0])
R = torch.tensor([0.0, 0.0, 0.2, 0.0])
BETA = 0.6


def _model(seed: int = 0):
    case = CASES["sana"]
    torch.manual_seed(seed)
    transformer = case.build()
    model = lora.add_lora(
        case.adapt(transformer),
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights="gaussian"),
    )
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, *case.latent_shape, generator=generator)
    return model, x, case.make_cond(transformer, BATCH, generator)


def _perturb(model, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_lora_average_is_the_closed_form_and_samples_from_it() -> None:
    model, x, cond = _model()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    average = LoRAWeightAverage(BETA)
    iterates = []
    for seed in (1, 2, 3):
        iterates.append(_perturb(model, seed))
        average.update(model)
    weights = [BETA**2, (1 - BETA) * BETA, 1 - BETA]
    assert list(model.peft_config) == ["default", "twinflow_average"]
    for ema_name, (online, averaged) in average._pairs.items():
        online_name = next(n for n, p in model.named_parameters() if p is online)
        expected = sum(w * it[online_name] for w, it in zip(weights, iterates, strict=True))
        torch.testing.assert_close(averaged, expected, rtol=1e-5, atol=1e-6, msg=ema_name)
        assert not averaged.requires_grad
    for name, value in frozen.items():
        if "twinflow_average" not in name:
            assert torch.equal(dict(model.named_parameters())[name], value), name

    got = average.sampling_model(model)(x, T, R, **cond)
    assert model.active_adapter == "default"
    model.set_adapter("twinflow_average")
    with torch.no_grad():
        expected = model(x, T, R, **cond)
    model.set_adapter("default")
    torch.testing.assert_close(got, expected)
    with torch.no_grad():
        assert (model(x, T, R, **cond) - got).abs().max() > 1e-5  # the online adapter differs
    sample = twinloss.AnyStepSampler(1)(average.sampling_model(model), x, cond=cond).sample
    torch.testing.assert_close(sample, x - expected_jump(model, average, x, cond))


def expected_jump(model, average, x, cond):
    ones = torch.ones(BATCH)
    return average(model, x, ones, torch.zeros(BATCH), cond)


def test_lora_average_lives_beside_the_ema_teacher_and_round_trips() -> None:
    model, x, cond = _model()
    teacher = lora.LoRAEMATeacher(0.9)
    average = LoRAWeightAverage(twinloss.PowerFunctionDecay(2.0))
    for seed in (1, 2):
        _perturb(model, seed)
        teacher.update(model)
        average.update(model)
    assert list(model.peft_config) == ["default", "twinflow_ema", "twinflow_average"]
    out = average(model, x, T, R, cond)
    assert (teacher(model, x, T, R, cond) - out).abs().max() > 1e-6

    state = average.state_dict()
    resumed_model, _, _ = _model()
    resumed_model.load_state_dict(model.state_dict(), strict=False)
    resumed = LoRAWeightAverage(twinloss.PowerFunctionDecay(2.0))
    resumed.load_state_dict(state)
    resumed.attach(resumed_model)
    assert resumed.num_updates == 2 and resumed.decay == average.decay
    torch.testing.assert_close(resumed(resumed_model, x, T, R, cond), out)
    with pytest.raises(ValueError, match="profile"):
        LoRAWeightAverage(twinloss.PowerFunctionDecay(3.0)).load_state_dict(state)
