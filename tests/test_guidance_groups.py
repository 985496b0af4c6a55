"""TwinFlowLoss(guidance_groups=...): the guided target on the named real groups only."""

import pytest
import torch
from torch.testing import assert_close

from twinloss import GroupShares, L2Distance, OnlineTeacher, TwinFlowLoss
from twinloss.loss import REAL_GROUPS

from core_models import TinyVelocityNet
from reference import reference_step


def _data(batch=8, features=3, seed=0, dtype=torch.float64, classes=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, features), dtype=dtype, generator=g)
    y = torch.randint(0, classes, (batch,), generator=g)
    return x, y, torch.full_like(y, classes)


def _step(loss_fn, model, x, y, null_y, seed):
    """Loss and parameter gradients of one step (the model's grads are cleared afterwards)."""
    out = loss_fn(model, x, cond={"y": y}, uncond={"y": null_y}, generator=torch.Generator().manual_seed(seed))
    out.loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return out, grads


class RowRecordingTeacher(OnlineTeacher):
    """The online teacher, recording the times of every call it evaluates."""

    def __init__(self):
        super().__init__()
        self.times = []

    def forward(self, model, x_t, t, r, cond):
        self.times.append(t.clone())
        return super().forward(model, x_t, t, r, cond)


@pytest.mark.parametrize("groups", [("any_step",), ("multi_step",), ("one_step", "any_step")], ids=str)
def test_guidance_on_named_groups_matches_float64_reference_in_value_and_gradient(groups):
    torch.manual_seed(0)
    model = TinyVelocityNet((3,)).double()
    x, y, null_y = _data()
    whole = (0.0, 1.0)  # every real row at 0 < t < 1, so each group has guided rows
    loss_fn = TwinFlowLoss(distance=L2Distance(), guidance_groups=groups, guidance_scale=0.7, guidance_interval=whole)
    out, grads = _step(loss_fn, model, x, y, null_y, seed=3)
    expected, _, _ = reference_step(model, x, y, null_y, seed=3, guidance=0.7, interval=whole, guidance_groups=groups)
    expected.backward()
    assert_close(out.loss, expected, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, [p.grad for p in model.parameters()], strict=True):
        assert_close(got, want, rtol=1e-9, atol=1e-12)
    # the restriction matters: guiding every real row gives another loss
    everywhere, _, _ = reference_step(model, x, y, null_y, seed=3, guidance=0.7, interval=whole)
    assert (everywhere - expected).abs() > 1e-6


def test_default_groups_are_all_real_groups_and_explicit_ones_change_no_number():
    torch.manual_seed(1)
    model = TinyVelocityNet((3,)).double()
    data = _data(seed=1)
    default = TwinFlowLoss()
    assert default.guidance_groups == REAL_GROUPS
    out, grads = _step(default, model, *data, seed=7)
    explicit = TwinFlowLoss(guidance_groups=("any_step", "one_step", "multi_step"))
    assert explicit.guidance_groups == REAL_GROUPS  # stored in batch order
    again, grads_again = _step(explicit, model, *data, seed=7)
    assert_close(again.loss, out.loss, rtol=0, atol=0)
    for got, want in zip(grads_again, grads, strict=True):
        assert_close(got, want, rtol=0, atol=0)


def test_the_guidance_pass_evaluates_only_the_named_groups_rows_inside_the_interval():
    teacher = RowRecordingTeacher()
    loss_fn = TwinFlowLoss(guidance_teacher=teacher, rcgm_teacher=OnlineTeacher(), guidance_groups=("any_step",),
                           guidance_interval=(0.3, 1.0))
    x, y, null_y = _data(batch=16, dtype=torch.float32)
    loss_fn(TinyVelocityNet((3,)), x, cond={"y": y}, uncond={"y": null_y}, generator=torch.Generator().manual_seed(5))
    traj = loss_fn.trajectory(16, device=x.device, dtype=x.dtype, generator=torch.Generator().manual_seed(5))
    t_any = traj.t[traj.groups["any_step"]]
    expected = t_any[(t_any > 0.3) & (t_any < 1.0)]
    assert 0 < expected.numel() < t_any.numel()  # the interval and the group both select
    (times,) = teacher.times
    assert_close(times, torch.cat([expected, expected]), rtol=0, atol=0)  # cond and uncond batched


def test_no_guidance_pass_when_no_row_of_the_named_groups_is_inside_the_interval():
    x, y, null_y = _data(dtype=torch.float32)
    seed = 0
    loss_fn = TwinFlowLoss(guidance_groups=("any_step",), guidance_interval=(0.0, 0.05))
    traj = loss_fn.trajectory(8, device=x.device, dtype=x.dtype, generator=torch.Generator().manual_seed(seed))
    assert not bool((traj.t[traj.groups["any_step"]] < 0.05).any())  # premise: no any-step row qualifies
    assert bool((traj.t[: traj.groups["any_step"].start] < 1.0).any())  # while other real rows would
    model = TinyVelocityNet((3,))
    out, grads = _step(loss_fn, model, x, y, null_y, seed=seed)
    same_law = loss_fn.rectify_law(conditioned=True)  # the guided default law of s; only the guidance may differ
    unguided, unguided_grads = _step(TwinFlowLoss(guidance_scale=0.0, rectify_time=same_law, shares=loss_fn.shares),
                                     model, x, y, null_y, seed=seed)
    assert out.calls_per_pass["guidance"] == 0
    assert_close(out.loss, unguided.loss, rtol=0, atol=0)
    for got, want in zip(grads, unguided_grads, strict=True):
        assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"guidance_groups": ("any_step", "base")}, r"guidance_groups.*unknown \['base'\]"),
        ({"guidance_groups": ("fake",)}, "guidance_groups cannot include 'fake'"),
        ({"guidance_groups": ()}, "guidance_groups is empty.*guidance_scale=0"),
        ({"guidance_groups": ("any_step", "any_step")}, "guidance_groups names a group twice"),
        ({"guidance_groups": ("one_step",)}, "guidance_groups.*guides no row"),
        ({"guidance_groups": ("any_step",), "guidance_scale": 0.0}, "guidance_groups.*guidance_scale=0"),
        ({"guidance_groups": ("any_step",), "shares": GroupShares(0.25, 0.5, 0.0, 0.25)},
         "guidance_groups.*guides no row"),
    ],
)
def test_a_guidance_groups_value_that_cannot_be_honoured_raises_naming_it(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TwinFlowLoss(**kwargs)


def test_empty_guidance_groups_without_guidance_is_accepted():
    assert TwinFlowLoss(guidance_scale=0.0, guidance_groups=()).guidance_groups == ()


def test_guided_rows_are_the_named_groups_rows_strictly_inside_the_interval_and_never_fake_or_one_step():
    loss_fn = TwinFlowLoss(guidance_groups=("one_step", "multi_step"), guidance_interval=(0.2, 1.0))
    traj = loss_fn.trajectory(32, device=torch.device("cpu"), dtype=torch.float64,
                              generator=torch.Generator().manual_seed(2))
    expected = torch.zeros(32, dtype=torch.bool)
    multi = traj.groups["multi_step"]
    expected[multi] = traj.t[multi] > 0.2
    assert 0 < int(expected.sum()) < traj.size("multi_step")
    assert torch.equal(loss_fn.guided_rows(traj), expected)
