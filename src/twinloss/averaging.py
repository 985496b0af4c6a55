r"""Weight averaging for sampling: an EMA of the online weights, kept beside training.

The online weights of a one-step generator wander from step to step; sampling
from an exponential moving average of them is the cheapest quality lever
there is (``docs/quality.md``). The average here answers "which weights do I
sample from?", a different question from the EMA *teacher*
(:class:`~twinloss.teachers.EMATeacher`), which answers "who evaluates the
targets?". Keep them apart: a teacher wants a short memory (decay 0.99), the
sampling average a long one (0.999 or a power-function profile).

After the ``k``-th optimizer step (``k = 1, 2, ...``) the trainer calls
``average.update(model)``, which applies

.. math::
    \bar\theta_k = \beta_k\,\bar\theta_{k-1} + (1 - \beta_k)\,\theta_k,
    \qquad \beta_1 = 0 \;(\text{the first update copies}),

with :math:`\beta_k` from a :class:`DecayProfile`:

* :class:`ConstantDecay`: :math:`\beta_k = \beta` for ``k >= 2``, the
  convention of ``torch.optim.swa_utils.get_ema_multi_avg_fn`` (and of
  diffusers' ``EMAModel`` without warm-up);
* :class:`PowerFunctionDecay`: :math:`\beta_k = (1 - 1/k)^{\gamma + 1}`
  (Karras et al., EDM2), whose average weighs the iterate of step
  :math:`\tau` by :math:`(\tau^{\gamma+1} - (\tau-1)^{\gamma+1}) / k^{\gamma+1}
  \propto \tau^\gamma` at every ``k``: a memory that grows with training.

Where the average lives follows the model, reusing the teachers' storage:

* :class:`WeightAverage`: a float32 (or wider) dict beside an ordinary module,
  evaluated with ``torch.func.functional_call`` (the storage of
  :class:`~twinloss.teachers.EMATeacher`);
* :class:`ShardedWeightAverage`: local shards of an FSDP2 model, swapped in
  for evaluation (the storage of
  :class:`~twinloss.distributed.ShardedEMATeacher`);
* ``twinloss_adapters.averaging.LoRAWeightAverage``: a second peft adapter.

To sample, hand :meth:`sampling_model` to the sampler::

    average = twinloss.WeightAverage(twinloss.ConstantDecay(0.999))
    for step in ...:
        ...; optimizer.step(); average.update(model)
    images = twinloss.AnyStepSampler(1)(average.sampling_model(model), noise, cond=cond).sample

``average.state_dict()`` holds the average and its update count; loading it
into a fresh average resumes bit-exactly.
"""

import abc
import inspect
import math

import torch
from torch import Tensor, nn
from torch.func import functional_call

from twinloss.distributed import ShardedEMATeacher
from twinloss.protocol import Conditioning, VelocityModel
from twinloss.teachers import EMATeacher, on_devices_of, as_module, check_finite_weights

__all__ = [
    "AveragedVelocity",
    "ConstantDecay",
    "DecayProfile",
    "PowerFunctionDecay",
    "ProfiledAverage",
    "ShardedWeightAverage",
    "WeightAverage",
]


# ----------------------------------------------------------------- profiles
class DecayProfile(abc.ABC):
    """The decay :math:`\\beta_k` applied at the ``k``-th update (``k >= 1``; :math:`\\beta_1 = 0`)."""

    @abc.abstractmethod
    def decay(self, update: int) -> float:
        """:math:`\\beta_k` for the 1-based update number ``update``."""

    @abc.abstractmethod
    def describe(self) -> dict[str, float | str]:
        """A plain description saved with the average, so a resume cannot switch profiles silently."""

    @staticmethod
    def _check_update(update: int) -> None:
        if isinstance(update, bool) or not isinstance(update, int) or update < 1:
            raise ValueError(f"update must be an int >= 1, got {update!r}")


class ConstantDecay(DecayProfile):
    r"""A fixed decay :math:`\beta` from the second update on (the first copies).

    After ``k`` updates the iterate of step :math:`\tau` carries weight
    :math:`\beta^{k-1}` for :math:`\tau = 1` and :math:`(1-\beta)\beta^{k-\tau}` after.

    Args:
        decay: :math:`\beta` in ``[0, 1)`` (*default* 0.999, the value of issue 12's table).
    """

    def __init__(self, decay: float = 0.999) -> None:
        if not (0.0 <= decay < 1.0):
            raise ValueError(f"decay must lie in [0, 1), got {decay}")
        self.value = float(decay)

    def decay(self, update: int) -> float:
        self._check_update(update)
        return 0.0 if update == 1 else self.value

    def describe(self) -> dict[str, float | str]:
        return {"profile": "constant", "decay": self.value}


class PowerFunctionDecay(DecayProfile):
    r"""EDM2's power-function profile :math:`\beta_k = (1 - 1/k)^{\gamma + 1}`.

    The average after ``k`` updates weighs the iterate of step :math:`\tau` by
    :math:`(\tau^{\gamma+1} - (\tau-1)^{\gamma+1}) / k^{\gamma+1}`, so its
    memory is a fixed *fraction* of training; the relative standard deviation
    of that weighting is :math:`\sigma_\text{rel} = \sqrt{(\gamma+1) / ((\gamma+2)^2(\gamma+3))}`.

    Args:
        gamma: the exponent :math:`\gamma > 0` (*default* 6.94, EDM2's
            :math:`\sigma_\text{rel} = 0.10`; 16.97 gives 0.05).
    """

    def __init__(self, gamma: float = 6.94) -> None:
        if not (gamma > 0.0 and math.isfinite(gamma)):
            raise ValueError(f"gamma must be a finite number > 0, got {gamma}")
        self.gamma = float(gamma)

    @staticmethod
    def relative_width(gamma: float) -> float:
        r""":math:`\sigma_\text{rel}(\gamma) = \sqrt{(\gamma+1) / ((\gamma+2)^2(\gamma+3))}`."""
        return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))

    @classmethod
    def from_relative_width(cls, sigma_rel: float) -> "PowerFunctionDecay":
        r"""The profile whose weighting has relative width ``sigma_rel`` in ``(0, 12^{-1/2})``.

        Solves :math:`\sigma_\text{rel}(\gamma) = ` ``sigma_rel`` by bisection
        (:math:`\sigma_\text{rel}` falls monotonically for :math:`\gamma > 0`).
        """
        top = cls.relative_width(0.0)
        if not (0.0 < sigma_rel < top):
            raise ValueError(f"sigma_rel must lie in (0, {top:.5f}), got {sigma_rel}")
        low, high = 0.0, 1.0
        while cls.relative_width(high) > sigma_rel:
            high *= 2.0
        for _ in range(200):
            middle = 0.5 * (low + high)
            if cls.relative_width(middle) > sigma_rel:
                low = middle
            else:
                high = middle
        return cls(0.5 * (low + high))

    def decay(self, update: int) -> float:
        self._check_update(update)
        return (1.0 - 1.0 / update) ** (self.gamma + 1.0)

    def describe(self) -> dict[str, float | str]:
        return {"profile": "power", "gamma": self.gamma}


# ------------------------------------------------------------ the schedule
class ProfiledAverage:
    """Replaces a moving-average teacher's warm-up by a :class:`DecayProfile`.

    Mixed in *before* a :class:`~twinloss.teachers.MovingAverageTeacher`
    subclass, it keeps that class's storage, update and evaluation and only
    changes which decay each update applies (``average_weight``), what
    :meth:`advance` does and the schedule's saved state. ``decay`` reads as the
    decay of the last update (0 before any).
    """

    def __init__(self, profile: DecayProfile | float | None = None, **storage_kwargs) -> None:
        super().__init__(**storage_kwargs)
        if profile is None:
            profile = ConstantDecay()
        elif isinstance(profile, (int, float)) and not isinstance(profile, bool):
            profile = ConstantDecay(profile)  # a number is a fixed decay, as in diffusers' EMAModel(decay=...)
        if not isinstance(profile, DecayProfile):
            raise ValueError(f"profile must be a twinloss.DecayProfile, got {type(profile).__name__}")
        self.profile = profile
        del self.target_decay  # the teacher's warm-up target: the profile gives every decay instead

    @property
    def average_weight(self) -> float:
        """:math:`1 - \\beta_{k+1}`, the weight of the online parameters in the next update."""
        return 1.0 - self.profile.decay(self.num_updates + 1)

    def advance(self) -> None:
        self.num_updates += 1
        self.decay = self.profile.decay(self.num_updates)

    def schedule_state(self) -> dict:
        return {**self.profile.describe(), "num_updates": self.num_updates}

    def check_schedule_state(self, state: dict, *, describe: str = "") -> None:
        """Refuse a checkpoint saved with another profile; changes nothing."""
        saved = {key: value for key, value in state.items() if key in self.profile.describe()}
        if saved != self.profile.describe():
            raise ValueError(
                f"the saved {describe or 'weight average'} used profile {saved}, this one {self.profile.describe()}"
            )

    def load_schedule_state(self, state: dict, *, describe: str = "") -> None:
        """Restore the update count; refuses a checkpoint saved with another profile."""
        self.check_schedule_state(state, describe=describe)
        self.num_updates = int(state["num_updates"])
        self.decay = self.profile.decay(self.num_updates) if self.num_updates else 0.0

    def sampling_model(self, model: VelocityModel) -> "AveragedVelocity":
        """A :class:`~twinloss.protocol.VelocityModel` that evaluates the average (no grad)."""
        return AveragedVelocity(self, model)


class AveragedVelocity:
    """``F_avg(x_t, t, r, **cond)``: the online model evaluated with averaged weights.

    Not an ``nn.Module``, so it registers neither the model nor the average a
    second time; it advertises the model's own keyword signature, so the
    samplers' conditioning check still applies.
    """

    def __init__(self, average: nn.Module, model: VelocityModel) -> None:
        self.average = average
        self.model = model
        try:
            forward = model.forward if isinstance(model, nn.Module) else model
            self.__signature__ = inspect.signature(forward)
        except (TypeError, ValueError):
            self.__signature__ = None

    def __call__(self, x_t: Tensor, t: Tensor, r: Tensor, **cond: Tensor) -> Tensor:
        return self.average(self.model, x_t, t, r, cond)


# ---------------------------------------------------------------- storages
class WeightAverage(ProfiledAverage, EMATeacher):
    r"""A weight average of an ordinary (unsharded) module, for sampling.

    The parameters' average is kept in at least float32, beside training,
    and evaluated with ``functional_call`` on the online module (no second
    module). Buffers are the online module's current ones, unless
    ``average_buffers`` (``AveragedModel(use_buffers=True)``): then
    floating-point buffers are averaged with the parameters' weight and the
    others (counters) copied at each update.

    Args:
        profile: the decay per update (*default* ``ConstantDecay(0.999)``; a
            number ``b`` means ``ConstantDecay(b)``).
        average_buffers: average the buffers too (*default* False).
    """

    def __init__(self, profile: DecayProfile | float | None = None, *, average_buffers: bool = False) -> None:
        super().__init__(profile)
        self.average_buffers = bool(average_buffers)
        self.buffers_average: dict[str, Tensor] = {}

    @torch.no_grad()
    def update(self, model: VelocityModel) -> None:
        """Average the model's weights (and buffers) in; mismatched or non-finite ones are refused before anything changes."""
        weight = self.average_weight
        buffers = dict(as_module(model, type(self).__name__).named_buffers()) if self.average_buffers else {}
        if self.buffers_average:
            self._check_same_buffers(buffers)
        check_finite_weights(
            f"{type(self).__name__}.update",
            {name: value for name, value in buffers.items() if value.is_floating_point()},
            what="the model's buffer",
        )
        super().update(model)  # checks the parameters, averages them, then advance()
        self.buffers_average = on_devices_of(self.buffers_average, buffers)  # a checkpoint loads onto the CPU
        for name, value in buffers.items():
            kept = self.buffers_average.get(name)
            if not value.is_floating_point():
                self.buffers_average[name] = value.detach().clone()  # counters: copied, not averaged
            elif kept is None:
                self.buffers_average.update(self.start_average({name: value}))
            else:
                kept.lerp_(value.detach().to(kept.dtype), weight)

    def _check_same_buffers(self, buffers: dict[str, Tensor]) -> None:
        """Refuse buffers whose names or shapes are not the averaged ones (``lerp_`` would broadcast a new shape)."""
        if set(buffers) != set(self.buffers_average):
            raise ValueError(
                f"{type(self).__name__}: the model's buffers {sorted(buffers)[:3]} differ from the averaged ones "
                f"{sorted(self.buffers_average)[:3]}"
            )
        for name, value in buffers.items():
            if value.shape != self.buffers_average[name].shape:
                raise ValueError(
                    f"{type(self).__name__}: buffer {name!r} has shape {tuple(value.shape)}, "
                    f"the averaged one {tuple(self.buffers_average[name].shape)}"
                )

    def forward(
        self, model: VelocityModel, x_t: Tensor, t: Tensor, r: Tensor, cond: Conditioning
    ) -> Tensor:
        if not self.buffers_average:
            return super().forward(model, x_t, t, r, cond)
        module = as_module(model, type(self).__name__)
        tensors = self.averaged_tensors(module)
        with torch.no_grad():
            return functional_call(module, tensors, (x_t, t, r), dict(cond))

    def averaged_tensors(self, model: VelocityModel) -> dict[str, Tensor]:
        """The averaged parameters (and buffers, if averaged) in the model's own dtypes and on its devices.

        Fresh tensors, never the average's storage; before any update, the
        model's current weights. Load them with
        ``model.load_state_dict(..., strict=False)`` to export the average.
        """
        module = as_module(model, type(self).__name__)
        if not self.shadow:
            self._initialize(module)
        params = dict(module.named_parameters())
        self.check_same_parameters(params, self.shadow)
        tensors = {
            name: self.shadow[name].to(device=p.device, dtype=p.dtype, copy=True) for name, p in params.items()
        }
        buffers = dict(module.named_buffers())
        for name, value in self.buffers_average.items():
            tensors[name] = value.to(device=buffers[name].device, dtype=buffers[name].dtype, copy=True)
        return tensors

    def get_extra_state(self) -> dict:
        state = super().get_extra_state()
        state["average_buffers"] = self.average_buffers
        state["buffers"] = {name: value.clone() for name, value in self.buffers_average.items()}
        return state

    def check_extra_state(self, state: dict) -> None:
        if state["average_buffers"] != self.average_buffers:
            raise ValueError(
                f"the saved weight average has average_buffers={state['average_buffers']}, "
                f"this one {self.average_buffers}"
            )
        super().check_extra_state(state)

    def set_extra_state(self, state: dict) -> None:
        super().set_extra_state(state)  # checks through this class's check_extra_state first
        self.buffers_average = {name: value.clone() for name, value in state["buffers"].items()}


class ShardedWeightAverage(ProfiledAverage, ShardedEMATeacher):
    """A weight average of an FSDP2-sharded model, kept shard by shard.

    The storage, update (no communication), evaluation (averaged shards
    swapped into the parameters while FSDP2 gathers them) and
    ``torch.distributed.checkpoint`` state of
    :class:`~twinloss.distributed.ShardedEMATeacher`, with a
    :class:`DecayProfile`. To run many sampler calls under one swap, use
    ``with average.swapped_in(model): sampler(model, ...)``.

    Args:
        profile: the decay per update (*default* ``ConstantDecay(0.999)``; a
            number ``b`` means ``ConstantDecay(b)``).
    """

    def __init__(self, profile: DecayProfile | float | None = None) -> None:
        super().__init__(profile)
