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

Finite-value policy (docs/errors.md): with ``check_finite`` on, every pass
output and every input the step reads (``x``, each floating ``cond`` and
``uncond`` tensor) adds a device-side flag ``isfinite(.).all()``; nothing is
read back until :meth:`StepEvaluator.nonfinite_source`, which reads all flags
in one device sync and names the first source, in the order the step produced
them, that held NaN or infinity.
"""

import contextlib
import importlib
from collections.abc import Mapping
from typing import Literal, get_args

import torch
from jaxtyping import Float, Shaped
from torch import Tensor, nn

from twinloss._random import RandomState
from twinloss.protocol import Conditioning, VelocityModel
from twinloss.teachers import Teacher

__all__ = ["PASSES", "PassName", "StepEvaluator", "check_not_stock_transformer"]

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
        check_finite: flag non-finite pass outputs and inputs (one device
            sync per step, in :meth:`nonfinite_source`).
        batch_shape: the caller's ``x`` shape, named in shape errors of a
            pass that evaluates only some of its rows.
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
        check_finite: bool = True,
        batch_shape: tuple[int, ...] | None = None,
    ) -> None:
        self.model = model
        self.teachers = {"guidance": guidance_teacher, "rcgm": rcgm_teacher}
        self.input_dtype = input_dtype
        self.output_dtype = output_dtype
        self.random_state = random_state
        self.calls = dict.fromkeys(PASSES, 0)
        self.rows = dict.fromkeys(PASSES, 0)
        self.check_finite = check_finite
        self.batch_shape = batch_shape
        self.finite_flags: dict[str, Tensor] = {}  # source -> 0-dim bool on the device, in order of production

    def watch(self, source: str, value: Tensor) -> None:
        """Add ``isfinite(value).all()`` to the flag of ``source`` (no device sync); integer tensors are always finite."""
        if not self.check_finite or not (value.is_floating_point() or value.is_complex()):
            return
        flag = torch.isfinite(value).all()
        previous = self.finite_flags.get(source)
        self.finite_flags[source] = flag if previous is None else previous & flag

    def watch_inputs(self, x: Tensor, cond: Mapping[str, Tensor], uncond: Mapping[str, Tensor] | None) -> None:
        """Flag the step's inputs: ``x``, then ``cond[key]`` and ``uncond[key]`` for each floating tensor."""
        self.watch("x", x)
        for name, mapping in (("cond", cond), ("uncond", uncond or {})):
            for key, value in mapping.items():
                self.watch(f"{name}[{key!r}]", value)

    def nonfinite_source(self) -> str | None:
        """The first watched source that held NaN or infinity, or ``None``; the step's one device sync."""
        if not self.finite_flags:
            return None
        finite = torch.stack(list(self.finite_flags.values())).tolist()
        return next((source for source, ok in zip(self.finite_flags, finite, strict=True) if not ok), None)

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
            out = self._call(name, x_in, t, r, cond)
            self._check_grad(x_t, out)
        else:
            context = self.random_state.replay() if self.random_state is not None else contextlib.nullcontext()
            with context, torch.no_grad():
                out = self._call(name, x_in, t, r, cond)
        out = self.checked(name, x_t.shape, out, batch_shape=self.batch_shape).to(self.output_dtype)
        self.watch(name, out)
        return out

    def _call(self, name: PassName, x_in: Tensor, t: Tensor, r: Tensor, cond: Conditioning) -> object:
        """Run pass ``name``; a dtype clash between the data and the model's weights becomes a ValueError naming ``x``."""
        try:
            if name in self.teachers:
                return self.teachers[name](self.model, x_in, t, r, cond)
            return self.model(x_in, t, r, **cond)
        except RuntimeError as error:
            weights = _weight_dtype(self.model)
            if weights is not None and weights != x_in.dtype and "dtype" in str(error):
                raise ValueError(
                    f"x has dtype {x_in.dtype}, but the model's weights are {weights} (the {name} pass failed "
                    f"with: {error}); cast the data or the model so they match"
                ) from error
            raise

    def _check_grad(self, x_t: Tensor, out: object) -> None:
        """Refuse a main-pass output cut from the graph while gradient could flow (it would fail at backward)."""
        if not isinstance(out, Tensor) or out.requires_grad or not torch.is_grad_enabled():
            return
        trainable = isinstance(self.model, nn.Module) and any(p.requires_grad for p in self.model.parameters())
        if trainable or x_t.requires_grad:
            raise ValueError(
                "model returned a velocity that does not require grad in the main pass, although "
                + ("the model has trainable parameters" if trainable else "x requires grad")
                + ": it is detached (a .detach(), torch.no_grad() or .data inside forward?), so backward would fail"
            )

    @staticmethod
    def checked(
        name: str, shape: tuple[int, ...], out: object, *, batch_shape: tuple[int, ...] | None = None
    ) -> Shaped[Tensor, " batch *shape"]:
        """The one place where a model output is checked: a tensor of exactly ``shape`` (its input's).

        The full shape, batch included: a ``[1, D]`` output for 4 rows would
        broadcast silently. Used for every pass of the loss and by the
        sampler (``name`` then names the sampler's call).

        Raises:
            ValueError: naming the pass and who evaluated it, if the output is
                not a tensor of ``shape``; with ``batch_shape``, also the
                caller's batch the pass's rows were taken from.
        """
        if isinstance(out, Tensor) and out.shape == shape:
            return out
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        who = f"the {name} teacher" if name in ("guidance", "rcgm") else "model"
        rows = ""
        if batch_shape is not None and tuple(batch_shape) != tuple(shape):
            rows = f" for {shape[0]} rows built from the caller's batch x of shape {tuple(batch_shape)}"
        raise ValueError(f"{who} must return a velocity of shape {tuple(shape)}{rows}, got {got} (in the {name} pass)")


def _weight_dtype(model: object) -> torch.dtype | None:
    """The dtype of the model's first floating-point parameter, or ``None`` (not a module, or none)."""
    if not isinstance(model, nn.Module):
        return None
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def check_not_stock_transformer(model: object, *, argument: str = "model") -> None:
    """Refuse a stock diffusers model: it does not take ``(x_t, t, r, **cond)``.

    The message names the ``twinloss_adapters`` modules whose ``adapt`` binds
    it, when that package is importable and has one for the class.

    Raises:
        ValueError: naming ``argument``, the class and the ``adapt`` to call.
    """
    if not type(model).__module__.startswith("diffusers."):
        return
    name = type(model).__name__
    backbones: list[str] = []
    try:
        backbones = importlib.import_module("twinloss_adapters.stock").adapter_modules_for(model)
    except ImportError:
        pass
    calls = [f"twinloss_adapters.{backbone}.adapt({argument})" for backbone in backbones]
    how = " or ".join(calls) if calls else "the matching twinloss_adapters.<backbone>.adapt"
    raise ValueError(
        f"{argument} is a stock diffusers {name}, which takes its own arguments, not (x_t, t, r, **cond); "
        f"adapt it first with {how}"
    )
