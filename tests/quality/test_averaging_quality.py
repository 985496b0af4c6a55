"""Sampling from the weight average beats the raw weights at 1 NFE on a small seeded run."""

import torch

import twinloss
from twinloss import metrics, toy
from twinloss_demo.training import train

# Measured over seeds 0-4 (400 flow-matching + 300 TwinFlow steps, width 64):
# sliced Wasserstein of the power-profile average over that of the raw
# weights was 0.73, 0.71, 0.70, 0.90, 0.86. The test runs the worst seed
# (test time) with a margin above its ratio.
MAX_RATIO = 0.95


def _one_nfe_distances(seed: int) -> tuple[float, float]:
    torch.manual_seed(seed)
    model = toy.TimeMLP((2,), width=64, depth=3)
    g = torch.Generator().manual_seed(seed)

    def draw(generator):
        return toy.ring_mixture(128, generator=generator).x, None, None

    train(model, twinloss.TwinFlowLoss.plain_flow_matching(), draw, steps=400, lr=1e-3, generator=g)
    average = twinloss.WeightAverage(twinloss.PowerFunctionDecay())
    loss_fn = twinloss.TwinFlowLoss(guidance_scale=0.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(300):
        x, _, _ = draw(g)
        out = loss_fn(model, x, generator=g)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        average.update(model)
    evaluation = torch.Generator().manual_seed(1000)
    held_out = toy.ring_mixture(1000, generator=evaluation).x
    noise = torch.randn(1000, 2, generator=evaluation)
    sampler = twinloss.AnyStepSampler(1)

    def distance(samples):
        return float(metrics.sliced_wasserstein(samples, held_out, generator=torch.Generator().manual_seed(0)))

    return distance(sampler(model, noise).sample), distance(sampler(average.sampling_model(model), noise).sample)


def test_power_average_samples_closer_to_held_out_data_than_the_raw_weights() -> None:
    raw, averaged = _one_nfe_distances(seed=3)
    assert averaged < MAX_RATIO * raw, (raw, averaged)
