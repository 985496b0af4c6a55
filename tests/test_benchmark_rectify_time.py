"""The laws of ``benchmarks/quality/rectify_time.py``: each variant is the default loss with its ``rectify_time``."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "quality"))
import balance  # noqa: E402
from common import BenchmarkLoss  # noqa: E402
import curves  # noqa: E402
import rectify_time  # noqa: E402

from twinloss.loss import RELEASED_GUIDANCE, default_shares  # noqa: E402

from default_loss import assert_default_loss_except, module_settings  # noqa: E402


def _median(law) -> float:
    return law(20001, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).median().item()


def test_the_laws_put_the_median_s_where_their_names_say():
    medians = {name: _median(law) for name, law in rectify_time.RECTIFY_TIMES.items()}
    assert medians["s uniform"] == pytest.approx(0.5, abs=0.02)
    assert medians["s mid"] == pytest.approx(0.5, abs=0.02)
    assert medians["s noisy"] == pytest.approx(3 / 4, abs=0.02)  # shift 3 maps the uniform median 1/2 to 3/4
    assert medians["s clean"] == pytest.approx(1 / 4, abs=0.02)
    assert medians["s cleaner"] == pytest.approx(1 / 10, abs=0.02)
    assert medians["s ends"] == pytest.approx(1 / 2, abs=0.02)
    ends = rectify_time.RECTIFY_TIMES["s ends"](20001, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert float(((ends - 0.5).abs() < 0.25).double().mean()) == pytest.approx(1 / 3, abs=0.02)  # arcsine: 1/3 inside


@pytest.mark.parametrize("name", sorted(rectify_time.VARIANTS))
def test_each_variant_is_the_default_loss_with_its_rectify_time_partition_and_guidance_only(name):
    setting, law, *partition = name.removeprefix("TwinFlow ").split(", ")
    loss = rectify_time.VARIANTS[name](None)
    assert isinstance(loss, BenchmarkLoss) and loss.rectify_time is rectify_time.RECTIFY_TIMES[law]
    assert loss.guidance_scale == {"w 0": 0.0, "defaults": 0.5}[setting]
    # without a named partition a variant keeps the equal quarters it was run with (the default with guidance;
    # without it, the default before the tenth round)
    shares = balance.BALANCES[partition[0] if partition else "equal quarters"]
    assert loss.trajectory.shares == shares
    moved = shares != default_shares(loss.guidance_scale, RELEASED_GUIDANCE["guidance_interval"])
    changed = ("rectify_time", *(("shares",) if moved else ()), *(("guidance_scale",) if setting == "w 0" else ()))
    assert_default_loss_except(loss, *changed)
    assert len({curves.slug(other) for other in rectify_time.VARIANTS}) == len(rectify_time.VARIANTS)


def test_each_law_runs_once_per_setting_and_partition_and_the_guided_default_is_left_to_curves():
    names = set(rectify_time.VARIANTS)
    for setting in balance.GUIDANCE:
        elsewhere = rectify_time.RUN_ELSEWHERE[setting]
        assert {f"TwinFlow {setting}, {law}" for law in rectify_time.RECTIFY_TIMES if law != elsewhere} < names
        assert f"TwinFlow {setting}, {elsewhere}" not in names
    guided_default = BenchmarkLoss().rectify_law(conditioned=True)  # curves.py's TwinFlow defaults
    named = rectify_time.RECTIFY_TIMES[rectify_time.RUN_ELSEWHERE["defaults"]]
    assert type(named) is type(guided_default) and module_settings(named) == module_settings(guided_default)
    unguided_quarters = balance.VARIANTS["TwinFlow w 0, equal quarters"](None)  # the unguided s uniform, quartered
    assert type(unguided_quarters.rectify_time) is type(rectify_time.RECTIFY_TIMES["s uniform"])
    assert "TwinFlow defaults, s uniform" in names and "TwinFlow w 0, s mid" in names


def test_the_unguided_default_is_s_clean_with_a_fake_eighth_on_a_conditioned_batch_and_s_uniform_without():
    default = BenchmarkLoss(guidance_scale=0.0)
    for conditioned, name in ((True, "TwinFlow w 0, s clean, fake share 1/8"),
                              (False, "TwinFlow w 0, s uniform, fake share 1/8")):
        pinned = rectify_time.VARIANTS[name](None)
        law, pinned_law = default.rectify_law(conditioned=conditioned), pinned.rectify_time
        assert type(law) is type(pinned_law) and module_settings(law) == module_settings(pinned_law)
        assert pinned.trajectory.shares == default.trajectory.shares
