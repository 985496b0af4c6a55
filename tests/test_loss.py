"""TwinFlowLoss: float64 reference, stop-gradients, contract, bad input."""

import copy
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from jaxtyping import TypeCheckError
from torch.testing import assert_close

import twinloss
from twinloss.loss import RELEASED_GUIDANCE, UNGUIDED_SHARES, default_rectify_time, default_shares, guides_near_noise
from twinloss import (
    BarronDistance,
    BetaTime,
    CosinePath,
    EMATeacher,
    FrozenTeacher,
    GroupShares,
    L2Distance,
    LogitNormalTime,
    OnlineTeacher,
    ShiftedTime,
    Trajectory,
    TrajectorySampler,
    TwinFlowLoss,
    VPPath,
)

from core_models import TinyVelocityNet
from reference import barron, cosine, default_group_sizes, l2, reference_step, vp


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


@pytest.mark.parametrize("guidance", [{}, RELEASED_GUIDANCE], ids=["default guidance", "whole path"])
@pytest.mark.parametrize("distance,reference_distance", [(L2Distance(), l2), (BarronDistance(), barron)])
@pytest.mark.parametrize("shape", [(8, 3), (8, 2, 3, 3)], ids=str)
def test_matches_float64_reference_in_value_and_gradient(distance, reference_distance, shape, guidance):
    model = TinyVelocityNet(shape[1:]).double()
    reference_guidance = {"guidance": guidance["guidance_scale"], "interval": guidance["guidance_interval"]} if guidance else {}
    _assert_step_matches_reference(TwinFlowLoss(distance=distance, **guidance), model, _data(shape), seed=5,
                                   distance=reference_distance, **reference_guidance)


def _assert_step_matches_reference(loss_fn, model, data, *, seed, **reference_options):
    """One step of ``loss_fn`` against ``reference_step`` in float64: value and every gradient."""
    x, y, null_y = data
    out = loss_fn(model, x, cond={"y": y}, uncond={"y": null_y}, generator=torch.Generator().manual_seed(seed))
    out.loss.backward()
    grads = _grads(model)
    model.zero_grad()
    expected, _, _ = reference_step(model, x, y, null_y, seed=seed, **reference_options)
    expected.backward()
    assert_close(out.loss, expected, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, _grads(model), strict=True):
        assert_close(got, want, rtol=1e-9, atol=1e-12)
    return out


@pytest.mark.parametrize("guidance", [0.0, 0.5])
def test_an_l2_rectification_under_a_barron_base_matches_float64_reference_in_value_and_gradient(guidance):
    model = TinyVelocityNet((3,)).double()  # sees the signed times: the fake field differs from the real one
    loss_fn = TwinFlowLoss(guidance_scale=guidance, rectify_distance=L2Distance(), rectify_weight=2.0)
    assert isinstance(loss_fn.distance, BarronDistance) and isinstance(loss_fn.rectify_distance, L2Distance)
    out = _assert_step_matches_reference(loss_fn, model, _data((8, 3)), seed=4, guidance=guidance, distance=barron,
                                         rectify_distance=l2, rectify_weight=2.0)
    assert out.terms["rectify"] > 0
    default = TwinFlowLoss()
    assert default.rectify_distance is default.distance  # the authors' recipe: one distance for every term


def test_the_default_partitions_round_as_the_reference_writes_them_out_in_exact_fractions():
    # every batch to 512: ties of the exact quotas (6, 12, 54, ... rows without guidance) included
    for guidance in (0.0, 0.5):
        shares = TwinFlowLoss(guidance_scale=guidance).shares
        assert all(list(shares.counts(n).values()) == default_group_sizes(n, guidance) for n in range(4, 513))


def test_the_default_guides_the_real_rows_in_the_middle_of_the_path_and_no_other():
    model = Recorder(TinyVelocityNet((3,)).double())
    x, y, null_y = _data((32, 3))
    loss_fn = TwinFlowLoss()
    assert (loss_fn.guidance_scale, loss_fn.guidance_interval) == (0.2, (0.2, 0.7))
    loss_fn(model, x, cond={"y": y}, uncond={"y": null_y}, generator=torch.Generator().manual_seed(1))
    t = next(c for c in model.calls if c["grad"])["t"]
    inside = ((t > 0.2) & (t < 0.7)).nonzero().squeeze(1)  # fake rows sit at negative times
    assert 0 < inside.numel() < int((t > 0).sum())
    guidance_call = model.calls[1]  # after the fake samples: conditional and null rows in one call
    assert torch.equal(guidance_call["t"], t[inside].repeat(2)) and torch.equal(guidance_call["r"], guidance_call["t"])
    assert torch.equal(guidance_call["y"], torch.cat([y[inside], null_y[inside]]))


@pytest.mark.parametrize("batch", [10, 12, 16])  # 12: every quota has the remainder 1/2, a tie the rule breaks
def test_the_unguided_default_partition_matches_float64_reference_in_value_and_gradient(batch):
    loss_fn = TwinFlowLoss(guidance_scale=0.0)
    sizes = default_group_sizes(batch, 0.0)
    assert list(loss_fn.shares.counts(batch).values()) == sizes
    assert sizes != default_group_sizes(batch, 0.5, (0.0, 1.0))  # unequal groups: the reference tells them apart
    model = TinyVelocityNet((3,)).double()
    _assert_step_matches_reference(loss_fn, model, _data((batch, 3)), seed=3, guidance=0.0, distance=barron)


DEFAULT_RULES = {
    "default_shares": default_shares,
    "default_rectify_time, conditioned": lambda scale, *interval: default_rectify_time(
        scale, conditioned=True, **({"guidance_interval": interval[0]} if interval else {})),
    "default_rectify_time, unconditioned": lambda scale, *interval: default_rectify_time(
        scale, conditioned=False, **({"guidance_interval": interval[0]} if interval else {})),
    "guides_near_noise": guides_near_noise,
}


@pytest.mark.parametrize("rule", sorted(DEFAULT_RULES))
@pytest.mark.parametrize("scale", [-0.5, float("nan"), float("inf")])
def test_the_default_rules_refuse_a_guidance_scale_that_is_not_a_finite_number_at_least_0(rule, scale):
    with pytest.raises(ValueError, match="guidance_scale"):
        DEFAULT_RULES[rule](scale)


@pytest.mark.parametrize("rule", sorted(DEFAULT_RULES))
@pytest.mark.parametrize("interval", [(0.7, 0.2), (0.0, 1.5), (0.3, 0.3)], ids=str)
def test_the_default_rules_refuse_a_guidance_interval_that_is_not_an_increasing_pair_in_0_1(rule, interval):
    with pytest.raises(ValueError, match="guidance_interval"):
        DEFAULT_RULES[rule](0.5, interval)


def test_guidance_reaches_the_noise_end_only_with_a_positive_scale_on_an_interval_up_to_1():
    assert guides_near_noise(0.5, (0.0, 1.0)) and guides_near_noise(0.2, (0.2, 1.0))
    assert not guides_near_noise(0.0, (0.0, 1.0))  # no guidance
    assert not guides_near_noise(0.5, (0.0, 0.7)) and not guides_near_noise(0.2)  # the default's (0.2, 0.7)
    with pytest.raises(ValueError, match="guidance_scale"):
        guides_near_noise(-0.1, (0.0, 1.0))


def test_the_default_partition_follows_the_guidance_and_an_explicit_one_is_kept():
    # equal quarters only where the guidance reaches the noise end; the default guides the middle of the path
    assert TwinFlowLoss(**RELEASED_GUIDANCE).shares == default_shares(0.5, (0.0, 1.0)) == GroupShares()
    assert TwinFlowLoss(guidance_interval=(0.2, 1.0)).shares == default_shares(0.2, (0.2, 1.0)) == GroupShares()
    assert TwinFlowLoss().shares == default_shares(0.2) == default_shares(0.5, (0.0, 0.7)) == UNGUIDED_SHARES
    assert TwinFlowLoss(guidance_scale=0.0).shares == default_shares(0.0) == UNGUIDED_SHARES
    assert UNGUIDED_SHARES == GroupShares(one_step=7 / 24, multi_step=7 / 24, any_step=7 / 24, fake=1 / 8)
    assert UNGUIDED_SHARES.min_batch_size() == GroupShares().min_batch_size() == 4
    for scale in (0.0, 0.5):
        explicit = GroupShares.from_twin_share(1 / 3)
        assert TwinFlowLoss(guidance_scale=scale, shares=explicit).shares is explicit


@pytest.mark.parametrize("guidance", [0.0, 0.5])
def test_clamp_rates_are_the_fractions_of_the_reference_corrections_at_or_beyond_their_clamps(guidance):
    model = TinyVelocityNet((3,)).double()
    x, y, null_y = _data((16, 3))
    record = {}
    reference_step(model, x, y, null_y, seed=2, guidance=guidance, record=record)
    # clamps between the two middle magnitudes of each correction: rates near 1/2, so neither 0 nor 1
    # passes by accident, and no entry lies within rounding of its clamp
    def between_middle_magnitudes(values):
        ordered = values.abs().flatten().sort().values
        middle = ordered.numel() // 2
        return float(ordered[middle - 1] + ordered[middle]) / 2

    residual_clamp, rectify_clamp = (between_middle_magnitudes(record[key]) for key in ("residual", "gap"))
    loss_fn = TwinFlowLoss(guidance_scale=guidance, residual_clamp=residual_clamp, rectify_clamp=rectify_clamp)
    uncond = {"y": null_y} if guidance else None
    out = loss_fn(model, x, cond={"y": y}, uncond=uncond, generator=torch.Generator().manual_seed(2))
    expected = {"residual": (record["residual"].abs() >= residual_clamp).double().mean(),
                "rectify": (record["gap"].abs() >= rectify_clamp).double().mean()}
    assert out.clamp_rates.keys() == expected.keys()
    for name, rate in expected.items():
        assert 0.3 < float(rate) < 0.7
        # the rates are float32 fractions (k of n entries): equal to the exact one up to float32 rounding
        assert_close(out.clamp_rates[name].double(), rate, rtol=0, atol=2.0**-24)
        assert not out.clamp_rates[name].requires_grad


def test_clamp_rates_name_only_the_passes_that_ran():
    model = TinyVelocityNet((3,)).double()
    x, y, null_y = _data((8, 3))
    g = torch.Generator().manual_seed(0)
    assert TwinFlowLoss.rcgm(guidance_scale=0.0)(model, x, cond={"y": y}, generator=g).clamp_rates.keys() == {"residual"}
    plain = TwinFlowLoss.plain_flow_matching()(model, x, cond={"y": y}, generator=g)
    assert plain.clamp_rates == {}


@pytest.mark.parametrize("path,reference_path", [(CosinePath(), cosine), (VPPath(), vp)], ids=["cosine", "vp"])
def test_nonlinear_paths_match_float64_reference_in_value_and_gradient(path, reference_path):
    model = TinyVelocityNet((3,)).double()
    _assert_step_matches_reference(TwinFlowLoss(path=path, distance=L2Distance()), model, _data((8, 3)), seed=11,
                                   path=reference_path)


def test_image_free_with_a_frozen_guidance_teacher_matches_float64_reference():
    """The authors' use_image_free with ema_decay_rate 1: rows from the model's own samples,
    guided rows regress on the frozen teacher's CFG velocity, RCGM with the online model."""
    torch.manual_seed(3)
    pretrained = TinyVelocityNet((3,)).double()
    model = copy.deepcopy(pretrained)
    teacher = FrozenTeacher(model)
    with torch.no_grad():  # the online model has moved away from the frozen weights
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x, y, null_y = _data((8, 3))
    loss_fn = TwinFlowLoss(image_free=True, guidance_scale=4.0, guidance_teacher=teacher, distance=L2Distance())
    out = _assert_step_matches_reference(loss_fn, model, (x, y, null_y), seed=2, guidance=4.0, image_free=True,
                                         guidance_model=pretrained)
    # the data never enters: any x of the same shape gives the same loss
    other = loss_fn(model, 100 + x, cond={"y": y}, uncond={"y": null_y}, generator=torch.Generator().manual_seed(2))
    assert_close(other.loss, out.loss, rtol=0, atol=0)


# Recorded with the code before the issue-9 refactor (commit 4c7bdb7): loss and the
# sum of |grad| over the parameters, TinyVelocityNet seeded 0, data seed 0, generator seed 7.
# The guided cases pass the rectification's uniform law, the default they were recorded with.
RECORDED_BEFORE_REFACTOR = {
    "default": (2.3588383457512134, 44.34498362250817),
    "l2_order1_noguide": (2.8586678321465047, 33.00159344839369),
    "rcgm": (2.0855805194824955, 54.93163438722782),
    "flow_matching": (2.7022558129119725, 21.65218574581101),
    "custom": (1.3992282649228571, 44.395363204581635),
    "cosine": (2.466458837167151, 46.78172270213295),
    "vp": (1.7849217182525434, 52.78460184674948),
    "ema": (2.399013422827941, 50.05012137546949),
    "float32": (2.0480189323425293, 30.72734174334255),
}


def _ema_moved(loss_fn, model):
    loss_fn.update_teachers(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1)


RECORDED_CASES = {  # name: (make loss, shape, dtype, uses uncond, prepare)
    "default": (lambda: TwinFlowLoss(rectify_time=BetaTime(), **RELEASED_GUIDANCE), (8, 3), torch.float64, True, None),
    "l2_order1_noguide": (
        # recorded with equal quarters and the uniform s, the unguided defaults then (since: a fake share of 1/8,
        # and s shifted towards the data on a conditioned batch)
        lambda: TwinFlowLoss(distance=L2Distance(), estimate_order=1, guidance_scale=0.0, shares=GroupShares(),
                             rectify_time=BetaTime()),
        (8, 3), torch.float64, False, None),
    "rcgm": (lambda: TwinFlowLoss.rcgm(**RELEASED_GUIDANCE), (9, 3), torch.float64, True, None),
    "flow_matching": (lambda: TwinFlowLoss.plain_flow_matching(), (8, 3), torch.float64, False, None),
    "custom": (lambda: TwinFlowLoss(
        shares=GroupShares.from_twin_share(1 / 3), time_distribution=LogitNormalTime(), multi_step_gap=0.1,
        rectify_weight=1.0, guidance_interval=(0.1, 0.9), estimate_step=0.05, residual_clamp=0.5,
        rectify_clamp=0.3, guidance_scale=0.8, estimate_order=3, rectify_time=BetaTime()), (12, 2, 3), torch.float64, True, None),
    "cosine": (lambda: TwinFlowLoss(path=CosinePath(), rectify_time=BetaTime(), **RELEASED_GUIDANCE), (8, 3), torch.float64,
               True, None),
    "vp": (lambda: TwinFlowLoss(path=VPPath(), rectify_time=BetaTime(), **RELEASED_GUIDANCE), (8, 3), torch.float64, True,
           None),
    "ema": (lambda: TwinFlowLoss(teacher=EMATeacher(0.9), rectify_time=BetaTime(), **RELEASED_GUIDANCE), (8, 3),
            torch.float64, True, _ema_moved),
    "float32": (lambda: TwinFlowLoss(rectify_time=BetaTime(), **RELEASED_GUIDANCE), (8, 2, 2), torch.float32, True, None),
}


@pytest.mark.parametrize("name", sorted(RECORDED_CASES))
def test_refactor_changes_no_number_against_values_recorded_before_it(name):
    make, shape, dtype, with_uncond, prepare = RECORDED_CASES[name]
    torch.manual_seed(0)
    model = TinyVelocityNet(shape[1:]).to(dtype)
    x, y, null_y = _data(shape, dtype=dtype)
    loss_fn = make()
    if prepare is not None:
        prepare(loss_fn, model)
    out = loss_fn(model, x, cond={"y": y}, uncond={"y": null_y} if with_uncond else None,
                  generator=torch.Generator().manual_seed(7))
    out.loss.backward()
    grad_sum = sum(float(p.grad.double().abs().sum()) for p in model.parameters() if p.grad is not None)
    loss, grads = RECORDED_BEFORE_REFACTOR[name]
    tolerance = 1e-12 if dtype == torch.float64 else 1e-6
    assert out.loss.item() == pytest.approx(loss, rel=tolerance, abs=0)
    assert grad_sum == pytest.approx(grads, rel=tolerance, abs=0)


class DrawsOneNumberPerCall(TinyVelocityNet):
    """Draws one number from the global stream per call (a dropout stand-in) and records it."""

    def __init__(self, shape):
        super().__init__(shape)
        self.draws = []

    def forward(self, x_t, t, r, y=None):
        self.draws.append(torch.rand(()).item())
        return super().forward(x_t, t, r, y=y)


@pytest.mark.parametrize("seeded", [False, True], ids=["generator=None", "generator"])
def test_every_pass_sees_the_draw_of_the_grad_forward(seeded):
    model = DrawsOneNumberPerCall((3,))
    x, y, null_y = _data((8, 3), dtype=torch.float32)
    generator = torch.Generator().manual_seed(1) if seeded else None
    torch.manual_seed(123)
    out = TwinFlowLoss(teacher=EMATeacher())(model, x, cond={"y": y}, uncond={"y": null_y}, generator=generator)
    assert out.calls_per_pass == {"fake": 1, "guidance": 1, "rcgm": 2, "main": 1, "rectify": 1}
    assert len(model.draws) == 6 and len(set(model.draws)) == 1, model.draws
    if seeded:  # the loss draws nothing from the global stream: the passes see its state at the call
        torch.manual_seed(123)
        assert model.draws[0] == torch.rand(()).item()


def test_exactly_one_forward_carries_grad_and_no_target_does():
    model = Recorder(TinyVelocityNet((3,)).double())
    x, y, null_y = _data((8, 3))
    out = TwinFlowLoss(estimate_order=2, **RELEASED_GUIDANCE)(model, x, cond={"y": y}, uncond={"y": null_y})
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
    x, y, _ = _data((12, 3))
    loss_fn = TwinFlowLoss(guidance_scale=0.0)
    loss_fn(model, x, cond={"y": y}, generator=torch.Generator().manual_seed(4))
    real = 12 - loss_fn.shares.counts(12)["fake"]  # the fake rows come last
    assert real == 10  # the unguided default gives the fake group 1/8 of the batch: 1.5 rows, rounded up
    fake_samples = model.calls[0]["x_t"] - model.calls[0]["out"]  # one jump from noise at t = 1
    main = next(c for c in model.calls if c["grad"])
    t = main["t"]
    assert bool((t[real:] < 0).all()) and torch.equal(main["r"][real:], t[real:]) and bool((t[:real] >= 0).all())
    # replay the documented draws: t, u, fake noise, interpolation noise
    g = torch.Generator().manual_seed(4)
    t0 = torch.rand(12, dtype=torch.float64, generator=g)
    torch.rand(12, dtype=torch.float64, generator=g)
    z_gen = torch.randn(12 - real, 3, dtype=torch.float64, generator=g)
    z = torch.randn(12, 3, dtype=torch.float64, generator=g)
    assert torch.equal(model.calls[0]["x_t"], z_gen)
    assert_close(t[real:], -t0[real:], rtol=0, atol=0)
    a = t0[real:, None]  # |t|: the twin rows are interpolated exactly as at positive time
    assert_close(main["x_t"][real:], a * z[real:] + (1 - a) * fake_samples, rtol=0, atol=1e-15)
    assert_close(main["x_t"][:real], t[:real, None] * z[:real] + (1 - t[:real, None]) * x[:real], rtol=0, atol=1e-15)


def test_rectify_gradient_is_the_clamped_velocity_gap():
    shape = (8, 5)
    torch.manual_seed(0)
    base_model = TinyVelocityNet(shape[1:], hidden=64).double()
    for p in base_model.parameters():
        p.data.mul_(4.0)  # large velocity gaps, so the clamp is active somewhere
    x, y, null_y = _data(shape)

    def output_grad(rectify_weight):
        model = Recorder(copy.deepcopy(base_model))
        loss_fn = TwinFlowLoss(distance=L2Distance(), rectify_weight=rectify_weight, rectify_clamp=1.0, **RELEASED_GUIDANCE)
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
    rcgm = TwinFlowLoss.rcgm(guidance_scale=0.0)(model, x, cond={"y": y})
    assert rcgm.model_calls == 3 and rcgm.terms["adv"] == 0 and rcgm.terms["rectify"] == 0
    assert rcgm.calls_per_pass == {"fake": 0, "guidance": 0, "rcgm": 2, "main": 1, "rectify": 0}
    full = TwinFlowLoss(guidance_scale=0.0, estimate_order=1)(model, x, cond={"y": y})
    assert full.calls_per_pass == {"fake": 1, "guidance": 0, "rcgm": 1, "main": 1, "rectify": 1}


@pytest.mark.parametrize(
    "build,name",
    [
        (lambda: TwinFlowLoss.rcgm(rectify_weight=0.5), "rectify_weight"),
        (lambda: TwinFlowLoss.rcgm(image_free=True), "image_free"),
        (lambda: TwinFlowLoss.rcgm(rectify_distance=L2Distance()), "rectify_distance"),
        (lambda: TwinFlowLoss.plain_flow_matching(rectify_distance=L2Distance()), "rectify_distance"),
        (lambda: TwinFlowLoss(rectify_distance=L2Distance(), rectify_weight=0.0), "rectify_distance"),
        (lambda: TwinFlowLoss.rcgm(shares=GroupShares()), "shares"),
        (lambda: TwinFlowLoss.plain_flow_matching(shares=GroupShares()), "shares"),
        (lambda: TwinFlowLoss.plain_flow_matching(multi_step_gap=0.05), "multi_step_gap"),
        (lambda: TwinFlowLoss.plain_flow_matching(estimate_order=2), "estimate_order"),
        (lambda: TwinFlowLoss.plain_flow_matching(rcgm_teacher=EMATeacher()), "rcgm_teacher"),
        (lambda: TwinFlowLoss(teacher=EMATeacher(), guidance_teacher=EMATeacher()), "teacher"),
        (lambda: TwinFlowLoss(guidance_scale=0.0, guidance_teacher=EMATeacher()), "guidance_teacher"),
        (lambda: TwinFlowLoss(estimate_order=0, rcgm_teacher=EMATeacher()), "rcgm_teacher"),
        (lambda: TwinFlowLoss(estimate_order=0, guidance_scale=0.0, teacher=EMATeacher()), "teacher"),
        (lambda: TwinFlowLoss(shares=GroupShares(0.0, 0.5, 0.25, 0.25)), "rectify_weight"),
        (lambda: TwinFlowLoss(image_free=True, guidance_scale=0.0), "image_free"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_an_argument_a_variant_cannot_honour_raises_naming_it(build, name):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        build()


@pytest.mark.parametrize(
    "build",
    [lambda: TwinFlowLoss(time_weight="cosine"), lambda: TwinFlowLoss.from_preset("sd35_fulll")],
    ids=["time_weight", "preset-name"],
)
def test_literal_arguments_are_checked_by_the_type_checker(build):
    with pytest.raises(TypeCheckError, match="Literal"):
        build()


def test_time_weight_default_is_a_fresh_instance_per_loss():
    first, second = TwinFlowLoss(), TwinFlowLoss()
    assert isinstance(first.time_weight, twinloss.TangentTimeWeight) and first.time_weight.divisor == 2.5
    assert first.time_weight is not second.time_weight


class RecordingTeacher(OnlineTeacher):
    def __init__(self):
        super().__init__()
        self.rows = []

    def forward(self, model, x_t, t, r, cond):
        self.rows.append(x_t.shape[0])
        return super().forward(model, x_t, t, r, cond)


def test_guidance_and_rcgm_teachers_get_only_their_own_pass():
    guidance, rcgm = RecordingTeacher(), RecordingTeacher()
    loss_fn = TwinFlowLoss(guidance_teacher=guidance, rcgm_teacher=rcgm, estimate_order=3, **RELEASED_GUIDANCE)
    x, y, null_y = _data((8, 3), dtype=torch.float32)
    out = loss_fn(TinyVelocityNet((3,)), x, cond={"y": y}, uncond={"y": null_y})
    assert guidance.rows == [2 * 4] and rcgm.rows == [6, 6, 6]
    assert out.calls_per_pass == {"fake": 1, "guidance": 1, "rcgm": 3, "main": 1, "rectify": 1}
    assert loss_fn.guidance_teacher is guidance and loss_fn.rcgm_teacher is rcgm
    assert {key.split(".")[0] for key in loss_fn.state_dict()} <= {"guidance_teacher", "rcgm_teacher"}
    for shared in (TwinFlowLoss(teacher=guidance), TwinFlowLoss(guidance_teacher=guidance, rcgm_teacher=guidance)):
        assert shared.guidance_teacher is shared.rcgm_teacher is shared.teacher is guidance


class WrongShapeTeacher(OnlineTeacher):
    def forward(self, model, x_t, t, r, cond):
        return super().forward(model, x_t, t, r, cond)[:, :2]


@pytest.mark.parametrize("argument,name", [("guidance_teacher", "guidance"), ("rcgm_teacher", "rcgm")])
def test_teacher_output_of_the_wrong_shape_raises_naming_the_pass(argument, name):
    x, y, null_y = _data((8, 3), dtype=torch.float32)
    loss_fn = TwinFlowLoss(**{argument: WrongShapeTeacher()}, **RELEASED_GUIDANCE)  # every real row at 0 < t < 1 guided
    with pytest.raises(ValueError, match=rf"^the {name} teacher must return a velocity of shape \(\d+, 3\)"):
        loss_fn(TinyVelocityNet((3,)), x, cond={"y": y}, uncond={"y": null_y}, generator=torch.Generator().manual_seed(0))


def test_an_ema_teacher_never_updated_warns_once_at_the_configured_step():
    loss_fn = TwinFlowLoss(teacher=EMATeacher(warn_after_steps=3), guidance_scale=0.0)
    model = TinyVelocityNet((3,))
    x, y, _ = _data((8, 3), dtype=torch.float32)

    def steps(n):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(n):
                loss_fn(model, x, cond={"y": y})
        return [str(w.message) for w in caught]

    assert steps(2) == []
    third = steps(1)
    assert len(third) == 1 and "EMATeacher was used for 3 training steps without update(model)" in third[0]
    assert steps(3) == []  # once per run of steps without an update
    loss_fn.update_teachers(model)
    assert steps(2) == [] and len(steps(1)) == 1  # the count restarts at each update


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
        ({"estimate_step": 0.0}, "estimate_step"), ({"estimate_order": -1}, "estimate_order"),
        ({"residual_clamp": 0.0}, "residual_clamp"), ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"guidance_interval": (0.5, 0.2)}, "guidance_interval"), ({"rectify_weight": float("nan")}, "rectify_weight"),
        ({"rectify_clamp": -1.0}, "rectify_clamp"), ({"multi_step_gap": 2.0}, "multi_step_gap"),
        # a setting of a pass that the configuration switches off would be silently ignored
        ({"guidance_scale": 0.0, "guidance_interval": (0.2, 0.8)}, "guidance_interval"),
        ({"rectify_weight": 0.0, "rectify_clamp": 0.3}, "rectify_clamp"),
        ({"estimate_order": 0, "estimate_step": 0.2}, "estimate_step"),
        ({"estimate_order": 0, "residual_clamp": 0.3}, "residual_clamp"),
    ],
)
def test_bad_configuration_names_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}[ =]"):
        TwinFlowLoss(**kwargs)


WRONG_TYPES = {
    "estimate_step": "'0.01'", "guidance_scale": "True", "guidance_interval": "(0.0, 0.5, 1.0)",
    "shares": "{'one_step': 0.25}", "time_distribution": "0.5", "distance": "'l2'", "rectify_time": "0.5",
    "path": "'linear'",
}


def test_arguments_of_the_wrong_type_are_refused_with_a_value_error_naming_them_when_the_loss_is_built():
    # The suite type-checks every call (jaxtyping's hook), which would answer first; a user's process has no
    # hook, so the loss's own checks run in a fresh interpreter, as they would there.
    import subprocess
    import sys

    script = "\n".join([
        "from twinloss import TwinFlowLoss",
        "for name, value in " + repr(WRONG_TYPES) + ".items():",
        "    try:",
        "        TwinFlowLoss(**{name: eval(value)})",
        "    except ValueError as error:",
        "        print(name, '|', error)",
        "    else:",
        "        print(name, '| accepted')",
    ])
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    answers = dict(line.split(" | ", 1) for line in run.stdout.splitlines())
    assert answers.keys() == WRONG_TYPES.keys()
    for name, message in answers.items():
        assert message.startswith(f"{name} must be"), (name, message)


def test_training_reduces_the_held_out_flow_matching_error_and_ema_resumes_exactly():
    torch.manual_seed(0)
    model = TinyVelocityNet((2,), hidden=64)
    x_all = torch.randn(256, 2) * 0.3 + torch.tensor([1.0, -0.5])

    def held_out_error(model):
        # A fixed objective (same rows, same draws, target v independent of the model); the
        # TwinFlow loss itself is not one: its RCGM and rectification targets move with the model.
        out = TwinFlowLoss.plain_flow_matching()(model, x_all[:64], generator=torch.Generator().manual_seed(1000))
        return out.loss.item()

    def run(steps, loss_fn, model, opt, seed0):
        losses = []
        for step in range(steps):
            g = torch.Generator().manual_seed(seed0 + step)
            out = loss_fn(model, x_all[(step * 16) % 256:][:16], generator=g)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            loss_fn.update_teachers(model)
            losses.append(out.loss.item())
        return losses

    loss_fn = TwinFlowLoss(guidance_scale=0.0, teacher=EMATeacher(0.9))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    before = held_out_error(model)
    run(5, loss_fn, model, opt, 0)
    assert held_out_error(model) < 0.95 * before  # measured: 1.805 -> 1.613
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


@st.composite
def _shares(draw):
    weights = [draw(st.sampled_from([0, 1, 2])) for _ in range(4)]
    if sum(weights) == 0:
        weights[1] = 1
    total = sum(weights)
    return GroupShares(*(w / total for w in weights))


@settings(max_examples=15, deadline=None)
@given(
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    distribution=st.sampled_from([BetaTime(), BetaTime(2.0, 1.5), LogitNormalTime(), ShiftedTime(3.0)]),
    shares=_shares(),
    seed=st.integers(0, 100),
)
def test_any_dtype_time_distribution_and_shares_give_a_consistent_step(dtype, distribution, shares, seed):
    model = TinyVelocityNet((3,)).to(dtype)
    batch = max(8, shares.min_batch_size())
    x, y, null_y = _data((batch, 3), seed=seed, dtype=dtype)
    rectify_weight = 0.5 if shares.one_step > 0 else 0.0
    loss_fn = TwinFlowLoss(shares=shares, time_distribution=distribution, rectify_weight=rectify_weight)
    out = loss_fn(model, x, cond={"y": y}, uncond={"y": null_y}, generator=torch.Generator().manual_seed(seed))
    out.loss.backward()
    assert out.loss.dtype == torch.promote_types(dtype, torch.float32) and bool(torch.isfinite(out.loss))
    assert_close(out.terms["loss"], out.terms["base"] + out.terms["adv"] + rectify_weight * out.terms["rectify"])
    for p in model.net.parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all())
    counts = shares.counts(batch)
    real = counts["one_step"] + counts["multi_step"] + counts["any_step"]
    assert out.calls_per_pass["main"] == 1 and out.grad_sample_evaluations == batch
    assert out.calls_per_pass["fake"] == int(counts["fake"] > 0)
    assert out.calls_per_pass["rcgm"] == (2 if real else 0)
    assert out.calls_per_pass["rectify"] == int(counts["one_step"] > 0)
    assert out.calls_per_pass["guidance"] <= int(counts["multi_step"] + counts["any_step"] > 0)
    rows_without_guidance = counts["fake"] + 2 * real + batch + 2 * counts["one_step"]
    guided = out.sample_evaluations - rows_without_guidance
    assert guided % 2 == 0 and 0 <= guided // 2 <= counts["multi_step"] + counts["any_step"]


class IgnoresTargetTime(OnlineTeacher):
    reads_target_time = False


@pytest.mark.parametrize("argument", ["teacher", "rcgm_teacher"])
def test_a_teacher_blind_to_r_is_refused_for_the_rcgm_chain_but_guides(argument):
    with pytest.raises(ValueError, match=rf"^{argument} IgnoresTargetTime ignores r"):
        TwinFlowLoss(**{argument: IgnoresTargetTime()})
    loss_fn = TwinFlowLoss(guidance_teacher=IgnoresTargetTime())
    assert isinstance(loss_fn.rcgm_teacher, OnlineTeacher) and not isinstance(loss_fn.rcgm_teacher, IgnoresTargetTime)
    TwinFlowLoss(estimate_order=0, teacher=IgnoresTargetTime())  # no RCGM chain: guidance only


class ReversedGroupOrder(TrajectorySampler):
    """The default draws, with the groups laid out as fake, any_step, multi_step, one_step."""

    ORDER = ("fake", "any_step", "multi_step", "one_step")

    def forward(self, batch_size, *, device="cpu", dtype=torch.float32, generator=None):
        drawn = super().forward(batch_size, device=device, dtype=dtype, generator=generator)
        perm = torch.cat([torch.arange(drawn.groups[name].start, drawn.groups[name].stop) for name in self.ORDER])
        groups, start = {}, 0
        for name in self.ORDER:
            groups[name] = slice(start, start + drawn.size(name))
            start += drawn.size(name)
        return Trajectory(t=drawn.t[perm], r=drawn.r[perm], groups=groups)


def test_the_step_does_not_depend_on_the_order_of_the_groups_in_the_batch(monkeypatch):
    model = TinyVelocityNet((3,)).double()  # row-independent: each row's output depends on that row only
    x, y, null_y = _data((8, 3))
    perm = torch.tensor([6, 7, 4, 5, 2, 3, 0, 1])  # reversed layout row i holds default row perm[i]

    def step(loss_fn, x, y, null_y):
        out = loss_fn(model, x, cond={"y": y}, uncond={"y": null_y}, generator=torch.Generator().manual_seed(4))
        out.loss.backward()
        grads = _grads(model)
        model.zero_grad()
        return out, grads

    default, default_grads = step(TwinFlowLoss(**RELEASED_GUIDANCE), x, y, null_y)  # four groups of two rows
    reordered_fn = TwinFlowLoss(**RELEASED_GUIDANCE)
    reordered_fn.trajectory = ReversedGroupOrder()
    real_randn = torch.randn

    def randn_following_the_rows(*args, **kwargs):  # the interpolation noise moves with its row
        out = real_randn(*args, **kwargs)
        return out[perm] if out.shape == x.shape else out

    monkeypatch.setattr(torch, "randn", randn_following_the_rows)
    reordered, reordered_grads = step(reordered_fn, x[perm], y[perm], null_y[perm])
    assert default.terms.keys() == reordered.terms.keys()
    for name, value in default.terms.items():
        assert_close(reordered.terms[name], value, rtol=1e-12, atol=1e-15)
    for got, want in zip(reordered_grads, default_grads, strict=True):
        assert_close(got, want, rtol=1e-10, atol=1e-14)
    assert reordered.calls_per_pass == default.calls_per_pass
