r"""How far an EMA teacher's field sits from the online one while the RCGM chain reads it.

Issue 12, twenty-seventh round. For each guidance scale and EMA decay, fine-tune the task's pretrained model with
the default loss whose RCGM chain reads ``EMATeacher(decay)`` (the guidance pass stays online), updated after
every step. Every ``--every`` steps, on a fixed probe of noise ``z`` and labels, read the relative distance of the
average's one-jump field from the online one,

.. math:: \frac{\lVert F_\theta(z, 1, 0) - F_{\bar\theta}(z, 1, 0) \rVert}{\lVert F_\theta(z, 1, 0) \rVert},

the field the one-step rows train, the direction of that lag on the instantaneous field at the middle of the path
(twenty-eighth round), the cosine between the online-minus-average field and the online guidance direction,

.. math:: \cos\big(F_\theta(x_t, t, t, c) - F_{\bar\theta}(x_t, t, t, c),\;
          F_\theta(x_t, t, t, c) - F_\theta(x_t, t, t, \varnothing)\big),

on a probe of data rows noised at ``t`` spread over ``[0.1, 0.9]`` (0 when the lag is random with respect to the
guidance direction; positive when the online field runs ahead of its average along it), and record the residual
clamp rate the loss reports
(:attr:`~twinloss.TwinFlowOutput.clamp_rates`). The chain's residual divides the gap between the online jump and
the chain by ``d`` (ALGORITHM.md, step 5), so on the one-step rows what the average lags by reaches the clamp about
``1/d`` times larger. Both are reported as the mean over the run's second half (``late``) and its first.

    export PYTHONPATH=$PWD/src:$PWD/adapters:$PWD/demo OMP_NUM_THREADS=1
    python benchmarks/quality/teacher_lag.py --task patches --seed 0 --steps 1000

Writes ``results/curves/teacherlag_{task}_seed{N}.json``: one row per ``w {scale}, EMA {decay}``.
"""

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import curves  # noqa: E402
from common import BenchmarkLoss  # noqa: E402
from common import finetune  # noqa: E402

import twinloss  # noqa: E402

GUIDANCE_SCALES = (0.5, 0.0)
DECAYS = (0.0, 0.9, 0.99)
"""0 holds the weights of the last update, so it reads the online field (lag 0): the clamp rate's baseline."""


@torch.no_grad()
def relative_lag(model: nn.Module, teacher: twinloss.Teacher, noise: Tensor, cond: dict[str, Tensor]) -> float:
    """``|F_online(z, 1, 0) - F_teacher(z, 1, 0)| / |F_online(z, 1, 0)|`` over the whole probe."""
    ones = torch.ones(noise.shape[0], dtype=noise.dtype)
    online = model(noise, ones, torch.zeros_like(ones), **cond)
    return float((online - teacher(model, noise, ones, torch.zeros_like(ones), cond)).norm() / online.norm())


@torch.no_grad()
def lag_along_guidance(model: nn.Module, teacher: twinloss.Teacher, x_t: Tensor, t: Tensor,
                       cond: dict[str, Tensor], uncond: dict[str, Tensor]) -> float:
    """The cosine, over the whole probe, between ``F_online(x_t, t, t, c) - F_teacher(x_t, t, t, c)`` and the
    online guidance direction ``F_online(x_t, t, t, c) - F_online(x_t, t, t, null)`` (0 when there is no lag)."""
    online = model(x_t, t, t, **cond)
    lag = online - teacher(model, x_t, t, t, cond)
    direction = online - model(x_t, t, t, **uncond)
    norms = lag.norm() * direction.norm()
    return float((lag * direction).sum() / norms) if norms > 0 else 0.0


def mid_path_probe(x: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
    """``(x_t, t)``: the rows of ``x`` noised by ``noise`` at ``t`` spread evenly over ``[0.1, 0.9]``."""
    t = torch.linspace(0.1, 0.9, x.shape[0], dtype=x.dtype)
    return twinloss.LinearPath().sample(x, noise, t).x_t, t


class ClampRecorder:
    """Calls the loss and keeps each step's residual clamp rate (0 without an RCGM chain)."""

    def __init__(self, loss_fn: BenchmarkLoss) -> None:
        self.loss_fn = loss_fn
        self.rates: list[float] = []

    def __call__(self, *args, **kwargs) -> twinloss.TwinFlowOutput:
        out = self.loss_fn(*args, **kwargs)
        self.rates.append(float(out.clamp_rates.get("residual", 0.0)))
        return out


def halves(values: list[float]) -> dict[str, float]:
    """The mean of the second half (``late``) and of the first (``early``)."""
    middle = len(values) // 2
    return {"late": statistics.mean(values[middle:]), "early": statistics.mean(values[:middle])}


def lag_run(bench: curves.Bench, lr: float, guidance_scale: float, decay: float, steps: int, every: int,
            probe: tuple[Tensor, dict[str, Tensor]],
            mid_path: tuple[Tensor, Tensor, dict[str, Tensor]] | None = None) -> dict[str, dict[str, float]]:
    """Fine-tune a copy of ``bench.pretrained`` for ``steps`` with the chain on ``EMATeacher(decay)``; the lag
    (read every ``every`` steps from ``2 * every`` on), with ``mid_path = (x_t, t, uncond)`` (the probe's labels)
    the lag's alignment with the guidance direction there (:func:`lag_along_guidance`), and the residual clamp
    rate, each as :func:`halves`."""
    if steps < 4 * every:
        raise ValueError(f"steps must be at least 4 * every = {4 * every} so each half holds a reading, got {steps}")
    teacher = twinloss.EMATeacher(decay)
    recorder = ClampRecorder(BenchmarkLoss(guidance_scale=guidance_scale, rcgm_teacher=teacher))
    lags: list[float] = []
    alignments: list[float] = []

    def read_lag(step: int, model: nn.Module) -> None:
        if step % every == 0 and step >= 2 * every:  # the average has seen updates
            lags.append(relative_lag(model, teacher, *probe))
            if mid_path is not None:
                x_t, t, uncond = mid_path
                alignments.append(lag_along_guidance(model, teacher, x_t, t, probe[1], uncond))

    finetune(copy.deepcopy(bench.pretrained), recorder, bench.draw, steps=steps, lr=lr, generator=bench.restart(),
             checkpoints=set(), on_checkpoint=lambda *_: None, teacher=teacher, before_step=read_lag)
    row = {"lag": halves(lags), "residual_clamp_rate": halves(recorder.rates)}
    if mid_path is not None:
        row["lag_along_guidance"] = halves(alignments)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(curves.TASKS), default="patches")
    parser.add_argument("--seed", type=int, action="append", required=True)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="the task's quick sizes (a smoke run)")
    parser.add_argument("--results", type=Path, default=Path(curves.DEFAULT_OUT))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    task = curves.TASKS[args.task]
    for seed in args.seed:
        bench = task.prepare(seed, task.quick if args.quick else task.full)
        x, cond, uncond = bench.draw(torch.Generator().manual_seed(123))
        probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(124)), cond or {}
        mid_path = None
        if uncond is not None:  # a conditional task: the lag's direction against the guidance direction
            mid_path = (*mid_path_probe(x, torch.randn(x.shape, generator=torch.Generator().manual_seed(125))),
                        uncond)
        report = {}
        for scale in GUIDANCE_SCALES:
            for decay in DECAYS:
                row = lag_run(bench, task.lr, scale, decay, args.steps, args.every, probe, mid_path)
                report[f"w {scale:g}, EMA {decay:g}"] = row
                along = row.get("lag_along_guidance", {"late": float("nan"), "early": float("nan")})
                print(f"{task.name} seed {seed} | w {scale:g}, EMA {decay:g} | lag {row['lag']['late']:.4f} "
                      f"(first half {row['lag']['early']:.4f}) | along guidance {along['late']:+.3f} "
                      f"(first half {along['early']:+.3f}) | residual clamp rate "
                      f"{row['residual_clamp_rate']['late']:.4f}", flush=True)
        curves.write_rows(args.results / f"teacherlag_{task.name}_seed{seed}.json", report)


if __name__ == "__main__":
    main()
