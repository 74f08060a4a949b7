#!/usr/bin/env python
"""Question: how much sooner does charmlp reach a given model quality than the same recipe through
plain PyTorch, and how good a model does each get in 30 s, 2 min and 5 min?

    python benchmarks/bench_time_to_quality.py [--configs lecture,preset] [--budgets 30,120,300]
                                               [--targets 2.17,2.00] [--threads 2] [--data PATH]
                                               [--quick] [--out DIR]

Training benchmarks that people trust (MLPerf Training) time a run to a target quality, not a
step. Every run here is ``charmlp train`` itself (``charmlp.train.train``), with the fused
kernels (``charmlp``) and with ``--reference`` (``reference``: the same model, optimizer and
minibatches through plain PyTorch ops), back to back, on names.txt's lecture split:

* ``lecture``: the lecture's recipe as it stands (block 3, emb 10, hidden 200, 200,000 SGD
  steps of batch 32, 0.1 then 0.01), evaluated every 2,000 steps. Both arms take the same
  steps (the same numbers to float rounding), so they cross a target at the same step.
  "Best dev in T" is the lowest dev loss evaluated by time T on this one curve.
* ``preset``: ``charmlp train --preset best-5min --time-budget T`` for each T of
  ``--budgets``: the schedule is laid over T, so each arm trains as many steps as its speed
  allows in T. "Best dev in T" is the final dev loss of the T-second run (its wall time,
  evaluations and final report included, is T). The longest budget's run is also evaluated
  ~20 times on the way (its evaluations count in its budget, in both arms alike); that curve
  gives the preset's times to the targets.

Time axis: the wall time of the ``train()`` call up to an evaluation (data loading, the
budget's speed measurement, minibatch draws, checkpoints included) **minus the time spent in
the periodic evaluations before it**: the curve's own measurement is excluded, in both arms
alike. The dev loss is evaluated in full (every dev example). Writes time_to_quality.md,
.json and time_to_quality.png (dev loss against that time, every arm on one axis) to --out
(default: print only). Run it on a quiet machine (``flock /tmp/charmlp-timing.lock ...``);
the full run takes ~17 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import environment, find_names_txt, jsonable, loadavg  # noqa: E402

from charmlp.train import PRESETS, TrainConfig, preset_config, train  # noqa: E402

PRESET = "best-5min"
ARMS = ("charmlp", "reference")
LECTURE_EVAL_EVERY = 2000
CURVE_POINTS = 20


def _run(cfg: TrainConfig, log) -> dict:
    """One ``train()`` call; returns its curve (time, dev) and its results (no files kept)."""
    tmp = Path(tempfile.mkdtemp(prefix="ttq-"))
    points = []

    def on_eval(e):
        points.append({"step": e["step"], "dev": e["dev"], "train": e["train"], "final": e["final"],
                       "time_s": e["wall_time_s"] - e["eval_time_s"], "wall_time_s": e["wall_time_s"]})

    try:
        t0 = time.perf_counter()
        res = train(cfg, tmp / "run", progress=False, log=lambda s: None, on_eval=on_eval)
        wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = {"steps": res["steps"], "wall_s": wall, "train_time_s": res["train_time_s"],
           "dev": res["losses"]["dev"]["loss"], "train": res["losses"]["train"]["loss"],
           "test": res["losses"]["test"]["loss"], "curve": points,
           "steps_per_s": res["steps_per_s"], "time_budget": res.get("time_budget")}
    log(f"    {res['steps']:,} steps, dev {out['dev']:.4f}, wall {wall:.1f} s "
        f"({res['steps_per_s'] or 0:,.0f} steps/s)")
    return out


def time_to(curve: list[dict], target: float) -> float | None:
    """Time of the first evaluation at or below ``target`` (None: never)."""
    for p in curve:
        if p["dev"] is not None and p["dev"] <= target:
            return p["time_s"]
    return None


def best_by(curve: list[dict], t: float) -> float | None:
    devs = [p["dev"] for p in curve if p["time_s"] <= t and p["dev"] is not None]
    return min(devs) if devs else None


def run(args, log=print) -> dict:
    data = args.data
    if data is None:
        found = find_names_txt()
        data = str(found) if found else None
    if data is None:
        log("names.txt not found: using the embedded corpus (numbers not comparable with the lecture's)")
    common = dict(data=data, threads=args.threads, num_samples=0)
    out = {"environment": environment(torch.device("cpu"), args.threads), "data": data,
           "targets": args.targets, "budgets": args.budgets, "configs": {},
           "command": " ".join(shlex.quote(a) for a in sys.argv)}
    t_all = time.perf_counter()
    if "lecture" in args.configs:
        log(f"lecture: {args.lecture_steps:,} steps, dev every {args.lecture_eval_every:,} steps")
        arms = {}
        for arm in ARMS:
            log(f"  {arm}")
            cfg = TrainConfig(**common, steps=args.lecture_steps, reference=arm == "reference",
                              eval_every=args.lecture_eval_every)
            r = _run(cfg, log)
            r["times_to"] = {f"{t:g}": time_to(r["curve"], t) for t in args.targets}
            r["best_by"] = {f"{b:g}": best_by(r["curve"], b) for b in args.budgets}
            arms[arm] = r
        out["configs"]["lecture"] = {"how": "fixed steps; one curve per arm", "arms": arms,
                                     "flags": f"--steps {args.lecture_steps} (the lecture's defaults)"}
    if "preset" in args.configs:
        log(f"preset {PRESET}: budgets {', '.join(f'{b:g} s' for b in args.budgets)}")
        arms = {arm: {"runs": {}} for arm in ARMS}
        longest = max(args.budgets)
        for b in sorted(args.budgets):
            for arm in ARMS:
                log(f"  {arm}, --time-budget {b:g}")
                eval_every = 0
                if b == longest:  # a curve: ~CURVE_POINTS evaluations, from this arm's step rate
                    rate = _rate_from(arms[arm]["runs"]) or _pilot_rate(common, arm, log)
                    eval_every = max(1, int(rate * b / CURVE_POINTS))
                cfg = preset_config(PRESET, **common, time_budget=float(b), reference=arm == "reference",
                                    eval_every=eval_every)
                arms[arm]["runs"][f"{b:g}"] = _run(cfg, log)
        for arm in ARMS:
            runs = arms[arm]["runs"]
            curve = runs[f"{longest:g}"]["curve"]
            arms[arm]["times_to"] = {f"{t:g}": time_to(curve, t) for t in args.targets}
            arms[arm]["best_by"] = {k: r["dev"] for k, r in runs.items()}
            arms[arm]["curve"] = curve
        out["configs"]["preset"] = {"how": "one --time-budget run per budget; the longest one's curve",
                                    "arms": arms, "flags": _preset_flags()}
    out["elapsed_s"] = time.perf_counter() - t_all
    out["environment"]["loadavg_end"] = loadavg()
    return out


def _rate_from(runs: dict) -> float | None:
    if not runs:
        return None
    r = runs[max(runs, key=float)]
    return r["steps"] / float(max(runs, key=float))


def _pilot_rate(common: dict, arm: str, log) -> float:
    log("    (a 5 s pilot run for the step rate)")
    cfg = preset_config(PRESET, **common, time_budget=5.0, reference=arm == "reference", eval_every=0)
    return _run(cfg, lambda s: None)["steps"] / 5.0


def _preset_flags() -> str:
    parts = []
    for k, v in PRESETS[PRESET].items():
        parts.append(f"--{k.replace('_', '-')} {v:g}" if isinstance(v, float) else f"--{k.replace('_', '-')} {v}")
    return " ".join(parts)


def _fmt_t(t: float | None) -> str:
    return "not reached" if t is None else f"{t:.1f} s"


def _fmt_l(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or a <= 0 else f"{b / a:.1f}x"


def render(res: dict, plot: str | None) -> str:
    env = res["environment"]
    lines = ["# Time to quality", "",
             f"`{res['command']}`", "",
             f"{env['cpu_model']}, {env['threads']} torch threads, torch {env['torch']}; load average "
             f"{env['loadavg_start']} at the start, {env.get('loadavg_end')} at the end; "
             f"{res['elapsed_s'] / 60:.1f} min in all. Data: {res['data'] or 'the embedded corpus'} "
             "(the lecture's 80/10/10 split).", "",
             "Time: the wall time of the `charmlp train` call (`train()`) up to the evaluation, minus the "
             "time spent in the periodic evaluations before it (both arms alike). `reference` is the same "
             "run with `--reference` (plain PyTorch ops), run back to back. For the preset, each budget's "
             "schedule is laid over that budget, so where its longest run's curve crosses a target says "
             "more about the cosine schedule's shape than about speed: compare its best dev in each "
             "budget.", ""]
    targets, budgets = res["targets"], res["budgets"]
    head = ("| config | arm | " + " | ".join(f"time to dev {t:g}" for t in targets) + " | "
            + " | ".join(f"best dev in {b:g} s" for b in budgets) + " |")
    lines += [head, "|" + "---|" * (2 + len(targets) + len(budgets))]
    for name, c in res["configs"].items():
        arms = c["arms"]
        for arm in ARMS:
            a = arms[arm]
            lines.append(f"| {name} | {arm} | " + " | ".join(_fmt_t(a["times_to"][f"{t:g}"]) for t in targets)
                         + " | " + " | ".join(_fmt_l(a["best_by"].get(f"{b:g}")) for b in budgets) + " |")
        lines.append(f"| {name} | **charmlp speed-up** | "
                     + " | ".join(_ratio(arms["charmlp"]["times_to"][f"{t:g}"], arms["reference"]["times_to"][f"{t:g}"])
                                  for t in targets) + " |" + " |" * len(budgets))
    lines.append("")
    for name, c in res["configs"].items():
        lines += [f"## {name}", "", f"{c['how']}; flags: `{c['flags']}`", "",
                  "| arm | run | steps | steps/s | train | dev | test | wall |", "|---|---|---|---|---|---|---|---|"]
        for arm in ARMS:
            runs = c["arms"][arm].get("runs") or {"fixed steps": c["arms"][arm]}
            for key, r in runs.items():
                label = key if key == "fixed steps" else f"--time-budget {key}"
                lines.append(f"| {arm} | {label} | {r['steps']:,} | {r['steps_per_s'] or 0:,.0f} | "
                             f"{r['train']:.4f} | {r['dev']:.4f} | {r['test']:.4f} | {r['wall_s']:.1f} s |")
        lines.append("")
    if plot:
        lines += [f"![dev loss against time]({plot})", ""]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    from charmlp.plot import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    styles = {"charmlp": "-", "reference": "--"}
    colors = {"lecture": "tab:blue", "preset": "tab:red"}
    for name, c in res["configs"].items():
        for arm in ARMS:
            a = c["arms"][arm]
            curve = [p for p in a["curve"] if p["dev"] is not None]
            ax.plot([max(p["time_s"], 1e-2) for p in curve], [p["dev"] for p in curve], styles[arm],
                    color=colors[name], label=f"{name}, {arm}", marker="." if len(curve) < 60 else None)
            for key, r in (a.get("runs") or {}).items():  # the shorter budgets' final points
                fin = [p for p in r["curve"] if p["final"]]
                if fin and fin[0]["dev"] is not None:
                    ax.plot([fin[0]["time_s"]], [fin[0]["dev"]], "o" if arm == "charmlp" else "s",
                            color=colors[name], mfc="none" if arm == "reference" else colors[name])
    for t in res["targets"]:
        ax.axhline(t, color="gray", lw=0.8, ls=":")
        ax.text(0.01, t, f"dev {t:g}", va="bottom", fontsize=8, color="gray", transform=ax.get_yaxis_transform())
    ax.set_xscale("log")
    ax.set_xlabel("time (s; the train() call's wall time minus its periodic evaluations)")
    ax.set_ylabel("dev loss (nats per character)")
    lo = min(res["targets"]) - 0.08
    ax.set_ylim(lo, 2.6)
    ax.set_title("names.txt dev loss against time: charmlp vs the same recipe in plain PyTorch")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="lecture,preset")
    ap.add_argument("--budgets", default=None, help="seconds, comma-separated (default: 30,120,300)")
    ap.add_argument("--targets", default="2.17,2.00", help="dev losses, comma-separated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", default=None, help="word list (default: names.txt if found)")
    ap.add_argument("--lecture-steps", type=int, default=None, help="default: 200000")
    ap.add_argument("--lecture-eval-every", type=int, default=None, help=f"default: {LECTURE_EVAL_EVERY}")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 2,000 lecture steps, preset budgets of 2 and 3 s")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    quick = dict(lecture_steps=2000, lecture_eval_every=500, budgets="2,3")
    full = dict(lecture_steps=200_000, lecture_eval_every=LECTURE_EVAL_EVERY, budgets="30,120,300")
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.configs = [c for c in args.configs.split(",") if c]
    args.budgets = [float(b) for b in args.budgets.split(",")]
    args.targets = [float(t) for t in args.targets.split(",")]
    torch.set_num_threads(args.threads)
    res = run(args)
    png = None
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        png = "time_to_quality.png"
        plot(res, args.out / png)
        (args.out / "time_to_quality.json").write_text(json.dumps(jsonable(res), indent=1) + "\n")
    md = render(res, png)
    print(md)
    if args.out is not None:
        (args.out / "time_to_quality.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
