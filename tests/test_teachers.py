"""Teachers: the online teacher is free, the EMA follows its warm-up exactly."""

import copy

import pytest
import torch
from torch.testing import assert_close

from twinloss import EMATeacher, FrozenTeacher, OnlineTeacher, TwinFlowLoss, teachers

from core_models import TinyVelocityNet, labelled_training_steps


def _inputs():
    x = torch.randn(4, 3)
    return x, torch.full((4,), 0.5), torch.full((4,), 0.2)


def test_online_teacher_is_the_model_without_grad():
    model = TinyVelocityNet((3,))
    x, t, r = _inputs()
    out = OnlineTeacher()(model, x, t, r, {})
    assert not out.requires_grad
    assert_close(out, model(x, t, r))
    assert len(list(OnlineTeacher().parameters())) == 0 and OnlineTeacher().state_dict() == {}


def test_ema_warm_up_schedule_and_average():
    model = TinyVelocityNet((3,))
    ema = EMATeacher(target_decay=0.99)
    weights, decays, decay = [], [], 0.0
    expected = None
    for step in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * (step + 1))
        current = {n: p.detach().clone() for n, p in model.named_parameters()}
        expected = current if expected is None else {
            n: decay * expected[n] + (1 - decay) * current[n] for n in current}
        decays.append(decay)
        decay = decay + (1 - decay) * (0.99 - decay) / 2
        ema.update(model)
        weights.append(expected)
    assert decays[:3] == [0.0, 0.495, pytest.approx(0.495 + 0.505 * 0.495 / 2)]
    assert ema.decay == pytest.approx(decay)
    for name, value in weights[-1].items():
        assert_close(ema.shadow[name], value)


def test_ema_evaluates_the_average_not_the_live_weights():
    model = TinyVelocityNet((3,))
    x, t, r = _inputs()
    ema = EMATeacher(0.5)
    ema.update(model)
    before = model(x, t, r).detach()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    assert_close(ema(model, x, t, r, {}), before)  # still the old average
    assert not torch.allclose(model(x, t, r), before)
    assert all(not p.requires_grad for p in ema.shadow.values())


def test_ema_keeps_float32_average_for_bf16_models():
    model = TinyVelocityNet((3,)).to(torch.bfloat16)
    ema = EMATeacher()
    ema.update(model)
    assert all(p.dtype == torch.float32 for p in ema.shadow.values())
    x, t, r = _inputs()
    assert ema(model, x.bfloat16(), t, r, {}).dtype == torch.bfloat16


def test_ema_rejects_bad_decay_and_foreign_models():
    with pytest.raises(ValueError, match="^target_decay"):
        EMATeacher(1.0)
    with pytest.raises(ValueError, match="nn.Module"):
        EMATeacher().update(lambda x_t, t, r: x_t)
    ema = EMATeacher()
    ema.update(TinyVelocityNet((3,)))
    with pytest.raises(ValueError, match="parameters differ"):
        ema.update(TinyVelocityNet((3,), num_classes=2).net)


def test_ema_casts_once_per_update_not_per_call(monkeypatch):
    import twinloss.teachers as teachers

    model = TinyVelocityNet((3,)).to(torch.bfloat16)
    ema = EMATeacher(0.5)
    ema.update(model)
    seen = []
    original = teachers.functional_call

    def recording(module, params, args, kwargs):
        seen.append({name: (p.data_ptr(), p.dtype) for name, p in params.items()})
        return original(module, params, args, kwargs)

    monkeypatch.setattr(teachers, "functional_call", recording)
    x, t, r = _inputs()
    for _ in range(3):
        ema(model, x.bfloat16(), t, r, {})
    # the same bfloat16 tensors every call: no per-call cast of the float32 average
    assert seen[0] == seen[1] == seen[2]
    assert all(dtype == torch.bfloat16 for _, dtype in seen[0].values())
    assert {n: (p.data_ptr(), p.dtype) for n, p in ema.evaluation_weights.items()} == seen[0]
    # an update rewrites the same buffers with the new average, cast once
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    ema(model, x.bfloat16(), t, r, {})
    assert seen[-1] == seen[0]
    for name, average in ema.shadow.items():
        assert torch.equal(ema.evaluation_weights[name], average.to(torch.bfloat16))


def test_ema_of_a_float32_model_evaluates_the_average_itself_with_no_second_copy():
    model = TinyVelocityNet((3,))
    ema = EMATeacher()
    ema.update(model)
    assert all(ema.evaluation_weights[name] is average for name, average in ema.shadow.items())


def test_ema_follows_a_model_cast_after_its_last_update():
    model = TinyVelocityNet((3,))
    ema = EMATeacher()
    ema.update(model)
    model.to(torch.float64)
    x, t, r = _inputs()
    assert ema(model, x.double(), t.double(), r.double(), {}).dtype == torch.float64
    assert all(p.dtype == torch.float32 for p in ema.shadow.values())


def test_ema_state_round_trip_rebuilds_the_evaluation_copy():
    model = TinyVelocityNet((3,)).to(torch.bfloat16)
    ema = EMATeacher(0.9)
    ema.update(model)
    x, t, r = _inputs()
    expected = ema(model, x.bfloat16(), t, r, {})
    restored = EMATeacher(0.9)
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 1 and restored.evaluation_weights == {}
    assert torch.equal(restored(model, x.bfloat16(), t, r, {}), expected)


def test_frozen_teacher_keeps_the_weights_of_construction_and_survives_a_checkpoint():
    model = TinyVelocityNet((3,))
    x, t, r = _inputs()
    before = model(x, t, r).detach()
    frozen = FrozenTeacher(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
    assert_close(frozen(model, x, t, r, {}), before, rtol=0, atol=0)
    frozen.update(model)  # fixed weights: an update changes nothing
    assert_close(frozen(model, x, t, r, {}), before, rtol=0, atol=0)
    resumed = FrozenTeacher(model)  # built from the trained weights, then restored
    resumed.load_state_dict(frozen.state_dict())
    assert_close(resumed(model, x, t, r, {}), before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="parameters differ from the frozen ones"):
        frozen(TinyVelocityNet((3,), num_classes=2).net, x, t, r, {})



def test_teachers_loaded_on_the_cpu_follow_the_model_to_its_device(monkeypatch):
    """A checkpoint loads onto the CPU; the 'meta' device stands for CUDA, where a CPU average or copy cannot be used."""
    monkeypatch.setattr(teachers, "check_finite_weights", lambda *args, **kwargs: None)  # meta tensors hold no values
    model = TinyVelocityNet((3,)).to(torch.bfloat16)
    ema, frozen = EMATeacher(0.9), FrozenTeacher(model)
    ema.update(model)
    on_device = copy.deepcopy(model).to("meta")
    x, t, r = (value.to("meta") for value in _inputs())
    resumed_ema, resumed_frozen = EMATeacher(0.9), FrozenTeacher(model)
    resumed_ema.load_state_dict(ema.state_dict())
    resumed_frozen.load_state_dict(frozen.state_dict())
    assert resumed_ema(on_device, x.bfloat16(), t, r, {}).device.type == "meta"
    resumed_ema.update(on_device)
    assert resumed_ema.num_updates == 2
    assert {(p.device.type, p.dtype) for p in resumed_ema.shadow.values()} == {("meta", torch.float32)}
    assert resumed_frozen(on_device, x.bfloat16(), t, r, {}).device.type == "meta"
    assert {(p.device.type, p.dtype) for p in resumed_frozen.frozen.values()} == {("meta", torch.bfloat16)}

def test_warn_after_steps_must_be_a_positive_int():
    for bad in (0, -3):
        with pytest.raises(ValueError, match="^warn_after_steps"):
            EMATeacher(warn_after_steps=bad)


@pytest.mark.parametrize("argument", ["teacher", "rcgm_teacher", "guidance_teacher"])
def test_an_ema_of_decay_0_updated_every_step_trains_exactly_as_the_online_teacher(argument):
    """Decay 0 holds the weights of the last update, which are the online ones at the next step: any difference
    in a run (a pass evaluated differently, a missed first update, another random stream under dropout) shows."""
    start = TinyVelocityNet((6,), dropout=0.1)

    def train(teacher):
        model = copy.deepcopy(start)
        loss_fn = TwinFlowLoss(**({argument: teacher} if teacher is not None else {}))
        torch.manual_seed(5)
        losses = labelled_training_steps(8, model, loss_fn, torch.optim.Adam(model.parameters(), lr=1e-2),
                                         torch.Generator().manual_seed(1), shape=(6,), batch=16)
        return losses, model

    online_losses, online_model = train(None)
    ema_losses, ema_model = train(EMATeacher(0.0))
    assert ema_losses == online_losses
    assert all(torch.equal(p, q) for p, q in zip(ema_model.parameters(), online_model.parameters(), strict=True))
    moved_losses, _ = train(EMATeacher(0.5))  # the check can fail: a lagging average changes the run
    assert moved_losses != online_losses
