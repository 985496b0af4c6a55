"""Training-health signals: the term gradients add up to the loss gradient, nothing else moves."""

import math

import pytest
import torch

import twinloss
from twinloss._random import RandomState
from twinloss.health import TERMS, _term_gradients, training_signals
from twinloss.toy import TimeMLP

BATCH = 16


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = TimeMLP((4,), width=16, depth=2, num_classes=2)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # the sign embedding starts at zero (no fake/real gap): move every weight
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    x = torch.randn(BATCH, 4, generator=g)
    y = torch.randint(0, 2, (BATCH,), generator=g)
    return model, x, {"y": y}, {"y": torch.full_like(y, 2)}


def _backward_gradient(loss_fn, model, x, cond, uncond, seed):
    model.zero_grad(set_to_none=True)
    out = loss_fn(model, x, cond=cond, uncond=uncond, generator=torch.Generator().manual_seed(seed))
    out.loss.backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return out, grad


@pytest.mark.parametrize("fake_rows", ["from_batch", "added"])
@pytest.mark.parametrize("guidance", [0.0, 0.5])
def test_term_gradients_add_up_to_the_backward_gradient(guidance, fake_rows) -> None:
    model, x, cond, uncond = _setup()
    loss_fn = twinloss.TwinFlowLoss(guidance_scale=guidance, fake_rows=fake_rows)
    parameters = list(model.parameters())
    state = RandomState(x.device)
    out, gradients = _term_gradients(
        loss_fn, model, parameters, x, cond, uncond, torch.Generator().manual_seed(5), state
    )
    with state.replay():
        expected_out, expected = _backward_gradient(loss_fn, model, x, cond, uncond, seed=5)
    torch.testing.assert_close(out.loss.detach(), expected_out.loss.detach())
    torch.testing.assert_close(sum(gradients[name] for name in TERMS), expected, rtol=1e-4, atol=1e-6)
    for name in TERMS:
        assert gradients[name].norm() > 0, name


def test_signals_report_norms_and_cosines_of_the_term_gradients() -> None:
    model, x, cond, uncond = _setup(1)
    loss_fn = twinloss.TwinFlowLoss()
    signals = training_signals(loss_fn, model, x, cond=cond, uncond=uncond, generator=torch.Generator().manual_seed(3))
    _, gradients = _term_gradients(
        loss_fn, model, list(model.parameters()), x, cond, uncond, torch.Generator().manual_seed(3), RandomState(x.device)
    )
    base = sum(gradients[name] for name in ("base/one_step", "base/multi_step", "base/any_step"))
    for name in TERMS:
        assert signals.grad_norms[name] == pytest.approx(float(gradients[name].norm()), rel=1e-5)
        expected = float(gradients[name] @ base) / float(gradients[name].norm() * base.norm())
        assert signals.cosines[name] == pytest.approx(expected, abs=1e-5)
    assert signals.grad_norms["base"] == pytest.approx(float(base.norm()), rel=1e-5)


def test_without_rectification_its_gradient_is_zero_and_its_cosine_undefined() -> None:
    model, x, cond, _ = _setup()
    signals = training_signals(
        twinloss.TwinFlowLoss(guidance_scale=0.0, rectify_weight=0.0), model, x, cond=cond,
        generator=torch.Generator().manual_seed(0),
    )
    assert signals.grad_norms["rectify"] == 0.0
    assert math.isnan(signals.cosines["rectify"])
    assert signals.grad_norms["adv"] > 0


def test_signals_leave_grads_rng_loss_and_batch_untouched_and_advance_the_generator_once() -> None:
    model, x, cond, uncond = _setup()
    loss_fn = twinloss.TwinFlowLoss()
    rng = torch.get_rng_state()
    g, reference = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    x_before = x.clone()
    training_signals(loss_fn, model, x, cond=cond, uncond=uncond, generator=g)
    assert torch.equal(torch.get_rng_state(), rng)
    loss_fn(model, x, cond=cond, uncond=uncond, generator=reference)
    assert torch.equal(g.get_state(), reference.get_state())
    assert all(p.grad is None for p in model.parameters())
    assert loss_fn.rectify_weight == 0.5
    assert torch.equal(x, x_before)


def test_clamp_rates_follow_the_clamps() -> None:
    model, x, cond, _ = _setup()
    tight = twinloss.TwinFlowLoss(guidance_scale=0.0, residual_clamp=1e-9, rectify_clamp=1e-9)
    loose = twinloss.TwinFlowLoss(guidance_scale=0.0, residual_clamp=1e9, rectify_clamp=1e9)
    g = torch.Generator().manual_seed(0)
    tight_signals = training_signals(tight, model, x, cond=cond, generator=g)
    assert tight_signals.residual_clamp_rate == 1.0 and tight_signals.rectify_clamp_rate == 1.0
    loose_signals = training_signals(loose, model, x, cond=cond, generator=g)
    assert loose_signals.residual_clamp_rate == 0.0 and loose_signals.rectify_clamp_rate == 0.0
    flat = loose_signals.as_dict()
    assert {"clamp/residual", "clamp/rectify", "cos/rectify", "grad_norm/adv", "term/loss"} <= set(flat)


@pytest.mark.parametrize("setting", ["frozen guidance teacher", "image-free", "guidance-free rectification"])
def test_clamp_rates_are_the_loss_steps_own_with_a_frozen_teacher_image_free_or_guidance_free(setting) -> None:
    model, x, cond, uncond = _setup()
    frozen = twinloss.FrozenTeacher(model)
    loss_fn = {
        "frozen guidance teacher": lambda: twinloss.TwinFlowLoss(guidance_teacher=frozen),
        "image-free": lambda: twinloss.TwinFlowLoss(guidance_teacher=frozen, image_free=True),
        "guidance-free rectification": lambda: twinloss.TwinFlowLoss(rectify_field="guidance_free"),
    }[setting]()
    signals = training_signals(loss_fn, model, x, cond=cond, uncond=uncond, generator=torch.Generator().manual_seed(4))
    step = loss_fn(model, x, cond=cond, uncond=uncond, generator=torch.Generator().manual_seed(4))
    assert signals.residual_clamp_rate == float(step.clamp_rates["residual"])
    assert signals.rectify_clamp_rate == float(step.clamp_rates["rectify"])
    assert signals.terms["loss"] == pytest.approx(float(step.loss.detach()), rel=1e-6)


def test_a_plain_callable_is_refused() -> None:
    _, x, cond, _ = _setup()
    with pytest.raises(ValueError, match="nn.Module"):
        training_signals(twinloss.TwinFlowLoss(guidance_scale=0.0), lambda x_t, t, r, y: x_t, x, cond=cond)
