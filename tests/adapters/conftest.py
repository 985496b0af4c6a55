"""Tests that need the optional extras are skipped without them, not failed.

The generic injection, time conventions and lazy-import tests need only torch.
"""

import importlib.util

NEEDS_DIFFUSERS = ["test_backbones.py", "test_loss_steps.py", "test_packing.py", "test_variants.py", "test_lora.py"]
NEEDS_DIFFUSERS += ["test_scheduler.py", "test_pipelines.py", "test_flow_map.py"]
NEEDS_PEFT = ["test_lora.py"]

collect_ignore = []
if importlib.util.find_spec("diffusers") is None:
    collect_ignore += NEEDS_DIFFUSERS
if importlib.util.find_spec("peft") is None:
    collect_ignore += NEEDS_PEFT
