"""LoRA training of an adapted backbone through peft, and its two teachers.

:func:`add_lora` wraps an adapted model in a ``peft.PeftModel``: the base
transformer is frozen, LoRA layers are injected where the config says, and the
adapter's own modules (the TwinFlow time embedding, OpenUni's connector) go
into ``modules_to_save``, so they train and are saved with the LoRA
(``save_pretrained`` / ``get_peft_model_state_dict``). The ``PeftModel``
keeps the protocol: ``peft_model(x_t, t, r, **cond)``.

Two teachers for the no-grad passes (ALGORITHM.md section 4) cost no second
copy of the base weights:

* :class:`BaseModelTeacher`: the pretrained backbone, i.e. the model with all
  adapters disabled (LoRA off and the TwinFlow embeddings back to their
  zero initial state, so ``F(x_t, t, r)`` is the stock instantaneous velocity
  at ``|t|``);
* :class:`LoRAEMATeacher`: an exponential moving average of the trained
  adapter, kept as a second peft adapter on the same base.
"""

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from twinloss.protocol import Conditioning, VelocityModel
from twinloss.teachers import MovingAverageTeacher, Teacher
from twinloss_adapters._imports import require_peft
from twinloss_adapters.base import AdaptedTransformer

__all__ = ["BaseModelTeacher", "LoRAEMATeacher", "add_lora", "trainable_parameter_names"]


def add_lora(adapted: nn.Module, config: object, *, adapter_name: str = "default") -> nn.Module:
    """Freeze ``adapted``, add LoRA layers, and train the adapter's own modules with them.

    Args:
        adapted: a model returned by a backbone's ``adapt``.
        config: a ``peft.LoraConfig``; it is copied, never modified. Its
            ``modules_to_save`` is extended by the adapter's modules.
        adapter_name: the peft adapter name of the trained LoRA.

    Returns:
        The ``peft.PeftModel``; call it like the adapted model.

    Raises:
        ValueError: if ``adapted`` is not an adapted model or ``config`` is
            not a ``peft.LoraConfig``.
    """
    peft = require_peft()
    if not isinstance(adapted, AdaptedTransformer):
        raise ValueError(
            f"adapted must be a model returned by a twinloss_adapters backbone's adapt(), got {type(adapted).__name__}"
        )
    if not isinstance(config, peft.LoraConfig):
        raise ValueError(f"config must be a peft.LoraConfig, got {type(config).__name__}")
    config = copy.deepcopy(config)
    extra_modules = [prefix.rstrip(".").split(".")[-1] for prefix in adapted.extra_prefixes()]
    present = [name for name in extra_modules if _has_submodule(adapted, name)]
    config.modules_to_save = sorted(set(config.modules_to_save or ()) | set(present))
    adapted.requires_grad_(False)
    return peft.get_peft_model(adapted, config, adapter_name=adapter_name)


def _has_submodule(root: nn.Module, name: str) -> bool:
    return any(path.split(".")[-1] == name for path, _ in root.named_modules())


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters that require grad (what an optimizer should get)."""
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


def _as_peft_model(model: VelocityModel, teacher: str) -> nn.Module:
    if not (isinstance(model, nn.Module) and hasattr(model, "peft_config") and hasattr(model, "disable_adapter")):
        raise ValueError(
            f"{teacher} needs the model to be a peft PeftModel (see twinloss_adapters.lora.add_lora), "
            f"got {type(model).__name__}"
        )
    return model


@contextlib.contextmanager
def _keep_requires_grad(model: nn.Module) -> Iterator[None]:
    """Restore every parameter's ``requires_grad`` on exit (peft toggles them when switching adapters)."""
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    try:
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


class BaseModelTeacher(Teacher):
    """The pretrained base: the LoRA model evaluated with every adapter disabled.

    It ignores ``r`` and the sign (the base has neither), so it returns the
    stock model's instantaneous velocity at ``|t|``: a fixed reference for the
    guidance pass (``TwinFlowLoss(guidance_teacher=BaseModelTeacher())``, the
    authors' ``ema_decay_rate: 1``), at no memory cost. The loss refuses it
    for the RCGM chain, which needs ``r``.
    """

    reads_target_time = False

    def forward(
        self, model: VelocityModel, x_t: Tensor, t: Tensor, r: Tensor, cond: Conditioning
    ) -> Tensor:
        peft_model = _as_peft_model(model, "BaseModelTeacher")
        with torch.no_grad(), _keep_requires_grad(peft_model), peft_model.disable_adapter():
            return peft_model(x_t, t, r, **cond)


class LoRAEMATeacher(MovingAverageTeacher):
    r"""An EMA of the trained adapter, kept as a second adapter on the same base.

    The average and warm-up of :class:`twinloss.EMATeacher`, over the adapter
    parameters only (LoRA matrices and the ``modules_to_save`` copies, i.e. the
    TwinFlow embeddings): the frozen base is shared, so the teacher costs one extra LoRA, not one extra model.
    The EMA adapter is created on first use (or by :meth:`attach`, which a
    resumed run calls before ``load_state_dict``) as a copy of the trained one.

    Args:
        target_decay: the decay the warm-up approaches (*default* 0.99), in [0, 1).
        ema_adapter: peft name of the EMA adapter.
    """

    def __init__(self, target_decay: float = 0.99, *, ema_adapter: str = "twinflow_ema") -> None:
        super().__init__(target_decay)
        if not ema_adapter:
            raise ValueError("ema_adapter must be a non-empty adapter name")
        self.ema_adapter = ema_adapter
        self._pairs: dict[str, tuple[Tensor, Tensor]] = {}  # ema name -> (online param, ema param)
        self._pending: dict[str, Tensor] | None = None

    def attach(self, model: VelocityModel) -> None:
        """Create the EMA adapter on ``model`` (a copy of the active adapter) if it is missing."""
        peft_model = _as_peft_model(model, "LoRAEMATeacher")
        online = peft_model.active_adapter
        if online == self.ema_adapter:
            raise ValueError(f"the active adapter is the EMA adapter {self.ema_adapter!r}; activate the trained one")
        if self.ema_adapter not in peft_model.peft_config:
            with _keep_requires_grad(peft_model):
                peft_model.add_adapter(self.ema_adapter, copy.deepcopy(peft_model.peft_config[online]))
                peft_model.set_adapter(online)
        parameters = dict(peft_model.named_parameters())
        pairs = {}
        for name, ema_parameter in parameters.items():
            parts = name.split(".")
            if self.ema_adapter not in parts:
                continue
            online_name = ".".join(online if part == self.ema_adapter else part for part in parts)
            if online_name not in parameters:
                raise ValueError(f"EMA parameter {name} has no trained counterpart {online_name}")
            ema_parameter.requires_grad_(False)
            pairs[name] = (parameters[online_name], ema_parameter)
        if not pairs:
            raise ValueError(f"adapter {self.ema_adapter!r} has no parameters to average")
        first_attach = not self._pairs
        self._pairs = pairs
        with torch.no_grad():
            if self._pending is not None:
                self._load_ema(self._pending)
                self._pending = None
            elif first_attach and self.num_updates == 0:
                for online_parameter, ema_parameter in pairs.values():
                    ema_parameter.copy_(online_parameter)

    def _load_ema(self, weights: dict[str, Tensor]) -> None:
        if set(weights) != set(self._pairs):
            raise ValueError(
                "saved EMA weights do not match this model's EMA adapter: "
                f"missing {sorted(set(self._pairs) - set(weights))[:3]}, "
                f"unexpected {sorted(set(weights) - set(self._pairs))[:3]}"
            )
        for name, (_, ema_parameter) in self._pairs.items():
            ema_parameter.copy_(weights[name].to(ema_parameter.dtype))

    @torch.no_grad()
    def update(self, model: VelocityModel) -> None:
        if not self._pairs:
            self.attach(model)
        for online_parameter, ema_parameter in self._pairs.values():
            ema_parameter.lerp_(online_parameter.detach().to(ema_parameter.dtype), self.average_weight)
        self.advance()

    def forward(
        self, model: VelocityModel, x_t: Tensor, t: Tensor, r: Tensor, cond: Conditioning
    ) -> Tensor:
        peft_model = _as_peft_model(model, "LoRAEMATeacher")
        if not self._pairs:
            self.attach(peft_model)
        online = peft_model.active_adapter
        with torch.no_grad(), _keep_requires_grad(peft_model):
            peft_model.set_adapter(self.ema_adapter)
            try:
                return peft_model(x_t, t, r, **cond)
            finally:
                peft_model.set_adapter(online)

    def get_extra_state(self) -> dict:
        if self._pairs:
            ema = {name: ema_parameter.detach().clone() for name, (_, ema_parameter) in self._pairs.items()}
        else:
            ema = {name: value.clone() for name, value in (self._pending or {}).items()}
        return {**self.schedule_state(), "ema_adapter": self.ema_adapter, "ema": ema}

    def set_extra_state(self, state: dict) -> None:
        if state["ema_adapter"] != self.ema_adapter:
            raise ValueError(
                f"the saved teacher averages adapter {state['ema_adapter']!r}, this one {self.ema_adapter!r}"
            )
        self.load_schedule_state(state, describe=f"EMA of adapter {self.ema_adapter!r}")
        weights = {name: value.clone() for name, value in state["ema"].items()}
        if self._pairs and weights:
            with torch.no_grad():
                self._load_ema(weights)
        else:
            self._pending = weights or None
