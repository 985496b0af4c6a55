"""Weight averaging for sampling: closed forms in float64, state, buffers, sampling."""

import copy

import pytest
import torch
from torch import nn

import twinloss
from twinloss.averaging import AveragedVelocity

UPDATES = 5


class Tiny(nn.Module):
    """``F = W x_t + b + t u + r q`` with an optional class embedding, a float buffer and a counter."""

    def __init__(self, dim: int = 3, classes: int = 2, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim, dtype=dtype)
        self.time = nn.Parameter(torch.zeros(2, dim, dtype=dtype))
        self.label = nn.Embedding(classes, dim, dtype=dtype)
        self.register_buffer("scale", torch.ones(dim, dtype=dtype))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x_t, t, r, y):
        times = torch.stack([t, r], 1).to(x_t.dtype)
        return self.scale * self.linear(x_t) + times @ self.time + self.label(y)


def _iterates(model: nn.Module, count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``count`` random parameter (and float buffer) states theta_1..theta_count."""
    generator = torch.Generator().manual_seed(seed)
    states = []
    for _ in range(count):
        state = {name: torch.randn(p.shape, generator=generator, dtype=p.dtype) for name, p in model.named_parameters()}
        state["scale"] = torch.rand(model.scale.shape, generator=generator, dtype=model.scale.dtype) + 0.5
        states.append(state)
    return states


def _run(average, model, states) -> None:
    for state in states:
        with torch.no_grad():
            for name, value in state.items():
                model.get_parameter(name).copy_(value) if name != "scale" else model.scale.copy_(value)
            model.calls.fill_(average.num_updates + 1)
        average.update(model)


def _closed_form(weights: list[float], states, name: str) -> torch.Tensor:
    return sum(w * state[name] for w, state in zip(weights, states, strict=True))


def _constant_weights(beta: float, k: int) -> list[float]:
    return [beta ** (k - 1)] + [(1 - beta) * beta ** (k - tau) for tau in range(2, k + 1)]


def _power_weights(gamma: float, k: int) -> list[float]:
    return [(tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / k ** (gamma + 1) for tau in range(1, k + 1)]


@pytest.mark.parametrize(
    ("profile", "weights"),
    [
        (twinloss.ConstantDecay(0.7), lambda k: _constant_weights(0.7, k)),
        (twinloss.PowerFunctionDecay(2.5), lambda k: _power_weights(2.5, k)),
    ],
    ids=["constant", "power"],
)
def test_average_equals_the_float64_closed_form_after_every_update(profile, weights) -> None:
    model = Tiny()
    states = _iterates(model, UPDATES)
    average = twinloss.WeightAverage(profile)
    for k in range(1, UPDATES + 1):
        _run(average, model, states[k - 1 : k])
        expected = weights(k)
        assert sum(expected) == pytest.approx(1.0, abs=1e-12)
        for name in dict(model.named_parameters()):
            torch.testing.assert_close(average.shadow[name], _closed_form(expected, states[:k], name), rtol=1e-12, atol=1e-12)
        assert average.num_updates == k
        assert average.decay == profile.decay(k)


def test_power_function_decay_matches_edm2_relative_widths() -> None:
    # EDM2 (Karras et al. 2024): sigma_rel 0.05 <-> gamma 16.97, 0.10 <-> 6.94.
    assert twinloss.PowerFunctionDecay.from_relative_width(0.05).gamma == pytest.approx(16.97, abs=0.01)
    assert twinloss.PowerFunctionDecay.from_relative_width(0.10).gamma == pytest.approx(6.94, abs=0.01)
    assert twinloss.PowerFunctionDecay.relative_width(6.94) == pytest.approx(0.10, abs=1e-4)


def test_sampling_model_evaluates_the_average_and_matches_exported_weights() -> None:
    model = Tiny()
    states = _iterates(model, 3)
    average = twinloss.WeightAverage(twinloss.ConstantDecay(0.5))
    _run(average, model, states)
    online = copy.deepcopy(model.state_dict())
    exported = copy.deepcopy(model)
    exported.load_state_dict(average.averaged_tensors(model), strict=False)
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(4, 3, generator=generator, dtype=torch.float64)
    cond = {"y": torch.tensor([0, 1, 1, 0])}
    sampler = twinloss.AnyStepSampler(2, mode="any")
    got = sampler(average.sampling_model(model), noise, cond=cond).sample
    torch.testing.assert_close(got, sampler(exported, noise, cond=cond).sample, rtol=1e-12, atol=1e-12)
    weights = _constant_weights(0.5, 3)
    x_t, t = noise, torch.full((4,), 0.8, dtype=torch.float64)
    expected = (
        states[-1]["scale"] * (x_t @ _closed_form(weights, states, "linear.weight").T + _closed_form(weights, states, "linear.bias"))
        + torch.stack([t, 0.5 * t], 1) @ _closed_form(weights, states, "time")
        + _closed_form(weights, states, "label.weight")[cond["y"]]
    )
    torch.testing.assert_close(average.sampling_model(model)(x_t, t, 0.5 * t, **cond), expected, rtol=1e-12, atol=1e-12)
    for name, value in model.state_dict().items():  # the online model is untouched
        assert torch.equal(value, online[name]), name


def test_sampling_model_keeps_the_conditioning_check_and_carries_no_grad() -> None:
    model = Tiny()
    average = twinloss.WeightAverage()
    average.update(model)
    sampled = average.sampling_model(model)
    noise = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="does not accept"):
        twinloss.AnyStepSampler(1)(sampled, noise, cond={"label": torch.tensor([0, 1])})
    with torch.enable_grad():
        out = sampled(noise.requires_grad_(), torch.ones(2), torch.zeros(2), y=torch.tensor([0, 1]))
    assert not out.requires_grad
    assert all(not value.requires_grad for value in average.shadow.values())
    assert isinstance(sampled, AveragedVelocity) and not isinstance(sampled, nn.Module)


def test_buffers_are_averaged_or_copied_only_when_asked() -> None:
    model = Tiny()
    states = _iterates(model, 4)
    averaged = twinloss.WeightAverage(twinloss.ConstantDecay(0.6), average_buffers=True)
    plain = twinloss.WeightAverage(twinloss.ConstantDecay(0.6))
    for k in range(4):
        _run(averaged, model, states[k : k + 1])
        _run(plain, model, states[k : k + 1])
    weights = _constant_weights(0.6, 4)
    torch.testing.assert_close(averaged.buffers_average["scale"], _closed_form(weights, states, "scale"), rtol=1e-12, atol=1e-12)
    assert averaged.buffers_average["calls"].item() == 4  # an integer buffer is copied, not averaged
    assert plain.buffers_average == {}
    tensors_averaged, tensors_plain = averaged.averaged_tensors(model), plain.averaged_tensors(model)
    assert "scale" in tensors_averaged and "scale" not in tensors_plain
    x, t = torch.randn(2, 3, dtype=torch.float64), torch.full((2,), 0.5, dtype=torch.float64)
    y = torch.tensor([1, 0])
    with_online_buffer = plain(model, x, t, t, {"y": y})
    with_average_buffer = averaged(model, x, t, t, {"y": y})
    ratio = _closed_form(weights, states, "scale") / states[-1]["scale"]
    linear = with_online_buffer - (torch.stack([t, t], 1) @ plain.shadow["time"] + plain.shadow["label.weight"][y])
    torch.testing.assert_close(
        with_average_buffer, linear * ratio + (with_online_buffer - linear), rtol=1e-10, atol=1e-10
    )



def test_an_update_refused_for_its_buffers_leaves_the_average_and_count_unchanged() -> None:
    model = nn.BatchNorm1d(3)
    average = twinloss.WeightAverage(0.9, average_buffers=True)
    average.update(model)
    kept = {name: value.clone() for name, value in {**average.shadow, **average.buffers_average}.items()}

    def assert_unchanged() -> None:
        assert average.num_updates == 1 and average.decay == 0.0
        torch.testing.assert_close({**average.shadow, **average.buffers_average}, kept, rtol=0, atol=0)

    with torch.no_grad():
        model.weight.add_(1.0)
    model.register_buffer("extra", torch.zeros(1))
    with pytest.raises(ValueError, match=r"the model's buffers .* differ from the averaged ones"):
        average.update(model)
    assert_unchanged()
    del model.extra
    model.running_mean = torch.zeros(4)
    with pytest.raises(ValueError, match=r"buffer 'running_mean' has shape \(4,\), the averaged one \(3,\)"):
        average.update(model)
    assert_unchanged()
    model.running_mean = torch.full((3,), float("nan"))
    with pytest.raises(ValueError, match=r"WeightAverage.update: the model's buffer 'running_mean' contains NaN"):
        average.update(model)
    assert_unchanged()

def _train(model, average, steps: int, seed: int, optimizer) -> None:
    generator = torch.Generator().manual_seed(seed)
    loss_fn = twinloss.TwinFlowLoss(guidance_scale=0.0)
    for _ in range(steps):
        x = torch.randn(8, 3, generator=generator, dtype=torch.float64)
        y = torch.randint(0, 2, (8,), generator=generator)
        out = loss_fn(model, x, cond={"y": y}, generator=generator)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        average.update(model)


@pytest.mark.parametrize("profile", [twinloss.ConstantDecay(0.9), twinloss.PowerFunctionDecay(3.0)], ids=["constant", "power"])
def test_state_dict_round_trip_resumes_bit_exactly(profile, tmp_path) -> None:
    torch.manual_seed(0)
    model = Tiny()
    average = twinloss.WeightAverage(profile, average_buffers=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, average, 3, seed=1, optimizer=optimizer)
    torch.save(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "average": average.state_dict()},
        tmp_path / "ckpt.pt",
    )
    _train(model, average, 2, seed=2, optimizer=optimizer)

    saved = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    resumed_model = Tiny()
    resumed_model.load_state_dict(saved["model"])
    resumed_optimizer = torch.optim.Adam(resumed_model.parameters(), lr=1e-2)
    resumed_optimizer.load_state_dict(saved["optimizer"])
    resumed = twinloss.WeightAverage(copy.deepcopy(profile), average_buffers=True)
    resumed.load_state_dict(saved["average"])
    assert resumed.num_updates == 3
    _train(resumed_model, resumed, 2, seed=2, optimizer=resumed_optimizer)
    assert resumed.num_updates == average.num_updates == 5
    assert resumed.decay == average.decay
    for name in average.shadow:
        assert torch.equal(resumed.shadow[name], average.shadow[name]), name
    for name in average.buffers_average:
        assert torch.equal(resumed.buffers_average[name], average.buffers_average[name]), name



def test_an_average_loaded_on_the_cpu_follows_the_model_to_its_device(monkeypatch) -> None:
    """A checkpoint loads onto the CPU; the 'meta' device stands for CUDA, where a CPU average cannot be used."""
    monkeypatch.setattr(twinloss.teachers, "check_finite_weights", lambda *args, **kwargs: None)  # no values on meta
    monkeypatch.setattr(twinloss.averaging, "check_finite_weights", lambda *args, **kwargs: None)
    model = Tiny(dtype=torch.bfloat16)
    average = twinloss.WeightAverage(0.9, average_buffers=True)
    average.update(model)
    resumed = twinloss.WeightAverage(0.9, average_buffers=True)
    resumed.load_state_dict(average.state_dict())
    on_device = copy.deepcopy(model).to("meta")
    exported = resumed.averaged_tensors(on_device)
    assert {(value.device.type, value.dtype) for value in exported.values()} == {
        ("meta", torch.bfloat16), ("meta", torch.long)
    }
    x, t = torch.randn(2, 3, dtype=torch.bfloat16, device="meta"), torch.full((2,), 0.5, device="meta")
    assert resumed(on_device, x, t, t, {"y": torch.tensor([1, 0], device="meta")}).device.type == "meta"
    resumed.update(on_device)
    assert resumed.num_updates == 2
    kept = {**resumed.shadow, **resumed.buffers_average}
    assert {(value.device.type, value.dtype) for value in kept.values()} == {("meta", torch.float32), ("meta", torch.long)}

def test_loading_refuses_another_profile_or_buffer_setting() -> None:
    model = Tiny()
    average = twinloss.WeightAverage(twinloss.ConstantDecay(0.9))
    average.update(model)
    state = average.state_dict()
    with pytest.raises(ValueError, match="profile"):
        twinloss.WeightAverage(twinloss.ConstantDecay(0.99)).load_state_dict(state)
    with pytest.raises(ValueError, match="profile"):
        twinloss.WeightAverage(twinloss.PowerFunctionDecay()).load_state_dict(state)
    with pytest.raises(ValueError, match="average_buffers"):
        twinloss.WeightAverage(twinloss.ConstantDecay(0.9), average_buffers=True).load_state_dict(state)


def test_average_is_separate_from_the_teacher_and_leaves_the_online_weights_alone() -> None:
    model = Tiny()
    teacher = twinloss.EMATeacher(0.5)
    average = twinloss.WeightAverage(twinloss.ConstantDecay(0.9))
    states = _iterates(model, 3)
    for k in range(3):
        _run(average, model, states[k : k + 1])
        teacher.update(model)
    online = {name: p.detach().clone() for name, p in model.named_parameters()}
    average.update(model)
    for name, p in model.named_parameters():
        assert torch.equal(p, online[name])
        assert average.shadow[name].data_ptr() != teacher.shadow[name].data_ptr()
    assert not torch.allclose(average.shadow["linear.weight"], teacher.shadow["linear.weight"])


def test_a_number_is_a_constant_decay() -> None:
    profile = twinloss.WeightAverage(0.95).profile
    assert isinstance(profile, twinloss.ConstantDecay) and profile.value == 0.95
    assert isinstance(twinloss.WeightAverage().profile, twinloss.ConstantDecay)
    assert twinloss.WeightAverage().profile.value == 0.999


def test_invalid_arguments_raise_value_errors() -> None:
    with pytest.raises(ValueError, match="decay"):
        twinloss.ConstantDecay(1.0)
    with pytest.raises(ValueError, match="gamma"):
        twinloss.PowerFunctionDecay(0.0)
    with pytest.raises(ValueError, match="sigma_rel"):
        twinloss.PowerFunctionDecay.from_relative_width(0.3)
    with pytest.raises(ValueError, match="update"):
        twinloss.ConstantDecay().decay(0)
    with pytest.raises(ValueError, match="decay"):
        twinloss.WeightAverage(1.5)
    with pytest.raises(ValueError, match="nn.Module"):
        twinloss.WeightAverage().update(lambda x_t, t, r: x_t)
