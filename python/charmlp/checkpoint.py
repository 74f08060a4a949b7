"""Training checkpoints: full state, written atomically, verified on load.

A checkpoint holds everything needed to continue a run so that the result is bitwise the
same as if it had never stopped: the parameters, the optimizer state, the step, every RNG
state (the minibatch generator of each rank, torch's global CPU and CUDA generators,
Python's ``random`` and numpy's global RNG), the training config, the vocabulary and the
split membership (the words themselves, so evaluation and sampling need no data file).

Why the care:

* **Atomic writes.** A checkpoint is written to a temporary file in the same directory,
  flushed, ``fsync``-ed, re-read and verified, and only then renamed over the previous one
  with ``os.replace`` (atomic on POSIX), followed by an ``fsync`` of the directory. A crash,
  a full disk or a kill in the middle of a write leaves the previous good checkpoint in
  place; the temporary file is removed.
* **Verified loads.** The file is a standard ``torch.save`` zip archive, which stores a
  CRC-32 of every record. Before unpickling, every CRC is checked, so truncation and
  flipped bits are reported as "corrupt" instead of surfacing as an obscure unpickling
  error or, worse, as silently wrong weights. Loading uses ``weights_only=True``: a
  checkpoint cannot execute code.
* **Compatibility.** A format tag and version are checked, then the structure and the
  parameter shapes, so an unrelated ``.pt`` file or a checkpoint from an incompatible
  version is a clear :class:`CheckpointError`.
* **One writer per run directory.** :class:`RunLock` is an advisory ``flock`` on
  ``RUN_DIR/.lock`` that a training process takes before it writes anything there; a
  second process on the same directory gets :class:`RunDirInUse` at once instead of
  interleaving its files with the first one's. The kernel drops the lock when its holder
  dies, so a crashed run never leaves the directory locked.
* **No stale temporary files.** A writer killed in the middle of a write (SIGKILL, power
  loss) leaves its ``.<name>.tmp-<pid>`` behind (a checkpoint's is as large as the
  checkpoint). The next :func:`atomic_write` of the same file removes those of dead
  processes, and taking the :class:`RunLock` removes all of them (no other writer can be
  live then).
"""

from __future__ import annotations

import fcntl
import io
import json
import math
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = [
    "CheckpointError",
    "WriteError",
    "RunDirInUse",
    "RunLock",
    "CHECKPOINT_NAME",
    "LOCK_NAME",
    "FORMAT",
    "VERSION",
    "atomic_write",
    "atomic_write_text",
    "atomic_write_json",
    "json_safe",
    "remove_stale_temp_files",
    "save_checkpoint",
    "load_checkpoint",
    "checkpoint_path",
    "model_from_checkpoint",
    "verify_file",
]

#: File name of the latest checkpoint inside a run directory.
CHECKPOINT_NAME = "checkpoint.pt"
#: Lock file of a run directory (see :class:`RunLock`).
LOCK_NAME = ".lock"
#: Format tag and version stored in (and required of) every checkpoint.
FORMAT = "charmlp.checkpoint"
VERSION = 1

_REQUIRED = {
    "format": str,
    "version": int,
    "step": int,
    "model": dict,
    "optimizer": dict,
    "rng": dict,
    "train_config": dict,
    "vocab": dict,
    "split": dict,
    "corpus": dict,
    "world_size": int,
    "train_time_s": float,
}


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, truncated or incompatible."""


class WriteError(RuntimeError):
    """A file or directory that cannot be written: a read-only or full disk, no permission,
    a path through a regular file. The message names the path and the reason."""

    @classmethod
    def from_os_error(cls, e: OSError, path: str | Path | None = None) -> "WriteError":
        where = e.filename if e.filename is not None else path
        return cls(f"cannot write {where}: {e.strerror or e}")


class RunDirInUse(RuntimeError):
    """Another live process holds the run directory's :class:`RunLock`."""


# --------------------------------------------------------------------------- temp files

#: ``atomic_write``'s temporary files: ``.<name>.tmp-<pid>``.
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")


def _pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (signal 0 checks without sending)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except PermissionError:  # it exists, as another user's process
        return True
    except (ProcessLookupError, OverflowError):  # (OverflowError: beyond any pid)
        return False
    return True


def remove_stale_temp_files(directory: str | Path, name: str | None = None,
                            only_dead: bool = True) -> list[Path]:
    """Delete :func:`atomic_write` temporary files in ``directory`` (of the file ``name``
    only, if given) whose writer is dead, or all of them with ``only_dead=False`` (for a
    holder of the directory's :class:`RunLock`). Returns the removed paths.

    A pid that is alive may be a reused one, so such a file is kept: the next lock holder
    removes it.
    """
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        m = _TMP_RE.match(entry.name)
        if m is None or (name is not None and m["name"] != name):
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or (only_dead and _pid_alive(pid)):
            continue
        try:
            os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:  # gone already, or not ours to remove: not this writer's problem
            pass
    return removed


# --------------------------------------------------------------------------- run lock


class RunLock:
    """Exclusive ownership of a run directory: ``flock(LOCK_EX | LOCK_NB)`` on ``.lock``.

    :meth:`acquire` raises :class:`RunDirInUse` (naming the holder's pid, which the holder
    writes into the file) when another process holds it. ``flock`` locks belong to the
    open file, so two acquisitions in one process also exclude each other, and the kernel
    releases the lock when the holder exits or is killed. Acquiring removes every stale
    temporary file in the directory. The lock file itself stays: removing it would let a
    third process lock a new file while the second still holds the old one.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            error = self._in_use(fd)
            os.close(fd)
            raise error from None
        except BaseException:
            os.close(fd)
            raise
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        remove_stale_temp_files(self.directory, only_dead=False)
        return self

    def _in_use(self, fd: int) -> RunDirInUse:
        try:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        except OSError:
            holder = ""
        return RunDirInUse(f"{self.directory} is in use by another charmlp process"
                           + (f" (pid {holder})" if holder.isdigit() else "")
                           + "; wait for it to finish, or choose another --out")

    def check_free(self) -> None:
        """Raise :class:`RunDirInUse` if a live process holds the lock; write nothing (a
        shared probe of an existing lock file, for a clearer error than "holds a run")."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:  # no lock file (or unreadable): nobody to name
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._in_use(fd) from None
        except OSError:
            pass
        finally:
            os.close(fd)  # (closing drops the probe's shared lock)

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


# --------------------------------------------------------------------------- atomic files


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable: on POSIX the directory entry itself must be synced."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover  (platforms without directory fds)
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[io.BufferedWriter], None],
                 verify: Callable[[Path], None] | None = None) -> None:
    """Write ``path`` via ``write(file)`` so that readers see the old file or the new one.

    The data goes to ``.<name>.tmp-<pid>`` next to ``path``; after flush + fsync (and the
    optional ``verify(tmp_path)``), ``os.replace`` swaps it in. On any failure, including
    KeyboardInterrupt, the temporary file is deleted and ``path`` is untouched. Temporary
    files of ``path`` that dead writers left behind are removed first.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    remove_stale_temp_files(path.parent, path.name)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if verify is not None:
            verify(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float as the string ``"inf"``, ``"-inf"`` or ``"nan"``:
    strict JSON has no such numbers (Python's ``Infinity``/``NaN`` break other readers),
    and ``float()`` reads the strings back. A diverged run's losses are such floats."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(json_safe(obj), indent=2, ensure_ascii=False,
                                       allow_nan=False) + "\n")


# --------------------------------------------------------------------------- verification


def verify_file(path: str | Path) -> None:
    """Check that ``path`` is a complete, uncorrupted torch zip archive (all CRCs)."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except zipfile.BadZipFile as e:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint (not a complete "
                              f"archive: {e})") from None
    except (OSError, EOFError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({e})") from None
    if bad is not None:
        raise CheckpointError(f"{path}: corrupt checkpoint (checksum mismatch in record {bad!r})")


def _validate(ckpt: Any, path: Path) -> dict:
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a charmlp training checkpoint (no {FORMAT!r} tag)")
    version = ckpt.get("version")
    if version != VERSION:
        raise CheckpointError(f"{path}: incompatible checkpoint version {version!r}; this charmlp "
                              f"reads version {VERSION}")
    for key, typ in _REQUIRED.items():
        if key not in ckpt:
            raise CheckpointError(f"{path}: incompatible checkpoint: missing {key!r}")
        if not isinstance(ckpt[key], typ):
            raise CheckpointError(f"{path}: incompatible checkpoint: {key!r} is a "
                                  f"{type(ckpt[key]).__name__}, expected {typ.__name__}")
    model = ckpt["model"]
    if not isinstance(model.get("config"), dict) or not isinstance(model.get("state_dict"), dict):
        raise CheckpointError(f"{path}: incompatible checkpoint: model has no config/state_dict")
    batch = ckpt["rng"].get("batch")
    if not isinstance(batch, list) or len(batch) != ckpt["world_size"]:
        raise CheckpointError(f"{path}: incompatible checkpoint: expected one minibatch RNG state "
                              f"per rank ({ckpt['world_size']})")
    return ckpt


# --------------------------------------------------------------------------- save / load


def checkpoint_path(run: str | Path) -> Path:
    """The checkpoint of a run directory, or ``run`` itself when it is a file."""
    run = Path(run)
    return run if run.is_file() else run / CHECKPOINT_NAME


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Atomically write ``state`` (must follow the checkpoint layout) to ``path``."""
    state = dict(state)
    state["format"], state["version"] = FORMAT, VERSION
    _validate(state, Path(path))
    atomic_write(path, lambda f: torch.save(state, f), verify=verify_file)


def load_checkpoint(path: str | Path) -> dict:
    """Load and validate a checkpoint file or a run directory's latest checkpoint.

    Raises :class:`CheckpointError` with the path and the reason for anything but a
    complete, compatible checkpoint.
    """
    path = checkpoint_path(path)
    if not path.exists():
        where = path.parent
        raise CheckpointError(f"{path}: no checkpoint (is {where} a charmlp run directory? "
                              f"Runs write {CHECKPOINT_NAME} every --checkpoint-every steps)")
    verify_file(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors have many types; all mean the same here
        raise CheckpointError(f"{path}: corrupt or incompatible checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return _validate(ckpt, path)


def model_from_checkpoint(ckpt: dict, fused: bool | None = None, device=None):
    """Rebuild the :class:`~charmlp.model.MLPLanguageModel` of a checkpoint.

    ``fused`` overrides the run's choice (e.g. ``--reference`` at evaluation time).
    """
    from .model import MLPLanguageModel

    cfg = dict(ckpt["model"]["config"])
    if fused is not None:
        cfg["fused"] = bool(fused)
    try:
        model = MLPLanguageModel(**cfg)
        model.load_state_dict(ckpt["model"]["state_dict"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"incompatible checkpoint: its model does not load "
                              f"({str(e).splitlines()[0]})") from None
    return model.to(device) if device is not None else model
