r"""The ring's sliced Wasserstein taken apart: how the one-step samples weigh the modes, and their shape.

Each class of the ring owns two opposite modes, so a one-step map has to
split every class's noise between them, and the split moves with each step
of training. On the ring's figure a split off by a few percent outweighs
everything else: over 80 fine-tuned models (`docs/quality.md`, thirteenth
round) the sliced Wasserstein ``sw`` correlates at 0.885 with
``mode_weight_error``, the total variation between the samples' and the
data's mode weights. ``sw_balanced`` weights the samples so that each mode
holds the data's share (``twinloss.metrics.mode_balancing_weights``) and
scores them again: what is left is the shape of the modes.

``curves.py`` records all three figures at every checkpoint of a run since
they were added; this script scores the runs kept before then. For each
saved run (``curves.py`` keeps the final power-average weights), it draws
1 NFE on the held-out set of ``curves.py --eval N`` and scores it with
``run.evaluate_ring``. With ``--against NAME`` it prints every other
method's paired gap to that method over the seeds given (mean ± standard
error, seeds where the method is lower).

    python benchmarks/quality/ring_modes.py --eval 16000 --seed 0 --seed 1 \
        --methods "TwinFlow w 0" "RCGM only w 0" --against "RCGM only w 0"
    python benchmarks/quality/ring_modes.py --scored ...   # the gaps again, from the figures written

Writes ``results/curves/ring_modes_seed{N}_eval{E}.json``: for each method
the 3x power-average figures, ``{name: evaluate_ring(...)}``, keeping the
rows of methods it does not name.
"""

import dataclasses
import json
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import curves  # noqa: E402

FIGURES = ("sw", "mode_weight_error", "sw_balanced")


def score_saved_runs(seed: int, names: list[str], results: Path, count: int) -> dict[str, dict[str, float]]:
    """``{name: run.evaluate_ring(...)}`` of the power average each run of ``names`` kept, 1 NFE."""
    task = curves.TASKS["ring"]
    bench = task.prepare(seed, dataclasses.replace(task.full, eval=count))
    variant = f"_eval{count}" if count != task.full.eval else ""
    return {name: bench.score(curves.sample(curves.load_weights(bench, results, "ring", seed, name, "power", variant),
                                            bench, 1, "few"))
            for name in names}


def paired_gaps(reports: list[dict[str, dict[str, float]]], against: str) -> dict[str, dict[str, str]]:
    """Each method's figures minus ``against``'s on the same seed: mean ± standard error (seeds lower)."""
    names = [name for name in reports[0] if name != against]
    table = {}
    for name in names:
        table[name] = {}
        for figure in FIGURES:
            gaps = [report[name][figure] - report[against][figure] for report in reports]
            error = statistics.stdev(gaps) / len(gaps) ** 0.5 if len(gaps) > 1 else float("nan")
            lower = sum(gap < 0 for gap in gaps)
            table[name][figure] = f"{statistics.mean(gaps):+.4f} ± {error:.4f} ({lower}/{len(gaps)})"
    return table


def main() -> None:
    parser = curves.saved_runs_parser(__doc__, ["ring"], "method names (required)")
    parser.add_argument("--eval", type=int, default=16000, help="held-out count of the runs (their --eval)")
    parser.add_argument("--against", default=None, help="print the paired gap of every other method to this one")
    parser.add_argument("--scored", action="store_true",
                        help="read the figures an earlier call wrote for these seeds instead of scoring again")
    args = parser.parse_args()
    if not args.methods:
        parser.error("--methods: name the runs to score")
    if args.against is not None and args.against not in args.methods:
        parser.error(f"--against {args.against!r} must be one of --methods")
    torch.set_num_threads(1)
    reports = []
    for seed in args.seed:
        path = args.results / f"ring_modes_seed{seed}_eval{args.eval}.json"
        if args.scored:
            written = json.loads(path.read_text()) if path.exists() else {}
            missing = [name for name in args.methods if name not in written]
            if missing:
                parser.error(f"--scored: {path} holds no figures for {missing}; score them first")
            report = {name: written[name] for name in args.methods}
        else:
            report = score_saved_runs(seed, args.methods, args.results, args.eval)
            curves.write_rows(path, report)
        for name, row in report.items():
            print(f"seed {seed} | {name} | " + " | ".join(f"{figure} {row[figure]:.4f}" for figure in FIGURES), flush=True)
        reports.append(report)
    rows = [row for report in reports for row in report.values() if math.isfinite(row["sw_balanced"])]
    if len(rows) > 2:
        print(f"over {len(rows)} runs, sw correlates with mode_weight_error at "
              f"{statistics.correlation([row['sw'] for row in rows], [row['mode_weight_error'] for row in rows]):.3f}; "
              f"standard deviation of sw {statistics.stdev(row['sw'] for row in rows):.4f}, "
              f"of sw_balanced {statistics.stdev(row['sw_balanced'] for row in rows):.4f}")
    if args.against is not None:
        for name, row in paired_gaps(reports, args.against).items():
            print(f"{name} minus {args.against} | " + " | ".join(f"{figure} {gap}" for figure, gap in row.items()))


if __name__ == "__main__":
    main()
