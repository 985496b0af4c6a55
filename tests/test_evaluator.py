"""StepEvaluator: who evaluates each pass, grad only in the main one, counts, shape checks."""

import pytest
import torch
from jaxtyping import TypeCheckError

from twinloss import OnlineTeacher
from twinloss.evaluator import PASSES, StepEvaluator

from core_models import TinyVelocityNet


class Tagged(OnlineTeacher):
    def __init__(self, tag):
        super().__init__()
        self.tag, self.calls = tag, 0

    def forward(self, model, x_t, t, r, cond):
        self.calls += 1
        return torch.full_like(x_t, self.tag)


def test_each_pass_goes_to_its_evaluator_and_only_main_carries_grad():
    model = TinyVelocityNet((3,))
    guidance, rcgm = Tagged(1.0), Tagged(2.0)
    evaluate = StepEvaluator(model, guidance_teacher=guidance, rcgm_teacher=rcgm, input_dtype=torch.float32,
                             output_dtype=torch.float64, random_state=None)
    x, t = torch.randn(4, 3), torch.rand(4)
    outputs = {name: evaluate(name, x, t, t, {}) for name in PASSES}
    assert torch.equal(outputs["guidance"], torch.ones(4, 3, dtype=torch.float64))
    assert torch.equal(outputs["rcgm"], torch.full((4, 3), 2.0, dtype=torch.float64))
    assert guidance.calls == rcgm.calls == 1
    assert [name for name, out in outputs.items() if out.requires_grad] == ["main"]
    assert all(out.dtype == torch.float64 for out in outputs.values())
    assert evaluate.calls == dict.fromkeys(PASSES, 1) and evaluate.rows == dict.fromkeys(PASSES, 4)
    assert (evaluate.total_calls, evaluate.total_rows) == (5, 20)


@pytest.mark.parametrize("name", ["fake", "main", "rectify"])
def test_online_output_of_the_wrong_shape_names_the_pass(name):
    evaluate = StepEvaluator(lambda x_t, t, r: x_t[:, :1], guidance_teacher=OnlineTeacher(),
                             rcgm_teacher=OnlineTeacher(), input_dtype=torch.float32,
                             output_dtype=torch.float32, random_state=None)
    with pytest.raises(ValueError, match=rf"^model must return a velocity of shape \(4, 3\), got \(4, 1\) \(in the {name} pass\)"):
        evaluate(name, torch.randn(4, 3), torch.rand(4), torch.rand(4), {})


def test_pass_names_are_a_checked_literal():
    evaluate = StepEvaluator(TinyVelocityNet((3,)), guidance_teacher=OnlineTeacher(), rcgm_teacher=OnlineTeacher(),
                             input_dtype=torch.float32, output_dtype=torch.float32, random_state=None)
    with pytest.raises(TypeCheckError, match="Literal"):
        evaluate("teacher", torch.randn(4, 3), torch.rand(4), torch.rand(4), {})
