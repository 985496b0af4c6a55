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

    @abc.abstractmethod
    def run_flow_map(
        self, x_t: Tensor, timestep: Tensor, target_timestep: Tensor, cond: Mapping[str, Tensor]
    ) -> Tensor:
        """Call the stock transformer with the source and target timesteps, in its own units."""

    def run_backbone_to(
        self, x_t: Tensor, timestep: Tensor, r: Float[Tensor, " batch"], cond: Mapping[str, Tensor]
    ) -> Tensor:
        """:meth:`run_flow_map` with ``r`` converted to the backbone's units, as ``t`` was."""
        return self.run_flow_map(x_t, timestep, self.time_convention.to_backbone(r.to(at_least_float32(r.dtype))), cond)

    def run_backbone(self, x_t: Tensor, timestep: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        """The stock call without a jump (target timestep = ``timestep``): the instantaneous velocity."""
        return self.run_flow_map(x_t, timestep, timestep, cond)
