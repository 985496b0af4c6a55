"""The guidance placements of ``guidance.py`` on the class-conditional ring of ``run.py``.

Same protocol as ``run.py``'s ring (pretrain 1500 flow-matching steps, fine-tune
800 at Adam 3e-4, batch 256, 2000 held-out points), 1 NFE, scored from the raw
weights and from a ``WeightAverage(PowerFunctionDecay(6.94))`` kept beside the
fine-tune.

    PYTHONPATH=src python benchmarks/quality/guidance_ring.py --seed 0

Guided runs stored before the eighth round of issue 12 used the
rectification's uniform ``s``, the default then; the default with guidance
is now ``LogitNormalTime(0, 1)``. Pass ``rectify_time=BetaTime()`` to
reproduce them.
"""

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BenchmarkLoss, configure  # noqa: E402
from run import NULL, RING_CLASSES, RING_MODES, RING_STD, evaluate_ring, ring_batch, sample  # noqa: E402

import twinloss  # noqa: E402
from twinloss import toy  # noqa: E402
from twinloss_demo.training import train  # noqa: E402

METHODS = {
    "TwinFlow defaults (w 0.5)": lambda: BenchmarkLoss(),
    # equal quarters and the uniform s: the defaults without guidance when these runs were stored (since the tenth
    # round a fake share of 1/8, since the twelfth s towards the data on a conditioned batch)
    "TwinFlow w 0": lambda: BenchmarkLoss(
        guidance_scale=0.0, shares=twinloss.GroupShares(), rectify_time=twinloss.BetaTime()),
    "TwinFlow w 0.5, any-step rows only": lambda: BenchmarkLoss(guidance_groups=("any_step",)),
    "RCGM only (w 0.5)": lambda: BenchmarkLoss.rcgm(),
    "RCGM only (w 0)": lambda: BenchmarkLoss.rcgm(guidance_scale=0.0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/quality/results")
    args = parser.parse_args()
    full = dict(pretrain=1500, finetune=800, batch=256, width=256, eval=2000, lr=3e-4)
    quick = dict(pretrain=40, finetune=10, batch=64, width=32, eval=200, lr=3e-4)
    out, log, elapsed = configure(args, full, quick)

    torch.manual_seed(args.seed)
    model = toy.TimeMLP((2,), width=args.width, depth=4, num_classes=RING_CLASSES)
    g = torch.Generator().manual_seed(args.seed + 1)
    train(model, BenchmarkLoss.plain_flow_matching(), ring_batch(args.batch), steps=args.pretrain,
              lr=1e-3, generator=g)
    pretrained, state = copy.deepcopy(model), (torch.get_rng_state(), g.get_state())
    ev = torch.Generator().manual_seed(args.seed + 1000)
    held = toy.ring_mixture(args.eval, modes=RING_MODES, std=RING_STD, generator=ev)
    noise = torch.randn(args.eval, 2, generator=ev)
    labels = held.y % RING_CLASSES
    cond, uncond = {"y": labels}, {"y": torch.full_like(labels, NULL)}
    rows = {}
    for steps in (4, 50):
        rows[f"FM start, {steps} Euler"] = evaluate_ring(sample(pretrained, noise, steps, "multi", cond, uncond), labels, held.x)
    for name, make in METHODS.items():
        torch.set_rng_state(state[0])
        g.set_state(state[1])
        model = copy.deepcopy(pretrained)
        average = twinloss.WeightAverage(twinloss.PowerFunctionDecay(6.94))
        loss_fn = make()
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
        draw = ring_batch(args.batch)
        for _ in range(args.finetune):
            x, c, u = draw(g)
            loss = loss_fn(model, x, cond=c, uncond=u, generator=g).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            average.update(model)
        rows[f"{name}, raw"] = evaluate_ring(sample(model, noise, 1, "few", cond, uncond), labels, held.x)
        rows[f"{name}, power avg"] = evaluate_ring(
            sample(average.sampling_model(model), noise, 1, "few", cond, uncond), labels, held.x
        )
        log(f"{name}: sw raw {rows[f'{name}, raw']['sw']:.3f} avg {rows[f'{name}, power avg']['sw']:.3f}")
    report = {"config": vars(args), "ring": rows, "wall_s": round(elapsed(), 1)}
    suffix = "_quick" if args.quick else ""
    (out / f"guidance_ring_seed{args.seed}{suffix}.json").write_text(json.dumps(report, indent=1) + "\n")
    log("done")


if __name__ == "__main__":
    main()
