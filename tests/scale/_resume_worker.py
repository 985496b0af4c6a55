"""The FSDP2 resume scenario each rank runs inside ``_fsdp_worker.run`` (one spawn for all FSDP tests)."""

import pathlib

import torch
from _fsdp_worker import CLASSES, DATA, LOCAL_BATCH, make_model, shard

import twinloss
from twinloss.checkpoint import load_sharded_training_state, save_sharded_training_state
from twinloss.distributed import ShardedEMATeacher

STEPS, SAVED_AT = 3, 2


def setup(rank: int, seed: int, target_decay: float = 0.9):
    """A sharded model with a sharded EMA teacher and AdamW, and the rank's data and loss generators."""
    model = shard(make_model())
    loss_fn = twinloss.TwinFlowLoss(teacher=ShardedEMATeacher(target_decay=target_decay))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generators = {
        "data": torch.Generator().manual_seed(seed + rank),
        "loss": torch.Generator().manual_seed(seed + 100 + rank),
    }
    return model, loss_fn, optimizer, generators


def train(count: int, model, loss_fn, optimizer, generators) -> list[float]:
    losses = []
    for _ in range(count):
        x = torch.randn(LOCAL_BATCH, DATA, generator=generators["data"])
        y = torch.randint(0, CLASSES, (LOCAL_BATCH,), generator=generators["data"])
        out = loss_fn(model, x, cond={"y": y}, uncond={"y": torch.full_like(y, CLASSES)}, generator=generators["loss"])
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loss_fn.teacher.update(model)
        losses.append(out.loss.item())
    return losses


def resume(rank: int, out_dir: str) -> dict:
    """Losses of an uninterrupted run and of the same run saved after ``SAVED_AT`` steps and resumed."""
    checkpoint = str(pathlib.Path(out_dir) / "training_state")
    uninterrupted = train(STEPS, *setup(rank, seed=0))

    model, loss_fn, optimizer, generators = setup(rank, seed=0)
    first = train(SAVED_AT, model, loss_fn, optimizer, generators)
    save_sharded_training_state(
        checkpoint, model=model, optimizer=optimizer, loss_fn=loss_fn, generators=generators, step=SAVED_AT
    )
    return {**refused(rank, checkpoint), **resumed(rank, checkpoint), "uninterrupted": uninterrupted, "first": first}


def local_values(model, optimizer, loss_fn) -> list[torch.Tensor]:
    """Copies of this rank's model shards, Adam moments and teacher average."""
    tensors = [*model.state_dict().values(), *loss_fn.teacher.shadow.values()]
    tensors += [value for state in optimizer.state.values() for value in state.values()]
    return [getattr(value, "_local_tensor", value).clone() for value in tensors]


def refused(rank: int, checkpoint: str) -> dict:
    """Load into a teacher of another decay, trained one step: the refusal's message and whether anything changed."""
    model, loss_fn, optimizer, generators = setup(rank, seed=7, target_decay=0.99)
    train(1, model, loss_fn, optimizer, generators)
    before = local_values(model, optimizer, loss_fn)
    try:
        load_sharded_training_state(checkpoint, model=model, optimizer=optimizer, loss_fn=loss_fn, generators=generators)
        message = None
    except ValueError as error:
        message = str(error)
    after = local_values(model, optimizer, loss_fn)
    return {"refusal": message, "refused_unchanged": all(torch.equal(a, b) for a, b in zip(before, after, strict=True))}


def resumed(rank: int, checkpoint: str) -> dict:
    """The saved state loaded into a new setup (other generators, no EMA yet), then trained to the end."""
    model, loss_fn, optimizer, generators = setup(rank, seed=7)
    step = load_sharded_training_state(
        checkpoint, model=model, optimizer=optimizer, loss_fn=loss_fn, generators=generators
    )
    return {
        "step": step,
        "teacher_updates": loss_fn.teacher.num_updates,
        "resumed": train(STEPS - SAVED_AT, model, loss_fn, optimizer, generators),
    }
