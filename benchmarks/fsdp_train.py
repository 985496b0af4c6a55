"""Reference FSDP2 training loop for TwinFlowLoss (run with torchrun).

CPU, gloo (what the test suite runs)::

    PYTHONPATH=src:benchmarks torchrun --standalone --nproc_per_node 2 \\
        benchmarks/fsdp_train.py --steps 2

GPUs, NCCL, bf16 parameters with fp32 reduction, sharded EMA teacher::

    PYTHONPATH=src:benchmarks torchrun --standalone --nproc_per_node 8 \\
        benchmarks/fsdp_train.py --device cuda --mixed-precision --ema --steps 1000

The model is the toy ``BlockMLP``; swap in any backbone that follows the
protocol ``model(x_t, t, r, **cond)`` and wrap its blocks the same way. Each
rank draws its own data and its own loss generator (seeded by rank); FSDP2
averages the gradients. With ``--checkpoint DIR`` the training state (model,
optimizer, teacher, each rank's generators and RNG; ``twinloss.checkpoint``)
is saved through torch.distributed.checkpoint at the end; ``--resume DIR``
continues from such a state with the losses the uninterrupted run would give.
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed._composable import checkpoint as activation_checkpoint
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from toy_models import BlockMLP

import twinloss
from twinloss.checkpoint import load_sharded_training_state, save_sharded_training_state
from twinloss.distributed import ShardedEMATeacher


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16, help="rows per rank (>= 4)")
    parser.add_argument("--data", type=int, default=32)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl)")
    parser.add_argument("--mixed-precision", action="store_true", help="bf16 params, fp32 reduce")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--ema", action="store_true", help="sharded EMA teacher")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="the loss's guidance_scale (default: TwinFlowLoss's own, on its default interval)")
    parser.add_argument("--checkpoint", default=None, help="directory for a DCP training state, saved at the end")
    parser.add_argument("--resume", default=None, help="directory of a DCP training state to continue from")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> list[float]:
    args = parse_args(argv)
    if args.batch < 4:
        raise ValueError(f"--batch must be >= 4 (four row groups), got {args.batch}")
    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend)
    rank = dist.get_rank()
    if args.device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")

    torch.manual_seed(args.seed)  # same initial weights on every rank before sharding
    model = BlockMLP((args.data,), width=args.width, depth=args.depth, num_classes=args.classes).to(device)
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if args.mixed_precision
        else MixedPrecisionPolicy()
    )
    for block in model.blocks:
        if args.activation_checkpointing:
            activation_checkpoint(block)
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)

    teacher = ShardedEMATeacher() if args.ema else None
    guidance = {} if args.guidance_scale is None else {"guidance_scale": args.guidance_scale}
    loss_fn = twinloss.TwinFlowLoss(teacher=teacher, **guidance)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    data_gen = torch.Generator(device).manual_seed(1000 + rank)
    loss_gen = torch.Generator(device).manual_seed(2000 + rank)
    null = torch.full((args.batch,), args.classes, device=device)
    generators = {"data": data_gen, "loss": loss_gen}
    state = dict(model=model, optimizer=optimizer, loss_fn=loss_fn, generators=generators)
    start = load_sharded_training_state(args.resume, **state) if args.resume else 0

    losses = []
    for step in range(start, start + args.steps):
        x = torch.randn(args.batch, args.data, device=device, generator=data_gen)
        y = torch.randint(0, args.classes, (args.batch,), device=device, generator=data_gen)
        out = loss_fn(model, x, cond={"y": y}, uncond={"y": null}, generator=loss_gen)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_fn.update_teachers(model)
        mean_loss = out.loss.detach().clone()
        dist.all_reduce(mean_loss, op=dist.ReduceOp.AVG)
        losses.append(float(mean_loss))
        if rank == 0:
            print(f"step {step} loss {losses[-1]:.8f} model_calls {out.model_calls} "
                  f"sample_evaluations {out.sample_evaluations}", flush=True)

    if args.checkpoint:
        save_sharded_training_state(args.checkpoint, **state, step=start + args.steps)
    dist.barrier()  # every rank done with its collectives before the gloo threads are torn down
    dist.destroy_process_group()
    return losses


if __name__ == "__main__":
    main()
