"""Every model evaluation of one TwinFlow step, in one typed place.

A :class:`StepEvaluator` lives for one call of
:class:`~twinloss.TwinFlowLoss`. Each evaluation names its pass:

=========== ============================== ======================= =========
pass        what                           evaluated by            grad
=========== ============================== ======================= =========
``fake``    one-jump samples ``F(z',1,0)`` the online model        no
``guidance`` cond and uncond ``F(x,t,t)``  the guidance teacher    no
``rcgm``    the RCGM chain's Euler jumps   the RCGM teacher        no
``main``    ``F_theta(x_t, t, r)``         the online model        yes
``rectify`` ``F(y, -s, -s)``, ``F(y,s,s)`` the online model        no
=========== ============================== ======================= =========

For every pass the evaluator casts the input to the model's dtype, runs the
pass from the step's shared random state (matching dropout masks, see
:class:`~twinloss._random.RandomState`), checks the output's full shape in
:meth:`StepEvaluator.checked` (one place per pass), casts it to the working
dtype and counts the call and its rows.
"""

import contextlib
from typing import Literal, get_args

import torch
from jaxtyping import Float, Shaped
from torch import Tensor

from twinloss._random import RandomState
from twinloss.protocol import Conditioning, VelocityModel
from twinloss.teachers import Teacher

__all__ = ["PASSES", "PassName", "StepEvaluator"]

PassName = Literal["fake", "guidance", "rcgm", "main", "rectify"]
PASSES: tuple[str, ...] = get_args(PassName)


class StepEvaluator:
    """Makes, checks and counts the model calls of one training step.

    Args:
        model: the online model (called for ``fake``, ``main``, ``rectify``).
        guidance_teacher: evaluates the ``guidance`` pass.
        rcgm_teacher: evaluates the ``rcgm`` pass.
        input_dtype: the dtype every model input is cast to (the data's).
        output_dtype: the dtype every output is cast to (at least float32).
        random_state: the snapshot every pass starts from, or ``None`` to let
            the passes consume the global stream one after another.
    """

    def __init__(
        self,
        model: VelocityModel,
        *,
        guidance_teacher: Teacher,
        rcgm_teacher: Teacher,
        input_dtype: torch.dtype,
        output_dtype: torch.dtype,
        random_state: RandomState | None,
    ) -> None:
        self.model = model
        self.teachers = {"guidance": guidance_teacher, "rcgm": rcgm_teacher}
        self.input_dtype = input_dtype
        self.output_dtype = output_dtype
        self.random_state = random_state
        self.calls = dict.fromkeys(PASSES, 0)
        self.rows = dict.fromkeys(PASSES, 0)

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())

    def __call__(
        self,
        name: PassName,
        x_t: Float[Tensor, " batch *shape"],
        t: Float[Tensor, " batch"],
        r: Float[Tensor, " batch"],
        cond: Conditioning,
    ) -> Float[Tensor, " batch *shape"]:
        """Evaluate pass ``name`` at ``(x_t, t, r, **cond)``; only ``main`` carries grad."""
        if name not in PASSES:
            raise ValueError(f"name must be one of {PASSES}, got {name!r}")
        self.calls[name] += 1
        self.rows[name] += x_t.shape[0]
        x_in = x_t.to(self.input_dtype)
        if name == "main":
            if self.random_state is not None:
                # leaves the global stream as one forward from the snapshot would
                self.random_state.restore()
            out = self.model(x_in, t, r, **cond)
        else:
            context = self.random_state.replay() if self.random_state is not None else contextlib.nullcontext()
            with context, torch.no_grad():
                if name in self.teachers:
                    out = self.teachers[name](self.model, x_in, t, r, cond)
                else:
                    out = self.model(x_in, t, r, **cond)
        return self.checked(name, x_t, out).to(self.output_dtype)

    @staticmethod
    def checked(name: PassName, x_t: Tensor, out: object) -> Shaped[Tensor, " batch *shape"]:
        """The one place where the output of pass ``name`` is checked: a tensor shaped like ``x_t``.

        Raises:
            ValueError: naming the pass and who evaluated it, if the output is
                not a tensor of ``x_t``'s shape.
        """
        if isinstance(out, Tensor) and out.shape == x_t.shape:
            return out
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        who = f"the {name} teacher" if name in ("guidance", "rcgm") else "model"
        raise ValueError(f"{who} must return a velocity of shape {tuple(x_t.shape)}, got {got} (in the {name} pass)")
