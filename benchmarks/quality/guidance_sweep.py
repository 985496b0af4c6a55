r"""The guidance sweep: 1-NFE FD against class adherence for each placement of the guidance (issue 12, fifth round).

The fourth round compared guidance placements at one scale each, and every
FD there is against *unguided* data: a setting that keeps less of the
guidance scores a better FD for that reason alone. This sweep runs each
placement over several scales, so settings are compared where they reach
the same class adherence, as text-to-image models are compared by FID
against CLIP score. Adherence is the digit classifier's mean
log-probability of the asked-for label (``class_logp``; accuracy saturates
near 1 on the digits).

Placements (``w`` the loss's ``guidance_scale``; the CFG scale it trains in):

* ``online``: the authors' recipe, every real row guided by the model's own
  no-grad ``F_c - F_u``: CFG ``1 / (1 - w)``; ``w = 0`` is guidance off;
* ``online, s mid``: the same with the rectification's ``s`` logit-normal,
  the default with guidance since the eighth round (its RCGM-only
  counterpart is the online one);
* ``guidance-free rectification``: the same base targets, the
  rectification's real field guidance-free (``rectify_field="guidance_free"``);
  its RCGM-only counterpart is the online one (RCGM has no rectification);
* ``any-step rows``: ``guidance_groups=("any_step",)``: the instantaneous
  field stays unguided, so the guidance direction is read from an
  unguided field: CFG ``1 + w`` on the any-step rows;
* ``frozen teacher``: the guidance pass by the pretrained weights
  (``FrozenTeacher``): CFG ``1 + w`` of a fixed field.

Each runs with the twin terms (``TwinFlow``) and without (``RCGM only``),
on the ``curves.py`` protocol (one file per task, seed and setting, in
``results/sweep``); the reference there is flow matching continued, scored
at 50 Euler steps at CFG 1, 1.25, 1.5, 2 and 3 (``curves.GUIDED_REFERENCES``),
the multi-step frontier. ``--summary [task]`` writes ``results/sweep/summary-{task}.md``
and the plot ``docs/img/guidance-sweep-{task}.png``.

    export PYTHONPATH=$PWD/src:$PWD/adapters:$PWD/demo OMP_NUM_THREADS=1
    python benchmarks/quality/guidance_sweep.py --task digits --seed 0 --skip-methods      # the reference
    python benchmarks/quality/guidance_sweep.py --task digits --seed 0 --skip-fm --methods "sweep TwinFlow online"
    python benchmarks/quality/guidance_sweep.py --summary digits

Every TwinFlow placement but ``online, s mid`` passes the authors' uniform
``s`` (``rectify_time=BetaTime()``), the default with which the fifth round
measured them.
"""

import itertools
import math
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import curves  # noqa: E402
from common import BenchmarkLoss  # noqa: E402
from curves_summary import ROOT, load, per_seed  # noqa: E402
from plotting import line_chart  # noqa: E402

import twinloss  # noqa: E402

OUT = "benchmarks/quality/results/sweep"
FIGURES = ("class_logp", "class_acc", "diversity")
"""Figures averaged beside the task's primary one (FD; sliced Wasserstein ``sw`` on the ring, which has no log p)."""
REFERENCE_CFG = (("50", 1.0), ("50-cfg1.25", 1.25), ("50-cfg1.5", 1.5), ("50-cfg2", 2.0), ("50-cfg3", 3.0))
"""The reference's keys at 50 Euler steps and their sampling CFG scale."""


@dataclass(frozen=True)
class Placement:
    """Where the guidance enters: the loss for a scale ``w`` (``rcgm`` picks the ablation), the scales swept."""

    name: str
    make: Callable[[float, object, bool], BenchmarkLoss]
    scales: tuple[float, ...]
    cfg: Callable[[float], float]
    twin_only: bool = False
    """True when the placement exists only with the twin terms; its RCGM-only counterpart is ``online``."""


def _uniform_s(**kwargs) -> BenchmarkLoss:
    """The full recipe with the authors' uniform ``s`` and equal quarters, with which the fifth round swept it
    (since the tenth round the default partition without guidance, its ``w 0`` run, is a fake share of 1/8)."""
    return BenchmarkLoss(rectify_time=twinloss.BetaTime(), shares=twinloss.GroupShares(), **kwargs)


def _online(w: float, pretrained, rcgm: bool) -> BenchmarkLoss:
    return BenchmarkLoss.rcgm(guidance_scale=w) if rcgm else _uniform_s(guidance_scale=w)


def _online_s_mid(w: float, pretrained, rcgm: bool) -> BenchmarkLoss:
    return BenchmarkLoss(guidance_scale=w, rectify_time=twinloss.LogitNormalTime(0.0, 1.0))


def _guidance_free(w: float, pretrained, rcgm: bool) -> BenchmarkLoss:
    return _uniform_s(guidance_scale=w, rectify_field="guidance_free")


def _any_step(w: float, pretrained, rcgm: bool) -> BenchmarkLoss:
    make = BenchmarkLoss.rcgm if rcgm else _uniform_s
    return make(guidance_scale=w, guidance_groups=("any_step",))


def _frozen(w: float, pretrained, rcgm: bool) -> BenchmarkLoss:
    make = BenchmarkLoss.rcgm if rcgm else _uniform_s
    return make(guidance_scale=w, guidance_teacher=twinloss.FrozenTeacher(pretrained))


PLACEMENTS = (
    Placement("online", _online, (0.0, 0.1, 0.2, 0.35, 0.5, 0.65), cfg=lambda w: 1 / (1 - w)),
    Placement("online, s mid", _online_s_mid, (0.2, 0.35, 0.5), cfg=lambda w: 1 / (1 - w), twin_only=True),
    Placement("guidance-free rectification", _guidance_free, (0.2, 0.35, 0.5, 0.65), cfg=lambda w: 1 / (1 - w),
              twin_only=True),
    Placement("any-step rows", _any_step, (0.25, 0.5, 1.0, 2.0), cfg=lambda w: 1 + w),
    Placement("frozen teacher", _frozen, (0.25, 0.5, 1.0), cfg=lambda w: 1 + w),
)
METHODS = ("TwinFlow", "RCGM only")


def setting_name(method: str, placement: Placement, w: float) -> str:
    return f"sweep {method} {placement.name} w {w:g}"


def settings() -> dict[str, tuple[str, Placement, float]]:
    """``{name: (method, placement, w)}`` of every run of the sweep."""
    out = {}
    for placement in PLACEMENTS:
        for method in METHODS[:1] if placement.twin_only else METHODS:
            for w in placement.scales:
                out[setting_name(method, placement, w)] = (method, placement, w)
    return out


def variants() -> dict[str, curves.MethodFactory]:
    """The sweep as ``curves.main`` methods."""
    def factory(method: str, placement: Placement, w: float) -> curves.MethodFactory:
        return lambda pretrained: placement.make(w, pretrained, method != "TwinFlow")

    return {name: factory(*setting) for name, setting in settings().items()}


# ----------------------------------------------------------------------------- summary
def counterpart(placement: Placement, w: float) -> str:
    """The RCGM-only run that ablates the twin terms of a TwinFlow setting."""
    return setting_name("RCGM only", PLACEMENTS[0] if placement.twin_only else placement, w)


def adherence(class_logp: float) -> float:
    """``-log10(-log p)``: 1 at a mean log p of -0.1, 3 at -0.001; higher is more adherence (log p saturates near 0)."""
    return -math.log10(max(-class_logp, 1e-12))


def frontier_fd(curves_by_setting: list[list[tuple[float, float]]], x: float) -> float | None:
    """The lowest FD the (adherence, FD) curves reach at adherence ``x``, interpolated linearly between neighbouring scales.

    Each curve is in order of ``w`` and is read up to the scale where its
    adherence stops rising: past it the samples break (at a large ``w`` they
    lose adherence again), and a segment back would compare with broken
    samples. ``None`` when no segment spans ``x``.
    """
    found = []
    for points in curves_by_setting:
        rising = points[:1]
        for point in points[1:]:
            if point[0] < rising[-1][0]:
                break
            rising.append(point)
        for (x0, y0), (x1, y1) in itertools.pairwise(rising):
            if x0 <= x <= x1:
                found.append(y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0))
    return min(found) if found else None


def matched_gap(runs: dict[str, dict[int, dict]], name: str, step: int,
                placements: tuple[Placement, ...] = PLACEMENTS, primary: str = "fd") -> str:
    """FD of a TwinFlow setting minus RCGM-only's best FD at the same adherence, per seed (mean ± s.e.).

    RCGM-only's frontier on each seed is the curve of each of its
    ``placements`` over its scales (guidance off first), so the comparison
    is at equal class adherence instead of equal ``w``. Seeds where the
    setting's adherence lies outside the range the RCGM-only runs span are
    counted, not compared.
    """
    gaps, beyond = [], 0
    for seed, report in runs.get(name, {}).items():
        scores = report["curve"].get(str(step), {}).get("power/1")
        if scores is None or "class_logp" not in scores:
            continue
        rcgm_curves = []
        for placement in placements:
            if placement.twin_only:
                continue
            points = []
            for w in dict.fromkeys((0.0, *placement.scales)):
                source = PLACEMENTS[0] if w == 0 else placement  # guidance off is one run, named online w 0
                other = runs.get(setting_name("RCGM only", source, w), {}).get(seed)
                if other is not None and (found := other["curve"].get(str(step), {}).get("power/1")):
                    points.append((adherence(found["class_logp"]), found[primary]))
            rcgm_curves.append(points)
        reference = frontier_fd(rcgm_curves, adherence(scores["class_logp"]))
        if reference is None:
            beyond += 1
        else:
            gaps.append(scores[primary] - reference)
    text = gap_text(gaps)
    if beyond:
        text += ("; " if text else "") + f"{beyond} seed(s) outside RCGM-only's range"
    return text


def gap_text(gaps: list[float]) -> str:
    """``"mean ± s.e. (k/n ahead)"`` of per-seed differences, ahead meaning below 0 (lower FD); empty for none."""
    if not gaps:
        return ""
    spread = f" ± {statistics.stdev(gaps) / math.sqrt(len(gaps)):.2g}" if len(gaps) > 1 else ""
    return f"{statistics.fmean(gaps):+.3g}{spread} ({sum(gap < 0 for gap in gaps)}/{len(gaps)} ahead)"


def figures(reports: dict[int, dict], step: int, key: str, primary: str = "fd") -> dict[str, float]:
    """Seed means of ``primary`` and ``FIGURES`` of ``key`` at ``step``, the primary one as ``"fd"`` (absent ones left out)."""
    out = {}
    for figure in (primary, *FIGURES):
        found = [scores[figure] for report in reports.values()
                 if figure in (scores := report["curve"].get(str(step), {}).get(key, {}))]
        if found:
            out["fd" if figure == primary else figure] = statistics.fmean(found)
    return out


def summary(task: str, results: Path, quick: bool = False) -> tuple[str, list[tuple[str, list[tuple[float, float]]]]]:
    """The markdown tables at the last checkpoint and the (adherence, primary figure) lines of the plot, in order of ``w``.

    The primary figure is the task's (``config["primary"]``: FD, or sliced
    Wasserstein on the ring); tasks without ``class_logp`` get no adherence
    column entries and no plot lines.
    """
    all_runs = load(results, quick=quick, scale=1.0).get(task, {})
    reference = all_runs.get("reference", {})
    if not reference:
        raise SystemExit(f"no {task} reference in {results}: run --skip-methods first")
    last = max(int(step) for report in reference.values() for step in report["curve"])
    config = next(iter(reference.values()))["config"]
    first, primary = config["budget"], config["primary"]
    label = primary.upper()
    # The placements' table and the plot use the seeds every setting of the sweep has run on, so each row
    # averages the same seeds; the online table below uses every seed.
    present = [reports for name, reports in all_runs.items() if name in settings()]
    shared = set.intersection(*(set(reports) for reports in present)) if present else set()
    runs = {name: {seed: report for seed, report in reports.items() if seed in shared}
            for name, reports in all_runs.items()}
    table = [f"## {task}: 1 NFE, power average, {label} at {first} and {last} fine-tune steps, the rest at {last} "
             f"(mean of the seeds every setting has: {sorted(shared)})", "",
             f"| placement | w | CFG trained | seeds | TwinFlow {label} 1x | {label} 3x | log p | class acc | diversity "
             f"| RCGM-only {label} 3x | log p | TwinFlow minus RCGM-only: same w | same adherence |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for name, (method, placement, w) in settings().items():
        reports = runs.get(name, {})
        if method != "TwinFlow" or not reports:
            continue
        end, start = figures(reports, last, "power/1", primary), figures(reports, first, "power/1", primary)
        ablation = runs.get(counterpart(placement, w), {})
        rcgm = figures(ablation, last, "power/1", primary)
        same_w = per_seed(reports, last, "power/1", primary), per_seed(ablation, last, "power/1", primary)
        gaps = [value - same_w[1][seed] for seed, value in same_w[0].items() if seed in same_w[1]]
        table.append(f"| {placement.name} | {w:g} | {placement.cfg(w):.3g} | {len(reports)} "
                     f"| {start.get('fd', math.nan):.4g} | {end.get('fd', math.nan):.4g} "
                     f"| {end.get('class_logp', math.nan):.2g} | {end.get('class_acc', math.nan):.3f} "
                     f"| {end.get('diversity', math.nan):.3f} | {rcgm.get('fd', math.nan):.4g} "
                     f"| {rcgm.get('class_logp', math.nan):.2g} | {gap_text(gaps)} | {matched_gap(runs, name, last, primary=primary)} |")
    online, more = PLACEMENTS[0], []
    for name, (method, placement, w) in settings().items():
        twin, rcgm = all_runs.get(name, {}), all_runs.get(counterpart(placement, w), {})
        if method != "TwinFlow" or len(twin) <= len(shared):
            continue
        twin_fd, rcgm_fd = per_seed(twin, last, "power/1", primary), per_seed(rcgm, last, "power/1", primary)
        gaps = [value - rcgm_fd[seed] for seed, value in twin_fd.items() if seed in rcgm_fd]
        more.append(f"| {placement.name} | {w:g} | {len(gaps)} | {statistics.fmean(twin_fd.values()):.4g} "
                    f"| {statistics.fmean(rcgm_fd.values()):.4g} | {gap_text(gaps)} "
                    f"| {matched_gap(all_runs, name, last, (online,), primary)} |")
    if more:
        table += ["", f"Settings run on more seeds than those: TwinFlow minus RCGM-only at {last} steps over every "
                  "seed, at the same w and at the same adherence (RCGM-only's online curve, which every seed has)", "",
                  f"| placement | w | seeds | TwinFlow {label} | RCGM-only {label} | same w | same adherence |",
                  "|---|---:|---:|---:|---:|---|---|", *more]
    lines = []
    for method in METHODS:
        for placement in PLACEMENTS:
            points = []
            for w in placement.scales:
                end = figures(runs.get(setting_name(method, placement, w), {}), last, "power/1", primary)
                if "class_logp" in end:
                    points.append((adherence(end["class_logp"]), end["fd"]))
            if placement.name != "online" and points:  # every placement starts from guidance off
                off = figures(runs.get(setting_name(method, PLACEMENTS[0], 0.0), {}), last, "power/1", primary)
                points = ([(adherence(off["class_logp"]), off["fd"])] if "class_logp" in off else []) + points
            if method == "RCGM only" and placement.twin_only:
                continue
            lines.append((f"{method}, {placement.name}", points))  # in order of w, guidance off first
    frontier = []
    table += ["", f"| flow matching continued, 50 Euler steps, power average | {label} 3x | log p | class acc "
              "| diversity |", "|---|---:|---:|---:|---:|"]
    for key, cfg in REFERENCE_CFG:
        end = figures(runs["reference"], last, f"power/{key}", primary)
        if end:
            table.append(f"| CFG {cfg:g} | {end['fd']:.4g} | {end.get('class_logp', math.nan):.2g} "
                         f"| {end.get('class_acc', math.nan):.3f} | {end.get('diversity', math.nan):.3f} |")
            if "class_logp" in end:
                frontier.append((adherence(end["class_logp"]), end["fd"]))
    lines.append(("flow matching, 50 Euler steps, CFG 1-3", frontier))
    return "\n".join(table) + "\n", lines


def main_summary(task: str = "digits") -> None:
    results = ROOT / OUT
    text, lines = summary(task, results)
    (results / f"summary-{task}.md").write_text(text)
    if not any(points for _, points in lines):
        print(text)
        return
    line_chart(lines, ROOT / "docs" / "img" / f"guidance-sweep-{task}.png",
               f"{task}: 1-NFE FD (power average, 3x) against class adherence, one point per guidance scale",
               x_label="adherence -log10(-mean log p of the asked-for label): 1 at log p = -0.1, 3 at -0.001",
               x_fitted=True)
    print(text)


if __name__ == "__main__":
    if "--summary" in sys.argv:
        main_summary(*[arg for arg in sys.argv[1:] if arg != "--summary"])
    else:
        curves.main(variants(), argv=[*sys.argv[1:], *(["--out", OUT] if "--out" not in sys.argv else [])])
