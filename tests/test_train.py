"""charmlp.train: schedules, batches, evaluation, and short end-to-end training runs."""

from __future__ import annotations

import copy
import csv
import io
import json
import math

import pytest
import torch
import torch.nn.functional as F

from charmlp.model import NOTEBOOK_SEED, MLPLanguageModel
from charmlp.train import (
    ConfigError,
    Progress,
    TrainConfig,
    batch_seed,
    draw_batches,
    evaluate,
    learning_rate,
    loss_report,
    lr_find,
    resume_config,
    train,
)

from _train_util import params_of, small_config, write_words

LN27 = math.log(27)


def test_short_default_run_learns(tmp_path):
    """The lecture's model (all defaults but the step count) on the embedded corpus."""
    log = []
    res = train(TrainConfig(steps=3000, eval_every=1000, checkpoint_every=0, threads=2),
                tmp_path / "run", progress=False, log=log.append)
    losses = res["losses"]
    assert losses["train"]["loss"] < LN27 - 0.5          # 3.30 -> below 2.8
    assert losses["dev"]["loss"] < LN27 - 0.2
    assert res["steps"] == 3000 and res["fused"] is True and res["parameters"] == 11_897
    for split in ("train", "dev", "test"):
        r = losses[split]
        assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
        assert r["bits_per_char"] == pytest.approx(r["loss"] / math.log(2))
    assert res["train_time_s"] > 0 and res["steps_per_s"] > 0 and res["wall_time_s"] >= res["train_time_s"]
    text = "\n".join(log)
    assert "names package" in text and "5,163 words" in text
    assert "final losses" in text and "samples" in text
    run = tmp_path / "run"
    assert json.loads((run / "results.json").read_text())["losses"] == losses
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(3000))
    assert {float(r["lr"]) for r in rows[:1500]} == {0.1} and {float(r["lr"]) for r in rows[1500:]} == {0.01}
    with open(run / "evals.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1000, 2000, 3000]
    assert len((run / "samples.txt").read_text().splitlines()) == 10
    split = json.loads((run / "split.json").read_text())
    assert split["method"] == "lecture" and len(split["train"]) == 4130


def test_runs_are_reproducible(tmp_path):
    a = train(small_config(), tmp_path / "a", progress=False, log=lambda s: None)
    b = train(small_config(), tmp_path / "b", progress=False, log=lambda s: None)
    assert a["losses"] == b["losses"]
    pa, pb = params_of(tmp_path / "a"), params_of(tmp_path / "b")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    c = train(small_config(seed=1), tmp_path / "c", progress=False, log=lambda s: None)
    assert c["losses"]["train"]["loss"] != a["losses"]["train"]["loss"]


def test_fused_and_reference_give_the_same_numbers(tmp_path):
    a = train(small_config(steps=200), tmp_path / "fused", progress=False, log=lambda s: None)
    b = train(small_config(steps=200, reference=True), tmp_path / "ref", progress=False, log=lambda s: None)
    assert b["fused"] is False
    for split in ("train", "dev", "test"):
        assert a["losses"][split]["loss"] == pytest.approx(b["losses"][split]["loss"], abs=1e-3)
    pa, pb = params_of(tmp_path / "fused"), params_of(tmp_path / "ref")
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("kw", [dict(optimizer="adamw"), dict(optimizer="sgd", weight_decay=1e-4),
                                dict(lr_schedule="cosine"), dict(lr_schedule="constant", batch_size=64)])
def test_other_optimizers_and_schedules_learn(tmp_path, kw):
    res = train(small_config(**{"steps": 400, **kw}), tmp_path / "run", progress=False, log=lambda s: None)
    assert res["losses"]["train"]["loss"] < LN27 - 0.3


def test_custom_word_list_and_count_split(tmp_path):
    words = [f"{a}{b}{c}" for a in "abcde" for b in "aeiou" for c in "xyz"]
    data = write_words(tmp_path / "w.txt", words)
    res = train(small_config(data=str(data), test_count=10, dev_count=5, steps=200),
                tmp_path / "run", progress=False, log=lambda s: None)
    assert res["losses"]["test"]["examples"] == 40 and res["losses"]["dev"]["examples"] == 20
    assert res["corpus"]["path"] == str(data)


def test_divergence_is_reported(tmp_path):
    with pytest.raises(FloatingPointError, match="diverged at step .*too high.*lower --lr"):
        train(small_config(lr=1e30, lr_schedule="constant", steps=200), tmp_path / "run",
              progress=False, log=lambda s: None)


def test_a_finite_but_overflowing_loss_is_divergence(tmp_path):
    """At --lr 1000 the losses stay finite (thousands of nats): their perplexity is not."""
    from charmlp.checkpoint import load_checkpoint
    from charmlp.train import TrainingDiverged

    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as exc:
        train(small_config(lr=1000.0, steps=200), run, progress=False, log=lambda s: None)
    e = exc.value
    assert math.isfinite(e.loss) and e.loss > 709 and e.step < 64 and e.run_dir == run
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert float(rows[e.step]["loss"]) == pytest.approx(e.loss, rel=1e-5)
    assert all(float(r["loss"]) <= 709.78 for r in rows[:e.step])  # the first such step
    results = json.loads((run / "results.json").read_text())
    assert results["diverged"]["step"] == e.step and results["samples"] == []
    assert results["losses"]["train"]["perplexity"] == "inf"  # (strict JSON)
    assert load_checkpoint(run)["step"] == len(rows)


def test_loss_report_of_a_diverged_loss():
    assert loss_report(800.0, 5)["perplexity"] == math.inf  # math.exp(800) raises OverflowError
    assert loss_report(math.inf, 5)["perplexity"] == math.inf
    assert math.isnan(loss_report(math.nan, 5)["perplexity"])
    assert loss_report(2.0, 5)["perplexity"] == math.exp(2.0)


def test_seeds_must_be_below_2_63():
    TrainConfig(seed=2**63 - 1).resolved()
    with pytest.raises(ConfigError, match="seed must be < 2"):
        TrainConfig(seed=2**63).resolved()


def test_the_process_group_gets_a_bounded_timeout(monkeypatch):
    """A dead or stopped peer must not hold the others for gloo's default 30 minutes."""
    import datetime

    import charmlp.train.distributed as dist_mod

    calls = []
    monkeypatch.setattr(dist_mod.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist_mod.dist, "init_process_group", lambda *a, **kw: calls.append((a, kw)))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv(dist_mod.DIST_TIMEOUT_ENV, raising=False)
    d = dist_mod._setup_distributed("cpu")
    assert (d.rank, d.world_size, d.owns_group) == (1, 2, True)
    assert calls == [(("gloo",), {"timeout": datetime.timedelta(seconds=60)})]
    monkeypatch.setenv(dist_mod.DIST_TIMEOUT_ENV, "7.5")
    dist_mod._setup_distributed("cpu")
    assert calls[-1][1]["timeout"] == datetime.timedelta(seconds=7.5)
    for bad in ("0", "-1", "soon", "inf"):
        monkeypatch.setenv(dist_mod.DIST_TIMEOUT_ENV, bad)
        with pytest.raises(ConfigError, match="CHARMLP_DIST_TIMEOUT"):
            dist_mod._setup_distributed("cpu")


def test_under_ddp_a_repeated_signal_does_not_abort_the_checkpoint():
    """torchrun forwards a terminal's Ctrl-C to workers the terminal signalled already: the
    second SIGINT must not turn into KeyboardInterrupt before the agreed stop."""
    import signal

    from charmlp.train.signals import _StopRequest

    notes = []
    with _StopRequest(enabled=True, notify=notes.append, distributed=True) as stop:
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGTERM)
        assert stop.requested and len(notes) == 1
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt):  # single process: the second Ctrl-C aborts at once
        with _StopRequest(enabled=True, notify=notes.append) as stop:
            signal.raise_signal(signal.SIGINT)
            assert stop.requested
            signal.raise_signal(signal.SIGINT)


def test_existing_run_directory_is_not_overwritten(tmp_path):
    train(small_config(steps=50), tmp_path / "run", progress=False, log=lambda s: None)
    with pytest.raises(ConfigError, match="already holds a run.*--resume"):
        train(small_config(steps=50), tmp_path / "run", progress=False, log=lambda s: None)


# --------------------------------------------------------------------------- pieces


def test_learning_rate_schedules():
    step = TrainConfig(steps=200_000).resolved()
    assert learning_rate(step, 0) == 0.1 and learning_rate(step, 99_999) == 0.1
    assert learning_rate(step, 100_000) == 0.01 and learning_rate(step, 199_999) == 0.01
    cos = TrainConfig(steps=100, lr_schedule="cosine", lr=1.0, lr_final=0.1).resolved()
    assert learning_rate(cos, 0) == pytest.approx(1.0)
    assert learning_rate(cos, 50) == pytest.approx(0.55)
    assert learning_rate(cos, 99) == pytest.approx(0.1, abs=1e-3)
    const = TrainConfig(lr_schedule="constant", lr=0.05).resolved()
    assert learning_rate(const, 0) == learning_rate(const, 10**6) == 0.05
    adamw = TrainConfig(optimizer="adamw").resolved()
    assert (adamw.lr, adamw.lr_final, adamw.weight_decay) == (0.01, 0.001, 0.01)


def test_chunked_batch_draws_equal_per_step_draws():
    """draw_batches relies on this torch property for exact resume; guard it."""
    for n in (5, 182_625, 2**33):
        g1 = torch.Generator().manual_seed(3)
        g2 = torch.Generator().manual_seed(3)
        chunked = torch.cat([draw_batches(g1, n, k, 32) for k in (1, 7, 100)])
        single = torch.stack([torch.randint(0, n, (32,), generator=g2) for _ in range(108)])
        assert torch.equal(chunked, single)
        assert torch.equal(g1.get_state(), g2.get_state())


def test_batch_seeds_differ_by_rank_and_seed():
    seeds = {batch_seed(s, r) for s in (0, 1, NOTEBOOK_SEED) for r in range(4)}
    assert len(seeds) == 12
    assert batch_seed(5, 1) == batch_seed(5, 1)
    assert all(0 <= s < 2**63 for s in seeds)


def test_evaluate_matches_full_batch_cross_entropy():
    torch.manual_seed(0)
    m = MLPLanguageModel(vocab_size=27, block_size=3, emb_dim=10, hidden=50)
    X, Y = torch.randint(0, 27, (1000, 3)), torch.randint(0, 27, (1000,))
    m.fused = False
    with torch.no_grad():
        ref = F.cross_entropy(m(X)[0].double(), Y).item()
    m.fused = True
    assert evaluate(m, X, Y, batch_size=64) == pytest.approx(ref, abs=1e-5)
    assert evaluate(m, X[:0], Y[:0]) is None
    assert loss_report(None, 0)["loss"] is None


@pytest.mark.parametrize("kw, msg", [
    (dict(steps=0), "steps"), (dict(hidden=-1), "hidden"), (dict(optimizer="sgdm"), "optimizer"),
    (dict(lr_schedule="linear"), "lr-schedule"), (dict(lr=-1.0), "lr"), (dict(device="tpu"), "device"),
    (dict(init="xavier"), "init"), (dict(dev_count=3), "dev-count"), (dict(threads=0), "threads"),
    (dict(weight_decay=-1.0), "weight-decay"),
])
def test_bad_settings_are_config_errors(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        TrainConfig(**kw).resolved()


def test_cuda_without_cuda_is_a_config_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="CUDA"):
        train(small_config(device="cuda"), tmp_path / "run", progress=False, log=lambda s: None)


def test_resume_config_rules():
    saved = TrainConfig(steps=100).to_dict()
    cfg = resume_config(saved, {"steps": 200, "threads": 1, "block_size": 3})
    assert cfg.steps == 200 and cfg.threads == 1
    with pytest.raises(ConfigError, match="--block-size 4 differs"):
        resume_config(saved, {"block_size": 4})
    with pytest.raises(ConfigError, match="unknown training settings"):
        resume_config({**saved, "momentum": 0.9}, {})


def test_progress_line_without_a_terminal():
    out = io.StringIO()
    bar = Progress(total=100, start=0, stream=out)
    for step in range(10, 101, 10):
        bar.update(step, [2.5] * 10, 0.1, train_time=step / 1000)
    lines = out.getvalue().splitlines()
    assert len(lines) == 10
    assert "step  10/100" in lines[0] and "loss 2.5000" in lines[0]
    assert "1,000 steps/s" in lines[0] and "ETA 0:00:00" in lines[-1]


def test_lr_find_suggests_a_rate():
    sweep = lr_find(TrainConfig(hidden=50, threads=1), num=200, log=lambda s: None)
    assert len(sweep["losses"]) == len(sweep["lre"]) == 200
    assert sweep["lre"][0] == pytest.approx(-3) and sweep["lre"][-1] == pytest.approx(0)
    assert 1e-3 <= sweep["suggested_lr"] <= sweep["best_lr"] <= 1.0
