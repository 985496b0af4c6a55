"""TwinFlowLoss(rectify_field="guidance_free"): the rectification's gap against the field with step 4's guidance taken out."""

import copy

import pytest
import torch
from jaxtyping import TypeCheckError
from torch.testing import assert_close

from twinloss import FrozenTeacher, OnlineTeacher, TwinFlowLoss
from twinloss.targets import guidance_free_velocity

from core_models import TinyVelocityNet
from reference import barron, reference_step
from test_guidance_groups import RowRecordingTeacher, _data, _step


@pytest.mark.parametrize("teacher", ["online", "frozen"])
@pytest.mark.parametrize("interval", [(0.0, 1.0), (0.2, 0.7)], ids=["whole path", "middle"])
def test_guidance_free_rectification_matches_float64_reference_in_value_and_gradient(teacher, interval):
    torch.manual_seed(0)
    model = TinyVelocityNet((3,)).double()
    guidance_model = None
    kwargs = {}
    if teacher == "frozen":
        guidance_model = copy.deepcopy(model)
        with torch.no_grad():
            for parameter in guidance_model.parameters():
                parameter.add_(0.2 * torch.randn_like(parameter))  # a teacher that is not the online model
        kwargs["guidance_teacher"] = FrozenTeacher(guidance_model)
    x, y, null_y = _data(batch=16 if interval == (0.0, 1.0) else 48)  # 14 one-step rows: some s in the middle
    loss_fn = TwinFlowLoss(rectify_field="guidance_free", guidance_scale=0.6, guidance_interval=interval,
                           rectify_weight=1.0, **kwargs)
    out, grads = _step(loss_fn, model, x, y, null_y, seed=4)
    expected, gap, _ = reference_step(model, x, y, null_y, seed=4, guidance=0.6, interval=interval, rectify_weight=1.0,
                                      distance=barron, guidance_model=guidance_model, rectify_field="guidance_free")
    expected.backward()
    assert_close(out.loss, expected, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, [p.grad for p in model.parameters()], strict=True):
        assert_close(got, want, rtol=1e-9, atol=1e-12)
    guided, guided_gap, _ = reference_step(model, x, y, null_y, seed=4, guidance=0.6, interval=interval,
                                           rectify_weight=1.0, distance=barron, guidance_model=guidance_model)
    differs = (gap - guided_gap).abs().flatten(1).amax(1) > 1e-3  # per one-step row: the test tells the fields apart
    # on the whole path every s is inside; on the middle some rows' s lie outside, where the field is not changed
    assert bool(differs.all()) if interval == (0.0, 1.0) else bool(differs.any()) and not bool(differs.all())


def test_only_the_rectification_changes_and_the_online_field_is_one_minus_w_cond_plus_w_uncond():
    torch.manual_seed(1)
    model = TinyVelocityNet((3,)).double()
    x, y, null_y = _data(batch=16, seed=1)
    guided, _ = _step(TwinFlowLoss(), model, x, y, null_y, seed=2)
    free, _ = _step(TwinFlowLoss(rectify_field="guidance_free"), model, x, y, null_y, seed=2)
    for name in ("base", "adv"):
        assert_close(free.terms[name], guided.terms[name], rtol=0, atol=0)
    assert (free.terms["rectify"] - guided.terms["rectify"]).abs() > 1e-6
    cond, uncond, field = torch.randn(3, 5, 3, dtype=torch.float64)
    assert_close(guidance_free_velocity(cond, cond, uncond, 0.5), 0.5 * cond + 0.5 * uncond)
    assert_close(guidance_free_velocity(field, cond, uncond, 0.3), field - 0.3 * (cond - uncond))


def test_the_extra_guidance_pass_reads_only_one_step_rows_whose_s_is_inside_the_interval():
    teacher = RowRecordingTeacher()
    loss_fn = TwinFlowLoss(rectify_field="guidance_free", guidance_teacher=teacher, rcgm_teacher=OnlineTeacher(),
                           guidance_interval=(0.4, 1.0))
    x, y, null_y = _data(batch=64, dtype=torch.float32)
    out = loss_fn(TinyVelocityNet((3,)), x, cond={"y": y}, uncond={"y": null_y},
                  generator=torch.Generator().manual_seed(3))
    step4, rectify = teacher.times  # step 4's pass, then the rectification's
    s = rectify.chunk(2)[0]
    assert_close(rectify, torch.cat([s, s]), rtol=0, atol=0)  # cond and uncond batched at (y, s, s)
    assert bool(((s > 0.4) & (s < 1.0)).all()) and 0 < s.numel() < 16  # some one-step rows fall outside
    assert out.calls_per_pass["guidance"] == 2


def test_with_the_online_teacher_the_guidance_free_field_costs_no_extra_call_and_matches_a_separate_guidance_pass():
    torch.manual_seed(2)
    model = TinyVelocityNet((3,)).double()
    x, y, null_y = _data(batch=32, seed=2)
    guided, _ = _step(TwinFlowLoss(), model, x, y, null_y, seed=5)
    batched, batched_grads = _step(TwinFlowLoss(rectify_field="guidance_free"), model, x, y, null_y, seed=5)
    separate, separate_grads = _step(
        TwinFlowLoss(rectify_field="guidance_free", guidance_teacher=RowRecordingTeacher(), rcgm_teacher=OnlineTeacher()),
        model, x, y, null_y, seed=5)
    assert batched.calls_per_pass == guided.calls_per_pass  # G_u rides in the rectification's call
    assert separate.calls_per_pass["guidance"] == guided.calls_per_pass["guidance"] + 1
    assert_close(batched.loss, separate.loss, rtol=1e-12, atol=1e-12)
    for got, want in zip(batched_grads, separate_grads, strict=True):
        assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"guidance_scale": 0.0}, "guidance_scale=0 puts no guidance"),
        ({"rectify_weight": 0.0}, "rectify_weight=0 runs no rectification"),
        ({"guidance_groups": ("any_step",)}, "leaves the multi-step rows"),
        ({"image_free": True}, "image_free=True"),
    ],
)
def test_a_rectify_field_that_cannot_be_honoured_raises_naming_it(kwargs, match):
    kwargs = {"rectify_field": "guidance_free", **kwargs}
    with pytest.raises(ValueError, match=match):
        TwinFlowLoss(**kwargs)


def test_an_unknown_rectify_field_is_refused_naming_it():
    with pytest.raises((ValueError, TypeCheckError), match="rectify_field"):  # the Literal, under type checking
        TwinFlowLoss(rectify_field="unguided")


@pytest.mark.parametrize("factory", [TwinFlowLoss.rcgm, TwinFlowLoss.plain_flow_matching])
def test_factories_without_a_rectification_refuse_rectify_field(factory):
    with pytest.raises(ValueError, match="rectify_field"):
        factory(rectify_field="guidance_free")


def test_the_health_clamp_rate_measures_the_gap_the_loss_uses():
    from twinloss import toy
    from twinloss.health import training_signals

    torch.manual_seed(0)
    model = toy.TimeMLP((3,), width=16, depth=2, num_classes=4)  # twin-blind: F(y, -s) = F_c(y, s) exactly
    x, y, null_y = _data(batch=16, dtype=torch.float32)
    kwargs = dict(rectify_clamp=1e-4, guidance_scale=0.5, guidance_interval=(0.0, 1.0))  # every s guided

    def rate(field: str) -> float:
        loss_fn = TwinFlowLoss(rectify_field=field, **kwargs)
        signals = training_signals(loss_fn, model, x, cond={"y": y}, uncond={"y": null_y},
                                   generator=torch.Generator().manual_seed(0))
        return signals.as_dict()["clamp/rectify"]

    assert rate("guided") == 0.0  # no gap to the model's own field
    assert rate("guidance_free") > 0.5  # the gap w (F_c - F_u) to the guidance-free field
