"""Teachers: who evaluates the no-grad passes of a TwinFlow step.

The guidance passes and the RCGM chain (docs/method.md, steps 4-5) call a
*teacher*, never the grad-carrying model. A teacher is an ``nn.Module`` with

* ``forward(model, x_t, t, r, cond) -> velocity``: one no-grad evaluation of
  the two-time field. It receives the online model at call time, so it holds
  no second registration of weights a wrapper (FSDP, DDP, accelerate) owns;
* ``update(model)``: called by the trainer after ``optimizer.step()``
  (``loss_fn.update_teachers(model)`` updates each of a loss's teachers once);
* ``record_use()``: called by the loss once per step that evaluated it; a
  teacher that needs updates warns when it is used for many steps without
  one (:class:`MovingAverageTeacher`);
* ``state_dict()`` / ``load_state_dict()``: so a resumed run continues
  exactly (the state travels inside ``TwinFlowLoss.state_dict()``).

New teachers (LoRA base, LoRA-EMA, sharded EMA) subclass :class:`Teacher`;
the averaging ones subclass :class:`MovingAverageTeacher`, which owns the
decay warm-up, its saved state and the missing-update warning, and keep the
average where it fits them. Fixed weights (the authors' ``ema_decay_rate: 1``
teacher for full fine-tuning) are :class:`FrozenTeacher`.
"""

import abc
import math
import warnings
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.func import functional_call

from twinloss._checks import check_int
from twinloss._tensors import at_least_float32
from twinloss.protocol import Conditioning, VelocityModel

__all__ = ["EMATeacher", "FrozenTeacher", "MovingAverageTeacher", "OnlineTeacher", "Teacher", "check_finite_weights"]


def _check_same_names(owner: str, params: dict[str, Tensor], kept: dict[str, Tensor], *, kind: str) -> None:
    """Refuse parameters whose names or shapes are not the ones a teacher keeps weights for.

    A same-named parameter of another shape (``Embedding(4, d)`` against a
    kept ``(1, d)``) would otherwise broadcast silently in ``lerp_`` or be
    evaluated with the wrong weights.
    """
    if set(params) != set(kept):
        raise ValueError(
            f"{owner}: the model's parameters differ from the {kind} ones "
            f"(missing {sorted(set(kept) - set(params))[:3]}, new {sorted(set(params) - set(kept))[:3]})"
        )
    for name, p in params.items():
        if p.shape != kept[name].shape:
            raise ValueError(
                f"{owner}: parameter {name!r} has shape {tuple(p.shape)}, the {kind} one {tuple(kept[name].shape)}"
            )


def on_devices_of(kept: dict[str, Tensor], live: dict[str, Tensor]) -> dict[str, Tensor]:
    """``kept`` with each tensor on the device of the same-named one in ``live`` (moved only where they differ; dtypes kept)."""
    return {
        name: value if name not in live or value.device == live[name].device else value.to(live[name].device)
        for name, value in kept.items()
    }


def check_finite_weights(owner: str, weights: dict[str, Tensor], *, what: str) -> None:
    """Refuse weights holding NaN or infinity, naming the first such parameter (one device sync).

    Teachers call it before they change anything, so a refused update or
    checkpoint leaves the previous average in place.

    Raises:
        ValueError: ``"{owner}: {what} {name!r} contains NaN or infinite values ..."``.
    """
    if not weights:
        return
    finite = torch.stack([torch.isfinite(w).all() for w in weights.values()]).tolist()
    bad = next((name for name, ok in zip(weights, finite, strict=True) if not ok), None)
    if bad is not None:
        raise ValueError(
            f"{owner}: {what} {bad!r} contains NaN or infinite values; refused, the previous average is kept "
            "(skip the optimizer step and the teacher update on a non-finite loss: docs/errors.md)"
        )


class Teacher(nn.Module, abc.ABC):
    """Base class of the no-grad evaluator used for targets.

    Attributes:
        reads_target_time: whether the teacher's field depends on ``r`` and on
            the sign of ``t`` (True by default). A teacher that ignores them
            (a pretrained base model, which has neither) can guide, but cannot
            evaluate the RCGM chain: :class:`~twinloss.TwinFlowLoss` refuses
            it as ``rcgm_teacher``.
    """

    reads_target_time: ClassVar[bool] = True

    @abc.abstractmethod
    def forward(
        self, model: VelocityModel, x_t: Tensor, t: Tensor, r: Tensor, cond: Conditioning
    ) -> Tensor:
        """Return ``F(x_t, t, r, **cond)`` without building a graph."""

    def update(self, model: VelocityModel) -> None:
        """Advance the teacher after an optimizer step (no-op by default)."""

    def record_use(self) -> None:
        """Called by the loss once per step in which it evaluated this teacher (no-op by default)."""


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

    A teacher that is used but never updated silently stays at the first
    weights it saw; so after ``warn_after_steps`` consecutive steps that used
    it without an :meth:`~Teacher.update` in between, it warns (once per such
    run of steps). Gradient accumulation over fewer micro-batches than that
    never warns.

    Args:
        target_decay: the decay the warm-up approaches (*default* 0.99), in [0, 1).
        warn_after_steps: steps without an update before the warning
            (*default* 50), an int >= 1.
    """

    def __init__(self, target_decay: float = 0.99, *, warn_after_steps: int = 50) -> None:
        super().__init__()
        if not (0.0 <= target_decay < 1.0) or math.isnan(target_decay):
            raise ValueError(f"target_decay must lie in [0, 1), got {target_decay}")
        self.warn_after_steps = check_int(warn_after_steps, "warn_after_steps", minimum=1)
        self.target_decay = float(target_decay)
        self.decay = 0.0
        self.num_updates = 0
        self.steps_since_update = 0

    def record_use(self) -> None:
        """Count a step that used the average; warn at the ``warn_after_steps``-th without an update."""
        self.steps_since_update += 1
        if self.steps_since_update == self.warn_after_steps:
            warnings.warn(
                f"{type(self).__name__} was used for {self.steps_since_update} training steps without "
                "update(model): its average is not following the model. Call loss_fn.update_teachers(model) "
                "after each optimizer step.",
                UserWarning,
                stacklevel=3,
            )

    @property
    def average_weight(self) -> float:
        """``1 - d``: the weight of the online parameters in the next update."""
        return 1.0 - self.decay

    def advance(self) -> None:
        """Move the decay one warm-up step towards ``target_decay`` and count the update."""
        self.decay = self.decay + 0.5 * (1.0 - self.decay) * (self.target_decay - self.decay)
        self.num_updates += 1
        self.steps_since_update = 0

    @staticmethod
    def start_average(params: dict[str, Tensor]) -> dict[str, Tensor]:
        """A copy of ``params`` to average into, in at least float32."""
        return {
            name: p.detach().to(at_least_float32(p.dtype), copy=True) for name, p in params.items()
        }

    def check_same_parameters(self, params: dict[str, Tensor], averaged: dict[str, Tensor]) -> None:
        """Refuse a model whose parameter names or shapes are not the averaged ones."""
        _check_same_names(type(self).__name__, params, averaged, kind="averaged")

    def schedule_state(self) -> dict:
        """The schedule's part of ``get_extra_state``."""
        return {"target_decay": self.target_decay, "decay": self.decay, "num_updates": self.num_updates}

    def check_schedule_state(self, state: dict, *, describe: str = "") -> None:
        """Refuse a saved schedule that targets another decay; changes nothing."""
        if state["target_decay"] != self.target_decay:
            raise ValueError(
                f"the saved {describe or 'EMA'} targets decay {state['target_decay']}, "
                f"this teacher {self.target_decay}"
            )

    def load_schedule_state(self, state: dict, *, describe: str = "") -> None:
        """Restore the schedule from ``state``; refuses a checkpoint that targets another decay."""
        self.check_schedule_state(state, describe=describe)
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])


def as_module(model: VelocityModel, teacher: str) -> nn.Module:
    """``model`` itself, or ValueError naming ``teacher`` if it is not an ``nn.Module`` (whose weights it mirrors)."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"{teacher} needs the model to be an nn.Module, got {type(model).__name__}")
    return model


class EMATeacher(MovingAverageTeacher):
    r"""An exponential moving average of the online weights, with the warm-up of
    :class:`MovingAverageTeacher`.

    The average (``shadow``) is kept in at least float32. Evaluation uses a
    copy in the model's dtype (``evaluation_weights``), written once per
    :meth:`update`, never per call; for a float32 model it *is* the average
    (no second copy). It is evaluated with :func:`torch.func.functional_call`
    on the online module, so no second module is built: the model must be an
    ``nn.Module`` whose parameters the average mirrors.

    Memory: float32 model, one copy of the weights; bfloat16 model, the
    float32 average plus one bfloat16 copy (three bytes more per weight than
    the model, and no transient copy during the step).

    Args:
        target_decay: the decay the warm-up approaches (*default* 0.99), in [0, 1).
        warn_after_steps: see :class:`MovingAverageTeacher` (*default* 50).
    """

    def __init__(self, target_decay: float = 0.99, *, warn_after_steps: int = 50) -> None:
        super().__init__(target_decay, warn_after_steps=warn_after_steps)
        self.shadow: dict[str, Tensor] = {}
        self.evaluation_weights: dict[str, Tensor] = {}

    @torch.no_grad()
    def _initialize(self, module: nn.Module) -> None:
        """Start the average at the current weights (kept in at least float32)."""
        self.shadow = self.start_average(dict(module.named_parameters()))

    def _follow_devices(self, params: dict[str, Tensor]) -> None:
        """Move each averaged tensor to its parameter's device, keeping its dtype.

        A checkpoint loads onto the CPU (``load_training_state``) and a plain
        dict does not follow ``.to(device)``; the average goes where the
        model's weights are when it is next used.
        """
        self.shadow = on_devices_of(self.shadow, params)

    @torch.no_grad()
    def _write_evaluation_weights(self, params: dict[str, Tensor]) -> None:
        """Cast the average into the model's dtype and device, reusing the buffers of the last cast."""
        for name, live in params.items():
            average = self.shadow[name]
            if average.dtype == live.dtype and average.device == live.device:
                self.evaluation_weights[name] = average
                continue
            buffer = self.evaluation_weights.get(name)
            if buffer is None or buffer is average or buffer.dtype != live.dtype or buffer.device != live.device:
                self.evaluation_weights[name] = average.to(device=live.device, dtype=live.dtype, copy=True)
            else:
                buffer.copy_(average)

    @torch.no_grad()
    def update(self, model: VelocityModel) -> None:
        """Average the model's weights in; non-finite or mismatched weights are refused before anything changes."""
        module = as_module(model, "EMATeacher")
        params = dict(module.named_parameters())
        if self.shadow:
            self.check_same_parameters(params, self.shadow)
        check_finite_weights("EMATeacher.update", params, what="the model's parameter")
        if not self.shadow:
            self._initialize(module)
        self._follow_devices(params)
        for name, p in params.items():
            self.shadow[name].lerp_(p.detach().to(self.shadow[name].dtype), self.average_weight)
        self._write_evaluation_weights(params)
        self.advance()

    def forward(
        self, model: VelocityModel, x_t: Tensor, t: Tensor, r: Tensor, cond: Conditioning
    ) -> Tensor:
        module = as_module(model, "EMATeacher")
        if not self.shadow:
            self._initialize(module)  # first use before any update: the current weights
        params = dict(module.named_parameters())
        stale = len(self.evaluation_weights) != len(params) or any(
            name not in self.evaluation_weights
            or self.evaluation_weights[name].dtype != p.dtype
            or self.evaluation_weights[name].device != p.device
            or self.evaluation_weights[name].shape != p.shape
            for name, p in params.items()
        )
        if stale:  # first use, a loaded checkpoint, or the model was cast or moved since the last update
            self.check_same_parameters(params, self.shadow)
            self._follow_devices(params)
            self._write_evaluation_weights(params)
        with torch.no_grad():
            return functional_call(module, self.evaluation_weights, (x_t, t, r), dict(cond))

    def get_extra_state(self) -> dict:
        return {**self.schedule_state(), "shadow": {name: p.clone() for name, p in self.shadow.items()}}

    def check_extra_state(self, state: dict) -> None:
        """Refuse a saved average that is non-finite, shaped unlike the current one or of another decay; changes nothing.

        A fresh teacher has no average yet: the loaded one is compared with
        the model's parameters (names and shapes) at the next call.
        """
        loaded = state["shadow"]
        if self.shadow:
            self.check_same_parameters(loaded, self.shadow)
        check_finite_weights("EMATeacher (loading a checkpoint)", loaded, what="the saved average of")
        self.check_schedule_state(state)

    def set_extra_state(self, state: dict) -> None:
        """Load a saved average after :meth:`check_extra_state` (a refused one keeps the current)."""
        self.check_extra_state(state)
        loaded = state["shadow"]
        self.load_schedule_state(state)
        self.shadow = {name: p.clone() for name, p in loaded.items()}
        self.evaluation_weights = {}  # re-cast from the loaded average at the next call


class FrozenTeacher(Teacher):
    """Fixed weights: a copy of the model's parameters taken at construction, never updated.

    The authors' ``ema_decay_rate: 1`` teacher for full fine-tuning (their
    ``ema_transformer``, loaded from the pretrained weights and never
    averaged): build it from the pretrained model before the first optimizer
    step. For LoRA training, ``twinloss_adapters.lora.BaseModelTeacher`` gives
    the same fixed reference without a copy. Evaluated with
    :func:`torch.func.functional_call` on the online module, in the copy's
    dtype (the model's at construction); the copy is saved with the loss's
    state, so a resumed run keeps the original reference.

    Args:
        model: the pretrained ``nn.Module`` whose current weights are kept.
    """

    def __init__(self, model: VelocityModel) -> None:
        super().__init__()
        module = as_module(model, "FrozenTeacher")
        self.frozen: dict[str, Tensor] = {
            name: p.detach().clone() for name, p in module.named_parameters()
        }

    def forward(
        self, model: VelocityModel, x_t: Tensor, t: Tensor, r: Tensor, cond: Conditioning
    ) -> Tensor:
        module = as_module(model, "FrozenTeacher")
        params = dict(module.named_parameters())
        _check_same_names("FrozenTeacher", params, self.frozen, kind="frozen")
        self.frozen = on_devices_of(self.frozen, params)  # a checkpoint loads onto the CPU
        with torch.no_grad():
            return functional_call(module, self.frozen, (x_t, t, r), dict(cond))

    def get_extra_state(self) -> dict:
        return {"frozen": {name: p.clone() for name, p in self.frozen.items()}}

    def check_extra_state(self, state: dict) -> None:
        """Refuse saved weights of other names or shapes, or non-finite ones; changes nothing."""
        loaded = state["frozen"]
        _check_same_names("FrozenTeacher (loading a checkpoint)", loaded, self.frozen, kind="frozen")
        check_finite_weights("FrozenTeacher (loading a checkpoint)", loaded, what="the saved weight")

    def set_extra_state(self, state: dict) -> None:
        self.check_extra_state(state)
        loaded = state["frozen"]
        self.frozen = {name: p.clone() for name, p in loaded.items()}
