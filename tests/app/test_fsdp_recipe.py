"""The FSDP recipe of docs/distributed.md, run on CPU: 2 processes (gloo) through torchrun give the
LoRA gradients of one process on the whole batch, and leave the AQLM tensors alone."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_fsdp_recipe_matches_one_process_on_cpu():
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONPATH=str(ROOT))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        str(ROOT / "tests" / "support" / "fsdp_worker.py"),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("FSDP_RESULT")]
    assert len(lines) == 1, done.stdout[-2000:]
    _, compared, worst, unchanged = lines[0].split()
    assert int(compared) == 28  # A and B of 7 linears x 2 layers
    assert float(worst) < 1e-5
    assert unchanged == "True"
