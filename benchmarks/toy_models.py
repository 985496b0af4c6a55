"""Small two-time velocity fields for the scale tests and benchmarks.

``BlockMLP`` follows the model protocol ``model(x_t, t, r, **cond) -> velocity``
on data of any trailing shape (flattened inside); its residual blocks are
separate modules, so ``fully_shard`` can wrap each block on its own (the
per-block FSDP2 layout of a transformer). An optional class label ``y``
(index ``num_classes`` is the null label for guidance) exercises conditioning.
"""

import torch
from torch import Tensor, nn

__all__ = ["Block", "BlockMLP"]


class Block(nn.Module):
    """Pre-norm residual MLP block ``h + W2 gelu(W1 norm(h) + e)``."""

    def __init__(self, width: int, expansion: int = 4) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, expansion * width)
        self.down = nn.Linear(expansion * width, width)

    def forward(self, h: Tensor, embedding: Tensor) -> Tensor:
        return h + self.down(nn.functional.gelu(self.up(self.norm(h) + embedding)))


class BlockMLP(nn.Module):
    """A residual MLP velocity field ``F(x_t, t, r, y=None)``.

    The times enter as ``(t, r, t - r)`` (signed, so the twin trajectory is
    visible) through a small embedding added in every block.
    """

    def __init__(self, data_shape: tuple[int, ...], width: int = 64, depth: int = 2,
                 num_classes: int = 0) -> None:
        super().__init__()
        self.data_shape = tuple(data_shape)
        features = 1
        for size in self.data_shape:
            features *= size
        self.inp = nn.Linear(features, width)
        self.time = nn.Sequential(nn.Linear(3, width), nn.SiLU(), nn.Linear(width, width))
        self.label = nn.Embedding(num_classes + 1, width) if num_classes else None
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.out_norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, features)

    def forward(self, x_t: Tensor, t: Tensor, r: Tensor, y: Tensor | None = None) -> Tensor:
        times = torch.stack([t, r, t - r], dim=1).to(x_t.dtype)
        embedding = self.time(times)
        if self.label is not None:
            if y is None:
                raise ValueError("this BlockMLP is class-conditional: pass y")
            embedding = embedding + self.label(y)
        h = self.inp(x_t.flatten(1))
        for block in self.blocks:
            h = block(h, embedding)
        out = self.out(self.out_norm(h))
        # Flat data returns the linear layer's output itself, not a view:
        # FSDP2 warns about views returned by a wrapped module.
        return out if x_t.ndim == 2 else out.unflatten(1, self.data_shape)
