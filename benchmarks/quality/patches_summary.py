"""Average the patch benchmark (and the guidance study) over seeds; tables and curves.

    PYTHONPATH=src python benchmarks/quality/patches_summary.py

Reads ``benchmarks/quality/results/{patches,guidance}_seed*.json``; writes
``benchmarks/quality/results/patches_summary.md`` and the figures
``docs/img/patches-fd.png``, ``docs/img/patches-signals.png``.
"""

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plotting import line_chart  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "quality" / "results"
SAMPLINGS = ("raw", "ema", "power")
SIGNALS = ("term/rectify", "cos/rectify", "cos/adv", "grad_norm/rectify", "grad_norm/base", "clamp/residual", "clamp/rectify")


def load(tag: str) -> list[dict]:
    runs = []
    for path in sorted(RESULTS.glob(f"{tag}_seed*.json")):
        if not path.stem.endswith("_quick"):
            runs.append(json.loads(path.read_text())[tag])
    return runs


def merge(first: list[dict], second: list[dict]) -> list[dict]:
    """Seed-wise union of two result lists (a later run that added methods to the same seeds)."""
    merged = [dict(run) for run in first]
    for index, run in enumerate(second):
        if index < len(merged):
            merged[index].update({k: v for k, v in run.items() if k not in merged[index]})
        else:
            merged.append(run)
    return merged


def stat(values: list[float]) -> str:
    if not values:
        return ""
    mean = statistics.fmean(values)
    return f"{mean:.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{mean:.3f}"


def methods_of(runs: list[dict]) -> list[str]:
    names = []
    for run in runs:
        for name, value in run.items():
            if isinstance(value, dict) and name not in ("data", "FM start") and name not in names:
                names.append(name)
    return names


def curve(runs, name, sampling, steps_nfe, metric, step) -> list[float]:
    return [
        run[name][step][f"{sampling}/{steps_nfe}"][metric]
        for run in runs
        if name in run and step in run[name] and f"{sampling}/{steps_nfe}" in run[name][step]
    ]


def table(runs: list[dict], title: str) -> str:
    if not runs:
        return ""
    steps = sorted({int(s) for name in methods_of(runs) for run in runs if name in run for s in run[name]})
    base = steps[len(steps) // 2 - 1] if len(steps) > 2 else steps[0]
    base = 1000 if 1000 in steps else base
    last = steps[-1]
    lines = [f"### {title} ({len(runs)} seed{'s' if len(runs) > 1 else ''}; 1x = {base} steps, 3x = {last})", ""]
    lines.append(f"Classifier accuracy on held-out patches: {stat([run['classifier_acc'] for run in runs])}; "
                 f"data vs data: FD {stat([run['data']['fd'] for run in runs])}, "
                 f"diversity {stat([run['data']['diversity'] for run in runs])}, "
                 f"class acc {stat([run['data']['class_acc'] for run in runs])}.")
    lines.append("")
    if "FM start" in runs[0]:
        lines.append("| FM start (pretrained) | " + " | ".join(f"{k} Euler" for k in ("1", "2", "4", "50")) + " |")
        lines.append("|---|---:|---:|---:|---:|")
        lines.append("| FD | " + " | ".join(stat([run["FM start"][k]["fd"] for run in runs]) for k in ("1", "2", "4", "50")) + " |")
        lines.append("")
    header = "| method | NFE | " + " | ".join(
        f"FD {s} 1x | FD {s} 3x" for s in SAMPLINGS) + " | div 3x (power) | acc 3x (power) |"
    lines += [header, "|---|---:|" + "---:|" * (2 * len(SAMPLINGS) + 2)]
    for name in methods_of(runs):
        nfes = ("1", "2", "4", "50") if name.startswith("FM") else ("1",)
        for nfe in nfes:
            cells = []
            for sampling in SAMPLINGS:
                cells.append(stat(curve(runs, name, sampling, nfe, "fd", str(base))))
                cells.append(stat(curve(runs, name, sampling, nfe, "fd", str(last))))
            cells.append(stat(curve(runs, name, "power", nfe, "diversity", str(last))))
            cells.append(stat(curve(runs, name, "power", nfe, "class_acc", str(last))))
            lines.append(f"| {name} | {nfe} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("1-NFE FD curve (power average) by fine-tune step:")
    lines.append("")
    lines.append("| method | " + " | ".join(str(s) for s in steps) + " |")
    lines.append("|---|" + "---:|" * len(steps))
    for name in methods_of(runs):
        nfe = "4" if name.startswith("FM") else "1"
        label = f"{name} ({nfe} steps)" if name.startswith("FM") else name
        lines.append(f"| {label} | " + " | ".join(stat(curve(runs, name, "power", nfe, "fd", str(s))) for s in steps) + " |")
    lines.append("")
    signal_rows = [name for name in methods_of(runs) if any("signals" in run[name][str(last)] for run in runs if name in run)]
    if signal_rows:
        lines.append("Training signals (mean over probe batches and seeds), at 1x -> 3x:")
        lines.append("")
        lines.append("| method | " + " | ".join(SIGNALS) + " |")
        lines.append("|---|" + "---:|" * len(SIGNALS))
        for name in signal_rows:
            cells = []
            for key in SIGNALS:
                ends = []
                for step in (str(base), str(last)):
                    values = [run[name][step]["signals"][key] for run in runs if name in run]
                    ends.append(f"{statistics.fmean(values):.2f}")
                cells.append(" -> ".join(ends))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def sweep(runs: list[dict]) -> str:
    """Guidance scale against FD, diversity and class accuracy at 1 NFE (power average), 1x and 3x."""
    scales = {"TwinFlow w 0": 0.0, "TwinFlow w 0.2": 0.2, "TwinFlow defaults (w 0.5)": 0.5, "TwinFlow w 0.8": 0.8}
    present = [name for name in scales if any(name in run for run in runs)]
    if not present:
        return ""
    steps = sorted({int(s) for run in runs for name in present if name in run for s in run[name]})
    base, last = (1000 if 1000 in steps else steps[0]), steps[-1]
    lines = ["### Guidance sweep (1 NFE, power average; seeds as above)", "",
             "| w | effective CFG 1/(1-w) | FD 1x | FD 3x | diversity 3x | class acc 3x |", "|---:|---:|---:|---:|---:|---:|"]
    for name in present:
        w = scales[name]
        cells = [stat(curve(runs, name, "power", "1", "fd", str(base))), stat(curve(runs, name, "power", "1", "fd", str(last))),
                 stat(curve(runs, name, "power", "1", "diversity", str(last))),
                 stat(curve(runs, name, "power", "1", "class_acc", str(last)))]
        lines.append(f"| {w} | {1 / (1 - w):.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figure(runs: list[dict], path: Path, series: list[tuple[str, str, str]], metric: str, title: str,
           signal: bool = False) -> None:
    """Lines of ``metric`` (or a training signal) against fine-tune step; series: (method, sampling, nfe)."""
    lines = []
    for name, sampling, nfe in series:
        points = []
        for step in sorted({int(s) for run in runs if name in run for s in run[name]}):
            if signal:
                values = [run[name][str(step)]["signals"][metric] for run in runs
                          if name in run and "signals" in run[name][str(step)]]
            else:
                values = curve(runs, name, sampling, nfe, metric, str(step))
            if values:
                points.append((step, statistics.fmean(values)))
        lines.append((name if signal else f"{name}, {sampling}, {nfe} NFE", points))
    line_chart(lines, path, title, around_zero=signal)


def main() -> None:
    patches, guidance = load("patches"), merge(load("guidance"), load("guidance_extra"))
    text = table(patches, "Real patches") + "\n" + table(guidance, "Guidance variants (patches)")
    text += "\n" + sweep(merge(patches, guidance))
    (RESULTS / "patches_summary.md").write_text(text)
    print(text)
    main_methods = [n for n in methods_of(patches) if not n.startswith("FM")]
    series = [(n, "power", "1") for n in main_methods]
    series += [("FM continued", "power", "4"), ("FM continued", "power", "50")]
    figure(patches, ROOT / "docs" / "img" / "patches-fd.png", series, "fd",
           "Real patches: FD at 1 NFE (power-profile weight average) vs fine-tune steps; FM 4/50 steps for reference")
    raw = [(n, "raw", "1") for n in main_methods] + [("FM continued", "raw", "4"), ("FM continued", "raw", "50")]
    figure(patches, ROOT / "docs" / "img" / "patches-fd-raw.png", raw, "fd",
           "Real patches: FD at 1 NFE, raw online weights, vs fine-tune steps")
    both = patches + guidance
    twin = [(n, "", "") for n in ("TwinFlow w 0", "TwinFlow defaults (w 0.5)", "TwinFlow w 0.8")]
    figure(both, ROOT / "docs" / "img" / "patches-signals.png", twin, "cos/rectify",
           "cos(rectification gradient, base gradient) vs fine-tune steps", signal=True)
    figure(both, ROOT / "docs" / "img" / "patches-rectify-term.png", twin, "term/rectify",
           "Rectification loss term (probe batches) vs fine-tune steps: flat when healthy, rising when not", signal=True)
    figure(both, ROOT / "docs" / "img" / "patches-clamp.png", twin, "clamp/rectify",
           "Fraction of velocity-gap entries at the rectification clamp vs fine-tune steps", signal=True)
    figure(guidance + patches, ROOT / "docs" / "img" / "guidance-fd.png",
           [(n, "power", "1") for n in methods_of(both)
            if not n.startswith(("FM", "RCGM")) and n != "TwinFlow w 0.8"], "fd",
           "Guidance variants: FD at 1 NFE (power average) vs fine-tune steps (w 0.8 off the scale: table)")


if __name__ == "__main__":
    main()
