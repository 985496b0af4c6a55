"""``twinloss demo``: see 1-NFE TwinFlow beat 1-NFE flow matching in about two minutes on a CPU.

The protocol is the one of the quality benchmark (``benchmarks/quality``):

1. pretrain a small :class:`~twinloss.toy.TimeMLP` with plain flow matching on
   a mixture of 8 Gaussians on a ring (generated, never downloaded);
2. fine-tune the *same* weights with :class:`~twinloss.TwinFlowLoss`;
3. from one fixed noise batch, sample the pretrained model at 1 NFE and at 50
   Euler steps, and the fine-tuned model at 1 NFE (and 2 NFE), and compare each
   with held-out data: sliced Wasserstein distance, squared MMD, mode coverage
   and the within-mode diversity ratio (:mod:`twinloss.metrics`).

Writes ``demo.png`` (density panels with titles) and ``metrics.json`` to the
output directory.
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
from twinloss.loss import TwinFlowLoss
from twinloss.sampling import AnyStepSampler
from twinloss_demo.training import train

__all__ = ["DemoConfig", "evaluate_samples", "render_panels", "run_demo"]


@dataclass(frozen=True)
class DemoConfig:
    """Everything the demo does, with the values of the two-minute run.

    Attributes:
        pretrain_steps: flow-matching steps (Adam, ``pretrain_lr``).
        finetune_steps: TwinFlow steps from the pretrained weights (``finetune_lr``).
        batch_size: rows per step (both phases).
        width, depth: the MLP. frequencies: sinusoidal time features.
        eval_samples: samples per method and held-out points.
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
    multi_steps: int = 50
    seed: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        for name in ("pretrain_steps", "finetune_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "width", "depth", "frequencies", "eval_samples", "multi_steps", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 4:
            raise ValueError(f"batch_size must be >= 4 (four TwinFlow groups), got {self.batch_size}")
        if self.eval_samples < 16:
            raise ValueError(f"eval_samples must be >= 16, got {self.eval_samples}")

    @classmethod
    def quick(cls, seed: int = 0) -> "DemoConfig":
        """A few-second run for tests: the files and keys, not the quality."""
        return cls(
            pretrain_steps=60, finetune_steps=30, batch_size=64, width=64, depth=2,
            eval_samples=256, multi_steps=10, seed=seed,
        )


def evaluate_samples(
    samples: Float[Tensor, "n 2"],
    held_out: Float[Tensor, "m 2"],
    centers: Float[Tensor, "modes 2"],
    *,
    seed: int = 0,
    mode_radius: float = 0.5,
) -> dict[str, float]:
    """Distances to held-out data and diversity of one sample set (fixed projections and kernel)."""
    stats = metrics.mode_statistics(samples, held_out, centers, radius=mode_radius)
    projections = torch.Generator().manual_seed(seed)
    return {
        "sliced_wasserstein": float(metrics.sliced_wasserstein(samples, held_out, generator=projections)),
        "mmd_rbf": float(metrics.mmd_rbf(samples, held_out, bandwidths=(0.1, 0.3, 1.0))),
        "diversity_ratio": stats.diversity_ratio,
        "mode_coverage": stats.coverage,
        "off_mode_fraction": stats.off_mode_fraction,
    }


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
        train(
            model, TwinFlowLoss(guidance_scale=0.0), draw_batch,
            steps=config.finetune_steps, lr=config.finetune_lr, generator=train_noise, progress=tick,
        )
        bar.close()
        finetune_done = time.perf_counter()

        evaluation = torch.Generator().manual_seed(config.seed + 2)
        held_out = toy.ring_mixture(config.eval_samples, generator=evaluation).x
        second_draw = toy.ring_mixture(config.eval_samples, generator=evaluation).x
        noise = torch.randn(config.eval_samples, 2, generator=evaluation)
        centers = toy.ring_centers()
        methods = {
            "flow_matching_multi_step": (pretrained, AnyStepSampler(config.multi_steps, mode="multi")),
            "flow_matching_1nfe": (pretrained, AnyStepSampler(1)),
            "twinflow_1nfe": (model, AnyStepSampler(1)),
            "twinflow_2nfe": (model, AnyStepSampler(2)),
        }
        samples, results = {}, {}
        for name, (network, sampler) in methods.items():
            output = sampler(network, noise, generator=torch.Generator().manual_seed(config.seed + 3))
            samples[name] = output.sample
            results[name] = {"nfe": output.model_calls, **evaluate_samples(output.sample, held_out, centers)}
        results["data_second_draw"] = {"nfe": 0, **evaluate_samples(second_draw, held_out, centers)}
    finally:
        torch.set_num_threads(previous_threads)

    def subtitle(name: str) -> str:
        r = results[name]
        return (
            f"SW {r['sliced_wasserstein']:.3f}  MMD {r['mmd_rbf']:.4f}  div {r['diversity_ratio']:.2f}  "
            f"off {100 * r['off_mode_fraction']:.0f}%"
        )

    render_panels(
        [
            ("Held-out data (vs a second draw)", subtitle("data_second_draw"), held_out),
            (f"Flow matching, {config.multi_steps} Euler steps", subtitle("flow_matching_multi_step"),
             samples["flow_matching_multi_step"]),
            ("Flow matching, 1 NFE", subtitle("flow_matching_1nfe"), samples["flow_matching_1nfe"]),
            ("TwinFlow fine-tuned, 1 NFE", subtitle("twinflow_1nfe"), samples["twinflow_1nfe"]),
        ],
        out / "demo.png",
        title="8 Gaussians on a ring: same pretrained weights, same noise "
        "(SW, MMD: lower is better; div: within-mode spread / data's, 1 is ideal; off: samples between modes)",
    )
    report = {
        "config": asdict(config),
        "dataset": "mixture of 8 Gaussians on a ring (radius 2, std 0.1)",
        "results": results,
        "metrics": {
            "sliced_wasserstein": "sliced Wasserstein-2 to held-out data, 256 fixed random directions",
            "mmd_rbf": "squared MMD to held-out data, RBF kernel widths (0.1, 0.3, 1.0)",
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
