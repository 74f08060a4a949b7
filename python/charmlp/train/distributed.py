"""Training under ``torchrun`` (``WORLD_SIZE`` > 1): the process group (gloo on CPU, nccl on
CUDA), the DDP wrapper, and what the ranks agree on between chunks of steps.

Every rank draws its own minibatches, DDP's all-reduce averages the gradients, and rank 0
alone evaluates, logs, holds the run directory's lock and writes checkpoints. Every
collective has a timeout, :data:`DIST_TIMEOUT_ENV` (``CHARMLP_DIST_TIMEOUT``, seconds,
default :data:`DIST_TIMEOUT_DEFAULT_S` = 60): a rank that died or was stopped ends the
others within that time (:class:`~charmlp.train.PeerLost`) instead of gloo's 30 minutes.
Rank 0's evaluations, checkpoint writes and final report run while the others wait in a
collective, so a model whose evaluation takes longer than that needs a larger value.
Outside torchrun every function here is a no-op or its single-process equivalent.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from ..checkpoint import CheckpointError, WriteError
from .config import ConfigError
from .errors import PeerLost

#: Environment variable: seconds a torchrun rank waits in a collective for the others
#: before the job fails (a dead or stopped peer).
DIST_TIMEOUT_ENV = "CHARMLP_DIST_TIMEOUT"
DIST_TIMEOUT_DEFAULT_S = 60.0


@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we initialized the process group, so we tear it down

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _dist_timeout() -> datetime.timedelta:
    """The collectives' timeout: ``$CHARMLP_DIST_TIMEOUT`` seconds, default 60.

    torch's default (30 minutes for gloo) is how long a rank waits for a dead or stopped
    peer; a minute is far more than any wait of a healthy run (rank 0's evaluations and
    checkpoint writes, ~1 s at the lecture's size) and short enough to free the machines.
    """
    text = os.environ.get(DIST_TIMEOUT_ENV, "").strip()
    if not text:
        return datetime.timedelta(seconds=DIST_TIMEOUT_DEFAULT_S)
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ConfigError(f"{DIST_TIMEOUT_ENV} must be a number of seconds > 0, got {text!r}")
    return datetime.timedelta(seconds=seconds)


def _env_rank() -> int:
    """This process's rank, known before the process group exists (torchrun sets RANK)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def _setup_distributed(device: str) -> _Dist:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1 (or reuse an existing one)."""
    if dist.is_available() and dist.is_initialized():
        return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    timeout = _dist_timeout()
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=timeout)
    return _Dist(rank, world, local_rank, owns_group=True)


@contextlib.contextmanager
def _process_group(device: str) -> Iterator[_Dist]:
    """This process's place among the torchrun ranks for one :func:`~charmlp.train.train`
    call: joins the group, and leaves it at the end (:func:`_teardown_distributed`).

    On an exception there is no barrier: the other ranks may be blocked in a collective
    this rank will never join. The rank leaves the group and lets the exception end the
    process; torchrun then stops the other workers instead of everyone waiting for the
    collective timeout. A lost peer's error becomes a one-line :class:`PeerLost`.
    """
    d = _setup_distributed(device)
    try:
        yield d
    except BaseException as e:
        if d.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        if d.enabled and _is_peer_failure(e):
            raise PeerLost(f"rank {d.rank}: lost contact with another rank ({_first_line(e)}); it "
                           f"died or was stopped (a collective waits at most "
                           f"{_dist_timeout().total_seconds():g} s, ${DIST_TIMEOUT_ENV})") from None
        raise
    _teardown_distributed(d)


def _teardown_distributed(d: _Dist) -> None:
    """Barrier, then destroy the group: no rank leaves while another still talks to it."""
    if d.owns_group and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _wrap_ddp(d: _Dist, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The module the training steps call: under torchrun, DistributedDataParallel around
    ``model`` (its hooks all-reduce the gradients as backward sets them); else ``model``."""
    if not d.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[d.local_rank] if device.type == "cuda" else None)


def _agree(d: _Dist, stop: bool, bad_step: float, chunk: int) -> tuple[bool, float, int]:
    """What every rank does after a chunk, agreed: stop if any rank was signalled, the
    earliest diverged step of any rank (``inf``: none), the smallest proposed chunk length.

    Under DDP every rank must stop at the same step (a rank that left early would leave
    the others waiting in the next step's gradient all-reduce) and take the same chunks
    (this all-reduce must meet the others' at the same step). One MAX all-reduce of
    ``(stop, -bad_step, -chunk)``.
    """
    if not d.enabled:
        return stop, bad_step, chunk
    t = torch.tensor([float(stop), -bad_step, -float(chunk)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    a, b, c = t.cpu().tolist()
    return a > 0, -b, int(-c)


def _gather(d: _Dist, obj) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
    if not d.enabled:
        return [obj]
    objs = [None] * d.world_size
    dist.all_gather_object(objs, obj)
    return objs


def _broadcast(d: _Dist, obj):
    """Rank 0's ``obj`` on every rank (``obj`` itself in a single process)."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier(d: _Dist) -> None:
    """Under torchrun: wait until every rank is here (e.g. rank 0 has written a file)."""
    if d.enabled:
        dist.barrier()


#: Fragments of the errors gloo and nccl raise when a peer is gone or silent. Only the
#: message depends on recognizing them: the job ends either way.
_PEER_FAILURE_TEXT = ("Timed out", "timed out", "Connection closed by peer", "Connection reset by peer",
                      "Broken pipe", "NCCL communicator was aborted", "Socket Timeout")


def _is_peer_failure(e: BaseException) -> bool:
    if isinstance(e, (CheckpointError, WriteError)) or not isinstance(e, RuntimeError):
        return False
    return isinstance(e, dist.DistError) or any(t in str(e) for t in _PEER_FAILURE_TEXT)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text.split("] ", 1)[-1] if text.startswith("[") else text  # (drop gloo's source path)
