"""The ring's class splits along a fine-tune (``benchmarks/quality/mode_split.py``)."""

import json
import statistics
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "quality"))
import mode_split  # noqa: E402
import run  # noqa: E402

from twinloss import toy  # noqa: E402


def test_class_splits_read_the_share_of_each_class_in_its_first_mode():
    centers = toy.ring_centers(run.RING_MODES)
    # class 0: 7 points at mode 0, 3 at mode 4, 2 at mode 1 (class 1's); class 1..3: 5 and 5
    modes = [0] * 7 + [4] * 3 + [1] * 2
    labels = [0] * 12
    for c in range(1, run.RING_CLASSES):
        modes += [c] * 5 + [c + run.RING_CLASSES] * 5
        labels += [c] * 10
    samples = centers[torch.tensor(modes)] + 0.01 * torch.randn(len(modes), 2, generator=torch.Generator().manual_seed(0))
    read = mode_split.class_splits(samples, torch.tensor(labels))
    assert read["split"] == [0.7, 0.5, 0.5, 0.5]
    assert read["leak"] == pytest.approx([2 / 12, 0.0, 0.0, 0.0])


def test_class_splits_refuse_a_class_with_no_sample_in_its_own_modes():
    centers = toy.ring_centers(run.RING_MODES)
    samples = centers[torch.tensor([1, 1, 1, 5, 2, 6, 3, 7])]
    with pytest.raises(ValueError, match="class 0"):
        mode_split.class_splits(samples, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))


def test_summary_averages_the_deviation_past_1x_and_correlates_one_step_with_ode():
    def row(step, raw, power=None, ode=None):
        out = {"step": step, "raw": {"split": raw}}
        out |= {"power": {"split": power}} if power else {}
        return out | ({"ode": {"split": ode}} if ode else {})

    rows = [row(0, [0.9, 0.9], ode=[0.1, 0.1]),  # before `after`: ignored
            row(4, [0.6, 0.45], [0.55, 0.5], ode=[0.62, 0.44]),
            row(8, [0.3, 0.5], [0.4, 0.5], ode=[0.35, 0.5])]
    read = mode_split.summary(rows, after=2)
    assert read["deviation/raw"] == pytest.approx((0.1 + 0.05 + 0.2 + 0.0) / 4)
    assert read["deviation/power"] == pytest.approx((0.05 + 0.0 + 0.1 + 0.0) / 4)
    assert read["deviation/ode"] == pytest.approx((0.12 + 0.06 + 0.15 + 0.0) / 4)
    expected = statistics.correlation([0.1, -0.05, -0.2, 0.0], [0.12, -0.06, -0.15, 0.0])
    assert read["one_step_ode_correlation"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="after=8"):
        mode_split.summary(rows, after=8)


def test_a_quick_run_writes_every_checkpoint_with_the_ode_where_asked(tmp_path):
    mode_split.main(["--quick", "--methods", "RCGM only w 0", "--every", "2", "--ode-every", "4",
                     "--out", str(tmp_path)])
    report = json.loads((tmp_path / "ring_split_seed0_rcgm-only-w-0_quick.json").read_text())
    steps = [row["step"] for row in report["rows"]]
    assert steps == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24]  # quick budget 8: 3x is 24 steps
    assert [row["step"] for row in report["rows"] if "ode" in row] == [0, 4, 8, 12, 16, 20, 24]
    assert "power" not in report["rows"][0] and all("power" in row for row in report["rows"][1:])
    assert set(report["summary"]) == {"deviation/raw", "deviation/power", "deviation/ode", "one_step_ode_correlation"}


@pytest.mark.parametrize("option", ["--every", "--ode-every"])
def test_the_command_line_refuses_a_reading_interval_below_one_step(option):
    with pytest.raises(ValueError, match=option):
        mode_split.parse(["--methods", "RCGM only w 0", option, "0"])
