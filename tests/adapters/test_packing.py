"""Packing round-trips and agreement with the diffusers pipelines' own code."""

import torch
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
from diffusers.pipelines.ltx.pipeline_ltx import LTXPipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage import QwenImagePipeline
from hypothesis import given, settings
from hypothesis import strategies as st

from twinloss_adapters.packing import (
    pack_image_patches,
    pack_video_patches,
    patch_grid_ids,
    unpack_image_patches,
    unpack_video_patches,
)


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 3), channels=st.integers(1, 4), half_height=st.integers(1, 4),
    half_width=st.integers(1, 4),
)
def test_image_packing_round_trip_matches_pipelines(batch: int, channels: int, half_height: int, half_width: int) -> None:
    height, width = 2 * half_height, 2 * half_width
    latents = torch.randn(batch, channels, height, width)
    tokens = pack_image_patches(latents, 2)
    assert tokens.shape == (batch, half_height * half_width, 4 * channels)
    torch.testing.assert_close(tokens, FluxPipeline._pack_latents(latents, batch, channels, height, width), rtol=0, atol=0)
    torch.testing.assert_close(tokens, QwenImagePipeline._pack_latents(latents, batch, channels, height, width), rtol=0, atol=0)
    torch.testing.assert_close(unpack_image_patches(tokens, height, width, 2), latents, rtol=0, atol=0)
    # The pipelines' unpack takes pixel sizes (vae_scale_factor 8).
    torch.testing.assert_close(
        FluxPipeline._unpack_latents(tokens, 8 * height, 8 * width, 8), latents, rtol=0, atol=0
    )


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 2), channels=st.integers(1, 3), frames=st.integers(1, 3), height=st.integers(1, 4),
    width=st.integers(1, 4), patch=st.sampled_from([1, 2]), patch_t=st.sampled_from([1, 2]),
)
def test_video_packing_round_trip_matches_ltx(
    batch: int, channels: int, frames: int, height: int, width: int, patch: int, patch_t: int
) -> None:
    latents = torch.randn(batch, channels, frames * patch_t, height * patch, width * patch)
    tokens = pack_video_patches(latents, patch, patch_t)
    assert tokens.shape == (batch, frames * height * width, channels * patch_t * patch * patch)
    torch.testing.assert_close(tokens, LTXPipeline._pack_latents(latents, patch, patch_t), rtol=0, atol=0)
    restored = unpack_video_patches(tokens, frames * patch_t, height * patch, width * patch, patch, patch_t)
    torch.testing.assert_close(restored, latents, rtol=0, atol=0)
    torch.testing.assert_close(
        LTXPipeline._unpack_latents(tokens, frames, height, width, patch, patch_t), latents, rtol=0, atol=0
    )


def test_grid_ids_match_flux_pipeline() -> None:
    expected = FluxPipeline._prepare_latent_image_ids(1, 3, 5, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(patch_grid_ids(3, 5, device=torch.device("cpu"), dtype=torch.float32), expected)
