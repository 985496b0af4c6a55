"""TwinFlowScheduler: equal to AnyStepSampler step for step, saved and loaded as a diffusers scheduler."""

import json

import pytest
import torch
from torch.testing import assert_close

import twinloss
from twinloss_adapters.scheduler import TwinFlowScheduler

from core_models import TinyVelocityNet

SETTINGS = [
    (1, dict(mode="few")),
    (3, dict(mode="few", stochastic_ratio=0.4, start_gap=0.001, end_gap=0.5, kumaraswamy=(1.17, 0.8, 1.1))),
    (4, dict(mode="any", start_gap=0.05)),
    (4, dict(mode="multi", kumaraswamy=(1.17, 0.8, 1.1))),
    (3, dict(mode="any", shift=3.0)),
]


@pytest.mark.parametrize("steps,options", SETTINGS, ids=[f"{k}_{o['mode']}_{len(o)}" for k, o in SETTINGS])
def test_scheduler_walks_the_sampler_trajectory_step_for_step(steps, options):
    model = TinyVelocityNet((2, 3))
    noise = torch.randn(4, 2, 3)
    expected = twinloss.AnyStepSampler(steps, return_trajectory=True, **options)(
        model, noise, generator=torch.Generator().manual_seed(9)
    )
    scheduler = TwinFlowScheduler(**options)
    scheduler.set_timesteps(steps)
    assert_close(scheduler.sigmas, expected.times)
    assert_close(scheduler.timesteps, 1000 * expected.times[:-1])
    generator, x = torch.Generator().manual_seed(9), noise
    for index, timestep in enumerate(scheduler.timesteps):
        t = scheduler.sigmas[index].expand(4)
        x = scheduler.step(model(x, t, scheduler.target_time(t)), timestep, x, generator=generator).prev_sample
        assert_close(x, expected.trajectory[index + 1], rtol=1e-6, atol=1e-6)
    assert scheduler.step_index == steps


def test_heun_makes_two_calls_per_step_and_lands_where_the_heun_sampler_does(tmp_path):
    model = TinyVelocityNet((2, 3))
    noise = torch.randn(4, 2, 3)
    options = dict(mode="multi", kumaraswamy=(1.17, 0.8, 1.1))
    expected = twinloss.AnyStepSampler(3, heun=True, **options)(model, noise).sample
    euler = twinloss.AnyStepSampler(3, **options)(model, noise).sample
    TwinFlowScheduler(heun=True, **options).save_pretrained(tmp_path)
    scheduler = TwinFlowScheduler.from_pretrained(tmp_path)  # heun is part of the saved config
    scheduler.set_timesteps(3)
    knots = twinloss.AnyStepSampler(3, **options).schedule()
    call_times = knots[[0, 1, 1, 2, 2]]  # the last step, to s3 = 0, is Euler: no call at t = 0
    assert scheduler.order == 2
    assert_close(scheduler.timesteps, 1000 * call_times)
    assert_close(scheduler.sigmas, torch.cat([call_times, knots[-1:]]))  # sigmas[i] is call i's time, as pipelines read it
    calls, x = [], noise
    for timestep in scheduler.timesteps:
        t = (timestep / 1000).to(torch.float32).expand(4)
        r = scheduler.target_time(t)
        calls.append((float(t[0]), float(r[0])))
        x = scheduler.step(model(x, t, r), timestep, x).prev_sample
    assert_close(x, expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(x, euler, rtol=1e-4, atol=1e-4)  # the correction changed the walk
    assert [t for t, _ in calls] == pytest.approx((scheduler.timesteps / 1000).tolist())
    assert all(t == r for t, r in calls)  # the instantaneous field at both calls
    assert scheduler.step_index == 5


def test_heun_lays_out_and_takes_its_steps_as_diffusers_flow_match_heun():
    """On diffusers' own knots (1, 0.5005, 0.001, then 0): the same timesteps, sigmas and latents."""
    from diffusers import FlowMatchHeunDiscreteScheduler

    stock = FlowMatchHeunDiscreteScheduler()
    stock.set_timesteps(3)
    scheduler = TwinFlowScheduler(mode="multi", heun=True, end_gap=0.001)  # last knot before 0 at 0.001
    scheduler.set_timesteps(3)
    assert_close(scheduler.timesteps, stock.timesteps)
    assert_close(scheduler.sigmas, stock.sigmas)
    model = TinyVelocityNet((2, 3))
    noise = torch.randn(4, 2, 3)
    walked = {}
    for name, one in (("twinflow", scheduler), ("diffusers", stock)):
        x = noise
        for timestep in one.timesteps:
            t = (timestep / 1000).expand(4)
            x = one.step(model(x, t, t), timestep, x).prev_sample
        walked[name] = x
    assert_close(walked["twinflow"], walked["diffusers"], rtol=1e-4, atol=1e-4)  # diffusers divides by sigma


def test_step_takes_diffusers_flow_map_r_timestep_and_refuses_one_off_the_next_knot():
    """step(model_output, timestep, sample, r_timestep, return_dict) as FlowMapEulerDiscreteScheduler.step."""
    import inspect

    from diffusers import FlowMapEulerDiscreteScheduler

    names = lambda method: list(inspect.signature(method).parameters)[1:6]  # noqa: E731
    assert names(TwinFlowScheduler.step) == names(FlowMapEulerDiscreteScheduler.step)
    model = TinyVelocityNet((2, 3))
    noise = torch.randn(4, 2, 3)
    expected = twinloss.AnyStepSampler(3, mode="any", start_gap=0.05)(model, noise).sample
    scheduler = TwinFlowScheduler(mode="any", start_gap=0.05)
    scheduler.set_timesteps(3)
    x = noise
    for index, timestep in enumerate(scheduler.timesteps):
        t = scheduler.sigmas[index].expand(4)
        r_timestep = 1000 * scheduler.sigmas[index + 1]  # the AnyFlow loop's target, positionally
        x = scheduler.step(model(x, t, scheduler.target_time(t)), timestep, x, r_timestep, False)[0]
    assert_close(x, expected, rtol=1e-6, atol=1e-6)

    scheduler.set_timesteps(3)
    velocity, sample = torch.zeros(4, 2, 3), torch.randn(4, 2, 3)
    with pytest.raises(ValueError, match=r"^r_timestep \[0.0\] cannot be honoured: .*'any' mode lands step 0 on"):
        scheduler.step(velocity, scheduler.timesteps[0], sample, r_timestep=torch.tensor([0.0]))
    with pytest.raises(ValueError, match="^r_timestep must be a number or a tensor .*pass generator= by keyword"):
        scheduler.step(velocity, scheduler.timesteps[0], sample, torch.Generator())
    assert scheduler.step_index is None  # a refused call takes no step


def test_dynamic_shifting_shifts_the_times_by_exp_mu_and_needs_mu(tmp_path):
    options = dict(mode="few", start_gap=0.001, end_gap=0.5)
    TwinFlowScheduler(use_dynamic_shifting=True, **options).save_pretrained(tmp_path)
    scheduler = TwinFlowScheduler.from_pretrained(tmp_path)
    scheduler.set_timesteps(sigmas=[1.0, 0.5], mu=0.8)  # what Flux passes: its default grid and its shift
    expected = twinloss.AnyStepSampler(2, shift=float(torch.tensor(0.8, dtype=torch.float64).exp()), **options)
    assert_close(scheduler.sigmas, expected.schedule())
    assert float(scheduler.sigmas[1]) > 0.5  # moved towards noise
    with pytest.raises(ValueError, match="^mu must be passed when use_dynamic_shifting is True"):
        scheduler.set_timesteps(2)
    static = TwinFlowScheduler(**options)
    static.set_timesteps(sigmas=[1.0, 0.5], mu=0.8)  # the config's times; mu unused, as in diffusers
    assert_close(static.sigmas, twinloss.AnyStepSampler(2, **options).schedule())


def test_target_time_per_mode():
    t = torch.full((3,), 0.75)
    for mode, r in (("few", 0.0), ("any", 0.5), ("multi", 0.75)):
        scheduler = TwinFlowScheduler(mode=mode)
        scheduler.set_timesteps(4)
        scheduler.step(torch.zeros(3, 2), scheduler.timesteps[0], torch.zeros(3, 2))  # now at s_1 = 0.75
        assert_close(scheduler.target_time(t), torch.full((3,), r))


def test_noise_generator_binding_replaces_a_missing_step_generator():
    velocity, sample = torch.randn(2, 5), torch.randn(2, 5)

    def first_step(**bound):
        scheduler = TwinFlowScheduler(stochastic_ratio=0.7)
        scheduler.set_timesteps(2)
        if bound:
            with scheduler.noise_generator(bound["generator"]):
                return scheduler.step(velocity, scheduler.timesteps[0], sample).prev_sample
        return scheduler.step(velocity, scheduler.timesteps[0], sample, generator=torch.Generator().manual_seed(4)).prev_sample

    assert torch.equal(first_step(generator=torch.Generator().manual_seed(4)), first_step())


def test_save_and_load_keep_the_schedule(tmp_path):
    scheduler = TwinFlowScheduler.from_preset("qwenimage_4nfe")
    scheduler.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "TwinFlowScheduler"
    assert {key: saved[key] for key in ("mode", "stochastic_ratio", "start_gap", "end_gap", "kumaraswamy")} == {
        "mode": "few", "stochastic_ratio": 1.0, "start_gap": 0.001, "end_gap": 0.5, "kumaraswamy": None,
    }
    loaded = TwinFlowScheduler.from_pretrained(tmp_path)
    for one in (scheduler, loaded):
        one.set_timesteps(4)
    assert_close(loaded.sigmas, scheduler.sigmas)
    assert_close(loaded.sigmas, twinloss.AnyStepSampler.from_preset("qwenimage_4nfe").schedule())


def test_a_preset_scheduler_saves_its_step_count_and_refuses_another(tmp_path):
    TwinFlowScheduler.from_preset("qwenimage_2nfe").save_pretrained(tmp_path)
    assert json.loads((tmp_path / "scheduler_config.json").read_text())["steps"] == 2
    loaded = TwinFlowScheduler.from_pretrained(tmp_path)
    loaded.set_timesteps()  # the preset's two steps, and its end gap with them
    assert_close(loaded.sigmas, twinloss.AnyStepSampler.from_preset("qwenimage_2nfe").schedule())
    with pytest.raises(ValueError, match="^num_inference_steps=3 conflicts with steps=2 in this TwinFlowScheduler's config"):
        loaded.set_timesteps(3)
    with pytest.raises(ValueError, match="^num_inference_steps=3 conflicts with steps=2"):
        loaded.set_timesteps(sigmas=[1.0, 2 / 3, 1 / 3])  # Flux's way of asking for three steps
    assert_close(loaded.sigmas, twinloss.AnyStepSampler.from_preset("qwenimage_2nfe").schedule())  # kept
    with pytest.raises(ValueError, match=r"^config \['end_gap', 'steps'\] are fixed by preset 'qwenimage_2nfe'"):
        TwinFlowScheduler.from_preset("qwenimage_2nfe", steps=3, end_gap=0.2)
    free = TwinFlowScheduler(end_gap=0.6)  # no steps in the config: any count the end gap allows
    free.set_timesteps(3)
    assert len(free.timesteps) == 3


def test_pipeline_default_sigmas_are_accepted_and_custom_ones_refused():
    scheduler = TwinFlowScheduler(start_gap=0.001)
    scheduler.set_timesteps(sigmas=[1.0, 0.5], mu=0.7)  # Flux/Qwen-Image default grid and shift: config times
    assert_close(scheduler.sigmas, torch.tensor([0.999, 0.4995, 0.0]))
    with pytest.raises(ValueError, match="^sigmas: TwinFlowScheduler takes its times from its config"):
        scheduler.set_timesteps(sigmas=[1.0, 0.3])


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: TwinFlowScheduler(mode="jump"), "^mode "),
        (lambda: TwinFlowScheduler(stochastic_ratio=1.5), "^stochastic_ratio "),
        (lambda: TwinFlowScheduler(mode="any", stochastic_ratio=0.5), "^stochastic_ratio=0.5 applies to mode='few'"),
        (lambda: TwinFlowScheduler(end_gap=1.0), "^end_gap "),
        (lambda: TwinFlowScheduler(kumaraswamy=(1.0, -1.0, 1.0)), "^kumaraswamy "),
        (lambda: TwinFlowScheduler(mode="any", heun=True), "^heun=True applies to mode='multi' only"),
        (lambda: TwinFlowScheduler(shift=0.0), "^shift must be a finite number > 0"),
        (lambda: TwinFlowScheduler(shift=3.0, use_dynamic_shifting=True), r"^shift=3.0 would be replaced by exp\(mu\)"),
        (lambda: TwinFlowScheduler(end_gap=0.5).set_timesteps(1), "^end_gap needs steps >= 2"),
        (lambda: TwinFlowScheduler(end_gap=0.5, steps=1), "^end_gap needs steps >= 2"),
        (lambda: TwinFlowScheduler(steps=0), "^steps "),
        (lambda: TwinFlowScheduler().step(torch.zeros(1, 2), 1000.0, torch.zeros(1, 2)), "^set_timesteps has not been"),
        (lambda: TwinFlowScheduler.from_preset("nope"), "^preset 'nope' is unknown"),
    ],
)
def test_bad_configuration_and_calls(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_stepping_past_the_end_or_off_the_knot_raises():
    scheduler = TwinFlowScheduler()
    scheduler.set_timesteps(2)
    with pytest.raises(ValueError, match="^timestep 300.0 is not the current step's 1000.0"):
        scheduler.step(torch.zeros(1, 2), 300.0, torch.zeros(1, 2))
    with pytest.raises(ValueError, match="scheduler's step 0 starts at 1"):
        scheduler.target_time(torch.full((1,), 0.3))
    for timestep in scheduler.timesteps:
        scheduler.step(torch.zeros(1, 2), timestep, torch.zeros(1, 2))
    with pytest.raises(ValueError, match="^the schedule has 2 steps; step 2 is past its end"):
        scheduler.step(torch.zeros(1, 2), 0.0, torch.zeros(1, 2))
