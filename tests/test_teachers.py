"""Teachers: the online teacher is free, the EMA follows its warm-up exactly."""

import pytest
import torch
from torch.testing import assert_close

from twinloss import EMATeacher, OnlineTeacher

from core_models import TinyVelocityNet


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
