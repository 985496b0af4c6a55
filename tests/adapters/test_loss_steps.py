"""A few TwinFlow training steps and the 1-step sampler on every adapted backbone."""

import pytest
import torch

import twinloss
from adapter_backbones import CASES, BackboneCase, train_steps
from twinloss_adapters.time_embedding import DEFAULT_MODULE_NAME

BATCH = 4
STEPS = 3


def _uncond(cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Null conditioning: zero embeddings; masks, guidance and positions (LTX keyframes' frame indices) kept."""
    kept = ("guidance", "keyframe_frames")
    return {key: value if "mask" in key or key in kept else torch.zeros_like(value) for key, value in cond.items()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_twinflow_steps_train_the_adapted_backbone(name: str) -> None:
    case: BackboneCase = CASES[name]
    torch.manual_seed(0)
    transformer = case.build()
    model = case.adapt(transformer)
    data_generator = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, *case.latent_shape, generator=data_generator)
    cond = case.make_cond(transformer, BATCH, data_generator)
    uncond = _uncond(cond)
    loss_fn = twinloss.TwinFlowLoss(guidance_scale=0.5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    twin = transformer.get_submodule(DEFAULT_MODULE_NAME)
    initial_twin = [p.detach().clone() for p in twin.parameters()]
    x_before, cond_before = x.clone(), {key: value.clone() for key, value in cond.items()}

    def after_step(out) -> None:
        loss_fn.teacher.update(model)
        assert out.model_calls > 1

    losses = train_steps(loss_fn, model, x, cond, uncond, optimizer, STEPS, after_step)

    assert all(torch.isfinite(torch.tensor(losses)))
    # Same draws every step (fixed generator): the loss moves only because the weights do.
    assert len({round(loss, 7) for loss in losses}) == STEPS, losses
    assert any((p - p0).abs().max() > 0 for p, p0 in zip(twin.parameters(), initial_twin, strict=True))
    torch.testing.assert_close(x, x_before, rtol=0, atol=0)
    for key in cond:
        torch.testing.assert_close(cond[key], cond_before[key], rtol=0, atol=0)

    noise = torch.randn(2, *case.latent_shape, generator=data_generator)
    two_rows = {key: value[:2] for key, value in cond.items()}
    with torch.no_grad():
        one_step = twinloss.AnyStepSampler(steps=1)(model, noise, cond=two_rows, generator=torch.Generator().manual_seed(2))
        few_step = twinloss.AnyStepSampler(steps=2)(model, noise, cond=two_rows, generator=torch.Generator().manual_seed(2))
    for sample in (one_step.sample, few_step.sample):
        assert sample.shape == noise.shape
        assert torch.isfinite(sample).all()
