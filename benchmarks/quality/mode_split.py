r"""How the ring's samples split each class between its two modes along a fine-tune (issue 12, fourteenth round).

Each class ``c`` of the ring owns two opposite modes, ``c`` and ``c + 4``,
and the thirteenth round found that the ring's figure is mostly how the
one-step samples split each class between them. This script follows that
split through one fine-tune: every ``--every`` steps it draws the
held-out noise through the raw weights and the power average at 1 NFE, and
every ``--ode-every`` steps through the raw weights' own 50-step ODE
(``AnyStepSampler(50, mode="multi")``, the real velocity field alone), and
records, per class, the share of its samples in mode ``c`` among those in
its two modes (the data's is 1/2).

The summary reads two things from a run after 1x:

* ``deviation``: the mean over checkpoints and classes of
  :math:`|\text{split} - 1/2|`, for the one-step raw weights, the power
  average and the ODE;
* ``one_step_ode_correlation``: the correlation between the raw weights'
  one-step split and their ODE's split over the checkpoints where both
  were read (every class), i.e. whether the one-step map's split is its own
  or the velocity field's.

Methods are ``curves.py``'s and ``split_variants.py``'s, on ``curves.py``'s
ring (the same pretrained weights and batches; 16000 held-out samples).

    export PYTHONPATH=$PWD/src:$PWD/adapters:$PWD/demo OMP_NUM_THREADS=1
    python benchmarks/quality/mode_split.py --seed 40 --methods "TwinFlow defaults" --methods "RCGM only, defaults"
"""

import argparse
import copy
import dataclasses
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import curves  # noqa: E402
import split_variants  # noqa: E402
import run  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from twinloss import metrics, toy  # noqa: E402

EVAL = 16000
"""Held-out samples drawn at each checkpoint: 4000 per class, so a split's sampling error is about 0.008."""

ODE_STEPS = 50
"""Euler steps of the ODE whose split is read beside the one-step map's."""


def class_splits(samples: Tensor, labels: Tensor) -> dict[str, list[float]]:
    """Per class ``c``: ``split``, the share of its samples in mode ``c`` among those in modes ``c`` and
    ``c + 4``, and ``leak``, the share in neither (nearest ring mode)."""
    mode = metrics.nearest_mode(samples, toy.ring_centers(run.RING_MODES))
    splits, leaks = [], []
    for c in range(run.RING_CLASSES):
        own = mode[labels == c]
        first, second = int((own == c).sum()), int((own == c + run.RING_CLASSES).sum())
        if first + second == 0:
            raise ValueError(f"class {c}: none of its {len(own)} samples lies in its own two modes")
        splits.append(first / (first + second))
        leaks.append(1 - (first + second) / len(own))
    return {"split": splits, "leak": leaks}


def summary(rows: list[dict], after: int) -> dict[str, float]:
    """``deviation/<kind>`` (mean ``|split - 1/2|`` over the rows past step ``after`` and the classes) for every
    kind read there, and ``one_step_ode_correlation`` over the rows that read both ``raw`` and ``ode``."""
    late = [row for row in rows if row["step"] > after]
    if not late:
        raise ValueError(f"after={after}: no checkpoint past it (last step {rows[-1]['step'] if rows else None})")
    out = {}
    for kind in ("raw", "power", "ode"):
        values = [abs(split - 0.5) for row in late if kind in row for split in row[kind]["split"]]
        if values:
            out[f"deviation/{kind}"] = statistics.fmean(values)
    pairs = [(a - 0.5, b - 0.5) for row in late if "ode" in row
             for a, b in zip(row["raw"]["split"], row["ode"]["split"], strict=True)]
    if len(pairs) > 2:
        out["one_step_ode_correlation"] = statistics.correlation(*zip(*pairs, strict=True))
    return out


def split_curve(bench: curves.Bench, task: curves.Task, sizes: curves.Sizes, loss_fn, teacher, every: int,
                ode_every: int) -> list[dict]:
    """The splits of the pretrained model (step 0) and every ``every`` steps of a 3x fine-tune."""
    labels = bench.cond["y"]

    def read(model, kept: dict | None, step: int) -> dict:
        row = {"step": step, "raw": class_splits(curves.sample(model, bench, 1, "any"), labels)}
        if kept is not None:
            row["power"] = class_splits(curves.sample(kept["power"].sampling_model(model), bench, 1, "any"), labels)
        if step % ode_every == 0:
            row["ode"] = class_splits(curves.sample(model, bench, ODE_STEPS, "multi"), labels)
        return row

    last = common.checkpoint_steps(sizes.budget)[-1]
    rows = [read(bench.pretrained, None, 0)]
    common.finetune(copy.deepcopy(bench.pretrained), loss_fn, bench.draw, steps=last, lr=task.lr,
                    generator=bench.restart(), checkpoints=set(range(every, last + 1, every)),
                    on_checkpoint=lambda step, model, kept: rows.append(read(model, kept, step)), teacher=teacher)
    return rows


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", action="append", required=True, help="method names (curves.py's or split_variants.py's)")
    parser.add_argument("--every", type=int, default=50, help="fine-tune steps between one-step readings")
    parser.add_argument("--ode-every", type=int, default=400, help="fine-tune steps between ODE readings")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, seconds: a smoke run")
    parser.add_argument("--out", default=curves.DEFAULT_OUT)
    args = parser.parse_args(argv)
    for name in ("every", "ode_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1 step, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(1)
    task = curves.TASKS["ring"]
    sizes = task.quick if args.quick else dataclasses.replace(task.full, eval=EVAL)
    methods = curves.select({**curves.METHODS, **split_variants.VARIANTS}, args.methods)
    bench = task.prepare(args.seed, sizes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, make in methods.items():
        loss_fn, teacher = curves.unpack(make(bench.pretrained))
        rows = split_curve(bench, task, sizes, loss_fn, teacher, args.every, args.ode_every)
        report = {"task": "ring", "seed": args.seed, "method": name, "every": args.every, "ode_every": args.ode_every,
                  "budget": sizes.budget, "eval": sizes.eval, "summary": summary(rows, after=sizes.budget),
                  "rows": rows}
        path = out / f"ring_split_seed{args.seed}_{curves.slug(name)}{'_quick' if args.quick else ''}.json"
        path.write_text(json.dumps(report, indent=1) + "\n")
        print(f"seed {args.seed} {name}: {report['summary']} -> {path}", flush=True)


if __name__ == "__main__":
    main()
