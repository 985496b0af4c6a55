"""TwinFlowLoss(guidance_difference="data"): step 4's guidance difference read from the row's own velocity."""

import copy

import pytest
import torch
from jaxtyping import TypeCheckError
from torch.testing import assert_close

from twinloss import FrozenTeacher, OnlineTeacher, TwinFlowLoss
from twinloss.loss import RELEASED_GUIDANCE
from twinloss.protocol import conditioned_rows
from twinloss.targets import data_guidance_target, guidance_free_velocity, guidance_target

from core_models import TinyVelocityNet
from reference import barron, reference_step
from test_guidance_groups import _data, _step


def _data_with_dropped_labels(batch=16, seed=0):
    """``_data`` with every third label set to the null label, as a trainer's label dropout would."""
    x, y, null_y = _data(batch=batch, seed=seed)
    y = y.clone()
    y[::3] = null_y[::3]
    return x, y, null_y


def assert_matches_reference(loss_fn, model, x, y, null_y, *, seed, setting=None, **options):
    """Assert one step of ``loss_fn`` matches ``reference_step(..., **options)`` in value and parameter gradients
    (the model's grads are cleared afterwards). With ``setting``, the name of one of ``options``, also assert that
    the reference without it gives another loss, so the match could not hold without the setting."""
    out, grads = _step(loss_fn, model, x, y, null_y, seed=seed)
    expected, _, _ = reference_step(model, x, y, null_y, seed=seed, **options)
    expected.backward()
    assert_close(out.loss, expected, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, [p.grad for p in model.parameters()], strict=True):
        assert_close(got, want, rtol=1e-9, atol=1e-12)
    model.zero_grad()
    if setting is not None:
        without = {name: value for name, value in options.items() if name != setting}
        other, _, _ = reference_step(model, x, y, null_y, seed=seed, **without)
        assert abs(other.item() - expected.item()) > 1e-4


class ConditioningRecordingTeacher(OnlineTeacher):
    """The online teacher, recording the conditioning of every call it evaluates."""

    def __init__(self):
        super().__init__()
        self.labels = []

    def forward(self, model, x_t, t, r, cond):
        self.labels.append(cond["y"].clone())
        return super().forward(model, x_t, t, r, cond)


def _perturbed_copy(model, seed):
    """A frozen copy of ``model`` with other weights, so a teacher pass cannot pass for an online one."""
    torch.manual_seed(seed)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    return other


@pytest.mark.parametrize("rectify_field", ["guided", "guidance_free"])
@pytest.mark.parametrize("teacher", ["online", "frozen"])
def test_data_guidance_matches_float64_reference_in_value_and_gradient(teacher, rectify_field):
    torch.manual_seed(0)
    model = TinyVelocityNet((3,)).double()
    guidance_model = _perturbed_copy(model, seed=1) if teacher == "frozen" else None
    kwargs = {"guidance_teacher": FrozenTeacher(guidance_model)} if teacher == "frozen" else {}
    x, y, null_y = _data_with_dropped_labels()
    loss_fn = TwinFlowLoss(guidance_difference="data", guidance_scale=0.6, rectify_field=rectify_field,
                           rectify_weight=1.0, **kwargs)
    options = dict(guidance=0.6, rectify_weight=1.0, distance=barron, guidance_model=guidance_model,
                   rectify_field=rectify_field)
    assert_matches_reference(loss_fn, model, x, y, null_y, seed=4, guidance_difference="data",
                             setting="guidance_difference", **options)


def test_data_guidance_on_named_groups_matches_float64_reference():
    torch.manual_seed(2)
    model = TinyVelocityNet((3,)).double()
    x, y, null_y = _data_with_dropped_labels(seed=2)
    loss_fn = TwinFlowLoss(guidance_difference="data", guidance_groups=("any_step",))
    assert_matches_reference(loss_fn, model, x, y, null_y, seed=3, distance=barron, guidance_groups=("any_step",),
                             guidance_difference="data")


def test_the_data_target_is_the_teacher_target_read_at_the_online_fixed_point():
    # The online teacher's fixed point with v_c = v: F_c = F_u + (v - F_u) / (1 - w) (docs/method.md, step 4).
    v, uncond = torch.randn(2, 5, 3, dtype=torch.float64)
    for scale in (0.2, 0.5, 0.8):
        fixed_point = uncond + (v - uncond) / (1 - scale)
        assert_close(data_guidance_target(v, uncond, scale), guidance_target(v, fixed_point, uncond, scale))
        # the guidance-free field of the trained F_c is the data velocity again
        trained = data_guidance_target(v, uncond, scale)
        assert_close(guidance_free_velocity(trained, trained, uncond, scale), v)


def test_the_guidance_pass_reads_only_the_null_conditioning_of_the_labelled_guided_rows():
    teacher = ConditioningRecordingTeacher()
    loss_fn = TwinFlowLoss(guidance_difference="data", guidance_teacher=teacher, rcgm_teacher=OnlineTeacher(),
                           **RELEASED_GUIDANCE)  # every real row at 0 < t < 1 guided
    x, y, null_y = _data_with_dropped_labels(batch=64)
    out = loss_fn(TinyVelocityNet((3,)).double(), x, cond={"y": y}, uncond={"y": null_y},
                  generator=torch.Generator().manual_seed(1))
    (labels,) = teacher.labels  # one call: the null conditioning alone
    assert out.calls_per_pass["guidance"] == 1
    assert bool((labels == null_y[0]).all())
    counts = loss_fn.shares.counts(64)
    start = counts["one_step"]
    stop = start + counts["multi_step"] + counts["any_step"]
    assert labels.numel() == int((y[start:stop] != null_y[start:stop]).sum()) < stop - start


def test_dropped_rows_keep_their_velocity_and_a_batch_of_them_runs_no_guidance_pass():
    torch.manual_seed(3)
    model = TinyVelocityNet((3,)).double()
    x, _, null_y = _data(batch=16, seed=3)
    data, data_grads = _step(TwinFlowLoss(guidance_difference="data"), model, x, null_y, null_y, seed=5)
    teacher, teacher_grads = _step(TwinFlowLoss(), model, x, null_y, null_y, seed=5)
    assert data.calls_per_pass["guidance"] == 0 and teacher.calls_per_pass["guidance"] == 1
    assert_close(data.loss, teacher.loss, rtol=1e-12, atol=1e-14)  # G_c - G_u is 0 on null rows
    for got, want in zip(data_grads, teacher_grads, strict=True):
        assert_close(got, want, rtol=1e-10, atol=1e-13)


def test_conditioned_rows_compares_every_conditioning_tensor_row_by_row():
    cond = {"y": torch.tensor([0, 4, 2, 4]), "mask": torch.ones(4, 3)}
    uncond = {"y": torch.full((4,), 4), "mask": torch.ones(4, 3)}
    assert conditioned_rows(cond, uncond).tolist() == [True, False, True, False]
    cond["mask"][1, 2] = 0.0  # a row whose label is null but whose mask is not
    assert conditioned_rows(cond, uncond).tolist() == [True, True, True, False]
    empty = {"y": torch.zeros(0, dtype=torch.long)}
    assert conditioned_rows(empty, empty).shape == (0,)


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"guidance_difference": "data", "guidance_scale": 0.0}, "guidance_difference='data' is given"),
    ({"guidance_difference": "data", "guidance_scale": 1.0}, "guidance_scale must be < 1"),
    ({"guidance_difference": "data", "image_free": True}, "guidance_difference='data' reads the data velocity"),
], ids=["no guidance", "scale 1", "image free"])
def test_a_data_difference_the_configuration_cannot_honour_is_refused_by_name(kwargs, named):
    with pytest.raises(ValueError, match=named):
        TwinFlowLoss(**kwargs)


def test_an_unknown_guidance_difference_is_refused_naming_it():
    with pytest.raises((ValueError, TypeCheckError), match="guidance_difference"):  # the Literal, under type checking
        TwinFlowLoss(guidance_difference="conditional")
