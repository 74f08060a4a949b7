"""``charmlp train --time-budget`` and ``--preset``: a budget run ends on time with its whole
schedule, is exactly the ``--steps N`` run it fixed (so checkpoints and resume stay exact),
bad values are one-line errors, and a preset's settings round-trip through the checkpoint."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

import charmlp.train.loop as loop_mod  # (the module that looks draw_batches up)
from charmlp.checkpoint import load_checkpoint
from charmlp.cli import main
from charmlp.train import (
    PRESETS,
    ConfigError,
    TrainConfig,
    budget_steps,
    preset_config,
    resume_config,
    train,
)

from _train_util import params_of, small_config

QUIET = dict(progress=False, log=lambda s: None)
#: The machine is shared and noisy: a budget run must end within this share of its budget.
TOLERANCE = 0.15


def _same_params(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _rows(run):
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_budget_steps_solves_for_the_steps_that_fit():
    assert budget_steps(10.0, 0.001) == 10_000
    assert budget_steps(0.0, 0.001) == 0 and budget_steps(-1.0, 0.001) == 0
    assert budget_steps(0.0005, 0.001) == 0
    # 1,000 steps of 1 ms, an evaluation of 0.5 s every 100 steps: 9 evaluations (at
    # 100..900; the final one is separate) and 9 checkpoints of 0.1 s.
    n = budget_steps(1.0 + 9 * 0.5 + 9 * 0.1, 0.001, 100, 0.5, 100, 0.1)
    assert n == 1000
    assert budget_steps(1.0 + 9 * 0.6 - 1e-9, 0.001, 100, 0.5, 100, 0.1) < 1000


@pytest.mark.parametrize("kw, budget", [
    (dict(lr_schedule="cosine", lr=0.1, lr_final=0.01), 4.0),                       # fused SGD chunks
    (dict(optimizer="adamw", lr_schedule="cosine", lr=3e-3, lr_final=1e-4), 3.0),    # the autograd loop
    (dict(reference=True, lr_schedule="step"), 3.0),                                 # plain PyTorch
], ids=["sgd-fused", "adamw", "reference"])
def test_a_budget_run_ends_on_time_with_its_whole_schedule(tmp_path, kw, budget):
    cfg = small_config(time_budget=budget, eval_every=5000, checkpoint_every=5000, **kw)
    # One retry: on a shared machine another process starting or stopping between the
    # speed measurement and the run changes the step rate it was fixed from.
    for attempt in range(2):
        run = tmp_path / f"run{attempt}"
        t0 = time.perf_counter()
        res = train(cfg, run, **QUIET)
        wall = time.perf_counter() - t0
        if abs(wall - budget) <= TOLERANCE * budget:
            break
    assert abs(wall - budget) <= TOLERANCE * budget, (wall, res["time_budget"])
    assert abs(res["wall_time_s"] - budget) <= TOLERANCE * budget
    info = res["time_budget"]
    assert info["budget_s"] == budget and info["steps"] == res["steps"] > 1000
    assert res["train_config"]["steps"] == res["steps"] and res["train_config"]["time_budget"] == budget
    rows = _rows(run)
    assert [int(r["step"]) for r in rows] == list(range(res["steps"]))  # every step, once
    resolved = cfg.resolved()
    assert float(rows[-1]["lr"]) == pytest.approx(resolved.lr_final, rel=1e-3)  # the schedule ran out
    assert float(rows[0]["lr"]) == pytest.approx(resolved.lr, rel=1e-3)
    ckpt = load_checkpoint(run)
    assert ckpt["step"] == res["steps"] and ckpt["train_config"]["steps"] == res["steps"]
    assert ckpt["budget"]["steps"] == res["steps"]
    assert json.loads((run / "config.json").read_text())["train_config"]["steps"] == res["steps"]


@pytest.mark.parametrize("kw", [dict(), dict(optimizer="adamw")], ids=["sgd-fused", "adamw"])
def test_a_budget_run_is_the_steps_run_it_fixed(tmp_path, kw):
    """The speed measurement trains a throwaway copy of the state: the run itself is
    bitwise the --steps N run (parameters, minibatches, learning rates)."""
    cfg = small_config(time_budget=1.5, checkpoint_every=0, **kw)
    res = train(cfg, tmp_path / "budget", **QUIET)
    n = res["steps"]
    train(small_config(steps=n, checkpoint_every=0, **kw), tmp_path / "steps", **QUIET)
    assert _same_params(params_of(tmp_path / "budget"), params_of(tmp_path / "steps"))
    assert (tmp_path / "budget" / "metrics.csv").read_text() == (tmp_path / "steps" / "metrics.csv").read_text()


def test_a_budget_run_resumes_exactly(tmp_path, monkeypatch):
    cfg = small_config(time_budget=2.0, checkpoint_every=1000, eval_every=1000, optimizer="adamw")
    real = loop_mod.draw_batches

    def draw(*args, **kw):  # (the speed measurement draws its own batches, not through here)
        if (tmp_path / "cut" / "checkpoint.pt").exists():  # the first chunk after a checkpoint
            raise RuntimeError("simulated crash")
        return real(*args, **kw)

    monkeypatch.setattr(loop_mod, "draw_batches", draw)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, tmp_path / "cut", **QUIET)
    monkeypatch.undo()
    ckpt = load_checkpoint(tmp_path / "cut")
    n = ckpt["train_config"]["steps"]
    assert ckpt["step"] == 1000 < n and ckpt["budget"]["steps"] == n
    log = []
    resumed = train(None, resume=tmp_path / "cut", progress=False, log=log.append)
    assert not any("time budget" in line for line in log)  # no new estimate: the same N steps
    assert resumed["steps"] == n and resumed["time_budget"]["steps"] == n
    whole = small_config(steps=n, checkpoint_every=1000, eval_every=1000, optimizer="adamw")
    train(whole, tmp_path / "whole", **QUIET)
    assert _same_params(params_of(tmp_path / "cut"), params_of(tmp_path / "whole"))
    for name in ("metrics.csv", "evals.csv"):
        assert (tmp_path / "cut" / name).read_text() == (tmp_path / "whole" / name).read_text(), name
    with pytest.raises(ConfigError, match="--time_budget 9|--time-budget 9"):
        train(None, resume=tmp_path / "cut", overrides={"time_budget": 9.0}, **QUIET)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf, "5", True])
def test_bad_budgets_are_config_errors(bad):
    with pytest.raises(ConfigError, match="time-budget must be a number of seconds > 0"):
        TrainConfig(time_budget=bad).resolved()


def test_a_budget_too_short_to_train_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="leaves no time to train"):
        train(small_config(time_budget=0.05), tmp_path / "run", **QUIET)


@pytest.mark.parametrize("value", ["0", "-3", "nan", "inf", "soon"])
def test_bad_budgets_through_the_cli_exit_2(value, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--time-budget", value])
    assert exc.value.code == 2
    assert "--time-budget" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--time-budget", "5", "--steps", "100"], "give --time-budget or --steps, not both"),
    (["--preset", "best-5min", "--time-budget", "5", "--steps", "100"], "not both"),
    (["--time-budget", "0.05", "--hidden", "16"], "leaves no time to train"),
])
def test_contradictory_or_short_budgets_are_one_line_errors(args, message, tmp_path, capsys):
    assert main(["train", *args, "--threads", "1", "-q", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_budget_through_the_cli(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--time-budget", "2", "--hidden", "32", "--init", "default", "--threads", "1",
                 "--samples", "2", "-q", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "time budget 2 s:" in out and "(time budget 2 s)" in out and "final losses" in out
    n = json.loads((run / "results.json").read_text())["steps"]
    assert f"{n:,} steps, the step schedule laid over them" in out


# --------------------------------------------------------------------------- presets


def test_the_lecture_preset_is_the_default_model():
    assert preset_config("lecture").resolved() == TrainConfig(preset="lecture").resolved()
    assert PRESETS["lecture"] == {}


def test_preset_config_rules():
    cfg = preset_config("best-5min", hidden=64)
    for k, v in PRESETS["best-5min"].items():
        assert getattr(cfg, k) == (64 if k == "hidden" else v)
    assert cfg.preset == "best-5min" and cfg.time_budget == PRESETS["best-5min"]["time_budget"]
    assert preset_config("best-5min", steps=10).time_budget is None  # --steps replaces the budget
    with pytest.raises(ConfigError, match="not both"):
        preset_config("best-5min", steps=10, time_budget=5.0)
    with pytest.raises(ConfigError, match="unknown preset"):
        preset_config("fastest")
    with pytest.raises(ConfigError, match="preset must be one of"):
        TrainConfig(preset="fastest").resolved()


def test_the_preset_round_trips_through_the_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--preset", "best-5min", "--steps", "40", "--threads", "1", "--samples", "0",
                 "--eval-every", "0", "--checkpoint-every", "0", "-q", "--out", str(run)]) == 0
    want = preset_config("best-5min", steps=40, threads=1, num_samples=0, eval_every=0,
                         checkpoint_every=0).resolved()
    ckpt = load_checkpoint(run)
    saved = TrainConfig.from_dict(ckpt["train_config"])
    assert saved == want and saved.preset == "best-5min"
    assert json.loads((run / "config.json").read_text())["train_config"] == want.to_dict()
    model = ckpt["model"]["config"]
    assert (model["block_size"], model["emb_dim"], model["hidden"]) == (
        want.block_size, want.emb_dim, want.hidden)
    assert resume_config(ckpt["train_config"], {"steps": 80}).hidden == want.hidden
    assert main(["train", "--resume", str(run), "--steps", "80", "-q"]) == 0
    assert TrainConfig.from_dict(load_checkpoint(run)["train_config"]) == dataclasses.replace(want, steps=80)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["train", "--resume", str(run), "--preset", "lecture"])
    assert exc.value.code == 2 and "drop --preset" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--preset", "fastest"])


# --------------------------------------------------------------------------- torchrun


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="torch.distributed with gloo is not available")
def test_a_budget_under_torchrun_agrees_on_the_steps(tmp_path):
    # One retry, as for the single-process runs: two ranks on a shared 2-core machine, and
    # another process starting or stopping between the speed measurement and the run changes
    # the step rate the count was fixed from (CI once saw a run end at 2.1 s of 3).
    for attempt in range(2):
        run = tmp_path / f"run{attempt}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "charmlp", "train", "--time-budget", "3", "--hidden", "32", "--init", "default",
               "--optimizer", "adamw", "--samples", "2", "-q", "--out", str(run)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.count("time budget 3 s:") == 1
        res = json.loads((run / "results.json").read_text())
        ckpt = load_checkpoint(run)
        assert res["steps"] == ckpt["step"] == ckpt["train_config"]["steps"] == res["time_budget"]["steps"]
        assert ckpt["world_size"] == 2
        if abs(res["wall_time_s"] - 3.0) <= 3.0 * 0.25:  # (two processes on a shared machine)
            break
    assert abs(res["wall_time_s"] - 3.0) <= 3.0 * 0.25, res["time_budget"]
