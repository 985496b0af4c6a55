"""The partitions of ``benchmarks/quality/balance.py``: each variant is the default loss with its shares and scale."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "quality"))
import balance  # noqa: E402
import curves  # noqa: E402

from twinloss import TwinFlowLoss  # noqa: E402

from default_loss import assert_default_loss_except  # noqa: E402


def test_the_paper_balance_gives_the_twin_groups_a_third_and_the_small_fake_share_an_eighth():
    third, eighth = balance.BALANCES["twin share 1/3"], balance.BALANCES["fake share 1/8"]
    assert third.one_step + third.fake == pytest.approx(1 / 3) and third.one_step == pytest.approx(third.fake)
    assert third.multi_step == pytest.approx(1 / 3) and third.any_step == pytest.approx(1 / 3)
    assert eighth.fake == pytest.approx(1 / 8)
    assert eighth.one_step == eighth.multi_step == eighth.any_step == pytest.approx(7 / 24)


@pytest.mark.parametrize("name", sorted(balance.VARIANTS))
def test_each_variant_is_the_default_loss_with_its_partition_and_guidance_only(name):
    setting, partition = name.removeprefix("TwinFlow ").split(", ")
    loss = balance.VARIANTS[name](None)
    assert isinstance(loss, TwinFlowLoss) and loss.trajectory.shares == balance.BALANCES[partition]
    assert loss.guidance_scale == {"w 0": 0.0, "defaults": 0.5}[setting]
    assert_default_loss_except(loss, "shares", *(("guidance_scale",) if setting == "w 0" else ()))
    assert len({curves.slug(other) for other in balance.VARIANTS}) == len(balance.VARIANTS)
