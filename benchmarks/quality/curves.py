"""One curve protocol for the ring, shapes and patches benchmarks (issue 12).

Protocol, the same on every task:

* pretrain the task's ``toy.TimeMLP`` with plain flow matching, exactly as
  ``run.py`` (ring, shapes) and ``patches.py`` do, same seeds and generators;
* fine-tune the *same* weights with each objective for 3x the task's budget
  (``common.finetune``: Adam, grad clip 1, ``teacher.update`` when the method
  brings a teacher), keeping two weight averages beside training: "ema"
  (``WeightAverage(0.995)``) and "power" (``WeightAverage(PowerFunctionDecay(6.94))``,
  the documented way to sample);
* at 0.25, 0.5, 1, 1.5, 2 and 3 x budget, score 1-NFE samples
  (``AnyStepSampler(1, mode="few")``) of the raw weights and of both averages
  on fixed held-out noise and labels;
* the reference: flow matching continued for the same steps, scored at the
  same checkpoints at 1/2/4/50 Euler steps (``mode="multi"``), raw and
  averaged; the pretrained model at 1/2/4/50 steps; the data-vs-data floor.

| task    | data                                          | primary figure | budget 1x, lr |
|---------|-----------------------------------------------|----------------|---------------|
| ring    | 8-Gaussian ring, 4 classes (two opposite modes each) | sliced Wasserstein ``sw`` | 800 @ 3e-4 |
| shapes  | unconditional 8x8 shapes                      | FD in ``RandomConvFeatures`` space | 800 @ 3e-4 |
| patches | 8x8 grey patches of scikit-learn's photos, 4 classes | FD, same features | 1000 @ 1e-3 |
| digits  | scikit-learn's 8x8 handwritten digits, 10 classes | FD in a digit classifier's features | 1000 @ 1e-3 |

Lower is better for every primary figure. Diversity is reported on every
task, class accuracy on the conditional ones. Shapes is unconditional: a
method with guidance is not run there and its file records why.

One JSON file per (task, seed, method), so methods can run in parallel
processes: ``{out}/{task}_seed{N}_{slug}.json``, and
``{out}/{task}_seed{N}_reference.json`` for the flow-matching references and
the data floor (``--quick``, ``--scale``, ``--budget``, ``--width``, ``--lr`` and
``--eval`` runs add ``_quick`` / ``_scale{F}`` / ``_budget{N}`` / ``_width{N}`` /
``_lr{X}`` / ``_eval{N}`` to the name, so they never overwrite a full run).
``curves_summary.py`` reads them.

``--eval N`` scores N samples instead of the task's count; training is the
same run (the held-out draws have their own generator). The ring needs it:
at 2000 samples two draws of the data itself are 0.157 SW apart, about as
far as the methods are from the data, while at 16000 they are 0.065 apart
(the ring's MMD reads the first 2000 samples of each set, ``run.MMD_SAMPLES``).
Most of the ring's SW is how the one-step samples weigh the two modes of
each class; its records split that off (``mode_weight_error``) from the
shape of the modes (``sw_balanced``): see ``ring_modes.py``.

    export PYTHONPATH=$PWD/src:$PWD/adapters:$PWD/demo OMP_NUM_THREADS=1
    python benchmarks/quality/curves.py --task ring --seed 0                     # reference + every method
    python benchmarks/quality/curves.py --task patches --seed 1 --skip-fm --methods "TwinFlow w 0"
    python benchmarks/quality/curves.py --task shapes --seed 0 --skip-methods    # the reference alone
    python benchmarks/quality/curves.py --task ring --quick --out /tmp/curves    # seconds

Everything, one process per (task, seed, method or reference); then the summary:

    for task in ring shapes patches; do for seed in 0 1 2; do
      python benchmarks/quality/curves.py --task $task --seed $seed --skip-methods
      for method in "TwinFlow defaults" "RCGM only, defaults" "TwinFlow w 0" "RCGM only w 0"; do
        python benchmarks/quality/curves.py --task $task --seed $seed --skip-fm --methods "$method"
      done; done; done
    python benchmarks/quality/curves_summary.py

(``--methods "TwinFlow w 0"`` matches only that name; ``"TwinFlow"`` alone matches both TwinFlow rows.)
A variant study imports this module and calls ``curves.main(extra_methods={name: factory})``.
"""

import argparse
import copy
import dataclasses
import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import digits  # noqa: E402
import patches  # noqa: E402
import run  # noqa: E402
from common import BenchmarkLoss, checkpoint_steps, finetune  # noqa: E402

import twinloss  # noqa: E402
from twinloss import toy  # noqa: E402
from twinloss_demo.training import DrawBatch, train  # noqa: E402

PRETRAIN_LR = 1e-3
FM_STEPS = (1, 2, 4, 50)
SAMPLINGS = ("raw", "ema", "power")
MIDDLE = (0.2, 0.7)
"""The middle of the path, ``0.2 < t < 0.7``, where the loss's and the sampler's ``guidance_interval`` guide."""
GUIDED_REFERENCES = (("50-cfg2", 50, 1.0, None), ("50-cfg1.5", 50, 0.5, None), ("50-cfg1.25", 50, 0.25, None),
                     ("50-cfg3", 50, 2.0, None), ("4-cfg2", 4, 1.0, None),
                     ("50-cfg2-middle", 50, 1.0, MIDDLE), ("4-cfg2-middle", 4, 1.0, MIDDLE),
                     ("50-cfg1.25-middle", 50, 0.25, MIDDLE), ("4-cfg1.25-middle", 4, 0.25, MIDDLE))
"""Label, Euler steps, sampling ``guidance_scale`` and ``guidance_interval`` of the guided references
(conditional tasks).

``w = 0.5`` with the online teacher trains classifier-free guidance of scale
``1 / (1 - w) = 2`` into the model (``TwinFlowLoss``'s ``guidance_scale``), so
its like-for-like multi-step references are flow matching sampled at CFG 2,
``F_c + 1 (F_c - F_u)``, at 50 and at 4 Euler steps (issue 12's two
bars). Trained with ``guidance_interval=(0.2, 0.7)`` it is CFG 2 on the
middle of the path and none elsewhere, so its references are flow matching
sampled with CFG 2 on the steps that start there (``-middle``). CFG 1.25,
1.5 and 3 draw the multi-step frontier the settings of
``guidance_sweep.py`` are placed against.
"""
SAMPLE_SEED = 0
DEFAULT_OUT = "benchmarks/quality/results/curves"

Made = BenchmarkLoss | tuple[BenchmarkLoss, twinloss.Teacher]
MethodFactory = Callable[[nn.Module], Made]
"""``factory(pretrained_model) -> loss`` or ``(loss, teacher)``; the teacher gets ``update(model)`` each step."""

METHODS: dict[str, MethodFactory] = {
    "TwinFlow defaults": lambda pretrained: BenchmarkLoss(),
    "RCGM only, defaults": lambda pretrained: BenchmarkLoss.rcgm(),
    "TwinFlow w 0": lambda pretrained: BenchmarkLoss(guidance_scale=0.0),
    "RCGM only w 0": lambda pretrained: BenchmarkLoss.rcgm(guidance_scale=0.0),
}


# ----------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class Sizes:
    """How big one run is: pretraining steps, network width, batch, held-out count, fine-tune budget (1x)."""

    pretrain: int
    width: int
    batch: int
    eval: int
    budget: int
    classifier_steps: int = 0  # patches only: steps of its class-accuracy classifier
    twin_per_block: bool = False  # the network's sign pathway (toy.TimeMLP's twin_per_block)

    def scaled(self, factor: float) -> "Sizes":
        """The same run with every step count times ``factor`` (at least one step each)."""
        if not factor > 0:
            raise ValueError(f"--scale must be > 0, got {factor}")

        def steps(count: int) -> int:
            return max(1, round(count * factor)) if count else 0

        return dataclasses.replace(self, pretrain=steps(self.pretrain), budget=steps(self.budget),
                                   classifier_steps=steps(self.classifier_steps))


class SeparateTwin(nn.Module):
    """The twin field in a network of its own: rows at ``t < 0`` go to ``fake``, a copy of the pretrained ``real``.

    TwinFlow's one network shares every weight between the real field and the
    fake one; this wrapper shares none, so the fake rows cannot move the real
    field through shared weights (``--twin-separate``, sixteenth round). A batch
    without twin rows is ``real``'s own call, so RCGM-only is unchanged by it.
    """

    def __init__(self, real: nn.Module) -> None:
        super().__init__()
        self.real, self.fake = real, copy.deepcopy(real)

    def forward(self, x_t: Tensor, t: Tensor, r: Tensor, **cond: Tensor) -> Tensor:
        twin = t < 0
        if not bool(twin.any()):
            return self.real(x_t, t, r, **cond)
        out = torch.empty_like(x_t)
        for rows, network in ((twin, self.fake), (~twin, self.real)):
            if bool(rows.any()):
                out[rows] = network(x_t[rows], t[rows], r[rows], **{key: value[rows] for key, value in cond.items()})
        return out


@dataclass
class Bench:
    """One seed of a task, pretrained and ready: what the protocol fine-tunes, draws and scores.

    ``restart()`` puts the global torch generator and the fine-tune generator
    back where pretraining left them, so every objective sees the same batches
    and noise (as ``run.py`` and ``patches.py`` do).
    """

    pretrained: nn.Module
    draw: DrawBatch
    generator: torch.Generator
    noise: Tensor
    cond: dict[str, Tensor] | None
    uncond: dict[str, Tensor] | None
    score: Callable[[Tensor], dict[str, float]]
    floor: dict[str, float]
    notes: dict[str, float] = dataclasses.field(default_factory=dict)
    probe: tuple[Tensor, Tensor] | None = None
    """Held-out data and labels (conditional image tasks) on which ``anatomy.py`` reads the fields."""

    def __post_init__(self) -> None:
        self._states = torch.get_rng_state(), self.generator.get_state()

    def restart(self) -> torch.Generator:
        torch.set_rng_state(self._states[0])
        self.generator.set_state(self._states[1])
        return self.generator


@dataclass(frozen=True)
class Task:
    """A benchmark under the curve protocol.

    ``prepare(seed, sizes)`` pretrains the model and builds the held-out
    reference; ``primary`` names the figure the checks use (lower is better).
    """

    name: str
    primary: str
    conditional: bool
    lr: float
    full: Sizes
    quick: Sizes
    prepare: Callable[[int, Sizes], Bench]

    @property
    def budget(self) -> int:
        return self.full.budget


def pretrain(model: nn.Module, draw: DrawBatch, steps: int, generator: torch.Generator) -> nn.Module:
    """Plain flow matching from the freshly initialised ``model`` (Adam 1e-3, as the other scripts)."""
    train(model, BenchmarkLoss.plain_flow_matching(), draw, steps=steps, lr=PRETRAIN_LR, generator=generator)
    return model


def prepare_ring(seed: int, sizes: Sizes) -> Bench:
    """``run.run_ring``'s start: model after ``manual_seed(seed)``, batches from ``seed + 1``, held out from ``seed + 1000``."""
    torch.manual_seed(seed)
    model = toy.TimeMLP((2,), width=sizes.width, depth=4, num_classes=run.RING_CLASSES, twin_per_block=sizes.twin_per_block)
    generator = torch.Generator().manual_seed(seed + 1)
    draw = run.ring_batch(sizes.batch)
    pretrain(model, draw, sizes.pretrain, generator)
    held_generator = torch.Generator().manual_seed(seed + 1000)
    held = toy.ring_mixture(sizes.eval, modes=run.RING_MODES, std=run.RING_STD, generator=held_generator)
    second = toy.ring_mixture(sizes.eval, modes=run.RING_MODES, std=run.RING_STD, generator=held_generator)
    noise = torch.randn(sizes.eval, 2, generator=held_generator)
    labels = held.y % run.RING_CLASSES
    return Bench(
        pretrained=model, draw=draw, generator=generator, noise=noise, cond={"y": labels},
        uncond={"y": torch.full_like(labels, run.NULL)},
        score=lambda samples: run.evaluate_ring(samples, labels, held.x),
        floor=run.evaluate_ring(second.x, second.y % run.RING_CLASSES, held.x),
    )


def prepare_shapes(seed: int, sizes: Sizes) -> Bench:
    """``run.run_shapes``'s start: model after ``manual_seed(seed)``, batches from ``seed + 2``, held out from ``seed + 2000``."""
    torch.manual_seed(seed)
    model = toy.TimeMLP((1, 8, 8), width=sizes.width, depth=4, twin_per_block=sizes.twin_per_block)
    generator = torch.Generator().manual_seed(seed + 2)

    def draw(batch_generator: torch.Generator):
        return run.shapes(sizes.batch, batch_generator), None, None

    pretrain(model, draw, sizes.pretrain, generator)
    held_generator = torch.Generator().manual_seed(seed + 2000)
    held, second = run.shapes(sizes.eval, held_generator), run.shapes(sizes.eval, held_generator)
    noise = torch.randn(sizes.eval, 1, 8, 8, generator=held_generator)
    return Bench(
        pretrained=model, draw=draw, generator=generator, noise=noise, cond=None, uncond=None,
        score=lambda samples: run.evaluate_shapes(samples, held),
        floor=run.evaluate_shapes(second, held),
    )


def prepare_patches(seed: int, sizes: Sizes) -> Bench:
    """``patches.run``'s start: data, classifier and held-out set, then the model and batches from ``seed + 1``."""
    torch.manual_seed(seed)
    data = patches.patch_data()
    classifier, ceiling = patches.train_classifier(data, sizes.classifier_steps)
    evaluator = patches.Evaluator(data, classifier, sizes.eval, seed)
    floor = evaluator.score(evaluator.second, evaluator.second_labels)
    draw = patches.draw_batch(data, sizes.batch)
    model = toy.TimeMLP((1, patches.SIZE, patches.SIZE), width=sizes.width, depth=4, num_classes=patches.CLASSES,
                        twin_per_block=sizes.twin_per_block)
    generator = torch.Generator().manual_seed(seed + 1)
    pretrain(model, draw, sizes.pretrain, generator)
    return Bench(
        pretrained=model, draw=draw, generator=generator, noise=evaluator.noise, cond=evaluator.cond,
        uncond=evaluator.uncond,
        score=evaluator.score, floor=floor, notes={"classifier_acc": ceiling},
        probe=(evaluator.second, evaluator.second_labels),
    )


def prepare_digits(seed: int, sizes: Sizes) -> Bench:
    """``digits``: data, classifier (seed 0) and held-out set, then the model after ``manual_seed(seed)``, batches from ``seed + 1``.

    ``sizes.eval`` counts the samples scored, labelled by the held-out labels repeated.
    """
    data = digits.digit_data()
    classifier, ceiling = digits.train_classifier(data, sizes.classifier_steps)
    evaluator = digits.Evaluator(data, classifier, sizes.eval, seed)
    draw = patches.draw_batch(data, sizes.batch, null=digits.NULL)
    torch.manual_seed(seed)
    model = toy.TimeMLP((1, digits.SIZE, digits.SIZE), width=sizes.width, depth=4, num_classes=digits.CLASSES,
                        twin_per_block=sizes.twin_per_block)
    generator = torch.Generator().manual_seed(seed + 1)
    pretrain(model, draw, sizes.pretrain, generator)
    return Bench(
        pretrained=model, draw=draw, generator=generator, noise=evaluator.noise, cond=evaluator.cond,
        uncond=evaluator.uncond, score=evaluator.score, floor=evaluator.floor(), notes={"classifier_acc": ceiling},
        probe=(data["held_x"], data["held_y"]),
    )


TASKS = {
    "ring": Task("ring", primary="sw", conditional=True, lr=3e-4,
                 full=Sizes(pretrain=1500, width=256, batch=256, eval=2000, budget=800),
                 quick=Sizes(pretrain=40, width=32, batch=64, eval=200, budget=8), prepare=prepare_ring),
    "shapes": Task("shapes", primary="fd", conditional=False, lr=3e-4,
                   full=Sizes(pretrain=2000, width=512, batch=256, eval=2000, budget=800),
                   quick=Sizes(pretrain=40, width=32, batch=64, eval=200, budget=8), prepare=prepare_shapes),
    "patches": Task("patches", primary="fd", conditional=True, lr=1e-3,
                    full=Sizes(pretrain=4000, width=128, batch=128, eval=1000, budget=1000, classifier_steps=1500),
                    quick=Sizes(pretrain=40, width=32, batch=64, eval=200, budget=8, classifier_steps=20),
                    prepare=prepare_patches),
    "digits": Task("digits", primary="fd", conditional=True, lr=1e-3,
                   full=Sizes(pretrain=4000, width=128, batch=128, eval=1000, budget=1000, classifier_steps=1500),
                   quick=Sizes(pretrain=40, width=32, batch=64, eval=200, budget=8, classifier_steps=20),
                   prepare=prepare_digits),
}


# ----------------------------------------------------------------------------- protocol
def slug(name: str) -> str:
    """File-name form of a method name: ``"RCGM only, defaults"`` -> ``"rcgm-only-defaults"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def unpack(made: Made) -> tuple[BenchmarkLoss, twinloss.Teacher | None]:
    """A factory's result as ``(loss, teacher or None)``."""
    if isinstance(made, BenchmarkLoss):
        return made, None
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], BenchmarkLoss):
        return made
    raise ValueError(f"a method factory must return a BenchmarkLoss or (BenchmarkLoss, teacher), got {made!r}")


def sample(model, bench: Bench, steps: int, mode: str, guidance: float = 0.0,
           interval: tuple[float, float] | None = None) -> Tensor:
    sampler = twinloss.AnyStepSampler(steps, mode=mode, guidance_scale=guidance, guidance_interval=interval)
    uncond = bench.uncond if guidance > 0 else None
    return sampler(model, bench.noise, cond=bench.cond, uncond=uncond,
                   generator=torch.Generator().manual_seed(SAMPLE_SEED)).sample


def score_point(bench: Bench, model: nn.Module, kept: dict, steps: tuple[int, ...], mode: str,
                guided: tuple[tuple[str, int, float, tuple[float, float] | None], ...] = ()) -> dict[str, dict]:
    """``{"raw/K": scores, "ema/K": ..., "power/K": ...}`` for every step count ``K`` in ``steps``.

    Each ``(label, K, scale, interval)`` of ``guided`` adds ``"raw/label"`` etc.: ``K`` steps at sampling
    guidance ``scale``, on the steps that start inside ``interval`` (every step if None).
    """
    runs = [(str(count), count, 0.0, None) for count in steps] + list(guided)
    point = {}
    for label, count, scale, interval in runs:
        point[f"raw/{label}"] = bench.score(sample(model, bench, count, mode, scale, interval))
        for name, average in kept.items():
            point[f"{name}/{label}"] = bench.score(
                sample(average.sampling_model(model), bench, count, mode, scale, interval))
    return point


def fine_tune_curve(bench: Bench, task: Task, sizes: Sizes, loss_fn, teacher, steps: tuple[int, ...], mode: str,
                    final: dict | None = None,
                    guided: tuple[tuple[str, int, float, tuple[float, float] | None], ...] = ()) -> dict:
    """Fine-tune a copy of the pretrained model for 3x budget; ``{str(step): score_point(...)}`` at each checkpoint.

    ``final``, when given, receives the last checkpoint's weights: ``"raw"`` (the
    model's state dict) and ``"power"`` (the power-profile average's tensors).
    """
    checkpoints = checkpoint_steps(sizes.budget)
    curve = {}

    def on_checkpoint(step: int, model: nn.Module, kept: dict) -> None:
        curve[str(step)] = score_point(bench, model, kept, steps, mode, guided)
        if final is not None and step == checkpoints[-1]:
            final["raw"] = {name: value.detach().clone() for name, value in model.state_dict().items()}
            final["power"] = kept["power"].averaged_tensors(model)

    finetune(copy.deepcopy(bench.pretrained), loss_fn, bench.draw, steps=checkpoints[-1], lr=task.lr,
             generator=bench.restart(), checkpoints=set(checkpoints), on_checkpoint=on_checkpoint, teacher=teacher)
    return curve


def reference(bench: Bench, task: Task, sizes: Sizes) -> dict:
    """Data floor, the pretrained model at 1/2/4/50 Euler steps, and flow matching continued (same checkpoints).

    Conditional tasks add 50 steps at CFG 2, 1.5, 1.25 and 3 and 4 steps at CFG 2, on the whole path and (CFG
    2 and 1.25) on its middle (``GUIDED_REFERENCES``), the references of guided recipes.
    """
    guided = GUIDED_REFERENCES if bench.uncond is not None else ()
    start = {key.split("/", 1)[1]: scores
             for key, scores in score_point(bench, bench.pretrained, {}, FM_STEPS, "multi", guided).items()}
    fm = fine_tune_curve(bench, task, sizes, BenchmarkLoss.plain_flow_matching(), None, FM_STEPS, "multi",
                         guided=guided)
    return {"data": bench.floor, "notes": bench.notes, "start": start, "curve": fm}


def save_weights(path: Path, final: dict) -> None:
    """The final raw and averaged weights of a run, for ``anatomy.py`` (written whole or not at all)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(final, partial)
    os.replace(partial, path)


def write_rows(path: Path, rows: dict[str, dict]) -> None:
    """Write ``rows`` (one per method) into the JSON report at ``path``, keeping the other methods' rows; the
    report's folder is made if missing (a run is never lost to a fresh ``--results``)."""
    report = json.loads(path.read_text()) if path.exists() else {}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report | rows, indent=1) + "\n")


def saved_runs_parser(description: str, tasks: list[str], methods_help: str) -> argparse.ArgumentParser:
    """The command line of a script that reads the weights runs kept: ``--task``, ``--seed`` (repeatable),
    ``--methods`` (names) and ``--results`` (where the runs wrote)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=tasks, default="patches")
    parser.add_argument("--seed", type=int, action="append", required=True)
    parser.add_argument("--methods", nargs="*", default=None, help=methods_help)
    parser.add_argument("--results", type=Path, default=Path(DEFAULT_OUT))
    return parser


def load_weights(bench: Bench, results: Path, task: str, seed: int, name: str, which: str,
                 variant: str = "") -> nn.Module:
    """A copy of ``bench``'s pretrained model holding the final ``which`` weights (``"raw"`` or ``"power"``)
    that :func:`save_weights` kept for method ``name`` under ``results`` (``variant``: the run's name
    suffix, e.g. ``"_eval16000"``); a ``ValueError`` naming the method when that run kept none."""
    path = results / "weights" / f"{task}_seed{seed}_{slug(name)}{variant}.pt"
    if not path.exists():
        raise ValueError(f"--methods {name!r}: no saved weights at {path}; run curves.py for it first")
    model = copy.deepcopy(bench.pretrained)
    model.load_state_dict(torch.load(path)[which])
    return model


def select(registry: dict[str, MethodFactory], patterns: list[str] | None) -> dict[str, MethodFactory]:
    """The methods named by ``patterns`` (all when none); a pattern matching nothing is an error.

    A pattern that is a method's whole name selects that method alone (``"TwinFlow w 0, s clean"`` is not
    also ``"TwinFlow w 0, s cleaner"``); any other pattern selects every method whose name contains it.
    """
    names = {slug(name): name for name in registry}
    if len(names) != len(registry):
        raise ValueError(f"two method names give the same file name: {sorted(registry)}")
    if not patterns:
        return dict(registry)
    for pattern in patterns:
        if not any(pattern in name for name in registry):
            raise ValueError(f"--methods {pattern!r} matches none of {sorted(registry)}")
    def chosen(name: str) -> bool:
        return any(pattern == name or (pattern not in registry and pattern in name) for pattern in patterns)

    return {name: make for name, make in registry.items() if chosen(name)}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", action="append", default=None,
                        help="run only the methods whose name contains this text (repeatable)")
    parser.add_argument("--skip-fm", action="store_true", help="do not run the reference (FM continued, data floor)")
    parser.add_argument("--skip-methods", action="store_true", help="run the reference only")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, seconds: a smoke run")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every step count (a short real run)")
    parser.add_argument("--budget", type=int, default=None,
                        help="fine-tune budget 1x in steps (default: the task's; issue 12's own protocol is 4000 on patches)")
    parser.add_argument("--lr", type=float, default=None,
                        help="Adam learning rate of the fine-tunes and the flow-matching reference (default: the task's)")
    parser.add_argument("--width", type=int, default=None,
                        help="hidden width of the task's network (default: the task's; a capacity study)")
    parser.add_argument("--eval", type=int, default=None,
                        help="samples scored at each checkpoint (default: the task's); more gives a lower data floor, "
                             "which the ring needs to tell methods apart")
    parser.add_argument("--twin-per-block", action="store_true",
                        help="the network's twin (t < 0) rows get a zero-initialised shift before every block, "
                             "not only the first layer (toy.TimeMLP's twin_per_block)")
    parser.add_argument("--twin-separate", action="store_true",
                        help="the twin (t < 0) rows go to a network of their own, a copy of the pretrained one "
                             "(SeparateTwin): no weight is shared between the real and the fake field")
    parser.add_argument("--out", default=DEFAULT_OUT)
    return parser.parse_args(argv)


def main(extra_methods: dict[str, MethodFactory] | None = None, argv: list[str] | None = None) -> None:
    """Run the protocol for one task and seed; ``extra_methods`` join the default registry (variant studies)."""
    args = parse(argv)
    torch.set_num_threads(1)
    task = TASKS[args.task]
    if args.lr is not None:
        if not args.lr > 0:
            raise ValueError(f"--lr must be > 0, got {args.lr}")
        task = dataclasses.replace(task, lr=args.lr)
    sizes = (task.quick if args.quick else task.full).scaled(args.scale)
    if args.budget is not None:
        if args.budget < 4:
            raise ValueError(f"--budget must be at least 4 steps (its quarter is the first checkpoint), got {args.budget}")
        sizes = dataclasses.replace(sizes, budget=args.budget)
    if args.width is not None:
        if args.width < 1:
            raise ValueError(f"--width must be at least 1, got {args.width}")
        sizes = dataclasses.replace(sizes, width=args.width)
    if args.eval is not None:
        if args.eval < 2:
            raise ValueError(f"--eval must be at least 2 samples, got {args.eval}")
        sizes = dataclasses.replace(sizes, eval=args.eval)
    if args.twin_per_block:
        sizes = dataclasses.replace(sizes, twin_per_block=True)
    methods = {} if args.skip_methods else select({**METHODS, **(extra_methods or {})}, args.methods)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = {"task": task.name, "seed": args.seed, "quick": args.quick, "scale": args.scale, "lr": task.lr,
              "primary": task.primary, "conditional": task.conditional, "checkpoints": checkpoint_steps(sizes.budget),
              "budget_override": args.budget, "width_override": args.width, "lr_override": args.lr,
              "eval_override": args.eval, **dataclasses.asdict(sizes)}
    variant = ("_quick" if args.quick else "") + (f"_scale{args.scale:g}" if args.scale != 1 else "")
    variant += f"_budget{args.budget}" if args.budget is not None else ""
    variant += f"_width{args.width}" if args.width is not None else ""
    variant += f"_lr{args.lr:g}" if args.lr is not None else ""
    variant += f"_eval{args.eval}" if args.eval is not None else ""
    variant += "_twinblocks" if args.twin_per_block else ""
    variant += "_twinseparate" if args.twin_separate else ""
    config["twin_separate"] = args.twin_separate
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f}s] {task.name} seed {args.seed}: {message}", flush=True)

    def write(name: str, body: dict, seconds: float) -> None:
        report = {"task": task.name, "seed": args.seed, "method": name, "config": config, **body,
                  "wall_s": round(seconds, 1)}
        path = out / f"{task.name}_seed{args.seed}_{slug(name)}{variant}.json"
        path.write_text(json.dumps(report, indent=1) + "\n")
        log(f"wrote {path}")

    bench = task.prepare(args.seed, sizes)
    if args.twin_separate:
        bench.pretrained = SeparateTwin(bench.pretrained)
    config["pretrain_s"] = round(time.perf_counter() - started, 1)
    log(f"pretrained {sizes.pretrain} steps in {config['pretrain_s']}s; data floor {bench.floor}")
    if not args.skip_fm:
        t0 = time.perf_counter()
        write("reference", reference(bench, task, sizes), time.perf_counter() - t0)
    for name, make in methods.items():
        t0 = time.perf_counter()
        loss_fn, teacher = unpack(make(bench.pretrained))
        if loss_fn.guidance_scale > 0 and not task.conditional:
            reason = f"guidance not applicable: {task.name} is unconditional (guidance_scale={loss_fn.guidance_scale})"
            log(f"{name}: not run, {reason}")
            write(name, {"guidance_scale": loss_fn.guidance_scale, "skipped": reason}, 0.0)
            continue
        final: dict = {}
        curve = fine_tune_curve(bench, task, sizes, loss_fn, teacher, (1,), "few", final)
        save_weights(out / "weights" / f"{task.name}_seed{args.seed}_{slug(name)}{variant}.pt", final)
        last = curve[str(config["checkpoints"][-1])]
        log(f"{name}: {task.primary} at 3x raw {last['raw/1'][task.primary]:.4f} power {last['power/1'][task.primary]:.4f}")
        write(name, {"guidance_scale": loss_fn.guidance_scale, "curve": curve}, time.perf_counter() - t0)
    log("done")


if __name__ == "__main__":
    main()
