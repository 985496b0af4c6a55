"""Argument checks that many modules share, each written once.

Every check raises :class:`ValueError` naming the argument and what was
expected, as the rest of twinloss does for a caller's input.
"""

__all__ = ["check_int"]


def check_int(value: object, name: str, *, minimum: int) -> int:
    """Return ``value`` if it is an ``int`` (``bool`` excluded) of at least ``minimum``.

    Raises:
        ValueError: ``"{name} must be an int >= {minimum}, got {value!r}"``.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value
