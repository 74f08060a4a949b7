"""Checkpoints: exact resume, atomic writes, and clear errors for bad files."""

from __future__ import annotations

import errno
import os
import signal
import zipfile

import pytest
import torch

import charmlp.checkpoint as ckpt_mod
import charmlp.train.loop as loop_mod  # (the module that looks the patched names up)
from charmlp.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    atomic_write,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from charmlp.train import ConfigError, TrainingInterrupted, train

from _train_util import params_of, small_config

QUIET = dict(progress=False, log=lambda s: None)


def _same_params(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _fail_on_call(monkeypatch, n: int, action):
    """Make the n-th minibatch draw run ``action`` (crash or signal) before drawing."""
    real = loop_mod.draw_batches
    calls = {"n": 0}

    def draw(*args, **kw):
        calls["n"] += 1
        if calls["n"] == n:
            action()
        return real(*args, **kw)

    monkeypatch.setattr(loop_mod, "draw_batches", draw)


@pytest.mark.parametrize("kw", [dict(), dict(optimizer="adamw"), dict(reference=True)],
                         ids=["sgd-fused", "adamw", "sgd-reference"])
def test_resume_after_crash_is_bitwise_exact(tmp_path, monkeypatch, kw):
    cfg = small_config(steps=400, checkpoint_every=100, eval_every=100, **kw)
    full = train(cfg, tmp_path / "full", **QUIET)

    def crash():
        raise RuntimeError("simulated crash")

    # Chunks never cross a checkpoint/eval boundary and the first two end at 64 and 100,
    # so the 4th draw starts after the checkpoint at step 100 was written.
    _fail_on_call(monkeypatch, 4, crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, tmp_path / "cut", **QUIET)
    monkeypatch.undo()
    cut_at = load_checkpoint(tmp_path / "cut")["step"]
    assert 100 <= cut_at < 400
    with open(tmp_path / "cut" / "metrics.csv", "a") as f:
        f.write("31")  # a crash mid-write can leave a partial line
    resumed = train(None, resume=tmp_path / "cut", **QUIET)

    assert _same_params(params_of(tmp_path / "full"), params_of(tmp_path / "cut"))
    assert resumed["losses"] == full["losses"]
    # The logs of the resumed run are the uninterrupted run's, row for row.
    for name in ("metrics.csv", "evals.csv", "samples.txt"):
        assert (tmp_path / "cut" / name).read_text() == (tmp_path / "full" / name).read_text(), name


def _signal_on_lr_call(monkeypatch, n: int) -> None:
    """SIGINT during the n-th learning-rate lookup: in the step-by-step loop (SGD with weight
    decay) that is in the middle of a chunk, so the loop stops after that step and rewinds
    the minibatch generator to the steps actually taken."""
    real = loop_mod.learning_rate
    calls = {"n": 0}

    def learning_rate(*args, **kw):
        calls["n"] += 1
        if calls["n"] == n:
            signal.raise_signal(signal.SIGINT)
        return real(*args, **kw)

    monkeypatch.setattr(loop_mod, "learning_rate", learning_rate)


@pytest.mark.parametrize("kw,interrupt,stop_step", [
    (dict(optimizer="adamw"), lambda mp: _fail_on_call(mp, 2, lambda: signal.raise_signal(signal.SIGINT)), 64),
    # lookups: 1 before the loop, then one per step; the 80th is step 78's (chunks: 64, ...)
    (dict(optimizer="sgd", weight_decay=0.01), lambda mp: _signal_on_lr_call(mp, 80), 79),
], ids=["adamw-between-chunks", "sgd-decay-mid-chunk"])
def test_ctrl_c_checkpoints_then_resume_is_exact(tmp_path, monkeypatch, kw, interrupt, stop_step):
    cfg = small_config(steps=300, checkpoint_every=0, **kw)
    train(cfg, tmp_path / "full", **QUIET)
    interrupt(monkeypatch)
    with pytest.raises(TrainingInterrupted, match="--resume") as exc:
        train(cfg, tmp_path / "cut", **QUIET)
    monkeypatch.undo()
    assert exc.value.step == stop_step
    assert load_checkpoint(tmp_path / "cut")["step"] == exc.value.step
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    train(None, resume=tmp_path / "cut", **QUIET)
    assert _same_params(params_of(tmp_path / "full"), params_of(tmp_path / "cut"))
    assert (tmp_path / "cut" / "metrics.csv").read_text() == (tmp_path / "full" / "metrics.csv").read_text()


def test_resume_can_extend_a_finished_run(tmp_path):
    train(small_config(steps=200, lr_schedule="constant"), tmp_path / "a", **QUIET)
    train(small_config(steps=400, lr_schedule="constant"), tmp_path / "b", **QUIET)
    res = train(None, resume=tmp_path / "a", overrides={"steps": 400}, **QUIET)
    assert res["steps"] == 400
    assert _same_params(params_of(tmp_path / "a"), params_of(tmp_path / "b"))


def test_resume_rejects_changed_settings_and_missing_runs(tmp_path):
    train(small_config(steps=100), tmp_path / "run", **QUIET)
    with pytest.raises(ConfigError, match="--hidden 32 differs"):
        train(None, resume=tmp_path / "run", overrides={"hidden": 32}, **QUIET)
    with pytest.raises(ConfigError, match="already at step 100"):
        train(None, resume=tmp_path / "run", overrides={"steps": 50}, **QUIET)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(None, resume=tmp_path / "elsewhere", **QUIET)


def test_resume_needs_the_same_number_of_processes(tmp_path):
    train(small_config(steps=100), tmp_path / "run", **QUIET)
    path = tmp_path / "run" / CHECKPOINT_NAME
    state = load_checkpoint(path)
    state["world_size"] = 2
    state["rng"]["batch"] = state["rng"]["batch"] * 2
    save_checkpoint(path, state)
    with pytest.raises(CheckpointError, match="2 process"):
        train(None, resume=tmp_path / "run", overrides={"steps": 200}, **QUIET)


# --------------------------------------------------------------------------- bad files


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("good") / "run"
    train(small_config(steps=100), run, **QUIET)
    return run


def _copy(good_run, tmp_path) -> bytes:
    return (good_run / CHECKPOINT_NAME).read_bytes()


def test_good_checkpoint_loads(good_run):
    ckpt = load_checkpoint(good_run)
    assert ckpt["step"] == 100 and ckpt["world_size"] == 1
    model = model_from_checkpoint(ckpt)
    assert model.hidden == 64 and model.fused is True
    assert model_from_checkpoint(ckpt, fused=False).fused is False


def test_flipped_bytes_are_detected(good_run, tmp_path):
    raw = bytearray(_copy(good_run, tmp_path))
    with zipfile.ZipFile(good_run / CHECKPOINT_NAME) as z:
        names = [n for n in z.namelist() if "/data/" in n]
        payloads = [z.read(n) for n in names]
    for payload in payloads:  # flip one bit inside each tensor record
        pos = raw.find(payload) + len(payload) // 2
        bad = bytearray(raw)
        bad[pos] ^= 0x10
        path = tmp_path / "flipped.pt"
        path.write_bytes(bytes(bad))
        with pytest.raises(CheckpointError, match="corrupt checkpoint \\(checksum mismatch"):
            load_checkpoint(path)


@pytest.mark.parametrize("keep", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_truncated_checkpoint(good_run, tmp_path, keep):
    raw = _copy(good_run, tmp_path)
    path = tmp_path / "cut.pt"
    path.write_bytes(raw[: int(len(raw) * keep)])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="not a charmlp training checkpoint"):
        load_checkpoint(path)
    path.write_text("hello")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)


def test_incompatible_checkpoints(good_run, tmp_path):
    state = load_checkpoint(good_run)
    path = tmp_path / "x.pt"
    torch.save({**state, "version": 99}, path)
    with pytest.raises(CheckpointError, match="incompatible checkpoint version 99"):
        load_checkpoint(path)
    broken = dict(state)
    del broken["vocab"]
    torch.save(broken, path)
    with pytest.raises(CheckpointError, match="missing 'vocab'"):
        load_checkpoint(path)
    wrong = {**state, "model": {"config": {**state["model"]["config"], "hidden": 65},
                                "state_dict": state["model"]["state_dict"]}}
    torch.save(wrong, path)
    with pytest.raises(CheckpointError, match="does not load"):
        model_from_checkpoint(load_checkpoint(path))
    # ... and resuming from it is the same clear error, not a traceback from load_state_dict.
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(run / CHECKPOINT_NAME, {**state, "train_config": {**state["train_config"], "hidden": 65}})
    with pytest.raises(CheckpointError, match="incompatible checkpoint"):
        train(None, resume=run, overrides={"steps": 200}, **QUIET)


# --------------------------------------------------------------------------- atomic writes


def test_failed_write_keeps_the_previous_checkpoint(good_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    path = run / CHECKPOINT_NAME
    before = _copy(good_run, tmp_path)
    path.write_bytes(before)
    state = load_checkpoint(path)

    def disk_full(obj, f, *a, **kw):  # half the bytes reach the file, then the disk is full
        f.write(before[: len(before) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(path, {**state, "step": 999})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path)["step"] == 100
    assert sorted(os.listdir(run)) == [CHECKPOINT_NAME]  # no temporary file left behind


def test_silently_bad_write_is_caught_before_the_rename(good_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    path = run / CHECKPOINT_NAME
    before = _copy(good_run, tmp_path)
    path.write_bytes(before)
    state = load_checkpoint(path)
    real_save = torch.save

    def garbled(obj, f, *a, **kw):  # the write "succeeds" but a byte is wrong on disk
        import io

        buf = io.BytesIO()
        real_save(obj, buf)
        data = bytearray(buf.getvalue())
        with zipfile.ZipFile(io.BytesIO(bytes(data))) as z:
            payload = z.read(next(n for n in z.namelist() if "/data/" in n))
        data[bytes(data).find(payload) + 1] ^= 0xFF
        f.write(bytes(data))

    monkeypatch.setattr(ckpt_mod.torch, "save", garbled)
    with pytest.raises(CheckpointError, match="checksum"):
        save_checkpoint(path, {**state, "step": 999})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(os.listdir(run)) == [CHECKPOINT_NAME]


def test_atomic_write_cleans_up_on_interrupt(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def interrupted(f):
        f.write(b"new but incomplete")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, interrupted)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]
    atomic_write(path, lambda f: f.write(b"new"))
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["f.txt"]


def test_a_dead_writers_temp_file_is_removed_on_the_next_write(good_run, tmp_path):
    """A SIGKILL in the middle of a checkpoint write leaves .checkpoint.pt.tmp-PID (as large
    as the checkpoint) behind: the next write of that file removes it, unless its writer
    may still be alive."""
    import subprocess
    import sys

    run = tmp_path / "run"
    run.mkdir()
    path = run / CHECKPOINT_NAME
    path.write_bytes(_copy(good_run, tmp_path))
    state = load_checkpoint(path)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        stale = run / f".{CHECKPOINT_NAME}.tmp-{gone.pid}"
        busy = run / f".{CHECKPOINT_NAME}.tmp-{live.pid}"
        other = run / f".config.json.tmp-{gone.pid}"  # another file's: its own next write
        for p in (stale, busy, other):
            p.write_bytes(b"\0" * 100_000)
        save_checkpoint(path, {**state, "step": 101})
        assert not stale.exists() and busy.exists() and other.exists()
        assert load_checkpoint(path)["step"] == 101
    finally:
        live.kill()
        live.wait()


def test_json_files_are_strict_json(tmp_path):
    import json
    import math

    from charmlp.checkpoint import atomic_write_json

    atomic_write_json(tmp_path / "r.json", {"loss": math.inf, "x": [math.nan, 1.5], "n": None})
    text = (tmp_path / "r.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    data = json.loads(text)
    assert data == {"loss": "inf", "x": ["nan", 1.5], "n": None}
    assert float(data["loss"]) == math.inf
