"""Cost of a TwinFlow step against plain flow matching, and against its own floor.

Prints a markdown table (and writes it with ``--output``). For each model and
the same batch, in one run, with the configurations interleaved per repeat:

* ``fm``: plain flow matching (one grad-carrying call);
* ``rcgm``: the any-step base only (RCGM target, no fake group, no rectification);
* ``twinflow``: the full recipe without guidance, and ``twinflow+cfg`` with it;
  ``twinflow+cfg, free rectify`` adds ``rectify_field="guidance_free"``.

Floor, in units of one flow-matching step, from the loss's own counts:

    floor = (no_grad_rows + 3 * grad_rows) / (3 * B)

with ``grad_rows = grad_sample_evaluations`` (= B) and ``no_grad_rows =
sample_evaluations - grad_sample_evaluations``. A grad-carrying row costs
about three forward rows (forward + backward at about twice the forward), a
no-grad row one; a flow-matching step is 3 B forward rows. ``time/floor``
near 1 means the step costs what its model evaluations cost.

``loss arithmetic`` reruns each configuration with a near-free model
(``F = w * x_t``, one scalar weight), so the time left is the loss's own work
(sampling, targets, distances, slicing); it is reported as a share of the
same configuration's step with the real model.

Models: ``mlp`` (toy BlockMLP), ``sana`` (stock diffusers SanaTransformer2DModel,
tiny config) and ``wan`` (stock WanTransformer3DModel, tiny video config), the
diffusers ones bound by ``twinloss_adapters.sana`` / ``.wan`` exactly as a user
would (target-time and sign embeddings included).

Reproduce (CPU)::

    PYTHONPATH=src:benchmarks python benchmarks/overhead.py --output benchmarks/RESULTS.md

GPU::

    PYTHONPATH=src:benchmarks python benchmarks/overhead.py --device cuda --dtype bfloat16 --compile

``--checks`` instead times every configuration with the finite-value checks
on (``check_finite="raise"``, the default) against off (docs/errors.md)::

    PYTHONPATH=src:adapters:benchmarks python benchmarks/overhead.py --checks --threads 1
"""

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn
from toy_models import BlockMLP

import twinloss
from twinloss.loss import RELEASED_GUIDANCE

CONFIGS: dict[str, Callable[[], twinloss.TwinFlowLoss]] = {
    "fm": lambda: twinloss.TwinFlowLoss.plain_flow_matching(),
    "rcgm": lambda: twinloss.TwinFlowLoss.rcgm(guidance_scale=0.0),
    "twinflow": lambda: twinloss.TwinFlowLoss(guidance_scale=0.0),
    "twinflow+cfg": lambda: twinloss.TwinFlowLoss(**RELEASED_GUIDANCE),
    "twinflow+cfg, free rectify": lambda: twinloss.TwinFlowLoss(**RELEASED_GUIDANCE, rectify_field="guidance_free"),
}


class FreeModel(nn.Module):
    """``F = w * x_t``: a model whose calls cost almost nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))

    def forward(self, x_t: Tensor, t: Tensor, r: Tensor, **cond: Tensor) -> Tensor:
        return self.weight * x_t


def build(name: str, batch: int, device: torch.device, dtype: torch.dtype):
    """``(model, x, cond, uncond)`` for one benchmark model."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name == "mlp":
        model = BlockMLP((64,), width=256, depth=4, num_classes=10)
        x = torch.randn(batch, 64, generator=g)
        y = torch.randint(0, 10, (batch,), generator=g)
        cond, uncond = {"y": y}, {"y": torch.full_like(y, 10)}
    elif name == "sana":
        from diffusers import SanaTransformer2DModel

        from twinloss_adapters import sana

        model = sana.adapt(SanaTransformer2DModel(
            in_channels=8, out_channels=8, num_attention_heads=4, attention_head_dim=16, num_layers=4,
            num_cross_attention_heads=4, cross_attention_head_dim=16, cross_attention_dim=64,
            caption_channels=32, sample_size=16, patch_size=1,
        ))
        x = torch.randn(batch, 8, 16, 16, generator=g)
        context = torch.randn(batch, 8, 32, generator=g)
        cond, uncond = {"encoder_hidden_states": context}, {"encoder_hidden_states": torch.zeros_like(context)}
    elif name == "wan":
        from diffusers import WanTransformer3DModel

        from twinloss_adapters import wan

        model = wan.adapt(WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=8,
            out_channels=8, text_dim=32, freq_dim=32, ffn_dim=128, num_layers=4, rope_max_seq_len=64,
        ))
        x = torch.randn(batch, 8, 4, 16, 16, generator=g)
        context = torch.randn(batch, 8, 32, generator=g)
        cond, uncond = {"encoder_hidden_states": context}, {"encoder_hidden_states": torch.zeros_like(context)}
    else:
        raise ValueError(f"model must be one of mlp, sana, wan; got {name!r}")
    model = model.to(device=device, dtype=dtype)
    cast = lambda c: {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in c.items()}
    return model, x.to(device, dtype), cast(cond), cast(uncond)


def make_step(loss_fn, model, x, cond, uncond, device):
    g = torch.Generator(device).manual_seed(0)
    counts = {}

    def step() -> None:
        out = loss_fn(model, x, cond=cond, uncond=uncond if loss_fn.guidance_scale else None, generator=g)
        out.loss.backward()
        model.zero_grad(set_to_none=True)
        counts.update(calls=out.model_calls, rows=out.sample_evaluations, grad_rows=out.grad_sample_evaluations)

    return step, counts


def synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.get_device_module(device.type).synchronize()


def measure(steps: dict[str, Callable[[], None]], repeats: int, warmup: int, device) -> dict[str, float]:
    """Median seconds per step, configurations interleaved within each repeat."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def floor(counts: dict[str, int]) -> float:
    """Forward-equivalents of a step in units of one flow-matching step."""
    no_grad = counts["rows"] - counts["grad_rows"]
    return (no_grad + 3 * counts["grad_rows"]) / (3 * counts["grad_rows"])


def run_model(name: str, args, device, dtype) -> list[dict]:
    model, x, cond, uncond = build(name, args.batch, device, dtype)
    free = FreeModel().to(device=device, dtype=dtype)
    if args.compile:
        model = torch.compile(model)
    steps, counts, free_steps = {}, {}, {}
    for config, make_loss in CONFIGS.items():
        steps[config], counts[config] = make_step(make_loss(), model, x, cond, uncond, device)
        free_cond = {}  # the free model takes no conditioning
        free_uncond = {}
        free_steps[config], _ = make_step(make_loss(), free, x, free_cond, free_uncond, device)
    seconds = measure(steps, args.repeats, args.warmup, device)
    free_seconds = measure(free_steps, args.repeats, args.warmup, device)
    rows = []
    for config in CONFIGS:
        ratio = seconds[config] / seconds["fm"]
        bound = floor(counts[config])
        rows.append(dict(
            model=name, config=config, calls=counts[config]["calls"], rows=counts[config]["rows"],
            ms=1e3 * seconds[config], vs_fm=ratio, floor=bound, vs_floor=ratio / bound,
            loss_share=free_seconds[config] / seconds[config],
        ))
    return rows


def run_checks(name: str, args, device, dtype) -> list[dict]:
    """Each configuration with the finite-value checks on (``"raise"``) and off, interleaved.

    ``checks on / off`` is the step's time with the checks over the same
    step without them; ``vs FM`` divides each by the flow-matching step with
    the same setting, so ``(vs FM on) / (vs FM off)`` is the change of the
    step's ratio to flow matching that the checks cause. On a shared CPU these
    two ratios carry the timing noise of the model (several percent); the
    checks' own time is measured apart, as the on/off difference of the same
    steps with a near-free model (the checks read the same tensors), and
    given as a share of the step with the real model.
    """
    model, x, cond, uncond = build(name, args.batch, device, dtype)
    if args.compile:
        model = torch.compile(model)
    free = FreeModel().to(device=device, dtype=dtype)
    steps, free_steps = {}, {}
    for config, make_loss in CONFIGS.items():
        for policy in ("raise", "off"):
            loss_fn = make_loss()
            loss_fn.check_finite = policy
            steps[config, policy], _ = make_step(loss_fn, model, x, cond, uncond, device)
            free_steps[config, policy], _ = make_step(loss_fn, free, x, {}, {}, device)
    seconds = measure(steps, args.repeats, args.warmup, device)
    # The checks' own time, without the model's noise: the same steps with a near-free model.
    free_seconds = measure(free_steps, 10 * args.repeats, args.warmup, device)
    rows = []
    for config in CONFIGS:
        on, off = seconds[config, "raise"], seconds[config, "off"]
        fm_on, fm_off = seconds["fm", "raise"], seconds["fm", "off"]
        cost = free_seconds[config, "raise"] - free_seconds[config, "off"]
        rows.append(dict(model=name, config=config, ms_on=1e3 * on, ms_off=1e3 * off, on_off=on / off,
                         ratio_change=(on / fm_on) / (off / fm_off), check_ms=1e3 * cost, check_share=cost / off))
    return rows


def markdown_table(header: list[str], cells: list[list[str]]) -> str:
    """A markdown table: the first two columns (model, step) left-aligned, the numbers right-aligned."""
    rule = ["---"] * 2 + ["---:"] * (len(header) - 2)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


def checks_table(rows: list[dict]) -> str:
    header = ["model", "step", "ms/step checks on", "ms/step checks off", "checks on / off",
              "(time/FM on) / (time/FM off)", "checks' own ms (free model)", "checks' own share of the step"]
    return markdown_table(header, [
        [r["model"], r["config"], f"{r['ms_on']:.2f}", f"{r['ms_off']:.2f}", f"{r['on_off']:.3f}",
         f"{r['ratio_change']:.3f}", f"{r['check_ms']:.3f}", f"{100 * r['check_share']:.2f}%"]
        for r in rows
    ])


def table(rows: list[dict]) -> str:
    header = ["model", "step", "model calls", "sample evals", "ms/step", "time / FM", "floor (FM units)",
              "time / floor", "loss arithmetic"]
    return markdown_table(header, [
        [r["model"], r["config"], str(r["calls"]), str(r["rows"]), f"{r['ms']:.2f}", f"{r['vs_fm']:.2f}",
         f"{r['floor']:.2f}", f"{r['vs_floor']:.2f}", f"{100 * r['loss_share']:.1f}%"]
        for r in rows
    ])


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mlp,sana,wan")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--output", default=None, help="append the table to this markdown file")
    parser.add_argument("--checks", action="store_true", help="measure the finite-value checks on against off")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = []
    for name in args.models.split(","):
        rows.extend((run_checks if args.checks else run_model)(name.strip(), args, device, dtype))
    text = (checks_table if args.checks else table)(rows)
    header = (
        f"device {device.type} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), "
        f"dtype {args.dtype}, compile {args.compile}, batch {args.batch}, "
        f"median of {args.repeats}, torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print(header)
    print(text)
    if args.output:
        with open(args.output, "a") as handle:
            handle.write(f"\n{header}\n\n{text}\n")
    return text


if __name__ == "__main__":
    main()
