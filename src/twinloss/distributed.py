r"""Teachers for models sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

:class:`ShardedEMATeacher` keeps the exponential moving average **sharded like
the model**: every rank averages only the local shards of its DTensor
parameters, so the update needs no communication and the average costs each
rank ``1 / world_size`` of a parameter copy (in float32 or wider). The
authors turned EMA off in their 20B FSDP run because a full copy did not fit;
a sharded one does whenever the sharded optimizer state does.

Evaluating the average reuses the online module and FSDP2's own all-gathers:

1. reshard every FSDP module, so no online weights stay gathered;
2. swap the averaged shards into the parameters' local storage (an exact
   exchange through a one-parameter scratch buffer, so the swap allocates at
   most one shard at a time);
3. run the no-grad forward: FSDP2 gathers the averaged weights;
4. reshard again and swap the online shards back (also on error).

FSDP2 gathers from the sharded storage that ``DTensor.to_local()`` views, and
the sharded parameters are not saved by autograd (the gathered copies are, and
FSDP2 re-gathers them for backward after a reshard), so the swap is safe
between the grad-carrying forward and its backward. On a module that FSDP2
does not manage, swapping saved weights in place would corrupt backward:
use :class:`~twinloss.teachers.EMATeacher` there.
"""

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from twinloss.protocol import Conditioning, VelocityModel
from twinloss.teachers import MovingAverageTeacher, check_finite_weights

__all__ = ["ShardedEMATeacher", "fsdp_modules", "local_shard"]


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return None
    return DTensor


def _fsdp_module_type() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return None
    return FSDPModule


def local_shard(tensor: Tensor) -> Tensor:
    """The rank-local storage of a DTensor (a view, writes go through), else the tensor."""
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(tensor, dtensor):
        return tensor._local_tensor  # the view FSDP2 all-gathers from
    return tensor


def fsdp_modules(module: nn.Module) -> list[nn.Module]:
    """Every submodule (``module`` included) that ``fully_shard`` has wrapped."""
    fsdp_module = _fsdp_module_type()
    if fsdp_module is None:
        return []
    return [m for m in module.modules() if isinstance(m, fsdp_module)]


def _exchange(a: Tensor, b: Tensor) -> None:
    """Swap the contents of two same-shape, same-dtype tensors in place (one scratch shard)."""
    scratch = a.clone()
    a.copy_(b)
    b.copy_(scratch)


class ShardedEMATeacher(MovingAverageTeacher):
    r"""An EMA of an FSDP2-sharded model, kept and updated shard by shard.

    Same average and warm-up as :class:`~twinloss.teachers.EMATeacher`
    (:class:`~twinloss.teachers.MovingAverageTeacher`), applied to each rank's
    local shard only (no collective). The shards are
    DTensors with the parameters' mesh and placements, so the state saves
    and loads (and reshards) through ``torch.distributed.checkpoint``.

    The average is kept in the parameters' storage dtype promoted to at least
    float32. When that equals the storage dtype (float32 sharded parameters,
    the usual FSDP2 mixed-precision layout) evaluation exchanges shards in
    place; otherwise it keeps a copy of the online local shards (in their own
    narrower dtype) for the duration of one teacher call.

    Every parameter of the model must be an FSDP2-managed DTensor (call
    ``fully_shard`` on the root as well as on the blocks).

    Args:
        target_decay: the decay the warm-up approaches (*default* 0.99), in [0, 1).
    """

    def __init__(self, target_decay: float = 0.99) -> None:
        super().__init__(target_decay)
        self.shadow: dict[str, Tensor] = {}

    # ----------------------------------------------------------------- helpers
    @staticmethod
    def _sharded_parameters(model: VelocityModel) -> dict[str, nn.Parameter]:
        if not isinstance(model, nn.Module):
            raise ValueError(
                f"ShardedEMATeacher needs the model to be an nn.Module, got {type(model).__name__}"
            )
        dtensor = _dtensor_type()
        # A gathered FSDP module exposes plain (unsharded) parameters: reshard
        # first, so the DTensors are registered and no weights stay gathered.
        for m in fsdp_modules(model):
            m.reshard()
        params = dict(model.named_parameters())
        plain = [name for name, p in params.items() if dtensor is None or not isinstance(p, dtensor)]
        if plain or not fsdp_modules(model):
            raise ValueError(
                "ShardedEMATeacher needs a model sharded with torch.distributed.fsdp.fully_shard "
                f"(root included); parameters that are not DTensors: {plain[:3]}. "
                "For an unsharded model use twinloss.EMATeacher"
            )
        return params

    @torch.no_grad()
    def materialize(self, model: VelocityModel) -> None:
        """Start the average at the current weights if it does not exist yet.

        Neither the decay nor the update count moves. Call it before loading
        a checkpoint, so ``torch.distributed.checkpoint`` has sharded tensors
        to load into.
        """
        params = self._sharded_parameters(model)
        if self.shadow:
            self.check_same_parameters(params, self.shadow)
            return
        self.shadow = self.start_average(params)

    # --------------------------------------------------------------- teacher
    @torch.no_grad()
    def update(self, model: VelocityModel) -> None:
        """Average the local shards (no communication); the first call copies."""
        params = self._sharded_parameters(model)
        if self.shadow:
            self.check_same_parameters(params, self.shadow)
        check_finite_weights(
            "ShardedEMATeacher.update", {n: local_shard(p.detach()) for n, p in params.items()},
            what="the model's parameter",
        )
        if not self.shadow:
            self.materialize(model)
        else:
            for name, p in params.items():
                average = local_shard(self.shadow[name])
                average.lerp_(local_shard(p.detach()).to(average.dtype), self.average_weight)
        self.advance()

    @contextlib.contextmanager
    def swapped_in(self, model: VelocityModel) -> Iterator[None]:
        """Run a block with the averaged shards in the model's parameters.

        Reshards every FSDP module on entry and exit, so neither the online
        weights nor the average stay gathered across the boundary.
        """
        params = self._sharded_parameters(model)
        if not self.shadow:
            self.materialize(model)  # first use before any update: the current weights, as EMATeacher
        self.check_same_parameters(params, self.shadow)
        modules = fsdp_modules(model)  # resharded by _sharded_parameters
        pairs = [(local_shard(p.detach()), local_shard(self.shadow[n])) for n, p in params.items()]
        exact = all(online.dtype == average.dtype for online, average in pairs)
        with torch.no_grad():
            backup = None if exact else [online.clone() for online, _ in pairs]
            for online, average in pairs:
                if exact:
                    _exchange(online, average)
                else:
                    online.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for m in modules:
                    m.reshard()
                for index, (online, average) in enumerate(pairs):
                    if exact:
                        _exchange(online, average)
                    else:
                        online.copy_(backup[index])

    def forward(
        self, model: VelocityModel, x_t: Tensor, t: Tensor, r: Tensor, cond: Conditioning
    ) -> Tensor:
        with self.swapped_in(model), torch.no_grad():
            return model(x_t, t, r, **cond)

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> dict:
        # The shards themselves (no copy): torch.distributed.checkpoint loads
        # into them in place, and a full-size clone is what this class avoids.
        return {**self.schedule_state(), "shadow": dict(self.shadow)}

    def check_extra_state(self, state: dict) -> None:
        """Refuse a saved average that is non-finite, of other names or shapes, or of another decay; changes nothing."""
        loaded = state["shadow"]
        if self.shadow:
            self.check_same_parameters(loaded, self.shadow)
        check_finite_weights(
            "ShardedEMATeacher (loading a checkpoint)", {n: local_shard(v) for n, v in loaded.items()},
            what="the saved average of",
        )
        self.check_schedule_state(state)

    def set_extra_state(self, state: dict) -> None:
        """Load a saved average after :meth:`check_extra_state` (a refused one keeps the current)."""
        self.check_extra_state(state)
        loaded = state["shadow"]
        self.load_schedule_state(state)
        with torch.no_grad():
            for name, value in loaded.items():
                current = self.shadow.get(name)
                if current is None or current is value:
                    continue
                local_shard(current).copy_(local_shard(value))
        self.shadow = {name: self.shadow.get(name, value) for name, value in loaded.items()}
