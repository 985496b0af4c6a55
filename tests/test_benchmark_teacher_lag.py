"""``benchmarks/quality/teacher_lag.py``: the EMA's lag behind the online one-jump field, and the recorded clamp rate."""

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "quality"))
import teacher_lag  # noqa: E402

from twinloss import EMATeacher, toy  # noqa: E402


def _model_and_probe():
    torch.manual_seed(0)
    model = toy.TimeMLP((3,), width=16, depth=2, num_classes=2)
    return model, (torch.randn(5, 3), {"y": torch.tensor([0, 1, 0, 1, 2])})


def test_the_lag_is_the_distance_of_the_averaged_weights_one_jump_field_from_the_online_one():
    model, (noise, cond) = _model_and_probe()
    teacher = EMATeacher(0.5)
    teacher.update(model)  # the first update starts the average at these weights
    before = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ones = torch.ones(5)
    with torch.no_grad():
        online, lagged = model(noise, ones, 0 * ones, **cond), before(noise, ones, 0 * ones, **cond)
    expected = float((online - lagged).norm() / online.norm())
    assert expected > 0.01
    assert teacher_lag.relative_lag(model, teacher, noise, cond) == pytest.approx(expected, rel=1e-5)
    teacher = EMATeacher(0.0)
    teacher.update(model)
    assert teacher_lag.relative_lag(model, teacher, noise, cond) == 0.0


def test_the_lag_along_guidance_is_the_cosine_of_the_lag_with_the_online_guidance_direction():
    model, (x, cond) = _model_and_probe()
    uncond = {"y": torch.full_like(cond["y"], 2)}
    x_t, t = teacher_lag.mid_path_probe(x, torch.randn(x.shape, generator=torch.Generator().manual_seed(1)))
    assert torch.allclose(t, torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9]))
    teacher = EMATeacher(0.5)
    teacher.update(model)
    before = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        online = model(x_t, t, t, **cond)
        lag = (online - before(x_t, t, t, **cond)).flatten()
        direction = (online - model(x_t, t, t, **uncond)).flatten()
    expected = float(lag @ direction / (lag.norm() * direction.norm()))
    assert abs(expected) > 0.01
    assert teacher_lag.lag_along_guidance(model, teacher, x_t, t, cond, uncond) == pytest.approx(expected, rel=1e-4)
    teacher = EMATeacher(0.0)
    teacher.update(model)
    assert teacher_lag.lag_along_guidance(model, teacher, x_t, t, cond, uncond) == 0.0


def test_halves_are_the_means_of_the_second_and_first_half():
    assert teacher_lag.halves([1.0, 3.0, 10.0, 20.0, 30.0]) == {"late": 20.0, "early": 2.0}


def test_a_run_too_short_for_a_reading_in_each_half_is_refused_by_name():
    with pytest.raises(ValueError, match="steps must be at least 4 \\* every = 40"):
        teacher_lag.lag_run(None, 1e-3, 0.5, 0.9, 39, 10, None)


def test_a_quick_run_writes_a_row_per_guidance_scale_and_decay(tmp_path):
    teacher_lag.main(["--task", "ring", "--seed", "0", "--quick", "--steps", "8", "--every", "2",
                      "--results", str(tmp_path)])
    report = json.loads((tmp_path / "teacherlag_ring_seed0.json").read_text())
    assert sorted(report) == [f"w {w}, EMA {d}" for w in ("0", "0.5") for d in ("0", "0.9", "0.99")]
    for name, row in report.items():
        assert (row["lag"]["late"] == 0.0) == name.endswith("EMA 0")  # decay 0 reads the online weights
        assert row["lag"]["late"] < 1.0
        along = row["lag_along_guidance"]["late"]  # the ring is conditional
        assert along == 0.0 if name.endswith("EMA 0") else -1.0 <= along <= 1.0
        assert 0.0 <= row["residual_clamp_rate"]["late"] <= 1.0
