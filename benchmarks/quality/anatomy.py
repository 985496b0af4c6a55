r"""Where guidance goes wrong: the fine-tuned fields of ``curves.py`` runs on a conditional image task, taken apart.

For each saved run (``curves.py`` keeps the final raw and power-average
weights under ``results/curves/weights/``) and the pretrained start, on the
power average:

* **the one-step map against its own field**: FD of 1-NFE samples next to FD
  of 50 Euler steps of the same network's instantaneous field
  :math:`F(x, t, t)`. Equal figures mean the one-step map reproduces its field
  and any damage sits in the field itself; a much better field means the
  one-step distillation is what loses quality;
* **guidance at sampling time**: the same two samplers with classifier-free
  guidance :math:`F_c + w (F_c - F_u)` (``AnyStepSampler(guidance_scale=w)``,
  CFG scale :math:`1 + w`); for the pretrained model this is the FD / class
  accuracy frontier that baked-in guidance is aiming at;
* **the guidance direction**: on held-out :math:`x_t` (``t`` uniform in
  [0.05, 0.95]) at :math:`r = t`, the flow-matching error of the conditional
  and unconditional branches, the size of :math:`F_c - F_u` relative to the
  pretrained model's :math:`P_c - P_u`, and its component along that
  direction, :math:`\langle F_c - F_u, P_c - P_u\rangle / \|P_c - P_u\|^2`
  (1 for the pretrained model; ``s`` for a field that is exactly CFG of scale
  ``s`` of it). A norm ratio far above the component means the difference
  has grown in directions the data does not support;
* **the rectification gap left at the end** (``rectification_gap``): the
  fake field against the guided real field the default rectification uses,
  and against the guidance-free combination :math:`(1 - w) F_c + w F_u`.

    python benchmarks/quality/anatomy.py --seed 0 --methods "TwinFlow w 0" "TwinFlow defaults"
    python benchmarks/quality/anatomy.py --task digits --seed 0 --seed 1 --seed 2   # every saved run of those seeds

Writes ``results/curves/anatomy_{task}_seed{N}.json`` and prints a table.
"""

import json
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import curves  # noqa: E402

import twinloss  # noqa: E402

SAMPLERS = (  # (label, steps, mode, sampling-time guidance w)
    ("1 NFE", 1, "few", 0.0),
    ("1 NFE, CFG 1.25", 1, "few", 0.25),
    ("own field, 50 Euler", 50, "multi", 0.0),
    ("own field, 50 Euler, CFG 1.25", 50, "multi", 0.25),
    ("own field, 50 Euler, CFG 1.5", 50, "multi", 0.5),
    ("own field, 50 Euler, CFG 2", 50, "multi", 1.0),
)


def samples(model: nn.Module, bench: curves.Bench, steps: int, mode: str, scale: float) -> Tensor:
    sampler = twinloss.AnyStepSampler(steps, mode=mode, guidance_scale=scale)
    return sampler(model, bench.noise, cond=bench.cond, uncond=bench.uncond if scale else None,
                   generator=torch.Generator().manual_seed(curves.SAMPLE_SEED)).sample


@torch.no_grad()
def guidance_direction(model: nn.Module, pretrained: nn.Module, bench: curves.Bench) -> dict[str, float]:
    """Flow-matching errors of both branches and :math:`F_c - F_u` against the pretrained difference."""
    g = torch.Generator().manual_seed(5)
    x, labels = bench.probe
    t = 0.05 + 0.9 * torch.rand(x.shape[0], generator=g)
    z = torch.randn(x.shape, generator=g)
    x_t = twinloss.LinearPath().sample(x, z, t).x_t
    velocity = z - x
    null = torch.full_like(labels, int(bench.uncond["y"][0]))

    def branches(net: nn.Module) -> tuple[Tensor, Tensor]:
        return net(x_t, t, t, y=labels), net(x_t, t, t, y=null)

    cond, uncond = branches(model)
    ref_cond, ref_uncond = branches(pretrained)
    difference, ref_difference = cond - uncond, ref_cond - ref_uncond
    ref_norm = float((ref_difference**2).sum())
    return {
        "fm_error_cond": float(((cond - velocity) ** 2).mean()),
        "fm_error_uncond": float(((uncond - velocity) ** 2).mean()),
        "difference_norm_ratio": (float((difference**2).sum()) / ref_norm) ** 0.5,
        "difference_along_pretrained": float((difference * ref_difference).sum()) / ref_norm,
    }


@torch.no_grad()
def rectification_gap(model: nn.Module, bench: curves.Bench, scale: float = 0.5) -> dict[str, float]:
    r"""The rectification's velocity gap left at the end of training, against the guided and the unguided real field.

    On the model's own 1-NFE samples :math:`\hat x` (the bench's noise and
    labels), with fresh noise and :math:`s \sim U(0, 1)`,
    :math:`y = s z + (1 - s) \hat x`; the fake field :math:`F(y, -s, -s)`
    against the real field the loss uses, :math:`F_c(y, s, s)`, and against the
    guidance-free combination :math:`(1 - w) F_c + w F_u` (:math:`w` = ``scale``,
    the default recipe's 0.5), each as a mean square per entry, beside the size
    of :math:`w (F_c - F_u)`. A recipe whose rectification can reach its fixed
    point drives its gap towards zero; one that cannot keeps a gap.
    Meaningful for recipes that train the fake field (not RCGM only).
    """
    g = torch.Generator().manual_seed(6)
    x_hat = samples(model, bench, 1, "few", 0.0)
    z = torch.randn(x_hat.shape, generator=g)
    s = torch.rand(x_hat.shape[0], generator=g)
    y = twinloss.LinearPath().sample(x_hat, z, s).x_t
    labels = bench.cond["y"]
    fake = model(y, -s, -s, y=labels)
    cond, uncond = model(y, s, s, y=labels), model(y, s, s, y=bench.uncond["y"])
    unguided = (1 - scale) * cond + scale * uncond
    return {
        "gap_to_guided_field": float((fake - cond).square().mean()),
        "gap_to_unguided_field": float((fake - unguided).square().mean()),
        "guidance_term": float((scale * (cond - uncond)).square().mean()),
    }


def anatomy(model: nn.Module, pretrained: nn.Module, bench: curves.Bench) -> dict:
    row = {label: bench.score(samples(model, bench, steps, mode, w)) for label, steps, mode, w in SAMPLERS}
    return {**row, "direction": guidance_direction(model, pretrained, bench), "rectification": rectification_gap(model, bench)}


def main() -> None:
    tasks = [name for name, task in curves.TASKS.items() if task.conditional and name != "ring"]
    args = curves.saved_runs_parser(__doc__, tasks, "method names (default: every saved run)").parse_args()
    torch.set_num_threads(1)
    task = curves.TASKS[args.task]
    for seed in args.seed:
        bench = task.prepare(seed, task.full)
        saved = (args.results / "weights").glob(f"{task.name}_seed{seed}_*.pt")
        names = args.methods or sorted(path.stem.split("_", 2)[2] for path in saved if path.stem.count("_") == 2)
        report = {"pretrained": anatomy(bench.pretrained, bench.pretrained, bench)}
        for name in names:
            model = curves.load_weights(bench, args.results, task.name, seed, name, "power")
            report[name] = anatomy(model, bench.pretrained, bench)
        (args.results / f"anatomy_{task.name}_seed{seed}.json").write_text(json.dumps(report, indent=1) + "\n")
        for name, row in report.items():
            cells = " | ".join(f"{label} {row[label]['fd']:.3f}" for label, *_ in SAMPLERS)
            d = row["direction"]
            gap = row["rectification"]
            print(f"seed {seed} | {name} | {cells} | |Fc-Fu| x{d['difference_norm_ratio']:.2f}, "
                  f"along P {d['difference_along_pretrained']:.2f} | gap to guided {gap['gap_to_guided_field']:.4f}, "
                  f"to unguided {gap['gap_to_unguided_field']:.4f}, guidance term {gap['guidance_term']:.4f}", flush=True)


if __name__ == "__main__":
    main()
