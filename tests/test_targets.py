"""RCGM and guidance targets against closed forms in float64."""

import math

import pytest
import torch
from torch.testing import assert_close

from twinloss import guidance_target, rcgm_target
from twinloss.targets import fake_samples, image_free_guidance_target, rectification_target, tangent_time_weight

from core_models import GaussianFlow


def _gaussian_batch(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 0.7 + 0.5 * torch.randn(n, 3, dtype=torch.float64, generator=g)
    z = torch.randn(n, 3, dtype=torch.float64, generator=g)
    t = 0.1 + 0.9 * torch.rand(n, dtype=torch.float64, generator=g)
    r = t * torch.rand(n, dtype=torch.float64, generator=g) * 0.9
    x_t = t[:, None] * z + (1 - t[:, None]) * x
    return x_t, t, r


def test_residual_vanishes_for_the_exact_flow():
    """With F exact and v the exact first-step velocity, T == F_theta exactly."""
    flow = GaussianFlow()
    x_t, t, r = _gaussian_batch()
    step = 0.01
    prediction = flow(x_t, t, r)
    first_step_velocity = flow(x_t, t, t - step)  # carries x_t onto the flow at t - d
    for order in (1, 2, 4):
        target = rcgm_target(flow, x_t, t, r, first_step_velocity, prediction, step=step, order=order)
        assert_close(target, prediction, atol=1e-10, rtol=0)


def test_residual_is_first_order_in_the_step_with_instantaneous_velocity():
    flow = GaussianFlow()
    x_t, t, r = _gaussian_batch(seed=1)
    r = torch.minimum(r, t - 0.02)  # every jump longer than the largest step
    prediction = flow(x_t, t, r)
    velocity = flow(x_t, t, t)
    errors = []
    for step in (0.01, 0.001):
        target = rcgm_target(flow, x_t, t, r, velocity, prediction, step=step, order=2)
        errors.append((target - prediction).abs().max().item())
    assert errors[0] < 0.2 and 5 < errors[0] / errors[1] < 20  # R = O(d)


def test_reduces_to_flow_matching_when_r_equals_t():
    g = torch.Generator().manual_seed(2)
    x_t = torch.randn(32, 4, dtype=torch.float64, generator=g)
    t = torch.rand(32, dtype=torch.float64, generator=g)
    v = torch.randn(32, 4, dtype=torch.float64, generator=g)
    near = v + 0.5 * torch.rand(32, 4, dtype=torch.float64, generator=g) - 0.25
    calls = []

    def teacher(x, s, s_next):
        calls.append(s_next)
        return torch.zeros_like(x)

    target = rcgm_target(teacher, x_t, t, t, v, near)
    assert_close(target, v)  # |F - v| <= 1: the target is v itself
    far = v + 3.0
    assert_close(rcgm_target(teacher, x_t, t, t, v, far), far - 1.0)  # clamped residual


def test_residual_formula_line_by_line():
    """Independent re-derivation with an arbitrary (linear) teacher, order 2."""
    g = torch.Generator().manual_seed(3)
    x_t = torch.randn(8, 2, dtype=torch.float64, generator=g)
    t = torch.full((8,), 0.8, dtype=torch.float64)
    r = torch.full((8,), 0.2, dtype=torch.float64)
    v = torch.randn(8, 2, dtype=torch.float64, generator=g)
    prediction = torch.randn(8, 2, dtype=torch.float64, generator=g) * 0.01 + 0.5

    def teacher(x, s, s_next):
        return 0.3 * x + (s + 2 * s_next)[:, None]

    d = 0.01
    x_m = x_t - d * v
    s0, s1, s2 = 0.79, 0.79 - 0.59 / 2, 0.2
    f1 = teacher(x_m, torch.full((8,), s0, dtype=torch.float64), torch.full((8,), s1, dtype=torch.float64))
    x1 = x_m - (s0 - s1) * f1
    f2 = teacher(x1, torch.full((8,), s1, dtype=torch.float64), torch.full((8,), s2, dtype=torch.float64))
    displacement = (s0 - s1) * f1 + (s1 - s2) * f2
    residual = ((0.8 - 0.2) * prediction - displacement) / d - v
    expected = prediction - residual.clamp(-1, 1)
    assert_close(rcgm_target(teacher, x_t, t, r, v, prediction, step=d, order=2), expected)


def test_r_after_t_is_rejected():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="r must not exceed t"):
        rcgm_target(lambda a, b, c: a, x, torch.tensor([0.5, 0.5]), torch.tensor([0.2, 0.6]), x, x)


def test_guidance_target():
    v, c, u = torch.randn(3, 4, 2, dtype=torch.float64).unbind(0)
    assert_close(guidance_target(v, c, u, 0.5), v + 0.5 * (c - u))
    assert_close(guidance_target(v, c, u, 0.0), v)


def test_fake_samples_are_one_jump_from_noise_to_data():
    z, velocity = torch.randn(2, 5, 3, dtype=torch.float64).unbind(0)
    # x_r = x_t - (t - r) F with t = 1, r = 0, written out
    assert_close(fake_samples(z, velocity), z - 1.0 * velocity, rtol=0, atol=0)
    # the exact Gaussian flow's jump from pure noise lands on its data mean for z = 0
    flow = GaussianFlow(mu=0.7, s=0.5)
    ones = torch.ones(5, dtype=torch.float64)
    zero_noise = torch.zeros(5, 3, dtype=torch.float64)
    assert_close(fake_samples(zero_noise, flow(zero_noise, ones, 0 * ones)), torch.full((5, 3), 0.7, dtype=torch.float64))


def test_image_free_guidance_target_is_the_teachers_cfg_velocity():
    c, u = torch.randn(2, 4, 2, dtype=torch.float64).unbind(0)
    assert_close(image_free_guidance_target(c, u, 4.0), u + 4.0 * (c - u))
    assert_close(image_free_guidance_target(c, u, 1.0), c)  # w = 1: the conditional velocity itself
    # it is the data-driven target with the data velocity v replaced by the unconditional teacher
    assert_close(image_free_guidance_target(c, u, 0.8), guidance_target(u, c, u, 0.8))


def test_tangent_time_weight_closed_form():
    t = torch.tensor([1.0, 0.5, 0.5, -0.3], dtype=torch.float64)
    r = torch.tensor([0.0, 0.5, 0.1, -0.3], dtype=torch.float64)
    expected = 1 + torch.tan(torch.tensor([0.0, 1.0, 0.6, 1.0], dtype=torch.float64) * math.pi / 2.5)
    assert_close(tangent_time_weight(t, r), expected)
    assert tangent_time_weight(t, r)[0] == 1.0 and abs(tangent_time_weight(t, r)[1].item() - 4.0777) < 1e-4


def test_rectification_target_gradient_is_the_clamped_gap():
    g = torch.Generator().manual_seed(5)
    prediction = torch.randn(4, 3, dtype=torch.float64, generator=g).requires_grad_(True)
    fake, real = (2 * torch.randn(2, 4, 3, dtype=torch.float64, generator=g)).unbind(0)
    target = rectification_target(prediction, fake, real, clamp=1.0)
    assert not target.requires_grad
    gap = (fake - real).clamp(-1, 1)
    assert bool((gap.abs() == 1).any()) and bool((gap.abs() < 1).any())
    assert_close(target, prediction.detach() - gap)
    (0.5 * ((prediction - target) ** 2).sum()).backward()
    assert_close(prediction.grad, gap)
