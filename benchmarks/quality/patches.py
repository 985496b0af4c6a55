"""Real-data benchmark: 8x8 grey patches of scikit-learn's two bundled photographs.

Protocol (issue 12), scaled down to a shared 2-core machine:

* data: ``sklearn.datasets.load_sample_images()`` (china.jpg, flower.jpg), grey,
  downsampled 2x, 8x8 patches at stride 2 inside 24x24 tiles, scaled to [-1, 1].
  A quarter of the tiles, spread over each photograph, are held out (no patch
  shares a pixel with a held-out one; a first version held out the right
  quarter of each photograph, whose patches had 17% more contrast than the
  training ones). Four classes: source photograph x texture (gradient energy
  above or below that photograph's training median), null class 4 for guidance.
* figures: Frechet distance to held-out patches in the fixed random-conv
  feature space of ``twinloss.metrics.RandomConvFeatures`` (seed 0);
  diversity = mean pairwise distance of the samples over that of held-out
  patches; class accuracy of a small classifier trained once on the training
  patches (its held-out accuracy is printed as the ceiling).
* protocol: pretrain a conditional ``toy.TimeMLP`` with flow matching, then
  fine-tune the same weights with each objective for 3x a base budget,
  evaluating 1-NFE samples of the raw weights and of two weight averages kept
  beside training (``twinloss.WeightAverage``) along the way; flow matching
  continued for the same budget gives the 1/2/4/50-step references.

    PYTHONPATH=src python benchmarks/quality/patches.py --seed 0          # one seed
    PYTHONPATH=src python benchmarks/quality/patches.py --quick           # seconds

Guided runs stored before the eighth round of issue 12 used the
rectification's uniform ``s``, the default then; the default with guidance
is now ``LogitNormalTime(0, 1)``. Pass ``rectify_time=BetaTime()`` to
reproduce them.
"""

import argparse
import copy
import json
import time
from collections.abc import Callable

import torch
from common import BenchmarkLoss, checkpoint_steps, configure, finetune, fit_classifier
from torch import nn

import twinloss
from twinloss import metrics, toy
from twinloss.health import training_signals
from twinloss_demo.training import train

CLASSES = 4
NULL = CLASSES
SIZE = 8


# ----------------------------------------------------------------------------- data
def _grey(image) -> torch.Tensor:
    rgb = torch.tensor(image.copy(), dtype=torch.float32) / 255.0
    grey = rgb @ torch.tensor([0.299, 0.587, 0.114])
    return nn.functional.avg_pool2d(grey[None, None], 2)[0, 0]


def _block_patches(grey: torch.Tensor, block: int = 24, stride: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Patches of every ``block x block`` tile (none crosses a tile) and whether their tile is held out.

    A quarter of the tiles, spread over the whole photograph (tile ``(i, j)``
    with ``(i + 2 j) % 4 == 0``), are held out: train and held-out patches
    come from the same regions' statistics and share no pixel.
    """
    patches, held = [], []
    for i in range(grey.shape[0] // block):
        for j in range(grey.shape[1] // block):
            tile = grey[i * block : (i + 1) * block, j * block : (j + 1) * block]
            tiles = tile.unfold(0, SIZE, stride).unfold(1, SIZE, stride).reshape(-1, 1, SIZE, SIZE)
            patches.append(tiles * 2.0 - 1.0)
            held.append(torch.full((tiles.shape[0],), (i + 2 * j) % 4 == 0))
    return torch.cat(patches), torch.cat(held)


def _energy(patches: torch.Tensor) -> torch.Tensor:
    dx = (patches[..., :, 1:] - patches[..., :, :-1]).abs().mean((1, 2, 3))
    dy = (patches[..., 1:, :] - patches[..., :-1, :]).abs().mean((1, 2, 3))
    return dx + dy


def patch_data() -> dict[str, torch.Tensor]:
    """Training and held-out patches ``[N, 1, 8, 8]`` with their class labels."""
    from sklearn.datasets import load_sample_images

    parts = {"train_x": [], "train_y": [], "held_x": [], "held_y": []}
    for index, image in enumerate(load_sample_images().images):
        patches, held = _block_patches(_grey(image))
        train = patches[~held]
        median = _energy(train).median()
        for name, x in (("train", train), ("held", patches[held])):
            parts[f"{name}_x"].append(x)
            parts[f"{name}_y"].append(2 * index + (_energy(x) > median).long())
    return {name: torch.cat(values) for name, values in parts.items()}


class PatchClassifier(nn.Module):
    def __init__(self, width: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(SIZE * SIZE, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
            nn.Linear(width, CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def train_classifier(data, steps: int, seed: int = 0) -> tuple[PatchClassifier, float]:
    """The class-accuracy classifier and its held-out accuracy (``common.fit_classifier``)."""
    return fit_classifier(PatchClassifier, data, steps, seed)


# ----------------------------------------------------------------------------- evaluation
FEATURES = metrics.RandomConvFeatures(in_channels=1, width=32, seed=0)


class Evaluator:
    """Fixed held-out reference, noise and labels; scores a sample set."""

    def __init__(self, data, classifier, count: int, seed: int) -> None:
        g = torch.Generator().manual_seed(10_000 + seed)
        rows = torch.randperm(data["held_x"].shape[0], generator=g)
        self.reference = data["held_x"][rows[:count]]
        self.second = data["held_x"][rows[count : 2 * count]]
        self.second_labels = data["held_y"][rows[count : 2 * count]]
        self.labels = data["held_y"][rows[:count]]
        self.noise = torch.randn(count, 1, SIZE, SIZE, generator=g)
        self.classifier = classifier
        self.reference_spread = float(metrics.mean_pairwise_distance(self.reference))
        self.cond = {"y": self.labels}
        self.uncond = {"y": torch.full_like(self.labels, NULL)}

    @torch.no_grad()
    def score(self, samples: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, float]:
        labels = self.labels if labels is None else labels
        samples = samples.clamp(-1, 1)
        logits = self.classifier(samples)
        return {
            "fd": float(metrics.image_frechet_distance(samples, self.reference, features=FEATURES)),
            "diversity": float(metrics.mean_pairwise_distance(samples)) / self.reference_spread,
            "class_acc": float((logits.argmax(1) == labels).float().mean()),
            "class_logp": float(logits.log_softmax(1).gather(1, labels[:, None]).mean()),
        }

    def sample(self, model, steps: int, mode: str, seed: int = 0) -> torch.Tensor:
        sampler = twinloss.AnyStepSampler(steps, mode=mode)
        return sampler(model, self.noise, cond=self.cond, generator=torch.Generator().manual_seed(seed)).sample


# ----------------------------------------------------------------------------- training
def draw_batch(data, batch: int, drop: float = 0.1, null: int = NULL):
    """``draw(generator) -> (x, {"y": labels}, {"y": null})``, a ``drop`` share of the labels set to ``null``."""
    def draw(generator):
        rows = torch.randint(0, data["train_x"].shape[0], (batch,), generator=generator)
        y = data["train_y"][rows]
        y = torch.where(torch.rand(batch, generator=generator) < drop, null, y)
        return data["train_x"][rows], {"y": y}, {"y": torch.full_like(y, null)}

    return draw


def mean_signals(loss_fn, model, probes) -> dict[str, float]:
    """``twinloss.health.training_signals`` averaged over fixed probe batches."""
    readings = [
        training_signals(loss_fn, model, x, cond=cond, uncond=uncond, generator=torch.Generator().manual_seed(99)).as_dict()
        for x, cond, uncond in probes
    ]
    return {key: sum(reading[key] for reading in readings) / len(readings) for key in readings[0]}


def methods(quick: bool) -> dict[str, Callable[[], BenchmarkLoss]]:
    table = {
        "TwinFlow defaults (w 0.5)": lambda: BenchmarkLoss(),
        # equal quarters and the uniform s: the defaults without guidance when these runs were stored (since the
        # tenth round a fake share of 1/8, since the twelfth s towards the data on a conditioned batch)
        "TwinFlow w 0": lambda: BenchmarkLoss(
            guidance_scale=0.0, shares=twinloss.GroupShares(), rectify_time=twinloss.BetaTime()),
        "RCGM only (w 0.5)": lambda: BenchmarkLoss.rcgm(),
        "RCGM only (w 0)": lambda: BenchmarkLoss.rcgm(guidance_scale=0.0),
    }
    return dict(list(table.items())[:2]) if quick else table


def run(args, log, extra_methods: dict | None = None) -> dict:
    torch.manual_seed(args.seed)
    data = patch_data()
    classifier, ceiling = train_classifier(data, args.classifier_steps)
    evaluator = Evaluator(data, classifier, args.eval, args.seed)
    log(f"patches: {data['train_x'].shape[0]} train, {data['held_x'].shape[0]} held out; classifier acc {ceiling:.3f}")
    report = {"classifier_acc": ceiling, "data": {"nfe": 0, **evaluator.score(evaluator.second, evaluator.second_labels)}}
    draw = draw_batch(data, args.batch)

    model = toy.TimeMLP((1, SIZE, SIZE), width=args.width, depth=4, num_classes=CLASSES)
    g = torch.Generator().manual_seed(args.seed + 1)
    started = time.perf_counter()
    train(model, BenchmarkLoss.plain_flow_matching(), draw, steps=args.pretrain, lr=1e-3, generator=g)
    log(f"pretrained {args.pretrain} steps in {time.perf_counter() - started:.0f}s")
    pretrained = copy.deepcopy(model)
    state = torch.get_rng_state(), g.get_state()
    report["FM start"] = {
        str(steps): evaluator.score(evaluator.sample(pretrained, steps, "multi")) for steps in (1, 2, 4, 50)
    }
    base = args.finetune
    checkpoints = checkpoint_steps(base)

    probes = [draw(torch.Generator().manual_seed(777 + index)) for index in range(2)]

    def fine(name: str, loss_fn, reference_steps: tuple[int, ...], mode: str, teacher=None, before_step=None) -> None:
        torch.set_rng_state(state[0])
        g.set_state(state[1])
        curve = {}

        def on_checkpoint(step, model, kept):
            point = {}
            if loss_fn.shares.fake > 0:  # the full recipe (not RCGM only or flow matching)
                point["signals"] = mean_signals(loss_fn, model, probes)
            for steps in reference_steps:
                point[f"raw/{steps}"] = evaluator.score(evaluator.sample(model, steps, mode))
                for key, average in kept.items():
                    point[f"{key}/{steps}"] = evaluator.score(evaluator.sample(average.sampling_model(model), steps, mode))
            curve[str(step)] = point

        t0 = time.perf_counter()
        finetune(copy.deepcopy(pretrained), loss_fn, draw, steps=3 * base, lr=args.lr, generator=g,
                 checkpoints=set(checkpoints), on_checkpoint=on_checkpoint, teacher=teacher, before_step=before_step)
        report[name] = curve
        first = curve[str(base)]
        last = curve[str(3 * base)]
        key = "1" if "raw/1" in first else str(reference_steps[0])
        log(f"{name}: FD 1x raw {first['raw/' + key]['fd']:.3f} ema {first['ema/' + key]['fd']:.3f} "
            f"power {first['power/' + key]['fd']:.3f}; 3x raw {last['raw/' + key]['fd']:.3f} "
            f"ema {last['ema/' + key]['fd']:.3f} power {last['power/' + key]['fd']:.3f} ({time.perf_counter() - t0:.0f}s)")

    if not args.skip_fm:
        fine("FM continued", BenchmarkLoss.plain_flow_matching(), (1, 2, 4, 50), "multi")
    for name, make in {**(methods(args.quick) if not args.skip_main else {}), **(extra_methods or {})}.items():
        made = make()
        loss_fn, teacher, before = (made, None, None) if isinstance(made, BenchmarkLoss) else made
        fine(name, loss_fn, (1,), "few", teacher=teacher, before_step=before)
    return report


def main(extra_methods: dict | None = None, tag: str = "patches") -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-fm", action="store_true")
    parser.add_argument("--skip-main", action="store_true")
    parser.add_argument("--only", action="append", default=None,
                        help="run only the extra methods whose name contains this text (repeatable)")
    parser.add_argument("--tag", default=tag, help="name of the result file (TAG_seedN.json)")
    parser.add_argument("--out", default="benchmarks/quality/results")
    args = parser.parse_args()
    full = dict(pretrain=4000, finetune=1000, batch=128, width=128, eval=1000, lr=1e-3, classifier_steps=1500)
    quick = dict(pretrain=40, finetune=8, batch=64, width=32, eval=200, lr=1e-3, classifier_steps=20)
    out, log, elapsed = configure(args, full, quick)

    if args.only:
        extra_methods = {name: make for name, make in (extra_methods or {}).items() if any(o in name for o in args.only)}
    tag = args.tag
    report = {"config": vars(args), tag: run(args, log, extra_methods)}
    report["wall_s"] = round(elapsed(), 1)
    suffix = "_quick" if args.quick else ""
    (out / f"{tag}_seed{args.seed}{suffix}.json").write_text(json.dumps(report, indent=1) + "\n")
    log("done")


if __name__ == "__main__":
    main()
