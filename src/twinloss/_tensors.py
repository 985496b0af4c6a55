"""Tensor plumbing that many modules share, each written once."""

import torch
from torch import Tensor

__all__ = ["at_least_float32", "per_row"]


def per_row(values: Tensor, like: Tensor) -> Tensor:
    """Reshape per-row values ``[B]`` to ``[B, 1, ..., 1]`` so they broadcast against ``like`` ``[B, ...]``.

    A view of ``values``; nothing is copied.
    """
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def at_least_float32(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which twinloss does arithmetic on ``dtype`` data: ``dtype`` promoted to at least float32.

    bfloat16 and float16 become float32; float32 and float64 stay as they are.
    """
    return torch.promote_types(dtype, torch.float32)
