"""Group partition and per-group times."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from twinloss import GroupShares, Trajectory, TrajectorySampler
from twinloss.trajectory import GROUPS


def test_default_shares_are_equal_and_count_exactly():
    assert GroupShares().counts(8) == {name: 2 for name in GROUPS}
    assert GroupShares().counts(10) == {"one_step": 3, "multi_step": 3, "any_step": 2, "fake": 2}
    assert GroupShares().min_batch_size() == 4


def test_equal_remainders_go_to_the_smaller_share_first_so_a_small_group_is_not_starved():
    eighth = GroupShares(7 / 24, 7 / 24, 7 / 24, 1 / 8)
    # at 6 rows every quota's remainder is 3/4 (1.75 three times, 0.75): the fake group, the smallest, goes first
    assert eighth.counts(6) == {"one_step": 2, "multi_step": 2, "any_step": 1, "fake": 1}
    # float rounding does not break a tie: the float 7/24 is above 7/24, yet 54 rows tie at 3/4 as 6 do
    assert eighth.counts(54) == {"one_step": 16, "multi_step": 16, "any_step": 15, "fake": 7}
    assert eighth.min_batch_size() == 4 and all(eighth.counts(n)["fake"] >= 1 for n in range(4, 64))
    # unequal remainders still decide first: at 128 rows the real groups' 1/3 beats the fake group's 0
    assert eighth.counts(128) == {"one_step": 38, "multi_step": 37, "any_step": 37, "fake": 16}
    # equal shares keep the group order: one-step and fake both have 1.5 rows of 9, one-step goes first
    assert GroupShares.from_twin_share(1 / 3).counts(9) == {"one_step": 2, "multi_step": 3, "any_step": 3, "fake": 1}


def test_twin_share_is_the_papers_lambda():
    shares = GroupShares.from_twin_share(1 / 3)
    assert shares.one_step + shares.fake == pytest.approx(1 / 3)
    assert shares.multi_step == shares.any_step == pytest.approx(1 / 3)
    assert GroupShares.from_twin_share(0.5) == GroupShares()


def test_batch_too_small_is_an_explicit_error():
    with pytest.raises(ValueError, match=r"batch_size=3 is too small.*at least 4"):
        GroupShares().counts(3)
    with pytest.raises(ValueError, match=r"batch_size=4.*\['any_step', 'fake'\].*at least 8"):
        GroupShares(0.7, 0.1, 0.1, 0.1).counts(4)


@pytest.mark.parametrize(
    "kwargs,name",
    [({"fake": -0.1, "one_step": 0.35}, "shares.fake"), ({"one_step": 0.5}, "sum to 1")],
)
def test_invalid_shares(kwargs, name):
    with pytest.raises(ValueError, match=name):
        GroupShares(**kwargs)


@settings(max_examples=60, deadline=None)
@given(
    weights=st.lists(st.integers(0, 5), min_size=4, max_size=4).filter(lambda w: sum(w) > 0),
    batch=st.integers(1, 64),
)
def test_counts_sum_to_batch_or_raise(weights, batch):
    total = sum(weights)
    shares = GroupShares(*(w / total for w in weights))
    try:
        counts = shares.counts(batch)
    except ValueError:
        assert batch < shares.min_batch_size()
        return
    assert sum(counts.values()) == batch
    for name, share in shares.as_dict().items():
        assert abs(counts[name] - share * batch) < 1  # largest-remainder rounding
        assert (counts[name] > 0) == (share > 0) or share * batch >= 1


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(4, 80), seed=st.integers(0, 2**16), gap=st.floats(0.0, 1.0))
def test_times_of_each_group(batch, seed, gap):
    traj = TrajectorySampler(multi_step_gap=gap)(batch, generator=torch.Generator().manual_seed(seed))
    t, r, g = traj.t, traj.r, traj.groups
    assert t.shape == r.shape == (batch,)
    assert bool((t[g["one_step"]] == 1).all()) and bool((r[g["one_step"]] == 0).all())
    multi_t, multi_r = t[g["multi_step"]], r[g["multi_step"]]
    assert bool((multi_r <= multi_t).all()) and bool((multi_t - multi_r <= gap * multi_t + 1e-6).all())
    any_t, any_r = t[g["any_step"]], r[g["any_step"]]
    assert bool((0 <= any_r).all()) and bool((any_r <= any_t).all())
    fake_t, fake_r = t[g["fake"]], r[g["fake"]]
    assert bool((fake_t <= 0).all()) and torch.equal(fake_t, fake_r)
    assert bool((t.abs() <= 1).all())
    assert [traj.size(name) for name in GROUPS] == list(GroupShares().counts(batch).values())


def test_zero_gap_gives_r_equal_t():
    traj = TrajectorySampler(shares=GroupShares(0.0, 1.0, 0.0, 0.0), multi_step_gap=0.0)(16)
    assert torch.equal(traj.t, traj.r)


def test_bad_gap():
    with pytest.raises(ValueError, match="multi_step_gap"):
        TrajectorySampler(multi_step_gap=1.5)


def test_rows_of_groups_do_not_depend_on_group_order():
    t = torch.zeros(10)
    ordered = Trajectory(t=t, r=t, groups={"one_step": slice(0, 3), "multi_step": slice(3, 6),
                                            "any_step": slice(6, 8), "fake": slice(8, 10)})
    assert ordered.rows("one_step", "multi_step", "any_step") == slice(0, 8)
    assert ordered.rows("fake") == slice(8, 10)
    shuffled = Trajectory(t=t, r=t, groups={"fake": slice(0, 2), "any_step": slice(2, 4),
                                             "one_step": slice(4, 7), "multi_step": slice(7, 10)})
    assert shuffled.rows("one_step", "multi_step", "any_step") == slice(2, 10)
    assert torch.equal(shuffled.rows("fake", "one_step"), torch.tensor([0, 1, 4, 5, 6]))
    assert shuffled.count("fake", "one_step") == 5
    empty = Trajectory(t=t, r=t, groups={"one_step": slice(0, 0), "fake": slice(0, 10)})
    assert torch.arange(10)[empty.rows("one_step")].numel() == 0
    with pytest.raises(ValueError, match="^names must be groups"):
        ordered.rows("real")
