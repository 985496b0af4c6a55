"""The generic injection on a toy time embedder, re-derived in closed form."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from twinloss_adapters.time_embedding import (
    DEFAULT_MODULE_NAME,
    TwinTimeEmbedding,
    find_injection,
    inject_time_embedding,
    sinusoidal_features,
)

DIM = 8


class ToyBackbone(nn.Module):
    """A timestep -> embedding -> modulation stack, the shape of every adaLN DiT."""

    def __init__(self) -> None:
        super().__init__()
        self.time_embedder = nn.Sequential(nn.Linear(1, DIM), nn.SiLU(), nn.Linear(DIM, DIM))
        self.modulation = nn.Linear(DIM, 2 * DIM)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        embedding = self.time_embedder(timestep[:, None])
        shift, scale = self.modulation(nn.functional.silu(embedding)).chunk(2, dim=-1)
        return x * (1 + scale) + shift


def test_sinusoidal_features_closed_form() -> None:
    values = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    features = sinusoidal_features(values, 6, scale=1000.0)
    frequencies = torch.tensor([10000 ** (-k / 3) for k in range(3)], dtype=torch.float64)
    angles = 1000.0 * values[:, None] * frequencies[None]
    expected = torch.cat([angles.cos(), angles.sin()], dim=-1).float()
    torch.testing.assert_close(features, expected)


def test_twin_embedding_closed_form_after_perturbation() -> None:
    torch.manual_seed(0)
    embedding = TwinTimeEmbedding(DIM, frequency_dim=4)
    with torch.no_grad():
        for parameter in embedding.parameters():
            parameter.normal_()
    t = torch.tensor([0.8, -0.8, 0.5, -0.3])
    r = torch.tensor([0.2, -0.1, 0.5, -0.3])
    mlp = embedding.target_time_mlp
    features = sinusoidal_features(r.abs(), 4)
    hidden = nn.functional.silu(features @ mlp[0].weight.T + mlp[0].bias)
    expected = (t.abs() - r.abs())[:, None] * (hidden @ mlp[2].weight.T + mlp[2].bias)
    expected = expected + (t < 0).float()[:, None] * embedding.negative_time_embedding
    torch.testing.assert_close(embedding(t, r), expected)
    # r = t and t > 0: exactly nothing, whatever the weights.
    torch.testing.assert_close(embedding(t[2:3], r[2:3]), torch.zeros(1, DIM), rtol=0, atol=0)


@settings(max_examples=25, deadline=None)
@given(
    t=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=5),
    negative=st.booleans(),
    fraction=st.floats(0.0, 1.0),
)
def test_injection_is_silent_at_creation(t: list[float], negative: bool, fraction: float) -> None:
    torch.manual_seed(0)
    backbone = ToyBackbone()
    x = torch.randn(len(t), DIM)
    t_tensor = torch.tensor(t)
    timestep = 1000 * t_tensor
    stock = backbone(x, timestep)
    injection = inject_time_embedding(backbone, "time_embedder", DIM)
    sign = -1.0 if negative else 1.0
    with injection.times(sign * t_tensor, sign * fraction * t_tensor):
        adapted = backbone(x, timestep)
    torch.testing.assert_close(adapted, stock, rtol=0, atol=0)


def test_injection_adds_before_modulation_and_only_inside_its_context() -> None:
    torch.manual_seed(0)
    backbone = ToyBackbone()
    x, timestep = torch.randn(2, DIM), torch.tensor([300.0, 900.0])
    t, r = torch.tensor([0.3, -0.9]), torch.tensor([0.1, -0.9])
    injection = inject_time_embedding(backbone, "time_embedder", DIM)
    twin = backbone.get_submodule(DEFAULT_MODULE_NAME)
    with torch.no_grad():
        for parameter in twin.parameters():
            parameter.normal_()
    embedding = backbone.time_embedder(timestep[:, None]) + twin(t, r)
    shift, scale = backbone.modulation(nn.functional.silu(embedding)).chunk(2, dim=-1)
    with injection.times(t, r):
        torch.testing.assert_close(backbone(x, timestep), x * (1 + scale) + shift)
    # Outside an adapter call the backbone is the stock one.
    plain = backbone.time_embedder(timestep[:, None])
    shift, scale = backbone.modulation(nn.functional.silu(plain)).chunk(2, dim=-1)
    torch.testing.assert_close(backbone(x, timestep), x * (1 + scale) + shift)


def test_only_the_last_layer_is_zero_initialised() -> None:
    embedding = TwinTimeEmbedding(DIM)
    first, last = embedding.target_time_mlp[0], embedding.target_time_mlp[-1]
    assert first.weight.abs().sum() > 0
    assert last.weight.abs().sum() == 0 and last.bias.abs().sum() == 0
    assert embedding.negative_time_embedding.abs().sum() == 0
    t, r = torch.tensor([0.9, -0.5]), torch.tensor([0.2, -0.5])
    embedding(t, r).sum().backward()
    assert last.weight.grad.abs().sum() > 0
    assert last.bias.grad.abs().sum() > 0
    # d/ds of the sign term is 1[t < 0] per row: one negative row -> gradient of ones.
    torch.testing.assert_close(embedding.negative_time_embedding.grad, torch.ones(DIM))


def test_removal_restores_the_module_tree() -> None:
    backbone = ToyBackbone()
    keys = set(backbone.state_dict())
    injection = inject_time_embedding(backbone, "time_embedder", DIM)
    assert find_injection(backbone) is injection
    assert set(backbone.state_dict()) > keys
    injection.remove()
    assert set(backbone.state_dict()) == keys
    assert find_injection(backbone) is None
    assert not backbone.time_embedder._forward_hooks
    with pytest.raises(ValueError, match="removed"):
        with injection.times(torch.ones(1), torch.ones(1)):
            pass


def test_injection_errors_name_the_problem() -> None:
    backbone = ToyBackbone()
    with pytest.raises(ValueError, match="embedder_path 'missing'"):
        inject_time_embedding(backbone, "missing", DIM)
    inject_time_embedding(backbone, "time_embedder", DIM)
    with pytest.raises(ValueError, match="already carries"):
        inject_time_embedding(backbone, "modulation", DIM)
    with pytest.raises(ValueError, match="embedding_dim"):
        TwinTimeEmbedding(0)
    with pytest.raises(ValueError, match="frequency_dim"):
        TwinTimeEmbedding(DIM, frequency_dim=3)

    class TupleEmbedder(nn.Module):
        def forward(self, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return timestep, timestep

    root = nn.Module()
    root.embedder = TupleEmbedder()
    injection = inject_time_embedding(root, "embedder", DIM)
    with pytest.raises(ValueError, match="one tensor"), injection.times(torch.ones(2), torch.ones(2)):
        root.embedder(torch.ones(2))
    wrong_batch = ToyBackbone()
    injection = inject_time_embedding(wrong_batch, "time_embedder", DIM)
    with pytest.raises(ValueError, match=r"expected \[3, D\]"), injection.times(torch.ones(3), torch.ones(3)):
        wrong_batch(torch.zeros(2, DIM), torch.ones(2))


def test_injected_module_follows_the_embedder_dtype() -> None:
    backbone = ToyBackbone().to(torch.float64)
    inject_time_embedding(backbone, "time_embedder", DIM)
    twin = backbone.get_submodule(DEFAULT_MODULE_NAME)
    assert all(p.dtype == torch.float64 for p in twin.parameters())
    assert math.isclose(float(twin(torch.tensor([0.5]), torch.tensor([0.5])).detach().abs().sum()), 0.0)
