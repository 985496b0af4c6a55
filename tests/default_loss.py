"""A check shared by the benchmark variant tests: a loss is the default ``TwinFlowLoss`` but for named settings."""

from twinloss import TwinFlowLoss
from twinloss.loss import default_rectify_time, default_shares

SETTINGS = ("estimate_order", "estimate_step", "residual_clamp", "guidance_scale", "guidance_interval",
            "guidance_groups", "image_free", "rectify_weight", "rectify_clamp", "rectify_field")
"""Plain attributes compared by value."""

MODULES = ("distance", "time_weight", "rectify_time", "rectify_distance")
"""Submodules compared by class and settings."""


def _settings(module) -> dict:
    return {key: value for key, value in vars(module).items() if not key.startswith("_") and key != "training"}


def assert_default_loss_except(loss: TwinFlowLoss, *changed: str) -> None:
    """``loss`` equals ``TwinFlowLoss()`` in every setting of :data:`SETTINGS`, :data:`MODULES` and the
    group shares (``"shares"``), except those named in ``changed``, each of which must differ. The default
    ``rectify_time`` and group shares follow the guidance (``default_rectify_time``, ``default_shares``), so
    they are compared with the defaults at ``loss.guidance_scale``."""
    default = TwinFlowLoss()
    for name in SETTINGS:
        same = getattr(loss, name) == getattr(default, name)
        assert same != (name in changed), f"{name}: {getattr(loss, name)!r} against {getattr(default, name)!r}"
    defaults = {"rectify_time": default_rectify_time(loss.guidance_scale)}
    for name in MODULES:
        mine, theirs = getattr(loss, name), defaults.get(name, getattr(default, name))
        same = type(mine) is type(theirs) and _settings(mine) == _settings(theirs)
        assert same != (name in changed), f"{name}: {mine!r} against {theirs!r}"
    expected = default_shares(loss.guidance_scale)
    same = loss.trajectory.shares == expected
    assert same != ("shares" in changed), f"shares: {loss.trajectory.shares} against {expected}"
