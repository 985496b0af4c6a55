"""Fine-tuning quality benchmark: 1-NFE TwinFlow against the flow-matching model it started from.

Protocol (issue 5): pretrain with plain flow matching, fine-tune the *same* weights with
BenchmarkLoss for a fixed budget, and compare 1-NFE TwinFlow with the starting model at 1, 2, 4
and 50 Euler steps, on

* ``ring``: 8 Gaussians on a ring (std 0.1), class-conditional with 4 classes that each own two
  *opposite* modes (so a class is bimodal and its mean lies between modes; null class 4 for
  guidance),
  scored by sliced Wasserstein / MMD to held-out data, the within-mode diversity ratio,
  the off-mode fraction, mode coverage, class accuracy, and SW's two parts: the mode weight
  error and the SW with the modes weighted to the data's shares (``evaluate_ring``);
* ``shapes``: procedurally generated 8x8 images (squares, disks, bars, crosses), scored by the
  Fréchet distance in a fixed random-conv feature space (``twinloss.metrics.RandomConvFeatures``,
  seed 0) and a pairwise-distance diversity ratio.

Ablations (ring): TwinFlow share lambda, RCGM order 1 vs 2, guidance on/off, EMA vs online
teacher, and a control that continues flow matching for the same budget.

    PYTHONPATH=src python benchmarks/quality/run.py            # full run, seed 0 (~13 min on 2 cores)
    PYTHONPATH=src python benchmarks/quality/run.py --only ring --seed 1   # more seeds of one part
    PYTHONPATH=src python benchmarks/quality/run.py --quick    # seconds, for a smoke check

Guided runs stored before the eighth round of issue 12 used the
rectification's uniform ``s``, the default then; the default with guidance
is now ``LogitNormalTime(0, 1)``. Pass ``rectify_time=BetaTime()`` to
reproduce them.
"""

import argparse
import copy
import json
import time

import torch
from common import BenchmarkLoss, configure

import twinloss
from twinloss import metrics, toy
from twinloss_demo.training import train

RING_STD, RING_MODES, RING_CLASSES = 0.1, 8, 4
NULL = RING_CLASSES  # the null class of the conditional ring model; class c owns modes c and c + 4


# ----------------------------------------------------------------------------- data
def shapes(n: int, generator: torch.Generator, size: int = 8) -> torch.Tensor:
    """``[n, 1, size, size]`` images in [-1, 1]: one random square, disk, bar or cross each."""
    kind = torch.randint(0, 5, (n,), generator=generator)
    center = 2.0 + torch.rand(n, 2, generator=generator) * (size - 5)
    radius = 1.2 + torch.rand(n, generator=generator) * 1.3
    level = 0.6 + 0.4 * torch.rand(n, generator=generator)
    grid = torch.arange(size, dtype=torch.float32) + 0.5
    dy = grid.view(1, size, 1) - center[:, 0].view(n, 1, 1)
    dx = grid.view(1, 1, size) - center[:, 1].view(n, 1, 1)
    r = radius.view(n, 1, 1)
    square = (dx.abs() <= r) & (dy.abs() <= r)
    disk = dx**2 + dy**2 <= r**2
    hbar = (dy.abs() <= 0.6) & (dx.abs() <= r + 1)
    vbar = (dx.abs() <= 0.6) & (dy.abs() <= r + 1)
    cross = hbar | vbar
    masks = torch.stack([square, disk, hbar, vbar, cross], dim=1)[torch.arange(n), kind]
    image = -1 + masks.float() * (1 + level.view(n, 1, 1))
    return image.unsqueeze(1)


# ----------------------------------------------------------------------------- evaluation
MMD_SAMPLES = 2000
"""The ring's MMD reads the first this many samples of each set: its cost is quadratic (``curves.py --eval``)."""


def evaluate_ring(samples, labels, held_out, seed=0):
    """The ring's figures. ``sw_balanced`` is the sliced Wasserstein distance with the samples
    weighted by ``metrics.mode_balancing_weights``: ``sw`` without the part that
    ``mode_weight_error`` reads (how the samples weigh the modes), so it reads the shape of the
    modes alone; NaN when a mode holds data but no sample, which no weight can fill."""
    centers = toy.ring_centers(RING_MODES)
    stats = metrics.mode_statistics(samples, held_out, centers, radius=0.5)
    accuracy = float((metrics.nearest_mode(samples, centers) % RING_CLASSES == labels).float().mean())

    def sliced_wasserstein(weights=None):
        generator = torch.Generator().manual_seed(seed)
        return float(metrics.sliced_wasserstein(samples, held_out, generator=generator, x_weights=weights))

    balanced = float("nan")
    if all(p > 0 or q == 0 for p, q in zip(stats.mode_fractions, stats.data_mode_fractions, strict=True)):
        balanced = sliced_wasserstein(metrics.mode_balancing_weights(samples, held_out, centers))
    return {
        "sw": sliced_wasserstein(),
        "sw_balanced": balanced,
        "mmd": float(metrics.mmd_rbf(samples[:MMD_SAMPLES], held_out[:MMD_SAMPLES], bandwidths=(0.1, 0.3, 1.0))),
        "diversity": stats.diversity_ratio,
        "off_mode": stats.off_mode_fraction,
        "mode_weight_error": stats.mode_weight_error,
        "coverage": stats.coverage,
        "class_acc": accuracy,
    }


FEATURES = metrics.RandomConvFeatures(in_channels=1, width=32, seed=0)


def evaluate_shapes(samples, held_out, seed=0):
    pairwise = float(metrics.mean_pairwise_distance(samples)) / float(metrics.mean_pairwise_distance(held_out))
    return {
        "fd": float(metrics.image_frechet_distance(samples.clamp(-1, 1), held_out, features=FEATURES)),
        "sw": float(metrics.sliced_wasserstein(samples, held_out, generator=torch.Generator().manual_seed(seed))),
        "diversity": pairwise,
    }


def sample(model, noise, steps, mode, cond=None, uncond=None, guidance=0.0, seed=0):
    sampler = twinloss.AnyStepSampler(steps, mode=mode, guidance_scale=guidance)
    uncond = uncond if guidance > 0 else None  # the null conditioning is only read by guidance
    return sampler(model, noise, cond=cond, uncond=uncond, generator=torch.Generator().manual_seed(seed)).sample


# ----------------------------------------------------------------------------- ring
def ring_batch(batch, drop=0.1):
    def draw(generator):
        points = toy.ring_mixture(batch, modes=RING_MODES, std=RING_STD, generator=generator)
        dropped = torch.rand(batch, generator=generator) < drop
        y = torch.where(dropped, NULL, points.y % RING_CLASSES)
        return points.x, {"y": y}, {"y": torch.full_like(y, NULL)}
    return draw


def run_ring(args, log):
    torch.manual_seed(args.seed)
    model = toy.TimeMLP((2,), width=args.width, depth=4, num_classes=RING_CLASSES)
    g = torch.Generator().manual_seed(args.seed + 1)
    started = time.perf_counter()
    train(model, BenchmarkLoss.plain_flow_matching(), ring_batch(args.batch), steps=args.pretrain,
              lr=1e-3, generator=g)
    log(f"ring: pretrained {args.pretrain} steps in {time.perf_counter() - started:.0f}s")
    pretrained = copy.deepcopy(model)
    state = torch.get_rng_state(), g.get_state()

    ev = torch.Generator().manual_seed(args.seed + 1000)
    held = toy.ring_mixture(args.eval, modes=RING_MODES, std=RING_STD, generator=ev)
    second = toy.ring_mixture(args.eval, modes=RING_MODES, std=RING_STD, generator=ev)
    noise = torch.randn(args.eval, 2, generator=ev)
    labels = held.y % RING_CLASSES  # one label per sample, the held-out set's class balance
    cond, uncond = {"y": labels}, {"y": torch.full_like(labels, NULL)}

    rows = {"data (second draw)": {"nfe": 0, **evaluate_ring(second.x, second.y % RING_CLASSES, held.x)}}
    for steps in (1, 2, 4, 50):
        for w in ((0.0, 0.5) if steps == 50 else (0.0,)):
            name = f"FM start, {steps} Euler" + (f", CFG {w}" if w else "")
            x = sample(pretrained, noise, steps, "multi", cond, uncond, guidance=w)
            rows[name] = {"nfe": steps * (2 if w else 1), **evaluate_ring(x, labels, held.x)}

    def finetune(name, loss_fn, teacher=None, fm_control=False):
        torch.set_rng_state(state[0])
        g.set_state(state[1])
        model = copy.deepcopy(pretrained)
        t0 = time.perf_counter()
        train(model, loss_fn, ring_batch(args.batch), steps=args.finetune, lr=args.lr, generator=g,
                  teacher=teacher)
        seconds = time.perf_counter() - t0
        for steps in ((1, 50) if fm_control else (1, 2)):
            mode = "multi" if fm_control else "few"
            x = sample(model, noise, steps, mode, cond, uncond)
            rows[f"{name}, {steps} NFE"] = {"nfe": steps, **evaluate_ring(x, labels, held.x), "train_s": round(seconds, 1)}
        log(f"ring: {name}: {rows[f'{name}, 1 NFE']} ({seconds:.0f}s)")

    shares = twinloss.GroupShares.from_twin_share
    finetune("FM continued (control)", BenchmarkLoss.plain_flow_matching(), fm_control=True)
    finetune("TwinFlow default (lambda 1/2, order 2, w 0.5, online)", BenchmarkLoss())
    if not args.quick:
        for label, share in (("1/6", 1 / 6), ("1/3", 1 / 3), ("2/3", 2 / 3)):
            finetune(f"TwinFlow lambda {label}", BenchmarkLoss(shares=shares(share)))
        finetune("TwinFlow RCGM order 1", BenchmarkLoss(estimate_order=1))
        finetune("TwinFlow no guidance (w 0)",  # the unguided defaults when it was stored, written out
                 BenchmarkLoss(guidance_scale=0.0, shares=twinloss.GroupShares(), rectify_time=twinloss.BetaTime()))
        teacher = twinloss.EMATeacher()
        finetune("TwinFlow EMA teacher (0.99)", BenchmarkLoss(teacher=teacher), teacher=teacher)
        finetune("TwinFlow l2 distance", BenchmarkLoss(distance=twinloss.L2Distance()))
        finetune("TwinFlow no time weight", BenchmarkLoss(time_weight=None))
        finetune("RCGM only (no twin terms)", BenchmarkLoss.rcgm())
    return rows


# ----------------------------------------------------------------------------- shapes
def run_shapes(args, log):
    torch.manual_seed(args.seed)
    model = toy.TimeMLP((1, 8, 8), width=args.image_width, depth=4)
    g = torch.Generator().manual_seed(args.seed + 2)

    def draw(generator):
        return shapes(args.batch, generator), None, None

    started = time.perf_counter()
    train(model, BenchmarkLoss.plain_flow_matching(), draw, steps=args.image_pretrain, lr=1e-3,
              generator=g)
    log(f"shapes: pretrained {args.image_pretrain} steps in {time.perf_counter() - started:.0f}s")
    pretrained = copy.deepcopy(model)
    state = torch.get_rng_state(), g.get_state()
    ev = torch.Generator().manual_seed(args.seed + 2000)
    held, second = shapes(args.eval, ev), shapes(args.eval, ev)
    noise = torch.randn(args.eval, 1, 8, 8, generator=ev)
    rows = {"data (second draw)": {"nfe": 0, **evaluate_shapes(second, held)}}
    for steps in (1, 2, 4, 50):
        rows[f"FM start, {steps} Euler"] = {"nfe": steps, **evaluate_shapes(sample(pretrained, noise, steps, "multi"), held)}

    def finetune(name, loss_fn, fm_control=False):
        torch.set_rng_state(state[0])
        g.set_state(state[1])
        model = copy.deepcopy(pretrained)
        t0 = time.perf_counter()
        train(model, loss_fn, draw, steps=args.image_finetune, lr=args.lr, generator=g)
        seconds = time.perf_counter() - t0
        for steps in ((1, 50) if fm_control else (1, 2)):
            x = sample(model, noise, steps, "multi" if fm_control else "few")
            rows[f"{name}, {steps} NFE"] = {"nfe": steps, **evaluate_shapes(x, held), "train_s": round(seconds, 1)}
        log(f"shapes: {name}: {rows[f'{name}, 1 NFE']} ({seconds:.0f}s)")

    finetune("FM continued (control)", BenchmarkLoss.plain_flow_matching(), fm_control=True)
    finetune("TwinFlow (w 0, lambda 1/2)", BenchmarkLoss(guidance_scale=0.0, shares=twinloss.GroupShares()))
    if not args.quick:
        finetune("RCGM only (no twin terms, w 0)", BenchmarkLoss.rcgm(guidance_scale=0.0))
        finetune("TwinFlow (w 0, lambda 1/3)",
                 BenchmarkLoss(guidance_scale=0.0, shares=twinloss.GroupShares.from_twin_share(1 / 3)))
    return rows


def table(rows, columns):
    head = "| method | " + " | ".join(columns) + " |\n|---|" + "---:|" * len(columns) + "\n"
    body = ""
    for name, r in rows.items():
        cells = []
        for c in columns:
            v = r.get(c, "")
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        body += f"| {name} | " + " | ".join(cells) + " |\n"
    return head + body


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=("ring", "shapes"), default=None)
    parser.add_argument("--out", default="benchmarks/quality/results")
    args = parser.parse_args()
    full = dict(pretrain=1500, finetune=800, batch=256, width=256, eval=2000, lr=3e-4,
                image_pretrain=2000, image_finetune=800, image_width=512)
    quick = dict(pretrain=40, finetune=10, batch=64, width=32, eval=200, lr=3e-4,
                 image_pretrain=40, image_finetune=10, image_width=32)
    out, log, elapsed = configure(args, full, quick)

    report = {"config": vars(args)}
    if args.only in (None, "ring"):
        report["ring"] = run_ring(args, log)
        (out / f"ring_seed{args.seed}.md").write_text(
            table(report["ring"], ["nfe", "sw", "mmd", "diversity", "off_mode", "coverage", "class_acc", "train_s"]))
    if args.only in (None, "shapes"):
        report["shapes"] = run_shapes(args, log)
        (out / f"shapes_seed{args.seed}.md").write_text(table(report["shapes"], ["nfe", "fd", "sw", "diversity", "train_s"]))
    report["wall_s"] = round(elapsed(), 1)
    suffix = "_quick" if args.quick else ""
    part = f"{args.only}_" if args.only else ""
    (out / f"results_{part}seed{args.seed}{suffix}.json").write_text(json.dumps(report, indent=2) + "\n")
    for part in ("ring", "shapes"):
        if part in report:
            print(f"\n## {part}\n")
            print((out / f"{part}_seed{args.seed}.md").read_text())
    log("done")


if __name__ == "__main__":
    main()
