"""Smoke test of benchmarks/bench_time_to_quality.py: a tiny run writes its table, JSON and plot
(no timings asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from _train_util import write_words

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def test_time_to_quality_benchmark_runs(tmp_path):
    words = [a + b + c + d for a in "bcdfg" for b in "aeiou" for c in "lmnr" for d in ("a", "o", "ie", "")]
    data = write_words(tmp_path / "words.txt", words)
    out = tmp_path / "out"
    cmd = [sys.executable, str(BENCH / "bench_time_to_quality.py"), "--quick", "--data", str(data),
           "--budgets", "1.5,2", "--lecture-steps", "600", "--lecture-eval-every", "200",
           "--threads", "1", "--targets", "3.0,2.5", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "time_to_quality.json").read_text())
    for name in ("lecture", "preset"):
        for arm in ("charmlp", "reference"):
            a = res["configs"][name]["arms"][arm]
            assert set(a["times_to"]) == {"3", "2.5"} and set(a["best_by"]) == {"1.5", "2"}
            assert a["curve"] and all(p["time_s"] >= 0 for p in a["curve"])
    lecture = res["configs"]["lecture"]["arms"]
    assert [p["step"] for p in lecture["charmlp"]["curve"]] == [200, 400, 600]
    assert lecture["reference"]["steps"] == lecture["charmlp"]["steps"] == 600
    preset = res["configs"]["preset"]["arms"]["charmlp"]["runs"]
    assert set(preset) == {"1.5", "2"} and all(r["time_budget"]["budget_s"] in (1.5, 2.0) for r in preset.values())
    md = (out / "time_to_quality.md").read_text()
    assert "| lecture | charmlp |" in md and "| preset | reference |" in md and "time to dev 3" in md
    assert "time_to_quality.png" in md
    assert (out / "time_to_quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
