"""The one contract between twinloss and a backbone.

Time convention (stated once, used everywhere in twinloss)
-----------------------------------------------------------
``t = 1`` is pure noise, ``t = 0`` is data, and on the default linear path

    x_t = t * z + (1 - t) * x,        velocity  v = dx_t/dt = z - x.

A model is a *two-time* velocity field ``F(x_t, t, r)``: the average velocity
that carries ``x_t`` from time ``t`` to an earlier target time ``r <= t`` in
one jump, ``x_r = x_t - (t - r) * F``. ``r = t`` is the ordinary instantaneous
velocity, ``r = 0`` the one-step (1-NFE) generator.

A **negative** time marks the twin (fake) trajectory: ``F(x_t, -t, -r)`` is the
velocity field of the flow from noise to the model's *own* one-step samples.
The interpolant always uses ``|t|``; only the time signal the network sees
carries the sign. Adapters (``twinloss_adapters``) convert these times to a
backbone's own units; nothing else in twinloss does.
"""

import functools
import inspect
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

__all__ = [
    "Conditioning",
    "VelocityModel",
    "check_conditioning",
    "check_model_keywords",
    "check_uncond_matches",
    "concat_conditioning",
    "select_rows",
    "with_first_rows_appended",
]

Conditioning = Mapping[str, Tensor]
"""Keyword tensors passed to the model, each with the batch as its first dim."""

RESERVED_KEYWORDS = frozenset({"x_t", "t", "r"})


@runtime_checkable
class VelocityModel(Protocol):
    """What TwinFlowLoss and AnyStepSampler call.

    ``model(x_t, t, r, **cond) -> velocity`` where

    * ``x_t``: the interpolant, ``[B, ...]`` (any trailing shape), in the
      model's dtype;
    * ``t``, ``r``: signed float tensors of shape ``[B]`` with
      ``|r| <= |t| <= 1`` and ``sign(r) == sign(t)``; a negative sign selects
      the twin (fake) trajectory;
    * ``cond``: batch-leading conditioning tensors (class labels, text
      embeddings, masks), sliced by twinloss per row group;
    * returns the average velocity ``F(x_t, t, r)`` with the shape of ``x_t``.

    Any ``nn.Module`` or function with this signature qualifies; the adapters
    in ``twinloss_adapters`` turn stock diffusers transformers into one.
    """

    def __call__(
        self,
        x_t: Tensor,
        t: Float[Tensor, " batch"],
        r: Float[Tensor, " batch"],
        **cond: Tensor,
    ) -> Tensor: ...


def check_conditioning(
    cond: Conditioning | None, batch_size: int, *, name: str, x: Tensor | None = None
) -> dict[str, Tensor]:
    """Validate a conditioning mapping and return a shallow copy of it.

    Raises:
        ValueError: naming ``name[key]`` if a value is not a tensor, does not
            lead with the batch dimension, or a key collides with ``x_t``,
            ``t`` or ``r``; with ``x`` (the data), also for a tensor on another
            device, and a batch mismatch says which of the two sizes ``x`` has.
    """
    if cond is None:
        return {}
    if not isinstance(cond, Mapping):
        raise ValueError(f"{name} must be a mapping of str to tensors, got {type(cond).__name__}")
    checked = {}
    for key, value in cond.items():
        if not isinstance(key, str):
            raise ValueError(f"{name} keys must be strings, got {key!r}")
        if key in RESERVED_KEYWORDS:
            raise ValueError(
                f"{name}[{key!r}] collides with the model's positional argument {key!r}; "
                "rename the conditioning key"
            )
        if not isinstance(value, Tensor):
            raise ValueError(f"{name}[{key!r}] must be a torch.Tensor, got {type(value).__name__}")
        if value.ndim == 0 or value.shape[0] != batch_size:
            source = "" if x is None else f" of x (x has shape {tuple(x.shape)}; an unbatched x needs x[None])"
            raise ValueError(
                f"{name}[{key!r}] must lead with the batch dimension {batch_size}{source}, "
                f"got shape {tuple(value.shape)}"
            )
        if x is not None and value.device != x.device:
            raise ValueError(f"{name}[{key!r}] is on {value.device}, but x is on {x.device}; move it to x's device")
        checked[key] = value
    return checked


def check_uncond_matches(cond: Conditioning, uncond: Conditioning) -> None:
    """Refuse an ``uncond`` that cannot be batched with ``cond`` in one call.

    Raises:
        ValueError: naming the key, for other keys, another dtype or other
            trailing dims (``torch.cat`` would fail or silently promote).
    """
    if set(uncond) != set(cond):
        raise ValueError(f"uncond must have the keys of cond {sorted(cond)}, got {sorted(uncond)}")
    for key, value in cond.items():
        other = uncond[key]
        if other.dtype != value.dtype:
            raise ValueError(f"uncond[{key!r}] must have cond[{key!r}]'s dtype {value.dtype}, got {other.dtype}")
        if other.shape[1:] != value.shape[1:]:
            raise ValueError(
                f"uncond[{key!r}] must have cond[{key!r}]'s trailing shape {tuple(value.shape[1:])}, "
                f"got {tuple(other.shape[1:])}"
            )


@functools.lru_cache(maxsize=256)
def _keywords_of_function(function: object, bound: bool) -> frozenset[str] | None:
    """The keyword names ``function`` accepts (without ``self`` when ``bound``); None: any, or unreadable."""
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return None
    if bound and parameters:
        parameters = parameters[1:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    keyword_kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return frozenset(p.name for p in parameters if p.kind in keyword_kinds)


def _accepted_keywords(target: object) -> frozenset[str] | None:
    """:func:`_keywords_of_function` for any callable; cached per function, as a loss calls it every step."""
    function = getattr(target, "__func__", None)  # a bound method: cache on the function itself
    if function is not None and inspect.isfunction(function):
        return _keywords_of_function(function, True)
    if inspect.isfunction(target):
        return _keywords_of_function(target, False)
    return _keywords_of_function.__wrapped__(target, False)  # other callables: read each time (may be unhashable)


def check_model_keywords(model: object, cond: Conditioning, *, name: str = "cond") -> None:
    """Reject conditioning keys the model's signature cannot accept.

    A misspelled key must not vanish into ``**kwargs`` unnoticed, nor surface
    as a ``TypeError`` deep inside a training step. Models whose signature
    cannot be read, or that accept ``**kwargs``, are trusted.
    """
    if not cond:
        return
    accepted = _accepted_keywords(model.forward if isinstance(model, nn.Module) else model)
    if accepted is None:
        return
    unknown = sorted(set(cond) - accepted)
    if unknown:
        raise ValueError(
            f"{name} has keys {unknown} that the model does not accept; "
            f"its keyword arguments are {sorted(accepted - RESERVED_KEYWORDS)}"
        )


def select_rows(cond: Conditioning, rows: slice | Tensor) -> dict[str, Tensor]:
    """Index every conditioning tensor by the same rows (a view for slices)."""
    return {key: value[rows] for key, value in cond.items()}


def conditioned_rows(cond: Conditioning, uncond: Conditioning) -> Bool[Tensor, " batch"]:
    """The rows whose conditioning differs from the null one in some tensor (dropped rows are ``False``).

    ``cond`` and ``uncond`` have the same keys and shapes (:func:`check_uncond_matches`).
    """
    rows = None
    for key, value in cond.items():
        differs = value != uncond[key]
        if differs.dim() > 1:
            differs = differs.flatten(1).any(dim=1)
        rows = differs if rows is None else rows | differs
    if rows is None:
        raise ValueError("cond is empty: there is no conditioning to compare with uncond")
    return rows


def with_first_rows_appended(cond: Conditioning, count: int) -> dict[str, Tensor]:
    """Every conditioning tensor followed by copies of its first ``count`` rows (cycling past the end): new tensors."""
    if count == 0:
        return dict(cond)
    out = {}
    for key, value in cond.items():
        rows = torch.arange(count, device=value.device) % value.shape[0]
        out[key] = torch.cat([value, value[rows]])
    return out


def concat_conditioning(*conds: Conditioning) -> dict[str, Tensor]:
    """Concatenate conditioning mappings along the batch, for one batched call.

    Raises:
        ValueError: if the mappings do not share the same keys.
    """
    keys = set(conds[0])
    for other in conds[1:]:
        if set(other) != keys:
            raise ValueError(
                f"uncond must have the same keys as cond to batch them in one call; "
                f"got {sorted(keys)} and {sorted(other)}"
            )
    return {key: torch.cat([c[key] for c in conds]) for key in conds[0]}
