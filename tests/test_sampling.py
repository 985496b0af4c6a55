"""AnyStepSampler contract: endpoints, identity at t == r, dtype and shape, 1-NFE formula,
closed-form steps, the authors' schedule construction and their presets."""

import math

import pytest
import torch
from torch.testing import assert_close

from twinloss import AnyStepSampler, CosinePath, time_schedule
from twinloss.sampling import SAMPLER_PRESETS, SamplerStep, any_step, few_step, multi_step

from core_models import GaussianFlow, TinyVelocityNet


def test_uniform_schedule_and_endpoints():
    assert_close(time_schedule(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    gap = time_schedule(3, end_gap=0.6, dtype=torch.float64)
    assert_close(gap, torch.tensor([1.0, 0.8, 0.6, 0.0], dtype=torch.float64))
    warped = time_schedule(5, kumaraswamy=(2.0, 1.5, 1.0), dtype=torch.float64)
    assert warped[0] == 1 and warped[-1] == 0 and bool((warped[1:] < warped[:-1]).all())
    progress = torch.tensor([0.0, 0.2, 0.4, 0.6, 0.8], dtype=torch.float64)
    assert_close(warped[:-1], 1 - (1 - (1 - progress**2.0) ** 1.5) ** 1.0)


@pytest.mark.parametrize("shift", [0.5, 3.0, float(torch.e) ** 1.15])
def test_shifted_schedule_is_the_resolution_shift_of_the_unshifted_one(shift):
    for options in (dict(), dict(start_gap=0.001, end_gap=0.4, kumaraswamy=(1.17, 0.8, 1.1))):
        plain = time_schedule(4, dtype=torch.float64, **options)
        shifted = time_schedule(4, shift=shift, dtype=torch.float64, **options)
        assert_close(shifted, shift * plain / (1 + (shift - 1) * plain))  # diffusers' static shift, written out
        assert shifted[-1] == 0 and (shifted[0] == 1) == ("start_gap" not in options)  # 0 and 1 stay put
        assert bool((shifted[1:-1] > plain[1:-1]).all()) == (shift > 1)
        sampler = AnyStepSampler(4, shift=shift, **options)
        assert_close(sampler.schedule(dtype=torch.float64), shifted)


def test_warp_acts_on_progress_as_the_authors_do():
    """Their multi-step setting (1.17, 0.8, 1.1) at K = 4 (docs/method.md, section 5)."""
    schedule = time_schedule(4, kumaraswamy=(1.17, 0.8, 1.1), dtype=torch.float64)
    assert_close(schedule, torch.tensor([1.0, 0.866, 0.660, 0.395, 0.0], dtype=torch.float64), atol=6e-4, rtol=0)


def test_start_and_end_gap_knots():
    # progress 0.001 .. 0.5 in 4 knots (end gap > 0: K knots), s = 1 - p, then 0
    schedule = time_schedule(4, start_gap=0.001, end_gap=0.5, dtype=torch.float64)
    step = (0.5 - 0.001) / 3
    expected = [0.999, 1 - 0.001 - step, 1 - 0.001 - 2 * step, 0.5, 0.0]
    assert_close(schedule, torch.tensor(expected, dtype=torch.float64))
    # no end gap: K + 1 knots from the start gap to 1, the last dropped
    assert_close(
        time_schedule(2, start_gap=0.2, dtype=torch.float64), torch.tensor([0.8, 0.4, 0.0], dtype=torch.float64)
    )
    assert_close(time_schedule(3, end_gap=0.0), time_schedule(3))


def test_one_step_few_mode_is_the_one_jump_generator():
    model = TinyVelocityNet((3, 4, 4))
    z = torch.randn(5, 3, 4, 4)
    out = AnyStepSampler(steps=1)(model, z)
    expected = z - model(z, torch.ones(5), torch.zeros(5))
    assert_close(out.sample, expected)
    assert out.model_calls == 1 and out.trajectory is None


@pytest.mark.parametrize("mode", ["few", "any", "multi"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_dtype_and_shape_kept(mode, dtype):
    model = TinyVelocityNet((2, 6)).to(dtype)
    z = torch.randn(3, 2, 6).to(dtype)
    out = AnyStepSampler(steps=3, mode=mode, return_trajectory=True)(model, z, generator=torch.Generator().manual_seed(0))
    assert out.sample.shape == z.shape and out.sample.dtype == dtype
    assert len(out.trajectory) == 4 and out.trajectory[0] is z
    assert all(s.dtype == dtype for s in out.trajectory)


def test_repeated_times_are_identity_steps():
    model = TinyVelocityNet((4,)).double()
    z = torch.randn(6, 4, dtype=torch.float64)
    schedule = torch.tensor([1.0, 0.5, 0.5, 0.0], dtype=torch.float64)
    for mode, kwargs in [("any", {}), ("multi", {}), ("few", {"stochastic_ratio": 0.0})]:
        out = AnyStepSampler(steps=3, mode=mode, return_trajectory=True, **kwargs)(model, z, schedule=schedule)
        assert_close(out.trajectory[2], out.trajectory[1], rtol=1e-12, atol=1e-12)


def test_exact_flow_is_sampled_exactly_in_every_mode():
    """For the exact Gaussian field, any mode lands on the flow map of the noise at every K."""
    flow = GaussianFlow(mu=0.7, s=0.5)
    z = torch.randn(64, 2, dtype=torch.float64)
    exact = z - flow(z, torch.ones(64, dtype=torch.float64), torch.zeros(64, dtype=torch.float64))
    for steps in (1, 3, 8):
        assert_close(AnyStepSampler(steps, mode="any")(flow, z).sample, exact)
    def error(steps, heun):
        sample = AnyStepSampler(steps, mode="multi", heun=heun)(flow, z).sample
        return (sample - exact).abs().max().item()

    assert 3.0 < error(16, False) / error(64, False) < 5.0  # Euler: first order
    assert 12.0 < error(16, True) / error(64, True) < 20.0  # Heun: second order
    assert error(16, True) < error(64, False)


def test_few_mode_renoises_with_fresh_noise_from_the_generator():
    model = TinyVelocityNet((3,))
    z = torch.randn(4, 3)
    sampler = AnyStepSampler(3, mode="few", stochastic_ratio=1.0)
    a = sampler(model, z, generator=torch.Generator().manual_seed(1)).sample
    b = sampler(model, z, generator=torch.Generator().manual_seed(1)).sample
    c = sampler(model, z, generator=torch.Generator().manual_seed(2)).sample
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_guidance_is_one_batched_call_per_step():
    calls = []

    def model(x_t, t, r, y):
        calls.append(x_t.shape[0])
        return x_t * 0 + y[:, None].to(x_t.dtype)

    z = torch.zeros(3, 2)
    y, null = torch.full((3,), 2), torch.zeros(3, dtype=torch.long)
    out = AnyStepSampler(1, guidance_scale=1.5)(model, z, cond={"y": y}, uncond={"y": null})
    assert calls == [6]
    assert_close(out.sample, -(2 + 1.5 * (2 - 0)) * torch.ones(3, 2))


def test_a_guidance_interval_guides_only_the_model_calls_whose_time_lies_inside_it():
    """Euler in float64, written out: CFG ``F_c + w (F_c - F_u)`` on the steps with ``0.2 < s < 0.7``, the
    conditional velocity alone elsewhere, and one batched call per guided step, one plain call per other."""
    calls = []

    def model(x_t, t, r, y):
        calls.append(x_t.shape[0])
        return x_t * t[:, None] + y[:, None].to(x_t.dtype)  # cond and uncond differ by y

    z = torch.randn(3, 2, dtype=torch.float64)
    y, null = torch.full((3,), 2), torch.zeros(3, dtype=torch.long)
    w, schedule = 1.5, [1.0, 0.8, 0.6, 0.4, 0.2, 0.0]  # starts 1 and 0.8 outside, 0.6 and 0.4 inside, 0.2 on the edge
    out = AnyStepSampler(5, mode="multi", guidance_scale=w, guidance_interval=(0.2, 0.7))(
        model, z, cond={"y": y}, uncond={"y": null})
    x = z.clone()
    for s, s_next in zip(schedule[:-1], schedule[1:], strict=True):
        velocity = x * s + 2.0 + (w * (2.0 - 0.0) if 0.2 < s < 0.7 else 0.0)
        x = x - (s - s_next) * velocity
    assert_close(out.sample, x)
    assert calls == [3, 3, 6, 6, 3] and out.model_calls == 5
    every_step = AnyStepSampler(5, mode="multi", guidance_scale=w)(model, z, cond={"y": y}, uncond={"y": null})
    assert not torch.allclose(every_step.sample, out.sample)  # without the interval every step is guided
    calls.clear()  # Heun's correction call is guided by its own time, the step's end
    AnyStepSampler(5, mode="multi", heun=True, guidance_scale=w, guidance_interval=(0.2, 0.7))(
        model, z, cond={"y": y}, uncond={"y": null})
    assert calls == [3, 3, 3, 6, 6, 6, 6, 3, 3]  # (1, 0.8), (0.8, 0.6), (0.6, 0.4), (0.4, 0.2), then 0.2 alone


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: AnyStepSampler(2, guidance_interval=(0.2, 0.7)), r"^guidance_interval=\(0.2, 0.7\) limits guidance"),
        (lambda: AnyStepSampler(2, guidance_scale=1.0, guidance_interval=(0.7, 0.2)), "^guidance_interval must "),
        (lambda: AnyStepSampler(0), "^steps "),
        (lambda: AnyStepSampler(2, mode="jump"), "^mode "),
        (lambda: AnyStepSampler(2, mode="few", heun=True), "^heun"),
        (lambda: AnyStepSampler(1, end_gap=0.5), "^end_gap"),
        (lambda: AnyStepSampler(3, end_gap=1.5), "^end_gap"),
        (lambda: AnyStepSampler(2, stochastic_ratio=2.0), "^stochastic_ratio"),
        (lambda: AnyStepSampler(2, kumaraswamy=(1.0, 0.0, 1.0)), "^kumaraswamy"),
        (lambda: AnyStepSampler(2, start_gap=-0.1), "^start_gap"),
        (lambda: AnyStepSampler(2, shift=0.0), "^shift must be a finite number > 0, got 0.0"),
        (lambda: AnyStepSampler(2, start_gap=0.5, end_gap=0.5), "^start_gap \\+ end_gap"),
        (lambda: AnyStepSampler.from_preset("qwenimage_8nfe"), "^preset 'qwenimage_8nfe' is unknown"),
        (lambda: AnyStepSampler.from_preset("qwenimage_4nfe", steps=2), r"^overrides \['steps'\]"),
        (lambda: AnyStepSampler(2, mode="any", path=CosinePath()), r"^path is given, but mode='any'"),
        (lambda: AnyStepSampler(2, mode="any", stochastic_ratio=0.3), r"^stochastic_ratio=0.3 applies to mode='few'"),
        (lambda: AnyStepSampler(2, mode="multi", stochastic_ratio=1.0), r"^stochastic_ratio=1.0 applies to mode='few'"),
        (lambda: AnyStepSampler(2, mode="multi", path=CosinePath()), r"^path is given, but mode='multi'"),
    ],
)
def test_bad_configuration(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_call_arguments():
    model = TinyVelocityNet((3,))
    z = torch.randn(2, 3)
    with pytest.raises(ValueError, match="non-increasing"):
        AnyStepSampler(2, mode="any")(model, z, schedule=torch.tensor([1.0, 0.3, 0.6]))
    with pytest.raises(ValueError, match="^schedule must end at time 0"):  # its sample would still be noisy
        AnyStepSampler(1)(model, z, schedule=torch.tensor([1.0, 0.5]))
    with pytest.raises(ValueError, match="^noise "):
        AnyStepSampler()(model, z.long())
    with pytest.raises(ValueError, match="^uncond is required"):
        AnyStepSampler(guidance_scale=1.0)(model, z, cond={"y": torch.zeros(2, dtype=torch.long)})
    labels = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="^uncond was given, but guidance_scale=0 would ignore it"):
        AnyStepSampler()(model, z, cond={"y": labels}, uncond={"y": labels + 1})
    with pytest.raises(ValueError, match=r"cond has keys \['label'\]"):
        AnyStepSampler()(model, z, cond={"label": torch.zeros(2, dtype=torch.long)})


def _per_row_times(model):
    """The step functions' ``velocity_fn(x, s, r)`` (0-d times) from a protocol model (``[B]`` times)."""
    return lambda x, s, r: model(x, s.expand(x.shape[0]), r.expand(x.shape[0]))


def _recording(model, log):
    def velocity(x_t, t, r):
        log.append((float(t[0]), float(r[0])))
        return model(x_t, t, r)

    return velocity


def test_few_step_without_fresh_noise_is_the_closed_form_interpolation():
    """eta = 0 on the linear path: x' = (s'/s) x + (1 - s'/s) x_hat, x_hat = x - s F(x, s, 0)."""
    model = TinyVelocityNet((3,)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    s, s_next = torch.tensor(0.8, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64)
    log = []
    stepped = few_step(_per_row_times(_recording(model, log)), x, s, s_next, stochastic_ratio=0.0)
    x_hat = x - 0.8 * model(x, torch.full((5,), 0.8, dtype=torch.float64), torch.zeros(5, dtype=torch.float64))
    assert_close(stepped, (0.3 / 0.8) * x + (1 - 0.3 / 0.8) * x_hat, rtol=1e-12, atol=1e-12)
    assert log == [(0.8, 0.0)]


def test_few_step_mixes_fresh_noise_drawn_from_the_generator():
    model = TinyVelocityNet((4,)).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    s, s_next, eta = 0.9, 0.4, 0.3
    stepped = few_step(
        _per_row_times(model), x, torch.tensor(s, dtype=torch.float64), torch.tensor(s_next, dtype=torch.float64),
        stochastic_ratio=eta, generator=torch.Generator().manual_seed(7),
    )
    x_hat = x - s * model(x, torch.full((3,), s, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    z_hat = (x - (1 - s) * x_hat) / s
    fresh = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    expected = (1 - s_next) * x_hat + s_next * (math.sqrt(1 - eta) * z_hat + math.sqrt(eta) * fresh)
    assert_close(stepped, expected, rtol=1e-12, atol=1e-12)


def test_any_and_multi_steps_are_the_euler_jumps():
    model = TinyVelocityNet((2,)).double()
    x = torch.randn(4, 2, dtype=torch.float64)
    s, s_next = torch.tensor(0.7, dtype=torch.float64), torch.tensor(0.2, dtype=torch.float64)
    full = lambda value: torch.full((4,), value, dtype=torch.float64)  # noqa: E731
    velocity_fn = _per_row_times(model)
    assert_close(any_step(velocity_fn, x, s, s_next), x - 0.5 * model(x, full(0.7), full(0.2)))
    slope = model(x, full(0.7), full(0.7))
    assert_close(multi_step(velocity_fn, x, s, s_next), x - 0.5 * slope)
    euler = x - 0.5 * slope
    heun = x - 0.5 * 0.5 * (slope + model(euler, full(0.2), full(0.2)))
    assert_close(multi_step(velocity_fn, x, s, s_next, heun=True), heun)


def test_heun_never_calls_the_field_at_time_zero_its_last_step_to_data_is_euler():
    """K Heun steps make 2K - 1 calls, the last a plain Euler step to 0 (k-diffusion, diffusers' FlowMatchHeun)."""
    model = TinyVelocityNet((3,)).double()
    z = torch.randn(2, 3, dtype=torch.float64)
    log = []
    out = AnyStepSampler(3, mode="multi", heun=True, return_trajectory=True)(_recording(model, log), z)
    assert out.model_calls == 5
    assert [t for t, _ in log] == pytest.approx([1.0, 2 / 3, 2 / 3, 1 / 3, 1 / 3])  # no call at t = 0
    last = out.trajectory[-2]
    third = torch.full((2,), 1 / 3, dtype=torch.float64)
    assert_close(out.sample, last - (1 / 3) * model(last, third, third))
    s, zero = torch.tensor(0.4, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    assert_close(multi_step(_per_row_times(model), z, s, zero, heun=True), multi_step(_per_row_times(model), z, s, zero))


def test_start_gap_sets_the_first_call_and_end_gap_the_last_jump():
    model = TinyVelocityNet((3,)).double()
    z = torch.randn(2, 3, dtype=torch.float64)
    log = []
    sampler = AnyStepSampler(3, start_gap=0.1, end_gap=0.4, stochastic_ratio=0.0, return_trajectory=True)
    out = sampler(_recording(model, log), z)
    assert [t for t, _ in log] == pytest.approx([0.9, 0.65, 0.4])  # p = 0.1, 0.35, 0.6 and all(r == 0 for _, r in log)
    last = out.trajectory[-2]
    x_hat = last - 0.4 * model(last, torch.full((2,), 0.4, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    assert_close(out.sample, x_hat)


def test_callback_sees_every_step_state():
    model = TinyVelocityNet((3,))
    seen: list[SamplerStep] = []
    out = AnyStepSampler(3, mode="any", return_trajectory=True)(model, torch.randn(2, 3), callback=seen.append)
    assert [step.index for step in seen] == [0, 1, 2]
    assert_close(torch.stack([step.s for step in seen]), out.times[:-1])
    assert_close(torch.stack([step.s_next for step in seen]), out.times[1:])
    for step, state in zip(seen, out.trajectory[1:], strict=True):
        assert_close(step.x, state)


def test_presets_carry_the_authors_numbers():
    """Numbers copied by hand from inclusionAI/TwinFlow inference.py and src/configs/*.yaml."""
    expected = {
        "qwenimage_4nfe": dict(steps=4, mode="few", stochastic_ratio=1.0, start_gap=0.001, end_gap=0.5, kumaraswamy=None),
        "qwenimage_2nfe": dict(steps=2, mode="few", stochastic_ratio=1.0, start_gap=0.001, end_gap=0.6, kumaraswamy=None),
        "config_few_2nfe": dict(steps=2, mode="few", stochastic_ratio=1.0, start_gap=0.001, end_gap=0.7, kumaraswamy=None),
        "config_any_4nfe": dict(steps=4, mode="any", stochastic_ratio=0.0, start_gap=0.001, end_gap=0.5, kumaraswamy=None),
        "config_multi_30": dict(
            steps=30, mode="multi", stochastic_ratio=0.0, start_gap=0.001, end_gap=None, kumaraswamy=(1.17, 0.8, 1.1)
        ),
    }
    assert set(SAMPLER_PRESETS) == set(expected)
    for name, keywords in expected.items():
        sampler = AnyStepSampler.from_preset(name)
        assert {key: getattr(sampler, key) for key in keywords} == keywords, name
    assert_close(
        AnyStepSampler.from_preset("qwenimage_2nfe").schedule(dtype=torch.float64),
        torch.tensor([0.999, 0.6, 0.0], dtype=torch.float64),
    )
    multi = AnyStepSampler.from_preset("config_multi_30").schedule(dtype=torch.float64)
    assert multi.shape == (31,) and abs(float(multi[0]) - (1 - (1 - (1 - 0.001**1.17) ** 0.8) ** 1.1)) < 1e-12
    assert AnyStepSampler.from_preset("qwenimage_4nfe", guidance_scale=1.0).guidance_scale == 1.0


def test_the_re_noising_share_defaults_to_one_in_few_mode_and_zero_in_the_modes_that_never_re_noise():
    assert AnyStepSampler().stochastic_ratio == 1.0
    assert AnyStepSampler(2, mode="any").stochastic_ratio == 0.0
    assert AnyStepSampler(2, mode="multi", stochastic_ratio=0.0).stochastic_ratio == 0.0  # the authors' presets
    assert AnyStepSampler(2, stochastic_ratio=0.25).stochastic_ratio == 0.25
