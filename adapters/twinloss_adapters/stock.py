"""Which backbone module adapts a given stock diffusers transformer.

Each backbone module names its stock class in a ``_stock_class()`` function;
:func:`adapter_modules_for` reads them, so a new backbone module is found
without a table to keep in step. Used only on an error path (a stock model
passed where an adapted one belongs), so importing every module is fine there.
"""

import importlib
import pkgutil

__all__ = ["adapter_modules_for"]


def adapter_modules_for(transformer: object) -> list[str]:
    """The names of the ``twinloss_adapters`` modules whose ``adapt`` takes ``transformer``'s class.

    Several can: SANA's class is adapted by ``sana`` and by ``openuni``,
    Qwen-Image's by ``qwen_image`` and ``qwen_image_edit``.
    """
    import twinloss_adapters

    names = []
    for info in pkgutil.iter_modules(twinloss_adapters.__path__):
        if info.name.startswith("_"):
            continue
        try:
            module = importlib.import_module(f"twinloss_adapters.{info.name}")
            stock_class = getattr(module, "_stock_class", None)
            if stock_class is not None and type(transformer) is stock_class():
                names.append(info.name)
        except ImportError:  # an optional dependency of that backbone is missing
            continue
    return names
