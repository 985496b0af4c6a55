"""TwinFlowLoss(balance_guidance_feedback=True): the guided rows weighed by 1 / (1 - w)."""

import pytest
import torch
from jaxtyping import TypeCheckError
from torch import nn
from torch.testing import assert_close

from twinloss import EMATeacher, FrozenTeacher, GroupShares, L2Distance, TwinFlowLoss

from core_models import TinyVelocityNet
from reference import barron
from test_guidance_difference import _data_with_dropped_labels, assert_matches_reference

ANY_STEP_ONLY = GroupShares(one_step=0.0, multi_step=0.0, any_step=1.0, fake=0.0)


class LabelOffsetModel(nn.Module):
    """``TinyVelocityNet`` plus a learnable offset on every labelled row: a push on the conditional field alone."""

    def __init__(self, null_label: int):
        super().__init__()
        self.net = TinyVelocityNet((3,)).double()
        self.offset = nn.Parameter(torch.zeros(3, dtype=torch.float64))
        self.null_label = null_label

    def forward(self, x_t, t, r, y):
        labelled = (y != self.null_label).to(x_t.dtype).unsqueeze(1)
        return self.net(x_t, t, r, y=y) + labelled * self.offset


def _offset_gradient(loss_fn, model, x, y, null_y, offset):
    """The base loss's gradient with respect to the label offset, at ``offset``."""
    with torch.no_grad():
        model.offset.copy_(offset)
    out = loss_fn(model, x, cond={"y": y}, uncond={"y": null_y}, generator=torch.Generator().manual_seed(5))
    (gradient,) = torch.autograd.grad(out.loss, [model.offset])
    return gradient


def _restoring_rate(guidance_scale, balance, interval):
    """How fast the base term pulls a displacement of the conditional field back: the derivative of the loss's
    gradient on the label offset along that offset (under L2 the gradient is linear in it)."""
    torch.manual_seed(0)
    x, y, null_y = _data_with_dropped_labels(batch=24, seed=1)
    model = LabelOffsetModel(null_label=int(null_y[0]))
    loss_fn = TwinFlowLoss(
        shares=ANY_STEP_ONLY, estimate_order=0, distance=L2Distance(), time_weight=None, rectify_weight=0.0,
        guidance_scale=guidance_scale, balance_guidance_feedback=balance,
        **({"guidance_interval": interval} if guidance_scale > 0 else {}),
    )
    step = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    return _offset_gradient(loss_fn, model, x, y, null_y, step) - _offset_gradient(
        loss_fn, model, x, y, null_y, torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("interval", [(0.0, 1.0), (0.2, 0.7)])
def test_a_push_on_the_conditional_field_is_pulled_back_at_the_unguided_rate(interval):
    unguided = _restoring_rate(0.0, False, interval)
    online = _restoring_rate(0.5, False, interval)
    balanced = _restoring_rate(0.5, True, interval)
    assert unguided.abs().min() > 1e-3
    assert_close(balanced, unguided, rtol=1e-10, atol=1e-12)
    if interval == (0.0, 1.0):  # every labelled row guided: the online target gives back w of the pull
        assert_close(online, 0.5 * unguided, rtol=1e-10, atol=1e-12)
    else:  # only the rows inside the interval give it back
        assert (online - unguided).abs().min() > 1e-4 and (online - 0.5 * unguided).abs().min() > 1e-4


def test_balanced_loss_matches_float64_reference_in_value_and_gradient():
    torch.manual_seed(3)
    model = TinyVelocityNet((3,)).double()
    x, y, null_y = _data_with_dropped_labels(seed=3)
    loss_fn = TwinFlowLoss(guidance_scale=0.6, rectify_weight=1.0, balance_guidance_feedback=True)
    assert_matches_reference(loss_fn, model, x, y, null_y, seed=4, guidance=0.6, rectify_weight=1.0, distance=barron,
                             balance_feedback=True, setting="balance_feedback")


def test_balance_changes_nothing_on_a_batch_whose_labels_are_all_dropped():
    torch.manual_seed(4)
    model = TinyVelocityNet((3,)).double()
    x, y, null_y = _data_with_dropped_labels(seed=5)
    y_all_null = null_y.clone()  # every row dropped: nothing is guided, so nothing is weighed
    kwargs = dict(cond={"y": y_all_null}, uncond={"y": null_y})
    balanced = TwinFlowLoss(balance_guidance_feedback=True)(model, x, generator=torch.Generator().manual_seed(2),
                                                              **kwargs)
    plain = TwinFlowLoss()(model, x, generator=torch.Generator().manual_seed(2), **kwargs)
    assert_close(balanced.loss, plain.loss, rtol=0, atol=0)


def test_balance_accepts_a_teacher_that_follows_the_model():
    loss_fn = TwinFlowLoss(guidance_teacher=EMATeacher(target_decay=0.99), balance_guidance_feedback=True)
    assert loss_fn.balance_guidance_feedback


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"guidance_scale": 0.0}, "balance_guidance_feedback=True is given"),
        ({"guidance_scale": 1.0}, "guidance_scale must be < 1"),
        ({"guidance_difference": "data"}, "pass guidance_difference='teacher'"),
        ({"image_free": True}, "image_free=False"),
        ({"guidance_teacher": "frozen"}, "FrozenTeacher has fixed weights"),
    ],
)
def test_balance_refuses_a_configuration_without_feedback_to_balance(kwargs, match):
    kwargs = dict(kwargs)
    if kwargs.get("guidance_teacher") == "frozen":
        kwargs["guidance_teacher"] = FrozenTeacher(TinyVelocityNet((3,)))
    with pytest.raises(ValueError, match=match):
        TwinFlowLoss(balance_guidance_feedback=True, **kwargs)


def test_a_balance_that_is_not_a_bool_is_refused_naming_it():
    with pytest.raises((ValueError, TypeCheckError), match="balance_guidance_feedback"):  # the bool, under type checking
        TwinFlowLoss(balance_guidance_feedback="yes")
