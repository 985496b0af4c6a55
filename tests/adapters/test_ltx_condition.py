"""LTX-Video conditioning: per-token timesteps, the twin embedding per token, the conditioned frames on their own
clock (held at ``1 - strength``, then generated), the keyframes at (0, 0)."""

import pytest
import torch

from adapter_backbones import (
    TEXT_LEN, build_ltx_video, ltx_condition_pipeline_call, perturb_twin_embedding, train_steps,
)
from twinloss_adapters import held_frames, ltx_condition
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


def _adapted(seed: int = 0, trained: bool = True) -> tuple[torch.nn.Module, ltx_condition.LTXConditionAdapter]:
    """The adapter; ``trained=False`` keeps its twin embedding silent, so that ``F(x, t, r)`` is the stock call."""
    torch.manual_seed(seed)
    transformer = build_ltx_video()
    model = ltx_condition.adapt(transformer)
    if trained:
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


def _line(x: torch.Tensor, condition: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The velocity along the line from the condition through ``x``'s conditioned frames: ``(x - x_c) / |t|``."""
    return (x[:, :, : condition.shape[2]] - condition) / t.abs().view(-1, 1, 1, 1, 1)


def test_two_conditioned_frames_match_the_pipeline_elsewhere_and_slide_along_the_line_to_the_condition() -> None:
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
    condition = cond["condition_latent"]
    torch.testing.assert_close(actual[:, :, :2], _line(x, condition, t), rtol=0, atol=0)
    torch.testing.assert_close(moved[:, :, :2], _line(other, condition, t), rtol=0, atol=0)
    torch.testing.assert_close(moved[:, :, 2:], jumped[:, :, 2:], rtol=0, atol=0)  # the backbone reads x_c there
    assert (jumped[:, :, 2:] - actual[:, :, 2:]).abs().max() > 1e-3  # the twin times reach the noisy tokens


def _strengths() -> torch.Tensor:
    return torch.tensor([0.5, 0.75])  # held at the levels 0.5 and 0.25, both on the four-step grid


@pytest.mark.parametrize("held", [True, False])
def test_a_condition_below_strength_one_is_seen_as_the_pipeline_sees_it_held_and_once_generated(held: bool) -> None:
    transformer, model = _adapted()
    clean, cond = _inputs(conditioned=1)
    condition, strength = cond["condition_latent"], _strengths()
    clean[:, :, :1] = condition  # image-to-video training: the video's first frame is the condition
    z = torch.randn(clean.shape, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([0.9, 0.8]) if held else torch.tensor([0.5, 0.2])
    x_t = t.view(-1, 1, 1, 1, 1) * z + (1 - t.view(-1, 1, 1, 1, 1)) * clean
    latents = x_t.clone()  # the pipeline's loop: a held frame sits at lerp(noise, x_c, m), level 1 - m
    if held:
        latents[:, :, :1] = torch.lerp(z[:, :, :1], condition, strength.view(-1, 1, 1, 1, 1))
    with torch.no_grad():
        expected = ltx_condition_pipeline_call(transformer, latents, t, cond, strength=strength)
        actual = model(x_t, t, t.clone(), **cond, condition_strength=strength)
    if held:  # the held frame read off the line: equal to the pipeline's lerp up to rounding
        torch.testing.assert_close(actual[:, :, 1:], expected[:, :, 1:], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(actual[:, :, :1], z[:, :, :1] - condition, rtol=1e-5, atol=1e-5)
    else:  # generated with the video from t <= 1 - m: the pipeline's call, bit for bit
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def _pipeline_loop(transformer, noise, cond, strength, sigmas) -> torch.Tensor:
    """LTXConditionPipeline's denoising loop without guidance: the condition started at lerp(noise, x_c, m),
    per-token timesteps, the real scheduler's per-token Euler step, held tokens left alone."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LTXConditionPipeline

    batch, _, frames, height, width = noise.shape
    latents = noise.clone()
    latents[:, :, :1] = torch.lerp(latents[:, :, :1], cond["condition_latent"], strength.view(-1, 1, 1, 1, 1))
    mask = torch.zeros(batch, frames)
    mask[:, :1] = strength[:, None]
    mask = mask.repeat_interleave(height * width, dim=1)
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(sigmas=sigmas)
    for t in scheduler.timesteps:
        timestep = torch.minimum(t.expand(batch)[:, None], (1 - mask) * 1000.0)
        prediction = ltx_condition_pipeline_call(transformer, latents, (t / 1000).expand(batch), cond, strength=strength)
        packed = LTXConditionPipeline._pack_latents(latents)
        stepped = scheduler.step(-LTXConditionPipeline._pack_latents(prediction), t, packed,
                                 per_token_timesteps=timestep, return_dict=False)[0]
        packed = torch.where((t / 1000 - 1e-6 < (1.0 - mask)).unsqueeze(-1), stepped, packed)
        latents = LTXConditionPipeline._unpack_latents(packed, frames, height, width)
    return latents


@pytest.mark.parametrize("mode", ["any", "multi"])
def test_sampling_with_a_condition_below_strength_one_is_the_pipelines_loop(mode: str) -> None:
    import twinloss

    transformer, model = _adapted(trained=False)  # F(x, t, r) = the stock F(x, t)
    _, cond = _inputs(conditioned=1)
    strength = _strengths()
    noise = torch.randn(2, 4, FRAMES, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = _pipeline_loop(transformer, noise, cond, strength, [1.0, 0.75, 0.5, 0.25])
        sample = twinloss.AnyStepSampler(4, mode=mode)(model, noise, cond={**cond, "condition_strength": strength}).sample
    torch.testing.assert_close(sample, expected, rtol=1e-5, atol=1e-5)
    assert (sample[:, :, :1] - cond["condition_latent"]).abs().max() > 1e-2  # the condition frame was generated too


def test_one_step_lands_on_the_held_condition_moved_by_its_generated_share() -> None:
    transformer, model = _adapted(trained=False)
    _, cond = _inputs(conditioned=1)
    condition = cond["condition_latent"]
    z = torch.randn(2, 4, FRAMES, 4, 4, generator=torch.Generator().manual_seed(4))
    one, zero = torch.ones(2), torch.zeros(2)
    for strength in (_strengths(), None):
        extra = {} if strength is None else {"condition_strength": strength}
        with torch.no_grad():
            sample = z - model(z, one, zero, **cond, **extra)
        if strength is None:
            torch.testing.assert_close(sample[:, :, :1], condition, rtol=0, atol=1e-6)  # z - (z - x_c), rounded
            continue
        m = strength.view(-1, 1, 1, 1, 1)
        start = z.clone()
        start[:, :, :1] = torch.lerp(z[:, :, :1], condition, m)
        with torch.no_grad():  # the pipeline's first step, from the held frame at level 1 - m to 0
            prediction = ltx_condition_pipeline_call(transformer, start, one, cond, strength=strength)
        torch.testing.assert_close(sample[:, :, :1], start[:, :, :1] - (1 - m) * prediction[:, :, :1],
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("t", "r"), [(0.9, 0.1), (0.9, 0.6), (0.4, 0.1), (0.8, 0.8), (-0.9, -0.1)])
def test_gradient_reaches_a_conditioned_frame_in_its_generated_share_only(t: float, r: float) -> None:
    transformer, model = _adapted()
    x, cond = _inputs(conditioned=1)
    strength = torch.tensor([0.5, 1.0])
    kept = []
    handle = transformer.proj_out.register_forward_hook(lambda module, args, output: kept.append(output))
    velocity = model(x, torch.full((2,), t), torch.full((2,), r), **cond, condition_strength=strength)
    handle.remove()
    kept[0].retain_grad()
    velocity.sum().backward()
    per_token = kept[0].grad[..., 0].unflatten(1, (FRAMES, TOKENS_PER_FRAME))  # d sum(u) / d F, token by token
    start, stop, level = abs(t), abs(r), 0.5
    share = (min(start, level) - min(stop, level)) / (start - stop) if start > stop else float(start <= level)
    torch.testing.assert_close(per_token[0, 0], torch.full((TOKENS_PER_FRAME,), share))
    assert (per_token[1, 0] == 0).all()  # strength 1: never generated
    assert (per_token[:, 1:] == 1).all()


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


def test_conditioned_tokens_below_strength_one_get_the_twin_embedding_of_their_own_clock() -> None:
    transformer, model = _adapted()
    x, cond = _inputs(conditioned=1)
    t, r = torch.tensor([-0.8, 0.6]), torch.tensor([-0.3, 0.1])
    strength = torch.tensor([0.5, 0.5])  # held at 0.5: row 0 jumps -0.5 -> -0.3 there, row 1 0.5 -> 0.1
    embedding = transformer.time_embed.emb
    temb = _embeddings(transformer, model, x, t, r, {**cond, "condition_strength": strength})
    with torch.no_grad():
        own_t, own_r = torch.tensor([-0.5, 0.5]), torch.tensor([-0.3, 0.1])
        stock = embedding.timestep_embedder(embedding.time_proj(1000 * own_t.abs()))
        twin = transformer.get_submodule(DEFAULT_MODULE_NAME)(own_t, own_r)
    expected = (stock + twin)[:, None, :].expand(2, TOKENS_PER_FRAME, 24)
    torch.testing.assert_close(temb[:, :TOKENS_PER_FRAME], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(held_frames.condition_level(t, 1 - strength), own_t, rtol=0, atol=0)


def test_bad_strengths_raise_naming_the_key() -> None:
    _, model = _adapted()
    x, cond = _inputs(conditioned=1)
    t = torch.tensor([0.9, 0.35])
    without = {key: value for key, value in cond.items() if key != "condition_latent"}
    with pytest.raises(ValueError, match="condition_strength.*needs.*condition_latent"):
        model(x, t, t, **without, condition_strength=torch.tensor([0.5, 0.5]))
    for strength in (torch.tensor([0.0, 0.5]), torch.tensor([0.5, 1.5]), torch.tensor([[0.5], [0.5]])):
        with pytest.raises(ValueError, match="condition_strength.*must be \\[B\\] = \\[2\\] with 0 < strength <= 1"):
            model(x, t, t, **cond, condition_strength=strength)
    for strength in (torch.tensor([0.5]), torch.tensor(0.5)):
        with pytest.raises(ValueError, match="condition_strength.*batch dimension"):
            model(x, t, t, **cond, condition_strength=strength)


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
    torch.testing.assert_close(actual[:, :, :1], _line(x, cond["condition_latent"], t), rtol=0, atol=0)
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


LONG = 5  # latent frames of the video in the later-video tests


def _long_inputs(batch: int = 2) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    x, cond = _inputs(batch=batch, conditioned=1)
    x = torch.randn(batch, 4, LONG, 4, 4, generator=torch.Generator().manual_seed(7))
    video = torch.randn(batch, 4, 4, 4, 4, generator=torch.Generator().manual_seed(8))  # n = 4 latent frames
    return x, cond, video


@pytest.mark.parametrize("with_first_frame", [True, False])
def test_a_video_at_a_later_frame_matches_the_pipelines_prefix_and_replaced_frames_bit_exactly(with_first_frame) -> None:
    transformer, model = _adapted()
    x, cond, video = _long_inputs()
    if not with_first_frame:
        del cond["condition_latent"]
    keyframe = _keyframes(count=1)
    t = torch.tensor([0.9, 0.35])
    later = {"video_condition_latent": video, "video_condition_frame": torch.tensor([9.0, 9.0]),
             "keyframe_latents": keyframe, "keyframe_frames": torch.tensor([[33.0], [33.0]])}
    with torch.no_grad():
        expected = ltx_condition_pipeline_call(transformer, x, t, cond, keyframes=((keyframe, 33),), video=(video, 9))
        actual = model(x, t, t.clone(), **cond, **later)
    generated = [1, 2] if with_first_frame else [0, 1, 2]  # 9 // 8 + 2 = 3: frames 3 and 4 are the video's last two
    torch.testing.assert_close(actual[:, :, generated], expected[:, :, generated], rtol=0, atol=0)
    torch.testing.assert_close(actual[:, :, 3:], _line(x[:, :, 3:], video[:, :, 2:], t), rtol=0, atol=0)
    if with_first_frame:
        torch.testing.assert_close(actual[:, :, :1], _line(x, cond["condition_latent"], t), rtol=0, atol=0)


def test_a_two_frame_video_at_a_later_frame_is_two_keyframes_one_pixel_frame_apart() -> None:
    transformer, model = _adapted()
    x, cond, video = _long_inputs()
    t, r = torch.tensor([-0.9, 0.35]), torch.tensor([-0.2, 0.1])
    prefix = video[:, :, :2]
    with torch.no_grad():
        as_video = model(x, t, r, **cond, video_condition_latent=prefix, video_condition_frame=torch.tensor([9.0, 17.0]))
        as_keyframes = model(x, t, r, **cond, keyframe_latents=prefix,
                             keyframe_frames=torch.tensor([[9.0, 10.0], [17.0, 18.0]]))
        expected = ltx_condition_pipeline_call(transformer, x, t.abs(), cond, video=(prefix, 9))
        plain = model(x, t.abs(), t.abs(), **cond, video_condition_latent=prefix, video_condition_frame=torch.tensor([9.0, 9.0]))
    torch.testing.assert_close(as_video, as_keyframes, rtol=0, atol=0)
    torch.testing.assert_close(plain[:, :, 1:], expected[:, :, 1:], rtol=0, atol=0)


def test_each_row_places_its_later_video_at_its_own_frame() -> None:
    transformer, model = _adapted()
    x, cond, video = _long_inputs()
    t = torch.tensor([0.9, 0.35])
    with torch.no_grad():
        batched = model(x, t, t.clone(), **cond, video_condition_latent=video,
                        video_condition_frame=torch.tensor([1.0, 9.0]))
        for row, index in ((0, 1), (1, 9)):
            one = {key: value[row : row + 1] for key, value in cond.items()}
            expected = ltx_condition_pipeline_call(transformer, x[row : row + 1], t[row : row + 1], one,
                                                   video=(video[row : row + 1], index))
            start = index // 8 + 2
            generated = [frame for frame in range(1, LONG) if not start <= frame < start + 2]
            torch.testing.assert_close(batched[row : row + 1, :, generated], expected[:, :, generated], rtol=1e-5, atol=1e-5)


def test_bad_later_videos_raise_naming_the_key() -> None:
    _, model = _adapted()
    x, cond, video = _long_inputs()
    t = torch.tensor([0.9, 0.35])
    at = torch.tensor([9.0, 9.0])
    cases = [
        ({"video_condition_latent": video}, "video_condition_latent.*needs.*video_condition_frame"),
        ({"video_condition_frame": at}, "video_condition_frame.*needs.*video_condition_latent"),
        ({"video_condition_latent": video[:, :, :1], "video_condition_frame": at}, "frames >= 2.*keyframe_latents"),
        ({"video_condition_latent": video, "video_condition_frame": torch.tensor([[9.0], [9.0]])},
         "video_condition_frame.*must be \\[B\\]"),
        ({"video_condition_latent": video, "video_condition_frame": torch.tensor([9.5, 9.0])}, "whole numbers >= 1"),
        ({"video_condition_latent": video, "video_condition_frame": torch.tensor([9.0, 17.0])},
         "row 1.*replaces latent frames 4..5; x_t has 5"),
        ({"video_condition_latent": video[..., :2], "video_condition_frame": at}, "video_condition_latent.*spans"),
    ]
    for extra, message in cases:
        with pytest.raises(ValueError, match=message):
            model(x, t, t, **cond, **extra)
    three = {**cond, "condition_latent": torch.zeros(2, 4, 3, 4, 4)}
    with pytest.raises(ValueError, match="replaces latent frame 2, which cond\\['condition_latent'\\] replaces too"):
        model(x, t, t, **three, video_condition_latent=video, video_condition_frame=torch.tensor([1.0, 1.0]))


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


def test_twinflow_loss_trains_image_to_video_with_conditions_below_strength_one() -> None:
    import twinloss

    transformer, model = _adapted()
    x, cond = _inputs(batch=4, conditioned=1, seed=2)
    x[:, :, :1] = cond["condition_latent"]  # the video's first frame is its condition
    cond["condition_strength"] = torch.tensor([0.5, 0.8, 1.0, 0.3])
    uncond = {**cond, "encoder_hidden_states": torch.zeros_like(cond["encoder_hidden_states"])}
    before = {key: value.clone() for key, value in cond.items()}
    loss_fn = twinloss.TwinFlowLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = train_steps(loss_fn, model, x, cond, uncond, optimizer)
    assert len({round(loss, 7) for loss in losses}) == 3, losses  # same draws: only the weights move it
    for key, value in before.items():
        torch.testing.assert_close(cond[key], value, rtol=0, atol=0)
