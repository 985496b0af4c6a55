"""``fake_rows="added"``: every row of ``x`` trained on, the fake rows appended after them."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from jaxtyping import TypeCheckError

from twinloss import GroupShares, TrajectorySampler, TwinFlowLoss
from twinloss.loss import UNGUIDED_SHARES

from core_models import TinyVelocityNet

CLASSES = 4


def _batch(rows: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 3, dtype=torch.float64, generator=g)
    y = torch.randint(0, CLASSES, (rows,), generator=g)
    return x, {"y": y}, {"y": torch.full_like(y, CLASSES)}


def _model(seed: int = 0) -> TinyVelocityNet:
    torch.manual_seed(seed)
    model = TinyVelocityNet((3,), num_classes=CLASSES).double()
    with torch.no_grad():  # move the zero-initialised sign and target-time embeddings too
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def _step(loss_fn, model, x, cond, uncond, seed=7):
    model.zero_grad(set_to_none=True)
    out = loss_fn(model, x, cond=cond, uncond=uncond, generator=torch.Generator().manual_seed(seed))
    out.loss.backward()
    return out, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize(("guidance", "shares", "batch", "added"), [
    (0.5, GroupShares(), 12, 4),  # thirds of 12 and 4 fake rows: the quarters of 16
    (0.0, UNGUIDED_SHARES, 21, 3),  # 7 + 7 + 7 and 3: 7/24, 7/24, 7/24, 1/8 of 24
])
def test_added_fake_rows_are_the_partitioned_step_on_the_batch_with_its_first_rows_appended(
        guidance, shares, batch, added):
    x, cond, uncond = _batch(batch)
    kept = x.clone(), cond["y"].clone()
    loss_added = TwinFlowLoss(guidance_scale=guidance, shares=shares, fake_rows="added")
    loss_partitioned = TwinFlowLoss(guidance_scale=guidance, shares=shares)
    assert loss_added.trajectory.added_rows(batch) == added
    assert loss_added.trajectory.counts(batch) == shares.counts(batch + added)

    def appended(c):
        return {"y": torch.cat([c["y"], c["y"][:added]])}

    model = _model()
    out, grads = _step(loss_added, model, x, cond, uncond)
    # the fake rows' data is replaced by samples, so any rows stand in for it in the partitioned batch
    expected, expected_grads = _step(loss_partitioned, model, torch.cat([x, torch.zeros_like(x[:added])]),
                                     appended(cond), appended(uncond))
    assert torch.equal(out.loss, expected.loss)
    assert out.terms.keys() == expected.terms.keys()
    assert all(torch.equal(out.terms[name], expected.terms[name]) for name in out.terms)
    assert all(torch.equal(a, b) for a, b in zip(grads, expected_grads, strict=True))
    assert out.grad_sample_evaluations == batch + added
    assert torch.equal(x, kept[0]) and torch.equal(cond["y"], kept[1]) and cond["y"].shape == (batch,)


@pytest.mark.parametrize("fake_rows", ["from_batch", "added"])
def test_only_added_fake_rows_train_on_every_row_of_x(fake_rows):
    batch = 12
    x, cond, uncond = _batch(batch)
    # a one-step row reads its data only through the RCGM residual, which the default clamp can saturate
    loss_fn = TwinFlowLoss(fake_rows=fake_rows, residual_clamp=1e3)
    model = _model()
    base = _step(loss_fn, model, x, cond, uncond)[0].loss
    fake = loss_fn.trajectory.counts(batch)["fake"]
    for row in range(batch):
        moved = x.clone()
        moved[row] += 1.0
        changed = not torch.equal(_step(loss_fn, model, moved, cond, uncond)[0].loss, base)
        thrown_away = fake_rows == "from_batch" and row >= batch - fake
        assert changed != thrown_away, (fake_rows, row)


@settings(max_examples=60, deadline=None)
@given(shares=st.lists(st.integers(0, 12), min_size=3, max_size=3).filter(any),
       fake=st.integers(1, 12), batch=st.integers(1, 200))
def test_added_counts_split_x_by_the_real_shares_and_add_the_fake_ratio(shares, fake, batch):
    total = sum(shares) + fake
    split = GroupShares(*(share / total for share in shares), fake=fake / total)
    sampler = TrajectorySampler(shares=split, fake_rows="added")
    f = fake / total
    added = math.floor(batch * f / (1 - f) + 0.5)
    assert sampler.added_rows(batch) == added
    smallest = sampler.min_batch_size()
    if batch >= smallest:
        counts = sampler.counts(batch)
        assert counts == {**split.without_fake().counts(batch), "fake": added}
        traj = sampler(batch, generator=torch.Generator().manual_seed(0))
        assert traj.t.shape == (batch + added,) and traj.groups["fake"] == slice(batch, batch + added)
        assert bool((traj.t[batch:] < 0).all()) and bool((traj.t[:batch] > 0).all())
    if smallest > 1:
        with pytest.raises(ValueError, match="batch"):
            sampler.counts(smallest - 1)


def test_added_fake_rows_from_a_batch_smaller_than_the_fake_ratio_cycle_through_its_conditions():
    loss_fn = TwinFlowLoss(shares=GroupShares(0.1, 0.1, 0.1, 0.7), fake_rows="added")
    x, cond, uncond = _batch(3)
    assert loss_fn.trajectory.counts(3) == {"one_step": 1, "multi_step": 1, "any_step": 1, "fake": 7}
    seen = []
    model = _model()
    handle = model.register_forward_hook(lambda module, args, kwargs, out: seen.append(kwargs.get("y")),
                                         with_kwargs=True)
    try:
        loss_fn(model, x, cond=cond, uncond=uncond, generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    fake_pass = seen[0]  # the first call makes the fake samples
    assert torch.equal(fake_pass, cond["y"][torch.arange(7) % 3])


def test_an_unknown_fake_rows_is_refused_by_the_sampler_and_by_the_loss_signature():
    with pytest.raises(ValueError, match="fake_rows must be one of"):
        TrajectorySampler(fake_rows="appended")
    with pytest.raises(TypeCheckError, match="Literal"):
        TwinFlowLoss(fake_rows="appended")


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"fake_rows": "added", "shares": GroupShares(1 / 3, 1 / 3, 1 / 3, 0.0), "rectify_weight": 0.0},
     "fake_rows='added'.*shares.fake"),
    ({"fake_rows": "added", "image_free": True}, "fake_rows='added'.*image_free"),
])
def test_fake_rows_that_cannot_be_honoured_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TwinFlowLoss(**kwargs)


def test_rcgm_refuses_added_fake_rows_it_has_none_of():
    with pytest.raises(ValueError, match="fake_rows='added'"):
        TwinFlowLoss.rcgm(fake_rows="added")


def test_a_batch_too_small_to_add_a_fake_row_is_refused_naming_the_smallest():
    loss_fn = TwinFlowLoss(guidance_scale=0.0, fake_rows="added")  # fake 1/8: one added row from 4 rows of x on
    assert loss_fn.min_batch_size == 4
    x, cond, _ = _batch(3)
    with pytest.raises(ValueError, match="at least 4"):
        loss_fn(_model(), x, cond=cond)
