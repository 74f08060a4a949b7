"""`charmlp train` under torchrun with 2 CPU processes (DDP over gloo).

The check is exact in kind, not just "it ran": the final parameters must equal an
in-process emulation in which each of the two ranks draws its own minibatches from its own
generator and the gradients are averaged (DDP's all-reduce) before every SGD step. Rank 0
alone must write the logs, and a resumed 2-process run must continue the same trajectory
(every rank's generator state is in the checkpoint).

Teardown: the CLI ends torchrun workers with os._exit after the barrier and
destroy_process_group, which avoids the process-group thread race at interpreter exit
("terminate called without an active exception") seen with gloo here.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from charmlp.checkpoint import load_checkpoint
from charmlp.data import Split, Vocab, build_examples
from charmlp.train import TrainConfig, batch_seed, learning_rate
from charmlp.train.state import _build_model

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

ARGS = ["--hidden", "32", "--init", "default", "--lr-schedule", "constant", "--lr", "0.1",
        "--checkpoint-every", "30", "--eval-every", "30", "--samples", "2", "-q"]


def _torchrun(*args, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "charmlp", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, f"torchrun failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    assert "terminate called" not in r.stderr, r.stderr
    return r


def _emulate(ckpt: dict, steps: int, ranks=(0, 1)) -> dict:
    """The run's optimizer (SGD, or fused AdamW) on the gradients of each rank's own
    minibatch averaged, in one process."""
    cfg = TrainConfig.from_dict(ckpt["train_config"]).resolved()
    vocab, split = Vocab.from_dict(ckpt["vocab"]), Split.from_dict(ckpt["split"])
    X, Y = build_examples(split.train, vocab, cfg.block_size)
    model = _build_model(cfg, vocab.size, torch.device("cpu"))
    params = list(model.parameters())
    adamw = cfg.optimizer == "adamw"
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True) if adamw else None
    gens = [torch.Generator().manual_seed(batch_seed(cfg.seed, r)) for r in ranks]
    for i in range(steps):
        grads = []
        for g in gens:
            ix = torch.randint(0, X.shape[0], (cfg.batch_size,), generator=g)
            _, loss = model(X[ix], Y[ix])
            grads.append(torch.autograd.grad(loss, params))
        mean = [sum(g[j] for g in grads) / len(grads) for j in range(len(params))]
        if adamw:
            opt.param_groups[0]["lr"] = learning_rate(cfg, i)
            for p, g in zip(params, mean):
                p.grad = g
            opt.step()
            continue
        with torch.no_grad():
            for p, g in zip(params, mean):
                p -= learning_rate(cfg, i) * g
    return {k: v.detach() for k, v in model.state_dict().items()}


def _close(a: dict, b: dict, atol=1e-5) -> bool:
    return all(torch.allclose(a[k], b[k], atol=atol, rtol=1e-4) for k in a)


def test_two_process_ddp_on_cpu(tmp_path):
    run = tmp_path / "run"
    r = _torchrun("--steps", "60", "--out", str(run), *ARGS)
    # Rank 0 alone talks and writes.
    assert r.stdout.count("final losses") == 1 and r.stdout.count("run directory:") == 1
    assert "2 DDP processes" in r.stdout and "per process" in r.stdout
    assert len((run / "metrics.csv").read_text().splitlines()) == 1 + 60
    assert len((run / "evals.csv").read_text().splitlines()) == 1 + 2
    ckpt = load_checkpoint(run)
    assert ckpt["step"] == 60 and ckpt["world_size"] == 2 and len(ckpt["rng"]["batch"]) == 2
    assert not torch.equal(ckpt["rng"]["batch"][0], ckpt["rng"]["batch"][1])

    got = ckpt["model"]["state_dict"]
    assert _close(got, _emulate(ckpt, 60))
    # Not what one process with rank 0's batches alone would give: both ranks contribute.
    assert not _close(got, _emulate(ckpt, 60, ranks=(0,)), atol=1e-3)

    # Resuming (and extending) under torchrun continues the same 2-rank trajectory.
    r2 = _torchrun("--resume", str(run), "--steps", "90", "-q")
    assert "resuming at step 60" in r2.stdout
    ckpt2 = load_checkpoint(run)
    assert ckpt2["step"] == 90
    assert _close(ckpt2["model"]["state_dict"], _emulate(ckpt2, 90))


def test_two_process_ddp_adamw_averages_gradients(tmp_path):
    """AdamW under DDP takes the autograd path (DDP's all-reduce), not the single-process
    chunked op, which would train each rank on its own batches alone."""
    run = tmp_path / "run"
    args = [a if a != "0.1" else "0.01" for a in ARGS]  # AdamW's scale of learning rate
    _torchrun("--optimizer", "adamw", "--steps", "60", "--out", str(run), *args)
    ckpt = load_checkpoint(run)
    got = ckpt["model"]["state_dict"]
    assert _close(got, _emulate(ckpt, 60))
    assert not _close(got, _emulate(ckpt, 60, ranks=(0,)), atol=1e-3)
