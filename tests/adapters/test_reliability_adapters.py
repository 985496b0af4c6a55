"""Every adapter checks its conditioning against the config, and bad inputs give a ValueError naming them (issue 13).

One parametrised case list (``adapter_backbones.CASES``): each bad input
below is either accepted with a finite velocity or refused with a ValueError
that names the argument. Non-finite inputs are the loss's business
(``check_finite``, docs/errors.md) and are not drawn here.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

pytest.importorskip("diffusers")

from adapter_backbones import CASES  # noqa: E402

BATCH = 2
_BUILT: dict[str, tuple] = {}


def _adapted(name: str):
    """One tiny build per backbone for the whole module (hypothesis reuses it across examples)."""
    if name not in _BUILT:
        torch.manual_seed(0)
        case = CASES[name]
        adapted = case.adapt(case.build()).eval()
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(BATCH, *case.latent_shape, generator=generator)
        _BUILT[name] = (case, adapted, x, case.make_cond(adapted.transformer, BATCH, generator))
    return _BUILT[name]


@pytest.mark.parametrize("name", sorted(CASES))
def test_text_of_another_width_or_an_int_dtype_is_refused_naming_the_key(name):
    case, adapted, x, cond = _adapted(name)
    t = torch.full((BATCH,), 0.5)
    assert adapted.cond_widths, f"{name} declares no text width"
    for key, width in adapted.cond_widths.items():
        wider = {**cond, key: torch.zeros(*cond[key].shape[:-1], width + 1)}
        with pytest.raises(ValueError, match=rf"cond\['{key}'\] must be floating-point with last dim {width}"):
            adapted(x, t, t, **wider)
        integer = {**cond, key: cond[key].long()}
        with pytest.raises(ValueError, match=rf"cond\['{key}'\] must be floating-point"):
            adapted(x, t, t, **integer)


MASK_CASES = [
    "chroma", "hunyuan_video", "hunyuan_video15", "ltx2", "ltx_video", "lumina2", "qwen_image", "sana", "z_image",
]


@pytest.mark.parametrize("name", MASK_CASES)
def test_a_mask_of_another_length_than_the_text_is_refused(name):
    case, adapted, x, cond = _adapted(name)
    t = torch.full((BATCH,), 0.5)
    assert adapted.cond_masks, f"{name} declares no text mask"
    for mask_key, text_key in adapted.cond_masks.items():
        full = cond if mask_key in cond else {**cond, mask_key: torch.ones(cond[text_key].shape[:2])}
        short = {**full, mask_key: full[mask_key][:, :-1]}
        with pytest.raises(ValueError, match=rf"cond\['{mask_key}'\] must be \[B, L\] with L = {cond[text_key].shape[1]}"):
            adapted(x, t, t, **short)


def test_hunyuan_video_refuses_an_all_zero_text_mask_naming_the_row():
    case, adapted, x, cond = _adapted("hunyuan_video")
    t = torch.full((BATCH,), 0.5)
    mask = torch.ones_like(cond["encoder_attention_mask"])
    mask[1] = 0
    with pytest.raises(ValueError, match=r"cond\['encoder_attention_mask'\] row 1 is \[0.0, 0.0"):
        adapted(x, t, t, **{**cond, "encoder_attention_mask": mask})
    holes = torch.ones_like(mask)
    holes[0, 1] = 0  # the stock model would read it as a 1-token prefix
    with pytest.raises(ValueError, match="row 0"):
        adapted(x, t, t, **{**cond, "encoder_attention_mask": holes})
    # the pipeline's form (padding at the end) is accepted and finite
    padded = torch.ones_like(mask)
    padded[0, -2:] = 0
    assert torch.isfinite(adapted(x, t, t, **{**cond, "encoder_attention_mask": padded})).all()


# ------------------------------------------------------------------- fuzz
def _perturb(kind: str, case, adapted, x: Tensor, cond: dict[str, Tensor], t: Tensor, pick: int):
    """One bad (or harmless) input; returns (x, t, r, cond, the argument a refusal must name)."""
    keys = sorted(cond)
    key = keys[pick % len(keys)]
    r = t.clone()
    if kind == "drop_key":
        cond = {k: v for k, v in cond.items() if k != key}
        return x, t, r, cond, "cond"
    if kind == "unknown_key":
        return x, t, r, {**cond, "encoder_hidden_state": cond[key]}, "cond"
    if kind == "wrong_batch":
        return x, t, r, {**cond, key: cond[key][:1]}, f"cond['{key}']"
    if kind == "trailing_dim":
        value = cond[key]
        if value.ndim < 2:
            return x, t, r, cond, "cond"
        return x, t, r, {**cond, key: torch.zeros(*value.shape[:-1], value.shape[-1] + 1, dtype=value.dtype)}, f"cond['{key}']"
    if kind == "latent_shape":
        shapes = case.wrong_latent_shapes
        return torch.zeros(BATCH, *shapes[pick % len(shapes)]), t, r, cond, "x_t"
    if kind == "time_range":
        return x, t * 3, r, cond, "t"
    if kind == "target_after_current":
        return x, t * 0.5, t, cond, "r"
    if kind == "time_shape":
        return x, t[:1], r[:1], cond, "t"
    if kind == "twin_sign":
        return x, -t, -r, cond, "t"
    if kind == "time_nan":
        return x, torch.where(torch.arange(BATCH) == pick % BATCH, float("nan"), t), r, cond, "t and r must be finite"
    raise AssertionError(kind)


KINDS = ["drop_key", "unknown_key", "wrong_batch", "trailing_dim", "latent_shape", "time_range",
         "target_after_current", "time_shape", "twin_sign", "time_nan"]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(CASES)), kind=st.sampled_from(KINDS), pick=st.integers(0, 7),
       time=st.floats(0.05, 0.95))
def test_every_adapter_accepts_a_bad_input_finitely_or_refuses_it_naming_the_argument(name, kind, time, pick):
    case, adapted, x, cond = _adapted(name)
    t = torch.full((BATCH,), time)
    x_in, t_in, r_in, cond_in, argument = _perturb(kind, case, adapted, x, dict(cond), t, pick)
    originals = [value.clone() for value in (x_in, t_in, r_in, *cond_in.values())]
    try:
        with torch.no_grad():
            out = adapted(x_in, t_in, r_in, **cond_in)
    except ValueError as error:
        assert argument in str(error), (kind, str(error))
    else:
        assert out.shape == x_in.shape and bool(torch.isfinite(out).all()), kind
    for before, after in zip(originals, (x_in, t_in, r_in, *cond_in.values()), strict=True):
        torch.testing.assert_close(after, before, rtol=0, atol=0, equal_nan=True)  # the caller's tensors: unmodified


@pytest.mark.parametrize("key", ["video_coords", "audio_coords"])
def test_ltx2_coordinates_without_their_pair_of_bounds_are_refused_naming_them(key):
    """Found by the fuzz above: coordinates with a third bound used to reach the rotary embedding and fail there."""
    _, adapted, x, cond = _adapted("ltx2")
    t = torch.full((BATCH,), 0.5)
    value = cond[key]
    widened = {**cond, key: torch.zeros(*value.shape[:-1], value.shape[-1] + 1, dtype=value.dtype)}
    with pytest.raises(ValueError, match=rf"cond\['{key}'\] .*\[B, \d, N_\w+, 2\]"):
        adapted(x, t, t, **widened)
