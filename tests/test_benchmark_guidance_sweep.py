"""The guidance sweep of ``benchmarks/quality/guidance_sweep.py``: the losses it builds and its summary of a quick run."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "quality"))
import guidance_sweep  # noqa: E402
from common import BenchmarkLoss  # noqa: E402

import twinloss  # noqa: E402
from twinloss import toy  # noqa: E402


@pytest.fixture(scope="module")
def pretrained():
    return toy.TimeMLP((1, 8, 8), width=16, depth=2, num_classes=10)


def is_rcgm(loss: BenchmarkLoss) -> bool:
    return loss.trajectory.shares.fake == 0 and loss.rectify_weight == 0


@pytest.mark.parametrize("name", sorted(guidance_sweep.settings()))
def test_each_setting_builds_its_placement_at_its_scale_and_twin_settings_have_an_rcgm_only_counterpart(
        name, pretrained):
    method, placement, w = guidance_sweep.settings()[name]
    loss = guidance_sweep.variants()[name](pretrained)
    assert loss.guidance_scale == w and is_rcgm(loss) == (method == "RCGM only")
    every_real_row = loss.guidance_groups == ("one_step", "multi_step", "any_step")
    guided = {"online": every_real_row, "online, s mid": every_real_row,
              "guidance-free rectification": loss.rectify_field == "guidance_free",
              "any-step rows": loss.guidance_groups == ("any_step",),
              "frozen teacher": isinstance(loss.guidance_teacher, twinloss.FrozenTeacher)}
    assert guided[placement.name]
    if placement.name != "frozen teacher" and w > 0:
        assert isinstance(loss.guidance_teacher, twinloss.OnlineTeacher)
    if method == "TwinFlow":  # the fifth round's uniform s, or the guided default's law for "online, s mid"
        law = loss.rectify_time
        if placement.name == "online, s mid":
            assert isinstance(law, twinloss.LogitNormalTime) and (law.mean, law.std) == (0.0, 1.0)
        else:
            assert isinstance(law, twinloss.BetaTime) and (law.alpha, law.beta) == (1.0, 1.0)
        ablation_name = guidance_sweep.counterpart(placement, w)
        ablation = guidance_sweep.variants()[ablation_name](pretrained)
        assert is_rcgm(ablation) and ablation.guidance_scale == w
        assert ablation.guidance_groups == loss.guidance_groups
        assert type(ablation.guidance_teacher) is type(loss.guidance_teacher)


def test_summary_of_a_quick_run_pairs_twinflow_with_rcgm_only_on_shared_and_on_all_seeds_and_draws_the_cfg_frontier(
        tmp_path):
    threads = torch.get_num_threads()
    try:
        guidance_sweep.curves.main(guidance_sweep.variants(), argv=[
            "--task", "digits", "--quick", "--out", str(tmp_path),
            "--methods", "sweep TwinFlow online w 0.5", "--methods", "sweep RCGM only online w 0.5",
            "--methods", "sweep TwinFlow guidance-free rectification w 0.5"])
        guidance_sweep.curves.main(guidance_sweep.variants(), argv=[  # a second seed for the online pair only
            "--task", "digits", "--quick", "--out", str(tmp_path), "--seed", "1", "--skip-fm",
            "--methods", "sweep TwinFlow online w 0.5", "--methods", "sweep RCGM only online w 0.5"])
    finally:
        torch.set_num_threads(threads)  # the benchmark pins one thread per process
    text, lines = guidance_sweep.summary("digits", tmp_path, quick=True)
    assert "the seeds every setting has: [0]" in text  # the placements' table: seed 0 alone
    shared, more = text.split("Settings run on more seeds than those")
    assert "| online | 0.5 | 2 |" in more and "guidance-free" not in more
    def table_rows(part: str) -> list[list[str]]:
        return [[cell.strip() for cell in line.split("|")[1:-1]] for line in part.splitlines() if line.startswith("| ")]

    cells = table_rows(shared)
    rows = {(row[0], row[1]): row for row in cells}
    online, guidance_free = rows["online", "0.5"], rows["guidance-free rectification", "0.5"]
    assert online[9] == guidance_free[9] != "nan"  # the guidance-free setting is paired with online RCGM-only
    assert online[11].endswith(("(0/1 ahead)", "(1/1 ahead)"))
    assert online[12].endswith(("ahead)", "outside RCGM-only's range"))
    assert {"CFG 1", "CFG 1.25", "CFG 1.5", "CFG 2", "CFG 3"} <= {row[0] for row in table_rows(more)}
    drawn = dict(lines)
    assert len(drawn["flow matching, 50 Euler steps, CFG 1-3"]) == 5
    assert len(drawn["TwinFlow, online"]) == 1 and len(drawn["RCGM only, online"]) == 1
    assert all(logp <= 0 and fd > 0 for points in drawn.values() for logp, fd in points)


def test_patch_evaluator_log_p_is_the_classifiers_log_probability_of_the_asked_for_label():
    import patches

    data = patches.patch_data()
    classifier, _ = patches.train_classifier(data, steps=200)
    evaluator = patches.Evaluator(data, classifier, count=500, seed=0)
    samples, labels = evaluator.second, evaluator.second_labels
    scores = evaluator.score(samples, labels)
    with torch.no_grad():
        probabilities = torch.softmax(classifier(samples.clamp(-1, 1)).double(), dim=1)
    assert scores["class_logp"] == pytest.approx(float(probabilities[torch.arange(500), labels].log().mean()), rel=1e-4)
    wrong = (labels + 1) % patches.CLASSES
    assert evaluator.score(samples, wrong)["class_logp"] < scores["class_logp"]


def test_frontier_interpolates_between_rising_neighbouring_scales_and_takes_the_lowest_curve():
    rising = [(1.0, 20.0), (2.0, 10.0), (3.0, 30.0)]  # in order of w
    turning_back = [(1.0, 25.0), (2.5, 12.0), (1.5, 40.0)]  # the last scale breaks and loses adherence
    assert guidance_sweep.frontier_fd([rising], 1.5) == pytest.approx(15.0)
    at = 2.25  # rising: 15; turning back, its first segment: 25 - 13 * 1.25 / 1.5 (the way back is not read)
    assert guidance_sweep.frontier_fd([rising, turning_back], at) == pytest.approx(min(15.0, 25 - 13 * 1.25 / 1.5))
    assert guidance_sweep.frontier_fd([rising, turning_back], 2.5) == pytest.approx(12.0)
    broken = [(1.0, 25.0), (2.5, 12.0), (0.5, 200.0)]  # the last scale breaks below guidance off's adherence
    assert guidance_sweep.frontier_fd([broken], 0.75) is None
    assert guidance_sweep.frontier_fd([rising, turning_back], 3.5) is None


def test_adherence_is_minus_log10_of_minus_the_mean_log_p():
    assert guidance_sweep.adherence(-0.1) == pytest.approx(1.0) and guidance_sweep.adherence(-0.001) == pytest.approx(3.0)
    assert guidance_sweep.adherence(0.0) == pytest.approx(12.0)  # a perfectly confident classifier: capped, not inf


def test_summary_on_the_ring_reports_its_sliced_wasserstein_and_no_adherence(tmp_path):
    threads = torch.get_num_threads()
    try:
        guidance_sweep.curves.main(guidance_sweep.variants(), argv=[
            "--task", "ring", "--quick", "--out", str(tmp_path), "--methods", "online w 0.2"])
    finally:
        torch.set_num_threads(threads)
    text, lines = guidance_sweep.summary("ring", tmp_path, quick=True)
    cells = [[cell.strip() for cell in line.split("|")[1:-1]] for line in text.splitlines() if line.startswith("| ")]
    row = next(row for row in cells if row[:2] == ["online", "0.2"])
    assert "TwinFlow SW 1x" in text and row[6] == "nan" and row[11].endswith("ahead)") and row[12] == ""
    assert not any(points for _, points in lines)


def test_equal_adherence_gap_starts_every_rcgm_only_curve_from_the_one_guidance_off_run():
    def run(log_p: float, fd: float) -> dict:
        return {0: {"curve": {"3000": {"power/1": {"fd": fd, "class_logp": log_p}}}}}

    runs = {"sweep RCGM only online w 0": run(-0.1, 20.0),  # adherence 1
            "sweep RCGM only any-step rows w 0.25": run(-0.01, 10.0),  # adherence 2
            "sweep TwinFlow any-step rows w 0.25": run(-10 ** -1.5, 12.0)}  # adherence 1.5: RCGM-only's 15 there
    assert guidance_sweep.matched_gap(runs, "sweep TwinFlow any-step rows w 0.25", 3000) == "-3 (1/1 ahead)"
