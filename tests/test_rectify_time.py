"""TwinFlowLoss(rectify_time=...): the law of the time ``s`` at which the rectification reads the velocity gap."""

import pytest
import torch
from torch.testing import assert_close

from twinloss import BetaTime, KumaraswamyTime, LogitNormalTime, TwinFlowLoss, toy
from twinloss.loss import default_rectify_time
from twinloss.health import training_signals

from core_models import TinyVelocityNet
from reference import barron, reference_step
from test_guidance_groups import _data, _step


def test_a_warped_rectify_time_matches_float64_reference_in_value_and_gradient():
    torch.manual_seed(0)
    model = TinyVelocityNet((3,)).double()
    x, y, null_y = _data(batch=16)
    a, b, c = 2.0, 3.0, 0.5

    def kumaraswamy(u):  # s = (1 - (1 - u^a)^b)^c, u uniform, written out here independently
        return (1 - (1 - u**a) ** b) ** c

    loss_fn = TwinFlowLoss(rectify_time=KumaraswamyTime(a, b, c), rectify_weight=1.0)
    out, grads = _step(loss_fn, model, x, y, null_y, seed=4)
    expected, gap, _ = reference_step(model, x, y, null_y, seed=4, rectify_weight=1.0, distance=barron,
                                      rectify_draw=lambda n, dtype, g: kumaraswamy(torch.rand(n, dtype=dtype, generator=g)))
    expected.backward()
    assert_close(out.loss, expected, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, [p.grad for p in model.parameters()], strict=True):
        assert_close(got, want, rtol=1e-9, atol=1e-12)
    _, uniform_gap, _ = reference_step(model, x, y, null_y, seed=4, rectify_weight=1.0, distance=barron,
                                       rectify_draw=lambda n, dtype, g: torch.rand(n, dtype=dtype, generator=g))
    assert (gap - uniform_gap).abs().max() > 1e-3  # the law changes the gap, so the test can tell the two apart


@pytest.mark.parametrize("guidance_scale,law", [(0.0, BetaTime(1.0, 1.0)), (0.5, LogitNormalTime(0.0, 1.0))],
                         ids=["unguided: uniform", "guided: logit-normal"])
def test_only_the_rectification_changes_and_the_default_law_follows_the_guidance(guidance_scale, law):
    torch.manual_seed(1)
    model = TinyVelocityNet((3,)).double()
    x, y, null_y = _data(batch=16, seed=1)
    default, _ = _step(TwinFlowLoss(guidance_scale=guidance_scale), model, x, y, null_y, seed=2)
    explicit, _ = _step(TwinFlowLoss(guidance_scale=guidance_scale, rectify_time=law), model, x, y, null_y, seed=2)
    warped, _ = _step(TwinFlowLoss(guidance_scale=guidance_scale, rectify_time=KumaraswamyTime(3.0)),
                      model, x, y, null_y, seed=2)
    assert_close(explicit.loss, default.loss, rtol=0, atol=0)
    for name in ("base", "adv"):
        assert_close(warped.terms[name], default.terms[name], rtol=0, atol=0)
    assert (warped.terms["rectify"] - default.terms["rectify"]).abs() > 1e-6


def test_the_default_law_is_named_by_default_rectify_time_and_an_explicit_law_is_kept():
    for guidance_scale, kind in ((0.0, BetaTime), (0.5, LogitNormalTime), (4.0, LogitNormalTime)):
        law = TwinFlowLoss(guidance_scale=guidance_scale).rectify_time
        assert type(law) is kind and type(default_rectify_time(guidance_scale)) is kind
    assert (law.mean, law.std) == (0.0, 1.0)
    unguided = TwinFlowLoss(guidance_scale=0.0).rectify_time
    assert (unguided.alpha, unguided.beta) == (1.0, 1.0)
    uniform = BetaTime()
    assert TwinFlowLoss(rectify_time=uniform).rectify_time is uniform  # the authors' draw with guidance


def test_a_rectify_time_without_a_rectification_is_refused_naming_it():
    with pytest.raises(ValueError, match="rectify_time"):
        TwinFlowLoss(rectify_time=BetaTime(2.0, 2.0), rectify_weight=0.0)
    for factory in (TwinFlowLoss.rcgm, TwinFlowLoss.plain_flow_matching):
        with pytest.raises(ValueError, match="rectify_time"):
            factory(rectify_time=BetaTime(2.0, 2.0))


class RecordingTime(BetaTime):
    """The uniform law, recording how many times each draw asks for."""

    def __init__(self):
        super().__init__()
        self.draws: list[int] = []

    def sample(self, batch_size, device, dtype, generator):
        self.draws.append(batch_size)
        return super().sample(batch_size, device, dtype, generator)


def test_the_loss_and_the_health_signals_draw_the_rectify_times_from_the_same_law():
    torch.manual_seed(0)
    model = toy.TimeMLP((3,), width=16, depth=2, num_classes=4)
    x, y, null_y = _data(batch=16, dtype=torch.float32)
    law = RecordingTime()
    loss_fn = TwinFlowLoss(rectify_time=law)
    loss_fn(model, x, cond={"y": y}, uncond={"y": null_y}, generator=torch.Generator().manual_seed(0))
    assert law.draws == [4]  # one s per one-step row
    law.draws.clear()
    training_signals(loss_fn, model, x, cond={"y": y}, uncond={"y": null_y}, generator=torch.Generator().manual_seed(0))
    assert law.draws and set(law.draws) == {4}
