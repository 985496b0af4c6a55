"""pytest-benchmark timings of one loss step per configuration (same model and batch).

    PYTHONPATH=src:benchmarks pytest benchmarks --benchmark-only -p no:cacheprovider

Each benchmark records the measured step and, in ``extra_info``, the loss's
own counts and the forward-equivalents floor (see ``overhead.py``). No
absolute time is asserted; compare the groups' means (``--benchmark-group-by=group``).
"""

import pytest
import torch
from overhead import CONFIGS, FreeModel, build, floor, make_step

CPU = torch.device("cpu")
MODELS = ["mlp", "sana", "wan"]


@pytest.fixture(scope="module", params=MODELS)
def setup(request):
    return request.param, build(request.param, 16, CPU, torch.float32)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_step(benchmark, setup, config):
    name, (model, x, cond, uncond) = setup
    benchmark.group = f"{name} step"
    step, counts = make_step(CONFIGS[config](), model, x, cond, uncond, CPU)
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    benchmark.extra_info.update(counts, floor=floor(counts))
    assert counts["grad_rows"] == x.shape[0]


@pytest.mark.parametrize("config", list(CONFIGS))
def test_loss_arithmetic(benchmark, config):
    """The loss with a near-free model: everything but the model's own work."""
    _, x, _, _ = build("mlp", 16, CPU, torch.float32)
    benchmark.group = "loss arithmetic (free model)"
    step, counts = make_step(CONFIGS[config](), FreeModel(), x, {}, {}, CPU)
    benchmark.pedantic(step, rounds=20, warmup_rounds=2)
    benchmark.extra_info.update(counts, floor=floor(counts))
