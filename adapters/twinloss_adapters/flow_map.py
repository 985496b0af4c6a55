"""diffusers' flow-map call on an adapted transformer: ``transformer(..., timestep=..., r_timestep=...)``.

diffusers 0.42 calls two-time models as its AnyFlow pipeline does: the
transformer takes ``timestep`` and ``r_timestep`` in the units its pipeline
feeds it (``FlowMapEulerDiscreteScheduler``). :class:`FlowMapCall` gives every
adapted transformer that keyword: a forward pre-hook pops ``r_timestep``,
converts both times to twinloss time with the adapter's
:class:`~twinloss_adapters.conventions.TimeConvention` and opens the
injection's :meth:`~twinloss_adapters.time_embedding.TimeEmbeddingInjection.times`
context for that one call; a forward hook closes it. So code written for
diffusers' flow-map models drives an adapted transformer unchanged, and the
stock pipeline's own packing, ids and text handling stay in place.

A stock pipeline passes no ``r_timestep``; :attr:`FlowMapCall.target_time`
then supplies it (``twinloss_adapters.pipelines`` points it at the
``TwinFlowScheduler``, which knows the current step's target time). With
neither, the call is the stock model's (``r = t``, no twin embedding).
"""

import contextlib
import inspect
from collections.abc import Callable

import torch
from jaxtyping import Float
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from twinloss_adapters.conventions import Capabilities, TimeConvention
from twinloss_adapters.time_embedding import TimeEmbeddingInjection

__all__ = ["FlowMapCall", "TargetTime", "find_flow_map_call"]

FLOW_MAP_ATTRIBUTE = "_twinflow_flow_map_call"

TargetTime = Callable[[Float[Tensor, " batch"]], Float[Tensor, " batch"]]
"""``t -> r``: the target time of a call from its current time (twinloss units, unsigned)."""


class FlowMapCall:
    """The ``r_timestep`` keyword on a stock transformer that carries a TwinFlow injection.

    Created by :class:`~twinloss_adapters.base.AdaptedTransformer`; removed
    with it by ``unadapt``.

    Attributes:
        target_time: where ``r`` comes from when a call passes no
            ``r_timestep`` (*default* ``None``: such a call is the stock one).
    """

    def __init__(
        self,
        transformer: nn.Module,
        injection: TimeEmbeddingInjection | None,
        time_convention: TimeConvention,
        capabilities: Capabilities,
    ) -> None:
        if find_flow_map_call(transformer) is not None:
            raise ValueError(f"{type(transformer).__name__} is already adapted; un-adapt it first")
        self.transformer = transformer
        self.injection = injection
        self.time_convention = time_convention
        self.capabilities = capabilities
        self.target_time: TargetTime | None = None
        self._open_call: contextlib.ExitStack | None = None
        self._handles: tuple[RemovableHandle, ...] = (
            transformer.register_forward_pre_hook(self._open, with_kwargs=True),
            transformer.register_forward_hook(self._close, always_call=True),
        )
        object.__setattr__(transformer, FLOW_MAP_ATTRIBUTE, self)

    def times(
        self, timestep: Tensor, r_timestep: Tensor | None
    ) -> tuple[Float[Tensor, " batch"], Float[Tensor, " batch"]]:
        """Twinloss ``(t, r)`` of a call's ``timestep`` and ``r_timestep`` (backbone units).

        Raises:
            ValueError: naming ``timestep`` / ``r_timestep`` when either is not
                one time per batch row, or the times break the adapter's
                capabilities (``r > t``, ``r != t`` without target time).
        """
        if not isinstance(timestep, Tensor) or timestep.ndim != 1 or not timestep.is_floating_point():
            raise ValueError(
                "timestep must be a float tensor [B] (one time per batch row) for an r_timestep call, got "
                f"{tuple(timestep.shape) if isinstance(timestep, Tensor) else type(timestep).__name__}"
            )
        t = self.time_convention.from_backbone(timestep)
        if r_timestep is None:
            r = self.target_time(t)
        else:
            if not isinstance(r_timestep, Tensor) or r_timestep.ndim > 1:
                raise ValueError(
                    "r_timestep must be a tensor [B] or a 0-d tensor (per-token target times are not supported), "
                    f"got {tuple(r_timestep.shape) if isinstance(r_timestep, Tensor) else type(r_timestep).__name__}"
                )
            r = self.time_convention.from_backbone(r_timestep.to(timestep.device)).expand(t.shape)
        if r.shape != t.shape:
            raise ValueError(f"r_timestep must have the shape of timestep {tuple(t.shape)}, got {tuple(r.shape)}")
        r = r.to(t.dtype)
        self.capabilities.check_times(t, r)
        return t, r

    def _open(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        has_r = "r_timestep" in kwargs
        if not has_r and self.target_time is None:
            return None  # the stock call
        kwargs = dict(kwargs)
        r_timestep = kwargs.pop("r_timestep", None)
        if self.injection is not None and self.injection.active:
            if has_r:
                raise ValueError("r_timestep was passed inside an adapter call, which sets r itself")
            return args, kwargs  # the adapter's own forward already set (t, r)
        timestep = _current_time_argument(module, args, kwargs)
        if timestep is None:
            raise ValueError(f"{type(module).__name__} was called without a timestep; r_timestep needs one")
        t, r = self.times(timestep, r_timestep)
        if self.injection is None:
            if not torch.equal(t, r):
                raise ValueError(f"{type(module).__name__} carries no TwinFlow time embedding to take r_timestep != timestep")
            return args, kwargs
        stack = contextlib.ExitStack()
        stack.enter_context(self.injection.times(t, r))
        self._open_call = stack
        return args, kwargs

    def _close(self, module: nn.Module, args: tuple, output: object) -> None:
        if self._open_call is not None:
            stack, self._open_call = self._open_call, None
            stack.close()

    def remove(self) -> None:
        """Detach both hooks from the transformer."""
        for handle in self._handles:
            handle.remove()
        if getattr(self.transformer, FLOW_MAP_ATTRIBUTE, None) is self:
            delattr(self.transformer, FLOW_MAP_ATTRIBUTE)


TIMESTEP_ARGUMENTS = ("timestep", "t")
"""Names of the current time in stock ``forward`` signatures: ``timestep`` (every diffusers
transformer here) or ``t`` (``ZImageTransformer2DModel``)."""


def _current_time_argument(module: nn.Module, args: tuple, kwargs: dict) -> object:
    """The call's current time, by keyword or by position (``None`` if it has none)."""
    for name in TIMESTEP_ARGUMENTS:
        if name in kwargs:
            return kwargs[name]
    bound = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
    return next((bound[name] for name in TIMESTEP_ARGUMENTS if name in bound), None)


def find_flow_map_call(transformer: nn.Module) -> FlowMapCall | None:
    """The :class:`FlowMapCall` on ``transformer``, if it is adapted."""
    return getattr(transformer, FLOW_MAP_ATTRIBUTE, None)
