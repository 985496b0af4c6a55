"""Every preset against the numbers of its file in the authors' src/configs/ (read by hand).

The expected values below were copied from the yaml files of inclusionAI/TwinFlow
(``method:`` block); the test does not read the files (CI has no copy).
"""

import pytest
import torch

from twinloss import (
    BarronDistance,
    BetaTime,
    EMATeacher,
    FrozenTeacher,
    OnlineTeacher,
    ShardedWeightAverage,
    TwinFlowLoss,
    WeightAverage,
)
from twinloss.loss import RELEASED_GUIDANCE
from twinloss.presets import PRESETS, PresetName
from twinloss.teachers import Teacher

from core_models import TinyVelocityNet

# stem: (enhanced_ratio, enhanced_range, estimate_order, ema_decay_rate, dist_match_cof, use_image_free)
FROM_THE_FILES = {
    "openuni_full": (0.8, (0.0, 1.0), 2, 0.999, 0.75, False),
    "openuni_full_imgfree": (4.0, (0.0, 1.0), 2, 1.0, 0.75, True),
    "openuni_lora_1order": (0.8, (0.0, 1.0), 1, 0.0, 0.75, False),
    "openuni_lora_2order": (0.8, (0.0, 1.0), 2, 0.99, 0.75, False),
    "qwenimage_full": (0.8, (0.0, 1.0), 2, 0.0, 0.5, False),
    "qwenimage_lora_1order": (4.0, (0.0, 1.0), 1, 1.0, 0.5, False),
    "qwenimage_lora_2order": (0.8, (0.0, 1.0), 2, 0.99, 0.5, False),
    "sd35_full": (0.8, (0.0, 1.0), 2, 0.99, 0.5, False),
    "sd35_lora_1order": (0.8, (0.0, 1.0), 1, 0.0, 0.5, False),
    "sd35_lora_2order": (0.8, (0.0, 1.0), 2, 0.99, 0.5, False),
}
# every file: consistc_ratio 1.0, time_dist_ctrl [1, 1, 1], barron_reweighting alpha 1.0, transport Linear


class FixedWeights(Teacher):
    """Stands for a base-model teacher (twinloss_adapters.lora.BaseModelTeacher needs peft)."""

    def forward(self, model, x_t, t, r, cond):
        with torch.no_grad():
            return model(x_t, t, r, **cond)


def _teacher_arguments(name):
    decay = FROM_THE_FILES[name][3]
    if decay == 0.0:
        return {}
    if decay < 1.0:
        return {"teacher": EMATeacher(decay)}
    return {"guidance_teacher": FixedWeights()}


def test_there_is_one_preset_per_file_and_the_literal_lists_them():
    assert set(PRESETS) == set(FROM_THE_FILES) == set(PresetName.__args__)
    for name, preset in PRESETS.items():
        assert preset.config.endswith(f"/{name}.yaml") and preset.config.startswith("src/configs/")
        assert preset.lora == ("_lora_" in name)


@pytest.mark.parametrize("name", sorted(FROM_THE_FILES))
def test_preset_numbers_match_its_file(name):
    scale, interval, order, decay, rectify, image_free = FROM_THE_FILES[name]
    preset = PRESETS[name]
    assert (preset.guidance_scale, preset.guidance_interval, preset.estimate_order) == (scale, interval, order)
    assert (preset.ema_decay, preset.rectify_weight, preset.image_free) == (decay, rectify, image_free)
    assert (preset.time_dist_ctrl, preset.barron_alpha, preset.consistency_ratio) == ((1.0, 1.0, 1.0), 1.0, 1.0)

    arguments = _teacher_arguments(name)
    loss_fn = TwinFlowLoss.from_preset(name, **arguments)
    assert (loss_fn.guidance_scale, loss_fn.guidance_interval, loss_fn.estimate_order) == (scale, interval, order)
    assert (loss_fn.rectify_weight, loss_fn.image_free) == (rectify, image_free)
    assert isinstance(loss_fn.distance, BarronDistance) and (loss_fn.distance.alpha, loss_fn.distance.c) == (1.0, 1e-3)
    distribution = loss_fn.trajectory.time_distribution
    assert isinstance(distribution, BetaTime) and (distribution.alpha, distribution.beta) == (1.0, 1.0)
    # their rectification draws s ~ U(0, 1) at any guidance scale (the guided default is logit-normal)
    law = loss_fn.rectify_time
    assert isinstance(law, BetaTime) and (law.alpha, law.beta) == (1.0, 1.0)
    # the numbers their code fixes, equal to the constructor defaults
    assert (loss_fn.estimate_step, loss_fn.residual_clamp, loss_fn.rectify_clamp) == (0.01, 1.0, 1.0)
    assert loss_fn.trajectory.multi_step_gap == 0.05 and loss_fn.shares.as_dict() == dict.fromkeys(
        ("one_step", "multi_step", "any_step", "fake"), 0.25)
    assert loss_fn.time_weight.divisor == 2.5
    # the teachers ema_decay_rate implies: 0 online/online, (0, 1) average/average, 1 fixed/online
    if decay == 0.0:
        assert isinstance(loss_fn.guidance_teacher, OnlineTeacher) and loss_fn.rcgm_teacher is loss_fn.guidance_teacher
    elif decay < 1.0:
        assert loss_fn.guidance_teacher is loss_fn.rcgm_teacher is arguments["teacher"]
        assert loss_fn.teacher.target_decay == decay
    else:
        assert loss_fn.guidance_teacher is arguments["guidance_teacher"]
        assert isinstance(loss_fn.rcgm_teacher, OnlineTeacher)


def test_paper_defaults_stay_the_constructor_defaults_but_the_guidance_whose_released_value_is_one_argument_away():
    loss_fn = TwinFlowLoss()
    assert (loss_fn.estimate_order, loss_fn.rectify_weight) == (2, 0.5)
    assert isinstance(loss_fn.guidance_teacher, OnlineTeacher) and loss_fn.image_free is False
    assert (loss_fn.guidance_scale, loss_fn.guidance_interval) == (0.2, (0.2, 0.7))  # issue 12, thirty-first round
    released = TwinFlowLoss(**RELEASED_GUIDANCE)
    assert (released.guidance_scale, released.guidance_interval) == (0.5, (0.0, 1.0))  # the released step's


@pytest.mark.parametrize(
    "name,arguments,argument",
    [
        ("sd35_full", {}, "teacher"),
        ("sd35_full", {"teacher": EMATeacher(0.999)}, "teacher"),
        ("sd35_full", {"teacher": OnlineTeacher()}, "teacher"),
        ("sd35_full", {"guidance_teacher": FixedWeights()}, "guidance_teacher"),
        ("openuni_full", {"teacher": EMATeacher(0.99)}, "teacher"),
        ("qwenimage_lora_1order", {}, "guidance_teacher"),
        ("qwenimage_lora_1order", {"guidance_teacher": OnlineTeacher()}, "guidance_teacher"),
        ("qwenimage_lora_1order", {"guidance_teacher": EMATeacher()}, "guidance_teacher"),
        ("qwenimage_lora_1order", {"teacher": FixedWeights()}, "teacher"),
        ("qwenimage_full", {"teacher": EMATeacher()}, "teacher"),
        ("sd35_lora_1order", {"guidance_teacher": FixedWeights()}, "guidance_teacher"),
    ],
)
def test_a_missing_or_wrong_teacher_raises_naming_the_argument(name, arguments, argument):
    with pytest.raises(ValueError, match=rf"^{argument}\b"):
        TwinFlowLoss.from_preset(name, **arguments)



@pytest.mark.parametrize(
    "name, argument, needs",
    [
        ("sd35_full", "teacher", r"target_decay 0\.99"),
        ("openuni_full", "teacher", r"target_decay 0\.999"),
        ("qwenimage_lora_1order", "guidance_teacher", "fixed"),
        ("qwenimage_full", "teacher", "no teacher"),
    ],
    ids=["average_0.99", "average_0.999", "fixed", "online"],
)
@pytest.mark.parametrize("average", [WeightAverage(0.99), ShardedWeightAverage(0.99)], ids=["plain", "sharded"])
def test_a_weight_average_as_a_preset_teacher_raises_a_value_error_saying_it_is_for_sampling(name, argument, needs, average):
    with pytest.raises(
        ValueError,
        match=rf"^{argument} is a {type(average).__name__}, a weight average for sampling .* not a teacher .*{needs}",
    ):
        TwinFlowLoss.from_preset(name, **{argument: average})

def test_image_free_preset_runs_with_a_frozen_teacher_and_needs_no_data():
    model = TinyVelocityNet((3,))
    loss_fn = TwinFlowLoss.from_preset("openuni_full_imgfree", guidance_teacher=FrozenTeacher(model))
    y = torch.arange(8) % 4
    x = torch.zeros(8, 3)
    out = loss_fn(model, x, cond={"y": y}, uncond={"y": torch.full_like(y, 4)},
                  generator=torch.Generator().manual_seed(0))
    again = loss_fn(model, x + 5, cond={"y": y}, uncond={"y": torch.full_like(y, 4)},
                    generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.loss, again.loss)
    assert out.calls_per_pass == {"fake": 1, "guidance": 1, "rcgm": 2, "main": 1, "rectify": 1}
