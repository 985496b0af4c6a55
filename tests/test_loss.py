"""TwinFlowLoss: float64 reference, stop-gradients, contract, bad input."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

import twinloss
from twinloss import BarronDistance, EMATeacher, L2Distance, TwinFlowLoss

from core_models import TinyVelocityNet
from reference import barron, l2, reference_step


class Recorder(torch.nn.Module):
    """Wraps a model and records every call: inputs, grad mode, output."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.calls = []

    def forward(self, x_t, t, r, y=None):
        out = self.model(x_t, t, r, y=y)
        self.calls.append(dict(x_t=x_t, t=t, r=r, y=y, grad=torch.is_grad_enabled(), out=out))
        return out


def _data(shape, seed=0, dtype=torch.float64, classes=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, dtype=dtype, generator=g)
    y = torch.randint(0, classes, (shape[0],), generator=g)
    return x, y, torch.full_like(y, classes)


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("distance,reference_distance", [(L2Distance(), l2), (BarronDistance(), barron)])
@pytest.mark.parametrize("shape", [(8, 3), (8, 2, 3, 3)], ids=str)
def test_matches_float64_reference_in_value_and_gradient(distance, reference_distance, shape):
    model = TinyVelocityNet(shape[1:]).double()
    x, y, null_y = _data(shape)
    out = TwinFlowLoss(distance=distance)(model, x, cond={"y": y}, uncond={"y": null_y},
                                          generator=torch.Generator().manual_seed(5))
    out.loss.backward()
    grads = _grads(model)
    model.zero_grad()
    expected, _, _ = reference_step(model, x, y, null_y, seed=5, distance=reference_distance)
    expected.backward()
    assert_close(out.loss, expected, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, _grads(model), strict=True):
        assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_exactly_one_forward_carries_grad_and_no_target_does():
    model = Recorder(TinyVelocityNet((3,)).double())
    x, y, null_y = _data((8, 3))
    out = TwinFlowLoss(estimate_order=2)(model, x, cond={"y": y}, uncond={"y": null_y})
    with_grad = [c for c in model.calls if c["grad"]]
    assert len(with_grad) == 1 and with_grad[0]["x_t"].shape[0] == 8
    assert all(not c["out"].requires_grad for c in model.calls if not c["grad"])
    # fake samples, guidance (cond+uncond batched), two RCGM jumps, the main forward,
    # then rectify (fake+real batched): teacher passes run before the grad forward
    assert [c["x_t"].shape[0] for c in model.calls] == [2, 2 * 4, 6, 6, 8, 2 * 2]
    assert [c["grad"] for c in model.calls] == [False, False, False, False, True, False]
    assert out.model_calls == len(model.calls) == 6
    assert out.sample_evaluations == sum(c["x_t"].shape[0] for c in model.calls)
    assert out.grad_sample_evaluations == 8
    assert all(not v.requires_grad for v in out.terms.values())


def test_fake_rows_see_negative_times_and_interpolate_at_absolute_time():
    model = Recorder(TinyVelocityNet((3,)).double())
    x, y, _ = _data((8, 3))
    TwinFlowLoss(guidance_scale=0.0)(model, x, cond={"y": y}, generator=torch.Generator().manual_seed(4))
    fake_samples = model.calls[0]["x_t"] - model.calls[0]["out"]  # one jump from noise at t = 1
    main = next(c for c in model.calls if c["grad"])
    t = main["t"]
    assert bool((t[6:] < 0).all()) and torch.equal(main["r"][6:], t[6:]) and bool((t[:6] >= 0).all())
    # replay the documented draws: t, u, fake noise, interpolation noise
    g = torch.Generator().manual_seed(4)
    t0 = torch.rand(8, dtype=torch.float64, generator=g)
    torch.rand(8, dtype=torch.float64, generator=g)
    z_gen = torch.randn(2, 3, dtype=torch.float64, generator=g)
    z = torch.randn(8, 3, dtype=torch.float64, generator=g)
    assert torch.equal(model.calls[0]["x_t"], z_gen)
    assert_close(t[6:], -t0[6:], rtol=0, atol=0)
    a = t0[6:, None]  # |t|: the twin rows are interpolated exactly as at positive time
    assert_close(main["x_t"][6:], a * z[6:] + (1 - a) * fake_samples, rtol=0, atol=1e-15)
    assert_close(main["x_t"][:6], t[:6, None] * z[:6] + (1 - t[:6, None]) * x[:6], rtol=0, atol=1e-15)


def test_rectify_gradient_is_the_clamped_velocity_gap():
    shape = (8, 5)
    torch.manual_seed(0)
    base_model = TinyVelocityNet(shape[1:], hidden=64).double()
    for p in base_model.parameters():
        p.data.mul_(4.0)  # large velocity gaps, so the clamp is active somewhere
    x, y, null_y = _data(shape)

    def output_grad(rectify_weight):
        model = Recorder(copy.deepcopy(base_model))
        loss_fn = TwinFlowLoss(distance=L2Distance(), rectify_weight=rectify_weight, rectify_clamp=1.0)
        out = loss_fn(model, x, cond={"y": y}, uncond={"y": null_y}, generator=torch.Generator().manual_seed(3))
        main = next(c for c in model.calls if c["grad"])
        main["out"].retain_grad()
        out.loss.backward()
        return main["out"].grad, model.calls

    with_rectify, calls = output_grad(1.0)
    without, _ = output_grad(0.0)
    rectify_call = calls[-1]["out"]
    gap = (rectify_call[:2] - rectify_call[2:]).clamp(-1, 1)
    assert bool((gap.abs() == 1).any()) and bool((gap.abs() < 1).any())
    # d/dF mean_rows mean_elems (F - sg(F - gap))^2 = 2 gap / (rows * elems)
    assert_close(with_rectify[:2] - without[:2], 2 * gap / (2 * 5), rtol=1e-9, atol=1e-12)
    assert_close(with_rectify[2:], without[2:], rtol=0, atol=0)


@pytest.mark.parametrize(
    "shape", [(8, 4), (8, 3, 4, 4), (8, 2, 3, 4, 4), (8, 6, 5)], ids=["BD", "BCHW", "BCFHW", "BLD"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_shapes_and_dtypes(shape, dtype):
    model = TinyVelocityNet(shape[1:]).to(dtype)
    x, y, null_y = _data(shape, dtype=dtype)
    out = TwinFlowLoss()(model, x, cond={"y": y}, uncond={"y": null_y}, generator=torch.Generator().manual_seed(0))
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert set(out.terms) >= {"loss", "base", "adv", "rectify", "base/one_step", "base/multi_step", "base/any_step"}
    assert_close(out.terms["loss"], out.terms["base"] + out.terms["adv"] + 0.5 * out.terms["rectify"])
    out.loss.backward()
    for p in model.net.parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all())


def test_same_generator_same_loss_and_global_rng_untouched():
    model = TinyVelocityNet((4,), dropout=0.2)
    x, y, null_y = _data((12, 4), dtype=torch.float32)
    loss_fn = TwinFlowLoss()
    torch.manual_seed(0)
    first = loss_fn(model, x, cond={"y": y}, uncond={"y": null_y}, generator=torch.Generator().manual_seed(9))
    after_first = torch.get_rng_state()
    torch.manual_seed(0)
    second = loss_fn(model, x, cond={"y": y}, uncond={"y": null_y}, generator=torch.Generator().manual_seed(9))
    assert torch.equal(first.loss, second.loss)
    # the global stream advanced exactly as one forward of the model would
    torch.manual_seed(0)
    model(x, torch.ones(12), torch.ones(12), y=y)
    assert torch.equal(after_first, torch.get_rng_state())


def test_no_cuda_function_is_called_on_cpu(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a CUDA function was called on a CPU path")

    for name in ("get_rng_state", "set_rng_state", "get_rng_state_all", "set_rng_state_all",
                 "manual_seed", "manual_seed_all", "synchronize", "current_device", "init"):
        monkeypatch.setattr(torch.cuda, name, forbidden)
    model = TinyVelocityNet((4,), dropout=0.1)
    x, y, null_y = _data((8, 4), dtype=torch.float32)
    out = TwinFlowLoss(teacher=EMATeacher())(model, x, cond={"y": y}, uncond={"y": null_y})
    out.loss.backward()
    twinloss.AnyStepSampler(steps=2)(model, torch.randn(4, 4), cond={"y": y[:4]})


@settings(max_examples=20, deadline=None)
@given(
    batch=st.integers(4, 20),
    trailing=st.sampled_from([(3,), (2, 3, 3), (4, 5)]),
    seed=st.integers(0, 1000),
)
def test_caller_inputs_are_bit_identical_after_the_call(batch, trailing, seed):
    model = TinyVelocityNet(trailing)
    x, y, null_y = _data((batch, *trailing), seed=seed, dtype=torch.float32)
    cond, uncond = {"y": y}, {"y": null_y}
    before = (x.clone(), y.clone(), null_y.clone())
    out = TwinFlowLoss()(model, x, cond=cond, uncond=uncond, generator=torch.Generator().manual_seed(seed))
    out.loss.backward()
    assert torch.equal(x, before[0]) and torch.equal(y, before[1]) and torch.equal(null_y, before[2])
    assert list(cond) == ["y"] and cond["y"] is y and uncond["y"] is null_y


def test_modes_make_the_documented_calls():
    model = Recorder(TinyVelocityNet((3,)))
    x, y, null_y = _data((12, 3), dtype=torch.float32)
    fm = TwinFlowLoss.plain_flow_matching()(model, x, cond={"y": y})
    assert fm.model_calls == 1 and fm.sample_evaluations == 12
    main = model.calls[-1]
    assert torch.equal(main["t"], main["r"]) and bool((main["t"] >= 0).all())
    rcgm = TwinFlowLoss(mode="rcgm", guidance_scale=0.0)(model, x, cond={"y": y})
    assert rcgm.model_calls == 3 and rcgm.terms["adv"] == 0 and rcgm.terms["rectify"] == 0
    full = TwinFlowLoss(guidance_scale=0.0, estimate_order=1)(model, x, cond={"y": y})
    assert full.model_calls == 4  # fake, main, one RCGM jump, rectify


def test_flow_matching_mode_matches_textbook_loss():
    model = TinyVelocityNet((3,)).double()
    x, y, _ = _data((10, 3))
    out = TwinFlowLoss.plain_flow_matching()(model, x, cond={"y": y}, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    t = torch.rand(10, dtype=torch.float64, generator=g)
    torch.rand(10, dtype=torch.float64, generator=g)  # r-offset draw, unused at gap 0
    z = torch.randn(10, 3, dtype=torch.float64, generator=g)
    x_t = t[:, None] * z + (1 - t[:, None]) * x
    expected = ((model(x_t, t, t, y=y) - (z - x)) ** 2).mean()
    assert_close(out.loss, expected)


class NoLabels(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)

    def forward(self, x_t, t, r):
        return self.lin(x_t)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda f, m, x, y, n: f(m, x[:3], cond={"y": y[:3]}, uncond={"y": n[:3]}), "batch size 3.*at least 4"),
        (lambda f, m, x, y, n: f(m, x, cond={"y": y[:5]}, uncond={"y": n}), r"cond\['y'\] must lead with the batch"),
        (lambda f, m, x, y, n: f(m, x.masked_fill(x > 1, float("nan")), cond={"y": y}, uncond={"y": n}), "^x contains NaN"),
        (lambda f, m, x, y, n: f(m, x.long(), cond={"y": y}, uncond={"y": n}), "^x must be a floating-point"),
        (lambda f, m, x, y, n: f(m, x, cond={"label": y}, uncond={"label": n}), r"^cond has keys \['label'\]"),
        (lambda f, m, x, y, n: f(m, x, cond={"y": y}), "^uncond is required"),
        (lambda f, m, x, y, n: f(m, x, cond={"y": y}, uncond={"z": n}), "^uncond must have the keys"),
        (lambda f, m, x, y, n: f(m, x, cond={"t": y}, uncond={"t": n}), r"cond\['t'\] collides"),
        (lambda f, m, x, y, n: f(m, x[0], cond={"y": y}, uncond={"y": n}), "^x must have shape"),
        (lambda f, m, x, y, n: f(NoLabels(), x, cond={"y": y}, uncond={"y": n}), r"cond has keys \['y'\]"),
        (lambda f, m, x, y, n: f(lambda x_t, t, r, y: x_t[:, :2], x, cond={"y": y}, uncond={"y": n}), "^model must return"),
    ],
    ids=["small-batch", "cond-batch", "non-finite", "int-dtype", "unknown-key", "no-uncond",
         "uncond-keys", "reserved-key", "no-batch-dim", "model-rejects-key", "wrong-output-shape"],
)
def test_bad_input_raises_value_error_naming_the_argument(call, match):
    model = TinyVelocityNet((3,))
    x, y, null_y = _data((8, 3), dtype=torch.float32)
    before = x.clone()
    with pytest.raises(ValueError, match=match):
        call(TwinFlowLoss(), model, x, y, null_y)
    assert torch.equal(x, before)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"mode": "dmd"}, "mode"), ({"estimate_step": 0.0}, "estimate_step"), ({"estimate_order": 0}, "estimate_order"),
        ({"residual_clamp": 0.0}, "residual_clamp"), ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"guidance_interval": (0.5, 0.2)}, "guidance_interval"), ({"rectify_weight": float("nan")}, "rectify_weight"),
        ({"rectify_clamp": -1.0}, "rectify_clamp"), ({"multi_step_gap": 2.0}, "multi_step_gap"),
    ],
)
def test_bad_configuration_names_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name} "):
        TwinFlowLoss(**kwargs)


def test_training_reduces_the_loss_and_ema_resumes_exactly():
    torch.manual_seed(0)
    model = TinyVelocityNet((2,), hidden=64)
    x_all = torch.randn(256, 2) * 0.3 + torch.tensor([1.0, -0.5])

    def run(steps, loss_fn, model, opt, seed0):
        losses = []
        for step in range(steps):
            g = torch.Generator().manual_seed(seed0 + step)
            out = loss_fn(model, x_all[(step * 16) % 256:][:16], generator=g)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            loss_fn.teacher.update(model)
            losses.append(out.loss.item())
        return losses

    loss_fn = TwinFlowLoss(guidance_scale=0.0, teacher=EMATeacher(0.9))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    run(5, loss_fn, model, opt, 0)
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), copy.deepcopy(loss_fn.state_dict()))
    uninterrupted = run(5, loss_fn, model, opt, 5)

    model2 = TinyVelocityNet((2,), hidden=64)
    model2.load_state_dict(saved[0])
    opt2 = torch.optim.Adam(model2.parameters(), lr=3e-3)
    opt2.load_state_dict(saved[1])
    loss_fn2 = TwinFlowLoss(guidance_scale=0.0, teacher=EMATeacher(0.9))
    loss_fn2.load_state_dict(saved[2])
    assert loss_fn2.teacher.num_updates == 5
    resumed = run(5, loss_fn2, model2, opt2, 5)
    assert resumed == uninterrupted


class _CallableField:
    """A plain callable object (not an nn.Module) following the protocol."""

    def __call__(self, x_t, t, r, *, y):
        return x_t


@pytest.mark.parametrize(
    "model",
    [TinyVelocityNet((3,)), NoLabels(), _CallableField(), lambda x_t, t, r, y: x_t],
    ids=["module", "module-without-y", "callable-object", "function"],
)
def test_keyword_check_reads_every_kind_of_callable_and_never_accepts_self(model):
    from twinloss.protocol import check_model_keywords

    for _ in range(2):  # the second call reads the cached signature
        if isinstance(model, NoLabels):
            with pytest.raises(ValueError, match=r"cond has keys \['y'\]"):
                check_model_keywords(model, {"y": torch.zeros(2)})
        else:
            check_model_keywords(model, {"y": torch.zeros(2)})
        with pytest.raises(ValueError, match=r"cond has keys \['self'\]"):
            check_model_keywords(model, {"self": torch.zeros(2)})
