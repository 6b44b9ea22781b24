"""``aqlm-lora finetune`` on several processes: torchrun on loopback (gloo, one thread each) gives the
adapter of one process; Ctrl-C on one rank stops both with a checkpoint that resumes on another
process count; DDP leaves the frozen AQLM tensors alone; the batch split and its errors."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aqlm_lora.app import distributed, train
from aqlm_lora.app.distributed import Shares, check_batch
from aqlm_lora.app.errors import UserError
from tests.support.cli import ROOT, assert_user_error, cli_env, make_workspace, run

COMMON = ["--batch", "4", "--seq", "16", "--no-progress", "--lr", "3e-3", "--log-every", "1"]
LAUNCH_TIMEOUT = 600  # seconds for one torchrun launch (2 tiny processes; minutes on a loaded 2-core machine)

# Rank 1 sends itself SIGINT during step 2 (its 2nd micro-batch): every rank must stop after step 2.
CTRL_C_ON_RANK_1 = """
import os, signal, sys
import aqlm_lora.app.train as train
real, calls = train.take_windows, []
def windows(*args, **kwargs):
    calls.append(1)
    if os.environ.get("RANK") == "1" and len(calls) == 2:
        os.kill(os.getpid(), signal.SIGINT)
    return real(*args, **kwargs)
train.take_windows = windows
from aqlm_lora.app import cli
sys.exit(cli.main(sys.argv[1:]))
"""


# Plain SGD, no clipping, no warmup: the update is lr x the gradient itself, so a lost or doubled
# factor of the process count shows (AdamW normalizes it away; the CLI's runs use AdamW).
SGD_STEPS = """
import sys
import torch
from pathlib import Path
from aqlm_lora.app.adapters import new_adapter
from aqlm_lora.app.data import load_tokenizer, read_data
from aqlm_lora.app.distributed import setup, wrap_ddp
from aqlm_lora.app.models import load_causal_lm
from aqlm_lora.app.train import TrainSettings, train_steps
from aqlm_lora.lora.fused_base import use_fused_kernels
model_dir, data_path, out = map(Path, sys.argv[1:4])
where = setup("cpu")
model = load_causal_lm(model_dir, torch.float32)
use_fused_kernels(model)
torch.manual_seed(0)
peft_model = new_adapter(model, 4, 8, 0.0)
params = [p for p in peft_model.parameters() if p.requires_grad]
settings = TrainSettings(steps=2, lr=0.5, batch=4, seq=16, max_grad_norm=0)
data = read_data(data_path, load_tokenizer(model_dir))
trained = wrap_ddp(peft_model, where) if where.active else peft_model
optimizer = torch.optim.SGD(params, lr=0.5)
train_steps(trained, data.tokens, settings, optimizer, progress=False, labels=data.labels, where=where)
if where.main:
    torch.save({n: p.detach() for n, p in peft_model.named_parameters() if p.requires_grad}, out)
where.close()
"""


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("dist"), "--rounds", "1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(script: list[str], argv: list, nproc: int = 2) -> subprocess.CompletedProcess:
    env = dict(cli_env(), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", TORCH_ELASTIC_SHUTDOWN_TIMEOUT="120")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        *script,
        *map(str, argv),
    ]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=LAUNCH_TIMEOUT, cwd=ROOT)


def _assert_same_adapter(a: Path, b: Path, rtol: float = 1e-5) -> None:
    wa, wb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=rtol, atol=1e-7, msg=key)


def _losses(folder: Path) -> list[float]:
    return json.loads((folder / "trainer_state.json").read_text())["losses"]


# ---------------------------------------------------------------------------------------------
# The split (no process group needed)


def test_shares_cover_the_global_batch_once():
    for world, accum in [(1, 1), (2, 1), (2, 2), (4, 1), (3, 2)]:
        rows = []
        for rank in range(world):
            shares = Shares(12, world, rank, accum)
            for index in shares.mine:
                rows += range(index * shares.rows, (index + 1) * shares.rows)
        assert rows == list(range(12)), (world, accum)  # in row order, no overlap, nothing left out
    with pytest.raises(UserError, match=r"--batch 6 .* 4 processes .* multiple of 4"):
        check_batch(6, 4)
    assert train.micro_batch_seed(5, 7, 0) == train._step_seed(5, 7, 1)  # one process: seeds as before
    assert len({train.micro_batch_seed(5, 7, j) for j in range(64)}) == 64


def test_batch_that_does_not_split_is_refused(ws, capsys, tmp_path):
    argv = ["finetune", ws["aqlm"], "--data", ws["data"], "--out", tmp_path / "a", "--steps", "1", "--batch", "3"]
    code, _, err = run([*argv, "--grad-accum", "2", "--no-progress"], capsys)
    assert_user_error(code, err, "--batch 3", "does not split evenly", "multiple of 2")
    assert not (tmp_path / "a").exists()


def test_ddp_syncs_and_reduces_only_the_lora_weights(ws, monkeypatch):
    """DDP would broadcast every parameter at construction, int8 codes included: ours only the LoRA ones."""
    import torch.distributed as dist

    from aqlm_lora.app.adapters import new_adapter
    from aqlm_lora.app.models import load_causal_lm
    from aqlm_lora.lora.fused_base import use_fused_kernels

    model = load_causal_lm(ws["aqlm"])
    use_fused_kernels(model)
    peft_model = new_adapter(model, 4, 8, 0.0)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    frozen = {n: p for n, p in peft_model.named_parameters() if not p.requires_grad}
    assert any(p.dtype == torch.int8 for p in frozen.values())  # the codes are parameters
    broadcast = []
    real = dist._broadcast_coalesced
    monkeypatch.setattr(dist, "_broadcast_coalesced", lambda g, ts, *a: (broadcast.extend(ts), real(g, ts, *a))[1])
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ddp = distributed.wrap_ddp(peft_model, distributed.Dist(world=1))
        assert set(frozen) | {n for n, _ in peft_model.named_buffers()} <= ddp.parameters_to_ignore
        assert not trainable & ddp.parameters_to_ignore
        assert len(broadcast) == len(trainable) and all(t.dtype == torch.float32 for t in broadcast)
        ids = torch.randint(0, 256, (2, 8))
        ddp(input_ids=ids, labels=ids).loss.backward()
        logged = ddp._get_ddp_logging_data()
        assert logged["num_parameter_tensors"] == len(trainable)  # what the reducer all-reduces
        assert logged["dtypes"] == "float"
        assert all(p.grad is None for p in frozen.values())
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# torchrun on loopback


@pytest.mark.slow
def test_two_processes_equal_one_and_ctrl_c_on_rank_1_resumes_on_one(ws, capsys, tmp_path):
    """2 processes x 2 rows == 1 process x 4 rows (fp32, dropout 0): the step-2 checkpoint that Ctrl-C on
    rank 1 leaves equals 2 steps of one process, and resuming it on 1 process equals 4 steps of one."""
    data = ["--data", ws["data"], "--dropout", "0", *COMMON]
    one_2, one_4 = tmp_path / "one2", tmp_path / "one4"
    assert run(["finetune", ws["aqlm"], "--out", one_2, "--steps", "2", *data], capsys)[0] == 0
    assert run(["finetune", ws["aqlm"], "--out", one_4, "--steps", "4", *data], capsys)[0] == 0

    script = tmp_path / "ctrl_c.py"
    script.write_text(CTRL_C_ON_RANK_1)
    out = tmp_path / "two"
    done = _torchrun([str(script)], ["finetune", ws["aqlm"], "--out", out, "--steps", "4", *data])
    log = done.stdout + done.stderr
    assert done.returncode != 0, log  # the workers exit 130; torchrun reports that
    assert log.count("interrupted after step 2 of 4") == 1, log  # rank 0 alone prints
    assert log.count("finetune step 1/4") == 1 and log.count("finetune step 2/4") == 1, log
    assert "finetune step 3/4" not in log and "KeyboardInterrupt" not in log, log
    assert log.count("Traceback") == log.count("ChildFailedError:"), log  # torchrun's own report only
    assert not out.exists()
    ckpt = tmp_path / "two.checkpoint"
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step-00000002"]
    state = json.loads((ckpt / "step-00000002" / "trainer_state.json").read_text())
    assert state["processes"] == 2 and state["interrupted"] is True and state["target_step"] == 4
    _assert_same_adapter(one_2, ckpt / "step-00000002")
    assert state["losses"] == pytest.approx(_losses(one_2), rel=1e-5)

    code, stdout, err = run(["finetune", ws["aqlm"], "--out", out, "--steps", "4", "--resume", *data], capsys)
    assert code == 0, err
    assert "steps 3..4" in stdout
    _assert_same_adapter(one_4, out)
    assert _losses(out) == pytest.approx(_losses(one_4), rel=1e-5)
    assert not ckpt.exists()


@pytest.mark.slow
def test_two_processes_with_dropout_bf16_and_checkpointing_equal_one_with_grad_accum(ws, capsys, tmp_path):
    """Dropout masks are drawn per micro-batch: 2 processes == 1 process with --grad-accum 2, dropout on,
    the model in bfloat16, activations recomputed (gradient checkpointing)."""
    argv = ["--data", ws["data"], "--steps", "2", "--dropout", "0.1", "--dtype", "bfloat16", *COMMON]
    argv += ["--gradient-checkpointing"]
    one = tmp_path / "one"
    assert run(["finetune", ws["aqlm"], "--out", one, "--grad-accum", "2", *argv], capsys)[0] == 0
    two = tmp_path / "two"
    done = _torchrun(["-m", "aqlm_lora"], ["finetune", ws["aqlm"], "--out", two, *argv])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "tokens/s on 2 processes" in done.stdout
    _assert_same_adapter(one, two)
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-5)
    assert json.loads((two / "trainer_state.json").read_text())["processes"] == 2


@pytest.mark.slow
def test_two_processes_take_one_process_s_sgd_step(ws, tmp_path):
    """The gradient itself, not only AdamW's normalized step, equals one process's on the whole batch."""
    script = tmp_path / "sgd.py"
    script.write_text(SGD_STEPS)
    argv = [ws["aqlm"], ws["data"]]
    env = dict(cli_env(), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, str(script), *map(str, argv), str(tmp_path / "one.pt")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    done = _torchrun([str(script)], [*argv, tmp_path / "two.pt"])
    assert done.returncode == 0, done.stdout + done.stderr
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one.keys() == two.keys() and one
    moved = max(float((one[k] - before).abs().max()) for k, before in _initial_adapter(ws).items())
    assert moved > 1e-2  # the steps moved the adapter a lot, so a factor of 2 in the gradient would show
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=key)


def _initial_adapter(ws) -> dict:
    from aqlm_lora.app.adapters import new_adapter
    from aqlm_lora.app.models import load_causal_lm

    torch.manual_seed(0)
    peft_model = new_adapter(load_causal_lm(ws["aqlm"], torch.float32), 4, 8, 0.0)
    return {n: p.detach() for n, p in peft_model.named_parameters() if p.requires_grad}


@pytest.mark.slow
def test_accelerate_launch_equals_one_process(ws, capsys, tmp_path):
    """``accelerate launch --multi_gpu`` (torchrun's launcher underneath) on CPU, 2 processes, fp32."""
    argv = ["--data", ws["data"], "--steps", "2", "--dropout", "0", *COMMON]
    one = tmp_path / "one"
    assert run(["finetune", ws["aqlm"], "--out", one, *argv], capsys)[0] == 0
    two = tmp_path / "two"
    env = dict(cli_env(), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--main_process_port", str(_free_port()), "--mixed_precision", "no",
        "--dynamo_backend", "no", "-m", "aqlm_lora", "finetune", str(ws["aqlm"]), "--out", str(two), *map(str, argv),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=LAUNCH_TIMEOUT, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "tokens/s on 2 processes" in done.stdout
    _assert_same_adapter(one, two)
