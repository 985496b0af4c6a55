"""The ring's figures split into mode weights and mode shapes (``run.evaluate_ring``, ``ring_modes.py``)."""

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "quality"))
import curves  # noqa: E402
import run  # noqa: E402
from ring_modes import paired_gaps  # noqa: E402

from twinloss import metrics, toy  # noqa: E402


def ring_draw(n: int, seed: int, first_mode_share: float | None = None) -> toy.LabelledPoints:
    """Ring points; with ``first_mode_share``, that share of class 0 moved onto mode 0 (from its opposite mode 4)."""
    points = toy.ring_mixture(n, modes=run.RING_MODES, std=run.RING_STD, generator=torch.Generator().manual_seed(seed))
    if first_mode_share is None:
        return points
    y = points.y.clone()
    class_zero = (y % run.RING_CLASSES == 0).nonzero().flatten()
    y[class_zero] = torch.where(torch.arange(len(class_zero)) < first_mode_share * len(class_zero), 0, 4)
    centers = toy.ring_centers(run.RING_MODES)
    return toy.LabelledPoints(x=points.x - centers[points.y] + centers[y], y=y)


def test_evaluate_ring_keeps_sw_reads_a_lopsided_class_as_mode_weight_error_and_balances_it_away():
    held = ring_draw(8000, seed=0)
    fair, lopsided = ring_draw(8000, seed=1), ring_draw(8000, seed=1, first_mode_share=0.7)
    scores = {name: run.evaluate_ring(x.x, x.y % run.RING_CLASSES, held.x) for name, x in
              (("fair", fair), ("lopsided", lopsided))}
    centers = toy.ring_centers(run.RING_MODES)
    for name, points in (("fair", fair), ("lopsided", lopsided)):
        stats = metrics.mode_statistics(points.x, held.x, centers, radius=0.5)
        assert scores[name]["mode_weight_error"] == stats.mode_weight_error
        direct = metrics.sliced_wasserstein(points.x, held.x, generator=torch.Generator().manual_seed(0))
        assert scores[name]["sw"] == float(direct)
    # A fifth of class 0 (1/4 of the points) moved: 0.05 of the mass in the wrong mode, on top of the
    # multinomial noise of two draws of 8000 (0.01-0.02, which alone puts the fair draw's sw near 0.1).
    assert scores["lopsided"]["mode_weight_error"] == pytest.approx(0.05, abs=0.02)
    assert scores["fair"]["mode_weight_error"] < 0.03
    assert scores["lopsided"]["sw"] > 2 * scores["fair"]["sw"]
    assert scores["lopsided"]["sw_balanced"] < 1.2 * scores["fair"]["sw_balanced"]
    assert scores["lopsided"]["sw_balanced"] < 0.1 * scores["lopsided"]["sw"]


def test_evaluate_ring_leaves_sw_balanced_undefined_when_a_mode_holds_no_sample():
    held = ring_draw(4000, seed=0)
    one_sided = ring_draw(4000, seed=1, first_mode_share=1.0)
    scores = run.evaluate_ring(one_sided.x, one_sided.y % run.RING_CLASSES, held.x)
    assert math.isnan(scores["sw_balanced"]) and scores["mode_weight_error"] > 0.1


def test_paired_gaps_subtract_the_named_method_seed_by_seed():
    reports = [{"A": {"sw": 0.3, "mode_weight_error": 0.02, "sw_balanced": 0.10},
                "B": {"sw": 0.2, "mode_weight_error": 0.03, "sw_balanced": 0.10}},
               {"A": {"sw": 0.1, "mode_weight_error": 0.02, "sw_balanced": 0.12},
                "B": {"sw": 0.4, "mode_weight_error": 0.01, "sw_balanced": 0.10}}]
    table = paired_gaps(reports, against="B")
    assert list(table) == ["A"]
    # sw gaps +0.1 and -0.3: mean -0.1, standard error 0.2828 / sqrt(2) = 0.2
    assert table["A"]["sw"] == "-0.1000 ± 0.2000 (1/2)"
    assert table["A"]["mode_weight_error"] == "+0.0000 ± 0.0100 (1/2)"  # gaps -0.01 and +0.01
    assert table["A"]["sw_balanced"] == "+0.0100 ± 0.0100 (0/2)"


def test_load_weights_finds_a_run_by_its_variant_suffix(tmp_path):
    pretrained = toy.TimeMLP((2,), width=8, depth=1)
    bench = curves.Bench(pretrained=pretrained, draw=None, generator=torch.Generator(), noise=torch.zeros(1, 2),
                         cond=None, uncond=None, score=None, floor={})
    kept = {name: value + 1.0 for name, value in pretrained.state_dict().items()}
    curves.save_weights(tmp_path / "weights" / "ring_seed3_twinflow-w-0_eval16000.pt", {"raw": {}, "power": kept})
    model = curves.load_weights(bench, tmp_path, "ring", 3, "TwinFlow w 0", "power", variant="_eval16000")
    assert all(torch.equal(value, kept[name]) for name, value in model.state_dict().items())
    with pytest.raises(ValueError, match="TwinFlow w 0"):
        curves.load_weights(bench, tmp_path, "ring", 3, "TwinFlow w 0", "power")  # the run without the suffix
