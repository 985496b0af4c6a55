"""The rectification-gap measurement of ``benchmarks/quality/anatomy.py`` on models whose answer is known."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "quality"))
import anatomy  # noqa: E402
import curves  # noqa: E402

from twinloss import toy  # noqa: E402


def bench_for(model: torch.nn.Module, count: int = 64) -> curves.Bench:
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (count,), generator=generator)
    return curves.Bench(
        pretrained=model, draw=None, generator=generator, noise=torch.randn(count, 1, 4, 4, generator=generator),
        cond={"y": labels}, uncond={"y": torch.full_like(labels, 3)}, score=None, floor={},
    )


def test_a_twin_blind_model_has_no_gap_to_its_own_field_and_the_guidance_term_as_gap_to_the_unguided_one():
    torch.manual_seed(0)
    model = toy.TimeMLP((1, 4, 4), width=32, depth=2, num_classes=3)  # starts blind to the sign of t
    gap = anatomy.rectification_gap(model, bench_for(model), scale=0.5)
    assert gap["gap_to_guided_field"] == 0.0
    assert gap["guidance_term"] > 1e-4
    # F(y, -s) = F_c, so F(y, -s) - [(1 - w) F_c + w F_u] = w (F_c - F_u): the same mean square.
    assert gap["gap_to_unguided_field"] == pytest.approx(gap["guidance_term"], rel=1e-5)


def test_a_fake_field_that_differs_from_the_real_one_shows_a_gap():
    torch.manual_seed(0)
    model = toy.TimeMLP((1, 4, 4), width=32, depth=2, num_classes=3)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))  # the sign embedding moves off zero too
    assert anatomy.rectification_gap(model, bench_for(model))["gap_to_guided_field"] > 1e-4
