"""FSDP2 (fully_shard) runs of TwinFlowLoss on 2 gloo ranks against one process.

One spawn runs every scenario of ``_fsdp_worker.run`` (spawning costs most of
the time); each test below checks one of them against a single-process
reference built here from the same initial weights, batches and generators.
"""

import pytest
import torch
from _distributed import spawn
from _fsdp_worker import LOCAL_BATCH, loss_step, make_model, rank_batch, run
from torch import nn

import twinloss

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("fsdp")
    spawn(run, str(out_dir))
    return [torch.load(out_dir / f"rank{k}.pt", weights_only=False) for k in range(2)]


def reference(loss_fn, model):
    """Per-rank losses and the gradient of their mean (what FSDP2's averaging reduce gives)."""
    grads = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in model.named_parameters()}
    losses = []
    for rank in range(2):
        model.zero_grad()
        out = loss_step(loss_fn, model, rank)
        losses.append(out.loss.detach())
        for name, p in model.named_parameters():
            grads[name] += p.grad.float() / 2
    return losses, grads


def check_grads(got: dict, expected: dict, **tol) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], msg=name, **(tol or TOL))


def test_sharded_loss_and_gradients_match_one_process(ranks):
    losses, grads = reference(twinloss.TwinFlowLoss(), make_model())
    for rank in range(2):
        torch.testing.assert_close(ranks[rank]["loss"], losses[rank], **TOL)
        check_grads(ranks[rank]["grads"], grads)
    # one grad call, fake, guidance, 2 RCGM and rectification passes
    assert ranks[0]["calls"] == 6


def test_activation_checkpointing_changes_nothing(ranks):
    losses, grads = reference(twinloss.TwinFlowLoss(), make_model())
    for rank in range(2):
        torch.testing.assert_close(ranks[rank]["ac_loss"], losses[rank], **TOL)
        check_grads(ranks[rank]["ac_grads"], grads)


class _Bf16Inputs(nn.Module):
    """What FSDP2's MixedPrecisionPolicy(param_dtype=bf16) does to one process's model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.to(torch.bfloat16)

    def forward(self, x_t, t, r, y):
        return self.model(x_t.bfloat16(), t.bfloat16(), r.bfloat16(), y)


def test_mixed_precision_bf16_params_fp32_reduce(ranks):
    model = _Bf16Inputs(make_model())
    losses, grads = reference(twinloss.TwinFlowLoss(), model)
    grads = {name.removeprefix("model."): g for name, g in grads.items()}
    for rank in range(2):
        torch.testing.assert_close(ranks[rank]["mp_loss"], losses[rank], **TOL)
        got = ranks[rank]["mp_grads"]
        assert got.keys() == grads.keys()
        for name, expected in grads.items():
            # bf16 LayerNorm weight/bias gradients on CPU differ by about one
            # bf16 ulp (the reduction over the batch runs in another order on
            # FSDP2's gathered buffer); every other gradient matches to 1e-5.
            ulp = 2.0**-7 * float(expected.abs().max())
            tol = dict(rtol=0.0, atol=2 * ulp) if "norm" in name else TOL
            torch.testing.assert_close(got[name], expected, msg=name, **tol)
        assert ranks[rank]["mp_grad_dtypes"] == {torch.float32}  # reduced and kept in fp32


def _ema_reference(result):
    model = make_model()
    model.load_state_dict(result["ema_params_before"])
    teacher = twinloss.EMATeacher(target_decay=0.9)
    teacher.shadow = {name: s.clone() for name, s in result["ema_shadow"].items()}
    teacher.decay = result["ema_decay"]
    return model, teacher


def test_sharded_ema_evaluates_the_average(ranks):
    model, teacher = _ema_reference(ranks[0])
    x, y, _ = rank_batch(0)
    t = torch.linspace(0.1, 0.9, LOCAL_BATCH)
    expected = teacher(model, x, t, 0.5 * t, {"y": y})
    online = model(x, t, 0.5 * t, y)
    assert not torch.allclose(expected, online, atol=1e-4)  # the average differs from the weights
    for rank in range(2):
        torch.testing.assert_close(ranks[rank]["ema_probe"], expected, **TOL)
        # the online shards came back exactly
        for name, p in ranks[rank]["ema_params_before"].items():
            assert torch.equal(ranks[rank]["ema_params_after"][name], p)


def test_sharded_ema_teacher_loss_and_gradients_match_one_process(ranks):
    model, teacher = _ema_reference(ranks[0])
    losses, grads = reference(twinloss.TwinFlowLoss(teacher=teacher), model)
    for rank in range(2):
        torch.testing.assert_close(ranks[rank]["ema_loss"], losses[rank], **TOL)
        check_grads(ranks[rank]["ema_grads"], grads)


def test_sharded_ema_keeps_only_the_local_shards(ranks):
    total = sum(p.numel() for p in make_model().parameters())
    local = [ranks[k]["ema_local_numel"] for k in range(2)]
    assert local == [ranks[k]["param_local_numel"] for k in range(2)]
    assert sum(local) == total
    assert max(local) <= total // 2 + 64  # dim-0 shards: at most a few rows uneven


def test_sharded_ema_checkpoint_round_trip(ranks):
    for rank in range(2):
        assert ranks[rank]["dcp_equal"]
        assert ranks[rank]["dcp_is_dtensor"]
        decay, updates = ranks[rank]["dcp_decay"]
        assert decay == ranks[rank]["ema_decay"] and updates == 2


def test_sharded_ema_rejects_an_unsharded_model():
    teacher = twinloss.distributed.ShardedEMATeacher()
    with pytest.raises(ValueError, match="fully_shard"):
        teacher.update(make_model())
    with pytest.raises(ValueError, match="target_decay"):
        twinloss.distributed.ShardedEMATeacher(target_decay=1.0)



def test_sharded_ema_adds_exactly_its_local_shards_per_rank(ranks):
    """FSDPMemTracker peaks on each rank: the EMA adds its own shards, half the copy."""
    model = make_model()
    full_copy = sum(p.numel() * p.element_size() for p in model.parameters())
    shadows = [ranks[k]["shadow_bytes"] for k in range(2)]
    assert sum(shadows) == full_copy
    # FSDP2 on gloo overlaps one block's all-gather with the previous block's
    # reshard in a thread-timing-dependent order, so a peak can move by up to
    # one gathered block (seen: +6552 bytes in about one run of three); the
    # EMA's own share is its shards, exactly.
    block = max(sum(p.numel() * p.element_size() for p in b.parameters()) for b in model.blocks)
    for rank in range(2):
        added = ranks[rank]["peak_ema"] - ranks[rank]["peak_online"]
        assert abs(added - shadows[rank]) <= block, (added, shadows[rank], block)
        assert shadows[rank] <= full_copy // 2 + 64 * 4  # half, up to uneven dim-0 rows


def test_sharded_training_state_resumes_with_the_uninterrupted_losses(ranks):
    """Sharded EMA teacher, AdamW, per-rank generators: saved after 2 steps through DCP, resumed in a new setup."""
    from _resume_worker import SAVED_AT, STEPS

    for rank in range(2):
        result = ranks[rank]["resume"]
        assert result["step"] == SAVED_AT and result["teacher_updates"] == SAVED_AT
        assert len(result["uninterrupted"]) == STEPS
        assert result["first"] + result["resumed"] == result["uninterrupted"]
    assert ranks[0]["resume"]["uninterrupted"] != ranks[1]["resume"]["uninterrupted"]  # each rank its own data and noise


def test_a_sharded_state_whose_teacher_refuses_its_decay_changes_no_shard(ranks):
    """A teacher of another decay refuses the saved average before DCP writes the model, optimizer or teacher shards."""
    for rank in range(2):
        result = ranks[rank]["resume"]
        assert result["refusal"] is not None and "targets decay 0.9, this teacher 0.99" in result["refusal"]
        assert result["refused_unchanged"]
