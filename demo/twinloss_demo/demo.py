"""``twinloss demo``: see 1-NFE TwinFlow beat 1-NFE flow matching in about two minutes on a CPU.

The protocol is the one of the quality benchmark (``benchmarks/quality``):

1. pretrain a small :class:`~twinloss.toy.TimeMLP` with plain flow matching on
   a mixture of 8 Gaussians on a ring (generated, never downloaded);
2. fine-tune the *same* weights with :class:`~twinloss.TwinFlowLoss`;
3. sample the pretrained model at 1 NFE and at 50 Euler steps, and the
   fine-tuned model at 1 NFE (and 2 NFE), every method from the same noise
   batch, and compare each with one held-out set: sliced Wasserstein distance,
   squared MMD, mode coverage and the within-mode diversity ratio
   (:mod:`twinloss.metrics`).

A table a reader can trust needs a floor and error bars. Every row (each
sampler, and a second draw of the data itself, the floor no sampler can beat
in expectation) is ``eval_samples`` points against the same ``eval_samples``
held-out points, and is repeated over ``eval_seeds`` fresh noise batches and
fresh second draws: ``metrics.json`` holds each figure's mean, standard
deviation and per-seed values.

Writes ``demo.png`` (density panels with titles, the first evaluation seed) and
``metrics.json`` to the output directory.
"""

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from twinloss import metrics, toy
from twinloss._checks import check_int
from twinloss.averaging import PowerFunctionDecay, WeightAverage
from twinloss.loss import TwinFlowLoss
from twinloss.sampling import AnyStepSampler
from twinloss_demo.training import train

__all__ = ["DemoConfig", "evaluate_samples", "render_panels", "run_demo", "summarize_over_seeds"]


@dataclass(frozen=True)
class DemoConfig:
    """Everything the demo does, with the values of the two-minute run.

    Attributes:
        pretrain_steps: flow-matching steps (Adam, ``pretrain_lr``).
        finetune_steps: TwinFlow steps from the pretrained weights (``finetune_lr``).
        batch_size: rows per step (both phases).
        width, depth: the MLP. frequencies: sinusoidal time features.
        eval_samples: samples per method and per evaluation seed, and held-out points.
        eval_seeds: evaluation repeats (fresh noise and a fresh second draw of
            the data each); figures are reported as mean and standard deviation.
        multi_steps: Euler steps of the multi-step flow-matching reference.
        seed: seeds data, init, training noise and evaluation noise.
        threads: torch intra-op threads (1 is fastest for this small MLP).
    """

    pretrain_steps: int = 2500
    finetune_steps: int = 2000
    batch_size: int = 256
    pretrain_lr: float = 1e-3
    finetune_lr: float = 3e-4
    width: int = 256
    depth: int = 4
    frequencies: int = 16
    eval_samples: int = 2000
    eval_seeds: int = 5
    multi_steps: int = 50
    seed: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        for name in ("pretrain_steps", "finetune_steps"):
            check_int(getattr(self, name), name, minimum=0)
        for name in ("width", "depth", "frequencies", "multi_steps", "threads"):
            check_int(getattr(self, name), name, minimum=1)
        check_int(self.batch_size, "batch_size (four TwinFlow groups)", minimum=4)
        check_int(self.eval_samples, "eval_samples", minimum=16)
        check_int(self.eval_seeds, "eval_seeds (a standard deviation needs two)", minimum=2)

    @classmethod
    def quick(cls, seed: int = 0) -> "DemoConfig":
        """A few-second run for tests: the files and keys, not the quality."""
        return cls(
            pretrain_steps=60, finetune_steps=30, batch_size=64, width=64, depth=2,
            eval_samples=256, eval_seeds=2, multi_steps=10, seed=seed,
        )


def evaluate_samples(
    samples: Float[Tensor, "n 2"],
    held_out: Float[Tensor, "m 2"],
    centers: Float[Tensor, "modes 2"],
    *,
    seed: int = 0,
    mode_radius: float = 0.5,
) -> dict[str, float]:
    """Distances to held-out data and diversity of one sample set (fixed projections and kernel).

    Raises:
        ValueError: if ``samples`` and ``held_out`` differ in size: the finite-sample
            bias of both distances depends on the sizes, so rows of one table compare
            equal-sized sets.
    """
    if samples.shape[0] != held_out.shape[0]:
        raise ValueError(
            f"samples and held_out must be the same size for comparable rows, got {samples.shape[0]} "
            f"and {held_out.shape[0]}"
        )
    stats = metrics.mode_statistics(samples, held_out, centers, radius=mode_radius)
    projections = torch.Generator().manual_seed(seed)
    return {
        "sliced_wasserstein": float(metrics.sliced_wasserstein(samples, held_out, generator=projections)),
        "mmd_rbf": float(metrics.mmd_rbf(samples, held_out, bandwidths=(0.1, 0.3, 1.0), unbiased=True)),
        "diversity_ratio": stats.diversity_ratio,
        "mode_coverage": stats.coverage,
        "off_mode_fraction": stats.off_mode_fraction,
    }


def summarize_over_seeds(runs: list[dict[str, float]]) -> dict[str, dict[str, float | list[float]]]:
    """Each figure of :func:`evaluate_samples` over evaluation seeds: mean, sample standard deviation, values."""
    summary: dict[str, dict[str, float | list[float]]] = {}
    for figure in runs[0]:
        values = torch.tensor([run[figure] for run in runs], dtype=torch.float64)
        summary[figure] = {"mean": float(values.mean()), "std": float(values.std()), "per_seed": values.tolist()}
    return summary


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has a single bitmap size
        return ImageFont.load_default()


def render_panels(
    panels: list[tuple[str, str, Float[Tensor, "n 2"]]],
    path: Path,
    *,
    extent: float = 3.2,
    pixels: int = 330,
    title: str = "",
) -> None:
    """Draw one density panel per ``(title, subtitle, points)`` side by side into a PNG."""
    from PIL import Image, ImageDraw

    header, footer, margin = 34 if title else 0, 46, 10
    width = len(panels) * (pixels + margin) + margin
    canvas = Image.new("RGB", (width, header + pixels + footer + margin), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((margin, 8), title, fill="black", font=_font(18))
    for k, (name, subtitle, points) in enumerate(panels):
        left = margin + k * (pixels + margin)
        cells = ((points.float().clamp(-extent, extent * 0.9999) + extent) / (2 * extent) * pixels).long()
        counts = torch.zeros(pixels, pixels)
        counts.index_put_((pixels - 1 - cells[:, 1], cells[:, 0]), torch.ones(cells.shape[0]), accumulate=True)
        level = 1 - torch.exp(-counts / max(1.0, points.shape[0] / 2000))
        rgb = torch.stack([1 - 0.85 * level, 1 - 0.65 * level, 1 - 0.25 * level], dim=2)
        # Through bytes, not numpy: the demo's install (`.[demo]`) has no numpy.
        tile = Image.frombytes("RGB", (pixels, pixels), bytes((rgb * 255).round().to(torch.uint8).flatten().tolist()))
        canvas.paste(tile, (left, header))
        draw.rectangle([left, header, left + pixels - 1, header + pixels - 1], outline=(160, 160, 160))
        draw.text((left + 2, header + pixels + 4), name, fill="black", font=_font(15))
        draw.text((left + 2, header + pixels + 24), subtitle, fill=(60, 60, 60), font=_font(13))
    canvas.save(path)


def run_demo(config: DemoConfig, out: Path | str, *, progress: bool = True) -> dict:
    """Train, sample, measure and write ``demo.png`` and ``metrics.json`` under ``out``.

    Returns the dictionary written to ``metrics.json``.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        torch.manual_seed(config.seed)  # the initial weights
        model = toy.TimeMLP((2,), width=config.width, depth=config.depth, frequencies=config.frequencies)
        train_noise = torch.Generator().manual_seed(config.seed + 1)

        def draw_batch(generator: torch.Generator):
            return toy.ring_mixture(config.batch_size, generator=generator).x, None, None

        bar = tqdm(
            total=config.pretrain_steps + config.finetune_steps, disable=not progress, desc="flow matching",
            unit="step",
        )

        def tick(step: int, loss: float) -> None:
            bar.update(1)
            if step % 25 == 0:
                bar.set_postfix(loss=f"{loss:.3g}")

        train(
            model, TwinFlowLoss.plain_flow_matching(), draw_batch,
            steps=config.pretrain_steps, lr=config.pretrain_lr, generator=train_noise, progress=tick,
        )
        pretrained = copy.deepcopy(model)
        pretrain_done = time.perf_counter()
        bar.set_description("TwinFlow")
        average = WeightAverage(PowerFunctionDecay())  # the documented weights to sample from
        train(
            model, TwinFlowLoss(guidance_scale=0.0), draw_batch,
            steps=config.finetune_steps, lr=config.finetune_lr, generator=train_noise, average=average,
            progress=tick,
        )
        bar.close()
        finetune_done = time.perf_counter()

        evaluation = torch.Generator().manual_seed(config.seed + 2)
        held_out = toy.ring_mixture(config.eval_samples, generator=evaluation).x
        centers = toy.ring_centers()
        methods = {
            "flow_matching_multi_step": (pretrained, AnyStepSampler(config.multi_steps, mode="multi")),
            "flow_matching_1nfe": (pretrained, AnyStepSampler(1)),
            "twinflow_1nfe": (model, AnyStepSampler(1)),
            "twinflow_2nfe": (model, AnyStepSampler(2)),
            "twinflow_1nfe_weight_average": (average.sampling_model(model), AnyStepSampler(1)),
        }
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in [*methods, "data_second_draw"]}
        nfe, samples = {"data_second_draw": 0}, {}  # samples: the first evaluation seed's, for the picture
        for repeat in range(config.eval_seeds):
            second_draw = toy.ring_mixture(config.eval_samples, generator=evaluation).x
            noise = torch.randn(config.eval_samples, 2, generator=evaluation)
            runs["data_second_draw"].append(evaluate_samples(second_draw, held_out, centers))
            for name, (network, sampler) in methods.items():
                output = sampler(network, noise, generator=torch.Generator().manual_seed(config.seed + 3 + repeat))
                nfe[name] = output.model_calls
                runs[name].append(evaluate_samples(output.sample, held_out, centers))
                samples.setdefault(name, output.sample)
        results = {name: {"nfe": nfe[name], **summarize_over_seeds(figures)} for name, figures in runs.items()}
    finally:
        torch.set_num_threads(previous_threads)

    def subtitle(name: str) -> str:
        sw, mmd, r = results[name]["sliced_wasserstein"], results[name]["mmd_rbf"], results[name]
        return (
            f"SW {sw['mean']:.3f}±{sw['std']:.3f}  MMD {mmd['mean']:.4f}  div {r['diversity_ratio']['mean']:.2f}  "
            f"off {100 * r['off_mode_fraction']['mean']:.0f}%"
        )

    render_panels(
        [
            ("Held-out data (vs a second draw)", subtitle("data_second_draw"), held_out),
            (f"Flow matching, {config.multi_steps} Euler steps", subtitle("flow_matching_multi_step"),
             samples["flow_matching_multi_step"]),
            ("Flow matching, 1 NFE", subtitle("flow_matching_1nfe"), samples["flow_matching_1nfe"]),
            ("TwinFlow fine-tuned, 1 NFE", subtitle("twinflow_1nfe"), samples["twinflow_1nfe"]),
            ("TwinFlow, 1 NFE, weight average", subtitle("twinflow_1nfe_weight_average"),
             samples["twinflow_1nfe_weight_average"]),
        ],
        out / "demo.png",
        title=f"8 Gaussians on a ring, same weights and noise; mean of {config.eval_seeds} seeds "
        "(SW, MMD: lower is better; div: 1 is ideal; off: between modes)",
    )
    report = {
        "config": asdict(config),
        "dataset": "mixture of 8 Gaussians on a ring (radius 2, std 0.1)",
        "results": results,
        "protocol": f"every row: {config.eval_samples} samples against the same {config.eval_samples} held-out points, "
        f"repeated over {config.eval_seeds} evaluation seeds (fresh noise, fresh second draw of the data); "
        "mean, sample standard deviation and per-seed values of each figure",
        "metrics": {
            "sliced_wasserstein": "sliced Wasserstein-2 to held-out data, 256 fixed random directions",
            "mmd_rbf": "squared MMD to held-out data, RBF kernel widths (0.1, 0.3, 1.0), unbiased U-statistic: "
            "0 in expectation for a second draw of the data, so single values can be negative",
            "diversity_ratio": "RMS within-mode spread of samples / that of held-out data, over points within "
            "0.5 (5 std) of a mode centre (1 is ideal, < 1 collapse, > 1 blur)",
            "off_mode_fraction": "fraction of samples farther than 0.5 from every mode centre (held-out data: ~0)",
            "mode_coverage": "fraction of the 8 modes holding >= 10% of their fair share of samples",
        },
        "timing_s": {
            "pretrain": round(pretrain_done - start, 2),
            "finetune": round(finetune_done - pretrain_done, 2),
            "total": round(time.perf_counter() - start, 2),
        },
    }
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
