"""Wan 2.2 TI2V 5B: per-token timesteps, the twin embedding per token, the conditioned first frame at (0, 0)."""

import pytest
import torch

from adapter_backbones import TEXT_LEN, build_wan, wan_ti2v_pipeline_call
from twinloss_adapters import wan_ti2v
from twinloss_adapters.time_embedding import DEFAULT_MODULE_NAME

FRAMES = 3  # the conditioned frame and two noisy ones


def _inputs(batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, FRAMES, 4, 4, generator=generator)
    text = torch.randn(batch, TEXT_LEN, 24, generator=generator)
    image = torch.randn(batch, 4, 1, 4, 4, generator=generator)
    return x, text, image


def _adapted(seed: int = 0) -> tuple[torch.nn.Module, wan_ti2v.WanTI2VAdapter]:
    torch.manual_seed(seed)
    transformer = build_wan()
    model = wan_ti2v.adapt(transformer)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a trained twin embedding: target-time MLP and sign both non-zero
        for parameter in transformer.get_submodule(DEFAULT_MODULE_NAME).parameters():
            parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))
    return transformer, model


def test_text_to_video_matches_wan_pipeline_per_token_call_bit_exactly() -> None:
    """Without an image, WanPipeline(expand_timesteps=True) gives every token 1000 t: the adapter at r = t is that call."""
    transformer, model = _adapted()
    x, text, _ = _inputs()
    t = torch.tensor([0.9, 0.35])
    mask = torch.ones(x.shape, dtype=torch.float32)  # WanPipeline's mask
    timestep = torch.stack([(mask[0][0][:, ::2, ::2] * step).flatten() for step in 1000 * t])
    with torch.no_grad():
        expected = transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]
        actual = model(x, t, t.clone(), encoder_hidden_states=text)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_conditioned_frame_matches_the_pipeline_elsewhere_and_slides_along_the_line_to_the_image() -> None:
    transformer, model = _adapted()
    x, text, image = _inputs()
    t = torch.tensor([0.9, 0.35])
    cond = {"encoder_hidden_states": text, "first_frame_latent": image}
    with torch.no_grad():
        expected = wan_ti2v_pipeline_call(transformer, x, t, cond)
        actual = model(x, t, t.clone(), **cond)
        other_first_frame = x.clone()
        other_first_frame[:, :, 0] = torch.randn(2, 4, 4, 4)
        moved = model(other_first_frame, -t, 0.5 * -t, **cond)
        jumped = model(x, -t, 0.5 * -t, **cond)
    torch.testing.assert_close(actual[:, :, 1:], expected[:, :, 1:], rtol=0, atol=0)

    def line(state: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        return (state[:, :, :1] - image) / time.abs().view(-1, 1, 1, 1, 1)

    torch.testing.assert_close(actual[:, :, :1], line(x, t), rtol=0, atol=0)
    torch.testing.assert_close(moved[:, :, :1], line(other_first_frame, t), rtol=0, atol=0)
    torch.testing.assert_close(moved[:, :, 1:], jumped[:, :, 1:], rtol=0, atol=0)  # the backbone reads the image there
    with torch.no_grad():  # one step from noise lands on the image
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
        sample = noise - model(noise, torch.ones(2), torch.zeros(2), **cond)
    torch.testing.assert_close(sample[:, :, :1], image, rtol=0, atol=1e-6)
    assert (jumped[:, :, 1:] - actual[:, :, 1:]).abs().max() > 1e-3  # the twin times reach the noisy tokens


def test_each_token_gets_its_twin_embedding_and_the_conditioned_tokens_the_stock_one_at_time_zero() -> None:
    transformer, model = _adapted()
    x, text, image = _inputs()
    t, r = torch.tensor([-0.8, 0.6]), torch.tensor([-0.3, 0.1])
    seen = []
    embedder = transformer.condition_embedder
    handle = embedder.time_embedder.register_forward_hook(lambda module, args, output: seen.append(output))
    with torch.no_grad():
        model(x, t, r, encoder_hidden_states=text, first_frame_latent=image)
        handle.remove()
        temb = seen[0]  # [B, tokens, D], after the twin embedding was added
        tokens_per_frame = (4 // 2) * (4 // 2)
        noisy = torch.ones(FRAMES, tokens_per_frame)
        noisy[0] = 0
        timestep = 1000 * t.abs()[:, None] * noisy.flatten()  # the pipeline's per-token timesteps
        stock = embedder.time_embedder(embedder.timesteps_proj(timestep.flatten()).unflatten(0, timestep.shape))
        twin = transformer.get_submodule(DEFAULT_MODULE_NAME)(t, r)  # [B, D]: Delta e(t_b, r_b)
    assert temb.shape == stock.shape == (2, FRAMES * tokens_per_frame, 24)
    torch.testing.assert_close(temb[:, :tokens_per_frame], stock[:, :tokens_per_frame], rtol=0, atol=0)
    expected = stock[:, tokens_per_frame:] + twin[:, None, :]
    torch.testing.assert_close(temb[:, tokens_per_frame:], expected, rtol=1e-5, atol=1e-5)  # the MLP ran per token
    assert twin.abs().min(dim=1).values.max() > 0 and (twin[0] - twin[1]).abs().max() > 1e-2  # rows differ


def test_bad_first_frame_and_unsupported_transformers_raise() -> None:
    _, model = _adapted()
    x, text, image = _inputs()
    t = torch.tensor([0.9, 0.35])
    with pytest.raises(ValueError, match="first_frame_latent.*one latent frame"):
        model(x, t, t, encoder_hidden_states=text, first_frame_latent=image.expand(-1, -1, 2, -1, -1))
    with pytest.raises(ValueError, match="first_frame_latent.*spans"):
        model(x, t, t, encoder_hidden_states=text, first_frame_latent=image[..., :2, :])
    from diffusers import WanTransformer3DModel

    small = dict(num_attention_heads=2, attention_head_dim=12, text_dim=24, freq_dim=32, ffn_dim=32, num_layers=1)
    concatenating = WanTransformer3DModel(patch_size=(1, 2, 2), in_channels=8, out_channels=4, **small)
    with pytest.raises(ValueError, match="concatenated condition"):
        wan_ti2v.adapt(concatenating)
    temporal = WanTransformer3DModel(patch_size=(2, 2, 2), in_channels=4, out_channels=4, **small)
    with pytest.raises(ValueError, match="temporal patch"):
        wan_ti2v.adapt(temporal)
    assert not hasattr(concatenating, DEFAULT_MODULE_NAME) and not hasattr(temporal, DEFAULT_MODULE_NAME)
