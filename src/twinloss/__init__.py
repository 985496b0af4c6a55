"""twinloss: the TwinFlow objective and any-step samplers for any flow backbone.

    loss_fn = twinloss.TwinFlowLoss()
    out = loss_fn(model, x, cond={"y": y}, uncond={"y": null_y}, generator=g)
    out.loss.backward()
    images = twinloss.AnyStepSampler(steps=1)(model, noise, cond={"y": y}).sample

``model(x_t, t, r, **cond) -> velocity`` is the only contract
(:class:`twinloss.VelocityModel`); ``t = 1`` is noise, ``t = 0`` data, and a
negative time marks the twin (fake) trajectory.
"""

from twinloss.averaging import (
    ConstantDecay,
    DecayProfile,
    PowerFunctionDecay,
    ShardedWeightAverage,
    WeightAverage,
)
from twinloss.distances import BarronDistance, Distance, L2Distance
from twinloss.distributed import ShardedEMATeacher
from twinloss.loss import TangentTimeWeight, TwinFlowLoss, TwinFlowOutput
from twinloss.paths import AffinePath, CosinePath, LinearPath, PathCoefficients, PathSample, VPPath
from twinloss.protocol import Conditioning, VelocityModel
from twinloss.sampling import AnyStepSampler, SamplerOutput, time_schedule
from twinloss.targets import guidance_target, rcgm_target
from twinloss.teachers import EMATeacher, FrozenTeacher, MovingAverageTeacher, OnlineTeacher, Teacher
from twinloss.time_distributions import (
    BetaTime,
    KumaraswamyTime,
    LogitNormalTime,
    ShiftedTime,
    TimeDistribution,
)
from twinloss.trajectory import GroupShares, Trajectory, TrajectorySampler

from twinloss import health, metrics, monitor  # noqa: E402, F401  (submodules: twinloss.health, twinloss.metrics, twinloss.monitor)

__version__ = "0.1.0"

__all__ = [
    "AffinePath",
    "AnyStepSampler",
    "BarronDistance",
    "BetaTime",
    "ConstantDecay",
    "Conditioning",
    "CosinePath",
    "DecayProfile",
    "Distance",
    "EMATeacher",
    "FrozenTeacher",
    "GroupShares",
    "KumaraswamyTime",
    "L2Distance",
    "LinearPath",
    "LogitNormalTime",
    "MovingAverageTeacher",
    "OnlineTeacher",
    "PathCoefficients",
    "PathSample",
    "PowerFunctionDecay",
    "SamplerOutput",
    "ShardedEMATeacher",
    "ShardedWeightAverage",
    "ShiftedTime",
    "TangentTimeWeight",
    "Teacher",
    "TimeDistribution",
    "Trajectory",
    "TrajectorySampler",
    "TwinFlowLoss",
    "TwinFlowOutput",
    "VPPath",
    "VelocityModel",
    "WeightAverage",
    "guidance_target",
    "rcgm_target",
    "time_schedule",
]
