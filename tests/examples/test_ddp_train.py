"""examples/ddp_train.py: two gloo ranks through torchrun, synchronised RegBN inside DDP."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ddp_train.py"


@pytest.mark.slow
def test_torchrun_quick_keeps_the_ranks_in_step():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--standalone", str(EXAMPLE), "--quick"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "epoch 1/1: train loss" in done.stdout
    assert "running W identical on all ranks: True" in done.stdout
