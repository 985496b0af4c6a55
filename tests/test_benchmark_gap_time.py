"""``benchmarks/quality/gap_time.py``: the gap's size and repeatability against s, on fields with a known gap."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "quality"))
import curves  # noqa: E402
from gap_time import gap_by_time  # noqa: E402

from twinloss import toy  # noqa: E402


class KnownGap(torch.nn.Module):
    """``F(y, t, r) = y`` at negative times and ``0`` at positive ones: the gap is ``y`` itself (times ``scale``)."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale

    def forward(self, y, t, r):
        fake = (t < 0).to(y.dtype).reshape(-1, *([1] * (y.ndim - 1)))
        return fake * self.scale * y


def test_repeatability_is_the_signal_share_of_a_gap_made_of_the_sample_and_the_noise():
    # gap = y = s z + (1 - s) x_hat with |x_hat|^2 = |z|^2 = D: E cos = (1 - s)^2 / ((1 - s)^2 + s^2)
    x_hat = torch.ones(64, 4096, dtype=torch.float64)
    report = gap_by_time(KnownGap(0.1), x_hat, {}, (0.05, 0.5, 0.95), generator=torch.Generator().manual_seed(0))
    for s, row in report.items():
        s = float(s)
        assert row["repeatability"] == pytest.approx((1 - s) ** 2 / ((1 - s) ** 2 + s**2), abs=0.02)
        assert row["rms"] == pytest.approx(0.1 * ((1 - s) ** 2 + s**2) ** 0.5, rel=0.02)  # unclamped: |0.1 y| < 1


def test_the_gap_is_clamped_as_the_rectification_clamps_it():
    x_hat = torch.full((8, 256), 30.0, dtype=torch.float64)
    report = gap_by_time(KnownGap(), x_hat, {}, (0.05,), clamp=1.0, generator=torch.Generator().manual_seed(0))
    assert report["0.05"]["rms"] == pytest.approx(1.0)  # every entry about 28.5, clamped to 1
    assert report["0.05"]["repeatability"] == pytest.approx(1.0)


def test_load_weights_copies_the_pretrained_model_with_the_kept_weights_or_names_the_missing_run(tmp_path):
    pretrained = toy.TimeMLP((2,), width=8, depth=1)
    bench = curves.Bench(pretrained=pretrained, draw=None, generator=torch.Generator(), noise=torch.zeros(1, 2),
                         cond=None, uncond=None, score=None, floor={})
    kept = {name: value + 1.0 for name, value in pretrained.state_dict().items()}
    curves.save_weights(tmp_path / "weights" / "ring_seed3_twinflow-w-0.pt", {"raw": kept, "power": {}})
    model = curves.load_weights(bench, tmp_path, "ring", 3, "TwinFlow w 0", "raw")
    assert model is not pretrained
    for name, value in model.state_dict().items():
        assert torch.equal(value, kept[name]) and not torch.equal(value, pretrained.state_dict()[name])
    with pytest.raises(ValueError, match="TwinFlow defaults"):
        curves.load_weights(bench, tmp_path, "ring", 3, "TwinFlow defaults", "raw")


def test_a_new_report_keeps_the_rows_of_methods_it_does_not_name(tmp_path):
    path = tmp_path / "gaptime_ring_seed0.json"
    curves.write_rows(path, {"A": {"0.5": {"rms": 1.0}}, "B": {"0.5": {"rms": 2.0}}})
    curves.write_rows(path, {"B": {"0.5": {"rms": 3.0}}, "C": {"0.5": {"rms": 4.0}}})
    assert json.loads(path.read_text()) == {"A": {"0.5": {"rms": 1.0}}, "B": {"0.5": {"rms": 3.0}},
                                            "C": {"0.5": {"rms": 4.0}}}


def test_a_report_in_a_folder_that_does_not_exist_yet_is_written(tmp_path):
    path = tmp_path / "fresh" / "results" / "gaptime_ring_seed0.json"
    curves.write_rows(path, {"A": {"0.5": {"rms": 1.0}}})
    assert json.loads(path.read_text()) == {"A": {"0.5": {"rms": 1.0}}}
