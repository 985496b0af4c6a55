"""The reference FSDP2 script runs under torchrun (2 gloo ranks) and trains the loss."""

import os
import pathlib
import re
import subprocess
import sys

import torch
from toy_models import BlockMLP

import twinloss

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_fsdp_train_runs_two_steps_under_torchrun(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "benchmarks")]))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(ROOT / "benchmarks" / "fsdp_train.py"), "--steps", "2", "--ema",
        "--batch", "8", "--data", "12", "--width", "16", "--depth", "2", "--classes", "3",
        "--checkpoint", str(tmp_path / "ckpt"),
    ]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    losses = [float(v) for v in re.findall(r"step \d+ loss ([0-9.]+)", run.stdout)]
    assert len(losses) == 2
    assert (tmp_path / "ckpt" / ".metadata").exists()

    # step 0 in one process: the mean of both ranks' losses on the same weights
    torch.manual_seed(0)
    model = BlockMLP((12,), width=16, depth=2, num_classes=3)
    loss_fn = twinloss.TwinFlowLoss(teacher=twinloss.EMATeacher())
    expected = []
    for rank in range(2):
        data_gen = torch.Generator().manual_seed(1000 + rank)
        loss_gen = torch.Generator().manual_seed(2000 + rank)
        x = torch.randn(8, 12, generator=data_gen)
        y = torch.randint(0, 3, (8,), generator=data_gen)
        out = loss_fn(model, x, cond={"y": y}, uncond={"y": torch.full_like(y, 3)}, generator=loss_gen)
        expected.append(out.loss.item())
    assert abs(losses[0] - sum(expected) / 2) <= 1e-5
