"""A sharded training state whose keys are not the ones asked for is refused before anything loads (one gloo rank)."""

import torch
from _distributed import spawn
from torch import nn

import twinloss
from twinloss.checkpoint import load_sharded_training_state, save_sharded_training_state


def _model(extra_layer: bool) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(3, 3)] + ([nn.Linear(3, 3)] if extra_layer else [])
    return nn.Sequential(*layers)


def _step(model: nn.Module) -> torch.optim.Optimizer:
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).square().mean().backward()
    optimizer.step()
    return optimizer


def _refuse_then_load(rank: int, world_size: int, directory: str) -> None:
    import pytest

    loss_fn = twinloss.TwinFlowLoss(guidance_scale=0.0)
    larger = _model(extra_layer=True)
    save_sharded_training_state(directory, model=larger, optimizer=_step(larger), loss_fn=loss_fn, step=7)
    smaller = _model(extra_layer=False)
    optimizer = _step(smaller)
    before = {name: value.clone() for name, value in smaller.state_dict().items()}
    moments = [state["exp_avg"].clone() for state in optimizer.state.values()]
    with pytest.raises(ValueError, match=r"keys nothing would load \['model.1.bias', 'model.1.weight'"):
        load_sharded_training_state(directory, model=smaller, optimizer=optimizer, loss_fn=loss_fn)
    assert all(torch.equal(value, before[name]) for name, value in smaller.state_dict().items())
    assert all(torch.equal(state["exp_avg"], kept) for state, kept in zip(optimizer.state.values(), moments, strict=True))
    same = _model(extra_layer=True)  # the matching model loads, and gets the saved weights
    assert load_sharded_training_state(directory, model=same, optimizer=_step(same), loss_fn=loss_fn) == 7
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), larger.state_dict().values(), strict=True))


def test_a_sharded_state_of_a_larger_model_is_refused_naming_its_extra_keys_and_changes_nothing(tmp_path):
    spawn(_refuse_then_load, str(tmp_path / "state"), world_size=1)
