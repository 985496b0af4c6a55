"""The partitions of ``benchmarks/quality/balance.py``: each variant is the default loss with its shares and scale."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "quality"))
import balance  # noqa: E402
from common import BenchmarkLoss  # noqa: E402
import curves  # noqa: E402

from twinloss import BetaTime, GroupShares  # noqa: E402
from twinloss.loss import RELEASED_GUIDANCE, default_shares  # noqa: E402

from default_loss import assert_default_loss_except, module_settings  # noqa: E402


def test_the_partitions_give_the_shares_their_names_say():
    third, eighth = balance.BALANCES["twin share 1/3"], balance.BALANCES["fake share 1/8"]
    sixteenth = balance.BALANCES["fake share 1/16"]
    assert third.one_step + third.fake == pytest.approx(1 / 3) and third.one_step == pytest.approx(third.fake)
    assert third.multi_step == pytest.approx(1 / 3) and third.any_step == pytest.approx(1 / 3)
    assert eighth.fake == pytest.approx(1 / 8)
    assert eighth.one_step == eighth.multi_step == eighth.any_step == pytest.approx(7 / 24)
    assert sixteenth.fake == pytest.approx(1 / 16)
    assert sixteenth.one_step == sixteenth.multi_step == sixteenth.any_step == pytest.approx(5 / 16)
    assert balance.BALANCES["equal quarters"] == GroupShares(0.25, 0.25, 0.25, 0.25)


@pytest.mark.parametrize("name", sorted(balance.VARIANTS))
def test_each_variant_is_the_default_loss_with_its_partition_guidance_and_rectify_weight_only(name):
    setting, partition, *weight = name.removeprefix("TwinFlow ").split(", ")
    loss = balance.VARIANTS[name](None)
    scale = {"w 0": 0.0, "defaults": 0.5}[setting]
    assert isinstance(loss, BenchmarkLoss) and loss.trajectory.shares == balance.BALANCES[partition]
    assert loss.guidance_scale == scale
    assert loss.rectify_weight == (float(weight[0].removeprefix("rectify weight ")) if weight else 0.5)
    # a partition alone is a variant only where it is not the default; with a lighter rectification it may be
    moved = loss.trajectory.shares != default_shares(scale, RELEASED_GUIDANCE["guidance_interval"])
    assert moved or weight
    # the uniform s the stored runs used is written out: without guidance (the unguided default until the
    # twelfth round), and with it for the partitions whose every run predates the eighth round's guided law
    unguided = setting == "w 0"
    uniform = unguided or partition in balance.GUIDED_UNIFORM_S
    changed = (*(("shares",) if moved else ()), *(("guidance_scale",) if unguided else ()),
               *(("rectify_time",) if uniform else ()), *(("rectify_weight",) if weight else ()))
    assert_default_loss_except(loss, *changed)
    if uniform:
        assert type(loss.rectify_time) is BetaTime and module_settings(loss.rectify_time) == {"alpha": 1, "beta": 1}
    assert len({curves.slug(other) for other in balance.VARIANTS}) == len(balance.VARIANTS)


def test_the_partition_that_is_the_default_at_a_guidance_setting_is_left_to_curves_default_runs():
    assert "TwinFlow w 0, fake share 1/8" not in balance.VARIANTS  # the unguided default since the tenth round
    assert "TwinFlow defaults, equal quarters" not in balance.VARIANTS  # the guided default
    assert {"TwinFlow w 0, equal quarters", "TwinFlow defaults, fake share 1/8"} < set(balance.VARIANTS)
    assert curves.METHODS["TwinFlow w 0"](None).shares == balance.BALANCES["fake share 1/8"]
    assert curves.METHODS["TwinFlow defaults"](None).shares == balance.BALANCES["equal quarters"]
