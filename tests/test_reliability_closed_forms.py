"""Closed forms where loops were, and time distributions that cannot return NaN (issue 13)."""

import math
import random
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from twinloss import BetaTime, KumaraswamyTime, LogitNormalTime, ShiftedTime
from twinloss.time_distributions import MIN_BETA_CONCENTRATION
from twinloss.trajectory import GroupShares


def _walk_from_the_top(shares: GroupShares) -> int:
    """The definition, walked the long way: from max ceil(1 / share) down while every size works."""
    positive = [share for share in shares.as_dict().values() if share > 0]
    batch = max(math.ceil(1 / share - 1e-9) for share in positive)
    while batch > 1 and not shares._starved(shares._round(batch - 1)):
        batch -= 1
    return batch


def _random_shares(rng: random.Random) -> GroupShares | None:
    style = rng.randrange(3)
    if style == 0:
        weights = [rng.random() for _ in range(4)]
    elif style == 1:
        weights = [rng.random() ** 4 for _ in range(4)]
    else:
        weights = [rng.choice([0.0, 1.0, rng.random(), 1e-3 * rng.random()]) for _ in range(4)]
    if sum(weights) == 0:
        return None
    weights = [w / sum(weights) for w in weights]
    if max(math.ceil(1 / w) for w in weights if w > 0) > 1500:  # keeps the long walk of the reference fast
        return None
    try:
        return GroupShares(*weights)
    except ValueError:
        return None


def test_min_batch_size_matches_the_walk_from_the_top_on_random_shares():
    rng = random.Random(13)
    checked = 0
    while checked < 300:
        shares = _random_shares(rng)
        if shares is None:
            continue
        assert shares.min_batch_size() == _walk_from_the_top(shares), shares
        checked += 1


@pytest.mark.parametrize(
    "shares",
    [GroupShares(), GroupShares.from_twin_share(1 / 3), GroupShares(1 / 16, 5 / 16, 5 / 16, 5 / 16)],
    ids=["quarters", "twin-third", "1-5-5-5"],
)
def test_min_batch_size_of_the_usual_shares_is_unchanged(shares):
    assert shares.min_batch_size() == _walk_from_the_top(shares)


@pytest.mark.parametrize("tiny", [1e-7, 1e-9])
def test_a_tiny_share_is_sized_instantly_and_every_larger_batch_works(tiny):
    rest = (1 - tiny) / 3
    shares = GroupShares(tiny, rest, rest, 1 - tiny - 2 * rest)
    start = time.perf_counter()
    size = shares.min_batch_size()
    assert time.perf_counter() - start < 0.1
    assert size == pytest.approx(0.75 / tiny, rel=1e-6)
    for batch in range(size, size + 200):
        assert not shares._starved(shares._round(batch))
    assert shares._starved(shares._round(size - 1))


def test_several_tiny_shares_are_sized_instantly_with_every_larger_batch_working():
    shares = GroupShares(1e-9, 2e-9, 3e-9, 1 - 6e-9)
    start = time.perf_counter()
    size = shares.min_batch_size()
    assert time.perf_counter() - start < 0.5
    for batch in range(size, size + 200):
        assert not shares._starved(shares._round(batch))


def test_beta_with_tiny_concentrations_gives_no_nan_and_keeps_its_mean():
    draws = BetaTime(1e-3, 1e-3)(20000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(draws).all() and bool(((draws >= 0) & (draws <= 1)).all())
    # Beta(a, a): mass 1/2 at each end as a -> 0; mean 1/2
    assert abs(float(draws.mean()) - 0.5) < 0.02
    assert float(((draws < 1e-6) | (draws > 1 - 1e-6)).double().mean()) > 0.95


def test_logit_normal_refuses_a_mean_or_std_beyond_1e30():
    with pytest.raises(ValueError, match=r"mean must be a number in \[-1e30, 1e30\]"):
        LogitNormalTime(1e308, 1e308)
    with pytest.raises(ValueError, match=r"std must be a number in \(0, 1e30\]"):
        LogitNormalTime(0.0, 1e31)


def test_beta_refuses_concentrations_whose_log_gamma_overflows():
    with pytest.raises(ValueError, match="alpha must be >= 1e-300"):
        BetaTime(1e-310, 1.0)
    BetaTime(MIN_BETA_CONCENTRATION, MIN_BETA_CONCENTRATION)(16)  # the bound itself is accepted


@settings(max_examples=25, deadline=None)
@given(
    family=st.sampled_from(["beta", "logit_normal", "shifted", "kumaraswamy"]),
    p1=st.floats(min_value=1e-300, max_value=1e300),
    p2=st.floats(min_value=1e-300, max_value=1e300),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
)
def test_no_accepted_parameter_gives_a_nan_time(family, p1, p2, dtype):
    dist = {
        "beta": lambda: BetaTime(p1, p2),
        "logit_normal": lambda: LogitNormalTime(min(p1, 1e30) if p2 > 1 else -min(p1, 1e30), min(p2, 1e30)),
        "shifted": lambda: ShiftedTime(p1, LogitNormalTime(0.0, min(p2, 1e30))),
        "kumaraswamy": lambda: KumaraswamyTime(p1, p2, p1),
    }[family]()
    t = dist(64, dtype=dtype, generator=torch.Generator().manual_seed(0))
    assert t.dtype == dtype and not torch.isnan(t).any()
    assert bool(((t >= 0) & (t <= 1)).all())
