"""The variants of ``benchmarks/quality/guidance.py``: each still evaluates a step, with the law of ``s`` it ran with."""

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "quality"))
import guidance  # noqa: E402

from twinloss import BetaTime, toy  # noqa: E402

from default_loss import module_settings  # noqa: E402


@pytest.mark.parametrize("name", sorted(guidance.VARIANTS))
def test_each_variant_evaluates_a_step_with_gradients_and_its_stored_law_of_s(name):
    torch.manual_seed(0)
    model = toy.TimeMLP((3,), width=16, depth=2, num_classes=4)
    loss = guidance.VARIANTS[name](copy.deepcopy(model))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 3, generator=g), torch.randint(0, 4, (16,), generator=g)
    out = loss(model, x, cond={"y": y}, uncond={"y": torch.full_like(y, 4)}, generator=g)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())
    if loss.rectify_weight > 0:  # every run stored here drew the uniform s, whatever the default is now
        assert loss.rectify_time is guidance.UNIFORM_S
        assert type(guidance.UNIFORM_S) is BetaTime and module_settings(guidance.UNIFORM_S) == {"alpha": 1, "beta": 1}
