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
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = [
    "CheckpointError",
    "CHECKPOINT_NAME",
    "FORMAT",
    "VERSION",
    "atomic_write",
    "atomic_write_text",
    "atomic_write_json",
    "save_checkpoint",
    "load_checkpoint",
    "checkpoint_path",
    "model_from_checkpoint",
    "verify_file",
]

#: File name of the latest checkpoint inside a run directory.
CHECKPOINT_NAME = "checkpoint.pt"
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
    KeyboardInterrupt, the temporary file is deleted and ``path`` is untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
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


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


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
