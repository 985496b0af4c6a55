"""ShardedWeightAverage on 2 gloo ranks against the float64 closed form and one process."""

import copy

import pytest
import torch
from _averaging_worker import GAMMA, UPDATES, probe, run
from _distributed import spawn
from _fsdp_worker import make_model

import twinloss


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("fsdp_average")
    spawn(run, str(out_dir))
    return [torch.load(out_dir / f"rank{k}.pt", weights_only=False) for k in range(2)]


def _power_weights(k: int) -> list[float]:
    return [(tau ** (GAMMA + 1) - (tau - 1) ** (GAMMA + 1)) / k ** (GAMMA + 1) for tau in range(1, k + 1)]


def test_sharded_average_is_the_power_function_closed_form(ranks) -> None:
    weights = _power_weights(UPDATES)
    for result in ranks:
        assert result["num_updates"] == UPDATES
        assert result["decay"] == pytest.approx((1 - 1 / UPDATES) ** (GAMMA + 1))
        for name, value in result["average"].items():
            expected = sum(w * it[name].double() for w, it in zip(weights, result["iterates"], strict=True))
            torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-6, msg=name)
        assert result["average_local_numel"] == result["param_local_numel"]  # one shard each, not a full copy
    total = sum(v.numel() for v in ranks[0]["average"].values())
    assert ranks[0]["average_local_numel"] < total and ranks[1]["average_local_numel"] < total


def test_sampling_from_the_sharded_average_matches_one_process(ranks) -> None:
    model = make_model()
    model.load_state_dict(ranks[0]["params_after"])
    reference = copy.deepcopy(model)
    reference.load_state_dict(ranks[0]["average"], strict=False)
    noise, cond = probe()
    expected = twinloss.AnyStepSampler(2, mode="any")(reference, noise, cond=cond).sample
    for result in ranks:
        torch.testing.assert_close(result["sample"], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(result["sample_swapped"], expected, rtol=1e-5, atol=1e-5)
        for name, value in result["params_after"].items():  # the online shards are back
            assert torch.equal(value, result["iterates"][-1][name]), name


def test_sharded_average_round_trips_through_distributed_checkpoint(ranks) -> None:
    for result in ranks:
        assert result["restored"] == (result["num_updates"], result["decay"])
        assert result["restored_equal"]
