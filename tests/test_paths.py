"""Path algebra in float64 against closed forms, derivatives checked with jvp."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import jvp
from torch.testing import assert_close

from twinloss import CosinePath, LinearPath, VPPath

PATHS = [LinearPath(), CosinePath(), VPPath(beta_min=0.1, beta_max=20.0)]
SHAPES = [(5, 3), (4, 2, 3, 3), (2, 2, 3, 2, 2), (3, 6, 4)]


def closed_form(path, t):
    """Independent closed forms of (a, b) for each path."""
    if isinstance(path, LinearPath):
        return t, 1 - t
    if isinstance(path, CosinePath):
        return torch.sin(math.pi * t / 2), torch.cos(math.pi * t / 2)
    integral = path.beta_min * t + (path.beta_max - path.beta_min) * t**2 / 2
    b = torch.exp(-integral / 2)
    return torch.sqrt(1 - b**2), b


@pytest.mark.parametrize("path", PATHS, ids=lambda p: type(p).__name__)
def test_coefficients_match_closed_forms(path):
    t = torch.linspace(0.01, 1.0, 50, dtype=torch.float64)
    c = path.coefficients(t)
    a, b = closed_form(path, t)
    assert_close(c.noise, a)
    assert_close(c.data, b)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: type(p).__name__)
def test_derivatives_match_jvp(path):
    t = torch.linspace(0.02, 0.98, 40, dtype=torch.float64)
    c = path.coefficients(t)
    _, (d_noise, d_data) = jvp(lambda u: closed_form(path, u), (t,), (torch.ones_like(t),))
    assert_close(c.d_noise, d_noise)
    assert_close(c.d_data, d_data)


@pytest.mark.parametrize("path", [LinearPath(), CosinePath()], ids=lambda p: type(p).__name__)
def test_endpoints(path):
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    c = path.coefficients(t)
    assert_close(c.noise, torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert_close(c.data, torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: type(p).__name__)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_sample_velocity_and_inversions(path, shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, generator=g)
    z = torch.randn(shape, dtype=torch.float64, generator=g)
    t = torch.rand(shape[0], dtype=torch.float64, generator=g) * 0.9 + 0.05
    point = path.sample(x, z, t)
    view = (-1,) + (1,) * (len(shape) - 1)
    a, b = closed_form(path, t)
    assert_close(point.x_t, a.reshape(view) * z + b.reshape(view) * x)
    # the velocity is the time derivative of the interpolant
    _, velocity = jvp(lambda u: path.sample(x, z, u).x_t, (t,), (torch.ones_like(t),))
    assert_close(point.velocity, velocity)
    # data and noise estimates invert the interpolation
    assert_close(path.velocity_to_data(point.x_t, point.velocity, t), x)
    assert_close(path.velocity_to_noise(point.x_t, point.velocity, t), z)
    assert_close(path.data_to_noise(point.x_t, x, t), z)


def test_linear_estimates_are_the_documented_formulas():
    g = torch.Generator().manual_seed(1)
    x_t, v = torch.randn(2, 6, 3, dtype=torch.float64, generator=g)
    t = torch.rand(6, dtype=torch.float64, generator=g)
    path = LinearPath()
    assert_close(path.velocity_to_data(x_t, v, t), x_t - t[:, None] * v)
    assert_close(path.velocity_to_noise(x_t, v, t), x_t + (1 - t[:, None]) * v)
    r = t * 0.3
    assert_close(path.jump(x_t, v, t, r), x_t - (t - r)[:, None] * v)


@settings(max_examples=25, deadline=None)
@given(
    shape=st.sampled_from(SHAPES),
    seed=st.integers(0, 2**16),
    path_index=st.integers(0, len(PATHS) - 1),
)
def test_twin_symmetry_interpolates_at_absolute_time(shape, seed, path_index):
    """A row at -t is interpolated exactly as at |t|; only the sign differs."""
    path = PATHS[path_index]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, dtype=torch.float64, generator=g)
    z = torch.randn(shape, dtype=torch.float64, generator=g)
    t = torch.rand(shape[0], dtype=torch.float64, generator=g)
    positive, negative = path.sample(x, z, t), path.sample(x, z, -t)
    assert torch.equal(positive.x_t, negative.x_t)
    assert torch.equal(positive.velocity, negative.velocity)
    assert torch.equal(negative.t, -t)


def test_vp_rejects_bad_rates():
    with pytest.raises(ValueError, match="beta_min"):
        VPPath(beta_min=0.0)
    with pytest.raises(ValueError, match="beta_max"):
        VPPath(beta_min=1.0, beta_max=0.5)
