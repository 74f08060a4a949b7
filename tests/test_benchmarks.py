"""Smoke tests of the benchmark suite (benchmarks/): the harness runs on a tiny size, the
correctness gate rejects wrong arms before they are timed, and the report files are written.
No timings are asserted."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import charmlp

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
import harness as H  # noqa: E402

CPU = torch.device("cpu")
TINY = H.SIZES["tiny-64"]


class WrongLossArm(H.FunctionalArm):
    """Scales the loss (and so every gradient) by 1.01."""

    name = "wrong-loss"
    label = "wrong loss"

    def forward(self, idx, y):
        return super().forward(idx, y) * 1.01


class WrongStepArm(H.SeedArm):
    """Correct loss and gradients, but the step uses twice the learning rate."""

    name = "wrong-step"
    label = "wrong step"

    def setup(self, params, size, idx, y, lr):
        super().setup(params, size, idx, y, lr)
        self.lr = 2 * lr

    def forward(self, idx, y):  # forward must still match
        return H.SeedArm.forward(self, idx, y)


class ForgetsBiasArm(H.FunctionalArm):
    """Leaves b2 out of the update."""

    name = "forgets-bias"
    label = "forgets bias"

    def setup(self, params, size, idx, y, lr):
        super().setup(params, size, idx, y, lr)
        m = self.model
        self.opt = torch.optim.SGD([m.table, m.weight1, m.bias1, m.weight2], lr=lr)


class CrashArm(H.Arm):
    name = "crash"
    label = "crash"

    def setup(self, params, size, idx, y, lr):
        raise RuntimeError("boom")


def _quick_cfg(**kw):
    return H.Config.quick_config(CPU, torch.get_num_threads(), data="random", **kw)


def test_gate_catches_wrong_arms_and_times_the_rest(tmp_path):
    arms = [H.SeedArm, H.FunctionalArm, H.CharmlpArm, WrongLossArm, WrongStepArm, ForgetsBiasArm, CrashArm]
    res = H.bench_size(TINY, arms, _quick_cfg(), log=lambda s: None)
    by = {a["name"]: a for a in res["arms"]}
    for name in ("seed", "functional", "charmlp"):
        a = by[name]
        assert a["status"] == "PASS", a
        assert set(a["times"]) == set(H.MEASUREMENTS)
        assert all(t["n"] >= 1 and t["median_s"] > 0 for t in a["times"].values())
        assert a["peak_memory_bytes"] is not None and a["peak_memory_bytes"] >= 0
        assert H.gate_passes(a["gate"])[0]
    c = res["contention"]
    assert c["kept_rounds"] + c["dropped_rounds"] >= 2 and 0 <= c["others_cpu_share"]
    assert by["wrong-loss"]["status"] == "FAILED" and "loss" in by["wrong-loss"]["reason"]
    assert by["wrong-step"]["status"] == "FAILED"
    assert "step." in by["wrong-step"]["reason"] and "grad." not in by["wrong-step"]["reason"]
    assert by["forgets-bias"]["status"] == "FAILED" and "step.b2" in by["forgets-bias"]["reason"]
    assert by["crash"]["status"] == "ERROR" and "boom" in by["crash"]["reason"]
    for name in ("wrong-loss", "wrong-step", "forgets-bias", "crash"):
        assert by[name]["times"] == {} and by[name]["peak_memory_bytes"] is None

    # the report marks them and is written completely
    full = {"environment": H.environment(CPU, torch.get_num_threads()), "config": {"lr": H.LR},
            "arms": [a["name"] for a in res["arms"]], "reference_arm": "seed", "gate_rtol": H.GATE_RTOL,
            "sgemm_start": {"n": 64, "gflops": 1.0}, "sgemm_end": {"n": 64, "gflops": 1.0},
            "sgemm_peak_gflops": 1.0, "sizes": [res], "elapsed_s": 1.0}
    files = H.write_report(full, tmp_path)
    md = (tmp_path / "results.md").read_text()
    assert "FAILED" in md and "ERROR" in md and "Training step" in md
    assert json.loads((tmp_path / "results.json").read_text())["sizes"][0]["B"] == 64
    for f in files.values():
        assert f.is_file() and f.stat().st_size > 0
    assert {"time_vs_batch.png", "speedup.png"} <= {p.name for p in files.values()}


def test_gate_errors_are_small_for_the_reference_itself():
    idx, y, _ = H.make_batch(TINY, "random", CPU)
    params = H.make_params(TINY, CPU)
    ref = H.reference(params, idx, y, H.LR)
    errs = H.gate_errors(ref["loss"].float(), {k: g.float() for k, g in ref["grads"].items()},
                         {k: v.float() for k, v in ref["updated"].items()}, ref["loss"].float(), ref,
                         start=params, lr=H.LR)
    ok, why = H.gate_passes(errs)
    assert ok, why
    errs["grad.W1"] = math.inf
    assert not H.gate_passes(errs)[0]


def test_rss_probe_runs_in_a_fresh_process():
    cfg = _quick_cfg()
    out = H.rss_memory(["seed", "charmlp"], TINY, cfg, log=lambda s: None)
    for name in ("seed", "charmlp"):
        assert "error" not in out[name], out[name]
        assert out[name]["peak_bytes"] >= 0 and out[name]["B"] == TINY.B


def test_block_and_timed_rounds():
    # a Block runs its setup once, untimed, then the statement `number` times
    calls = []
    block = H.Block("calls.append(1)", "calls.clear()", {"calls": calls})
    assert block(5) > 0 and calls == [1] * 5
    # every round runs each group's jobs once, the order rotating by the round number
    order = []

    def job(name):
        return lambda: order.append(name) or 1e-6

    r = H.timed_rounds([[("a", job("a")), ("b", job("b")), ("c", job("c"))]], 3, warmup=1)
    assert r.ran == r.kept + r.dropped + 1 and r.kept <= 3 and r.ran <= 1 + 9
    assert order[:9] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert all(len(r.samples[k]) == r.kept and len(r.spare[k]) == r.dropped for k in "abc")
    assert all(len(s) == 3 for s in r.with_spare(3).values())


def test_parse_size():
    assert H.parse_size("lecture-32").B == 32
    s = H.parse_size("3:10:200:27:0")
    assert (s.T, s.E, s.H, s.V, s.B) == (3, 10, 200, 27, 0)
    with pytest.raises(Exception):
        H.parse_size("nonsense")


def test_run_all_quick_writes_the_report(tmp_path):
    out = tmp_path / "cpu"
    caps = [f"charmlp@{c}" for c in charmlp.build_info()["cpu_capabilities_supported"]]
    cmd = [sys.executable, str(BENCH / "run_all.py"), "--quick", "--sizes", "tiny-64", "--arms",
           ",".join(["seed", "charmlp", *caps]), "--data", "random", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for f in ("results.md", "results.json", "time_vs_batch.png", "speedup.png"):
        assert (out / f).is_file(), f
    data = json.loads((out / "results.json").read_text())
    assert data["environment"]["threads"] == torch.get_num_threads()
    assert [a["status"] for a in data["sizes"][0]["arms"]] == ["PASS"] * (2 + len(caps))
    assert "ablation" in data and "output_layer" in data
    md = (out / "results.md").read_text()
    assert "torch threads" in md and "SGEMM peak" in md
    assert f"charmlp CPU kernels: {charmlp.cpu_capability()}" in md


def test_context_grouping_benchmark_runs_and_is_exact(tmp_path):
    # A batch of 2,000 rows drawn from 27 single-character contexts: grouped (27 distinct).
    cmd = [sys.executable, str(BENCH / "bench_context_grouping.py"), "--sizes", "1:4:16:27:2000",
           "--data", "random", "--rounds", "2", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (result,) = json.loads((tmp_path / "context_grouping.json").read_text())
    assert result["distinct"] == 27 and result["rows"] == 2000
    assert result["grouped_vs_ungrouped"] < 1e-4
    assert result["grouped_vs_float64"] <= 2 * result["seed_vs_float64"] + 1e-6
    assert set(result["median_s"]) == {"seed eager", "charmlp, grouping on", "charmlp, grouping off"}
    assert "| 2,000 | 27 |" in (tmp_path / "context_grouping.md").read_text()


def test_training_loop_benchmark_runs_and_is_exact(tmp_path):
    cmd = [sys.executable, str(BENCH / "bench_training_loop.py"), "--quick", "--batch", "8,32", "--data", "random",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads((tmp_path / "training_loop.json").read_text())
    assert data["environment"]["threads"] == torch.get_num_threads()
    assert data["optimizers"] == {"sgd": {"lr": 0.1, "weight_decay": 0.0}}
    assert [(r["optimizer"], r["batch"]) for r in data["results"]] == [("sgd", 8), ("sgd", 32)]
    for r in data["results"]:
        g = r["gate"]
        assert g["passed"] and g["loop_chunk_losses_bitwise_equal"] and g["loop_chunk_params_bitwise_equal"]
        assert g["seed_first_loss_rel_err"] <= 1e-5 and r["after_timing_bitwise_equal"]
        assert set(r["summary"]) == {"seed", "idiomatic", "loop", "chunk"}
        assert all(s["n"] == 2 and s["median_s"] > 0 for s in r["summary"].values())
        assert r["chunk_vs_idiomatic"] > 0
    md = (tmp_path / "training_loop.md").read_text()
    assert "torch threads" in md and "Gate: **PASS**" in md and "| 8 |" in md and "## Plain SGD" in md


def test_idiomatic_loop_benchmark_runs(tmp_path):
    cmd = [sys.executable, str(BENCH / "bench_idiomatic_loop.py"), "--quick", "--batch", "16", "--data", "random",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads((tmp_path / "idiomatic_loop.json").read_text())
    assert [(r["optimizer"], r["B"]) for r in data["results"]] == [("sgd", 16), ("adamw", 16)]
    for r in data["results"]:
        assert all(e <= 1.0 for e in r["gate"].values())
        assert {"seed", "plain", "charmlp", "forward_backward"} <= set(r["stats"])
        assert all(s["median_s"] > 0 for s in r["stats"].values())
    md = (tmp_path / "idiomatic_loop.md").read_text()
    assert "torch.optim.SGD(lr=0.1)" in md and "| charmlp |" in md


def test_layers_benchmark_runs_gated_on_tiny_shapes(tmp_path):
    cmd = [sys.executable, str(BENCH / "bench_layers.py"), "--smoke", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for f in ("layers.md", "layers.json", "layers.png"):
        assert (tmp_path / f).is_file() and (tmp_path / f).stat().st_size > 0, f
    data = json.loads((tmp_path / "layers.json").read_text())
    assert data["environment"]["threads"] == torch.get_num_threads()
    assert {c["case"]["layer"] for c in data["cases"]} == {"elt", "lce", "ce"}
    for c in data["cases"]:
        for name, a in c["arms"].items():
            if a["status"] == "SKIPPED":  # only torch's own fused op, on a torch without it
                assert name.startswith("torch-lce"), (c["key"], name, a["reason"])
                continue
            assert a["status"] == "PASS", (c["key"], name, a["reason"])
            assert set(a["times"]) == set(c["case"]["measurements"])
            assert all(t["n"] >= 2 and t["median_s"] > 0 for t in a["times"].values())
    mem = [c["memory"] for c in data["cases"] if c.get("memory")]
    assert mem and all(r["peak_bytes"] >= 0 for m in mem for r in m.values()), mem
    assert set(data["targets"]) == {"elt", "lce_small_v", "lce_all", "lce_memory", "ce"}
    md = (tmp_path / "layers.md").read_text()
    assert "torch threads" in md and "## Targets" in md and "## Correctness gate" in md
    for title in ("embed_linear_tanh", "linear_cross_entropy", "cross_entropy", "peak memory"):
        assert title in md, title


def test_tour_benchmark_checks_and_times_every_stage(tmp_path):
    cmd = [sys.executable, str(BENCH / "bench_tour.py"), "--quick", "--sizes", "tiny-64", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = (tmp_path / "tour.md").read_text()
    for row in ("| `embed_linear_tanh` | tiny-64 | forward + backward |", "| `cross_entropy` | tiny-64 | forward |",
                "| fused: model.sgd_step | tiny-64 |"):
        assert row in report, report


def test_inductor_cache_is_separate_per_aten_cpu_capability(monkeypatch):
    from harness.inductor_cache import CACHE_DIR_ENV, isolate_inductor_cache

    monkeypatch.delenv(CACHE_DIR_ENV, raising=False)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    assert isolate_inductor_cache() is None and CACHE_DIR_ENV not in os.environ
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "AVX2")
    path = isolate_inductor_cache()
    assert path is not None and path.endswith("_aten_avx2") and os.environ[CACHE_DIR_ENV] == path
    monkeypatch.setenv(CACHE_DIR_ENV, "/somewhere/chosen")  # the user's choice wins
    assert isolate_inductor_cache() is None and os.environ[CACHE_DIR_ENV] == "/somewhere/chosen"


def test_compile_arm_survives_an_avx2_host_run_before_it(tmp_path):
    """torch 2.13's FX-graph cache key leaves out the vector ISA that ATEN_CPU_CAPABILITY
    picks: without a cache per capability, a native run after an AVX2-host run compiled
    8-wide cached code with 16-wide headers and crashed (double free). Both runs share one
    temporary directory, hence one default Inductor cache."""
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "ATEN_CPU_CAPABILITY")}
    env["TMPDIR"] = str(tmp_path)
    cmd = [sys.executable, str(BENCH / "run_all.py"), "--quick", "--sizes", "lecture-4096", "--arms", "seed,compile",
           "--no-memory", "--no-ablation", "--no-output-layer", "--no-plots", "--budget", "0.2"]
    for i, extra in enumerate([{"ATEN_CPU_CAPABILITY": "avx2"}, {}]):
        r = subprocess.run(cmd + ["--out", str(tmp_path / f"out{i}")], env={**env, **extra},
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (extra, r.stdout[-2000:] + r.stderr[-2000:])
