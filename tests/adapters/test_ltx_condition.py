"""LTX-Video conditioning: per-token timesteps, the twin embedding per token, the conditioned frames and the
keyframes at (0, 0)."""

import pytest
import torch

from adapter_backbones import TEXT_LEN, build_ltx_video, ltx_condition_pipeline_call, perturb_twin_embedding
from twinloss_adapters import ltx_condition
from twinloss_adapters.time_embedding import DEFAULT_MODULE_NAME, find_injection

FRAMES = 3
TOKENS_PER_FRAME = 4 * 4  # patch 1


def _inputs(batch: int = 2, conditioned: int = 2, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, FRAMES, 4, 4, generator=generator)
    mask = torch.ones(batch, TEXT_LEN)
    mask[0, -2:] = 0
    cond = {
        "encoder_hidden_states": torch.randn(batch, TEXT_LEN, 24, generator=generator),
        "encoder_attention_mask": mask,
        "condition_latent": torch.randn(batch, 4, conditioned, 4, 4, generator=generator),
    }
    return x, cond


def _adapted(seed: int = 0) -> tuple[torch.nn.Module, ltx_condition.LTXConditionAdapter]:
    torch.manual_seed(seed)
    transformer = build_ltx_video()
    model = ltx_condition.adapt(transformer)
    perturb_twin_embedding(transformer)
    return transformer, model


def _embeddings(transformer, model, x, t, r, cond) -> torch.Tensor:
    """The per-token time embeddings ``[B, tokens, D]`` of one call of ``model``, the twin embedding added."""
    seen = []
    embedder = transformer.time_embed.emb.timestep_embedder
    handle = embedder.register_forward_hook(lambda module, args, output: seen.append(output))
    with torch.no_grad():
        model(x, t, r, **cond)
    handle.remove()
    return seen[0].unflatten(0, (x.shape[0], -1))


def test_without_a_condition_matches_the_condition_pipelines_text_to_video_call_bit_exactly() -> None:
    transformer, model = _adapted()
    x, cond = _inputs()
    del cond["condition_latent"]
    t = torch.tensor([0.9, 0.35])
    with torch.no_grad():
        expected = ltx_condition_pipeline_call(transformer, x, t, cond)
        actual = model(x, t, t.clone(), **cond)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_two_conditioned_frames_match_the_pipeline_elsewhere_are_zero_and_ignore_x_t_there() -> None:
    transformer, model = _adapted()
    x, cond = _inputs(conditioned=2)
    t = torch.tensor([0.9, 0.35])
    with torch.no_grad():
        expected = ltx_condition_pipeline_call(transformer, x, t, cond)
        actual = model(x, t, t.clone(), **cond)
        other = x.clone()
        other[:, :, :2] = torch.randn(2, 4, 2, 4, 4)
        moved = model(other, -t, 0.5 * -t, **cond)
        jumped = model(x, -t, 0.5 * -t, **cond)
    torch.testing.assert_close(actual[:, :, 2:], expected[:, :, 2:], rtol=0, atol=0)
    assert (actual[:, :, :2] == 0).all() and (moved[:, :, :2] == 0).all()
    torch.testing.assert_close(moved, jumped, rtol=0, atol=0)  # the noisy conditioned frames of x_t are never read
    assert (jumped[:, :, 2:] - actual[:, :, 2:]).abs().max() > 1e-3  # the twin times reach the noisy tokens


def test_noisy_tokens_get_their_rows_twin_embedding_and_conditioned_tokens_the_stock_one_at_time_zero() -> None:
    transformer, model = _adapted()
    x, cond = _inputs(conditioned=1)
    t, r = torch.tensor([-0.8, 0.6]), torch.tensor([-0.3, 0.1])
    embedding = transformer.time_embed.emb
    temb = _embeddings(transformer, model, x, t, r, cond)
    with torch.no_grad():
        noisy = torch.ones(FRAMES, TOKENS_PER_FRAME)
        noisy[0] = 0
        timestep = 1000 * t.abs()[:, None] * noisy.flatten()  # the pipeline's per-token timesteps
        stock = embedding.timestep_embedder(embedding.time_proj(timestep.flatten())).unflatten(0, timestep.shape)
        twin = transformer.get_submodule(DEFAULT_MODULE_NAME)(t, r)  # [B, D]: Delta e(t_b, r_b)
    assert temb.shape == stock.shape == (2, FRAMES * TOKENS_PER_FRAME, 24)
    torch.testing.assert_close(temb[:, :TOKENS_PER_FRAME], stock[:, :TOKENS_PER_FRAME], rtol=0, atol=0)
    expected = stock[:, TOKENS_PER_FRAME:] + twin[:, None, :]
    torch.testing.assert_close(temb[:, TOKENS_PER_FRAME:], expected, rtol=1e-5, atol=1e-5)
    assert twin.abs().min(dim=1).values.max() > 0 and (twin[0] - twin[1]).abs().max() > 1e-2  # rows differ


def _keyframes(batch: int = 2, count: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 4, count, 4, 4, generator=torch.Generator().manual_seed(seed))


def test_keyframes_at_later_frames_match_the_pipelines_prepended_conditions_bit_exactly() -> None:
    transformer, model = _adapted()
    x, cond = _inputs(conditioned=1)
    latents = _keyframes()
    t = torch.tensor([0.9, 0.35])
    with torch.no_grad():
        expected = ltx_condition_pipeline_call(
            transformer, x, t, cond, keyframes=((latents[:, :, :1], 9), (latents[:, :, 1:], 17)))
        actual = model(x, t, t.clone(), **cond, keyframe_latents=latents, keyframe_frames=torch.tensor([[9.0, 17.0]] * 2))
        without = model(x, t, t.clone(), **cond)
    torch.testing.assert_close(actual[:, :, 1:], expected[:, :, 1:], rtol=0, atol=0)
    assert (actual[:, :, :1] == 0).all()  # the frame-0 condition still holds its frame
    assert (actual - without).abs().max() > 1e-3  # the keyframes reach the video's tokens


def test_each_row_takes_its_own_keyframe_frame_index() -> None:
    transformer, model = _adapted()
    x, cond = _inputs(conditioned=1)
    latents = _keyframes(count=1)
    t = torch.tensor([0.9, 0.35])
    with torch.no_grad():
        batched = model(x, t, t.clone(), **cond, keyframe_latents=latents, keyframe_frames=torch.tensor([[9.0], [25.0]]))
        for row, index in ((0, 9), (1, 25)):
            one = {key: value[row : row + 1] for key, value in cond.items()}
            expected = ltx_condition_pipeline_call(
                transformer, x[row : row + 1], t[row : row + 1], one, keyframes=((latents[row : row + 1], index),))
            torch.testing.assert_close(batched[row : row + 1, :, 1:], expected[:, :, 1:], rtol=1e-5, atol=1e-5)
        moved = model(x, t, t.clone(), **cond, keyframe_latents=latents, keyframe_frames=torch.tensor([[25.0], [25.0]]))
    assert (moved[0] - batched[0]).abs().max() > 1e-4 and torch.equal(moved[1], batched[1])  # the index is the row's


def test_keyframe_tokens_get_the_stock_embedding_at_time_zero_and_noisy_tokens_their_rows_twin_embedding() -> None:
    transformer, model = _adapted()
    x, cond = _inputs(conditioned=1)
    t, r = torch.tensor([-0.8, 0.6]), torch.tensor([-0.3, 0.1])
    embedding = transformer.time_embed.emb
    keyframes = {"keyframe_latents": _keyframes(count=2), "keyframe_frames": torch.tensor([[9.0, 17.0]] * 2)}
    temb = _embeddings(transformer, model, x, t, r, {**cond, **keyframes})
    with torch.no_grad():
        held = 3 * TOKENS_PER_FRAME  # two keyframes, then the conditioned frame
        at_zero = embedding.timestep_embedder(embedding.time_proj(torch.zeros(1)))
        timestep = (1000 * t.abs())[:, None].expand(2, (FRAMES - 1) * TOKENS_PER_FRAME)
        stock = embedding.timestep_embedder(embedding.time_proj(timestep.flatten())).unflatten(0, timestep.shape)
        twin = transformer.get_submodule(DEFAULT_MODULE_NAME)(t, r)
    assert temb.shape == (2, held + (FRAMES - 1) * TOKENS_PER_FRAME, 24)
    torch.testing.assert_close(temb[:, :held], at_zero.expand(2, held, 24), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(temb[:, held:], stock + twin[:, None, :], rtol=1e-5, atol=1e-5)


def test_bad_keyframes_raise_naming_the_key() -> None:
    _, model = _adapted()
    x, cond = _inputs(conditioned=1)
    t = torch.tensor([0.9, 0.35])
    good = {"keyframe_latents": _keyframes(count=1), "keyframe_frames": torch.tensor([[9.0], [9.0]])}
    cases = [
        ({"keyframe_latents": good["keyframe_latents"]}, "keyframe_latents.*needs.*keyframe_frames"),
        ({"keyframe_frames": good["keyframe_frames"]}, "keyframe_frames.*needs.*keyframe_latents"),
        ({**good, "keyframe_frames": torch.tensor([[9.0, 17.0], [9.0, 17.0]])}, "keyframe_frames.*must be \\[B, K\\]"),
        ({**good, "keyframe_frames": torch.tensor([[0.0], [9.0]])}, "keyframe_frames.*whole numbers >= 1"),
        ({**good, "keyframe_frames": torch.tensor([[8.5], [9.0]])}, "keyframe_frames.*whole numbers >= 1"),
        ({**good, "keyframe_latents": torch.zeros(2, 3, 1, 4, 4)}, "keyframe_latents.*must be"),
        ({**good, "keyframe_latents": torch.zeros(2, 4, 1, 4, 2)}, "keyframe_latents.*spans"),
    ]
    for extra, message in cases:
        with pytest.raises(ValueError, match=message):
            model(x, t, t, **cond, **extra)


def test_bad_conditions_and_patched_transformers_raise() -> None:
    _, model = _adapted()
    x, cond = _inputs(conditioned=1)
    t = torch.tensor([0.9, 0.35])
    with pytest.raises(ValueError, match="condition_latent.*spans"):
        model(x, t, t, **{**cond, "condition_latent": torch.zeros(2, 4, FRAMES + 1, 4, 4)})
    with pytest.raises(ValueError, match="condition_latent.*spans"):
        model(x, t, t, **{**cond, "condition_latent": torch.zeros(2, 4, 1, 4, 2)})
    with pytest.raises(ValueError, match="condition_latent.*must be"):
        model(x, t, t, **{**cond, "condition_latent": torch.zeros(2, 3, 1, 4, 4)})
    from diffusers import LTXVideoTransformer3DModel

    patched = LTXVideoTransformer3DModel(
        in_channels=16, out_channels=16, patch_size=2, patch_size_t=1, num_attention_heads=2,
        attention_head_dim=12, cross_attention_dim=24, num_layers=1, caption_channels=24,
    )
    with pytest.raises(ValueError, match="patches of 1"):
        ltx_condition.adapt(patched)
    assert find_injection(patched) is None and not hasattr(patched, DEFAULT_MODULE_NAME)
