"""The partitions of ``benchmarks/quality/balance.py``: each variant is the default loss with its shares and scale."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "quality"))
import balance  # noqa: E402
import curves  # noqa: E402

from twinloss import GroupShares, TwinFlowLoss  # noqa: E402


def test_the_paper_balance_gives_the_twin_groups_a_third_and_the_small_fake_share_an_eighth():
    third, eighth = balance.BALANCES["twin share 1/3"], balance.BALANCES["fake share 1/8"]
    assert third.one_step + third.fake == pytest.approx(1 / 3) and third.one_step == pytest.approx(third.fake)
    assert third.multi_step == pytest.approx(1 / 3) and third.any_step == pytest.approx(1 / 3)
    assert eighth.fake == pytest.approx(1 / 8)
    assert eighth.one_step == eighth.multi_step == eighth.any_step == pytest.approx(7 / 24)


@pytest.mark.parametrize("name", sorted(balance.VARIANTS))
def test_each_variant_is_the_default_loss_with_its_partition_and_guidance_only(name):
    setting, partition = name.removeprefix("TwinFlow ").split(", ")
    loss, default = balance.VARIANTS[name](None), TwinFlowLoss()
    assert isinstance(loss, TwinFlowLoss) and loss.trajectory.shares == balance.BALANCES[partition]
    assert loss.trajectory.shares != GroupShares()  # never the default partition
    assert loss.guidance_scale == {"w 0": 0.0, "defaults": 0.5}[setting]
    unchanged = ("estimate_order", "estimate_step", "residual_clamp", "guidance_interval", "guidance_groups",
                 "image_free", "rectify_weight", "rectify_clamp", "rectify_field")
    assert {key: getattr(loss, key) for key in unchanged} == {key: getattr(default, key) for key in unchanged}
    for part in ("distance", "time_weight"):  # modules: the same class with the same settings
        mine, theirs = getattr(loss, part), getattr(default, part)
        assert type(mine) is type(theirs) and mine.extra_repr() == theirs.extra_repr()
        assert {k: v for k, v in vars(mine).items() if not k.startswith("_")} == {
            k: v for k, v in vars(theirs).items() if not k.startswith("_")}
    assert len({curves.slug(other) for other in balance.VARIANTS}) == len(balance.VARIANTS)
