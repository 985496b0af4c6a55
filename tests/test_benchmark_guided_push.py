"""The variants of ``benchmarks/quality/guided_push.py``: the default loss with one setting of the twin terms changed."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "quality"))
import curves  # noqa: E402
import guided_push  # noqa: E402

from twinloss import BarronDistance, L2Distance, LogitNormalTime, ShiftedTime, TwinFlowLoss  # noqa: E402
from twinloss.trajectory import TrajectorySampler  # noqa: E402

from default_loss import assert_default_loss_except  # noqa: E402

CHANGED = {
    "TwinFlow defaults, l2 rectification weight 2": ("rectify_distance", "rectify_weight"),
    "TwinFlow defaults, rectify weight 0.25": ("rectify_weight",),
    "TwinFlow defaults, no rectification": ("rectify_weight",),
    "TwinFlow defaults, fake times from s": (),
    "TwinFlow w 0, fake times from s": ("guidance_scale",),
}


@pytest.mark.parametrize("name", sorted(guided_push.VARIANTS))
def test_each_variant_is_the_default_loss_with_only_the_settings_its_name_gives(name):
    loss = guided_push.VARIANTS[name](None)
    assert isinstance(loss, TwinFlowLoss)
    assert loss.guidance_scale == (0.0 if name.startswith("TwinFlow w 0,") else 0.5)
    assert_default_loss_except(loss, *CHANGED[name])
    if "l2" in name:
        assert isinstance(loss.rectify_distance, L2Distance) and loss.rectify_weight == 2.0
    else:
        assert isinstance(loss.rectify_distance, BarronDistance)
    expected_weight = {"rectify weight 0.25": 0.25, "no rectification": 0.0, "l2": 2.0}
    assert loss.rectify_weight == next((w for key, w in expected_weight.items() if key in name), 0.5)
    assert isinstance(loss.trajectory, guided_push.FakeTimesFrom) == ("fake times" in name)
    assert len({curves.slug(other) for other in guided_push.VARIANTS}) == len(guided_push.VARIANTS)
    assert not set(map(curves.slug, guided_push.VARIANTS)) & set(map(curves.slug, curves.METHODS))


@pytest.mark.parametrize(("scale", "law"), [(0.5, LogitNormalTime), (0.0, ShiftedTime)])
def test_fake_times_follow_the_conditioned_law_of_s_and_leave_every_other_row_as_the_default_draws_it(scale, law):
    loss = guided_push.fake_times_from_rectify_law(scale)
    assert isinstance(loss.trajectory.fake_law, law) and loss.trajectory.fake_law is loss.rectify_law(conditioned=True)
    plain = TrajectorySampler(shares=loss.trajectory.shares)
    batch, seed = 48, 3
    drawn = loss.trajectory(batch, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    default = plain(batch, generator=generator, dtype=torch.float32)
    fake = drawn.groups["fake"]
    expected = -loss.rectify_law(conditioned=True)(fake.stop - fake.start, generator=generator)  # drawn next
    assert drawn.groups == default.groups
    assert torch.equal(drawn.t[fake], expected) and torch.equal(drawn.r[fake], expected)
    rest = torch.ones(batch, dtype=torch.bool)
    rest[fake] = False
    assert torch.equal(drawn.t[rest], default.t[rest]) and torch.equal(drawn.r[rest], default.r[rest])
