"""Lazy imports of the optional heavy dependencies, with errors naming the extra."""

import importlib
from types import ModuleType

__all__ = ["require_diffusers", "require_peft"]


def _require(module_name: str, extra: str, purpose: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(
            f"{purpose} needs the `{module_name}` package; install it with "
            f"`pip install twinloss[{extra}]`"
        ) from error


def require_diffusers() -> ModuleType:
    """Import ``diffusers`` or raise an ImportError that names ``twinloss[adapters]``."""
    return _require("diffusers", "adapters", "twinloss_adapters (diffusers backbones)")


def require_peft() -> ModuleType:
    """Import ``peft`` or raise an ImportError that names ``twinloss[peft]``."""
    return _require("peft", "peft", "twinloss_adapters.lora (LoRA training)")
