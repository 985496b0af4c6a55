"""The issue-12 checks of ``benchmarks/quality/curves_summary.py`` on hand-made numbers (lower is better)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "quality"))
import curves  # noqa: E402
import curves_summary  # noqa: E402
from curves_summary import keeps_diversity, no_rise, not_worse_than_ablation, paired_gap, within  # noqa: E402


def test_not_worse_than_ablation_passes_when_every_checkpoint_from_1x_is_at_most_the_ablation():
    method = {250: 9.0, 1000: 2.0, 3000: 1.5}  # worse before 1x does not count
    ablation = {250: 3.0, 1000: 2.0, 3000: 1.6}
    check = not_worse_than_ablation(method, ablation, from_step=1000)
    assert check.passed is True
    assert "2/2 checkpoints pass" in check.detail


def test_not_worse_than_ablation_fails_and_counts_when_one_checkpoint_is_worse():
    check = not_worse_than_ablation({1000: 2.0, 3000: 1.7}, {1000: 2.1, 3000: 1.6}, from_step=1000)
    assert check.passed is False
    assert "1/2 checkpoints pass" in check.detail


def test_not_worse_than_ablation_is_missing_without_a_common_checkpoint():
    assert not_worse_than_ablation({1000: 1.0}, {3000: 1.0}, from_step=1000).passed is None


def test_within_compares_against_factor_times_reference():
    assert within(0.21, 0.198, 1.1, "(B) 3x").passed is True  # 0.21 <= 0.2178
    failed = within(0.272, 0.198, 1.1, "(B) 3x")
    assert failed.passed is False
    assert failed.detail == "0.272 vs 1.1*0.198=0.2178"
    assert within(2.32, 2.32, 1.0, "(B) 1x").passed is True
    assert within(None, 2.32, 1.0, "(B) 1x").passed is None


def test_no_rise_compares_the_last_checkpoint_with_the_first():
    assert no_rise({1000: 2.0, 2000: 2.2, 3000: 1.9}, 1000, 3000).passed is True
    rising = no_rise({500: 9.0, 1000: 2.0, 3000: 2.1}, 1000, 3000)
    assert rising.passed is False
    assert rising.detail == "2 -> 2.1"


def test_keeps_diversity_uses_the_lowest_checkpoint_from_1x_against_the_data_fraction():
    data = 1.0
    assert keeps_diversity({250: 0.1, 1000: 0.9, 3000: 0.86}, data, from_step=1000).passed is True
    assert keeps_diversity({1000: 0.9, 2000: 0.84, 3000: 0.95}, data, from_step=1000).passed is False


def _report(curve: dict[int, dict[str, float]], key: str = "power/1", **extra) -> dict:
    config = {"primary": "fd", "budget": 1000, "checkpoints": [250, 500, 1000, 1500, 2000, 3000], "conditional": True}
    return {"config": config, "curve": {str(step): {key: scores} for step, scores in curve.items()}, **extra}


def test_task_checks_reports_a_skipped_guided_pair_instead_of_a_verdict():
    runs = {
        "TwinFlow defaults": {0: {**_report({}), "skipped": "guidance not applicable"}},
        "RCGM only, defaults": {0: {**_report({}), "skipped": "guidance not applicable"}},
        "TwinFlow w 0": {0: _report({1000: {"fd": 1.0}, 3000: {"fd": 0.9}})},
        "RCGM only w 0": {0: _report({1000: {"fd": 1.2}, 3000: {"fd": 0.8}})},
    }
    lines = curves_summary.task_checks("shapes", runs)
    assert lines[0] == "shapes | w 0.5 (defaults) | (A) guidance not applicable"
    power = [line for line in lines if "| w 0 | power |" in line]
    assert power and power[0].endswith("FAIL [1 seeds, fewer than 3]")
    assert "1/2 checkpoints pass" in power[0]


def test_load_keeps_budget_width_lr_eval_and_network_runs_apart_from_the_task_they_vary(tmp_path):
    import json

    def write(name: str, seed: int, **overrides) -> None:
        config = {"quick": False, "scale": 1.0, "budget_override": None, "width_override": None, **overrides}
        report = {"task": "patches", "seed": seed, "method": "TwinFlow w 0", "config": config, "curve": {}}
        (tmp_path / f"patches_seed{seed}_{name}.json").write_text(json.dumps(report))

    write("twinflow-w-0", 0)
    write("twinflow-w-0_budget4000", 0, budget_override=4000)
    write("twinflow-w-0_width512", 1, width_override=512)
    write("twinflow-w-0_budget4000_width512", 2, budget_override=4000, width_override=512)
    write("twinflow-w-0_lr0.0003", 1, lr_override=3e-4)
    write("twinflow-w-0_quick", 0, quick=True)
    write("twinflow-w-0_eval16000", 2, eval_override=16000)  # scored on more samples: another instrument
    write("twinflow-w-0_twinblocks", 0, twin_per_block=True)  # another network: must not replace seed 0's run
    write("twinflow-w-0_twinseparate", 0, twin_separate=True)  # and another
    runs = curves_summary.load(tmp_path, quick=False, scale=1.0)
    assert sorted(runs) == ["patches", "patches-budget4000", "patches-budget4000-width512", "patches-eval16000",
                            "patches-lr0.0003", "patches-twinblocks", "patches-twinseparate", "patches-width512"]
    seeds = [sorted(runs[task]["TwinFlow w 0"]) for task in sorted(runs)]
    assert seeds == [[0], [0], [2], [2], [1], [0], [0], [1]]
    assert not runs["patches"]["TwinFlow w 0"][0]["config"].get("twin_per_block")


def test_paired_gap_reports_the_mean_seed_paired_difference_its_standard_error_and_the_wins():
    method, ablation = {0: 1.0, 1: 2.0, 2: 3.0, 7: 9.0}, {0: 1.5, 1: 1.5, 2: 2.5, 5: 0.0}  # seeds 5, 7 unpaired
    # gaps -0.5, +0.5, +0.5: mean 1/6, stdev sqrt(1/3), s.e. 1/3
    assert paired_gap(method, ablation) == "paired gap +0.1667 ± 0.33 (s.e.), method ahead on 1/3 seeds"
    assert paired_gap({0: 1.0}, {1: 1.0}) == "no common seed"


def test_task_checks_adds_the_like_for_like_cfg2_lines_for_the_guided_recipe_only_when_every_reference_has_them():
    curve = {1000: {"fd": 1.0, "diversity": 1.0}, 3000: {"fd": 1.0, "diversity": 1.0}}
    reference = _report({1000: {"fd": 0.5}, 3000: {"fd": 0.2}}, "power/4")
    for step, scores in {1000: {"fd": 1.0}, 3000: {"fd": 0.95}}.items():
        reference["curve"][str(step)].update({"power/50": {"fd": 0.2}, "power/50-cfg2": scores,
                                              "power/4-cfg2": {"fd": 0.9 if step == 1000 else 5.0}})
    reference.update(data={"diversity": 1.0}, start={"50-cfg2": {"fd": 1.2}, "4-cfg2": {"fd": 2.0}})
    runs = {"TwinFlow defaults": {0: _report(curve)}, "RCGM only, defaults": {0: _report(curve)},
            "reference": {0: reference}}

    def like_for_like() -> list[str]:
        return [line for line in curves_summary.task_checks("patches", runs) if "CFG 2" in line and "| power |" in line]

    assert like_for_like() == [
        "patches | w 0.5 (defaults) | power | (B, like for like) 1x at most FM4 at CFG 2: 1 vs 0.9 FAIL "
        "[1 seeds, fewer than 3]",
        "patches | w 0.5 (defaults) | power | (B, like for like) 3x within 1.1x of FM50 at CFG 2: "
        "1 vs 1.1*0.95=1.045 PASS [1 seeds, fewer than 3]",
    ]
    del reference["start"]["4-cfg2"]  # a reference run before 4 steps at CFG 2 was added: only the 50-step line
    assert [line.split(" | ")[3].split(":")[0] for line in like_for_like()] == [
        "(B, like for like) 3x within 1.1x of FM50 at CFG 2"]
    del reference["start"]["50-cfg2"]
    assert not [line for line in curves_summary.task_checks("patches", runs) if "CFG 2" in line]


def test_select_takes_a_whole_name_alone_and_any_other_pattern_as_a_substring():
    registry = {name: None for name in ("TwinFlow w 0, s clean", "TwinFlow w 0, s cleaner", "TwinFlow defaults")}
    assert list(curves.select(registry, ["TwinFlow w 0, s clean"])) == ["TwinFlow w 0, s clean"]
    assert list(curves.select(registry, ["s clean"])) == ["TwinFlow w 0, s clean", "TwinFlow w 0, s cleaner"]
    assert list(curves.select(registry, ["TwinFlow w 0, s cleaner", "defaults"])) == [
        "TwinFlow w 0, s cleaner", "TwinFlow defaults"]
    assert curves.select(registry, None) == registry
    with pytest.raises(ValueError, match="RCGM"):
        curves.select(registry, ["RCGM"])


def test_eval_option_scores_the_given_sample_count_into_a_file_of_its_own_and_refuses_fewer_than_two(tmp_path):
    import json

    import torch

    threads = torch.get_num_threads()
    try:
        for extra in ([], ["--eval", "300"]):
            curves.main(argv=["--task", "ring", "--quick", "--skip-fm", "--methods", "RCGM only w 0",
                              "--out", str(tmp_path), *extra])
    finally:
        torch.set_num_threads(threads)  # the benchmark pins one thread per process
    default = json.loads((tmp_path / "ring_seed0_rcgm-only-w-0_quick.json").read_text())
    more = json.loads((tmp_path / "ring_seed0_rcgm-only-w-0_quick_eval300.json").read_text())
    assert (default["config"]["eval"], default["config"]["eval_override"]) == (curves.TASKS["ring"].quick.eval, None)
    assert (more["config"]["eval"], more["config"]["eval_override"]) == (300, 300)
    # the same checkpoints, scored on other (more) samples
    assert default["curve"].keys() == more["curve"].keys()
    assert default["curve"] != more["curve"]
    with pytest.raises(ValueError, match="--eval"):
        curves.main(argv=["--task", "ring", "--quick", "--skip-fm", "--eval", "1", "--out", str(tmp_path)])


def test_task_checks_compare_means_only_over_the_seeds_both_sides_have():
    curve = {1000: {"fd": 1.0, "diversity": 1.0}, 3000: {"fd": 0.9, "diversity": 1.0}}

    def reference(fd4: float, fd50: float) -> dict:
        report = _report({1000: {"fd": fd4}, 3000: {"fd": fd4}}, "power/4")
        for step in ("1000", "3000"):
            report["curve"][step]["power/50"] = {"fd": fd50}
        return {**report, "data": {"diversity": 1.0}}

    runs = {  # seed 1 exists only for the ablation and the reference; with it both verdicts would flip
        "TwinFlow w 0": {0: _report(curve)},
        "RCGM only w 0": {0: _report({1000: {"fd": 1.1}, 3000: {"fd": 1.0}}),
                          1: _report({1000: {"fd": 0.1}, 3000: {"fd": 0.1}})},
        "reference": {0: reference(fd4=1.2, fd50=0.85), 1: reference(fd4=0.1, fd50=0.05)},
    }
    lines = [line for line in curves_summary.task_checks("patches", runs) if "| w 0 | power |" in line]
    verdicts = {line.split(" | ")[3].split(":")[0]: line.rsplit(" [", 1)[0].split()[-1] for line in lines}
    assert verdicts["(A) at most RCGM-only"] == "PASS"  # 1.0 <= 1.1 and 0.9 <= 1.0 on seed 0
    assert verdicts["(B) 1x at most FM4"] == "PASS" and verdicts["(B) 3x within 1.1x of FM50"] == "PASS"
    assert all(line.endswith("[1 seeds, fewer than 3]") for line in lines)


def test_separate_twin_routes_twin_rows_to_a_copy_that_shares_no_weight_with_the_real_network():
    import torch

    from twinloss import toy

    torch.manual_seed(0)
    real = toy.TimeMLP((2,), width=16, depth=2, num_classes=3)
    model = curves.SeparateTwin(real)
    with torch.no_grad():
        for parameter in model.fake.parameters():
            parameter.add_(0.1)  # a fake field that has moved away from the real one
    x, y = torch.randn(4, 2), torch.tensor([0, 1, 2, 3])
    t, r = torch.tensor([0.9, -0.7, 0.4, -0.2]), torch.tensor([0.1, -0.7, 0.4, -0.2])
    out = model(x, t, r, y=y)
    real_rows, fake_rows = t >= 0, t < 0
    torch.testing.assert_close(out[real_rows], real(x[real_rows], t[real_rows], r[real_rows], y=y[real_rows]))
    torch.testing.assert_close(out[fake_rows], model.fake(x[fake_rows], t[fake_rows], r[fake_rows], y=y[fake_rows]))
    out[fake_rows].sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in model.real.parameters())
    assert all(p.grad is not None for p in model.fake.parameters())
    plain = torch.tensor([0.9, 0.7, 0.4, 0.2])
    assert torch.equal(model(x, plain, plain, y=y), real(x, plain, plain, y=y))  # no twin rows: real's own call
