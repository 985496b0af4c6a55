"""diffusers and peft are optional: imported lazily, with errors naming the extra."""

import os
import re
import subprocess
import sys

import pytest

from twinloss_adapters import _imports


def test_every_adapter_module_imports_without_loading_diffusers() -> None:
    code = (
        "import importlib, pkgutil, sys\n"
        "import twinloss_adapters\n"
        "names = [m.name for m in pkgutil.iter_modules(twinloss_adapters.__path__)]\n"
        "assert {'sana', 'hunyuan_video', 'lora'} <= set(names), names\n"
        "for name in names: importlib.import_module(f'twinloss_adapters.{name}')\n"
        "print(sorted(m for m in ('diffusers', 'peft') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("require", "module", "extra"),
    [(_imports.require_diffusers, "diffusers", "twinloss[adapters]"), (_imports.require_peft, "peft", "twinloss[peft]")],
)
def test_missing_extra_names_the_pip_extra(require, module: str, extra: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(ImportError, match=re.escape(f"pip install {extra}")):
        require()
