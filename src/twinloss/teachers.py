"""Teachers: who evaluates the no-grad passes of a TwinFlow step.

The guidance passes and the RCGM chain (ALGORITHM.md, steps 4-5) call a
*teacher*, never the grad-carrying model. A teacher is an ``nn.Module`` with

* ``forward(model, x_t, t, r, cond) -> velocity``: one no-grad evaluation of
  the two-time field. It receives the online model at call time, so it holds
  no second registration of weights a wrapper (FSDP, DDP, accelerate) owns;
* ``update(model)``: called by the trainer after ``optimizer.step()``;
* ``state_dict()`` / ``load_state_dict()``: so a resumed run continues
  exactly (the state travels inside ``TwinFlowLoss.state_dict()``).

New teachers (LoRA base, LoRA-EMA, sharded EMA) subclass :class:`Teacher`;
the averaging ones subclass :class:`MovingAverageTeacher`, which owns the
decay warm-up and its saved state, and keep the average where it fits them.
"""

import abc
import math

import torch
from torch import Tensor, nn
from torch.func import functional_call

from twinloss.protocol import Conditioning, VelocityModel

__all__ = ["EMATeacher", "MovingAverageTeacher", "OnlineTeacher", "Teacher"]


class Teacher(nn.Module, abc.ABC):
    """Base class of the no-grad evaluator used for targets."""

    @abc.abstractmethod
    def forward(
        self, model: VelocityModel, x_t: Tensor, t: Tensor, r: Tensor, cond: Conditioning
    ) -> Tensor:
        """Return ``F(x_t, t, r, **cond)`` without building a graph."""

    def update(self, model: VelocityModel) -> None:
        """Advance the teacher after an optimizer step (no-op by default)."""


class OnlineTeacher(Teacher):
    """The online model itself under ``no_grad`` (default; costs no memory)."""

    def forward(
        self, model: VelocityModel, x_t: Tensor, t: Tensor, r: Tensor, cond: Conditioning
    ) -> Tensor:
        with torch.no_grad():
            return model(x_t, t, r, **cond)


class MovingAverageTeacher(Teacher):
    r"""The warm-up schedule every exponential-moving-average teacher shares.

    After each optimizer step, with ``d`` the current decay (starting at 0),

    .. math::
        \bar\theta \leftarrow d\,\bar\theta + (1 - d)\,\theta, \qquad
        d \leftarrow d + \tfrac{1}{2}(1 - d)(d_\text{target} - d),

    so the first update copies the weights and ``d`` rises towards
    ``target_decay``. A subclass keeps ``bar theta`` wherever it fits (a dict
    of tensors, local shards, a second LoRA adapter), averages with
    ``lerp_(theta, self.average_weight)`` and then calls :meth:`advance`.

    Args:
        target_decay: the decay the warm-up approaches (*default* 0.99), in [0, 1).
    """

    def __init__(self, target_decay: float = 0.99) -> None:
        super().__init__()
        if not (0.0 <= target_decay < 1.0) or math.isnan(target_decay):
            raise ValueError(f"target_decay must lie in [0, 1), got {target_decay}")
        self.target_decay = float(target_decay)
        self.decay = 0.0
        self.num_updates = 0

    @property
    def average_weight(self) -> float:
        """``1 - d``: the weight of the online parameters in the next update."""
        return 1.0 - self.decay

    def advance(self) -> None:
        """Move the decay one warm-up step towards ``target_decay`` and count the update."""
        self.decay = self.decay + 0.5 * (1.0 - self.decay) * (self.target_decay - self.decay)
        self.num_updates += 1

    @staticmethod
    def start_average(params: dict[str, Tensor]) -> dict[str, Tensor]:
        """A copy of ``params`` to average into, in at least float32."""
        return {
            name: p.detach().to(torch.promote_types(p.dtype, torch.float32), copy=True) for name, p in params.items()
        }

    def check_same_parameters(self, params: dict[str, Tensor], averaged: dict[str, Tensor]) -> None:
        """Refuse a model whose parameter names are not the averaged ones."""
        if set(params) != set(averaged):
            raise ValueError(
                f"{type(self).__name__}: the model's parameters differ from the averaged ones "
                f"(missing {sorted(set(averaged) - set(params))[:3]}, new {sorted(set(params) - set(averaged))[:3]})"
            )

    def schedule_state(self) -> dict:
        """The schedule's part of ``get_extra_state``."""
        return {"target_decay": self.target_decay, "decay": self.decay, "num_updates": self.num_updates}

    def load_schedule_state(self, state: dict, *, describe: str = "") -> None:
        """Restore the schedule from ``state``; refuses a checkpoint that targets another decay."""
        if state["target_decay"] != self.target_decay:
            raise ValueError(
                f"the saved {describe or 'EMA'} targets decay {state['target_decay']}, "
                f"this teacher {self.target_decay}"
            )
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])


class EMATeacher(MovingAverageTeacher):
    r"""An exponential moving average of the online weights, with the warm-up of
    :class:`MovingAverageTeacher`.

    The average is kept in at least float32 and evaluated
    with :func:`torch.func.functional_call` on the online module, so no second
    module is built. The model must therefore be an ``nn.Module`` whose
    parameters the average mirrors.

    Args:
        target_decay: the decay the warm-up approaches (*default* 0.99), in [0, 1).
    """

    def __init__(self, target_decay: float = 0.99) -> None:
        super().__init__(target_decay)
        self.shadow: dict[str, Tensor] = {}

    @staticmethod
    def _module(model: VelocityModel) -> nn.Module:
        if not isinstance(model, nn.Module):
            raise ValueError(
                f"EMATeacher needs the model to be an nn.Module, got {type(model).__name__}"
            )
        return model

    @torch.no_grad()
    def _initialize(self, module: nn.Module) -> None:
        """Start the average at the current weights (kept in at least float32)."""
        self.shadow = self.start_average(dict(module.named_parameters()))

    @torch.no_grad()
    def update(self, model: VelocityModel) -> None:
        module = self._module(model)
        if not self.shadow:
            self._initialize(module)
        params = dict(module.named_parameters())
        self.check_same_parameters(params, self.shadow)
        for name, p in params.items():
            self.shadow[name].lerp_(p.detach().to(self.shadow[name].dtype), self.average_weight)
        self.advance()

    def forward(
        self, model: VelocityModel, x_t: Tensor, t: Tensor, r: Tensor, cond: Conditioning
    ) -> Tensor:
        module = self._module(model)
        if not self.shadow:
            self._initialize(module)  # first use before any update: the current weights
        dtypes = {name: p.dtype for name, p in module.named_parameters()}
        params = {name: average.to(dtypes[name]) for name, average in self.shadow.items()}
        with torch.no_grad():
            return functional_call(module, params, (x_t, t, r), dict(cond))

    def get_extra_state(self) -> dict:
        return {**self.schedule_state(), "shadow": {name: p.clone() for name, p in self.shadow.items()}}

    def set_extra_state(self, state: dict) -> None:
        self.load_schedule_state(state)
        self.shadow = {name: p.clone() for name, p in state["shadow"].items()}
