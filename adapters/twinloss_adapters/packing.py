"""Latent packing between the twinloss layout and a backbone's token layout.

twinloss hands an adapter latents in the VAE layout: images ``[B, C, H, W]``,
video ``[B, C, F, H, W]``. Some transformers take them as token sequences
instead. These are the exact permutations the diffusers pipelines use, with
their inverses; ``unpack(pack(x)) == x`` bit for bit.
"""

import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor

__all__ = [
    "pack_image_patches",
    "pack_video_patches",
    "patch_grid_ids",
    "unpack_image_patches",
    "unpack_video_patches",
]


def pack_image_patches(
    latents: Float[Tensor, "batch channels height width"], patch: int = 2
) -> Float[Tensor, "batch tokens features"]:
    """``[B, C, H, W] -> [B, (H/p)(W/p), C p p]``, row-major tokens (Flux and Qwen-Image pipelines)."""
    return rearrange(latents, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=patch, pw=patch)


def unpack_image_patches(
    tokens: Float[Tensor, "batch tokens features"], height: int, width: int, patch: int = 2
) -> Float[Tensor, "batch channels {height} {width}"]:
    """Inverse of :func:`pack_image_patches` for a latent of ``height x width``."""
    return rearrange(
        tokens, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=height // patch, w=width // patch, ph=patch, pw=patch
    )


def pack_video_patches(
    latents: Float[Tensor, "batch channels frames height width"], patch: int = 1, patch_t: int = 1
) -> Float[Tensor, "batch tokens features"]:
    """``[B, C, F, H, W] -> [B, (F/pt)(H/p)(W/p), C pt p p]`` (LTX-Video pipeline order)."""
    return rearrange(
        latents,
        "b c (f pf) (h ph) (w pw) -> b (f h w) (c pf ph pw)",
        pf=patch_t,
        ph=patch,
        pw=patch,
    )


def unpack_video_patches(
    tokens: Float[Tensor, "batch tokens features"],
    frames: int,
    height: int,
    width: int,
    patch: int = 1,
    patch_t: int = 1,
) -> Float[Tensor, "batch channels {frames} {height} {width}"]:
    """Inverse of :func:`pack_video_patches` for a latent of ``frames x height x width``."""
    return rearrange(
        tokens,
        "b (f h w) (c pf ph pw) -> b c (f pf) (h ph) (w pw)",
        f=frames // patch_t,
        h=height // patch,
        w=width // patch,
        pf=patch_t,
        ph=patch,
        pw=patch,
    )


def patch_grid_ids(
    grid_height: int, grid_width: int, *, device: torch.device, dtype: torch.dtype
) -> Float[Tensor, "tokens 3"]:
    """Flux position ids ``[(h w), 3]``: ``(0, row, column)`` per token, row-major."""
    rows = torch.arange(grid_height, device=device, dtype=dtype)
    columns = torch.arange(grid_width, device=device, dtype=dtype)
    grid_rows, grid_columns = torch.meshgrid(rows, columns, indexing="ij")
    return torch.stack([torch.zeros_like(grid_rows), grid_rows, grid_columns], dim=-1).reshape(-1, 3)
