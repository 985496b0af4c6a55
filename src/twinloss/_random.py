"""Random-state helpers that touch only the device the tensors live on."""

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["RandomState"]


class RandomState:
    """A snapshot of the global RNG of the CPU and of ``device`` (if not the CPU).

    ``with snapshot.replay():`` runs a block from the snapshot and restores
    the generator afterwards, so several passes of one training step see the
    same random stream (dropout masks) while the global stream advances only
    as much as one forward would. Device-specific RNG functions are called
    only for the device in use, never for CUDA when tensors are on the CPU.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu_state = torch.get_rng_state()
        self.device_state = None
        if device.type != "cpu":
            module = torch.get_device_module(device.type)
            self.device_state = module.get_rng_state(self._index())

    def _index(self) -> int:
        if self.device.index is not None:
            return self.device.index
        return torch.get_device_module(self.device.type).current_device()

    def _set(self, cpu_state: torch.Tensor, device_state: torch.Tensor | None) -> None:
        torch.set_rng_state(cpu_state)
        if device_state is not None:
            torch.get_device_module(self.device.type).set_rng_state(device_state, self._index())

    def restore(self) -> None:
        """Set the global generators back to the snapshot (and leave them there)."""
        self._set(self.cpu_state, self.device_state)

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Run a block from the snapshot, then put the generators back as they were before it."""
        current = RandomState(self.device)
        self.restore()
        try:
            yield
        finally:
            self._set(current.cpu_state, current.device_state)
