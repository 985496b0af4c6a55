"""The adapter tests need the optional extras; without them they are skipped, not failed."""

import importlib.util

_missing_diffusers = importlib.util.find_spec("diffusers") is None
_missing_peft = importlib.util.find_spec("peft") is None

collect_ignore_glob = ["test_*.py"] if _missing_diffusers else (["test_lora.py"] if _missing_peft else [])
