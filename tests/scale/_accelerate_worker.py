"""What each rank runs in the accelerate test; results go to ``out_dir/rank{k}.pt``.

accelerate sets up the process group itself (from the torchrun-style environment the
test gives each process), so this worker does not use ``_distributed._entry``.
"""

import os
import pathlib

import torch
from _fsdp_worker import loss_step, make_model

import twinloss

LR = 0.1


def run(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    result = {"distributed_type": str(accelerator.distributed_type), "num_processes": accelerator.num_processes}
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    model, optimizer = accelerator.prepare(model, optimizer)
    result["wrapper"] = type(model).__name__
    teacher = twinloss.EMATeacher(target_decay=0.9)
    loss_fn = twinloss.TwinFlowLoss(teacher=teacher)
    teacher.update(model)  # the average starts at the initial weights, so after step 1 it lags them

    # Step 1: the loss on the prepared (wrapped) model, gradients averaged by accelerate.
    out = loss_step(loss_fn, model, rank, backward=accelerator.backward)
    result["loss"] = out.loss.detach()
    result["calls"] = out.model_calls
    unwrapped = accelerator.unwrap_model(model)
    result["grads"] = {name: p.grad.detach().clone() for name, p in unwrapped.named_parameters()}
    optimizer.step()
    optimizer.zero_grad()
    teacher.update(model)  # the same wrapped object the loss receives
    # Step 2: the EMA teacher now differs from the online weights' start.
    out = loss_step(loss_fn, model, rank, backward=accelerator.backward)
    result["loss_2"] = out.loss.detach()
    result["grads_2"] = {name: p.grad.detach().clone() for name, p in unwrapped.named_parameters()}
    result["ema_keys"] = sorted(teacher.shadow)
    torch.save(result, pathlib.Path(out_dir) / f"rank{rank}.pt")
    accelerator.wait_for_everyone()
    accelerator.end_training()
