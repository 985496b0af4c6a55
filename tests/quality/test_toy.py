"""The small models' time input: twin-blind at creation, sign-aware once trained."""

import pytest
import torch

from twinloss import toy


def test_toy_time_embedding_is_sign_blind_until_the_twin_layer_moves():
    torch.manual_seed(0)
    embedding = toy.ToyTimeEmbedding(width=16, frequencies=4)
    t = torch.rand(8) + 0.05
    r = t * torch.rand(8)
    real, fake = embedding(t, r, torch.float32), embedding(-t, -r, torch.float32)
    assert real.shape == (8, 16)
    torch.testing.assert_close(real, fake, rtol=0, atol=0)
    with torch.no_grad():
        embedding.twin.bias.add_(1.0)
    torch.testing.assert_close(embedding(-t, -r, torch.float32), real + 1.0)
    torch.testing.assert_close(embedding(t, r, torch.float32), real, rtol=0, atol=0)


def test_toy_time_embedding_sees_the_gap_and_keeps_dtype():
    torch.manual_seed(0)
    embedding = toy.ToyTimeEmbedding(width=8, frequencies=4).double()
    t = torch.full((4,), 0.7, dtype=torch.float64)
    same, shorter = embedding(t, t, torch.float64), embedding(t, 0.5 * t, torch.float64)
    assert same.dtype == torch.float64
    assert not torch.allclose(same, shorter)


@pytest.mark.parametrize("kwargs", [dict(width=0), dict(width=4, frequencies=0)])
def test_toy_time_embedding_rejects_empty_sizes(kwargs):
    with pytest.raises(ValueError, match="width and frequencies"):
        toy.ToyTimeEmbedding(**kwargs)


def test_time_mlp_keeps_shape_and_starts_twin_blind():
    torch.manual_seed(0)
    model = toy.TimeMLP((1, 4, 4), width=32, depth=2, num_classes=3)
    x = torch.randn(5, 1, 4, 4)
    t = torch.rand(5)
    y = torch.tensor([0, 1, 2, 3, 3])  # 3 is the null class
    out = model(x, t, 0.5 * t, y=y)
    assert out.shape == x.shape
    torch.testing.assert_close(model(x, -t, -0.5 * t, y=y), out, rtol=0, atol=0)


def test_twin_per_block_starts_from_the_same_weights_and_moves_only_the_twin_rows():
    torch.manual_seed(0)
    plain = toy.TimeMLP((1, 4, 4), width=16, depth=3, num_classes=3)
    torch.manual_seed(0)
    model = toy.TimeMLP((1, 4, 4), width=16, depth=3, num_classes=3, twin_per_block=True)
    extra = {name: value for name, value in model.state_dict().items() if name not in plain.state_dict()}
    assert sorted(extra) == [f"twin_blocks.{i}.{p}" for i in (0, 1) for p in ("bias", "weight")]
    assert all(torch.equal(plain.state_dict()[name], value) for name, value in model.state_dict().items()
               if name not in extra)  # the zero layers drew nothing from the global RNG
    x, y = torch.randn(6, 1, 4, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    t = torch.tensor([0.9, 0.5, 0.2, -0.9, -0.5, -0.2])
    before = model(x, t, t, y)
    torch.testing.assert_close(before, plain(x, t, t, y), rtol=0, atol=0)
    with torch.no_grad():
        model.twin_blocks[1].bias.add_(1.0)  # a shift before the last block, for the twin rows only
    after = model(x, t, t, y)
    torch.testing.assert_close(after[:3], before[:3], rtol=0, atol=0)
    assert (after[3:] - before[3:]).abs().amax(dim=(1, 2, 3)).min() > 1e-3
