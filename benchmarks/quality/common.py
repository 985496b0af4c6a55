"""Command-line plumbing the quality benchmarks share."""

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch


def configure(
    args: argparse.Namespace, full: dict, quick: dict
) -> tuple[Path, Callable[[str], None], Callable[[], float]]:
    """Single-threaded torch, the full or quick sizes onto ``args``, the output folder, a timed logger.

    Returns ``(out, log, elapsed)``: ``log(message)`` prints with the seconds since this call.
    """
    torch.set_num_threads(1)
    for key, value in (quick if args.quick else full).items():
        setattr(args, key, value)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def elapsed() -> float:
        return time.perf_counter() - started

    def log(message: str) -> None:
        print(f"[{elapsed():6.0f}s] {message}", flush=True)

    return out, log, elapsed
