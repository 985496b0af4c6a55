"""diffusers and peft are optional: imported lazily, with errors naming the extra."""

import os
import re
import subprocess
import sys

import pytest

from twinloss_adapters import _imports


def test_backbone_modules_import_without_loading_diffusers() -> None:
    code = (
        "import sys\n"
        "import twinloss_adapters, twinloss_adapters.sana, twinloss_adapters.wan, twinloss_adapters.lora\n"
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
