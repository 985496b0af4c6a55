"""The protocol the examples share: pretrain, fine-tune the same weights, compare samplers.

1. pretrain a model with plain flow matching;
2. copy it, and fine-tune the copy with :class:`twinloss.TwinFlowLoss` (no guidance);
3. sample both from the same noise: the start at 1, 2 and 50 Euler steps, the fine-tuned
   model at 1 and 2 NFE; score each against held-out data with the sliced Wasserstein
   distance, a diversity ratio (mean pairwise distance of samples over that of the data)
   and the example's own figures.

An example supplies its data (``make_data(n, generator)``), its model, its figures and,
for ``--png``, how to draw one sample as a picture.
"""

import argparse
import copy
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

import twinloss
from twinloss import metrics
from twinloss_demo.training import train

MakeData = Callable[..., Tensor]
Figures = dict[str, Callable[[Tensor], float]]
DrawSample = Callable[[Tensor], object]  # one sample -> a PIL image (Pillow is imported only to draw)


def evaluate(samples: Tensor, held_out: Tensor, figures: Figures) -> dict[str, float]:
    """Sliced Wasserstein distance to ``held_out``, the example's ``figures``, diversity ratio."""
    return {
        "sliced_wasserstein": float(metrics.sliced_wasserstein(samples, held_out, generator=torch.Generator().manual_seed(0))),
        **{name: figure(samples) for name, figure in figures.items()},
        "diversity": float(metrics.mean_pairwise_distance(samples) / metrics.mean_pairwise_distance(held_out)),
    }


def run(
    model: nn.Module,
    make_data: MakeData,
    figures: Figures,
    *,
    pretrain_steps: int,
    finetune_steps: int,
    batch: int,
    seed: int,
    eval_samples: int,
    finetune_lr: float,
    log: Callable[[str], None] = print,
    keep_samples: dict[str, Tensor] | None = None,
    samples_per_row: int = 6,
) -> dict[str, dict[str, float]]:
    """Pretrain ``model`` in place (flow matching), fine-tune it (TwinFlow), evaluate; figures per sampler.

    When ``keep_samples`` is a dict, the first ``samples_per_row`` held-out examples and
    samples of every sampler (all from the same noise rows) are stored in it by name.
    """
    g = torch.Generator().manual_seed(seed + 1)

    def draw(generator):
        return make_data(batch, generator=generator), None, None

    t0 = time.perf_counter()
    train(model, twinloss.TwinFlowLoss.plain_flow_matching(), draw, steps=pretrain_steps, lr=1e-3, generator=g)
    pretrained = copy.deepcopy(model)
    train(model, twinloss.TwinFlowLoss(guidance_scale=0.0), draw, steps=finetune_steps, lr=finetune_lr, generator=g)
    log(f"trained in {time.perf_counter() - t0:.0f}s")

    ev = torch.Generator().manual_seed(seed + 2)
    held_out = make_data(eval_samples, generator=ev)
    noise = torch.randn(held_out.shape, generator=ev)
    results = {"data (second draw)": evaluate(make_data(eval_samples, generator=ev), held_out, figures)}
    if keep_samples is not None:
        keep_samples["held-out data"] = held_out[:samples_per_row]
    for name, network, sampler in [
        ("flow matching, 1 NFE", pretrained, twinloss.AnyStepSampler(1)),
        ("flow matching, 2 Euler", pretrained, twinloss.AnyStepSampler(2, mode="multi")),
        ("flow matching, 50 Euler", pretrained, twinloss.AnyStepSampler(50, mode="multi")),
        ("TwinFlow, 1 NFE", model, twinloss.AnyStepSampler(1)),
        ("TwinFlow, 2 NFE", model, twinloss.AnyStepSampler(2)),
    ]:
        samples = sampler(network, noise, generator=torch.Generator().manual_seed(seed + 3)).sample
        results[name] = evaluate(samples, held_out, figures)
        if keep_samples is not None:
            keep_samples[name] = samples[:samples_per_row]
    return results


def render_rows(samples: dict[str, Tensor], draw: DrawSample, path: Path, title: str) -> None:
    """One row per sampler: its name, then each kept sample drawn by ``draw``; saved as a PNG."""
    from PIL import Image, ImageDraw

    rows = {name: [draw(sample) for sample in batch] for name, batch in samples.items()}
    cell_w = max(tile.width for tiles in rows.values() for tile in tiles)
    cell_h = max(tile.height for tiles in rows.values() for tile in tiles)
    label_w, gap, header = 170, 6, 28
    columns = max(len(tiles) for tiles in rows.values())
    canvas = Image.new(
        "RGB", (label_w + columns * (cell_w + gap) + gap, header + len(rows) * (cell_h + gap) + gap), "white"
    )
    pen = ImageDraw.Draw(canvas)
    pen.text((gap, 8), title, fill="black")
    for row, (name, tiles) in enumerate(rows.items()):
        top = header + row * (cell_h + gap)
        pen.text((gap, top + cell_h // 2 - 6), name, fill="black")
        for column, tile in enumerate(tiles):
            canvas.paste(tile, (label_w + column * (cell_w + gap), top))
    canvas.save(path)



def main(
    description: str, run_example: Callable[..., dict[str, dict[str, float]]], quick: dict, draw: DrawSample
) -> None:
    """Command line of an example: ``--quick`` runs it with the ``quick`` keywords; prints a table and JSON.

    ``--png PATH`` also writes the kept samples of every sampler, one row each, drawn by ``draw``.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--png", type=Path, default=None, help="write samples of every sampler to this PNG")
    args = parser.parse_args()
    torch.set_num_threads(1)
    kept: dict[str, Tensor] | None = {} if args.png else None
    results = run_example(seed=args.seed, keep_samples=kept, **(quick if args.quick else {}))
    if kept is not None:
        render_rows(kept, draw, args.png, f"{description} Every sampler row starts from the same noise; seed {args.seed}.")
        print(f"wrote {args.png}")
    columns = list(next(iter(results.values())))
    print(f"{'sampler':26s} " + " ".join(f"{c[:18]:>18s}" for c in columns))
    for name, row in results.items():
        print(f"{name:26s} " + " ".join(f"{row[c]:18.3f}" for c in columns))
    print(json.dumps(results))
