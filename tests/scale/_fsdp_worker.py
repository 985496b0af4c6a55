"""What each rank runs in the FSDP2 tests; results go to ``out_dir/rank{k}.pt``."""

import pathlib

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._composable import checkpoint
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from toy_models import BlockMLP

import twinloss
from twinloss.distributed import ShardedEMATeacher, local_shard

DATA, WIDTH, DEPTH, CLASSES, LOCAL_BATCH = 12, 16, 2, 3, 8


def make_model() -> BlockMLP:
    torch.manual_seed(0)
    return BlockMLP((DATA,), width=WIDTH, depth=DEPTH, num_classes=CLASSES)


def rank_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
    """Rows ``[rank * B, (rank + 1) * B)`` of a fixed global batch, and that rank's generator."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(2 * LOCAL_BATCH, DATA, generator=g)
    y = torch.randint(0, CLASSES, (2 * LOCAL_BATCH,), generator=g)
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    return x[rows], y[rows], torch.Generator().manual_seed(100 + rank)


def loss_step(loss_fn, model, rank: int, *, backward=None):
    """One loss forward and backward on ``rank``'s rows (``backward(loss)`` defaults to ``loss.backward()``)."""
    x, y, g = rank_batch(rank)
    x_before = x.clone()
    out = loss_fn(model, x, cond={"y": y}, uncond={"y": torch.full_like(y, CLASSES)}, generator=g)
    if backward is None:
        out.loss.backward()
    else:
        backward(out.loss)
    if not torch.equal(x, x_before):
        raise RuntimeError("the loss modified the caller's batch")
    return out


def shard(model: BlockMLP, *, mp_policy=None, activation_checkpointing=False) -> BlockMLP:
    kwargs = {} if mp_policy is None else {"mp_policy": mp_policy}
    for block in model.blocks:
        if activation_checkpointing:
            checkpoint(block)
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def full(tensors: dict) -> dict:
    return {name: t.full_tensor().detach().clone() for name, t in tensors.items()}


def grads(model) -> dict:
    return full({name: p.grad for name, p in model.named_parameters()})


def run(rank: int, world_size: int, out_dir: str) -> None:
    result = {}
    # A. fp32, per-block sharding: loss and averaged gradients.
    model = shard(make_model())
    out = loss_step(twinloss.TwinFlowLoss(), model, rank)
    result["loss"] = out.loss.detach()
    result["calls"] = out.model_calls
    result["grads"] = grads(model)

    # B. the same with activation checkpointing on every block.
    model = shard(make_model(), activation_checkpointing=True)
    out = loss_step(twinloss.TwinFlowLoss(), model, rank)
    result["ac_loss"] = out.loss.detach()
    result["ac_grads"] = grads(model)

    # C. bf16 parameters, fp32 gradient reduction.
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = shard(make_model(), mp_policy=policy)
    out = loss_step(twinloss.TwinFlowLoss(), model, rank)
    result["mp_loss"] = out.loss.detach()
    result["mp_grads"] = grads(model)
    result["mp_grad_dtypes"] = {p.grad.dtype for p in model.parameters()}

    # D. sharded EMA: two updates around an SGD step, then a loss with it.
    model = shard(make_model())
    teacher = ShardedEMATeacher(target_decay=0.9)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    teacher.update(model)
    loss_step(twinloss.TwinFlowLoss(), model, rank)
    optimizer.step()
    optimizer.zero_grad()
    teacher.update(model)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)  # one more step: online != average
    loss_step(twinloss.TwinFlowLoss(), model, rank)
    sgd.step()
    sgd.zero_grad()
    result["ema_params_before"] = full(dict(model.named_parameters()))
    result["ema_shadow"] = full(teacher.shadow)
    result["ema_decay"] = teacher.decay
    result["ema_local_numel"] = sum(local_shard(s).numel() for s in teacher.shadow.values())
    result["param_local_numel"] = sum(local_shard(p).numel() for p in model.parameters())
    probe_x, probe_y, _ = rank_batch(0)
    t = torch.linspace(0.1, 0.9, LOCAL_BATCH)
    result["ema_probe"] = teacher(model, probe_x, t, 0.5 * t, {"y": probe_y})
    loss_fn = twinloss.TwinFlowLoss(teacher=teacher)
    out = loss_step(loss_fn, model, rank)
    result["ema_loss"] = out.loss.detach()
    result["ema_grads"] = grads(model)
    result["ema_params_after"] = full(dict(model.named_parameters()))

    # E. torch.distributed.checkpoint round trip of the sharded average.
    ckpt = str(pathlib.Path(out_dir) / "ema_ckpt")
    dcp.save({"loss": loss_fn.state_dict()}, checkpoint_id=ckpt)
    restored = ShardedEMATeacher(target_decay=0.9)
    restored.materialize(model)  # sharded tensors to load into (the online weights)
    fresh = twinloss.TwinFlowLoss(teacher=restored)
    state = {"loss": fresh.state_dict()}
    dcp.load(state, checkpoint_id=ckpt)
    fresh.load_state_dict(state["loss"])
    result["dcp_decay"] = (restored.decay, restored.num_updates)
    result["dcp_equal"] = all(
        torch.equal(local_shard(restored.shadow[n]), local_shard(teacher.shadow[n]))
        for n in teacher.shadow
    )
    result["dcp_is_dtensor"] = all(
        type(s).__name__ == "DTensor" for s in restored.shadow.values()
    )
    # F. per-rank peak bytes (FSDPMemTracker): online teacher vs sharded EMA.
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    for name in ("online", "ema"):
        model = shard(make_model())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        teacher = ShardedEMATeacher() if name == "ema" else None
        loss_fn = twinloss.TwinFlowLoss(teacher=teacher)
        if teacher is not None:
            teacher.update(model)  # the average exists before the tracked step
        tracker = FSDPMemTracker(model, optimizer)
        with tracker:
            loss_step(loss_fn, model, rank)
        result[f"peak_{name}"] = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
        if teacher is not None:
            result["shadow_bytes"] = sum(
                local_shard(s).numel() * local_shard(s).element_size() for s in teacher.shadow.values()
            )
    # G. a training state saved mid-run through DCP and resumed.
    from _resume_worker import resume

    result["resume"] = resume(rank, out_dir)
    dist.barrier()
    torch.save(result, pathlib.Path(out_dir) / f"rank{rank}.pt")
