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

import torch
from jaxtyping import Float
from torch import Tensor, nn

from twinloss_adapters.base import AdaptedTransformer
from twinloss_adapters.conventions import Capabilities, TimeConvention

__all__ = ["FlowMapAdapter"]


class FlowMapAdapter(AdaptedTransformer):
    """An :class:`AdaptedTransformer` whose backbone takes the target time as an input.

    Subclasses implement :meth:`run_flow_map`, which receives both timesteps.

    Args:
        transformer: the stock transformer.
        time_convention: how twinloss times map onto both of its timesteps.
        embedder_path, embedding_dim: where the sign embedding is added.
        target_time: accept ``r != t`` (passed to the backbone); with False,
            ``r`` must equal ``t``.
        sign: add the sign embedding.
        per_token_time: the embedder returns one embedding per token or frame.
    """

    native_target_time = True

    def __init__(
        self,
        transformer: nn.Module,
        *,
        time_convention: TimeConvention,
        embedder_path: str,
        embedding_dim: int,
        target_time: bool = True,
        sign: bool = True,
        per_token_time: bool = False,
    ) -> None:
        self._target_timestep: Tensor | None = None
        super().__init__(
            transformer,
            time_convention=time_convention,
            embedder_path=embedder_path,
            embedding_dim=embedding_dim,
            target_time=False,  # no module for r: it goes to the backbone's own input
            sign=sign,
            per_token_time=per_token_time,
        )
        self.capabilities = Capabilities(target_time=target_time, sign=sign)

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
        self._target_timestep = self.time_convention.to_backbone(r.to(torch.promote_types(r.dtype, torch.float32)))
        try:
            return super().forward(x_t, t, r, **cond)
        finally:
            self._target_timestep = None

    def run_backbone(self, x_t: Tensor, timestep: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        if self._target_timestep is None:
            raise ValueError(f"{type(self).__name__}.run_backbone needs the target time; call the adapter itself")
        return self.run_flow_map(x_t, timestep, self._target_timestep, cond)
