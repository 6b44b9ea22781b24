"""``finetune`` on several processes (torchrun, accelerate launch): the process group, who does what.

A launcher sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`setup` then joins the process group (``env://``): gloo for ``--device cpu``, NCCL for
``--device cuda`` (one GPU per process, ``cuda:LOCAL_RANK``). Without those variables, or with
``WORLD_SIZE=1``, it is one plain process and nothing here communicates.

How the work is split (:class:`Shares`): the global batch of ``--batch`` rows is cut into
``world * grad_accum`` micro-batches of equal size, in row order; process ``r`` runs micro-batches
``r * grad_accum .. (r + 1) * grad_accum - 1``. Every process draws the same window offsets for
step ``t`` (from ``(seed, t)``), so the shares never overlap and together are exactly the rows one
process would train on at step ``t``. What the model sees of the other processes is only the
averaged gradient (DDP, :func:`wrap_ddp`) and one all-reduce of three numbers per step
(:meth:`Dist.step_stats`: loss, non-finite flag, stop flag).

Only rank 0 writes (adapter, checkpoints, progress lines); the others read a checkpoint to resume
from through rank 0 (:meth:`Dist.share_dir`), so a second machine needs no shared filesystem for
it (the model and the data must be at the same path on every machine).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .errors import UserError

# Set by torchrun / accelerate launch (and by hand for a manual launch).
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise UserError(f"environment variable {name}={text!r} is not an integer (set by torchrun)") from None


@dataclass
class Dist:
    """Where this process stands: ``rank`` of ``world`` processes, its device, the backend (None: alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None
    owns_group: bool = False  # we initialised the process group, so we tear it down

    @property
    def main(self) -> bool:
        """Rank 0: the one process that prints and writes."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    # -- collectives (no-ops alone) ------------------------------------------------------------

    def step_stats(self, loss_sum: float, nonfinite: bool, stop: bool) -> tuple[float, bool, bool]:
        """Summed over the processes: ``(loss, any non-finite, any stop request)``; one all-reduce."""
        if not self.active:
            return loss_sum, nonfinite, stop
        import torch.distributed as dist

        stats = torch.tensor([loss_sum, float(nonfinite), float(stop)], dtype=torch.float64, device=self.device)
        dist.all_reduce(stats)
        loss, bad, halt = stats.tolist()
        return loss, bad > 0, halt > 0

    def all_ok(self, ok: bool) -> bool:
        """True when every process says ``ok`` (a failure on one rank must stop all, not leave them waiting)."""
        if not self.active:
            return ok
        import torch.distributed as dist

        flag = torch.tensor([0 if ok else 1], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag)
        return int(flag.item()) == 0

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def share_dir(self, source: Optional[Path]) -> Optional[Path]:
        """Rank 0's folder ``source`` on every rank: rank 0 gets ``source`` back, the others a local copy.

        For ``--resume``: rank 0 reads the checkpoint, the others get its files (adapter, optimizer
        state, trainer state; a few MiB for LoRA) through the process group, so a machine without
        the checkpoint folder resumes too. ``None`` on rank 0: ``None`` everywhere.
        """
        if not self.active:
            return source
        import torch.distributed as dist

        payload: list = [None]
        if self.main and source is not None:
            payload[0] = (source.name, {p.name: p.read_bytes() for p in sorted(source.iterdir()) if p.is_file()})
        dist.broadcast_object_list(payload, src=0, device=self.device if self.device.type == "cuda" else None)
        if self.main or payload[0] is None:
            return source if self.main else None
        name, files = payload[0]
        copy = Path(tempfile.mkdtemp(prefix=f"aqlm_lora_rank{self.rank}_")) / name
        copy.mkdir()
        for file_name, data in files.items():
            (copy / file_name).write_bytes(data)
        return copy

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.owns_group = False


def launched() -> bool:
    """Whether a launcher (torchrun, accelerate launch) started this process as one of several."""
    return all(name in os.environ for name in _ENV) and _env_int("WORLD_SIZE", 1) > 1


def setup(device: str = "cpu") -> Dist:
    """Join the process group when launched as one of several processes, else a lone :class:`Dist`.

    ``device``: ``cpu`` (gloo) or ``cuda`` (NCCL, ``cuda:LOCAL_RANK``). ``AQLM_LORA_DIST_TIMEOUT``
    (seconds, default 1800) bounds how long a rank waits for the others in one collective.
    """
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible (or torch is a CPU build)")
    if not launched():
        alone = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
        return Dist(device=alone)
    import torch.distributed as dist

    rank, world, local_rank = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    if device == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices are visible: start at "
                "most one process per GPU (torchrun --nproc-per-node)"
            )
        torch.cuda.set_device(local_rank)
        where, backend = torch.device("cuda", local_rank), "nccl"
    else:
        where, backend = torch.device("cpu"), "gloo"
    owns = False
    if not dist.is_initialized():
        timeout = timedelta(seconds=_env_int("AQLM_LORA_DIST_TIMEOUT", 1800))
        kwargs = {"device_id": where} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=timeout, **kwargs)
        owns = True
    elif dist.get_world_size() != world or dist.get_rank() != rank:
        raise UserError("a process group is already initialised with another rank or world size")
    return Dist(rank=rank, world=world, local_rank=local_rank, device=where, backend=backend, owns_group=owns)


@dataclass(frozen=True)
class Shares:
    """How step ``t``'s global batch is cut: ``chunks`` micro-batches of ``rows`` rows, this rank's ``mine``."""

    batch: int
    world: int
    rank: int
    grad_accum: int = 1

    def __post_init__(self) -> None:
        check_batch(self.batch, self.world, self.grad_accum)

    @property
    def chunks(self) -> int:
        return self.world * self.grad_accum

    @property
    def rows(self) -> int:
        return self.batch // self.chunks

    @property
    def mine(self) -> range:
        """Indices of this rank's micro-batches (micro-batch ``j`` holds rows ``j*rows .. (j+1)*rows-1``)."""
        return range(self.rank * self.grad_accum, (self.rank + 1) * self.grad_accum)


def check_batch(batch: int, world: int, grad_accum: int = 1) -> None:
    """``--batch`` must split evenly into ``world * grad_accum`` micro-batches."""
    chunks = world * grad_accum
    if batch % chunks:
        what = f"{world} processes" if world > 1 else "one process"
        if grad_accum > 1:
            what += f" x --grad-accum {grad_accum}"
        raise UserError(
            f"--batch {batch} (the global batch) does not split evenly over {what} ({chunks} micro-batches); "
            f"use a multiple of {chunks}"
        )


def frozen_names(model: nn.Module) -> list[str]:
    """Names of every parameter without ``requires_grad`` and of every buffer: what DDP must leave alone."""
    names = [name for name, p in model.named_parameters() if not p.requires_grad]
    return names + [name for name, _ in model.named_buffers()]


def wrap_ddp(model: nn.Module, where: Dist) -> nn.Module:
    """``DistributedDataParallel`` over the trainable (LoRA) parameters only.

    DDP's reducer only takes parameters with ``requires_grad``, but at construction it broadcasts
    *every* parameter and buffer from rank 0 (``_sync_module_states``): all of a model's int8/int16
    codes, codebooks and scales, and ``broadcast_buffers`` would repeat that for buffers before
    every forward. Every rank loads the same checkpoint, so both are skipped: the frozen
    parameters and all buffers go on DDP's ignore list, and only the LoRA weights are broadcast
    once (the same values anyway: same ``--seed``) and all-reduced after each backward. Non-float
    parameters could not be all-reduced as gradients anyway (they cannot require grad).
    """
    from torch.nn.parallel import DistributedDataParallel

    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen_names(model))
    device_ids = [where.device.index] if where.device.type == "cuda" else None
    # Buffers are all ignored, so neither the construction nor each forward syncs them.
    return DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)
