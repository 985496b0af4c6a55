"""A check shared by the benchmark variant tests: a loss is the benchmarks' default ``TwinFlowLoss`` but for named
settings."""

from twinloss import GroupShares, TwinFlowLoss
from twinloss.loss import DEFAULT_GUIDANCE_INTERVAL, RELEASED_GUIDANCE, UNGUIDED_SHARES

SETTINGS = ("estimate_order", "estimate_step", "residual_clamp", "guidance_scale", "guidance_interval",
            "guidance_groups", "guidance_difference", "balance_guidance_feedback", "twin_rows", "image_free",
            "rectify_weight", "rectify_clamp", "rectify_field")
"""Plain attributes compared by value."""

MODULES = ("distance", "time_weight", "rectify_distance")
"""Submodules compared by class and settings."""


def module_settings(module) -> dict:
    """A module's plain settings, its submodules' included (by name)."""
    plain = {key: value for key, value in vars(module).items() if not key.startswith("_") and key != "training"}
    return plain | {name: module_settings(child) for name, child in module.named_children()}


def assert_default_loss_except(loss: TwinFlowLoss, *changed: str) -> None:
    """``loss`` equals the benchmarks' default, ``TwinFlowLoss(**RELEASED_GUIDANCE)`` (``common.BenchmarkLoss()``),
    in every setting of :data:`SETTINGS`, :data:`MODULES` and the group shares (``"shares"``), where the fake rows
    come from (``"fake_rows"``) and ``rectify_time``, except those named in ``changed``, each of which must differ.
    With guidance off the interval is the library's default (no pass reads it). The benchmarks' default group
    shares follow the guidance's scale (quarters for any ``w > 0``, ``UNGUIDED_SHARES`` without), so they are
    compared with the default at ``loss.guidance_scale``; the default ``rectify_time`` is ``None`` (its law follows each batch), so any law
    given is a change."""
    default = TwinFlowLoss(**RELEASED_GUIDANCE)
    for name in SETTINGS:
        theirs = getattr(default, name)
        if name == "guidance_interval" and loss.guidance_scale == 0:
            theirs = DEFAULT_GUIDANCE_INTERVAL
        same = getattr(loss, name) == theirs
        assert same != (name in changed), f"{name}: {getattr(loss, name)!r} against {theirs!r}"
    same = loss.rectify_time is None
    assert same != ("rectify_time" in changed), f"rectify_time: {loss.rectify_time!r} against the default's law"
    for name in MODULES:
        mine, theirs = getattr(loss, name), getattr(default, name)
        same = type(mine) is type(theirs) and module_settings(mine) == module_settings(theirs)
        assert same != (name in changed), f"{name}: {mine!r} against {theirs!r}"
    expected = GroupShares() if loss.guidance_scale > 0 else UNGUIDED_SHARES  # common.BenchmarkLoss's rule
    same = loss.trajectory.shares == expected
    assert same != ("shares" in changed), f"shares: {loss.trajectory.shares} against {expected}"
    same = loss.trajectory.fake_rows == default.trajectory.fake_rows
    assert same != ("fake_rows" in changed), f"fake_rows: {loss.trajectory.fake_rows!r} against the default's"
