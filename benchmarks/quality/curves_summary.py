"""Tables, checks and plots of the ``curves.py`` results, averaged over seeds.

    PYTHONPATH=src python benchmarks/quality/curves_summary.py
    PYTHONPATH=src python benchmarks/quality/curves_summary.py --quick --results /tmp/curves \\
        --summary /tmp/curves/summary.md --img-dir /tmp/curves/img          # on smoke-run outputs

Reads every ``{task}_seed{N}_*.json`` under ``--results`` (default
``benchmarks/quality/results/curves``) made with the selected sizes
(``--quick``, ``--scale``); writes ``--summary`` (default
``benchmarks/quality/results/curves_summary.md``) and ``{img-dir}/curves-{task}.png``
(default ``docs/img``).

The checks of issue 12, on seed means of the primary figure (lower is better),
for the power average (the documented sampling) and for the raw weights. Each
comparison averages both sides over the seeds they have in common (a
reference or an ablation with more seeds would mix seed noise into the
difference); the no-rise check reads every seed of the method:

* (A) every task, each guidance setting: the full recipe at 1 NFE is at most
  its RCGM-only ablation at every checkpoint from 1x the budget on
  ("TwinFlow defaults" vs "RCGM only, defaults"; "TwinFlow w 0" vs "RCGM only w 0");
* (B) real images (patches, digits), each guidance setting, against flow matching continued with the
  same averaging: 1-NFE FD at 1x at most 4-step FM at 1x; at 3x at most
  1.1 x 50-step FM at 3x; FD at 3x at most FD at 1x (no rise); diversity at
  every checkpoint from 1x on at least 0.85 x the data's. The guided recipe
  also gets a like-for-like line: at 3x within 1.1 x 50-step FM sampled at
  the CFG scale it trains (2), where the references have it.

(A) also gives the seed-paired gap at 3x (mean ± standard error), which tells
a real difference from seed noise. A check on fewer than 3 seeds says so next
to its verdict.
"""

import argparse
import dataclasses
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plotting import line_chart  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TASK_ORDER = ("ring", "shapes", "patches", "digits")
REAL_IMAGE_TASKS = ("patches", "digits")
"""The tasks (B) checks: real images against flow matching continued (also their ``--budget`` etc. runs)."""
FM = "FM continued"
FM_STEPS = ("1", "2", "4", "50")
GUIDED_FM = "50-cfg2"
"""The reference key of 50 Euler steps at sampling CFG 2 (the first of ``curves.GUIDED_REFERENCES``), conditional tasks only."""
GUIDED_FM4 = "4-cfg2"
"""The reference key of 4 Euler steps at sampling CFG 2: the guided recipe's like-for-like "at most FM4" bar."""
GUIDED_LABELS = {GUIDED_FM: f"{FM}, 50 Euler at CFG 2", GUIDED_FM4: f"{FM}, 4 Euler at CFG 2"}
TABLE_SAMPLINGS = ("raw", "power")
CHECK_SAMPLINGS = ("power", "raw")
REQUIRED_SEEDS = 3
GUIDED_SETTING = "w 0.5 (defaults)"
PAIRS = {
    GUIDED_SETTING: ("TwinFlow defaults", "RCGM only, defaults"),
    "w 0": ("TwinFlow w 0", "RCGM only w 0"),
    "w 0, s uniform (the unguided default of the tenth and eleventh rounds)": (
        "TwinFlow w 0, s uniform, fake share 1/8", "RCGM only w 0"),
    "w 0, equal quarters (the unguided default before the tenth round)": ("TwinFlow w 0, equal quarters", "RCGM only w 0"),
}
"""Guidance setting -> (full recipe, its RCGM-only ablation), for check (A); the full recipe is also (B)'s subject.
The unguided default partition became the fake share of 1/8 in the tenth round of issue 12, and on a
conditioned batch the rectification's ``s`` moved towards the data in the twelfth; the earlier defaults' runs
keep their checks (on the unconditional shapes the twelfth round changed nothing, so ``TwinFlow w 0`` there
is the tenth round's default)."""
FM4_FACTOR, FM50_FACTOR, DIVERSITY_FRACTION = 1.0, 1.1, 0.85


# ----------------------------------------------------------------------------- checks (pure, on numbers)
@dataclass(frozen=True)
class Check:
    """One verdict: ``passed`` is None when the numbers it needs are missing."""

    label: str
    passed: bool | None
    detail: str

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "FAIL", None: "MISSING"}[self.passed]


def not_worse_than_ablation(method: dict[int, float], ablation: dict[int, float], from_step: int) -> Check:
    """(A): ``method[s] <= ablation[s]`` at every checkpoint ``s >= from_step`` both have (lower is better)."""
    steps = [step for step in sorted(method) if step >= from_step and step in ablation]
    label = "(A) at most RCGM-only"
    if not steps:
        return Check(label, None, f"no common checkpoint from step {from_step}")
    passing = [step for step in steps if method[step] <= ablation[step]]
    pairs = ", ".join(f"{step}: {method[step]:.4g} vs {ablation[step]:.4g}" for step in steps)
    return Check(label, len(passing) == len(steps), f"{pairs} ({len(passing)}/{len(steps)} checkpoints pass)")


def paired_gap(method: dict[int, float], ablation: dict[int, float]) -> str:
    """Seed-paired ``method - ablation`` at one checkpoint: mean ± standard error, and the seeds the method wins.

    Both runs of a seed start from the same pretrained weights and see the same
    batches, so the paired difference is the figure that tells a real gap from
    seed noise (lower is better: a negative mean favours the method).
    """
    seeds = sorted(set(method) & set(ablation))
    if not seeds:
        return "no common seed"
    gaps = [method[seed] - ablation[seed] for seed in seeds]
    wins = sum(gap <= 0 for gap in gaps)
    spread = f" ± {statistics.stdev(gaps) / len(gaps) ** 0.5:.2g}" if len(gaps) > 1 else ""
    return f"paired gap {statistics.fmean(gaps):+.4g}{spread} (s.e.), method ahead on {wins}/{len(gaps)} seeds"


def within(value: float | None, reference: float | None, factor: float, label: str) -> Check:
    """``value <= factor * reference`` (lower is better)."""
    if value is None or reference is None:
        return Check(label, None, "no numbers")
    bound = factor * reference
    shown = f"{reference:.4g}" if factor == 1 else f"{factor:g}*{reference:.4g}={bound:.4g}"
    return Check(label, value <= bound, f"{value:.4g} vs {shown}")


def no_rise(curve: dict[int, float], first: int, last: int) -> Check:
    """The figure at step ``last`` is at most the one at step ``first``; the steps between are shown."""
    label = f"(B) no rise {first} -> {last}"
    if first not in curve or last not in curve:
        return Check(label, None, "no numbers")
    shown = " -> ".join(f"{curve[step]:.4g}" for step in sorted(curve) if first <= step <= last)
    return Check(label, curve[last] <= curve[first], shown)


def keeps_diversity(diversity: dict[int, float], data: float | None, from_step: int,
                    fraction: float = DIVERSITY_FRACTION) -> Check:
    """Diversity at every checkpoint from ``from_step`` on is at least ``fraction`` x the data's."""
    label = f"(B) diversity >= {fraction:g} of data's"
    steps = [step for step in sorted(diversity) if step >= from_step]
    if data is None or not steps:
        return Check(label, None, "no numbers")
    lowest = min(diversity[step] for step in steps)
    return Check(label, lowest >= fraction * data, f"lowest {lowest:.4g} vs {fraction:g}*{data:.4g}={fraction * data:.4g}")


# ----------------------------------------------------------------------------- loading
def load(results: Path, quick: bool, scale: float) -> dict[str, dict[str, dict[int, dict]]]:
    """``{task: {method: {seed: report}}}`` of the runs made with these sizes.

    Runs with ``--budget``, ``--width``, ``--lr``, ``--eval``, ``--twin-per-block`` or ``--twin-separate`` form
    their own task, ``"patches-budget4000"``, ``"patches-width256"``, ``"patches-lr0.0003"``, ``"ring-eval8000"``,
    ``"patches-twinblocks"``, ``"ring-eval16000-twinseparate"``.
    """
    runs: dict[str, dict[str, dict[int, dict]]] = {}
    for path in sorted(results.glob("*_seed*_*.json")):
        report = json.loads(path.read_text())
        config = report.get("config", {})
        if config.get("quick") != quick or config.get("scale") != scale:
            continue
        override = config.get("budget_override")
        width, lr, count = config.get("width_override"), config.get("lr_override"), config.get("eval_override")
        task = (report["task"] + (f"-budget{override}" if override is not None else "")
                + (f"-width{width}" if width is not None else "") + (f"-lr{lr:g}" if lr is not None else "") + (f"-eval{count}" if count is not None else "")
                + ("-twinblocks" if config.get("twin_per_block") else "")
                + ("-twinseparate" if config.get("twin_separate") else ""))
        runs.setdefault(task, {}).setdefault(report["method"], {})[report["seed"]] = report
    return runs


def values(reports: dict[int, dict], step: int, key: str, metric: str) -> list[float]:
    """The figure ``metric`` of ``key`` (``"power/1"``) at ``step``, one per seed that has it."""
    return [report["curve"][str(step)][key][metric] for report in reports.values()
            if "curve" in report and str(step) in report["curve"] and key in report["curve"][str(step)]]


def per_seed(reports: dict[int, dict], step: int, key: str, metric: str) -> dict[int, float]:
    """``{seed: figure}`` of ``metric`` of ``key`` at ``step``, for the seeds that have it."""
    return {seed: found[0] for seed, report in reports.items() if (found := values({seed: report}, step, key, metric))}


def mean_curve(reports: dict[int, dict], key: str, metric: str) -> dict[int, float]:
    """Seed mean of ``metric`` at every checkpoint."""
    steps = sorted({int(step) for report in reports.values() for step in report.get("curve", {})})
    return {step: statistics.fmean(found) for step in steps if (found := values(reports, step, key, metric))}


def stat(found: list[float]) -> str:
    if not found:
        return ""
    mean = statistics.fmean(found)
    return f"{mean:.4g} ± {statistics.stdev(found):.2g}" if len(found) > 1 else f"{mean:.4g}"


def config_of(task_runs: dict[str, dict[int, dict]]) -> dict:
    return next(iter(next(iter(task_runs.values())).values()))["config"]


def methods_in(task_runs: dict[str, dict[int, dict]]) -> list[str]:
    """Method names in the order of the default registry, then the others by name; the reference excluded."""
    known = [name for pair in PAIRS.values() for name in pair]
    names = [name for name in task_runs if name != "reference"]
    return sorted(names, key=lambda name: (known.index(name) if name in known else len(known), name))


def skipped(reports: dict[int, dict]) -> str | None:
    reasons = {report["skipped"] for report in reports.values() if "skipped" in report}
    return "; ".join(sorted(reasons)) or None


# ----------------------------------------------------------------------------- tables
def rows(task_runs: dict[str, dict[int, dict]]) -> list[tuple[str, dict[int, dict], str, str]]:
    """(label, reports, sampling, nfe) of every row: each method at 1 NFE, then FM continued at 1/2/4/50."""
    out = []
    for name in methods_in(task_runs):
        for sampling in TABLE_SAMPLINGS:
            out.append((name, task_runs[name], sampling, "1"))
    reference = task_runs.get("reference", {})
    guided = tuple(key for key in GUIDED_LABELS if has_guided_reference(reference, key))
    for nfe in FM_STEPS + guided:
        label = GUIDED_LABELS.get(nfe, f"{FM}, {nfe} Euler")
        for sampling in TABLE_SAMPLINGS:
            out.append((label, reference, sampling, nfe))
    return out


def has_guided_reference(reference: dict[int, dict], key: str = GUIDED_FM) -> bool:
    """Whether every seed's reference scored the guided sampling ``key`` (runs before it was added did not)."""
    return bool(reference) and all(key in report.get("start", {}) for report in reference.values())


def task_section(task: str, task_runs: dict[str, dict[int, dict]]) -> str:
    config = config_of(task_runs)
    primary, steps = config["primary"], config["checkpoints"]
    budget = config["budget"]
    reference = task_runs.get("reference", {})
    seeds = sorted({seed for reports in task_runs.values() for seed in reports})
    lines = [f"## {task} (primary figure `{primary}`, lower is better; 1x = {budget} steps at lr {config['lr']:g}; "
             f"seeds {seeds})", ""]
    if reference:
        data = [report["data"] for report in reference.values()]
        shared = [metric for metric in data[0] if all(metric in d for d in data)]  # seeds scored before a metric was added lack it
        floor = ", ".join(f"{metric} {stat([d[metric] for d in data])}" for metric in shared)
        lines += [f"Data vs data (floor): {floor}.", ""]
        start = [report["start"] for report in reference.values()]
        lines += ["Pretrained model, " + ", ".join(
            f"{nfe} Euler {stat([s[nfe][primary] for s in start])}" for nfe in FM_STEPS) + ".", ""]
    lines += [f"`{primary}` by fine-tune step (mean ± std over the seeds; n = seeds):", "",
              "| method | sampling | NFE | n | " + " | ".join(str(s) for s in steps) + " |",
              "|---|---|---:|---:|" + "---:|" * len(steps)]
    for label, reports, sampling, nfe in rows(task_runs):
        reason = skipped(reports)
        if reason:
            if sampling == TABLE_SAMPLINGS[0]:
                lines.append(f"| {label} | not run: {reason} | | | " + " | " * (len(steps) - 1) + " |")
            continue
        cells = [stat(values(reports, step, f"{sampling}/{nfe}", primary)) for step in steps]
        lines.append(f"| {label} | {sampling} | {nfe} | {len(reports)} | " + " | ".join(cells) + " |")
    first, last = budget, steps[-1]
    extra = ["diversity"] + (["class_acc"] if config["conditional"] else [])
    lines += ["", f"Diversity{' and class accuracy' if config['conditional'] else ''} at 1x ({first}) and 3x ({last}):", "",
              "| method | sampling | NFE | " + " | ".join(f"{m} 1x | {m} 3x" for m in extra) + " |",
              "|---|---|---:|" + "---:|" * (2 * len(extra))]
    for label, reports, sampling, nfe in rows(task_runs):
        if skipped(reports):
            continue
        cells = [stat(values(reports, step, f"{sampling}/{nfe}", metric)) for metric in extra for step in (first, last)]
        lines.append(f"| {label} | {sampling} | {nfe} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- checks on the results
def seeds_note(*groups: dict[int, dict]) -> str:
    count = min((len(reports) for reports in groups), default=0)
    return f"[{count} seeds]" if count >= REQUIRED_SEEDS else f"[{count} seeds, fewer than {REQUIRED_SEEDS}]"


def on_common_seeds(first: dict[int, dict], second: dict[int, dict]) -> tuple[dict[int, dict], dict[int, dict]]:
    """``first`` and ``second`` cut to the seeds both have."""
    common = first.keys() & second.keys()
    return ({seed: report for seed, report in first.items() if seed in common},
            {seed: report for seed, report in second.items() if seed in common})


def task_checks(task: str, task_runs: dict[str, dict[int, dict]]) -> list[str]:
    """The (A) and (B) lines of one task: ``task | setting | sampling | check: numbers VERDICT [seeds]``."""
    config = config_of(task_runs)
    primary, budget, last = config["primary"], config["budget"], config["checkpoints"][-1]
    reference = task_runs.get("reference", {})
    lines = []
    for setting, (method, ablation) in PAIRS.items():
        ours, theirs = task_runs.get(method, {}), task_runs.get(ablation, {})
        reason = skipped(ours) or skipped(theirs)
        if reason:
            lines.append(f"{task} | {setting} | (A) {reason}")
            continue
        # every comparison on the seeds both sides have: means over different seeds would mix seed noise in
        ours, theirs = on_common_seeds(ours, theirs)
        own = task_runs.get(method, {})  # every seed of the method: the no-rise check needs no other side
        ours_with_reference, reference_with_ours = on_common_seeds(own, reference)
        checks = []
        for sampling in CHECK_SAMPLINGS:
            key = f"{sampling}/1"
            found = not_worse_than_ablation(mean_curve(ours, key, primary), mean_curve(theirs, key, primary), budget)
            at_last = paired_gap(per_seed(ours, last, key, primary), per_seed(theirs, last, key, primary))
            found = dataclasses.replace(found, detail=f"{found.detail}; at {last}: {at_last}")
            checks.append((sampling, found, seeds_note(ours, theirs)))
            if task.split("-")[0] in REAL_IMAGE_TASKS:  # also the --budget runs, "patches-budget4000"
                curve = mean_curve(ours_with_reference, key, primary)
                fm4 = mean_curve(reference_with_ours, f"{sampling}/4", primary)
                fm50 = mean_curve(reference_with_ours, f"{sampling}/50", primary)
                data = [report["data"]["diversity"] for report in reference_with_ours.values()]
                note = seeds_note(ours_with_reference, reference_with_ours)
                checks += [
                    (sampling, within(curve.get(budget), fm4.get(budget), FM4_FACTOR, "(B) 1x at most FM4"), note),
                    (sampling, within(curve.get(last), fm50.get(last), FM50_FACTOR,
                                      f"(B) 3x within {FM50_FACTOR:g}x of FM50"), note),
                    (sampling, no_rise(mean_curve(own, key, primary), budget, last), seeds_note(own)),
                    (sampling, keeps_diversity(mean_curve(ours_with_reference, key, "diversity"),
                                               statistics.fmean(data) if data else None, budget), note),
                ]
                if setting == GUIDED_SETTING and has_guided_reference(reference_with_ours, GUIDED_FM4):
                    fm4_cfg2 = mean_curve(reference_with_ours, f"{sampling}/{GUIDED_FM4}", primary)
                    checks.append((sampling, within(curve.get(budget), fm4_cfg2.get(budget), FM4_FACTOR,
                                                    "(B, like for like) 1x at most FM4 at CFG 2"), note))
                if setting == GUIDED_SETTING and has_guided_reference(reference_with_ours):
                    fm50_cfg2 = mean_curve(reference_with_ours, f"{sampling}/{GUIDED_FM}", primary)
                    checks.append((sampling, within(curve.get(last), fm50_cfg2.get(last), FM50_FACTOR,
                                                    f"(B, like for like) 3x within {FM50_FACTOR:g}x of FM50 at CFG 2"),
                                   note))
        for sampling, check, note in checks:
            lines.append(f"{task} | {setting} | {sampling} | {check.label}: {check.detail} {check.verdict} {note}")
    return lines


# ----------------------------------------------------------------------------- plots
def plot(task: str, task_runs: dict[str, dict[int, dict]], path: Path) -> None:
    """Primary figure of the power average vs fine-tune steps: the default methods at 1 NFE, FM 4 and 50, the data floor.

    Variants (``guidance.py``) are in the tables, not on the chart, which stays readable.
    """
    config = config_of(task_runs)
    primary = config["primary"]
    defaults = {name for pair in PAIRS.values() for name in pair}
    lines = [(f"{name}, 1 NFE", sorted(mean_curve(task_runs[name], "power/1", primary).items()))
             for name in methods_in(task_runs) if name in defaults and not skipped(task_runs[name])]
    reference = task_runs.get("reference", {})
    lines += [(f"{FM}, {nfe} Euler", sorted(mean_curve(reference, f"power/{nfe}", primary).items())) for nfe in ("4", "50")]
    if has_guided_reference(reference):  # the guided recipe's own target
        lines.append((f"{FM}, 50 Euler at CFG 2", sorted(mean_curve(reference, f"power/{GUIDED_FM}", primary).items())))
    floor = [report["data"][primary] for report in reference.values()]
    levels = [("data vs data", statistics.fmean(floor))] if floor else []
    seeds = len({seed for reports in task_runs.values() for seed in reports})
    line_chart(lines, path, f"{task}: {primary} (power average) vs fine-tune steps, mean of {seeds} seed(s)",
               levels=levels)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "quality" / "results" / "curves")
    parser.add_argument("--summary", type=Path, default=ROOT / "benchmarks" / "quality" / "results" / "curves_summary.md")
    parser.add_argument("--img-dir", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--quick", action="store_true", help="summarise the --quick runs")
    parser.add_argument("--scale", type=float, default=1.0, help="summarise the runs made with this --scale")
    args = parser.parse_args(argv)
    runs = load(args.results, args.quick, args.scale)
    if not runs:
        raise ValueError(f"no curves.py results with quick={args.quick}, scale={args.scale} under {args.results}")
    tasks = [task for task in TASK_ORDER if task in runs] + sorted(set(runs) - set(TASK_ORDER))
    sizes = "quick (smoke) sizes" if args.quick else f"full sizes x {args.scale:g}" if args.scale != 1 else "full sizes"
    text = [f"# Curves: one protocol on every benchmark ({sizes})", "",
            "Made by `benchmarks/quality/curves.py`, summarised by `curves_summary.py` (its docstring states the "
            "checks). Power = `WeightAverage(PowerFunctionDecay(6.94))`, the documented sampling.", ""]
    text += [task_section(task, runs[task]) for task in tasks]
    text += ["## Checks (issue 12), seed means", "", "```"]
    text += [line for task in tasks for line in task_checks(task, runs[task])]
    text += ["```", ""]
    args.summary.parent.mkdir(parents=True, exist_ok=True)
    args.summary.write_text("\n".join(text))
    print("\n".join(text))
    for task in tasks:
        plot(task, runs[task], args.img_dir / f"curves-{task}.png")


if __name__ == "__main__":
    main()
