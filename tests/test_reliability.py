"""Finite-value policy and the errors that name what the caller did (issue 13).

Each test here failed on the code before the reliability change: it either
passed a NaN through silently, or failed deep inside torch with a message
that did not name the argument.
"""

import pytest
import torch
from core_models import TinyVelocityNet
from jaxtyping import TypeCheckError
from torch import Tensor, nn

from twinloss import EMATeacher, TwinFlowLoss
from twinloss.evaluator import StepEvaluator
from twinloss.loss import RELEASED_GUIDANCE

SHAPE = (4,)
BATCH = 8


def _batch(dtype: torch.dtype = torch.float32) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, *SHAPE, generator=g).to(dtype)
    y = torch.randint(0, 4, (BATCH,), generator=g)
    return x, {"y": y}, {"y": torch.full_like(y, 4)}


class NaNInPass(nn.Module):
    """A model whose output is NaN whenever the pass matches ``poison(t, r, grad)``."""

    def __init__(self, poison) -> None:
        super().__init__()
        self.inner = TinyVelocityNet(SHAPE)
        self.poison = poison

    def forward(self, x_t: Tensor, t: Tensor, r: Tensor, y: Tensor | None = None) -> Tensor:
        out = self.inner(x_t, t, r, y)
        if self.poison(t, r, torch.is_grad_enabled()):
            out = out * float("nan")
        return out


# How each pass can be recognised from its times alone (default recipe, batch of 8):
# fake: t = 1, r = 0 without grad and all t = 1; rectify: t = r with negative first half;
# main: the only call with grad; guidance: t = r > 0 for every row, no grad, 2x rows.
PASS_POISON = {
    "fake": lambda t, r, grad: not grad and bool((t == 1).all()) and bool((r == 0).all()),
    "main": lambda t, r, grad: grad,
    "rectify": lambda t, r, grad: not grad and bool((t < 0).any()) and bool((t == r).all()) and bool((t > 0).any()),
    "rcgm": lambda t, r, grad: not grad and bool((t > 0).all()) and not bool((t == r).all()) and not bool((t == 1).all()),
}


@pytest.mark.parametrize("name", sorted(PASS_POISON))
def test_a_nan_in_one_pass_raises_naming_that_pass(name):
    torch.manual_seed(0)
    model = NaNInPass(PASS_POISON[name])
    x, cond, uncond = _batch()
    with pytest.raises(ValueError, match=f"the {name} pass produced NaN"):
        TwinFlowLoss(guidance_scale=0.0)(model, x, cond=cond, generator=torch.Generator().manual_seed(1))


def test_a_nan_in_the_guidance_pass_is_named():
    torch.manual_seed(0)
    model = NaNInPass(lambda t, r, grad: not grad and t.shape[0] % 2 == 0 and bool((t == r).all()) and bool((t > 0).all()))
    x, cond, uncond = _batch()
    loss_fn = TwinFlowLoss(estimate_order=0, rectify_weight=0.0, **RELEASED_GUIDANCE)  # every real row at 0 < t < 1
    with pytest.raises(ValueError, match="the guidance pass produced NaN"):
        loss_fn(model, x, cond=cond, uncond=uncond, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("where", ["cond", "uncond"])
def test_a_nan_in_a_floating_cond_or_uncond_tensor_is_named_with_its_key(where):
    class TextModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = TinyVelocityNet(SHAPE)
            self.text = nn.Linear(3, 4)

        def forward(self, x_t, t, r, text):
            return self.net(x_t, t, r) + self.text(text)

    x, _, _ = _batch()
    cond, uncond = {"text": torch.randn(BATCH, 3)}, {"text": torch.zeros(BATCH, 3)}
    {"cond": cond, "uncond": uncond}[where]["text"][3, 1] = float("nan")
    with pytest.raises(ValueError, match=rf"{where}\['text'\] contains NaN"):
        TwinFlowLoss()(TextModel(), x, cond=cond, uncond=uncond, generator=torch.Generator().manual_seed(1))


def test_nan_in_x_is_still_refused_by_default():
    x, cond, uncond = _batch()
    x[2, 0] = float("inf")
    with pytest.raises(ValueError, match="x contains NaN or infinite"):
        TwinFlowLoss()(TinyVelocityNet(SHAPE), x, cond=cond, uncond=uncond)


def test_report_mode_names_the_pass_and_off_mode_checks_nothing():
    torch.manual_seed(0)
    model = NaNInPass(PASS_POISON["fake"])
    x, cond, _ = _batch()
    reported = TwinFlowLoss(guidance_scale=0.0, check_finite="report")(model, x, cond=cond)
    assert reported.nonfinite_source == "fake" and reported.finite is False
    unchecked = TwinFlowLoss(guidance_scale=0.0, check_finite="off")(model, x, cond=cond)
    assert unchecked.nonfinite_source is None and torch.isnan(unchecked.loss)
    healthy = TwinFlowLoss(guidance_scale=0.0, check_finite="report")(TinyVelocityNet(SHAPE), x, cond=cond)
    assert healthy.finite and torch.isfinite(healthy.loss)


def test_check_finite_takes_only_the_three_policies():
    # under the test run's runtime type checking the annotation refuses it first
    with pytest.raises((ValueError, TypeCheckError), match="check_finite"):
        TwinFlowLoss(check_finite=True)


def test_the_finite_check_reads_the_device_once_per_step(monkeypatch):
    reads = []
    original = StepEvaluator.nonfinite_source

    def counting(self):
        reads.append(len(self.finite_flags))
        return original(self)

    monkeypatch.setattr(StepEvaluator, "nonfinite_source", counting)
    x, cond, uncond = _batch()
    TwinFlowLoss(**RELEASED_GUIDANCE)(TinyVelocityNet(SHAPE), x, cond=cond, uncond=uncond)  # every pass runs
    # x, cond['y'] is an int tensor (always finite), uncond likewise; 5 passes and the loss
    assert reads == [1 + 5 + 1]


def test_skipping_a_reported_nonfinite_step_leaves_weights_and_teacher_untouched():
    """The docs/errors.md recipe: check ``out.finite``; skip backward, the optimizer and the teacher update."""
    torch.manual_seed(0)
    poisoned = {"on": False}
    model = NaNInPass(lambda t, r, grad: poisoned["on"] and grad)
    teacher = EMATeacher(0.9)
    loss_fn = TwinFlowLoss(teacher=teacher, check_finite="report")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, cond, uncond = _batch()

    def train_step() -> bool:
        out = loss_fn(model, x, cond=cond, uncond=uncond)
        optimizer.zero_grad()
        if not out.finite:
            return False
        out.loss.backward()
        optimizer.step()
        loss_fn.update_teachers(model)
        return True

    assert train_step()
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    shadow = {name: p.clone() for name, p in teacher.shadow.items()}
    updates = teacher.num_updates
    poisoned["on"] = True
    assert not train_step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), weights[name], rtol=0, atol=0)
        torch.testing.assert_close(teacher.shadow[name], shadow[name], rtol=0, atol=0)
    assert teacher.num_updates == updates
    poisoned["on"] = False
    assert train_step()  # the run goes on with finite weights
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------------ clear errors
def test_int_cond_with_float_uncond_names_the_key_and_both_dtypes():
    x, cond, _ = _batch()
    with pytest.raises(ValueError, match=r"uncond\['y'\] must have cond\['y'\]'s dtype torch.int64, got torch.float32"):
        TwinFlowLoss()(TinyVelocityNet(SHAPE), x, cond=cond, uncond={"y": torch.zeros(BATCH)})


def test_cond_and_uncond_with_other_trailing_shapes_name_the_key():
    def model(x_t, t, r, text):
        return x_t

    x, _, _ = _batch()
    with pytest.raises(ValueError, match=r"uncond\['text'\] must have cond\['text'\]'s trailing shape \(5, 3\), got \(4, 3\)"):
        TwinFlowLoss()(model, x, cond={"text": torch.zeros(BATCH, 5, 3)}, uncond={"text": torch.zeros(BATCH, 4, 3)})


def test_data_dtype_other_than_the_model_names_x_and_both_dtypes():
    x, cond, uncond = _batch(torch.float64)
    with pytest.raises(ValueError, match="x has dtype torch.float64, but the model's weights are torch.float32"):
        TwinFlowLoss()(TinyVelocityNet(SHAPE), x, cond=cond, uncond=uncond)


@pytest.mark.parametrize("generator", [0, "seed", torch.Generator])
def test_generator_that_is_not_a_generator_is_named(generator):
    x, cond, uncond = _batch()
    loss_fn, model = TwinFlowLoss(), TinyVelocityNet(SHAPE)
    with pytest.raises((ValueError, TypeCheckError), match="generator"):  # the annotation, under type checking
        loss_fn(model, x, cond=cond, uncond=uncond, generator=generator)
    with pytest.raises(ValueError, match="generator must be a torch.Generator or None, got"):  # without it
        loss_fn._check_inputs(model, x, cond, uncond, generator)


def test_a_detached_model_output_is_refused_before_backward():
    class Detached(TinyVelocityNet):
        def forward(self, x_t, t, r, y=None):
            return super().forward(x_t, t, r, y).detach()

    x, cond, uncond = _batch()
    with pytest.raises(ValueError, match="does not require grad in the main pass, although the model has trainable"):
        TwinFlowLoss()(Detached(SHAPE), x, cond=cond, uncond=uncond)


def test_a_frozen_model_under_no_grad_is_not_mistaken_for_a_detached_one():
    model = TinyVelocityNet(SHAPE).requires_grad_(False)
    x, cond, uncond = _batch()
    assert torch.isfinite(TwinFlowLoss()(model, x, cond=cond, uncond=uncond).loss)


def test_unbatched_data_is_blamed_on_x_not_on_cond():
    def model(x_t, t, r, y):
        return x_t

    unbatched = torch.randn(4, 3)  # one sample [C, W] given without its batch dim
    with pytest.raises(ValueError, match=r"of x \(x has shape \(4, 3\); an unbatched x needs x\[None\]\)"):
        TwinFlowLoss(guidance_scale=0.0)(model, unbatched, cond={"y": torch.tensor([1])})


def test_a_group_shape_error_shows_the_callers_batch():
    def model(x_t, t, r):
        return x_t[:1]  # ignores the batch

    x, _, _ = _batch()
    with pytest.raises(ValueError, match=r"shape \(7, 4\) for 7 rows built from the caller's batch x of shape \(8, 4\)"):
        TwinFlowLoss(guidance_scale=0.0)(model, x)


def test_cond_on_another_device_than_x_is_named():
    x, cond, uncond = _batch()
    with pytest.raises(ValueError, match=r"cond\['y'\] is on meta, but x is on cpu"):
        TwinFlowLoss()(TinyVelocityNet(SHAPE), x, cond={"y": cond["y"].to("meta")}, uncond=uncond)


def test_a_stock_diffusers_transformer_is_refused_naming_the_adapt_to_call():
    diffusers = pytest.importorskip("diffusers")
    stock = diffusers.SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=4, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
        sample_size=4, patch_size=1,
    )
    x = torch.randn(4, 4, 4, 4)
    with pytest.raises(ValueError, match=r"stock diffusers SanaTransformer2DModel.*twinloss_adapters\.sana\.adapt\(model\)"):
        TwinFlowLoss(guidance_scale=0.0)(stock, x, cond={"encoder_hidden_states": torch.randn(4, 3, 8)})


# ------------------------------------------------------------------ sampler
@pytest.mark.parametrize("guidance_scale", [0.0, 2.0])
def test_the_sampler_refuses_a_velocity_that_would_broadcast_over_the_batch(guidance_scale):
    from twinloss import AnyStepSampler

    def one_row(x_t, t, r, y):
        return x_t[:1]  # [1, D] for every batch: broadcasting it would give a "valid" sample

    noise = torch.randn(4, 3)
    y = torch.zeros(4, dtype=torch.long)
    rows = 4 if guidance_scale == 0 else 8
    with pytest.raises(ValueError, match=rf"velocity of shape \({rows}, 3\), got \(1, 3\) \(in the sampler pass\)"):
        uncond = {"y": y} if guidance_scale > 0 else None
        AnyStepSampler(2, guidance_scale=guidance_scale)(one_row, noise, cond={"y": y}, uncond=uncond)


@pytest.mark.parametrize(
    "uncond_y,match",
    [
        (torch.zeros(4, 2, dtype=torch.float64), r"uncond\['y'\] must have cond\['y'\]'s dtype torch.float32, got torch.float64"),
        (torch.zeros(4, 3), r"uncond\['y'\] must have cond\['y'\]'s trailing shape \(2,\), got \(3,\)"),
    ],
)
def test_the_sampler_refuses_an_uncond_of_another_dtype_or_trailing_shape_naming_the_key(uncond_y, match):
    from twinloss import AnyStepSampler

    calls = []

    def model(x_t, t, r, y):
        calls.append(y.dtype)
        return x_t

    with pytest.raises(ValueError, match=match):
        AnyStepSampler(2, guidance_scale=2.0)(model, torch.randn(4, 3), cond={"y": torch.zeros(4, 2)}, uncond={"y": uncond_y})
    assert calls == []  # refused before any model call (a float64 uncond would otherwise promote the batched cond)
