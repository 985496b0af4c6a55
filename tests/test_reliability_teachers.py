"""Teachers refuse non-finite weights and weights of other shapes, on update, forward and load (issue 13)."""

import pytest
import torch
from torch import Tensor, nn

from twinloss import EMATeacher, FrozenTeacher
from twinloss.distributed import ShardedEMATeacher


class Labels(nn.Module):
    """A velocity field with a class embedding whose row count varies between instances."""

    def __init__(self, classes: int, width: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(classes, width)
        self.out = nn.Linear(width, width)

    def forward(self, x_t: Tensor, t: Tensor, r: Tensor, y: Tensor) -> Tensor:
        return self.out(x_t + self.embed(y)) * t[:, None]


def _call(teacher, model) -> Tensor:
    x = torch.randn(3, 4)
    t = torch.full((3,), 0.5)
    return teacher(model, x, t, t, {"y": torch.zeros(3, dtype=torch.long)})


def test_ema_update_refuses_a_nan_weight_naming_it_and_keeps_the_average():
    model = Labels(4)
    teacher = EMATeacher(0.9)
    teacher.update(model)
    teacher.update(model)
    before = {name: p.clone() for name, p in teacher.shadow.items()}
    decay, updates = teacher.decay, teacher.num_updates
    with torch.no_grad():
        model.out.weight[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"EMATeacher.update: the model's parameter 'out.weight' contains NaN"):
        teacher.update(model)
    for name, value in before.items():
        torch.testing.assert_close(teacher.shadow[name], value, rtol=0, atol=0)
    assert (teacher.decay, teacher.num_updates) == (decay, updates)
    assert torch.isfinite(_call(teacher, model)).all()  # the teacher still evaluates the finite average


def test_ema_first_update_refuses_an_infinite_weight():
    model = Labels(4)
    with torch.no_grad():
        model.embed.weight[0, 0] = float("inf")
    teacher = EMATeacher()
    with pytest.raises(ValueError, match=r"'embed.weight' contains NaN or infinite"):
        teacher.update(model)
    assert teacher.shadow == {} and teacher.num_updates == 0


def test_ema_update_refuses_a_same_named_parameter_of_another_shape():
    teacher = EMATeacher()
    teacher.update(Labels(4))
    with pytest.raises(ValueError, match=r"parameter 'embed.weight' has shape \(1, 4\), the averaged one \(4, 4\)"):
        teacher.update(Labels(1))


def test_ema_forward_refuses_a_model_of_other_shapes_after_a_first_call():
    teacher = EMATeacher()
    teacher.update(Labels(4))
    _call(teacher, Labels(4))
    with pytest.raises(ValueError, match=r"parameter 'embed.weight' has shape \(1, 4\)"):
        _call(teacher, Labels(1))


def test_ema_loading_into_a_smaller_model_of_the_same_names_is_refused_at_the_next_call():
    saved = EMATeacher()
    saved.update(Labels(4))
    fresh = EMATeacher()
    fresh.load_state_dict(saved.state_dict())
    with pytest.raises(ValueError, match=r"parameter 'embed.weight' has shape \(1, 4\), the averaged one \(4, 4\)"):
        _call(fresh, Labels(1))
    used = EMATeacher()
    used.update(Labels(1))
    with pytest.raises(ValueError, match=r"'embed.weight' has shape \(4, 4\), the averaged one \(1, 4\)"):
        used.load_state_dict(saved.state_dict())


def test_ema_refuses_a_checkpoint_with_a_nan_average_and_keeps_its_own():
    model = Labels(4)
    saved = EMATeacher()
    saved.update(model)
    state = saved.state_dict()
    shadow = state["_extra_state"]["shadow"]
    shadow["out.bias"] = torch.full_like(shadow["out.bias"], float("nan"))
    teacher = EMATeacher()
    teacher.update(model)
    own = {name: p.clone() for name, p in teacher.shadow.items()}
    with pytest.raises(ValueError, match=r"the saved average of 'out.bias' contains NaN"):
        teacher.load_state_dict(state)
    for name, value in own.items():
        torch.testing.assert_close(teacher.shadow[name], value, rtol=0, atol=0)


def test_frozen_teacher_refuses_a_checkpoint_with_nan_or_other_shapes():
    teacher = FrozenTeacher(Labels(4))
    state = teacher.state_dict()
    state["_extra_state"]["frozen"]["out.weight"] = torch.full((4, 4), float("nan"))
    with pytest.raises(ValueError, match=r"the saved weight 'out.weight' contains NaN"):
        teacher.load_state_dict(state)
    with pytest.raises(ValueError, match=r"'embed.weight' has shape \(1, 4\), the frozen one \(4, 4\)"):
        teacher.load_state_dict(FrozenTeacher(Labels(1)).state_dict())
    with pytest.raises(ValueError, match=r"'embed.weight' has shape \(1, 4\), the frozen one \(4, 4\)"):
        _call(teacher, Labels(1))


def test_sharded_ema_refuses_a_checkpoint_with_nan_or_other_shapes_and_keeps_its_average():
    teacher = ShardedEMATeacher()
    teacher.shadow = {"w": torch.ones(2, 3)}  # as materialize leaves it (plain tensors stand in for the shards)
    bad = {**teacher.schedule_state(), "shadow": {"w": torch.full((2, 3), float("nan"))}}
    with pytest.raises(ValueError, match=r"the saved average of 'w' contains NaN"):
        teacher.set_extra_state(bad)
    wrong = {**teacher.schedule_state(), "shadow": {"w": torch.ones(1, 3)}}
    with pytest.raises(ValueError, match=r"parameter 'w' has shape \(1, 3\), the averaged one \(2, 3\)"):
        teacher.set_extra_state(wrong)
    torch.testing.assert_close(teacher.shadow["w"], torch.ones(2, 3), rtol=0, atol=0)
