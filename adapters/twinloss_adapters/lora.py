"""LoRA training of an adapted backbone through peft, and its two teachers.

:func:`add_lora` wraps an adapted model in a ``peft.PeftModel``: the base
transformer is frozen, LoRA layers are injected where the config says, and the
adapter's own trainable modules (the TwinFlow time embedding; OpenUni's
connector and projector when built with ``train_connector=True``) go into
``modules_to_save``, so they train and are saved with the LoRA
(``save_pretrained`` / ``get_peft_model_state_dict``). The ``PeftModel``
keeps the protocol: ``peft_model(x_t, t, r, **cond)``.

Two teachers for the no-grad passes (``docs/method.md``, teachers) cost no second
copy of the base weights:

* :class:`BaseModelTeacher`: the pretrained backbone, i.e. the model with all
  adapters disabled (LoRA off and the TwinFlow embeddings back to their
  zero initial state, so ``F(x_t, t, r)`` is the stock instantaneous velocity
  at ``|t|``);
* :class:`LoRAEMATeacher`: an exponential moving average of the trained
  adapter, kept as a second peft adapter on the same base.

Saving (``docs/saving.md``): ``peft_model.save_pretrained(d)`` writes the
trained adapter (LoRA plus the twin modules) to ``d`` and, once a
:class:`LoRAEMATeacher` has attached, the EMA adapter to ``d/twinflow_ema``;
next to each, a ``twinloss_config.json`` records the adapter class and its
options. :func:`load_lora` puts either onto a freshly adapted stock base,
checking that the base was adapted with the saved class and options and that
every LoRA and twin weight is there; :func:`save_merged` writes a plain
checkpoint with the LoRA fused in, loaded by the adapter's ``from_pretrained``.

Wan 2.2 A14B's two experts (:class:`~twinloss_adapters.wan.WanExpertsModel`):
:func:`add_lora` gives each expert its own LoRA (the same config) with its own
twin modules in ``modules_to_save`` and returns a :class:`LoRAExperts`, which
routes per row as before and answers the teachers' peft calls for both
experts at once, so :class:`BaseModelTeacher` and :class:`LoRAEMATeacher` act
per expert (the EMA averages each expert's LoRA). Saved, each adapter folder
holds one folder per expert in the pipeline's layout (``transformer``,
``transformer_2``) and a ``twinloss_experts.json`` with the
``boundary_ratio``: ``d`` for the trained adapter, ``d/twinflow_ema`` for the
EMA, loaded by :func:`load_lora` onto freshly adapted experts;
:func:`save_merged` writes both fused experts and a ``model_index.json``, read
by ``wan.from_pretrained_experts``.
"""

import contextlib
import copy
import functools
import inspect
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from twinloss.protocol import Conditioning, VelocityModel
from twinloss.teachers import MovingAverageTeacher, Teacher
from twinloss_adapters._imports import require_peft
from twinloss_adapters.base import AdaptedTransformer
from twinloss_adapters.conventions import Capabilities
from twinloss_adapters.wan import WanExpertsModel

__all__ = [
    "BaseModelTeacher",
    "LoRAEMATeacher",
    "LoRAExperts",
    "add_lora",
    "load_lora",
    "save_merged",
    "trainable_parameter_names",
]

EXPERTS_CONFIG_NAME = "twinloss_experts.json"
"""Next to the experts' LoRA folders: the ``boundary_ratio`` they were trained with and each expert's folder."""


def add_lora(adapted: nn.Module, config: object, *, adapter_name: str = "default") -> nn.Module:
    """Freeze ``adapted``, add LoRA layers, and train the adapter's own modules with them.

    Args:
        adapted: a model returned by a backbone's ``adapt``, or Wan 2.2's
            :class:`~twinloss_adapters.wan.WanExpertsModel` (each expert gets
            its LoRA; a :class:`LoRAExperts` is returned).
        config: a ``peft.LoraConfig``; it is copied, never modified. Its
            ``modules_to_save`` is extended by the adapter's own modules that
            have trainable parameters (frozen ones stay frozen).
        adapter_name: the peft adapter name of the trained LoRA.

    Returns:
        The ``peft.PeftModel``; call it like the adapted model.

    Raises:
        ValueError: if ``adapted`` is not an adapted model or ``config`` is
            not a ``peft.LoraConfig``.
    """
    peft = require_peft()
    if isinstance(adapted, WanExpertsModel):
        return LoRAExperts(adapted, lambda expert, _: add_lora(expert, config, adapter_name=adapter_name))
    if not isinstance(adapted, AdaptedTransformer):
        raise ValueError(
            f"adapted must be a model returned by a twinloss_adapters backbone's adapt(), got {type(adapted).__name__}"
        )
    if not isinstance(config, peft.LoraConfig):
        raise ValueError(f"config must be a peft.LoraConfig, got {type(config).__name__}")
    config = copy.deepcopy(config)
    config.modules_to_save = sorted(set(config.modules_to_save or ()) | set(_extra_module_names(adapted)))
    flags = [(parameter, parameter.requires_grad) for parameter in adapted.parameters()]
    adapted.requires_grad_(False)
    try:
        model = peft.get_peft_model(adapted, config, adapter_name=adapter_name)
    except Exception:  # peft refused the config (no target module found, ...): give the caller's flags back
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        raise
    model.__class__ = _saving_adapter_options(type(model))
    return model


def _weightless_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers are empty 'meta' tensors: no weight is copied.

    :func:`load_lora` puts the LoRA on it to learn the names and shapes the
    saved adapter must have before it touches the caller's model.
    """
    memo: dict[int, object] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        empty = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(empty, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else empty
    return copy.deepcopy(module, memo)


@functools.cache
def _saving_adapter_options(peft_class: type) -> type:
    """``peft_class`` whose ``save_pretrained`` also writes the adapter's ``twinloss_config.json`` next to each LoRA.

    peft saves the LoRA and the twin modules but not how the base was adapted
    (``target_time``, ``sign``, HunyuanVideo 1.5's ``vision_tokens``, ...);
    the file, in the layout of :func:`twinloss_adapters.persistence.adapter_description`,
    lets :func:`load_lora` refuse a base adapted otherwise.
    """

    class TwinLossPeftModel(peft_class):
        def save_pretrained(self, save_directory: str | os.PathLike, *args: object, **kwargs: object) -> None:
            from twinloss_adapters.persistence import adapter_description, write_twinloss_config

            description = adapter_description(self.get_base_model())  # an unstorable option raises before writing
            arguments = inspect.signature(peft_class.save_pretrained).bind(self, save_directory, *args, **kwargs)
            arguments.apply_defaults()
            super().save_pretrained(save_directory, *args, **kwargs)
            if not arguments.arguments["is_main_process"]:
                return
            for name in arguments.arguments["selected_adapters"] or list(self.peft_config):
                # peft's folder for each adapter: the default one at the top, any other in a folder of its name
                folder = save_directory if name == "default" else os.path.join(save_directory, name)
                write_twinloss_config(folder, description)

    TwinLossPeftModel.__name__ = TwinLossPeftModel.__qualname__ = f"TwinLoss{peft_class.__name__}"
    return TwinLossPeftModel


def _extra_module_names(adapted: AdaptedTransformer) -> list[str]:
    """Names of the adapter's own trainable modules on ``adapted`` (what ``modules_to_save`` must hold)."""
    names = [prefix.rstrip(".").split(".")[-1] for prefix in adapted.extra_prefixes()]
    return [name for name in names if _has_trainable_submodule(adapted, name)]


def _has_trainable_submodule(root: nn.Module, name: str) -> bool:
    """A submodule called ``name`` with a trainable parameter (a frozen OpenUni connector stays frozen)."""
    return any(
        path.split(".")[-1] == name and any(parameter.requires_grad for parameter in module.parameters())
        for path, module in root.named_modules()
    )


def load_lora(
    adapted: nn.Module,
    model_id: str | os.PathLike,
    *,
    adapter_name: str = "default",
    is_trainable: bool = False,
    **hub_kwargs: object,
) -> nn.Module:
    """Put an adapter saved by ``peft_model.save_pretrained`` onto a freshly adapted stock base.

    Every saved weight must match the model exactly: LoRA matrices and the
    twin modules (``modules_to_save``), none missing, none extra, none of
    another shape. peft's own ``PeftModel.from_pretrained`` only warns about
    missing LoRA keys and says nothing about missing ``modules_to_save``.

    Args:
        adapted: the stock base adapted with the same options as in training
            (``backbone.adapt(...)`` or ``AdapterClass.from_pretrained(...)``).
        model_id: the directory (or Hub repository) the adapter was saved to;
            the EMA adapter is in its ``twinflow_ema`` folder.
        adapter_name: the peft name to give the loaded adapter.
        is_trainable: keep the LoRA and twin weights trainable (to continue training).
        **hub_kwargs: ``subfolder``, ``revision``, ``token``, ... for the Hub.

    Returns:
        The ``peft.PeftModel``; call it like the adapted model.

    Raises:
        ValueError: if the saved config is not a LoRA config, the saved
            ``twinloss_config.json`` names another adapter class or other
            option values than ``adapted``'s (naming each), its
            ``modules_to_save`` lacks the adapter's modules, or the weights do
            not match the model (naming the keys). A folder without
            ``twinloss_config.json`` (saved before twinloss wrote it) is not
            compared. Everything is checked before ``adapted`` changes: a
            refused adapter leaves it without LoRA layers, its parameters'
            ``requires_grad`` as they were.
    """
    peft = require_peft()
    if isinstance(adapted, WanExpertsModel):
        return LoRAExperts.load(adapted, model_id, adapter_name=adapter_name, is_trainable=is_trainable, **hub_kwargs)
    config, saved = _checked_lora(adapted, model_id, adapter_name=adapter_name, is_trainable=is_trainable, **hub_kwargs)
    model = add_lora(adapted, config, adapter_name=adapter_name)
    peft.set_peft_model_state_dict(model, saved, adapter_name=adapter_name)
    return model


def _checked_lora(
    adapted: nn.Module, model_id: str | os.PathLike, *, adapter_name: str, is_trainable: bool, **hub_kwargs: object
) -> tuple[object, dict[str, Tensor]]:
    """The saved config and weights of the adapter in ``model_id``, after every check of :func:`load_lora`.

    ``adapted`` is not modified: the weights are compared with those of the
    LoRA put on a weightless copy of it, so a refused adapter leaves the
    caller's base without LoRA layers and with its ``requires_grad`` flags.
    """
    peft = require_peft()
    from twinloss_adapters.persistence import check_exact_match, check_same_adapter, read_twinloss_config

    folder = _local_adapter_folder(model_id, hub_kwargs)
    config = peft.PeftConfig.from_pretrained(folder)
    if not isinstance(config, peft.LoraConfig):
        raise ValueError(f"{model_id} holds a {type(config).__name__}, expected a LoRA adapter (LoraConfig)")
    if not isinstance(adapted, AdaptedTransformer):
        raise ValueError(f"adapted must be a model returned by adapt() or from_pretrained(), got {type(adapted).__name__}")
    saved_adapter = read_twinloss_config(folder, None, {})
    if saved_adapter is not None:  # LoRA folders saved before twinloss wrote it have none: nothing to compare
        check_same_adapter(saved_adapter, adapted, f"the LoRA in {model_id}")
    absent = sorted(set(_extra_module_names(adapted)) - set(config.modules_to_save or ()))
    if absent:
        raise ValueError(
            f"the adapter in {model_id} does not save modules {absent} (its modules_to_save is "
            f"{config.modules_to_save}); their trained weights are not in it"
        )
    config.inference_mode = not is_trainable
    saved = peft.utils.load_peft_weights(folder, device="cpu")
    dry_run = add_lora(_weightless_copy(adapted), config, adapter_name=adapter_name)
    expected = peft.get_peft_model_state_dict(dry_run, adapter_name=adapter_name)
    # Names and shapes are compared in the saved naming; peft then maps them onto the adapter's parameters.
    check_exact_match(expected, saved, f"the adapter weights in {model_id}")
    return config, saved


def _local_adapter_folder(model_id: str | os.PathLike, hub_kwargs: Mapping[str, object]) -> str:
    """The local folder holding the peft adapter of ``model_id`` (``hub_kwargs["subfolder"]`` inside it).

    A directory is used as it is. For a Hub repository its config, weights and
    ``twinloss_config.json`` are fetched into (or, with ``local_files_only``,
    found in) the Hub cache the way diffusers' loaders fetch files, honouring
    every Hub argument; peft then reads that folder. (peft's own loader asks
    the Hub whether a file exists before it looks in the cache, so it cannot
    load offline.)

    Raises:
        ValueError: naming a keyword that is no Hub argument, or the
            repository's missing config or weights file.
    """
    from twinloss_adapters.persistence import HUB_ARGUMENTS, hub_arguments, resolve_file

    unknown = sorted(set(hub_kwargs) - {"subfolder", *HUB_ARGUMENTS})
    if unknown:
        raise ValueError(f"load_lora got {unknown}, which are no Hub arguments; expected subfolder or {list(HUB_ARGUMENTS)}")
    subfolder = hub_kwargs.get("subfolder")
    if Path(model_id).is_dir():
        return str(Path(model_id) / (subfolder or ""))
    from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
    from twinloss_adapters.persistence import TWINLOSS_CONFIG_NAME

    hub = hub_arguments(hub_kwargs)
    config = resolve_file(model_id, CONFIG_NAME, subfolder, hub)
    if config is None:
        raise ValueError(f"found no {CONFIG_NAME} in {str(model_id)!r} (subfolder {subfolder!r})")
    if not any(resolve_file(model_id, name, subfolder, hub) for name in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME)):
        raise ValueError(f"found no {SAFETENSORS_WEIGHTS_NAME} or {WEIGHTS_NAME} in {str(model_id)!r} (subfolder {subfolder!r})")
    resolve_file(model_id, TWINLOSS_CONFIG_NAME, subfolder, hub)  # beside the others in the cache, when saved
    return str(Path(config).parent)


def save_merged(
    peft_model: nn.Module, save_directory: str | os.PathLike, *, adapter_name: str | None = None, **kwargs: object
) -> None:
    """Fuse one LoRA adapter into a copy of the base and save it as a plain adapted checkpoint.

    The copy (the caller's model is left as it is, at the cost of a second
    set of base weights while saving) gets ``W + scale * B A`` in every LoRA
    layer and that adapter's twin modules, and is written with
    :meth:`AdaptedTransformer.save_pretrained`: one
    ``AdapterClass.from_pretrained(save_directory)`` loads it, no peft needed.

    Args:
        peft_model: a model returned by :func:`add_lora` or :func:`load_lora`
            (for :class:`LoRAExperts`: both experts, see :meth:`LoRAExperts.save_merged`).
        save_directory: where to write.
        adapter_name: the adapter to fuse (*default* the active one; the
            EMA of a :class:`LoRAEMATeacher` is ``"twinflow_ema"``).
        **kwargs: passed to the stock ``save_pretrained``.

    Raises:
        ValueError: if ``peft_model`` is not a peft model of an adapted
            transformer or has no adapter ``adapter_name``.
    """
    if isinstance(peft_model, LoRAExperts):
        peft_model.save_merged(save_directory, adapter_name=adapter_name, **kwargs)
        return
    model = _as_peft_model(peft_model, "save_merged")
    if not isinstance(model.get_base_model(), AdaptedTransformer):
        raise ValueError(f"save_merged needs a peft model of an adapted transformer, got one of {type(model.get_base_model()).__name__}")
    name = adapter_name or model.active_adapter
    if name not in model.peft_config:
        raise ValueError(f"adapter_name {name!r} is not an adapter of the model; it has {sorted(model.peft_config)}")
    merged = copy.deepcopy(model)
    merged.set_adapter(name)
    merged.merge_and_unload(adapter_names=[name]).save_pretrained(save_directory, **kwargs)


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
            # set_adapter makes the average trainable; frozen, the pass rounds as the saved average reloaded does
            # (on some CPUs a LoRA layer whose weights require grad rounds differently, even under no_grad)
            peft_model.requires_grad_(False)
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

    def check_extra_state(self, state: dict) -> None:
        """Refuse a saved average of another adapter or decay; changes nothing."""
        if state["ema_adapter"] != self.ema_adapter:
            raise ValueError(
                f"the saved teacher averages adapter {state['ema_adapter']!r}, this one {self.ema_adapter!r}"
            )
        self.check_schedule_state(state, describe=f"EMA of adapter {self.ema_adapter!r}")

    def set_extra_state(self, state: dict) -> None:
        self.check_extra_state(state)
        self.load_schedule_state(state, describe=f"EMA of adapter {self.ema_adapter!r}")
        weights = {name: value.clone() for name, value in state["ema"].items()}
        if self._pairs and weights:
            with torch.no_grad():
                self._load_ema(weights)
        else:
            self._pending = weights or None


class LoRAExperts(nn.Module):
    """Wan 2.2's two experts, each with its own LoRA, behind one protocol model and one peft-like interface.

    Built by :func:`add_lora` (or :func:`load_lora`) from a
    :class:`~twinloss_adapters.wan.WanExpertsModel`: every expert is frozen and
    wrapped by its own ``PeftModel`` (the same config, the expert's twin
    modules in its ``modules_to_save``) in place inside ``experts``, whose
    router still sends each row to the expert its ``|t|`` belongs to. The peft
    calls the teachers make (``disable_adapter``, ``add_adapter``,
    ``set_adapter``, ``active_adapter``, ``peft_config``) act on both experts.

    Args:
        experts: the adapted experts, not yet LoRA-wrapped.
        wrap: ``(expert, subfolder) -> PeftModel``: :func:`add_lora` or
            :func:`load_lora` of one expert (``subfolder``: its folder in a
            saved adapter, ``transformer`` or ``transformer_2``).

    Raises:
        ValueError: if an expert already carries a LoRA.
    """

    def __init__(self, experts: WanExpertsModel, wrap: Callable[[AdaptedTransformer, str], nn.Module]) -> None:
        super().__init__()
        for name in experts.expert_subfolders:
            if not isinstance(getattr(experts, name), AdaptedTransformer):
                raise ValueError(f"experts.{name} already carries a LoRA; pass freshly adapted experts")
        wrapped = {name: wrap(getattr(experts, name), folder) for name, folder in experts.expert_subfolders.items()}
        for name, model in wrapped.items():
            setattr(experts, name, model)  # the router now calls the LoRA models
        self.experts = experts

    def forward(self, x_t: Tensor, t: Tensor, r: Tensor, **cond: Tensor) -> Tensor:
        """``F(x_t, t, r)``, each row from its expert (see :class:`~twinloss_adapters.wan.WanExpertsModel`)."""
        return self.experts(x_t, t, r, **cond)

    @property
    def capabilities(self) -> Capabilities:
        """The experts' (the same on both)."""
        return self.experts.capabilities

    def expert_models(self) -> dict[str, nn.Module]:
        """Each expert's ``PeftModel``, by the expert's attribute name."""
        return {name: getattr(self.experts, name) for name in self.experts.expert_subfolders}

    @property
    def peft_config(self) -> dict[str, object]:
        """The adapters' configs (the same on both experts)."""
        return self.expert_models()["high_noise"].peft_config

    @property
    def active_adapter(self) -> str:
        return self.expert_models()["high_noise"].active_adapter

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Both experts with every adapter disabled: the stock experts, routed as before."""
        with contextlib.ExitStack() as stack:
            for model in self.expert_models().values():
                stack.enter_context(model.disable_adapter())
            yield

    def add_adapter(self, adapter_name: str, config: object) -> None:
        """Add adapter ``adapter_name`` (a copy of ``config``) to both experts."""
        for model in self.expert_models().values():
            model.add_adapter(adapter_name, copy.deepcopy(config))

    def set_adapter(self, adapter_name: str) -> None:
        """Activate adapter ``adapter_name`` on both experts."""
        for model in self.expert_models().values():
            model.set_adapter(adapter_name)

    def save_pretrained(self, save_directory: str | os.PathLike, *, is_main_process: bool = True, **kwargs: object) -> None:
        """Write each adapter: ``d`` (the default one) or ``d/<name>``, each with ``transformer/``, ``transformer_2/``.

        Every expert folder is peft's, with its ``twinloss_config.json``; next
        to them ``twinloss_experts.json`` records the ``boundary_ratio``.
        ``kwargs`` go to peft's ``save_pretrained``.
        """
        if "selected_adapters" in kwargs:
            raise ValueError("selected_adapters is not supported for the experts; every adapter is saved")
        save_directory = Path(save_directory)
        with tempfile.TemporaryDirectory() as staging:
            for name, model in self.expert_models().items():  # peft writes d/sub and d/sub/<adapter>
                model.save_pretrained(Path(staging) / self.experts.expert_subfolders[name], is_main_process=is_main_process, **kwargs)
            if not is_main_process:
                return
            for adapter in self.peft_config:
                folder = save_directory if adapter == "default" else save_directory / adapter
                for subfolder in self.experts.expert_subfolders.values():
                    source = Path(staging) / subfolder / ("" if adapter == "default" else adapter)
                    (folder / subfolder).mkdir(parents=True, exist_ok=True)
                    for file in source.iterdir():
                        if file.is_file():
                            shutil.copy2(file, folder / subfolder / file.name)
                description = {"boundary_ratio": self.experts.boundary_ratio, "experts": self.experts.expert_subfolders}
                (folder / EXPERTS_CONFIG_NAME).write_text(json.dumps(description, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(
        cls,
        experts: WanExpertsModel,
        model_id: str | os.PathLike,
        *,
        adapter_name: str = "default",
        is_trainable: bool = False,
        **hub_kwargs: object,
    ) -> "LoRAExperts":
        """Put the experts' adapter saved in ``model_id`` (see :meth:`save_pretrained`) onto freshly adapted experts.

        Each expert is loaded by :func:`load_lora` from its folder, with all its checks.

        Raises:
            ValueError: as :func:`load_lora`, and if ``twinloss_experts.json``
                records another ``boundary_ratio`` or other expert folders.
                Both experts' adapters are checked before either expert
                changes, so refused experts carry no LoRA layers.
        """
        from twinloss_adapters.persistence import resolve_file, hub_arguments

        subfolder = hub_kwargs.pop("subfolder", None)
        file = resolve_file(model_id, EXPERTS_CONFIG_NAME, subfolder, hub_arguments(hub_kwargs))
        if file is not None:
            saved = json.loads(Path(file).read_text())
            if saved["boundary_ratio"] != experts.boundary_ratio or saved["experts"] != experts.expert_subfolders:
                raise ValueError(
                    f"the LoRA in {model_id} was trained on experts {saved['experts']} with boundary_ratio "
                    f"{saved['boundary_ratio']}; these are {experts.expert_subfolders} with {experts.boundary_ratio}"
                )

        checked = {}  # every expert's adapter is checked before either expert changes
        for name, expert_folder in experts.expert_subfolders.items():
            folder = expert_folder if subfolder is None else f"{subfolder}/{expert_folder}"
            checked[expert_folder] = _checked_lora(
                getattr(experts, name), model_id, adapter_name=adapter_name, is_trainable=is_trainable,
                subfolder=folder, **hub_kwargs,
            )

        def load_expert(expert: AdaptedTransformer, expert_folder: str) -> nn.Module:
            config, saved = checked[expert_folder]
            model = add_lora(expert, config, adapter_name=adapter_name)
            require_peft().set_peft_model_state_dict(model, saved, adapter_name=adapter_name)
            return model

        return cls(experts, load_expert)

    def save_merged(
        self, save_directory: str | os.PathLike, *, adapter_name: str | None = None, **kwargs: object
    ) -> None:
        """Fuse one adapter into a copy of each expert; write them as a pipeline folder's two experts.

        ``save_directory/transformer`` and ``save_directory/transformer_2`` (each
        by :func:`save_merged`) and a ``model_index.json`` with the
        ``boundary_ratio``: ``wan.from_pretrained_experts(save_directory)`` loads it.
        """
        save_directory = Path(save_directory)
        for name, model in self.expert_models().items():
            save_merged(model, save_directory / self.experts.expert_subfolders[name], adapter_name=adapter_name, **kwargs)
        index = {"_class_name": "WanPipeline", "boundary_ratio": self.experts.boundary_ratio}
        (save_directory / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
