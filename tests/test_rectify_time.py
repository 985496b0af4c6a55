"""TwinFlowLoss(rectify_time=...): the law of the time ``s`` at which the rectification reads the velocity gap."""

import pytest
import torch
from torch.testing import assert_close

from twinloss import BetaTime, KumaraswamyTime, LogitNormalTime, ShiftedTime, TwinFlowLoss, toy
from twinloss.loss import CONDITIONED_RECTIFY_SHIFT, RELEASED_GUIDANCE, default_rectify_time
from twinloss.health import training_signals

from core_models import TinyVelocityNet
from default_loss import module_settings
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


def _step_on(loss_fn, model, x, y, null_y, seed, conditioned):
    """:func:`_step` on a batch passed with the labels ``y``, or with no conditioning at all."""
    if conditioned:
        return _step(loss_fn, model, x, y, null_y, seed)
    out = loss_fn(model, x, generator=torch.Generator().manual_seed(seed))
    out.loss.backward()
    model.zero_grad()
    return out, None


MIDDLE = {"guidance_scale": 0.2, "guidance_interval": (0.2, 0.7)}  # the default guidance, written out
DEFAULT_LAWS = {  # the default law of s, written out: (guidance settings, conditioned) -> law
    "unguided, conditioned: shifted towards the data": ({"guidance_scale": 0.0}, True, ShiftedTime(1 / 3)),
    "unguided, unconditioned: uniform": ({"guidance_scale": 0.0}, False, BetaTime(1.0, 1.0)),
    "guided on the middle, conditioned: shifted towards the data": (MIDDLE, True, ShiftedTime(1 / 3)),
    "guided to the noise end: logit-normal": (RELEASED_GUIDANCE, True, LogitNormalTime(0.0, 1.0)),
}
UNCONDITIONED_GUIDED_LAWS = {  # named only: a guided step needs the null conditioning, so no batch goes without one
    "guided on the middle, unconditioned: uniform": (MIDDLE, False, BetaTime(1.0, 1.0)),
    "guided to the noise end, unconditioned: logit-normal": (
        {"guidance_scale": 0.5, "guidance_interval": (0.2, 1.0)}, False, LogitNormalTime(0.0, 1.0)),
}


@pytest.mark.parametrize("case", sorted(DEFAULT_LAWS))
def test_only_the_rectification_changes_and_the_default_law_follows_the_guidance_and_the_conditioning(case):
    guidance, conditioned, law = DEFAULT_LAWS[case]
    torch.manual_seed(1)
    model = TinyVelocityNet((3,)).double()
    x, y, null_y = _data(batch=16, seed=1)

    def step(**kwargs):
        return _step_on(TwinFlowLoss(**guidance, **kwargs), model, x, y, null_y, 2, conditioned)[0]

    default, explicit, warped = step(), step(rectify_time=law), step(rectify_time=KumaraswamyTime(3.0))
    assert_close(explicit.loss, default.loss, rtol=0, atol=0)
    for name in ("base", "adv"):
        assert_close(warped.terms[name], default.terms[name], rtol=0, atol=0)
    assert (warped.terms["rectify"] - default.terms["rectify"]).abs() > 1e-6


def test_the_two_unguided_default_laws_give_different_rectifications_on_either_batch():
    """So the exact matches above tell which law each batch got."""
    torch.manual_seed(1)
    model = TinyVelocityNet((3,)).double()
    x, y, null_y = _data(batch=16, seed=1)
    for conditioned in (True, False):
        shifted, uniform = (
            _step_on(TwinFlowLoss(guidance_scale=0.0, rectify_time=law), model, x, y, null_y, 2, conditioned)[0]
            for law in (ShiftedTime(1 / 3), BetaTime()))
        assert (shifted.terms["rectify"] - uniform.terms["rectify"]).abs() > 1e-6
        assert_close(shifted.terms["base"], uniform.terms["base"], rtol=0, atol=0)


def test_the_default_law_is_named_by_default_rectify_time_and_an_explicit_law_is_kept():
    for guidance, conditioned, law in (DEFAULT_LAWS | UNCONDITIONED_GUIDED_LAWS).values():
        named = default_rectify_time(guidance["guidance_scale"], conditioned=conditioned,
                                     **({"guidance_interval": guidance["guidance_interval"]} if len(guidance) > 1 else {}))
        used = TwinFlowLoss(**guidance).rectify_law(conditioned=conditioned)
        for got in (named, used):
            assert type(got) is type(law) and module_settings(got) == module_settings(law), (guidance, conditioned, got)
    # guidance up to the noise end: the logit-normal law, whatever the conditioning
    assert default_rectify_time(4.0, conditioned=False, guidance_interval=(0.0, 1.0)).mean == 0.0
    assert TwinFlowLoss().rectify_time is None  # None: the law follows each batch
    assert CONDITIONED_RECTIFY_SHIFT == 1 / 3
    uniform = BetaTime()
    kept = TwinFlowLoss(guidance_scale=0.0, rectify_time=uniform)  # the authors' draw on every batch
    assert kept.rectify_time is uniform
    assert kept.rectify_law(conditioned=True) is uniform and kept.rectify_law(conditioned=False) is uniform


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
    loss_fn = TwinFlowLoss(rectify_time=law, **RELEASED_GUIDANCE)
    loss_fn(model, x, cond={"y": y}, uncond={"y": null_y}, generator=torch.Generator().manual_seed(0))
    assert law.draws == [4]  # one s per one-step row (quarters of 16)
    law.draws.clear()
    training_signals(loss_fn, model, x, cond={"y": y}, uncond={"y": null_y}, generator=torch.Generator().manual_seed(0))
    assert law.draws and set(law.draws) == {4}
