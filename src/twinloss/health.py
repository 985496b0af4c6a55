r"""Training-health signals of a TwinFlow step, as detached scalars a trainer logs.

:func:`training_signals` evaluates the loss on one batch and splits its
parameter gradient into the terms that make it up,

.. math::
    \nabla L = \underbrace{\nabla L_\text{one}
      + \nabla L_\text{multi} + \nabla L_\text{any}}_{\nabla L_\text{base}}
      + \nabla L_\text{adv} + c_\text{rect} \nabla L_\text{rectify},

reporting each term's value, its gradient's norm, and the cosine of its
gradient with :math:`\nabla L_\text{base}` (the flow-matching / RCGM part the
twin terms must not fight), plus how often the two clamps bind. It uses only
the loss's public interface: the loss is called twice from the same random
state (once as configured, once with ``rectify_weight = 0``), the gradient
with respect to the one grad-carrying prediction is taken from a forward hook,
and each term's share of it is back-propagated to the parameters alone.

Cost: two loss evaluations and seven backward passes of the prediction (the
clamp rates are the loss's own, :attr:`~twinloss.TwinFlowOutput.clamp_rates`);
call it every few hundred steps, not every step. Neither the model's ``.grad`` nor the global random state changes;
the ``generator`` advances as one loss call would advance it.

Reading them (``docs/health.md``): a healthy run keeps the twin terms'
cosines with the base gradient near zero or positive; a persistently negative
``cos/rectify`` means the rectification pushes the generator against its own
base target (the fight with guidance in ``docs/quality.md``); clamp rates
near 1 mean the targets saturate and the step size, not the error, sets the
update.
"""

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from twinloss._random import RandomState
from twinloss.loss import TwinFlowLoss
from twinloss.protocol import Conditioning, VelocityModel
from twinloss.trajectory import GROUPS, contiguous_groups

__all__ = ["TrainingSignals", "training_signals"]

BASE_TERMS = ("base/one_step", "base/multi_step", "base/any_step")
TERMS = (*BASE_TERMS, "adv", "rectify")


@dataclass(frozen=True)
class TrainingSignals:
    """One reading of :func:`training_signals`; every value is a Python float.

    Attributes:
        terms: the loss's own detached terms (``loss``, ``base``, ``adv``,
            ``rectify``, ``base/<group>``).
        grad_norms: Euclidean norm of each term's parameter gradient, as the
            term enters the loss (``rectify`` includes ``c_rect``), keys
            ``base/one_step``, ``base/multi_step``, ``base/any_step``,
            ``adv``, ``rectify``, ``base`` and ``total``.
        cosines: cosine of each term's gradient with the ``base`` gradient
            (``nan`` where a gradient is zero); ``rectify/one_step`` is the
            cosine of the rectification with the one-step group's base term,
            the pair that acts on the same rows.
        residual_clamp_rate: fraction of the RCGM residual's entries on the
            real rows at or beyond ``residual_clamp``, in the evaluated step
            (:attr:`~twinloss.TwinFlowOutput.clamp_rates`; 0 without an RCGM chain).
        rectify_clamp_rate: fraction of the velocity gap's entries at or
            beyond ``rectify_clamp``, in the evaluated step (0 without a
            rectification).
    """

    terms: dict[str, float]
    grad_norms: dict[str, float]
    cosines: dict[str, float]
    residual_clamp_rate: float
    rectify_clamp_rate: float

    def as_dict(self) -> dict[str, float]:
        """Flat ``{name: value}`` for a logger (``grad_norm/...``, ``cos/...``, ``clamp/...``)."""
        flat = {f"term/{k}": v for k, v in self.terms.items()}
        flat.update({f"grad_norm/{k}": v for k, v in self.grad_norms.items()})
        flat.update({f"cos/{k}": v for k, v in self.cosines.items()})
        flat["clamp/residual"] = self.residual_clamp_rate
        flat["clamp/rectify"] = self.rectify_clamp_rate
        return flat


class _Prediction:
    """Forward hook keeping the output of the call that carries grad."""

    def __init__(self) -> None:
        self.output: Tensor | None = None

    def __call__(self, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        if isinstance(output, Tensor) and output.requires_grad:
            self.output = output


def _cosine(a: Tensor, b: Tensor) -> float:
    norms = float(a.norm() * b.norm())
    return float(a @ b) / norms if norms > 0 else math.nan


def training_signals(
    loss_fn: TwinFlowLoss,
    model: VelocityModel,
    x: Tensor,
    *,
    cond: Conditioning | None = None,
    uncond: Conditioning | None = None,
    generator: torch.Generator | None = None,
) -> TrainingSignals:
    """Evaluate ``loss_fn`` on ``x`` and split its gradient into its terms (see the module).

    Args:
        loss_fn: the training loss, used as configured (never modified).
        model: the online ``nn.Module`` (single process; the gradients are this
            process's, not reduced across ranks).
        x, cond, uncond, generator: as for ``loss_fn``.

    Raises:
        ValueError: if ``model`` is not an ``nn.Module`` or has no trainable parameters.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"training_signals needs the model to be an nn.Module, got {type(model).__name__}")
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise ValueError("the model has no parameters that require grad")
    random_state = RandomState(x.device)
    full, gradients = _term_gradients(loss_fn, model, parameters, x, cond, uncond, generator, random_state)
    gradients["base"] = sum(gradients[name] for name in BASE_TERMS)
    gradients["total"] = gradients["base"] + gradients["adv"] + gradients["rectify"]
    grad_norms = {name: float(g.norm()) for name, g in gradients.items()}
    cosines = {name: _cosine(gradients[name], gradients["base"]) for name in TERMS}
    cosines["rectify/one_step"] = _cosine(gradients["rectify"], gradients["base/one_step"])
    cosines["total"] = _cosine(gradients["total"], gradients["base"])
    return TrainingSignals(
        terms={name: float(value) for name, value in full.terms.items()},
        grad_norms=grad_norms,
        cosines=cosines,
        residual_clamp_rate=float(full.clamp_rates.get("residual", 0.0)),
        rectify_clamp_rate=float(full.clamp_rates.get("rectify", 0.0)),
    )


def _term_gradients(
    loss_fn: TwinFlowLoss,
    model: nn.Module,
    parameters: list[Tensor],
    x: Tensor,
    cond: Conditioning | None,
    uncond: Conditioning | None,
    generator: torch.Generator | None,
    random_state: RandomState,
):
    """The loss output and each term's flattened parameter gradient (see the module)."""
    without_rectify = copy.copy(loss_fn)  # shares the teacher and submodules; only the weight differs
    without_rectify.rectify_weight = 0.0
    start = None if generator is None else generator.get_state()

    def evaluate(loss: TwinFlowLoss):
        if generator is not None:
            generator.set_state(start)
        hook = _Prediction()
        handle = model.register_forward_hook(hook)
        try:
            with random_state.replay(), torch.enable_grad():
                out = loss(model, x, cond=cond, uncond=uncond, generator=generator)
        finally:
            handle.remove()
        if hook.output is None:
            raise ValueError("the loss made no grad-carrying model call (are the parameters frozen?)")
        return out, hook.output

    without, prediction = evaluate(without_rectify)
    grad_without = torch.autograd.grad(without.loss, prediction, retain_graph=True)[0]
    full, prediction_full = evaluate(loss_fn)
    grad_full = torch.autograd.grad(full.loss, prediction_full)[0]

    rows = contiguous_groups(loss_fn.trajectory.counts(x.shape[0]))
    pieces = {f"base/{name}": (grad_without, rows[name]) for name in GROUPS if name != "fake"}
    pieces["adv"] = (grad_without, rows["fake"])
    pieces["rectify"] = (grad_full - grad_without, rows["one_step"])

    gradients = {}
    for name, (grad_prediction, group) in pieces.items():
        masked = torch.zeros_like(grad_prediction)
        masked[group] = grad_prediction[group]
        grads = torch.autograd.grad(prediction, parameters, grad_outputs=masked, retain_graph=True, allow_unused=True)
        gradients[name] = torch.cat([
            (g if g is not None else torch.zeros_like(p)).detach().flatten().float() for g, p in zip(grads, parameters, strict=True)
        ])
    return full, gradients
