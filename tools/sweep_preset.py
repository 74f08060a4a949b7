#!/usr/bin/env python
"""The sweep behind ``charmlp train --preset best-5min``: which Bengio et al. MLP recipe gives
the lowest names.txt **dev** loss in a fixed wall-clock budget on this machine?

    python tools/sweep_preset.py --stage coarse              # every candidate, 60 s each
    python tools/sweep_preset.py --stage final --configs b,h  # the best few, 300 s each
    python tools/sweep_preset.py --table-only                 # rewrite the table from the JSON

Every run is ``charmlp train`` (``charmlp.train.train``) on names.txt's lecture 80/10/10
split (``$CHARMLP_NAMES`` or ``../shared/data/names.txt``), for the number of steps that the
candidate takes in the budget on this machine when it is quiet: the machine is shared, and
a ``--time-budget`` run fixes its steps from the speed of its first seconds, so a busy
spell there would hand a candidate fewer steps. The quiet step rate is the best of several
short timings of the candidate's training step (``quiet_rate``, ~3 s: the best is the least
disturbed one), kept in ``QUIET_RATES`` from a quiet spell; ``--mode budget`` runs ``--time-budget`` instead (for a quiet machine). The
learning-rate schedule is laid over those steps. Only the train
and dev losses are recorded: the test split is not looked at here (train() evaluates it for
its final report, which this script discards); the preset's test loss is read once, in its
final verification run. The model family is fixed: embedding, one tanh hidden layer,
softmax output (no direct connections, no dropout); the candidates vary block size,
embedding and hidden width, batch size, AdamW's learning rate and weight decay, and the
init; the schedule is cosine to 1e-5 throughout (AdamW; the lecture's SGD as a baseline).

Results accumulate in ``benchmarks/results/cpu/preset_sweep.json`` (a (candidate, budget)
pair already there is not rerun unless ``--force``) and the Markdown table is rewritten to
``preset_sweep.md`` after every run. Coarse runs need no quiet machine; budgets whose wall
time is quoted should run under ``flock /tmp/charmlp-timing.lock``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "cpu"

ADAMW = dict(optimizer="adamw", lr_schedule="cosine", lr_final=1e-5, init="default")

#: name -> settings (TrainConfig fields). "a" is the hand-tuned starting point of issue 16.
CANDIDATES: dict[str, dict] = {
    "lecture": dict(),  # the lecture's model and SGD step schedule, laid over the budget
    "a": dict(block_size=8, emb_dim=24, hidden=512, batch_size=128, lr=2e-3, weight_decay=0.05, **ADAMW),
    "b": dict(block_size=8, emb_dim=24, hidden=512, batch_size=256, lr=3e-3, weight_decay=0.1, **ADAMW),
    "c": dict(block_size=8, emb_dim=32, hidden=1024, batch_size=256, lr=2e-3, weight_decay=0.1, **ADAMW),
    "d": dict(block_size=8, emb_dim=32, hidden=1024, batch_size=256, lr=2e-3, weight_decay=0.3, **ADAMW),
    "e": dict(block_size=8, emb_dim=32, hidden=1024, batch_size=256, lr=1e-3, weight_decay=0.1, **ADAMW),
    "f": dict(block_size=12, emb_dim=32, hidden=1024, batch_size=256, lr=2e-3, weight_decay=0.1, **ADAMW),
    "g": dict(block_size=8, emb_dim=24, hidden=2048, batch_size=128, lr=1.5e-3, weight_decay=0.1, **ADAMW),
    "h": dict(block_size=8, emb_dim=24, hidden=512, batch_size=256, lr=3e-3, weight_decay=0.3, **ADAMW),
    "i": dict(block_size=8, emb_dim=32, hidden=1024, batch_size=256, lr=2e-3, weight_decay=0.2, **ADAMW),
    "j": dict(block_size=8, emb_dim=32, hidden=1024, batch_size=256, lr=2e-3, weight_decay=0.15, **ADAMW),
    "k": dict(block_size=8, emb_dim=32, hidden=1024, batch_size=256, lr=2e-3, weight_decay=0.05, **ADAMW),
}
#: Steps per second of each candidate on this machine (2 threads) when quiet (load average
#: 0.01), measured with the loop of :func:`quiet_rate`: the machine is shared, and a
#: timing taken while others run can be several times lower. A candidate without an entry
#: is timed by quiet_rate() when it runs.
QUIET_RATES = {"lecture": 26_500, "a": 757, "b": 797, "c": 430, "d": 430, "e": 430, "f": 311, "g": 217,
               "h": 797, "i": 430, "j": 430, "k": 430}
STAGES = {"coarse": 60.0, "final": 300.0}


def find_names() -> Path | None:
    env = os.environ.get("CHARMLP_NAMES")
    for c in ([Path(env)] if env else []) + [REPO.parent / "shared/data/names.txt",
                                              Path("/work/shared/data/names.txt")]:
        if c.is_file():
            return c
    return None


def flags(settings: dict) -> str:
    """The candidate as charmlp train flags."""
    out = []
    for k, v in settings.items():
        out.append(f"--{k.replace('_', '-')} {v:g}" if isinstance(v, float) else f"--{k.replace('_', '-')} {v}")
    return " ".join(out) if out else "(the defaults: the lecture's model)"


def quiet_rate(settings: dict, data: Path, threads: int, blocks: int = 8, block_s: float = 0.3) -> float:
    """Steps per second of the candidate's training step (charmlp.train's path: the fused SGD
    chunk op for plain SGD, else ``model(x, y)``, ``backward()``, fused ``torch.optim``),
    the best of ``blocks`` timings of ~``block_s`` on names.txt minibatches."""
    import torch

    from charmlp.data import Vocab, build_examples, load_corpus, split_words
    from charmlp.train import TrainConfig, learning_rate
    from charmlp.train.state import _build_model

    torch.set_num_threads(threads)
    cfg = TrainConfig(data=str(data), **settings).resolved()
    corpus = load_corpus(data)
    vocab = Vocab.from_words(corpus.words)
    X, Y = build_examples(split_words(corpus.words).train, vocab, cfg.block_size)
    model = _build_model(cfg, vocab.size, torch.device("cpu"))
    sgd = cfg.optimizer == "sgd" and cfg.weight_decay == 0
    opt = None if sgd else (torch.optim.SGD if cfg.optimizer == "sgd" else torch.optim.AdamW)(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    g = torch.Generator().manual_seed(0)

    def chunk(k):
        ix = torch.randint(0, X.shape[0], (k, cfg.batch_size), generator=g)
        xs, ys = X[ix], Y[ix]
        lrs = [learning_rate(cfg, j) for j in range(k)]
        if sgd:
            model.sgd_steps(xs, ys, lrs).tolist()
            return
        for j in range(k):
            opt.param_groups[0]["lr"] = lrs[j]
            _, loss = model(xs[j], ys[j])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            float(loss.detach())

    chunk(16)
    t0 = time.perf_counter()
    chunk(32)
    k = max(16, int(32 / (time.perf_counter() - t0) * block_s))
    best = 0.0
    for _ in range(blocks):
        t0 = time.perf_counter()
        chunk(k)
        best = max(best, k / (time.perf_counter() - t0))
    return best


def run_one(name: str, budget: float, data: Path, threads: int, log, mode: str = "steps",
            run_threads: int | None = None) -> dict:
    from charmlp.train import TrainConfig, train

    settings = CANDIDATES[name]
    length = {"time_budget": budget}
    rate = None
    if mode == "steps":
        rate = QUIET_RATES.get(name) if threads == 2 else None
        rate = rate or quiet_rate(settings, data, threads)
        # (train()'s own overhead: loading, minibatch draws, the final evaluation, ~3 %)
        length = {"steps": max(1, int(0.97 * budget * rate))}
    tmp = Path(tempfile.mkdtemp(prefix=f"sweep-{name}-"))
    try:
        cfg = TrainConfig(data=str(data), threads=run_threads or threads, eval_every=0,
                          checkpoint_every=0, num_samples=0, **length, **settings)
        t0 = time.perf_counter()
        res = train(cfg, tmp / "run", progress=False, log=lambda s: None)
        wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    row = {"name": name, "budget_s": budget, "settings": settings, "steps": res["steps"],
           "train": res["losses"]["train"]["loss"], "dev": res["losses"]["dev"]["loss"],
           "wall_s": wall, "parameters": res["parameters"], "threads": threads, "run_threads": run_threads or threads, "mode": mode,
           "quiet_steps_per_s": rate,
           "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    log(f"{name} @ {budget:g} s: {row['steps']:,} steps, train {row['train']:.4f} dev {row['dev']:.4f} "
        f"({wall:.1f} s)")
    return row


def write_table(rows: list[dict], path: Path) -> None:
    lines = ["# Preset sweep: dev loss in a fixed wall-clock budget", "",
             "Written by `python tools/sweep_preset.py` (see its docstring). names.txt, the lecture's "
             "80/10/10 split; every run is `charmlp train --data names.txt --steps N` with "
             "the flags below and `--eval-every 0 --checkpoint-every 0`, N = 0.97 x budget x the "
             "candidate's quiet step rate (`--time-budget BUDGET` for rows marked budget), on "
             f"{platform.processor() or platform.machine()} with {rows[0]['threads'] if rows else '?'} "
             "threads. Only train and dev are recorded (the test split is not looked at). "
             "Sorted by budget, then dev loss.", "",
             "Steps are sized for 2 threads; `wall` is the run's own (the machine was shared during the "
             "sweep, and runs marked * used 1 thread, whose losses differ from 2 threads' by float "
             "rounding only). Rows marked (budget) ran `--time-budget` itself: c at 300 s is the "
             "preset's verification, `charmlp train --data names.txt --preset best-5min` (its steps were "
             "fixed by its speed measurement on the quiet machine; other processes then shared the "
             "cores, which made it late: 882 s of wall time).", "",
             "| candidate | budget | dev | train | steps | quiet steps/s | parameters | wall | flags |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["budget_s"], r["dev"])):
        rate = r.get("quiet_steps_per_s")
        lines.append(f"| {r['name']} | {r['budget_s']:g} s{' (budget)' if r.get('mode') == 'budget' else ''} | "
                     f"**{r['dev']:.4f}** | {r['train']:.4f} | {r['steps']:,} | "
                     f"{'-' if rate is None else f'{rate:,.0f}'} | {r['parameters']:,} | {r['wall_s']:.1f} s"
                     f"{'*' if r.get('run_threads', r['threads']) != r['threads'] else ''} | "
                     f"`{flags(r['settings'])}` |")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", choices=tuple(STAGES), default="coarse")
    ap.add_argument("--budget", type=float, default=None, help="seconds per run (default: the stage's)")
    ap.add_argument("--configs", default=None, help="comma-separated candidate names (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--run-threads", type=int, default=None,
                    help="threads of the training runs when they differ from --threads, the machine the "
                         "steps are sized for (steps mode: the same steps; the losses change only by "
                         "float rounding; useful while other processes share the cores)")
    ap.add_argument("--mode", choices=("steps", "budget"), default="steps",
                    help="steps: budget x the quiet step rate (default); budget: --time-budget")
    ap.add_argument("--out", type=Path, default=RESULTS / "preset_sweep.md")
    ap.add_argument("--force", action="store_true", help="rerun pairs already in the JSON")
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--add-run", type=Path, default=None, metavar="RUN_DIR",
                    help="add a finished --time-budget run of candidate --configs NAME (e.g. the preset's "
                         "verification, charmlp train --preset best-5min) as a budget row: its train and "
                         "dev losses only")
    args = ap.parse_args(argv)
    store = args.out.with_suffix(".json")
    rows = json.loads(store.read_text()) if store.exists() else []
    if args.add_run is not None:
        res = json.loads((args.add_run / "results.json").read_text())
        name = args.configs
        budget = res["train_config"]["time_budget"]
        rows = [r for r in rows if not (r["name"] == name and r["budget_s"] == budget)] + [{
            "name": name, "budget_s": budget, "settings": CANDIDATES[name], "steps": res["steps"],
            "train": res["losses"]["train"]["loss"], "dev": res["losses"]["dev"]["loss"],
            "wall_s": res["wall_time_s"], "parameters": res["parameters"], "threads": res["threads"],
            "run_threads": res["threads"], "mode": "budget", "quiet_steps_per_s": None,
            "when": time.strftime("%Y-%m-%d %H:%M:%S")}]
        store.write_text(json.dumps(rows, indent=1) + "\n")
    elif not args.table_only:
        data = find_names()
        if data is None:
            print("names.txt not found (set CHARMLP_NAMES)", file=sys.stderr)
            return 2
        budget = args.budget or STAGES[args.stage]
        names = args.configs.split(",") if args.configs else list(CANDIDATES)
        unknown = [n for n in names if n not in CANDIDATES]
        if unknown:
            print(f"unknown candidates {unknown}; known: {', '.join(CANDIDATES)}", file=sys.stderr)
            return 2
        for name in names:
            if not args.force and any(r["name"] == name and r["budget_s"] == budget for r in rows):
                continue
            row = run_one(name, budget, data, args.threads, lambda s: print(s, flush=True), args.mode,
                          args.run_threads)
            rows = [r for r in rows if not (r["name"] == name and r["budget_s"] == budget)] + [row]
            args.out.parent.mkdir(parents=True, exist_ok=True)
            store.write_text(json.dumps(rows, indent=1) + "\n")
            write_table(rows, args.out)
    write_table(rows, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
