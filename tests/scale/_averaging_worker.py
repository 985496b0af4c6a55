"""What each rank runs in the sharded weight-average test; results go to ``out_dir/rank{k}.pt``."""

import pathlib

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from _fsdp_worker import LOCAL_BATCH, full, loss_step, make_model, rank_batch, shard

import twinloss
from twinloss.distributed import local_shard

GAMMA, UPDATES = 2.0, 3


def probe():
    x, y, _ = rank_batch(0)
    return x, {"y": y}


def run(rank: int, world_size: int, out_dir: str) -> None:
    result = {}
    model = shard(make_model())
    average = twinloss.ShardedWeightAverage(twinloss.PowerFunctionDecay(GAMMA))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = twinloss.TwinFlowLoss(guidance_scale=0.0)
    iterates = []
    for _ in range(UPDATES):
        loss_step(loss_fn, model, rank)
        optimizer.step()
        optimizer.zero_grad()
        average.update(model)
        iterates.append(full(dict(model.named_parameters())))
    result["iterates"] = iterates
    result["average"] = full(average.shadow)
    result["num_updates"], result["decay"] = average.num_updates, average.decay
    result["average_local_numel"] = sum(local_shard(s).numel() for s in average.shadow.values())
    result["param_local_numel"] = sum(local_shard(p).numel() for p in model.parameters())

    noise, cond = probe()
    sampler = twinloss.AnyStepSampler(2, mode="any")
    result["sample"] = sampler(average.sampling_model(model), noise, cond=cond).sample
    with average.swapped_in(model):
        result["sample_swapped"] = sampler(model, noise, cond=cond).sample
    result["params_after"] = full(dict(model.named_parameters()))

    ckpt = str(pathlib.Path(out_dir) / "average_ckpt")
    dcp.save({"average": average.state_dict()}, checkpoint_id=ckpt)
    restored = twinloss.ShardedWeightAverage(twinloss.PowerFunctionDecay(GAMMA))
    restored.materialize(model)
    state = {"average": restored.state_dict()}
    dcp.load(state, checkpoint_id=ckpt)
    restored.load_state_dict(state["average"])
    result["restored"] = (restored.num_updates, restored.decay)
    result["restored_equal"] = all(
        torch.equal(local_shard(restored.shadow[n]), local_shard(average.shadow[n])) for n in average.shadow
    )
    result["local_batch"] = LOCAL_BATCH
    dist.barrier()
    torch.save(result, pathlib.Path(out_dir) / f"rank{rank}.pt")
