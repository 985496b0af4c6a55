"""Which backbone module adapts a given stock diffusers transformer.

Each backbone module names its stock class in a ``_stock_class()`` function;
:func:`adapter_module_for` reads them, so a new backbone module is found
without a table to keep in step. Used only on an error path (a stock model
passed where an adapted one belongs), so importing every module is fine there.
"""

import importlib
import pkgutil

__all__ = ["adapter_module_for"]


def adapter_module_for(transformer: object) -> str | None:
    """The name of the ``twinloss_adapters`` module whose ``adapt`` takes ``transformer``'s class, or ``None``."""
    import twinloss_adapters

    for info in pkgutil.iter_modules(twinloss_adapters.__path__):
        if info.name.startswith("_"):
            continue
        try:
            module = importlib.import_module(f"twinloss_adapters.{info.name}")
            stock_class = getattr(module, "_stock_class", None)
            if stock_class is not None and type(transformer) is stock_class():
                return info.name
        except ImportError:  # an optional dependency of that backbone is missing
            continue
    return None
