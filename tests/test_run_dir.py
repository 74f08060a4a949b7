"""Run directories: one writer each (a lock), default names that never collide, no stale
temporary files, and ``--resume`` given a checkpoint file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import charmlp.train.rundir as rundir_mod
from charmlp.checkpoint import CHECKPOINT_NAME, LOCK_NAME, RunDirInUse, RunLock, load_checkpoint
from charmlp.cli import main
from charmlp.train import ConfigError, train

from _train_util import small_config

QUIET = dict(progress=False, log=lambda s: None)
SMALL = ["--hidden", "32", "--init", "default", "--threads", "1", "--samples", "2", "-q"]


def _dead_pid() -> int:
    """The pid of a process that has exited (reaped: no process has it, for a while)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _snapshot(run: Path) -> dict[str, bytes]:
    """Every file of the run but the lock. A live training's checkpoint temp file can be
    renamed away between the listing and the read: what is gone by then is left out."""
    out = {}
    for p in sorted(run.iterdir()):
        if p.name != LOCK_NAME:
            try:
                out[p.name] = p.read_bytes()
            except FileNotFoundError:
                pass
    return out


def _start_training(run: Path, *extra) -> subprocess.Popen:
    """A long `charmlp train` in another process, once it has written its first checkpoint."""
    p = subprocess.Popen([sys.executable, "-m", "charmlp", "train", "--steps", "1000000",
                          "--checkpoint-every", "50", "--eval-every", "0", *SMALL, "--out", str(run),
                          *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run / CHECKPOINT_NAME).exists():
        if p.poll() is not None or time.monotonic() > deadline:
            p.kill()
            out, err = p.communicate()
            pytest.fail(f"the training did not start:\n{out}\n{err}")
        time.sleep(0.05)
    return p


# --------------------------------------------------------------------------- the lock


def test_a_second_lock_fails_at_once_and_names_the_holder(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunDirInUse, match=f"{tmp_path} is in use by another charmlp process "
                                              rf"\(pid {os.getpid()}\)"):
            RunLock(tmp_path).acquire()
    with RunLock(tmp_path) as again:  # released on exit
        assert again.held
    assert (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()}\n"


def test_the_kernel_releases_a_dead_holders_lock(tmp_path):
    code = ("import sys, time; from charmlp.checkpoint import RunLock; "
            f"RunLock({str(tmp_path)!r}).acquire(); print('locked', flush=True); time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirInUse, match=f"pid {p.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        p.kill()
        p.wait()
    RunLock(tmp_path).acquire().release()  # SIGKILL left no lock behind


def test_two_trainings_on_one_run_dir(tmp_path, capsys):
    """A second `train --out` (or `--resume`) on a directory that a live training writes
    fails at once, clearly, and touches none of the first run's files."""
    run = tmp_path / "run"
    first = _start_training(run)
    try:
        before = _snapshot(run)
        assert main(["train", "--steps", "100", *SMALL, "--out", str(run)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert f"{run} is in use by another charmlp process (pid {first.pid})" in err
        assert main(["train", "--resume", str(run), "-q"]) == 2
        assert f"(pid {first.pid})" in capsys.readouterr().err
        # (the first run's periodic checkpoint may have moved on meanwhile: only compare
        # what the second process could have written)
        after = _snapshot(run)
        assert after["config.json"] == before["config.json"]
        assert after["split.json"] == before["split.json"]
        assert not (run / "results.json").exists()
    finally:
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=120)
    assert first.returncode == 130, err
    # The first run is whole: its checkpoint and metrics agree, and it continues.
    step = load_checkpoint(run)["step"]
    assert len((run / "metrics.csv").read_text().splitlines()) == 1 + step
    assert main(["train", "--resume", str(run), "--steps", str(step + 20), "-q"]) == 0


def test_a_fresh_run_checks_again_under_the_lock(tmp_path, monkeypatch):
    """A run that finished between the first check and taking the lock is not overwritten."""
    run = tmp_path / "run"
    train(small_config(steps=20), run, **QUIET)
    before = _snapshot(run)
    monkeypatch.setattr(rundir_mod, "_check_no_run", lambda out, locked=False: None)
    real_take = rundir_mod._Ownership.take

    def take(self, run_dir, fresh):  # the first check passed; the check under the lock runs
        monkeypatch.undo()
        real_take(self, run_dir, fresh)

    monkeypatch.setattr(rundir_mod._Ownership, "take", take)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(small_config(steps=20), run, **QUIET)
    assert _snapshot(run) == before


# --------------------------------------------------------------------------- default names


def test_default_run_names_of_the_same_second_differ(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(rundir_mod, "_timestamp", lambda: "20261203-134501")
    a = train(small_config(steps=20), **QUIET)["run_dir"]
    b = train(small_config(steps=20), **QUIET)["run_dir"]
    assert a != b
    for run in (a, b):
        assert Path(run).parent == Path("runs") and Path(run).name.startswith("20261203-134501-")
        assert load_checkpoint(run)["step"] == 20


def test_a_taken_default_name_is_redrawn(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(rundir_mod, "_timestamp", lambda: "20261203-134501")
    suffixes = iter(["aaaaaa", "aaaaaa", "bbbbbb"])
    monkeypatch.setattr(rundir_mod, "_run_suffix", lambda: next(suffixes))
    said = []
    first = rundir_mod._create_run_dir(rundir_mod._default_run_dir(), True, said.append)
    second = rundir_mod._create_run_dir(rundir_mod._default_run_dir(), True, said.append)
    assert first == Path("runs/20261203-134501-aaaaaa")
    assert second == Path("runs/20261203-134501-bbbbbb") and second.is_dir()
    assert said == [f"run directory: {second} ({first} was taken)"]


# --------------------------------------------------------------------------- stale temp files


def test_stale_temp_files_are_removed_on_resume(tmp_path):
    run = tmp_path / "run"
    train(small_config(steps=50, lr_schedule="constant"), run, **QUIET)
    dead = _dead_pid()
    stale = [run / f".{CHECKPOINT_NAME}.tmp-{dead}", run / f".metrics.csv.tmp-{dead}",
             run / f".results.json.tmp-{os.getpid() + 1}"]  # (any pid: the lock holder removes all)
    for p in stale:
        p.write_bytes(b"\0" * 100_000)  # what a SIGKILL in the middle of a write leaves
    keep = run / "notes.tmp-1"  # not an atomic_write temporary file
    keep.write_text("mine")
    train(None, resume=run, overrides={"steps": 60}, **QUIET)
    assert not any(p.exists() for p in stale)
    assert keep.read_text() == "mine"


def test_stale_temp_files_are_removed_when_a_fresh_run_takes_the_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    stale = run / f".{CHECKPOINT_NAME}.tmp-{_dead_pid()}"
    stale.write_bytes(b"\0" * 1000)
    train(small_config(steps=20), run, **QUIET)
    assert not stale.exists()


# --------------------------------------------------------------------------- --resume FILE


def test_resume_accepts_the_checkpoint_file(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--steps", "40", "--lr-schedule", "constant", *SMALL, "--out", str(run)]) == 0
    assert main(["train", "--resume", str(run / CHECKPOINT_NAME), "--steps", "60", "-q"]) == 0
    assert f"run directory: {run} (resuming at step 40)" in capsys.readouterr().out
    assert load_checkpoint(run)["step"] == 60
    other = tmp_path / "copy.pt"
    other.write_bytes((run / CHECKPOINT_NAME).read_bytes())
    assert main(["train", "--resume", str(other), "--steps", "80", "-q"]) == 2
    err = capsys.readouterr().err
    assert "--resume takes a run directory" in err and str(other) in err and "Traceback" not in err
    assert not (tmp_path / "results.json").exists()
