"""Plumbing the quality benchmarks share: command-line sizes, the fine-tune loop, its checkpoints."""

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import twinloss
from twinloss.loss import RELEASED_GUIDANCE

CHECKPOINT_QUARTERS = (1, 2, 4, 6, 8, 12)
"""Checkpoints in quarters of the fine-tune budget: 0.25, 0.5, 1, 1.5, 2 and 3 x budget."""


def configure(
    args: argparse.Namespace, full: dict, quick: dict
) -> tuple[Path, Callable[[str], None], Callable[[], float]]:
    """Single-threaded torch, the full or quick sizes onto ``args``, the output folder, a timed logger.

    Returns ``(out, log, elapsed)``: ``log(message)`` prints with the seconds since this call.
    """
    torch.set_num_threads(1)
    for key, value in (quick if args.quick else full).items():
        setattr(args, key, value)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def elapsed() -> float:
        return time.perf_counter() - started

    def log(message: str) -> None:
        print(f"[{elapsed():6.0f}s] {message}", flush=True)

    return out, log, elapsed


def fit_classifier(make: Callable[[], nn.Module], data: dict, steps: int, seed: int = 0) -> tuple[nn.Module, float]:
    """``make()`` after ``manual_seed(seed)``, trained ``steps`` Adam steps (batch 256, lr 1e-3) on the training split.

    Returns the classifier in eval mode and its accuracy on the held-out split
    (``data["train_x"]``, ``["train_y"]``, ``["held_x"]``, ``["held_y"]``).
    """
    torch.manual_seed(seed)
    classifier = make()
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = torch.randint(0, data["train_x"].shape[0], (256,), generator=generator)
        loss = nn.functional.cross_entropy(classifier(data["train_x"][rows]), data["train_y"][rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = float((classifier(data["held_x"]).argmax(1) == data["held_y"]).float().mean())
    return classifier.eval(), accuracy


class BenchmarkLoss(twinloss.TwinFlowLoss):
    """``TwinFlowLoss`` with the guided defaults of the first thirty rounds of issue 12.

    Where guidance is on, the guidance defaults to the released step's (:data:`twinloss.loss.RELEASED_GUIDANCE`:
    ``w = 0.5`` on the whole path), and the partition and the rectification's law of ``s`` that are not given
    follow the scale alone, as they did then: equal quarters and ``LogitNormalTime(0, 1)`` for any ``w > 0``,
    whatever the interval (the library's rule now gives the unguided ones to an interval below ``t = 1``,
    :func:`twinloss.loss.guides_near_noise`). The stored runs name that recipe "defaults" ("TwinFlow defaults",
    "RCGM only, defaults", "... guidance interval (0.2, 0.7)"): every benchmark builds its losses from this
    class, so those names keep meaning what they were measured with. With ``guidance_scale=0`` it is the
    library's own loss.
    """

    def __init__(self, **settings) -> None:
        guided = settings.get("guidance_scale", RELEASED_GUIDANCE["guidance_scale"]) > 0
        if guided:
            settings = {**RELEASED_GUIDANCE, **settings}
            if "shares" not in settings:
                settings["shares"] = twinloss.GroupShares()
        super().__init__(**settings)
        if guided and self.rectify_time is None:
            # the default law, as it was for every w > 0 (registered modules: the repr and settings name it)
            self.conditioned_rectify_time = twinloss.LogitNormalTime(0.0, 1.0)
            self.unconditioned_rectify_time = twinloss.LogitNormalTime(0.0, 1.0)


def checkpoint_steps(budget: int) -> list[int]:
    """The fine-tune steps scored along a curve: 0.25, 0.5, 1, 1.5, 2 and 3 x ``budget`` (rounded down)."""
    return sorted({budget * quarters // 4 for quarters in CHECKPOINT_QUARTERS} - {0})


def averages() -> dict[str, twinloss.WeightAverage]:
    """The two averages kept beside every fine-tune (constant 0.995 is 0.999 scaled to a 4x shorter run)."""
    return {"ema": twinloss.WeightAverage(0.995), "power": twinloss.WeightAverage(twinloss.PowerFunctionDecay(6.94))}


def finetune(
    model: nn.Module,
    loss_fn: twinloss.TwinFlowLoss,
    draw,
    *,
    steps: int,
    lr: float,
    generator: torch.Generator,
    checkpoints: set[int],
    on_checkpoint: Callable[[int, nn.Module, dict], None],
    teacher: twinloss.Teacher | None = None,
    before_step: Callable[[int, nn.Module], None] | None = None,
) -> None:
    """Adam with grad clip 1; every average updated after each step; ``on_checkpoint(step, model, averages)``.

    ``draw(generator) -> (x, cond, uncond)`` gives each batch; ``teacher.update(model)``
    runs after each optimizer step when a teacher is given.
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    kept = averages()
    for step in range(1, steps + 1):
        if before_step is not None:
            before_step(step, model)
        x, cond, uncond = draw(generator)
        out = loss_fn(model, x, cond=cond, uncond=uncond, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if teacher is not None:
            teacher.update(model)
        for average in kept.values():
            average.update(model)
        if step in checkpoints:
            on_checkpoint(step, model, kept)
