"""TwinFlowLoss under accelerate on 2 CPU processes, against one process.

On a CPU accelerate runs multi-process training as DDP over gloo (it turns FSDP on
only for accelerator devices, see benchmarks/RESULTS.md), so this is the accelerate
path CI can run: the prepared model goes straight into the loss, the EMA teacher is
updated through the wrapper, and losses and averaged gradients match one process
over the same rows to 1e-5, for two steps.
"""

import pytest
import torch
import torch.multiprocessing as mp
from _accelerate_worker import LR, run
from _distributed import free_port
from _fsdp_worker import loss_step, make_model

import twinloss

pytest.importorskip("accelerate")
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("accelerate")
    mp.spawn(run, args=(2, free_port(), str(out_dir)), nprocs=2, join=True)
    return [torch.load(out_dir / f"rank{k}.pt", weights_only=False) for k in range(2)]


def _averaged_step(loss_fn, model):
    """Per-rank losses and the mean of the per-rank gradients (what DDP's all-reduce gives)."""
    losses, grads = [], {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for rank in range(2):
        model.zero_grad()
        losses.append(loss_step(loss_fn, model, rank).loss.detach())
        for name, p in model.named_parameters():
            grads[name] += p.grad / 2
    return losses, grads


def test_accelerate_runs_ddp_on_cpu(ranks):
    assert ranks[0]["distributed_type"].endswith("MULTI_CPU")
    assert ranks[0]["num_processes"] == 2
    assert ranks[0]["wrapper"] == "DistributedDataParallel"
    assert ranks[0]["calls"] == 6  # the wrapper does not change the loss's passes
    assert ranks[0]["ema_keys"] == sorted(f"module.{name}" for name, _ in make_model().named_parameters())


def test_two_steps_with_an_ema_teacher_match_one_process(ranks):
    model = make_model()
    teacher = twinloss.EMATeacher(target_decay=0.9)
    loss_fn = twinloss.TwinFlowLoss(teacher=teacher)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    teacher.update(model)
    for step, suffix in enumerate(("", "_2")):
        losses, grads = _averaged_step(loss_fn, model)
        for rank in range(2):
            torch.testing.assert_close(ranks[rank][f"loss{suffix}"], losses[rank], **TOL)
            got = ranks[rank][f"grads{suffix}"]
            assert got.keys() == grads.keys()
            for name in grads:
                torch.testing.assert_close(got[name], grads[name], msg=f"step {step + 1}: {name}", **TOL)
        for name, p in model.named_parameters():
            p.grad = grads[name].clone()
        optimizer.step()
        optimizer.zero_grad()
        teacher.update(model)
