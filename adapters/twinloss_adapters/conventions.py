"""What a backbone expects for time, and what an adapter can do.

twinloss states its time convention once (``twinloss.protocol``): ``t = 1`` is
noise, ``t = 0`` is data, ``x_t = t z + (1 - t) x`` and the velocity is
``z - x``. A backbone may count time in other units or the other way round,
and may predict the opposite velocity. :class:`TimeConvention` holds that
conversion; it is the only place in the adapters where units change.
"""

import math
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from twinloss._tensors import at_least_float32

__all__ = ["Capabilities", "TimeConvention"]


@dataclass(frozen=True)
class TimeConvention:
    r"""How twinloss time maps onto a backbone's ``timestep`` argument.

    With ``|t|`` the unsigned twinloss time (the sign is carried separately by
    the sign embedding),

    .. math::
        \tau = \text{scale} \cdot
        \begin{cases} 1 - |t| & \text{reversed} \\ |t| & \text{otherwise,} \end{cases}
        \qquad v_\text{twinloss} = \text{output\_sign} \cdot \text{output\_scale} \cdot v_\text{backbone}.

    With ``signed`` the timestep keeps the sign of ``t`` (``tau = scale * t``):
    the TwinFlow-Qwen-Image release feeds the twin trajectory's negative times
    to the stock sinusoidal embedder.

    Args:
        scale: backbone units per unit of time: 1000 for the diffusers flow
            transformers that embed ``timestep`` directly (SANA, SD3, Wan, LTX),
            1 for those that multiply by 1000 inside (Flux, Qwen-Image).
        reversed: True for backbones whose ``timestep = 0`` is noise.
        output_sign: +1 if the backbone predicts ``z - x`` (every diffusers
            flow-match pipeline here), -1 if it predicts ``x - z``.
        signed: keep the sign of ``t`` in the timestep (not with ``reversed``).
        output_scale: twinloss velocity per unit of the backbone's prediction:
            1 for a flow-matching velocity, ``pi / 2`` for a v-prediction on
            the cosine path (Stable Audio; :mod:`twinloss_adapters.stable_audio`).
    """

    scale: float = 1000.0
    reversed: bool = False
    output_sign: int = 1
    signed: bool = False
    output_scale: float = 1.0

    def __post_init__(self) -> None:
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise ValueError(f"scale must be a positive finite number, got {self.scale}")
        if self.output_sign not in (1, -1):
            raise ValueError(f"output_sign must be +1 or -1, got {self.output_sign}")
        if not (self.output_scale > 0 and math.isfinite(self.output_scale)):
            raise ValueError(f"output_scale must be a positive finite number, got {self.output_scale}")
        if self.signed and self.reversed:
            raise ValueError("signed=True needs reversed=False: a reversed timestep 1 - |t| has no sign to keep")

    def to_backbone(self, t: Float[Tensor, " batch"]) -> Float[Tensor, " batch"]:
        """The backbone's ``timestep`` for signed twinloss times ``t``."""
        if self.signed:
            return t * self.scale
        unsigned = t.abs()
        if self.reversed:
            unsigned = 1.0 - unsigned
        return unsigned * self.scale

    def from_backbone(self, timestep: Float[Tensor, " batch"]) -> Float[Tensor, " batch"]:
        r"""The unsigned twinloss time of a backbone ``timestep``: the inverse of :meth:`to_backbone` for ``t >= 0``.

        .. math:: |t| = \begin{cases} 1 - \tau / \text{scale} & \text{reversed} \\ \tau / \text{scale} & \text{otherwise} \end{cases}

        Computed in at least float32 whatever the ``timestep`` dtype.
        """
        unsigned = timestep.to(at_least_float32(timestep.dtype)) / self.scale
        return 1.0 - unsigned if self.reversed else unsigned

    def to_twinloss_velocity(self, velocity: Tensor) -> Tensor:
        """Turn the backbone's prediction into the twinloss velocity (``z - x`` on the linear path)."""
        if self.output_scale != 1.0:
            velocity = velocity * self.output_scale
        return velocity if self.output_sign == 1 else -velocity


@dataclass(frozen=True)
class Capabilities:
    """What an adapted backbone accepts beyond the stock model.

    Args:
        target_time: the model embeds the target time ``r``; without it,
            calls with ``r != t`` raise.
        sign: the model embeds the sign of ``t``; without it, calls with a
            negative ``t`` (the twin trajectory) raise.
        guidance_inputs: conditioning keys for a distilled guidance signal
            the backbone was built with (e.g. Flux-dev's ``guidance``); empty
            when the backbone has none, and passing one then raises.
    """

    target_time: bool
    sign: bool
    guidance_inputs: tuple[str, ...] = ()

    def require(self, *, target_time: bool = False, sign: bool = False) -> None:
        """Raise ValueError if a requested capability is missing."""
        missing = [
            name
            for name, wanted, present in (
                ("target_time", target_time, self.target_time),
                ("sign", sign, self.sign),
            )
            if wanted and not present
        ]
        if missing:
            raise ValueError(
                f"this adapted model lacks {missing}; adapt it with "
                + ", ".join(f"{name}=True" for name in missing)
            )

    def check_times(self, t: Tensor, r: Tensor, *, atol: float = 1e-6) -> None:
        """Validate signed times against the protocol and these capabilities.

        Raises:
            ValueError: naming ``t`` or ``r`` when ``|r| <= |t| <= 1`` fails,
                signs disagree, ``r != t`` without target-time support, or
                ``t < 0`` without sign support.
        """
        if t.shape != r.shape:
            raise ValueError(f"t and r must have the same shape [B], got {tuple(t.shape)} and {tuple(r.shape)}")
        if not (torch.is_floating_point(t) and torch.is_floating_point(r)):
            raise ValueError(f"t and r must be float tensors, got {t.dtype} and {r.dtype}")
        abs_t, abs_r = t.abs(), r.abs()
        violations = torch.stack(
            [
                (abs_t > 1 + atol).any(),
                (abs_r > abs_t + atol).any(),
                ((t * r) < 0).any(),
                ((abs_t - abs_r).abs() > atol).any() & (not self.target_time),
                (t < 0).any() & (not self.sign),
                ~(torch.isfinite(t).all() & torch.isfinite(r).all()),
            ]
        ).tolist()  # one device sync for all checks
        above_one, r_beyond_t, signs_differ, needs_target_time, needs_sign, not_finite = violations
        if not_finite:
            raise ValueError("t and r must be finite, got NaN or infinite times")
        if above_one:
            raise ValueError(f"t must satisfy |t| <= 1, got max |t| = {abs_t.max().item():.6g}")
        if r_beyond_t:
            raise ValueError("r must satisfy |r| <= |t| row by row (a jump goes towards data)")
        if signs_differ:
            raise ValueError("r must have the sign of t (both negative on the twin trajectory)")
        if needs_target_time:
            raise ValueError(
                "r differs from t but this model was adapted with target_time=False; "
                "adapt it with target_time=True to train or sample any-step jumps"
            )
        if needs_sign:
            raise ValueError(
                "t is negative (twin trajectory) but this model was adapted with sign=False; "
                "adapt it with sign=True for TwinFlow training"
            )
