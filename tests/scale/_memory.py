"""Exact peak-memory accounting of one loss step on CPU with MemTracker."""

import torch
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
from toy_models import BlockMLP

CPU = torch.device("cpu")
NULL_LABEL = 3


def make(width: int, depth: int, data: int, seed: int = 0) -> BlockMLP:
    torch.manual_seed(seed)
    return BlockMLP((data,), width=width, depth=depth, num_classes=NULL_LABEL)


def batch(size: int, data: int, seed: int = 0) -> tuple[torch.Tensor, dict, dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(size, data, generator=g)
    y = torch.randint(0, NULL_LABEL, (size,), generator=g)
    return x, {"y": y}, {"y": torch.full_like(y, NULL_LABEL)}


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def step_peak(loss_fn, model, x, cond, uncond, *, warm_teacher: bool = False) -> dict[str, int]:
    """Peak bytes of one forward + backward of ``loss_fn`` (gradients start at None).

    Returns ``{"total": ..., "param": ..., "grad": ..., "act": ..., "temp": ...}``
    at the moment of the peak, and ``held_for_backward``: bytes alive when the
    loss returns (parameters + saved activations + loss tensors). ``warm_teacher`` updates the teacher once
    before tracking, so its state exists (as for every step but the first).
    """
    model.zero_grad(set_to_none=True)
    if warm_teacher:
        loss_fn.teacher.update(model)
    tracker = MemTracker()
    tracker.track_external(model)
    g = torch.Generator().manual_seed(7)
    with tracker:
        out = loss_fn(model, x, cond=cond, uncond=uncond if loss_fn.guidance_scale else None, generator=g)
        held = tracker.get_tracker_snapshot("current")[CPU]["Total"]
        out.loss.backward()
    model.zero_grad(set_to_none=True)
    peak = tracker.get_tracker_snapshot("peak")[CPU]
    return {
        "total": peak["Total"],
        "param": peak[_MemRefType.PARAM],
        "grad": peak[_MemRefType.GRAD],
        "act": peak[_MemRefType.ACT],
        "temp": peak[_MemRefType.TEMP],
        "held_for_backward": held,  # everything alive when the loss returns
    }
