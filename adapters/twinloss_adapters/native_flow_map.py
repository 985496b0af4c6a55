"""The base for backbones that embed the target time ``r`` themselves (native flow-map models).

Some diffusers models are already trained as flow maps ``u(x_t, t, r)``: they
take a second timestep (AnyFlow's ``r_timestep``, ACE-Step's ``timestep_r``).
TwinFlow needs nothing more for ``r`` there: the adapter hands ``r``, in the
backbone's own units, to that input, and adds only the sign embedding of ``t``
(the twin trajectory). ``capabilities.target_time`` then says whether
``r != t`` is accepted, without any module being added for it.
"""

import abc
from collections.abc import Mapping

from jaxtyping import Float
from torch import Tensor

from twinloss._tensors import at_least_float32
from twinloss_adapters.base import AdaptedTransformer

__all__ = ["FlowMapAdapter"]


class FlowMapAdapter(AdaptedTransformer):
    """An :class:`AdaptedTransformer` whose backbone takes the target time as an input.

    Subclasses implement :meth:`run_flow_map`, which receives both timesteps,
    and pass the base's arguments: ``target_time`` accepts ``r != t`` (``r``
    goes to the backbone, no module is added for it; with False, ``r`` must
    equal ``t``), ``sign`` adds the sign embedding, ``per_token_time`` says
    the embedder returns one embedding per token or frame.
    """

    native_target_time = True
    _target_timestep: Tensor | None = None  # the target timestep of the call under way, in the backbone's units

    @abc.abstractmethod
    def run_flow_map(
        self, x_t: Tensor, timestep: Tensor, target_timestep: Tensor, cond: Mapping[str, Tensor]
    ) -> Tensor:
        """Call the stock transformer with the source and target timesteps, in its own units."""

    def forward(
        self,
        x_t: Tensor,
        t: Float[Tensor, " batch"],
        r: Float[Tensor, " batch"],
        **cond: Tensor,
    ) -> Tensor:
        """Return ``F(x_t, t, r)`` with ``r`` passed to the backbone (see :meth:`AdaptedTransformer.forward`)."""
        self._target_timestep = self.time_convention.to_backbone(r.to(at_least_float32(r.dtype)))
        try:
            return super().forward(x_t, t, r, **cond)
        finally:
            self._target_timestep = None

    def run_backbone(self, x_t: Tensor, timestep: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        if self._target_timestep is None:
            raise ValueError(f"{type(self).__name__}.run_backbone needs the target time; call the adapter itself")
        return self.run_flow_map(x_t, timestep, self._target_timestep, cond)
