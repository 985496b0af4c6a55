"""Saving and loading adapted transformers without losing what TwinFlow learned.

Layout of ``adapted.save_pretrained(directory)`` (diffusers' own layout, plus
one small file)::

    directory/
        config.json                            the stock transformer's config
        diffusion_pytorch_model.safetensors    stock weights AND the twin keys
                                               (``twinflow_time_embedding.*``)
        twinloss_config.json                   adapter class, its options, the twin keys
        twinloss_extras.safetensors            adapter modules outside the transformer
                                               (OpenUni's connector); only if any

The stock diffusers class alone **drops** the twin keys (diffusers only logs
"weights ... were not used"): load through the adapter's ``from_pretrained``,
which builds the stock class, adapts it with the saved options and loads the
twin keys strictly. A checkpoint without ``twinloss_config.json`` and without
twin keys (a stock one) loads with zero-initialised twin modules; twin keys
that are missing, partial, unexpected or mis-shaped, stock weights the
checkpoint lacks, keys nothing loads, and arguments the load cannot honour
raise ``ValueError`` naming them.
"""

import contextlib
import inspect
import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from twinloss_adapters._imports import require_diffusers
from twinloss_adapters.time_embedding import DEFAULT_MODULE_NAME

__all__ = [
    "EXTRAS_WEIGHTS_NAME",
    "TWINLOSS_CONFIG_NAME",
    "adapter_description",
    "check_exact_match",
    "check_same_adapter",
    "check_stock_arguments",
    "check_stock_load",
    "load_adapted",
    "load_exactly",
    "mis_shaped_keys",
    "read_twinloss_config",
    "save_adapted",
    "split_construction_arguments",
    "split_load_arguments",
    "write_twinloss_config",
]

TWINLOSS_CONFIG_NAME = "twinloss_config.json"
EXTRAS_WEIGHTS_NAME = "twinloss_extras.safetensors"
FORMAT_VERSION = 1
TRANSFORMER_PREFIX = "transformer."
STOCK_LOADER_LOGGER = "diffusers.models.modeling_utils"
UNUSED_WEIGHTS_MESSAGE = "were not used when initializing"
HUB_ARGUMENTS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision")
# The stock ``from_pretrained`` arguments passed on. Left out on purpose: ``output_loading_info`` (the
# loaders return the model alone), ``ignore_mismatched_sizes`` (it would re-initialise saved weights),
# FlashPack (it reports no loading info to check), ``trust_remote_code`` (adapters take stock classes)
# and config overrides (the saved config is the model).
STOCK_LOAD_ARGUMENTS = (
    *HUB_ARGUMENTS,
    "torch_dtype", "dtype", "variant", "use_safetensors", "device_map", "max_memory", "offload_folder",
    "offload_state_dict", "low_cpu_mem_usage", "quantization_config", "disable_mmap", "parallel_config",
)


# Key parts of the layers peft injects (diffusers' ``add_adapter`` included): a stock class has none of them.
PEFT_KEY_PARTS = (".base_layer.", ".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.")
PEFT_LAYERS_ADVICE = (
    "the stock class cannot rebuild LoRA layers injected by diffusers' transformer.add_adapter(...): "
    "fuse them into the base weights first (transformer.fuse_lora(); transformer.unload_lora()), or train "
    "the LoRA with twinloss_adapters.lora.add_lora and save it with the peft model's save_pretrained or lora.save_merged"
)


def peft_layer_names(module: nn.Module) -> list[str]:
    """Names of the peft-injected layers in ``module`` (LoRA from diffusers' ``add_adapter`` or peft itself)."""
    import importlib.util

    if importlib.util.find_spec("peft") is None:  # without peft, nothing can have injected its layers
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [name for name, child in module.named_modules() if isinstance(child, BaseTunerLayer)]


def hub_arguments(kwargs: Mapping[str, object]) -> dict[str, object]:
    """The ``from_pretrained`` keyword arguments in ``kwargs`` that also locate a checkpoint's files."""
    return {name: kwargs[name] for name in HUB_ARGUMENTS if name in kwargs}


def adapter_option_names(adapter_class: type) -> list[str]:
    """The keyword arguments of ``adapter_class`` besides the transformer (``target_time``, ``sign``, ...)."""
    parameters = inspect.signature(adapter_class.__init__).parameters
    return [name for name in parameters if name not in ("self", "transformer")]


def check_stock_arguments(kwargs: Mapping[str, object], adapter_options: list[str], what: str) -> None:
    """Raise ValueError naming each of ``kwargs`` that is no stock ``from_pretrained`` argument twinloss passes on.

    The stock loader would take a misspelled option (``sing=False``) for a
    config override and ignore it with a log line; so would an adapter
    option that this load cannot honour.
    """
    unknown = sorted(set(kwargs) - set(STOCK_LOAD_ARGUMENTS))
    if unknown:
        raise ValueError(
            f"{what} got arguments {unknown} that it cannot honour: they are neither its adapter options "
            f"{sorted(adapter_options)} nor stock from_pretrained arguments it passes on {sorted(STOCK_LOAD_ARGUMENTS)}"
        )


def split_load_arguments(
    adapter_class: type, kwargs: Mapping[str, object]
) -> tuple[dict[str, object], dict[str, object]]:
    """Split ``from_pretrained``'s keyword arguments into ``adapter_class``'s options and the stock loader's.

    Returns:
        ``(adapter_options, stock_arguments)``; ``kwargs`` is not modified.

    Raises:
        ValueError: naming every argument that is neither.
    """
    names = adapter_option_names(adapter_class)
    options = {name: value for name, value in kwargs.items() if name in names}
    stock = {name: value for name, value in kwargs.items() if name not in names}
    check_stock_arguments(stock, names, f"{adapter_class.__name__}.from_pretrained")
    return options, stock


JSON_SCALARS = (bool, int, float, str, type(None))


def _json_value(value: object) -> object:
    """``value`` as JSON stores it (tuples become lists); ``ValueError``-free check done by the caller."""
    return json.loads(json.dumps(value))


def _is_json_option(value: object) -> bool:
    if isinstance(value, JSON_SCALARS):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_json_option(item) for item in value)
    return False


def split_construction_arguments(arguments: Mapping[str, object]) -> tuple[dict[str, object], list[str]]:
    """Split an adapter's keyword arguments into JSON options and module arguments.

    Returns:
        ``(options, module_arguments)``: the JSON-storable options, and the
        names of arguments that are modules (their weights are adapter extras).

    Raises:
        ValueError: naming an argument that is neither (it cannot be saved).
    """
    options, modules = {}, []
    for name, value in arguments.items():
        if _is_json_option(value):
            options[name] = _json_value(value)
        elif isinstance(value, nn.Module):
            modules.append(name)
        else:
            raise ValueError(
                f"adapter argument {name!r} is a {type(value).__name__}, which cannot be saved; "
                "adapter options must be JSON values or modules"
            )
    return options, sorted(modules)


def adapter_qualname(adapter_class: type) -> str:
    return f"{adapter_class.__module__}.{adapter_class.__qualname__}"


def _transformer_prefixes(adapted: nn.Module) -> tuple[str, ...]:
    """Key prefixes, relative to the transformer, of the modules the adapter added to it."""
    return tuple(p[len(TRANSFORMER_PREFIX):] for p in adapted.extra_prefixes() if p.startswith(TRANSFORMER_PREFIX))


def _added_weights(
    transformer: nn.Module, stock_modules: set[str], stock_keys: set[str], adapted: nn.Module
) -> tuple[dict[str, Tensor], tuple[str, ...]]:
    """What adapting added to ``transformer``: its new state entries, and key prefixes that cover them.

    The prefixes are the top-most new modules (``twinflow_time_embedding.``, a
    release embedder, ...), entries added to existing modules, and the
    adapter's declared ``extra_prefixes`` and the default twin module's name
    (so twin keys in a checkpoint are seen even when this adapter was built
    without twin modules).
    """
    added = {k: v for k, v in transformer.state_dict().items() if k not in stock_keys}
    new_modules = [name for name, _ in transformer.named_modules() if name and name not in stock_modules]
    top_most = {name for name in new_modules if name.rpartition(".")[0] not in new_modules}
    covered = tuple(f"{name}." for name in top_most)
    loose = {key for key in added if not key.startswith(covered)}
    declared = {*_transformer_prefixes(adapted), f"{DEFAULT_MODULE_NAME}."}
    return added, tuple(sorted(set(covered) | loose | declared))


def _external_extras(adapted: nn.Module) -> dict[str, Tensor]:
    """Adapter weights that live outside the transformer (keys as in ``adapted.state_dict()``)."""
    return {k: v for k, v in adapted.extra_state_dict().items() if not k.startswith(TRANSFORMER_PREFIX)}


def save_adapted(adapted: nn.Module, save_directory: str | os.PathLike, **kwargs: object) -> None:
    """Write ``adapted`` in the layout of the module docstring.

    ``kwargs`` go to the stock ``save_pretrained`` (``variant``,
    ``max_shard_size``, ``safe_serialization``, ``is_main_process``, ...).

    Raises:
        ValueError: for ``push_to_hub=True`` (it would upload the stock files
            only; upload the directory once saved), an adapter argument
            that cannot be stored, or a transformer holding peft-injected
            (LoRA) layers, which no ``from_pretrained`` could load back.
    """
    from safetensors.torch import save_file

    injected = peft_layer_names(adapted.transformer)
    if injected:
        raise ValueError(
            f"the transformer holds LoRA layers {injected[:4]}{' ...' if len(injected) > 4 else ''}, whose weights "
            f"would be saved under keys no from_pretrained loads; {PEFT_LAYERS_ADVICE}"
        )
    if kwargs.get("push_to_hub"):
        raise ValueError(
            "push_to_hub=True would upload only the stock transformer files, not twinloss_config.json; "
            "save, then upload the whole directory (huggingface_hub.upload_folder)"
        )
    description = adapter_description(adapted)  # before writing anything: an unstorable argument raises here
    transformer = adapted.transformer  # the stock class's save: the instance's own one calls this function
    type(transformer).save_pretrained(transformer, save_directory, **kwargs)
    if not kwargs.get("is_main_process", True):
        return
    directory = Path(save_directory)
    extras = _external_extras(adapted)
    if extras:
        save_file({k: v.detach().contiguous().cpu() for k, v in extras.items()}, str(directory / EXTRAS_WEIGHTS_NAME))
    else:
        (directory / EXTRAS_WEIGHTS_NAME).unlink(missing_ok=True)  # a stale one from an earlier save
    prefixes = _transformer_prefixes(adapted)
    config = {
        **description,
        "twin_keys": sorted(k for k in adapted.transformer.state_dict() if k.startswith(prefixes)),
        "extra_keys": sorted(extras),
    }
    write_twinloss_config(directory, config)


def adapter_description(adapted: nn.Module) -> dict[str, object]:
    """The part of ``twinloss_config.json`` that rebuilds the adapter: its class, JSON options and module arguments.

    Raises:
        ValueError: naming an adapter argument that cannot be stored.
    """
    options, module_arguments = split_construction_arguments(adapted.construction_arguments)
    return {
        "format_version": FORMAT_VERSION,
        "adapter": adapter_qualname(type(adapted)),
        "options": options,
        "module_arguments": module_arguments,
    }


def write_twinloss_config(directory: str | os.PathLike, config: Mapping[str, object]) -> None:
    """Write ``config`` as ``directory/twinloss_config.json`` (read back by :func:`read_twinloss_config`)."""
    (Path(directory) / TWINLOSS_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# --- locating files, local or on the Hub -----------------------------------------------------


def resolve_file(
    path: str | os.PathLike, name: str, subfolder: str | None, hub_arguments: Mapping[str, object]
) -> str | None:
    """The local path of file ``name`` of a model directory or Hub repository; None if it has none."""
    local = Path(path) / (subfolder or "") / name
    if Path(path).is_dir():
        return str(local) if local.is_file() else None
    from diffusers.utils.hub_utils import _get_model_file

    try:
        return str(_get_model_file(str(path), weights_name=name, subfolder=subfolder, **hub_arguments))
    except OSError:  # diffusers raises EnvironmentError when the repository has no such file
        return None


def weight_files(
    path: str | os.PathLike, subfolder: str | None, variant: str | None, hub_arguments: Mapping[str, object]
) -> list[str]:
    """The weights files the stock loader reads (a shard index wins over a single file)."""
    from diffusers.utils import constants
    from diffusers.utils.hub_utils import _add_variant

    for index_name, single_name in (
        (constants.SAFE_WEIGHTS_INDEX_NAME, constants.SAFETENSORS_WEIGHTS_NAME),
        (constants.WEIGHTS_INDEX_NAME, constants.WEIGHTS_NAME),
    ):
        index = resolve_file(path, _add_variant(index_name, variant), subfolder, hub_arguments)
        if index is not None:
            shards = sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
            return [resolve_file(path, shard, subfolder, hub_arguments) for shard in shards]
        single = resolve_file(path, _add_variant(single_name, variant), subfolder, hub_arguments)
        if single is not None:
            return [single]
    raise ValueError(f"found no diffusers weights file in {path!r} (subfolder {subfolder!r}, variant {variant!r})")


def read_tensors(files: list[str], prefixes: tuple[str, ...]) -> dict[str, Tensor]:
    """Every tensor whose key starts with one of ``prefixes``, read from ``files``."""
    from safetensors import safe_open

    found: dict[str, Tensor] = {}
    if not prefixes:
        return found
    for file in files:
        if file.endswith(".safetensors"):
            with safe_open(file, framework="pt") as handle:
                for key in handle.keys():
                    if key.startswith(prefixes):
                        found[key] = handle.get_tensor(key)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
            found.update({k: v for k, v in state.items() if k.startswith(prefixes)})
    return found


# --- strict loading -----------------------------------------------------------------------------


def check_exact_match(expected: Mapping[str, Tensor], found: Mapping[str, Tensor], what: str) -> None:
    """Raise ValueError naming the keys of ``found`` that are missing, unexpected or mis-shaped against ``expected``."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mis_shaped = sorted(
        f"{key} (saved {tuple(found[key].shape)}, model {tuple(expected[key].shape)})"
        for key in set(expected) & set(found)
        if found[key].shape != expected[key].shape
    )
    if missing or unexpected or mis_shaped:
        raise ValueError(
            f"{what} do not match the adapted model: missing {missing}, unexpected {unexpected}, "
            f"wrong shape {mis_shaped}"
        )


def check_stock_load(
    checkpoint: str, stock_class: type, loading_info: Mapping[str, list], placed: set[str]
) -> None:
    """Raise ValueError unless the stock loader filled every weight and the adapter placed every key it left.

    Args:
        checkpoint: the checkpoint's name, for the message.
        stock_class: the class the stock loader built.
        loading_info: what the stock ``from_pretrained(..., output_loading_info=True)`` returned with the model.
        placed: checkpoint keys the adapter loads itself (twin or release weights).

    Raises:
        ValueError: naming the stock keys the checkpoint lacks or has with another shape (the stock
            loader would leave them newly initialised or on the meta device) and the checkpoint keys
            nothing loads (they would be dropped). LoRA layer keys get a note on how to save them.
    """
    missing = sorted(loading_info["missing_keys"])
    mis_shaped = list(loading_info["mismatched_keys"])
    unplaced = sorted(set(loading_info["unexpected_keys"]) - placed)
    problems = []
    if missing:
        problems.append(f"it lacks stock weights {missing} (they would be left newly initialised)")
    if mis_shaped:
        problems.append(f"it has mis-shaped stock weights {mis_shaped}")
    if unplaced:
        problems.append(f"it has keys {unplaced} that nothing would load (they would be lost)")
    if any(part in key for key in unplaced for part in PEFT_KEY_PARTS):
        problems.append(PEFT_LAYERS_ADVICE)
    if problems:
        raise ValueError(f"checkpoint {checkpoint!r} does not fit {stock_class.__name__} and the adapter: {'; '.join(problems)}")


def mis_shaped_keys(expected: Mapping[str, Tensor], found: Mapping[str, Tensor], prefix: str = "") -> list[str]:
    """``"<prefix><key>: <found shape>, expected <expected shape>"`` for each key of both whose shapes differ."""
    return [
        f"{prefix}{key}: {tuple(value.shape)}, expected {tuple(expected[key].shape)}"
        for key, value in found.items()
        if key in expected and value.shape != expected[key].shape
    ]


def load_exactly(module: nn.Module, expected: Mapping[str, Tensor], found: Mapping[str, Tensor], what: str) -> None:
    """Load ``found`` into ``module`` (keys as in ``module.state_dict()``) only if it matches ``expected`` exactly.

    Raises:
        ValueError: naming the missing, unexpected and mis-shaped keys.
    """
    check_exact_match(expected, found, what)
    with torch.no_grad():
        targets = module.state_dict(keep_vars=True)
        for key, value in found.items():
            targets[key].copy_(value.to(device=targets[key].device, dtype=targets[key].dtype))


def read_twinloss_config(
    path: str | os.PathLike, subfolder: str | None, hub_arguments: Mapping[str, object]
) -> dict | None:
    file = resolve_file(path, TWINLOSS_CONFIG_NAME, subfolder, hub_arguments)
    if file is None:
        return None
    config = json.loads(Path(file).read_text())
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{TWINLOSS_CONFIG_NAME} has format_version {config.get('format_version')!r}; "
            f"this twinloss reads {FORMAT_VERSION}"
        )
    return config


def check_same_adapter(config: Mapping[str, object], adapted: nn.Module, what: str) -> None:
    """Raise ValueError unless ``adapted`` was built as the saved adapter of ``config`` (class, options, modules).

    The message names the adapter class if it differs and every option whose
    saved value differs from ``adapted``'s (an option only one side has counts
    as differing), so nothing is loaded onto a base that computes otherwise.
    """
    current = adapter_description(adapted)
    problems = []
    if config["adapter"] != current["adapter"]:
        problems.append(f"adapter class (saved {config['adapter']}, base {current['adapter']})")
    saved_options, options = config["options"], current["options"]
    absent = "<absent>"
    for name in sorted(set(saved_options) | set(options)):
        saved, base = saved_options.get(name, absent), options.get(name, absent)
        if saved != base:
            problems.append(f"{name} (saved {saved!r}, base {base!r})")
    if sorted(config["module_arguments"]) != current["module_arguments"]:
        problems.append(f"module arguments (saved {config['module_arguments']}, base {current['module_arguments']})")
    if problems:
        raise ValueError(
            f"{what} was saved from an adapter built otherwise than the base it is loaded onto: "
            f"{'; '.join(problems)}; adapt the base with the saved options"
        )


def _adapter_arguments(
    adapter_class: type, config: dict | None, given: dict[str, object]
) -> dict[str, object]:
    """The adapter's keyword arguments: the saved options, checked against what the caller gave."""
    if config is None:
        return given
    if config["adapter"] != adapter_qualname(adapter_class):
        raise ValueError(
            f"the checkpoint was saved from {config['adapter']}; load it with that class, "
            f"not {adapter_qualname(adapter_class)}"
        )
    arguments = dict(config["options"])
    for name, value in given.items():
        if name in config["module_arguments"] or name not in arguments:  # not saved: an older checkpoint
            arguments[name] = value
        elif _json_value(value) != arguments[name]:
            raise ValueError(
                f"{name}={value!r} contradicts the checkpoint, saved with {name}={arguments[name]!r}; "
                "leave it out to use the saved value"
            )
    absent = [name for name in config["module_arguments"] if name not in given]
    if absent:
        raise ValueError(
            f"the checkpoint's adapter takes modules {absent}; pass them (their architecture) to from_pretrained, "
            f"their weights are loaded from {EXTRAS_WEIGHTS_NAME}"
        )
    return arguments


class _UnusedWeightsFilter(logging.Filter):
    """Drops the stock loader's "weights ... were not used" warning: :func:`check_stock_load` names those keys."""

    def filter(self, record: logging.LogRecord) -> bool:
        return UNUSED_WEIGHTS_MESSAGE not in record.getMessage()


@contextlib.contextmanager
def holding_back_unused_weights_warning() -> Iterator[None]:
    """Within: no "weights ... were not used" warning from the stock loader (the caller checks those keys)."""
    unused_weights = _UnusedWeightsFilter()
    logger = logging.getLogger(STOCK_LOADER_LOGGER)
    logger.addFilter(unused_weights)
    try:
        yield
    finally:
        logger.removeFilter(unused_weights)


def _stock_class_of(path: str, subfolder: str | None, hub: Mapping[str, object]) -> type:
    """The diffusers class named by the checkpoint's ``config.json`` (what ``AutoModel`` would build).

    ``AutoModel.from_pretrained`` cannot return the stock loader's loading
    info, which :func:`check_stock_load` needs; the class's own loader can.
    """
    diffusers = require_diffusers()
    config_file = resolve_file(path, "config.json", subfolder, hub)
    if config_file is None:
        raise ValueError(f"found no config.json in {path!r} (subfolder {subfolder!r})")
    class_name = json.loads(Path(config_file).read_text()).get("_class_name")
    stock_class = getattr(diffusers, str(class_name), None)
    if not (isinstance(stock_class, type) and issubclass(stock_class, diffusers.ModelMixin)):
        raise ValueError(
            f"the config.json of {path!r} (subfolder {subfolder!r}) names class {class_name!r}, "
            "which is no diffusers model class"
        )
    return stock_class


def load_adapted(
    adapter_class: type,
    pretrained_model_name_or_path: str | os.PathLike,
    *,
    subfolder: str | None = None,
    **kwargs: object,
) -> nn.Module:
    """Load a stock or twinloss checkpoint into ``adapter_class`` (see the module docstring).

    ``kwargs`` naming arguments of ``adapter_class`` (``target_time``,
    ``sign``, ``connector``, ...) go to the adapter; the stock
    ``from_pretrained``'s (``torch_dtype``, ``variant``, ``revision``, ...,
    see ``STOCK_LOAD_ARGUMENTS``) go to it.

    Raises:
        ValueError: for an argument that is neither, a checkpoint of another
            adapter class, an option that contradicts the saved one, a missing
            module argument, twin or extra weights that are missing, partial,
            unexpected or mis-shaped, stock weights the checkpoint lacks or
            has mis-shaped, and checkpoint keys that nothing loads.
    """
    pretrained_model_name_or_path = os.fspath(pretrained_model_name_or_path)  # diffusers' AutoModel wants a str
    given, stock_arguments = split_load_arguments(adapter_class, kwargs)
    hub = hub_arguments(stock_arguments)
    config = read_twinloss_config(pretrained_model_name_or_path, subfolder, hub)
    arguments = _adapter_arguments(adapter_class, config, given)

    stock_class = _stock_class_of(pretrained_model_name_or_path, subfolder, hub)
    with holding_back_unused_weights_warning():
        transformer, loading_info = stock_class.from_pretrained(
            pretrained_model_name_or_path, subfolder=subfolder, output_loading_info=True, **stock_arguments
        )
    stock_modules = {name for name, _ in transformer.named_modules()}
    stock_keys = set(transformer.state_dict())
    adapted = adapter_class(transformer, **arguments)

    expected, prefixes = _added_weights(transformer, stock_modules, stock_keys, adapted)
    files = weight_files(pretrained_model_name_or_path, subfolder, stock_arguments.get("variant"), hub)
    saved_twin = read_tensors(files, prefixes)
    if config is not None or saved_twin:  # a stock checkpoint has neither: twin modules stay at zero
        load_exactly(adapted.transformer, expected, saved_twin, "the checkpoint's twin weights")
    check_stock_load(pretrained_model_name_or_path, stock_class, loading_info, placed=set(saved_twin))
    expected_extras = _external_extras(adapted)
    if config is not None and (expected_extras or config["extra_keys"]):
        extras_file = resolve_file(pretrained_model_name_or_path, EXTRAS_WEIGHTS_NAME, subfolder, hub)
        saved_extras = read_tensors([extras_file], ("",)) if extras_file is not None else {}
        load_exactly(adapted, expected_extras, saved_extras, f"the weights in {EXTRAS_WEIGHTS_NAME}")
    return adapted
