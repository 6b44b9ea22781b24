"""Time and peak memory of LoRA training steps, each contender in a process of its own.

The medium demo compares our fused layer, PEFT's stock ``AqlmLoraLinear`` and PEFT's LoRA on the
dense model. :func:`measure_all` starts one fresh interpreter (``python -m
aqlm_lora.app.demo_timing``) that imports the libraries and then forks one process per contender,
which runs :func:`aqlm_lora.app.demo_phases.time_training_steps` and exits. No contender inherits
another's threads, tensors, caches or freed-but-kept memory, none pays for importing torch,
transformers and PEFT again, and a crash or a hang is reported as that contender's result.

Memory is the resident set size (RSS) of that process, as the kernel counts it: everything it
holds, whoever allocated it. tracemalloc sees Python objects only, not tensor storage; torch's
profiler sees torch's own allocations only, not the numpy arrays and compiled code of aqlm's numba
kernels or the scratch buffers of C++ kernels. Right before the steps the process's peak RSS is
reset to its current RSS (Linux ``/proc/self/clear_refs``), so the reported peak is what the
training steps added to the loaded model and adapter: activations, gradients, optimizer state,
kernel scratch. The process's whole peak (Python, libraries, model) is reported too; where the
reset is not available, only that (``getrusage`` max RSS).
"""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

from .errors import one_line

# The fields of the demo config that a timed step reads.
STEP_FIELDS = ("r", "alpha", "dropout", "lora_lr", "batch", "seq")
# What the fresh interpreter imports before it forks the contenders (nothing here starts a thread).
PRELOAD = ("torch", "transformers.models.llama.modeling_llama", "peft", "aqlm", "aqlm_lora.app.demo_phases")


def job(model_dir: Path, kind: str, tokens_file: Path, cfg, seed: int, *, steps: int, budget_s: float) -> dict:
    """One contender for :func:`measure_all`: LoRA steps of ``kind`` on ``model_dir`` (see ``time_training_steps``)."""
    return {
        "model_dir": str(model_dir),
        "kind": kind,
        "tokens": str(tokens_file),
        "cfg": {name: getattr(cfg, name) for name in STEP_FIELDS},
        "seed": seed,
        "steps": steps,
        "budget_s": budget_s,
    }


def measure_all(jobs: list[dict], scratch: Path, timeout_s: float) -> list[dict]:
    """Each job's result (time and memory, or ``error``), in order; ``timeout_s`` is per job."""
    import aqlm_lora

    jobs_file, results_file = scratch / "timing_jobs.json", scratch / "timing_results.json"
    jobs_file.write_text(json.dumps({"jobs": jobs, "timeout_s": timeout_s}))
    results_file.unlink(missing_ok=True)
    package_root = str(Path(aqlm_lora.__file__).resolve().parents[1])  # also from a source checkout
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", __name__, str(jobs_file), str(results_file)]
    failure = None
    try:
        code = subprocess.run(command, env=env, timeout=timeout_s * (len(jobs) + 1)).returncode
        if code:
            failure = f"the timing process ended with exit code {code}"
    except subprocess.TimeoutExpired:
        failure = "the timing process did not finish in time (stopped)"
    results = json.loads(results_file.read_text()) if results_file.is_file() else []
    return results + [{"error": failure or "no result"}] * (len(jobs) - len(results))


def _proc_status_bytes(field: str) -> Optional[int]:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes; None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _max_rss_bytes() -> int:
    """``getrusage`` max RSS (kilobytes on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class PeakMemory:
    """Peak RSS of this process from :meth:`start` on (see the module docstring)."""

    def __init__(self) -> None:
        self.before: Optional[int] = None  # RSS when the steps start, where the peak could be reset
        self.process_peak_before = _max_rss_bytes()  # loading included

    def start(self) -> None:
        import gc

        gc.collect()
        self.process_peak_before = _max_rss_bytes()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # peak RSS := current RSS
        except OSError:
            return
        self.before = _proc_status_bytes("VmRSS")

    def result(self) -> dict:
        process_peak = max(self.process_peak_before, _max_rss_bytes())
        out = {"process_peak_rss_bytes": process_peak}
        peak = _proc_status_bytes("VmHWM")
        if self.before is not None and peak is not None:
            out["steps_peak_rss_above_loaded_bytes"] = max(0, peak - self.before)
            out["loaded_rss_bytes"] = self.before
        return out


def _timed_steps(spec: dict) -> dict:
    import torch

    from .demo_phases import time_training_steps
    from .models import quiet_transformers

    quiet_transformers()
    warnings.filterwarnings("ignore")  # the demo shows the result, not library chatter
    tokens = torch.load(spec["tokens"], weights_only=True)
    memory = PeakMemory()
    result = time_training_steps(
        Path(spec["model_dir"]),
        spec["kind"],
        tokens,
        SimpleNamespace(**spec["cfg"]),
        spec["seed"],
        progress=False,
        steps=spec["steps"],
        budget_s=spec["budget_s"],
        before_steps=memory.start,
    )
    return {**result, **memory.result(), "threads": torch.get_num_threads()}


def _in_fork(spec: dict, timeout_s: float) -> dict:
    """``_timed_steps(spec)`` in a forked process; its result, or what became of it."""
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the contender
        os.close(read_end)
        try:
            result = _timed_steps(spec)
        except BaseException as exc:  # noqa: BLE001 - anything the path raises is the contender's result
            result = {"error": f"{type(exc).__name__}: {one_line(exc, 160)}"}
        with os.fdopen(write_end, "w") as out:
            out.write(json.dumps(result))
        os._exit(0)  # no interpreter teardown in a forked copy
    os.close(write_end)
    data, deadline = b"", time.monotonic() + timeout_s
    with os.fdopen(read_end, "rb") as inp:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([inp], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return {"error": f"no result within {timeout_s:.0f} s (stopped)"}
            chunk = os.read(inp.fileno(), 1 << 16)
            if not chunk:
                break
            data += chunk
    _, status = os.waitpid(pid, 0)
    if data:
        return json.loads(data)
    return {"error": f"the process ended ({_exit_reason(status)}) with no result"}


def _exit_reason(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.WEXITSTATUS(status)}"


def _serve(jobs_file: Path, results_file: Path) -> None:
    """Import the libraries once, then run each job in a fork; results are saved after each job."""
    import importlib

    os.dup2(2, 1)  # anything a library prints goes to stderr: the demo's stdout holds its tables only
    for name in PRELOAD:
        importlib.import_module(name)
    spec = json.loads(jobs_file.read_text())
    results = []
    for one in spec["jobs"]:
        print(f"timing {one['kind']} LoRA steps on {Path(one['model_dir']).name}", file=sys.stderr, flush=True)
        results.append(_in_fork(one, spec["timeout_s"]))
        results_file.write_text(json.dumps(results))


if __name__ == "__main__":
    _serve(Path(sys.argv[1]), Path(sys.argv[2]))
