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
    DirectFusedAdamW,
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
    with pytest.raises(FloatingPointError, match="diverged.*too high"):
        train(small_config(lr=1e30, lr_schedule="constant", steps=200), tmp_path / "run",
              progress=False, log=lambda s: None)


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


# --- DirectFusedAdamW: the training loop's opt.step() without torch.optim's Python -------------

def _model_and_adamw(seed=0, **kw):
    torch.manual_seed(seed)
    m = MLPLanguageModel(vocab_size=27, block_size=3, emb_dim=10, hidden=64, fused=True)
    return m, torch.optim.AdamW(m.parameters(), **{"lr": 1e-2, "weight_decay": 0.01, "fused": True, **kw})


def _adamw_batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 27, (32, 3), generator=g), torch.randint(0, 27, (32,), generator=g))
            for _ in range(n)]


def _same_adamw(m1, o1, m2, o2):
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(o1.state[p1][k], o2.state[p2][k]), k


def test_direct_fused_adamw_is_bitwise_opt_step():
    m1, o1 = _model_and_adamw()
    m2, o2 = _model_and_adamw()
    assert DirectFusedAdamW.applies(o2)
    step = DirectFusedAdamW(o2)
    for i, (x, y) in enumerate(_adamw_batches(12)):
        for o in (o1, o2):
            o.param_groups[0]["lr"] = 1e-2 * (1 - i / 20)  # the loop's schedule writes lr each step
        m1.forward_backward(x, y)
        o1.step()
        m2.forward_backward(x, y)
        step()
    _same_adamw(m1, o1, m2, o2)
    assert step._state is not None  # the direct path did run (first step: opt.step())

    # A state loaded from a checkpoint is bound on the first call and continues exactly.
    m3, o3 = _model_and_adamw(seed=5)
    m3.load_state_dict(m1.state_dict())
    o3.load_state_dict(copy.deepcopy(o1.state_dict()))  # (state_dict() shares o1's tensors)
    step3 = DirectFusedAdamW(o3)
    for x, y in _adamw_batches(4, seed=2):
        m1.forward_backward(x, y)
        o1.step()
        m3.forward_backward(x, y)
        step3()
    _same_adamw(m1, o1, m3, o3)


def test_direct_fused_adamw_keeps_opt_step_for_a_parameter_without_gradient():
    m1, o1 = _model_and_adamw()
    m2, o2 = _model_and_adamw()
    step = DirectFusedAdamW(o2)
    for x, y in _adamw_batches(3):
        for m in (m1, m2):
            m.forward_backward(x, y)
            m.head.bias.grad = None
        o1.step()
        step()
    assert step._state is None  # never bound: every step was opt.step()
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, fused=True),
    lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True, amsgrad=True),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True, maximize=True),
    lambda ps: torch.optim.AdamW(ps, lr=torch.tensor(1e-2), fused=True),
    lambda ps: torch.optim.AdamW([{"params": ps[:2]}, {"params": ps[2:]}], lr=1e-2, fused=True),
    lambda ps: torch.optim.AdamW([ps[0].detach().double().requires_grad_()] + ps[1:], lr=1e-2, fused=True),
], ids=["sgd", "adam", "adamw-unfused", "amsgrad", "maximize", "tensor-lr", "two-groups", "two-dtypes"])
def test_direct_fused_adamw_applies_only_where_it_is_exact(make):
    m = MLPLanguageModel(vocab_size=27, block_size=3, emb_dim=10, hidden=64, fused=True)
    assert not DirectFusedAdamW.applies(make(list(m.parameters())))


def test_direct_fused_adamw_does_not_apply_with_step_hooks():
    m, opt = _model_and_adamw()
    handle = opt.register_step_pre_hook(lambda *a: None)
    assert not DirectFusedAdamW.applies(opt)
    handle.remove()
    assert DirectFusedAdamW.applies(opt)

