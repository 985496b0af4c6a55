"""The variants of ``benchmarks/quality/split_variants.py``: the guided default loss with one thing changed."""

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "quality"))
import curves  # noqa: E402
from common import BenchmarkLoss  # noqa: E402
import split_variants  # noqa: E402

from twinloss import (  # noqa: E402
    BarronDistance, EMATeacher, FrozenTeacher, GroupShares, L2Distance, LogitNormalTime, OnlineTeacher, PowerFunctionDecay,
    ShiftedTime, WeightAverage,
)
from twinloss.teachers import MovingAverageTeacher  # noqa: E402
from twinloss.loss import UNGUIDED_SHARES, default_rectify_time  # noqa: E402
from twinloss.trajectory import TrajectorySampler  # noqa: E402

from default_loss import assert_default_loss_except, module_settings  # noqa: E402

CHANGED = {
    "TwinFlow defaults, l2 rectification weight 2": ("rectify_distance", "rectify_weight"),
    "TwinFlow defaults, rectify weight 0.25": ("rectify_weight",),
    "TwinFlow defaults, no rectification": ("rectify_weight",),
    "TwinFlow defaults, fake times from s": (),
    "TwinFlow w 0, fake times from s": ("guidance_scale",),
    "TwinFlow defaults, twin share 1/3, default law of s": ("shares",),
    "TwinFlow defaults, twin share 1/3, fake times from s": ("shares",),
    "TwinFlow defaults at w 0.2": ("guidance_scale",),
    "TwinFlow defaults, extra fake rows": ("fake_rows",),
    "TwinFlow w 0, extra fake rows": ("guidance_scale", "fake_rows"),
    "TwinFlow defaults, extra fake rows, fake times from s": ("fake_rows",),
    "TwinFlow defaults, extra fake rows, no rectification": ("fake_rows", "rectify_weight"),
    "TwinFlow defaults, guidance interval (0.2, 0.7), unguided partition and law of s":
        ("guidance_interval", "shares", "rectify_time"),
    "TwinFlow defaults, guidance interval (0.2, 0.7), unguided partition": ("guidance_interval", "shares"),
    "TwinFlow defaults, guidance interval (0.2, 0.7), unguided law of s": ("guidance_interval", "rectify_time"),
    "TwinFlow defaults at w 0.2, guidance interval (0.2, 0.7), unguided partition and law of s":
        ("guidance_scale", "guidance_interval", "shares", "rectify_time"),
    "TwinFlow defaults at w 0.2, guidance interval (0.2, 0.7), unguided partition and law of s, extra fake rows":
        ("guidance_scale", "guidance_interval", "shares", "rectify_time", "fake_rows"),
}
RCGM_VARIANT = "RCGM only, defaults, one-step half"
RCGM_SMALLER_SCALE = "RCGM only, defaults at w 0.2"
SETTING_PAIRS = {
    ("TwinFlow defaults at w 0.2", RCGM_SMALLER_SCALE): {"guidance_scale": 0.2},
    ("TwinFlow defaults, data guidance difference", "RCGM only, defaults, data guidance difference"):
        {"guidance_difference": "data"},
    ("TwinFlow defaults, data guidance difference at w 1/3", "RCGM only, defaults, data guidance difference at w 1/3"):
        {"guidance_difference": "data", "guidance_scale": 1 / 3},
    ("TwinFlow defaults, guidance interval (0.2, 0.7)", "RCGM only, defaults, guidance interval (0.2, 0.7)"):
        {"guidance_interval": (0.2, 0.7)},
    ("TwinFlow defaults, guidance interval (0, 0.7)", "RCGM only, defaults, guidance interval (0, 0.7)"):
        {"guidance_interval": (0.0, 0.7)},
    ("TwinFlow defaults, guidance interval (0.2, 1)", "RCGM only, defaults, guidance interval (0.2, 1)"):
        {"guidance_interval": (0.2, 1.0)},
    ("TwinFlow defaults, data guidance difference at w 1/3, guidance interval (0.2, 0.7)",
     "RCGM only, defaults, data guidance difference at w 1/3, guidance interval (0.2, 0.7)"):
        {"guidance_difference": "data", "guidance_scale": 1 / 3, "guidance_interval": (0.2, 0.7)},
    ("TwinFlow defaults, balanced guidance feedback", "RCGM only, defaults, balanced guidance feedback"):
        {"balance_guidance_feedback": True},
    ("TwinFlow defaults, balanced guidance feedback at w 1/3", "RCGM only, defaults, balanced guidance feedback at w 1/3"):
        {"balance_guidance_feedback": True, "guidance_scale": 1 / 3},
    ("TwinFlow defaults, guidance on any-step rows", "RCGM only, defaults, guidance on any-step rows"):
        {"guidance_groups": ("any_step",)},
    ("TwinFlow defaults, guidance on multi-step rows", "RCGM only, defaults, guidance on multi-step rows"):
        {"guidance_groups": ("multi_step",)},
    ("TwinFlow defaults, multi-step rows guided by the data difference at w 1/3",
     "RCGM only, defaults, multi-step rows guided by the data difference at w 1/3"):
        {"guidance_groups": ("multi_step",), "guidance_difference": "data", "guidance_scale": 1 / 3},
}
"""TwinFlow and RCGM-only variants that change one setting of both defaults alike, with the setting."""
RCGM_SETTINGS = {
    "RCGM only, defaults at w 0.2, guidance interval (0.2, 0.7)": {"guidance_scale": 0.2, "guidance_interval": (0.2, 0.7)},
}
"""RCGM-only variants that are the ablation of a TwinFlow variant which also changes settings RCGM-only does not have
(the fake share, the rectification's law of ``s``), with the settings they change from ``TwinFlowLoss.rcgm()``."""
TWIN_ONLY_SETTINGS = {
    "TwinFlow defaults, twin terms on labelled rows": {"twin_rows": "conditioned"},
    "TwinFlow defaults, balanced guidance feedback at w 1/3, twin terms on labelled rows":
        {"balance_guidance_feedback": True, "guidance_scale": 1 / 3, "twin_rows": "conditioned"},
}
"""TwinFlow variants of a setting that only the twin terms have (their RCGM-only counterpart is the pair without
it), with the settings they change from ``TwinFlowLoss()``."""
TEACHER_VARIANTS = {
    "TwinFlow defaults, frozen guidance teacher": BenchmarkLoss,
    "RCGM only, defaults, frozen guidance teacher": BenchmarkLoss.rcgm,
    "TwinFlow defaults, extra fake rows, frozen guidance teacher": lambda: BenchmarkLoss(fake_rows="added"),
    "TwinFlow defaults, average as guidance teacher": BenchmarkLoss,
    "RCGM only, defaults, average as guidance teacher": BenchmarkLoss.rcgm,
    "TwinFlow defaults, data guidance difference at w 1/3, frozen guidance teacher": lambda: BenchmarkLoss(
        guidance_difference="data", guidance_scale=1 / 3),
    "TwinFlow defaults, any-step rows guided by the frozen teacher": lambda: BenchmarkLoss(guidance_groups=("any_step",)),
    "RCGM only, defaults, any-step rows guided by the frozen teacher": lambda: BenchmarkLoss.rcgm(
        guidance_groups=("any_step",)),
    "TwinFlow defaults, multi-step rows guided by the frozen teacher": lambda: BenchmarkLoss(
        guidance_groups=("multi_step",)),
    "RCGM only, defaults, multi-step rows guided by the frozen teacher": lambda: BenchmarkLoss.rcgm(
        guidance_groups=("multi_step",)),
}
"""The variants that change what evaluates the guidance pass, each with the loss it otherwise equals."""
EMA_VARIANTS = {
    "TwinFlow defaults, EMA teacher 0.99": (BenchmarkLoss, 0.99, "ema"),
    "RCGM only, defaults, EMA teacher 0.99": (BenchmarkLoss.rcgm, 0.99, "ema"),
    "TwinFlow defaults, EMA teacher 0.999": (BenchmarkLoss, 0.999, "ema"),
    "RCGM only, defaults, EMA teacher 0.999": (BenchmarkLoss.rcgm, 0.999, "ema"),
    "TwinFlow w 0, RCGM chain on an EMA 0.99": (lambda: BenchmarkLoss(guidance_scale=0.0), 0.99, "ema"),
    "RCGM only w 0, RCGM chain on an EMA 0.99": (lambda: BenchmarkLoss.rcgm(guidance_scale=0.0), 0.99, "ema"),
    "TwinFlow defaults, RCGM chain on an EMA 0.99, frozen guidance teacher": (BenchmarkLoss, 0.99, "frozen"),
    "RCGM only, defaults, RCGM chain on an EMA 0.99, frozen guidance teacher": (BenchmarkLoss.rcgm, 0.99, "frozen"),
    "TwinFlow defaults, RCGM chain on an EMA 0.99, online guidance teacher": (BenchmarkLoss, 0.99, "online"),
    "RCGM only, defaults, RCGM chain on an EMA 0.99, online guidance teacher": (BenchmarkLoss.rcgm, 0.99, "online"),
    "TwinFlow defaults, RCGM chain on an EMA 0.9, online guidance teacher": (BenchmarkLoss, 0.9, "online"),
    "RCGM only, defaults, RCGM chain on an EMA 0.9, online guidance teacher": (BenchmarkLoss.rcgm, 0.9, "online"),
    "TwinFlow w 0, RCGM chain on an EMA 0.9": (lambda: BenchmarkLoss(guidance_scale=0.0), 0.9, "ema"),
    "RCGM only w 0, RCGM chain on an EMA 0.9": (lambda: BenchmarkLoss.rcgm(guidance_scale=0.0), 0.9, "ema"),
}
"""The variants whose RCGM chain reads an EMA of the online weights, each with the loss it otherwise equals, the
EMA's target decay and what its guidance pass reads: the same EMA, the online model or the pretrained weights."""


GROUP_CHAIN_VARIANTS = {
    "TwinFlow defaults, one-step chain on an EMA 0.99": (BenchmarkLoss, split_variants.ONE_STEP_CHAIN),
    "RCGM only, defaults, one-step chain on an EMA 0.99": (BenchmarkLoss.rcgm, split_variants.ONE_STEP_CHAIN),
    "TwinFlow w 0, one-step chain on an EMA 0.99": (lambda: BenchmarkLoss(guidance_scale=0.0),
                                                     split_variants.ONE_STEP_CHAIN),
    "RCGM only w 0, one-step chain on an EMA 0.99": (lambda: BenchmarkLoss.rcgm(guidance_scale=0.0),
                                                      split_variants.ONE_STEP_CHAIN),
    "TwinFlow defaults, multi-step chain on an EMA 0.99": (BenchmarkLoss, split_variants.MULTI_STEP_CHAIN),
    "RCGM only, defaults, multi-step chain on an EMA 0.99": (BenchmarkLoss.rcgm, split_variants.MULTI_STEP_CHAIN),
    "TwinFlow defaults, any-step chain on an EMA 0.99": (BenchmarkLoss, split_variants.ANY_STEP_CHAIN),
    "RCGM only, defaults, any-step chain on an EMA 0.99": (BenchmarkLoss.rcgm, split_variants.ANY_STEP_CHAIN),
}
CLASS_DIRECTION_VARIANTS = {
    "TwinFlow defaults, RCGM chain on an EMA 0.99, online class direction": (BenchmarkLoss, "online"),
    "RCGM only, defaults, RCGM chain on an EMA 0.99, online class direction": (BenchmarkLoss.rcgm, "online"),
    "TwinFlow defaults, RCGM chain online, class direction from an EMA 0.99": (BenchmarkLoss, "average"),
    "RCGM only, defaults, RCGM chain online, class direction from an EMA 0.99": (BenchmarkLoss.rcgm, "average"),
}
"""The variants whose chain reads the unconditional field and the class direction from different weights, with the
loss they otherwise equal and where the class direction is read."""
TIME_SPLIT_VARIANTS = {
    "TwinFlow defaults, RCGM chain on an EMA 0.99 above t 0.5": (BenchmarkLoss, "noise"),
    "RCGM only, defaults, RCGM chain on an EMA 0.99 above t 0.5": (BenchmarkLoss.rcgm, "noise"),
    "TwinFlow defaults, RCGM chain on an EMA 0.99 below t 0.5": (BenchmarkLoss, "data"),
    "RCGM only, defaults, RCGM chain on an EMA 0.99 below t 0.5": (BenchmarkLoss.rcgm, "data"),
}
"""The variants whose chain reads the EMA on one side of t = 0.5, with the loss they otherwise equal and the end of
the path whose jumps read the EMA."""
DOUBLE_EMA_VARIANTS = {
    "TwinFlow defaults, RCGM chain on a double EMA 0.99": BenchmarkLoss,
    "RCGM only, defaults, RCGM chain on a double EMA 0.99": BenchmarkLoss.rcgm,
}
"""The variants whose chain reads a double EMA of the online weights, with the loss they otherwise equal."""
BLENDED_VARIANTS = {
    "TwinFlow defaults, RCGM chain a quarter of the way to an EMA 0.99": (BenchmarkLoss, 0.25),
    "RCGM only, defaults, RCGM chain a quarter of the way to an EMA 0.99": (BenchmarkLoss.rcgm, 0.25),
    "TwinFlow defaults, RCGM chain a thirty-second of the way to an EMA 0.99": (BenchmarkLoss, 1 / 32),
    "RCGM only, defaults, RCGM chain a thirty-second of the way to an EMA 0.99": (BenchmarkLoss.rcgm, 1 / 32),
}
"""The variants whose chain reads part of the way from the online field to an EMA's, with their plain loss and the
fraction of the way."""
"""The variants whose RCGM chain reads an EMA on some groups only, with the loss they otherwise equal and the
groups whose chain reads the EMA."""


@pytest.mark.parametrize(
    "name", sorted(set(split_variants.VARIANTS) - {RCGM_VARIANT} - set(TEACHER_VARIANTS) - set().union(*SETTING_PAIRS)
                   - set(TWIN_ONLY_SETTINGS) - set(RCGM_SETTINGS) - set(EMA_VARIANTS) - set(GROUP_CHAIN_VARIANTS)
                   - set(CLASS_DIRECTION_VARIANTS) - set(TIME_SPLIT_VARIANTS) - set(DOUBLE_EMA_VARIANTS)
                   - set(BLENDED_VARIANTS))
)
def test_each_variant_is_the_default_loss_with_only_the_settings_its_name_gives(name):
    loss = split_variants.VARIANTS[name](None)
    assert isinstance(loss, BenchmarkLoss)
    expected_scale = 0.0 if name.startswith("TwinFlow w 0,") else 0.2 if "at w 0.2" in name else 0.5
    assert loss.guidance_scale == expected_scale
    assert_default_loss_except(loss, *CHANGED[name])
    if "l2" in name:
        assert isinstance(loss.rectify_distance, L2Distance) and loss.rectify_weight == 2.0
    else:
        assert isinstance(loss.rectify_distance, BarronDistance)
    expected_weight = {"rectify weight 0.25": 0.25, "no rectification": 0.0, "l2": 2.0}
    assert loss.rectify_weight == next((w for key, w in expected_weight.items() if key in name), 0.5)
    assert isinstance(loss.trajectory, split_variants.FakeTimesFrom) == ("fake times" in name)
    assert len({curves.slug(other) for other in split_variants.VARIANTS}) == len(split_variants.VARIANTS)
    assert not set(map(curves.slug, split_variants.VARIANTS)) & set(map(curves.slug, curves.METHODS))
    assert loss.trajectory.fake_rows == ("added" if "extra fake rows" in name else "from_batch")
    if "twin share 1/3" in name:
        assert loss.trajectory.shares == GroupShares.from_twin_share(1 / 3) and loss.rectify_time is None
    if "guidance interval (0.2, 0.7)" in name:
        assert loss.guidance_interval == (0.2, 0.7)
        assert (loss.trajectory.shares == UNGUIDED_SHARES) == ("unguided partition" in name)
        law, unguided_law = loss.rectify_law(conditioned=True), default_rectify_time(0.0, conditioned=True)
        same_law = type(law) is type(unguided_law) and module_settings(law) == module_settings(unguided_law)
        assert same_law == ("law of s" in name)


def test_the_rcgm_variant_is_rcgm_only_with_the_guided_defaults_anchor_of_half_the_batch():
    loss, plain = split_variants.VARIANTS[RCGM_VARIANT](None), BenchmarkLoss.rcgm()
    shares = loss.trajectory.shares
    assert shares.one_step == 0.5 and shares.fake == 0.0
    assert shares.multi_step + shares.any_step == BenchmarkLoss().trajectory.shares.multi_step * 2 == 0.5
    assert loss.rectify_weight == 0.0 and loss.guidance_scale == plain.guidance_scale == 0.5
    assert module_settings(loss) == module_settings(plain) | {"trajectory": module_settings(loss.trajectory)}


@pytest.mark.parametrize(("names", "setting"), list(SETTING_PAIRS.items()), ids=lambda v: str(v))
def test_each_setting_pair_differs_from_the_default_pair_only_in_its_setting(names, setting):
    twin, rcgm = (split_variants.VARIANTS[name](None) for name in names)
    for loss, default in ((twin, BenchmarkLoss()), (rcgm, BenchmarkLoss.rcgm())):
        assert all(getattr(default, key) != value for key, value in setting.items())
        assert module_settings(loss) == module_settings(default) | setting


@pytest.mark.parametrize(("name", "setting"), list(TWIN_ONLY_SETTINGS.items()))
def test_each_twin_only_variant_differs_from_the_default_only_in_its_settings(name, setting):
    loss, default = split_variants.VARIANTS[name](None), BenchmarkLoss()
    assert all(getattr(default, key) != value for key, value in setting.items())
    assert module_settings(loss) == module_settings(default) | setting


@pytest.mark.parametrize(("name", "setting"), list(RCGM_SETTINGS.items()))
def test_each_rcgm_only_ablation_differs_from_rcgm_only_in_its_settings(name, setting):
    loss, default = split_variants.VARIANTS[name](None), BenchmarkLoss.rcgm()
    assert all(getattr(default, key) != value for key, value in setting.items())
    assert module_settings(loss) == module_settings(default) | setting


@pytest.mark.parametrize(("scale", "law"), [(0.5, LogitNormalTime), (0.0, ShiftedTime)])
def test_fake_times_follow_the_conditioned_law_of_s_and_leave_every_other_row_as_the_default_draws_it(scale, law):
    loss = split_variants.fake_times_from_rectify_law(scale)
    assert isinstance(loss.trajectory.fake_law, law) and loss.trajectory.fake_law is loss.rectify_law(conditioned=True)
    plain = TrajectorySampler(shares=loss.trajectory.shares)
    batch, seed = 48, 3
    drawn = loss.trajectory(batch, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    default = plain(batch, generator=generator, dtype=torch.float32)
    fake = drawn.groups["fake"]
    expected = -loss.rectify_law(conditioned=True)(fake.stop - fake.start, generator=generator)  # drawn next
    assert drawn.groups == default.groups
    assert torch.equal(drawn.t[fake], expected) and torch.equal(drawn.r[fake], expected)
    rest = torch.ones(batch, dtype=torch.bool)
    rest[fake] = False
    assert torch.equal(drawn.t[rest], default.t[rest]) and torch.equal(drawn.r[rest], default.r[rest])



def _without_teachers(settings: dict) -> dict:
    return {key: value for key, value in settings.items() if "teacher" not in key}


@pytest.mark.parametrize("name", sorted(TEACHER_VARIANTS))
def test_the_teacher_variants_differ_from_their_loss_only_in_what_evaluates_the_guidance_pass(name):
    pretrained = torch.nn.Linear(3, 2)
    loss, teacher = curves.unpack(split_variants.VARIANTS[name](pretrained))
    plain = TEACHER_VARIANTS[name]()
    assert _without_teachers(module_settings(loss)) == _without_teachers(module_settings(plain))
    assert isinstance(loss.rcgm_teacher, OnlineTeacher)  # the RCGM chain still reads the online model
    guidance = loss.guidance_teacher
    if "frozen" in name:
        assert teacher is None and isinstance(guidance, FrozenTeacher)
        assert guidance.frozen.keys() == dict(pretrained.named_parameters()).keys()
        assert all(torch.equal(guidance.frozen[key], p) for key, p in pretrained.named_parameters())
    else:  # the loop updates it after every step, with the sampling average's profile
        assert guidance is teacher and isinstance(teacher, WeightAverage)
        assert isinstance(teacher.profile, PowerFunctionDecay) and teacher.profile.gamma == 6.94
    again, _ = curves.unpack(split_variants.VARIANTS[name](pretrained))
    assert again.guidance_teacher is not guidance  # each run its own reference


@pytest.mark.parametrize("name", sorted(EMA_VARIANTS))
def test_the_ema_variants_differ_from_their_loss_only_in_an_updated_ema_teacher_on_the_chain(name):
    pretrained = torch.nn.Linear(3, 2)
    make_plain, decay, guidance = EMA_VARIANTS[name]
    loss, teacher = curves.unpack(split_variants.VARIANTS[name](pretrained))
    plain = make_plain()
    assert _without_teachers(module_settings(loss)) == _without_teachers(module_settings(plain))
    assert loss.guidance_scale == plain.guidance_scale == (0.0 if " w 0," in name else 0.5)
    assert isinstance(teacher, EMATeacher) and teacher.target_decay == decay
    assert loss.rcgm_teacher is teacher  # the loop updates the teacher the chain reads, after every step
    if guidance == "frozen":
        assert isinstance(loss.guidance_teacher, FrozenTeacher)
        assert all(torch.equal(loss.guidance_teacher.frozen[key], p) for key, p in pretrained.named_parameters())
    elif guidance == "online":
        assert isinstance(loss.guidance_teacher, OnlineTeacher)
    else:
        assert loss.guidance_teacher is teacher
    again, _ = curves.unpack(split_variants.VARIANTS[name](pretrained))
    assert again.rcgm_teacher is not teacher  # each run its own average


def test_an_ema_variant_with_an_unknown_guidance_pass_is_refused_by_name():
    with pytest.raises(ValueError, match="guidance must be 'ema', 'online' or 'frozen', got 'teacher'"):
        split_variants.ema_taught(BenchmarkLoss, 0.99, guidance="teacher")



@pytest.mark.parametrize("name", sorted(GROUP_CHAIN_VARIANTS))
def test_the_group_chain_variants_differ_from_their_loss_only_in_an_ema_on_their_groups_chain(name):
    make_plain, groups = GROUP_CHAIN_VARIANTS[name]
    loss, teacher = curves.unpack(split_variants.VARIANTS[name](torch.nn.Linear(3, 2)))
    plain = make_plain()
    settings = {key: value for key, value in module_settings(loss).items() if key not in ("average", "average_groups")}
    assert settings == module_settings(plain)
    assert isinstance(loss, split_variants.GroupChainLoss) and loss.average_groups == groups
    assert isinstance(teacher, EMATeacher) and teacher.target_decay == 0.99
    assert loss.average is teacher  # the loop updates the average the chain reads, after every step
    assert isinstance(loss.rcgm_teacher, OnlineTeacher) and isinstance(loss.guidance_teacher, OnlineTeacher)


def _terms(loss_fn, model, x, y):
    generator = torch.Generator().manual_seed(5)
    return loss_fn(model, x, cond={"y": y}, uncond={"y": torch.full_like(y, 4)}, generator=generator).terms


@pytest.mark.parametrize("groups", [split_variants.ONE_STEP_CHAIN, split_variants.MULTI_STEP_CHAIN,
                                    split_variants.ANY_STEP_CHAIN, ("multi_step", "any_step")])
def test_a_group_chain_loss_reads_the_ema_on_its_groups_rows_and_the_online_model_on_the_others(groups):
    from core_models import TinyVelocityNet

    torch.manual_seed(0)
    model = TinyVelocityNet((2,))
    average = EMATeacher(0.5)
    average.update(model)
    with torch.no_grad():  # the online weights move away from the average's
        for p in model.parameters():
            p.add_(1e-3 * torch.randn_like(p))  # small enough that the residual stays inside its clamp
    x, y = torch.randn(24, 2), torch.randint(0, 4, (24,))
    grouped = _terms(split_variants.GroupChainLoss(average=average, average_groups=groups), model, x, y)
    everywhere = _terms(BenchmarkLoss(rcgm_teacher=average), model, x, y)
    online = _terms(BenchmarkLoss(), model, x, y)
    for name in ("one_step", "multi_step", "any_step"):
        expected = everywhere if name in groups else online
        other = online if name in groups else everywhere
        assert torch.allclose(grouped[f"base/{name}"], expected[f"base/{name}"], rtol=1e-6, atol=1e-8), name
        assert (grouped[f"base/{name}"] - other[f"base/{name}"]).abs() > 1e-4, name  # the two teachers differ here
    assert torch.allclose(grouped["rectify"], online["rectify"], rtol=1e-6, atol=1e-8)  # read online either way


@pytest.mark.parametrize(("groups", "match"), [((), "average_groups must name real groups"),
                                               (("fake",), "average_groups must name real groups")])
def test_a_group_chain_loss_refuses_groups_without_a_chain_by_name(groups, match):
    with pytest.raises(ValueError, match=match):
        split_variants.GroupChainLoss(average=EMATeacher(0.99), average_groups=groups)


def test_a_group_chain_loss_without_a_chain_is_refused_by_name():
    with pytest.raises(ValueError, match="estimate_order=0"):
        split_variants.GroupChainLoss(average=EMATeacher(0.99), average_groups=("one_step",), estimate_order=0)


CHAIN_TEACHERS = {
    **{name: (make_plain, split_variants.SplitFieldTeacher,
              {"class_direction": class_direction, "null_label": 4})
       for name, (make_plain, class_direction) in CLASS_DIRECTION_VARIANTS.items()},
    **{name: (make_plain, split_variants.TimeSplitTeacher, {"split": 0.5, "averaged_end": averaged_end})
       for name, (make_plain, averaged_end) in TIME_SPLIT_VARIANTS.items()},
    **{name: (make_plain, split_variants.DoubleEMATeacher, {"target_decay": 0.99})
       for name, make_plain in DOUBLE_EMA_VARIANTS.items()},
    **{name: (make_plain, split_variants.BlendedTeacher, {"weight": weight})
       for name, (make_plain, weight) in BLENDED_VARIANTS.items()},
}
"""Every variant whose chain reads a teacher of this module: its plain loss, the teacher's class and settings."""


@pytest.mark.parametrize("name", sorted(CHAIN_TEACHERS))
def test_the_chain_teacher_variants_differ_from_their_loss_only_in_the_chain_teacher_they_name(name):
    from twinloss import toy

    pretrained = toy.TimeMLP((2,), width=8, depth=2, num_classes=4)
    loss, teacher = curves.unpack(split_variants.VARIANTS[name](pretrained))
    make_plain, kind, settings = CHAIN_TEACHERS[name]
    assert _without_teachers(module_settings(loss)) == _without_teachers(module_settings(make_plain()))
    assert isinstance(teacher, kind) and loss.rcgm_teacher is teacher
    assert {key: getattr(teacher, key) for key in settings} == settings
    averaged = teacher if isinstance(teacher, MovingAverageTeacher) else teacher.average  # the EMA it reads
    assert averaged.target_decay == 0.99
    assert isinstance(loss.guidance_teacher, OnlineTeacher)


def _moved_away_from_the_average_in(teacher) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A toy model whose weights ``teacher``'s EMA averaged once, then moved by noise, and a copy holding the
    average's weights: ``(model, averaged)``."""
    from twinloss import toy

    torch.manual_seed(0)
    model = toy.TimeMLP((2,), width=16, depth=2, num_classes=4)
    teacher.update(model)  # the average starts at these weights
    averaged = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model, averaged


@pytest.mark.parametrize("class_direction", ["online", "average"])
def test_the_split_field_teacher_reads_the_null_field_and_the_class_direction_from_the_weights_it_names(
        class_direction):
    teacher = split_variants.SplitFieldTeacher(EMATeacher(0.5), null_label=4, class_direction=class_direction)
    model, averaged = _moved_away_from_the_average_in(teacher)
    x, t, r = torch.randn(6, 2), torch.rand(6), torch.rand(6) * 0.5
    y, null = torch.tensor([0, 1, 2, 3, 4, 1]), torch.full((6,), 4)
    field, direction = (averaged, model) if class_direction == "online" else (model, averaged)
    with torch.no_grad():
        expected = field(x, t, r, y=null) + direction(x, t, r, y=y) - direction(x, t, r, y=null)
        got = teacher(model, x, t, r, {"y": y})
        assert torch.allclose(got, expected, atol=1e-6)
        assert torch.allclose(got[4], field(x, t, r, y=null)[4], atol=1e-6)  # a null row reads the null field alone
        assert not torch.allclose(got, averaged(x, t, r, y=y), atol=1e-3)  # not the average's own field
        assert not torch.allclose(got, model(x, t, r, y=y), atol=1e-3)  # nor the online one


def test_a_split_field_teacher_with_an_unknown_class_direction_is_refused_by_name():
    with pytest.raises(ValueError, match="class_direction must be 'online' or 'average', got 'ema'"):
        split_variants.SplitFieldTeacher(EMATeacher(0.99), null_label=4, class_direction="ema")


@pytest.mark.parametrize("averaged_end", ["noise", "data"])
def test_the_time_split_teacher_reads_the_average_on_its_side_of_the_split_and_the_online_model_on_the_other(
        averaged_end):
    teacher = split_variants.TimeSplitTeacher(EMATeacher(0.5), split=0.5, averaged_end=averaged_end)
    model, averaged = _moved_away_from_the_average_in(teacher)
    x, y = torch.randn(6, 2), torch.tensor([0, 1, 2, 3, 4, 1])
    t = torch.tensor([0.99, 0.2, 0.5, 0.51, 0.7, 0.05])
    r = t * 0.5
    chosen = t > 0.5 if averaged_end == "noise" else t <= 0.5
    with torch.no_grad():
        expected = torch.where(chosen[:, None], averaged(x, t, r, y=y), model(x, t, r, y=y))
        got = teacher(model, x, t, r, {"y": y})
        assert torch.allclose(got, expected, atol=1e-6)
        assert not torch.allclose(got[chosen], model(x, t, r, y=y)[chosen], atol=1e-3)  # the average differs there
        other = ~chosen  # a batch with no row on the averaged side reads the online model alone
        assert torch.allclose(teacher(model, x[other], t[other], r[other], {"y": y[other]}),
                              model(x[other], t[other], r[other], y=y[other]), atol=1e-6)


@pytest.mark.parametrize(("settings", "match"), [
    ({"split": 0.0}, "split must be a time in"), ({"split": 1.0}, "split must be a time in"),
    ({"split": 0.5, "averaged_end": "middle"}, "averaged_end must be 'noise' or 'data', got 'middle'"),
])
def test_a_time_split_teacher_with_a_bad_split_or_end_is_refused_by_name(settings, match):
    with pytest.raises(ValueError, match=match):
        split_variants.TimeSplitTeacher(EMATeacher(0.99), **settings)



def test_the_double_ema_teacher_reads_twice_the_average_minus_the_average_of_the_average():
    from twinloss import toy

    torch.manual_seed(0)
    model = toy.TimeMLP((2,), width=16, depth=2, num_classes=4)
    teacher = split_variants.DoubleEMATeacher(0.9)
    x, t, r, y = torch.randn(5, 2), torch.rand(5), torch.rand(5) * 0.3, torch.tensor([0, 1, 2, 3, 4])
    with torch.no_grad():
        assert torch.equal(teacher(model, x, t, r, {"y": y}), model(x, t, r, y=y))  # before any update: online
    reference = copy.deepcopy(model).double()
    average = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    average_of_average = {n: p.clone() for n, p in average.items()}
    decay = 0.0
    for _ in range(6):
        teacher.update(model)
        for n, p in model.named_parameters():  # the schedule written out: d starts at 0 and rises towards 0.9
            average[n] = decay * average[n] + (1 - decay) * p.detach().double()
            average_of_average[n] = decay * average_of_average[n] + (1 - decay) * average[n]
        decay = decay + 0.5 * (1 - decay) * (0.9 - decay)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    with torch.no_grad():
        for n, p in reference.named_parameters():
            p.copy_(2 * average[n] - average_of_average[n])
        expected = reference(x.double(), t.double(), r.double(), y=y).float()
        assert torch.allclose(teacher(model, x, t, r, {"y": y}), expected, atol=1e-5)
        assert not torch.allclose(expected, model(x, t, r, y=y), atol=1e-3)


def test_the_double_ema_teacher_follows_a_steady_drift_of_the_weights_that_an_ema_lags():
    model = torch.nn.Linear(3, 3)
    drift = {n: 0.01 * torch.randn_like(p) for n, p in model.named_parameters()}
    double, single = split_variants.DoubleEMATeacher(0.9), EMATeacher(0.9)
    for _ in range(300):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.add_(drift[n])
        double.update(model)
        single.update(model)
    for n, p in model.named_parameters():
        lag_double = (p.detach() - double.weights[n]).abs().max() / drift[n].abs().max()
        lag_single = (p.detach() - single.shadow[n]).abs().max() / drift[n].abs().max()
        assert lag_double < 0.05  # steps behind the weights
        assert 8.5 < lag_single < 9.5  # d / (1 - d) = 9 steps


def test_the_blended_teacher_reads_its_weight_of_the_way_from_the_online_field_to_the_average():
    teacher = split_variants.BlendedTeacher(EMATeacher(0.5), weight=0.25)
    model, averaged = _moved_away_from_the_average_in(teacher)
    x, t, r, y = torch.randn(5, 2), torch.rand(5), torch.rand(5) * 0.3, torch.tensor([0, 1, 2, 3, 4])
    with torch.no_grad():
        online, average = model(x, t, r, y=y), averaged(x, t, r, y=y)
        assert not torch.allclose(online, average, atol=1e-3)
        assert torch.allclose(teacher(model, x, t, r, {"y": y}), 0.75 * online + 0.25 * average, atol=1e-6)


@pytest.mark.parametrize("weight", [0.0, 1.0, 1.5])
def test_a_blended_teacher_outside_the_open_unit_interval_is_refused_by_name(weight):
    with pytest.raises(ValueError, match="weight must lie in"):
        split_variants.BlendedTeacher(EMATeacher(0.99), weight=weight)
