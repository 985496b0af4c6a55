"""The variants of ``benchmarks/quality/early.py``: the unguided default loss with a warm-up or a partition only."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "quality"))
import balance  # noqa: E402
from common import BenchmarkLoss  # noqa: E402
import curves  # noqa: E402
import early  # noqa: E402
import guidance  # noqa: E402

from twinloss import BarronDistance, L2Distance, toy  # noqa: E402
from twinloss.loss import default_shares  # noqa: E402

from default_loss import assert_default_loss_except, module_settings  # noqa: E402


def test_the_partitions_give_the_shares_their_names_say():
    assert early.FAKE_EIGHTH == balance.BALANCES["fake share 1/8"] == default_shares(0.0)
    third = early.ONE_STEP_THIRD
    assert third.one_step == pytest.approx(1 / 3) and third.fake == pytest.approx(1 / 8)
    assert third.multi_step == third.any_step == pytest.approx((1 - 1 / 3 - 1 / 8) / 2)


@pytest.mark.parametrize("name", sorted(early.VARIANTS))
def test_each_variant_is_the_unguided_default_loss_with_its_partition_warm_up_or_rectification_only(name):
    loss = early.VARIANTS[name](None)
    assert isinstance(loss, BenchmarkLoss) and loss.guidance_scale == 0.0
    third = "1/3" in name
    assert loss.trajectory.shares == (early.ONE_STEP_THIRD if third else early.FAKE_EIGHTH)
    assert isinstance(loss, early.RectificationWarmUp) == ("warm" in name)
    l2 = name.startswith("TwinFlow w 0, l2 rectification weight ")
    assert isinstance(loss, guidance.RectificationDistance) == (l2 or "gap-scaled" in name)
    assert isinstance(loss, early.GapScaledRectification) == ("gap-scaled" in name)
    if l2:
        assert isinstance(loss.rectify_distance, L2Distance)
        assert loss.rectify_weight == float(name.removeprefix("TwinFlow w 0, l2 rectification weight "))
    scaled = "gap-scaled" in name
    clean = "s clean" in name  # the twelfth round's conditioned default law, written out; the rest the uniform s
    assert loss.rectify_time is (early.S_CLEAN if clean else early.UNIFORM_S)
    assert module_settings(early.UNIFORM_S) == {"alpha": 1, "beta": 1}
    assert module_settings(early.S_CLEAN) == {"shift": 1 / 3, "base": {"alpha": 1, "beta": 1}}
    assert_default_loss_except(loss, "guidance_scale", "rectify_time", *(("shares",) if third else ()), *(("rectify_weight",) if l2 else ()),
                               *(("rectify_distance",) if l2 or scaled else ()))
    assert len({curves.slug(other) for other in early.VARIANTS}) == len(early.VARIANTS)


def _step(loss: BenchmarkLoss, model: torch.nn.Module, seed: int) -> torch.Tensor:
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(100 + seed))
    return loss(model, x, generator=torch.Generator().manual_seed(seed)).loss


def test_the_warm_up_ramps_the_rectification_weight_linearly_then_holds_it():
    model = toy.TimeMLP((2,), width=8, depth=1)
    with torch.no_grad():  # a fake field apart from the real one, so the rectification term is not zero
        for parameter in model.time.twin.parameters():
            parameter.normal_(generator=torch.Generator().manual_seed(0))
    warm = early.RectificationWarmUp(4, guidance_scale=0.0)
    for call in range(1, 7):
        weight = 0.5 * min(1.0, call / 4)
        assert torch.equal(_step(warm, model, call), _step(BenchmarkLoss(guidance_scale=0.0, rectify_weight=weight), model, call))
        assert warm.rectify_weight == weight and warm.full_rectify_weight == 0.5
    assert not torch.equal(_step(early.RectificationWarmUp(4, guidance_scale=0.0), model, 1), _step(BenchmarkLoss(guidance_scale=0.0), model, 1))
    with pytest.raises(ValueError, match="warmup must be at least 1"):
        early.RectificationWarmUp(0)


def test_the_gap_scaled_distance_is_barron_times_the_detached_mean_rms_gap_over_the_reference():
    generator = torch.Generator().manual_seed(0)
    prediction = torch.randn(5, 3, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    gap = torch.randn(5, 3, 4, dtype=torch.float64, generator=generator).clamp(-1, 1)
    target = prediction.detach() - gap
    scaled = early._GapScaled(BarronDistance(), reference=0.25)(prediction, target)
    scale = sum(row.square().mean().sqrt() for row in gap) / 5 / 0.25  # written out row by row
    barron = BarronDistance()(prediction, target)
    torch.testing.assert_close(scaled, barron * scale)
    (grad,) = torch.autograd.grad(scaled.sum(), prediction)
    (expected,) = torch.autograd.grad((barron * scale).sum(), prediction)
    torch.testing.assert_close(grad, expected)  # the scale is a constant to the gradient
    assert early.GapScaledRectification().rectify_distance.reference == early.REFERENCE_GAP
