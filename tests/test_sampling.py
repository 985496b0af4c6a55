"""AnyStepSampler contract: endpoints, identity at t == r, dtype and shape, 1-NFE formula."""

import pytest
import torch
from torch.testing import assert_close

from twinloss import AnyStepSampler, time_schedule

from core_models import GaussianFlow, TinyVelocityNet


def test_uniform_schedule_and_endpoints():
    assert_close(time_schedule(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    gap = time_schedule(3, end_gap=0.6, dtype=torch.float64)
    assert_close(gap, torch.tensor([1.0, 0.8, 0.6, 0.0], dtype=torch.float64))
    warped = time_schedule(5, kumaraswamy=(2.0, 1.5, 1.0), dtype=torch.float64)
    assert warped[0] == 1 and warped[-1] == 0 and bool((warped[1:] < warped[:-1]).all())
    u = torch.linspace(1, 0, 6, dtype=torch.float64)
    assert_close(warped, (1 - (1 - u**2.0) ** 1.5) ** 1.0)


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


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: AnyStepSampler(0), "^steps "),
        (lambda: AnyStepSampler(2, mode="jump"), "^mode "),
        (lambda: AnyStepSampler(2, mode="few", heun=True), "^heun"),
        (lambda: AnyStepSampler(1, end_gap=0.5), "^end_gap"),
        (lambda: AnyStepSampler(3, end_gap=1.5), "^end_gap"),
        (lambda: AnyStepSampler(2, stochastic_ratio=2.0), "^stochastic_ratio"),
        (lambda: AnyStepSampler(2, kumaraswamy=(1.0, 0.0, 1.0)), "^kumaraswamy"),
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
    with pytest.raises(ValueError, match="^noise "):
        AnyStepSampler()(model, z.long())
    with pytest.raises(ValueError, match="^uncond is required"):
        AnyStepSampler(guidance_scale=1.0)(model, z, cond={"y": torch.zeros(2, dtype=torch.long)})
    with pytest.raises(ValueError, match=r"cond has keys \['label'\]"):
        AnyStepSampler()(model, z, cond={"label": torch.zeros(2, dtype=torch.long)})
