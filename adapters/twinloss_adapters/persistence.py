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
that are missing, partial, unexpected or mis-shaped raise ``ValueError``
naming them.
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
    "load_adapted",
    "load_exactly",
    "mis_shaped_keys",
    "read_twinloss_config",
    "save_adapted",
    "split_construction_arguments",
    "write_twinloss_config",
]

TWINLOSS_CONFIG_NAME = "twinloss_config.json"
EXTRAS_WEIGHTS_NAME = "twinloss_extras.safetensors"
FORMAT_VERSION = 1
TRANSFORMER_PREFIX = "transformer."
STOCK_LOADER_LOGGER = "diffusers.models.modeling_utils"
UNUSED_WEIGHTS_MESSAGE = "were not used when initializing"
HUB_ARGUMENTS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision")


def hub_arguments(kwargs: Mapping[str, object]) -> dict[str, object]:
    """The ``from_pretrained`` keyword arguments in ``kwargs`` that also locate a checkpoint's files."""
    return {name: kwargs[name] for name in HUB_ARGUMENTS if name in kwargs}


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
            only; upload the directory once saved) or an adapter argument
            that cannot be stored.
    """
    from safetensors.torch import save_file

    if kwargs.get("push_to_hub"):
        raise ValueError(
            "push_to_hub=True would upload only the stock transformer files, not twinloss_config.json; "
            "save, then upload the whole directory (huggingface_hub.upload_folder)"
        )
    description = adapter_description(adapted)  # before writing anything: an unstorable argument raises here
    adapted.transformer.save_pretrained(save_directory, **kwargs)
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
        if name in config["module_arguments"]:
            arguments[name] = value
        elif name in arguments and _json_value(value) != arguments[name]:
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


class _UnusedWeightsReport(logging.Filter):
    """Holds back the stock loader's "weights ... were not used" warning until the twin keys are loaded."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if UNUSED_WEIGHTS_MESSAGE in record.getMessage():
            self.records.append(record)
            return False
        return True

    def release(self, consumed: set[str]) -> None:
        """Re-log each held warning for the keys not in ``consumed`` (all of it if it cannot be parsed)."""
        logger = logging.getLogger(STOCK_LOADER_LOGGER)
        for record in self.records:
            head, _, listing = record.getMessage().partition("\n")
            keys = [key for key in listing.strip().strip("[]'").split(", ") if key]
            if not keys:
                logger.handle(record)
                continue
            left = [key for key in keys if key not in consumed]
            if left:
                logger.warning(f"{head} {left}")


@contextlib.contextmanager
def _holding_unused_weights_warning() -> Iterator[_UnusedWeightsReport]:
    report = _UnusedWeightsReport()
    logger = logging.getLogger(STOCK_LOADER_LOGGER)
    logger.addFilter(report)
    try:
        yield report
    finally:
        logger.removeFilter(report)


def load_adapted(
    adapter_class: type,
    pretrained_model_name_or_path: str | os.PathLike,
    *,
    subfolder: str | None = None,
    **kwargs: object,
) -> nn.Module:
    """Load a stock or twinloss checkpoint into ``adapter_class`` (see the module docstring).

    ``kwargs`` naming arguments of ``adapter_class`` (``target_time``,
    ``sign``, ``connector``, ...) go to the adapter; the rest go to the stock
    ``from_pretrained`` (``torch_dtype``, ``variant``, ``revision``, ...).

    Raises:
        ValueError: for a checkpoint of another adapter class, an option that
            contradicts the saved one, a missing module argument, or twin or
            extra weights that are missing, partial, unexpected or mis-shaped.
    """
    pretrained_model_name_or_path = os.fspath(pretrained_model_name_or_path)  # diffusers' AutoModel wants a str
    constructor = inspect.signature(adapter_class.__init__).parameters
    adapter_names = [name for name in constructor if name not in ("self", "transformer")]
    given = {name: kwargs.pop(name) for name in adapter_names if name in kwargs}
    hub = hub_arguments(kwargs)
    config = read_twinloss_config(pretrained_model_name_or_path, subfolder, hub)
    arguments = _adapter_arguments(adapter_class, config, given)

    with _holding_unused_weights_warning() as unused_weights:
        transformer = require_diffusers().AutoModel.from_pretrained(
            pretrained_model_name_or_path, subfolder=subfolder, **kwargs
        )
    stock_modules = {name for name, _ in transformer.named_modules()}
    stock_keys = set(transformer.state_dict())
    adapted = adapter_class(transformer, **arguments)

    expected, prefixes = _added_weights(transformer, stock_modules, stock_keys, adapted)
    files = weight_files(pretrained_model_name_or_path, subfolder, kwargs.get("variant"), hub)
    saved_twin = read_tensors(files, prefixes)
    if config is not None or saved_twin:  # a stock checkpoint has neither: twin modules stay at zero
        load_exactly(adapted.transformer, expected, saved_twin, "the checkpoint's twin weights")
    unused_weights.release(consumed=set(saved_twin))
    expected_extras = _external_extras(adapted)
    if config is not None and (expected_extras or config["extra_keys"]):
        extras_file = resolve_file(pretrained_model_name_or_path, EXTRAS_WEIGHTS_NAME, subfolder, hub)
        saved_extras = read_tensors([extras_file], ("",)) if extras_file is not None else {}
        load_exactly(adapted, expected_extras, saved_extras, f"the weights in {EXTRAS_WEIGHTS_NAME}")
    return adapted
