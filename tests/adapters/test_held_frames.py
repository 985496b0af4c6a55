"""A replaced frame's own clock (``twinloss_adapters.held_frames``), against independent derivations in float64."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from twinloss_adapters.held_frames import condition_level, generated_share, held_frames_velocity

unit = st.floats(0.0, 1.0, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(start=unit, stop=unit, hold=unit, negative=st.booleans())
def test_the_generated_share_is_the_fraction_of_the_jump_below_the_hold(start, stop, hold, negative) -> None:
    start, stop = max(start, stop), min(start, stop)
    sign = -1.0 if negative else 1.0
    t, r, c = (torch.tensor([value], dtype=torch.float64) for value in (sign * start, sign * stop, hold))
    share = float(generated_share(t, r, c))
    if start - stop > 1e-3:  # the fraction of a fine grid of times in (|r|, |t|] at or below c
        grid = torch.linspace(stop, start, 200_001, dtype=torch.float64)[1:]
        assert abs(share - float((grid <= hold).double().mean())) < 1e-4
    elif start == stop:
        assert share == float(start <= hold)
    assert 0.0 <= share <= 1.0
    level = float(condition_level(t, c))
    assert level == sign * min(start, hold) or (level == 0.0 and min(start, hold) == 0.0)


def _jump(x_t, t, r, condition, hold, velocity):
    """One protocol step ``x_r = x_t - (|t| - |r|) u`` with the backbone's ``F`` the constant ``velocity``."""
    u = held_frames_velocity(lambda state: velocity.expand_as(state), x_t, t, r, condition, hold)
    return x_t - (t.abs() - r.abs()).view(-1, 1, 1, 1, 1) * u


@settings(max_examples=40, deadline=None)
@given(times=st.lists(unit, min_size=3, max_size=3, unique=True), hold=unit, seed=st.integers(0, 2**16))
def test_a_jump_is_the_held_slide_then_the_generated_flow_and_composes(times, hold, seed) -> None:
    start, middle, stop = sorted(times, reverse=True)
    generator = torch.Generator().manual_seed(seed)
    z, x_c, velocity = (torch.randn(1, 2, 1, 3, 3, generator=generator, dtype=torch.float64) for _ in range(3))
    c = torch.tensor([[hold]], dtype=torch.float64)
    t, s, r = (torch.tensor([value], dtype=torch.float64) for value in (start, middle, stop))
    x_t = x_c + start * (z - x_c)  # the protocol's state on the line from the condition through the noise
    direct = _jump(x_t, t, r, x_c, c, velocity)
    held_until = max(stop, min(start, hold))  # the frame slides along the line down to max(|r|, c) ...
    on_line = x_c + (held_until / start) * (x_t - x_c) if start > 0 else x_t
    expected = on_line - (min(start, hold) - min(stop, hold)) * velocity  # ... and flows with F from min(|t|, c)
    torch.testing.assert_close(direct, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_jump(_jump(x_t, t, s, x_c, c, velocity), s, r, x_c, c, velocity), direct,
                               rtol=1e-12, atol=1e-12)


def test_a_frame_generated_from_noise_passes_the_backbone_through_bit_for_bit() -> None:
    generator = torch.Generator().manual_seed(0)
    x_t, condition = torch.randn(2, 3, 4, 2, 2, generator=generator), torch.randn(2, 3, 4, 2, 2, generator=generator)
    hold = torch.tensor([[1.0, 1.0, 0.0, 0.4], [1.0, 0.3, 1.0, 1.0]])
    t, r = torch.tensor([0.9, -0.6]), torch.tensor([0.2, -0.6])
    seen = []

    def backbone(state):
        seen.append(state)
        return 3.0 * state + 1.0

    u = held_frames_velocity(backbone, x_t, t, r, condition, hold)
    free = hold == 1
    free_frames = free[:, None, :, None, None].expand_as(x_t)
    assert torch.equal(seen[0][free_frames], x_t[free_frames])
    assert torch.equal(u[free_frames], (3.0 * x_t + 1.0)[free_frames])
    strength_one = (hold == 0)[:, None, :, None, None].expand_as(x_t)  # held at the condition, sliding to it
    assert torch.equal(seen[0][strength_one], condition[strength_one])
    torch.testing.assert_close(u[strength_one], ((x_t - condition) / 0.9)[strength_one], rtol=0, atol=0)
    x_t_before = x_t.clone()
    held_frames_velocity(backbone, x_t, t, r, condition, hold)
    assert torch.equal(x_t, x_t_before)
