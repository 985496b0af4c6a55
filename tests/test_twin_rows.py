"""TwinFlowLoss(twin_rows="conditioned"): the twin terms keep off the rows whose conditioning is the null one."""

import pytest
import torch
from jaxtyping import TypeCheckError
from torch import nn
from torch.testing import assert_close

from twinloss import GroupShares, TwinFlowLoss

from core_models import TinyVelocityNet
from reference import barron
from test_guidance_difference import _data_with_dropped_labels, assert_matches_reference

ONE_STEP_AND_FAKE = GroupShares(one_step=0.5, multi_step=0.0, any_step=0.0, fake=0.5)


class NullOffsetModel(nn.Module):
    """``TinyVelocityNet`` plus a learnable offset on the null-labelled rows where ``where(t, r)`` holds: a handle on
    one part of the unconditional field alone."""

    def __init__(self, null_label: int, where):
        super().__init__()
        self.net = TinyVelocityNet((3,)).double()
        self.offset = nn.Parameter(torch.zeros(3, dtype=torch.float64))
        self.null_label = null_label
        self.where = where

    def forward(self, x_t, t, r, y):
        chosen = ((y == self.null_label) & self.where(t, r)).to(x_t.dtype).unsqueeze(1)
        return self.net(x_t, t, r, y=y) + chosen * self.offset


def _offset_gradient(where, **settings):
    """The loss's gradient on the null rows' offset, on a batch with a third of its labels dropped."""
    torch.manual_seed(0)
    x, y, null_y = _data_with_dropped_labels(batch=24, seed=1)
    model = NullOffsetModel(int(null_y[0]), where)
    loss_fn = TwinFlowLoss(shares=ONE_STEP_AND_FAKE, **settings)
    out = loss_fn(model, x, cond={"y": y}, uncond={"y": null_y}, generator=torch.Generator().manual_seed(5))
    (gradient,) = torch.autograd.grad(out.loss, [model.offset])
    return gradient


def test_the_fake_rows_do_not_train_the_unconditional_fake_field():
    def fake_field(t, r):
        return t < 0

    assert _offset_gradient(fake_field).abs().min() > 1e-6  # the authors' recipe trains it
    assert_close(_offset_gradient(fake_field, twin_rows="conditioned"), torch.zeros(3, dtype=torch.float64),
                 rtol=0, atol=0)


def test_the_rectification_does_not_push_the_unconditional_one_step_map():
    def one_step_map(t, r):
        return (t == 1) & (r == 0)

    base_alone = _offset_gradient(one_step_map, rectify_weight=0.0)  # the one-step rows' base term
    assert (_offset_gradient(one_step_map) - base_alone).abs().min() > 1e-6
    assert_close(_offset_gradient(one_step_map, twin_rows="conditioned"), base_alone, rtol=0, atol=0)


def test_conditioned_twin_rows_match_float64_reference_in_value_and_gradient():
    torch.manual_seed(3)
    model = TinyVelocityNet((3,)).double()
    x, y, null_y = _data_with_dropped_labels(seed=3)
    loss_fn = TwinFlowLoss(guidance_scale=0.6, rectify_weight=1.0, twin_rows="conditioned")
    assert_matches_reference(loss_fn, model, x, y, null_y, seed=4, guidance=0.6, rectify_weight=1.0, distance=barron,
                             twin_rows="conditioned", setting="twin_rows")


@pytest.mark.parametrize("fake_rows", ["from_batch", "added"])
def test_conditioned_twin_rows_change_nothing_on_a_batch_with_every_label(fake_rows):
    torch.manual_seed(4)
    model = TinyVelocityNet((3,)).double()
    x, y, null_y = _data_with_dropped_labels(seed=5)
    y_all = torch.where(y == null_y, torch.zeros_like(y), y)  # no label dropped: every row is conditioned
    kwargs = dict(cond={"y": y_all}, uncond={"y": null_y})
    selected = TwinFlowLoss(twin_rows="conditioned", fake_rows=fake_rows)(
        model, x, generator=torch.Generator().manual_seed(2), **kwargs)
    plain = TwinFlowLoss(fake_rows=fake_rows)(model, x, generator=torch.Generator().manual_seed(2), **kwargs)
    assert_close(selected.loss, plain.loss, rtol=0, atol=0)


def test_conditioned_twin_rows_on_a_batch_with_every_label_dropped_leave_the_base_terms_alone():
    torch.manual_seed(4)
    model = TinyVelocityNet((3,)).double()
    x, _, null_y = _data_with_dropped_labels(seed=5)
    out = TwinFlowLoss(twin_rows="conditioned")(model, x, cond={"y": null_y.clone()}, uncond={"y": null_y},
                                                generator=torch.Generator().manual_seed(2))
    assert out.terms["adv"] == 0 and out.terms["rectify"] == 0
    assert_close(out.loss, out.terms["base"], rtol=0, atol=0)
    assert out.terms["base"] > 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"guidance_scale": 0.0}, "guidance_scale=0 runs no guidance pass"),
        ({"image_free": True}, "pass image_free=False"),
        ({"shares": GroupShares(one_step=0.5, multi_step=0.25, any_step=0.25, fake=0.0), "rectify_weight": 0.0},
         "this loss has none"),
    ],
)
def test_twin_rows_refuses_a_configuration_it_cannot_honour(kwargs, match):
    kwargs = {"twin_rows": "conditioned", **kwargs}
    with pytest.raises(ValueError, match=match):
        TwinFlowLoss(**kwargs)


def test_an_unknown_twin_rows_is_refused_naming_it():
    with pytest.raises((ValueError, TypeCheckError), match="twin_rows"):  # the Literal, under type checking
        TwinFlowLoss(twin_rows="labelled")


@pytest.mark.parametrize(("factory", "match"), [(TwinFlowLoss.rcgm, "twin_rows belongs to the twin terms"),
                                                 (TwinFlowLoss.plain_flow_matching, "twin_rows is fixed")])
def test_factories_without_twin_terms_refuse_twin_rows_naming_it(factory, match):
    with pytest.raises(ValueError, match=match):
        factory(twin_rows="conditioned")
