"""Shared fixtures of the core tests, and one torch thread for every test and the processes it starts.

Many tests compare two computations bit for bit (a model saved and reloaded, one process against two). With
several intra-op threads, some CPU kernels split their reductions by the threads they get, so the same
tensors can round differently from call to call (seen on a 2-core AMD EPYC in the hidream and accelerate
tests); one thread makes each comparison mean what it says. The tiny test models are also faster on one.
"""

import os

import pytest
import torch

os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the processes the distributed tests start
torch.set_num_threads(1)


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
