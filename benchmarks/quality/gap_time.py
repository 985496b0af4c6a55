r"""Where along the path the rectification's gap is a direction: its size and repeatability against ``s``.

Issue 12, seventh round. For the final raw weights of a ``curves.py`` run
(the weights the loss saw last; ``curves.py`` keeps them under
``results/curves/weights/``), on the model's own 1-NFE samples
:math:`\hat x` (the bench's noise and labels) and for each ``s`` of
:data:`S_GRID`, two independent re-noisings
:math:`y_i = s z_i + (1 - s) \hat x` give two gaps
:math:`\Delta v_i = \mathrm{clamp}(F(y_i, -s, -s) - F(y_i, s, s), -1, 1)`,
the rectification's own (step 7). Per ``s``:

* ``rms``: the gap's root mean square per entry;
* ``repeatability``: the mean over samples of :math:`\cos(\Delta v_1, \Delta v_2)`.
  The Barron rectification pushes each row along its gap's unit direction,
  whatever its size, so this is the share of that unit push that two
  re-noisings of the same sample agree on: for a gap
  :math:`\Delta v = g(\hat x) + n` with isotropic noise ``n`` independent
  between draws, :math:`E \cos \approx |g|^2 / (|g|^2 + E|n|^2)` in many dimensions.
  Near 1 the push is a property of the sample (signal); near 0 it is a
  property of the re-noising (noise the rectification amplifies to unit size).

    export PYTHONPATH=$PWD/src:$PWD/adapters:$PWD/demo OMP_NUM_THREADS=1
    python benchmarks/quality/gap_time.py --task patches --seed 0 --seed 1 --seed 2 --methods "TwinFlow w 0" "TwinFlow w 0, s clean"

Writes the named methods' rows into ``results/curves/gaptime_{task}_seed{N}.json``
(rows of other methods already there are kept) and prints a table.
"""

import sys
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import curves  # noqa: E402

import twinloss  # noqa: E402

S_GRID = (0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95)
"""The re-noising times at which the gap is read."""


@torch.no_grad()
def gap_by_time(
    model: nn.Module,
    x_hat: Tensor,
    cond: dict[str, Tensor],
    s_values: tuple[float, ...] = S_GRID,
    *,
    clamp: float = 1.0,
    generator: torch.Generator | None = None,
) -> dict[str, dict[str, float]]:
    """``{f"{s:g}": {"rms": ..., "repeatability": ...}}`` for every ``s`` of ``s_values`` (module docstring)."""
    path = twinloss.LinearPath()
    report = {}
    for value in s_values:
        s = torch.full((x_hat.shape[0],), float(value), dtype=x_hat.dtype)
        gaps = []
        for _ in range(2):
            y = path.sample(x_hat, torch.randn(x_hat.shape, dtype=x_hat.dtype, generator=generator), s).x_t
            gaps.append((model(y, -s, -s, **cond) - model(y, s, s, **cond)).clamp(-clamp, clamp).flatten(1))
        first, second = gaps
        report[f"{value:g}"] = {
            "rms": float(first.square().mean().sqrt()),
            "repeatability": float(functional.cosine_similarity(first, second, dim=1).mean()),
        }
    return report


def main() -> None:
    args = curves.saved_runs_parser(__doc__, sorted(curves.TASKS), "method names (default: TwinFlow w 0)").parse_args()
    torch.set_num_threads(1)
    task = curves.TASKS[args.task]
    for seed in args.seed:
        bench = task.prepare(seed, task.full)
        cond = bench.cond or {}
        report = {}
        for name in args.methods or ["TwinFlow w 0"]:
            model = curves.load_weights(bench, args.results, task.name, seed, name, "raw")
            x_hat = curves.sample(model, bench, 1, "few")
            report[name] = gap_by_time(model, x_hat, cond, generator=torch.Generator().manual_seed(7))
            cells = " | ".join(f"s {s}: {row['rms']:.3f}, cos {row['repeatability']:.2f}"
                               for s, row in report[name].items())
            print(f"{task.name} seed {seed} | {name} | {cells}", flush=True)
        curves.write_rows(args.results / f"gaptime_{task.name}_seed{seed}.json", report)


if __name__ == "__main__":
    main()
