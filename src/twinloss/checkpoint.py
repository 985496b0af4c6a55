"""Training-state checkpoints: resume a TwinFlow run exactly where it stopped.

A TwinFlow step draws from three sources of randomness besides the data: the
``torch.Generator`` handed to the loss (times, noise, RCGM re-noising), the
global torch RNG (dropout, data loaders seeded from it) and Python's
``random``. A resumed run repeats the uninterrupted one bit for bit only if all
of them come back with the weights, the optimizer and the EMA teacher, so a
training state holds

* ``model``: ``model.state_dict()`` (twin modules, LoRA and its EMA adapter included);
* ``optimizer``: ``optimizer.state_dict()``;
* ``loss``: ``loss_fn.state_dict()``, which carries the teacher's state
  (EMA average, decay, update count);
* ``generators``: the state of each named ``torch.Generator`` you pass;
* ``rng``: the global torch RNG (CPU, and CUDA when it was in use) and ``random``'s;
* ``step``: your step counter.

:func:`save_training_state` / :func:`load_training_state` write one file
(``torch.save``, loaded with ``weights_only=True``).
:func:`save_sharded_training_state` / :func:`load_sharded_training_state` do
the same for FSDP2-sharded models through ``torch.distributed.checkpoint``
(each rank saves its own RNG and generator states). Loading is strict: a key,
generator or RNG state that does not match raises ``ValueError`` naming it.
"""

import os
import random
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = [
    "load_sharded_training_state",
    "load_training_state",
    "save_sharded_training_state",
    "save_training_state",
]

FORMAT = "twinloss.training_state"
VERSION = 1


# --- the random state -------------------------------------------------------------------------


def _python_rng_tensor() -> Tensor:
    """``random.getstate()`` as an int64 tensor ``[version, *internal_state]`` (its gauss slot is None in CPython's Mersenne Twister)."""
    version, internal, gauss = random.getstate()
    if gauss is not None:
        raise ValueError("random.getstate() carries a cached gauss value; this version of Python is not supported")
    return torch.tensor([version, *internal], dtype=torch.int64)


def _set_python_rng(state: Tensor) -> None:
    values = [int(v) for v in state.tolist()]
    random.setstate((values[0], tuple(values[1:]), None))


def _cuda_in_use() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def capture_rng(generators: Mapping[str, torch.Generator]) -> dict[str, Tensor]:
    """Every random state of this process, as flat tensors: ``torch``, ``python``, ``cuda.<i>``, ``generator.<name>``."""
    for name, generator in generators.items():
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generators[{name!r}] must be a torch.Generator, got {type(generator).__name__}")
    state = {"torch": torch.get_rng_state(), "python": _python_rng_tensor()}
    if _cuda_in_use():
        state.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    state.update({f"generator.{name}": g.get_state() for name, g in generators.items()})
    return state


def check_rng_names(saved: set[str], generators: Mapping[str, torch.Generator]) -> None:
    """Raise ValueError unless the saved random states (names as in :func:`capture_rng`) can be restored here."""
    saved_generators = {key.removeprefix("generator.") for key in saved if key.startswith("generator.")}
    if saved_generators != set(generators):
        raise ValueError(
            f"generators: the checkpoint holds {sorted(saved_generators)}, the call passes {sorted(generators)}; "
            "pass the same named torch.Generators"
        )
    if not {"torch", "python"} <= saved:
        raise ValueError(f"rng: the checkpoint lacks {sorted({'torch', 'python'} - saved)}")
    cuda = sum(key.startswith("cuda.") for key in saved)
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cuda and cuda != available:
        raise ValueError(f"rng: the checkpoint holds the CUDA RNG of {cuda} devices; this process has {available}")


def restore_rng(state: Mapping[str, Tensor], generators: Mapping[str, torch.Generator]) -> None:
    """Put back what :func:`capture_rng` captured.

    Raises:
        ValueError: see :func:`check_rng_names`.
    """
    check_rng_names(set(state), generators)
    torch.set_rng_state(state["torch"].cpu())
    _set_python_rng(state["python"])
    cuda = sorted((key for key in state if key.startswith("cuda.")), key=lambda key: int(key.split(".")[1]))
    if cuda:
        torch.cuda.set_rng_state_all([state[key].cpu() for key in cuda])
    for name, generator in generators.items():
        generator.set_state(state[f"generator.{name}"].cpu())


# --- strict module loading ------------------------------------------------------------------


def _check_module_state(module: nn.Module, state: Mapping[str, object], what: str) -> None:
    """Raise ValueError naming missing and unexpected keys, and tensors of another shape; changes nothing.

    ``module.load_state_dict`` copies every matching tensor before it
    reports the others, so a mismatch must be found before it runs.
    """
    current = module.state_dict()
    missing, unexpected = sorted(set(current) - set(state)), sorted(set(state) - set(current))
    if missing or unexpected:
        raise ValueError(
            f"{what}: the checkpoint does not match; missing {missing}, "
            f"unexpected {unexpected} (a LoRAEMATeacher must attach() before loading)"
        )
    reshaped = [
        f"{key} {tuple(state[key].shape)}, here {tuple(value.shape)}"
        for key, value in current.items()
        if isinstance(value, Tensor) and isinstance(state[key], Tensor) and state[key].shape != value.shape
    ]
    if reshaped:
        raise ValueError(f"{what}: the checkpoint holds tensors of other shapes: {'; '.join(reshaped[:3])}")
    for name, submodule in module.named_modules():  # teachers and averages refuse their saved values here
        key = f"{name}._extra_state" if name else "_extra_state"
        if hasattr(submodule, "check_extra_state") and key in state:
            submodule.check_extra_state(state[key])


def _check_optimizer_state(optimizer: torch.optim.Optimizer, state: Mapping[str, object]) -> None:
    """Raise ValueError unless ``state``'s parameter groups have the optimizer's sizes (what its loading checks)."""
    saved = [len(group["params"]) for group in state["param_groups"]]
    current = [len(group["params"]) for group in optimizer.param_groups]
    if saved != current:
        raise ValueError(
            f"optimizer: the checkpoint holds parameter groups of sizes {saved}, the optimizer {current}"
        )


# --- one file ---------------------------------------------------------------------------------


def save_training_state(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    generators: Mapping[str, torch.Generator] | None = None,
    step: int = 0,
) -> None:
    """Write the training state (module docstring) to ``path`` atomically.

    Args:
        path: the file to write (a temporary file is renamed onto it).
        model: the trained model (unwrapped, or any module whose
            ``state_dict`` is the full one).
        optimizer: its optimizer.
        loss_fn: the :class:`~twinloss.TwinFlowLoss` (its teacher's state included).
        generators: named generators to restore, e.g. ``{"loss": g}`` for the
            generator passed to the loss.
        step: the number of completed steps.
    """
    state = {
        "format": FORMAT,
        "version": VERSION,
        "step": int(step),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "loss": loss_fn.state_dict(),
        "rng": capture_rng(generators or {}),
    }
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def load_training_state(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    generators: Mapping[str, torch.Generator] | None = None,
) -> int:
    """Restore what :func:`save_training_state` wrote, in place; return the saved step.

    Build the model, optimizer and loss as for the first run (and attach a
    :class:`~twinloss_adapters.lora.LoRAEMATeacher`) before calling.

    Every part is checked before any is loaded: a refused call leaves the
    model, optimizer, loss and random states as they were. The loss loads
    first, so a teacher that refuses its saved state (non-finite, another
    decay or profile) also refuses before the model or optimizer changes.

    Raises:
        ValueError: if ``path`` is not a twinloss training state, or any part
            (model keys or shapes, loss/teacher keys, optimizer parameter
            groups, generators, RNG) does not match.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("version") != VERSION:
        raise ValueError(f"{path} is not a twinloss training state of version {VERSION}")
    generators = generators or {}
    check_rng_names(set(state["rng"]), generators)
    _check_module_state(model, state["model"], "model")
    _check_module_state(loss_fn, state["loss"], "loss_fn")
    _check_optimizer_state(optimizer, state["optimizer"])
    loss_fn.load_state_dict(dict(state["loss"]))
    optimizer.load_state_dict(state["optimizer"])
    model.load_state_dict(dict(state["model"]))
    restore_rng(state["rng"], generators)
    return int(state["step"])


# --- sharded (FSDP2) ----------------------------------------------------------------------------


def _rank() -> int:
    import torch.distributed as dist

    if not dist.is_initialized():
        raise ValueError("sharded training states need an initialised torch.distributed process group")
    return dist.get_rank()


def _materialize_sharded_teacher(loss_fn: nn.Module, model: nn.Module) -> None:
    """Give each sharded EMA teacher (guidance and RCGM, once each) its sharded tensors, so DCP can load into them."""
    from twinloss.distributed import ShardedEMATeacher

    teachers = {id(t): t for t in (getattr(loss_fn, "guidance_teacher", None), getattr(loss_fn, "rcgm_teacher", None))}
    for teacher in teachers.values():
        if isinstance(teacher, ShardedEMATeacher):
            teacher.materialize(model)


def save_sharded_training_state(
    checkpoint_id: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    generators: Mapping[str, torch.Generator] | None = None,
    step: int = 0,
) -> None:
    """The training state of an FSDP2-sharded run, through ``torch.distributed.checkpoint``.

    Call on every rank. Model and optimizer go through DCP's
    ``get_state_dict``; the loss state (a :class:`~twinloss.ShardedEMATeacher`'s
    sharded average included) is saved as is; each rank's RNG and generator
    states are saved under its own rank.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank = _rank()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {
        "model": model_state,
        "optimizer": optimizer_state,
        "loss": loss_fn.state_dict(),
        "step": torch.tensor(int(step)),
        f"rng_rank{rank}": capture_rng(generators or {}),
    }
    dcp.save(state, checkpoint_id=os.fspath(checkpoint_id))


def _check_sharded_keys(checkpoint_id: object, saved: set[str], state: dict, *, rng_prefix: str) -> None:
    """Refuse, before anything loads, a checkpoint whose keys are not the ones ``state`` asks for.

    DCP raises for a requested key the checkpoint lacks but ignores saved keys
    nobody requests, so a checkpoint of a larger model (or another optimizer)
    would lose them silently. The RNG states of other ranks are expected extras.
    """
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict  # DCP's own key layout

    requested = set(flatten_state_dict(state)[0])
    unexpected = sorted(key for key in saved - requested if not key.startswith(rng_prefix))
    missing = sorted(requested - saved)
    if unexpected or missing:
        raise ValueError(
            f"{checkpoint_id} does not match the model, optimizer and loss to restore: "
            f"keys nothing would load {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}, "
            f"keys it lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}; nothing was loaded"
        )


def load_sharded_training_state(
    checkpoint_id: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    generators: Mapping[str, torch.Generator] | None = None,
) -> int:
    """Restore what :func:`save_sharded_training_state` wrote, on every rank; return the saved step.

    Build and shard the model, optimizer and loss as for the first run
    before calling (tested with the same world size and sharding).

    Nothing changes unless every part is accepted. The keys are compared
    first; then the loss state (a teacher's average and decay) is read into
    fresh tensors of the same sharding and checked by its teachers
    (:func:`_check_module_state`), and only then do the model and optimizer
    load. Reading the loss apart costs one extra copy of a teacher's local
    shards while loading.

    Raises:
        ValueError: as :func:`load_training_state`, when this rank's RNG
            state is not in the checkpoint (a different world size), when
            the checkpoint holds keys the model, optimizer and loss do not ask
            for or lacks some they do, and when a teacher refuses its saved
            values (non-finite, another decay or profile); all before
            anything loads.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    rank = _rank()
    _materialize_sharded_teacher(loss_fn, model)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    metadata = dcp.FileSystemReader(os.fspath(checkpoint_id)).read_metadata()
    rng_key = f"rng_rank{rank}"
    saved_rng = {
        key.removeprefix(rng_key + "."): entry
        for key, entry in metadata.state_dict_metadata.items()
        if key.startswith(rng_key + ".")
    }
    if not saved_rng:
        raise ValueError(f"{checkpoint_id} holds no RNG state for rank {rank} (saved with another world size?)")
    check_rng_names(set(saved_rng), generators or {})
    state = {
        "model": model_state,
        "optimizer": optimizer_state,
        "loss": loss_fn.state_dict(),
        "step": torch.tensor(0),
        rng_key: {name: torch.empty(entry.size, dtype=entry.properties.dtype) for name, entry in saved_rng.items()},
    }
    _check_sharded_keys(checkpoint_id, set(metadata.state_dict_metadata), state, rng_prefix="rng_rank")
    loss_state = {"loss": _fresh_tensors(state.pop("loss"))}  # DCP loads in place: read the loss apart first
    dcp.load(loss_state, checkpoint_id=os.fspath(checkpoint_id))
    _check_module_state(loss_fn, loss_state["loss"], "loss_fn")
    dcp.load(state, checkpoint_id=os.fspath(checkpoint_id))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    loss_fn.load_state_dict(loss_state["loss"])
    restore_rng(state[rng_key], generators or {})
    return int(state["step"])


def _fresh_tensors(tree: object) -> object:
    """``tree`` with every tensor replaced by an uninitialised one of the same shape, dtype and sharding."""
    if isinstance(tree, Tensor):
        return torch.empty_like(tree)
    if isinstance(tree, Mapping):
        return {key: _fresh_tensors(value) for key, value in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(_fresh_tensors(value) for value in tree)
    return tree
