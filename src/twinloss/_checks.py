"""Argument checks that many modules share, each written once.

Every check raises :class:`ValueError` naming the argument and what was
expected, as the rest of twinloss does for a caller's input.
"""

import math

__all__ = ["check_guidance_interval", "check_instance", "check_int", "check_real"]


def check_int(value: object, name: str, *, minimum: int) -> int:
    """Return ``value`` if it is an ``int`` (``bool`` excluded) of at least ``minimum``.

    Raises:
        ValueError: ``"{name} must be an int >= {minimum}, got {value!r}"``.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_real(value: object, name: str) -> float:
    """Return ``value`` as a ``float`` if it is a finite real number (``bool`` excluded).

    Raises:
        ValueError: ``"{name} must be a finite number, got {value!r}"``.
    """
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_instance(value: object, name: str, kind: type) -> None:
    """Raise unless ``value`` is a ``kind`` (``None`` is the caller's business: it means the default).

    Raises:
        ValueError: ``"{name} must be a {kind} instance, got {value!r}"``.
    """
    if not isinstance(value, kind):
        raise ValueError(f"{name} must be a {kind.__name__} instance, got {value!r}")


def check_guidance_interval(interval: object) -> tuple[float, float]:
    """``guidance_interval`` as ``(low, high)`` with ``0 <= low < high <= 1``: the open interval of times
    ``low < t < high`` where classifier-free guidance applies (the loss's step 4 and the sampler alike).

    Raises:
        ValueError: naming ``guidance_interval``, for anything but such a pair.
    """
    if not (isinstance(interval, tuple | list) and len(interval) == 2):
        raise ValueError(f"guidance_interval must be a pair (low, high), got {interval!r}")
    low, high = (check_real(bound, "guidance_interval") for bound in interval)
    if not (0.0 <= low < high <= 1.0):
        raise ValueError(f"guidance_interval must satisfy 0 <= low < high <= 1, got {interval}")
    return low, high
