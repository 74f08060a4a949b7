#!/usr/bin/env python
"""Question: how fast is the lecture's training loop per step: the seed notebook's eager loop
vs a Python loop of ``model.sgd_step`` vs one ``model.sgd_steps`` call per chunk?

    python benchmarks/bench_training_loop.py [--batch 32,256] [--chunk 1000] [--rounds 15]
                                             [--warmup 2] [--threads N] [--data names|random]
                                             [--quick] [--out DIR]

``charmlp train`` runs the lecture's 200,000 plain-SGD steps of batch 32 in chunks (~0.2 s,
up to 2,000 steps, minibatch rows drawn for the whole chunk at once). It used to run each
chunk as a Python loop of ``model.sgd_step`` (one fused ``mlp_sgd_step`` op a step, its
loss read back with ``float``); it now runs the chunk as one ``model.sgd_steps`` call (the
``mlp_sgd_steps`` op: the same steps back to back in C++, bitwise equal). Three arms, each
a full training-loop segment on its own copy of the same notebook-init weights
(``MLPLanguageModel(27, 3, 10, 200, fused=True, init="notebook")``):

- ``seed``: the notebook's eager loop: ``emb = C[X]``, ``h = torch.tanh(emb.view(-1, 30) @ W1
  + b1)``, ``logits = h @ W2 + b2``, ``F.cross_entropy``, ``p.grad = None``, ``loss.backward()``,
  ``p.data += -lr * p.grad``, ``loss.item()`` (W1 [30, 200], W2 [200, 27] as in the notebook);
- ``loop``: ``for j in range(k): losses.append(float(model.sgd_step(xs[j], ys[j], lr)))`` (what
  train.py ran before ``sgd_steps``);
- ``chunk``: ``losses = model.sgd_steps(xs, ys, [lr] * k).tolist()`` (what train.py runs now).

One timed sample is a chunk of ``k`` steps (default 1,000) on fresh minibatches: rows of
names.txt at block 3 built the makemore way (uniform random ids when names.txt is absent),
drawn with ``torch.randint`` for every round and the same for every arm in that round (the
drawing and the gather ``X[ix]`` are not timed: train.py does them outside its timer too);
the metric is time per step. Arms run interleaved, in an order that rotates each round,
after warm-up rounds; rounds during which other processes used more than 5 % of the CPUs
are dropped and redone (as in the suite's harness). Reported: median and IQR over rounds,
chunk vs loop and chunk vs seed. Before any timing, from identical weights, the same ``k``
steps run through ``loop`` and ``chunk`` must give bitwise equal losses and parameters
(``torch.equal``), and the seed loop's first-step loss must match the fused one to 1e-5
relative; after timing, ``loop`` and ``chunk`` (which trained on the same minibatches
throughout) are checked bitwise equal again. Writes training_loop.md (and .json) to --out
(default: print only). CPU only.
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402

import charmlp  # noqa: E402

LR = 0.1  # the lecture's learning rate for its first 100,000 steps
LECTURE_STEPS = 200_000
V, T, E, HID = 27, 3, 10, 200
ARMS = ("seed", "loop", "chunk")
LABELS = {"seed": "seed eager loop", "loop": "Python loop of `sgd_step`", "chunk": "one `sgd_steps` per chunk"}
LOSS_RTOL = 1e-5


def load_data(data: str, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor, str]:
    """X [N, 3], Y [N]: every row of names.txt at block 3 (makemore's dataset, via
    charmlp.data), or uniform random ids of the same shape when names.txt is absent or
    ``data == "random"``."""
    X, Y, source = H.make_batch(H.Size("lecture-full", T, E, HID, V, 0), data, torch.device("cpu"), seed=seed)
    return X, Y, source


def new_model() -> charmlp.MLPLanguageModel:
    return charmlp.MLPLanguageModel(vocab_size=V, block_size=T, emb_dim=E, hidden=HID, fused=True, init="notebook")


class SeedLoop:
    """The notebook's tensors (C, W1 [T*E, H], b1, W2 [H, V], b2) copied from a model."""

    def __init__(self, model: charmlp.MLPLanguageModel):
        self.C = model.embed.table.detach().clone().requires_grad_()
        self.W1 = model.embed.weight.detach().t().contiguous().requires_grad_()
        self.b1 = model.embed.bias.detach().clone().requires_grad_()
        self.W2 = model.head.weight.detach().t().contiguous().requires_grad_()
        self.b2 = model.head.bias.detach().clone().requires_grad_()
        self.parameters = [self.C, self.W1, self.b1, self.W2, self.b2]

    def run(self, xs: torch.Tensor, ys: torch.Tensor, lr: float) -> list[float]:
        C, W1, b1, W2, b2 = self.parameters
        parameters = self.parameters
        losses = []
        for j in range(xs.shape[0]):
            emb = C[xs[j]]
            h = torch.tanh(emb.view(-1, T * E) @ W1 + b1)
            logits = h @ W2 + b2
            loss = F.cross_entropy(logits, ys[j])
            for p in parameters:
                p.grad = None
            loss.backward()
            for p in parameters:
                p.data += -lr * p.grad
            losses.append(loss.item())
        return losses


def loop_run(model: charmlp.MLPLanguageModel, xs: torch.Tensor, ys: torch.Tensor, lr: float) -> list[float]:
    """What train.py ran before sgd_steps: one fused step per Python iteration."""
    losses = []
    for j in range(xs.shape[0]):
        losses.append(float(model.sgd_step(xs[j], ys[j], lr)))
    return losses


def chunk_run(model: charmlp.MLPLanguageModel, xs: torch.Tensor, ys: torch.Tensor, lr: float) -> list[float]:
    """What train.py runs now: the whole chunk in one op call."""
    return model.sgd_steps(xs, ys, [lr] * xs.shape[0]).tolist()


def draw(X, Y, k: int, batch: int, gen: torch.Generator):
    ix = torch.randint(0, X.shape[0], (k, batch), generator=gen)
    return X[ix].contiguous(), Y[ix].contiguous()


def params_equal(a: charmlp.MLPLanguageModel, b: charmlp.MLPLanguageModel) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def gate(X, Y, k: int, batch: int, gen: torch.Generator) -> dict:
    """From identical weights: the same k steps through loop and chunk are bitwise equal
    (losses and parameters); the seed loop's first-step loss matches the fused one."""
    xs, ys = draw(X, Y, k, batch, gen)
    m_loop, m_chunk = new_model(), new_model()
    assert params_equal(m_loop, m_chunk), "two notebook-init models differ"
    seed = SeedLoop(new_model())
    with torch.no_grad():
        loop_losses = torch.stack([m_loop.sgd_step(xs[j], ys[j], LR) for j in range(k)])
        chunk_losses = m_chunk.sgd_steps(xs, ys, [LR] * k)
    losses_equal = torch.equal(loop_losses, chunk_losses)
    differing = [name for (name, p), q in zip(m_loop.named_parameters(), m_chunk.parameters())
                 if not torch.equal(p, q)]
    seed_first = seed.run(xs[:1], ys[:1], LR)[0]
    fused_first = float(chunk_losses[0])
    seed_rel = abs(seed_first - fused_first) / abs(fused_first)
    res = {"steps": k, "batch": batch, "loop_chunk_losses_bitwise_equal": losses_equal,
           "loop_chunk_params_bitwise_equal": not differing, "params_differing": differing,
           "seed_first_loss": seed_first, "fused_first_loss": fused_first, "seed_first_loss_rel_err": seed_rel,
           "final_loss": float(chunk_losses[-1])}
    res["passed"] = losses_equal and not differing and seed_rel <= LOSS_RTOL
    if not res["passed"]:
        raise SystemExit(f"B={batch}: FAILED the correctness gate: {res}")
    return res


def bench(X, Y, batch: int, k: int, rounds: int, warmup: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    res = {"batch": batch, "chunk": k, "gate": gate(X, Y, k, batch, gen)}
    m_loop, m_chunk = new_model(), new_model()
    seed_loop = SeedLoop(new_model())
    runs = {"seed": lambda xs, ys: seed_loop.run(xs, ys, LR),
            "loop": lambda xs, ys: loop_run(m_loop, xs, ys, LR),
            "chunk": lambda xs, ys: chunk_run(m_chunk, xs, ys, LR)}
    samples = {a: [] for a in ARMS}
    final_losses = {}
    cont = H.Contention()
    kept = dropped = attempts = 0
    contended = False
    steps_run = 0
    max_attempts = warmup + 3 * rounds
    gc_was = gc.isenabled()
    while kept < rounds:
        attempts += 1
        xs, ys = draw(X, Y, k, batch, gen)  # the same fresh minibatches for every arm this round
        order = list(ARMS[attempts % 3:] + ARMS[:attempts % 3])  # rotate the order
        times = {}
        gc.collect()
        gc.disable()
        a = cont.snapshot()
        try:
            for arm in order:
                t0 = time.perf_counter_ns()
                losses = runs[arm](xs, ys)
                times[arm] = (time.perf_counter_ns() - t0) / 1e9 / k
                final_losses[arm] = losses[-1]
        finally:
            if gc_was:
                gc.enable()
        b = cont.snapshot()
        steps_run += k
        if attempts <= warmup:
            continue
        if cont.clean(a, b) or attempts > max_attempts:
            if attempts > max_attempts:
                contended = True
            kept += 1
            for arm in ARMS:
                samples[arm].append(times[arm])
        else:
            dropped += 1
    res.update({"warmup_rounds": warmup, "kept_rounds": kept, "dropped_rounds": dropped, "contended": contended,
                "steps_per_arm": steps_run, "samples_s_per_step": samples,
                "summary": {arm: H.summarize(s) for arm, s in samples.items()},
                "final_loss": final_losses})
    # loop and chunk trained on the same minibatches from the same weights throughout
    res["after_timing_bitwise_equal"] = params_equal(m_loop, m_chunk)
    if not res["after_timing_bitwise_equal"]:
        raise SystemExit(f"B={batch}: loop and chunk diverged during timing (not bitwise equal after "
                         f"{steps_run:,} steps)")
    med = {arm: res["summary"][arm]["median_s"] for arm in ARMS}
    res["chunk_vs_loop"] = med["loop"] / med["chunk"]
    res["chunk_vs_seed"] = med["seed"] / med["chunk"]
    res["chunk_steps_per_s"] = 1 / med["chunk"]
    return res


def cell(s: dict) -> str:
    med = s["median_s"]
    return f"{H.fmt_time(med)} ±{50 * s['iqr_s'] / med:.0f}%"


def table(results: list[dict]) -> list[str]:
    L = ["| batch | seed per step | loop per step | chunk per step | chunk vs loop | chunk vs seed | "
         "chunk steps/s | 200,000 steps: seed / loop / chunk |",
         "|---|---|---|---|---|---|---|---|"]
    for r in results:
        s = r["summary"]
        lecture = " / ".join(f"{s[a]['median_s'] * LECTURE_STEPS:.1f} s" for a in ARMS)
        L.append(f"| {r['batch']} | {cell(s['seed'])} | {cell(s['loop'])} | {cell(s['chunk'])} | "
                 f"{r['chunk_vs_loop']:.2f}x | {r['chunk_vs_seed']:.1f}x | {r['chunk_steps_per_s']:,.0f} | "
                 f"{lecture} |")
    return L


def render(results: list[dict], env: dict, source: str, args, command: str) -> list[str]:
    bi = env["charmlp_build_info"]
    L = ["# The lecture's training loop, per step", "",
         f"Command: `{command}`", "",
         f"- date: {env['date']}; CPU: {env['cpu_model']}, {env['cpu_count']} logical CPUs; "
         f"**torch threads: {env['threads']}** (interop {env['interop_threads']})"
         + (f"; {env['env']}" if env["env"] else ""),
         f"- load average (1/5/15 min) at start {env.get('loadavg_start')}, at end {env.get('loadavg_end')}",
         f"- torch {env['torch']}, Python {env['python']}; charmlp {env['charmlp']} build: "
         + ", ".join(f"{k}={v}" for k, v in bi.items()),
         f"- data: {source}; minibatches drawn with `torch.randint` each round, the same for every arm",
         f"- model: `MLPLanguageModel(27, 3, 10, 200, fused=True, init=\"notebook\")`, plain SGD at lr {LR}; "
         f"each arm trains its own copy from the same weights",
         f"- a timed sample is one chunk of {args.chunk:,} steps of an arm (per-step time = chunk time / "
         f"{args.chunk:,}); arms interleaved, order rotated each round, {args.warmup} warm-up round(s) first; cells: "
         "median over the rounds ±half the inter-quartile range (% of the median); ratios are medians' ratios. "
         "Rounds during which other processes used more than 5 % of the CPUs are dropped and redone; clean rounds "
         "(dropped): " + ", ".join(f"B={r['batch']} {r['kept_rounds']} ({r['dropped_rounds']})" for r in results),
         "- arms: **seed** = the notebook's eager step loop (`C[X]`, `tanh(emb.view(-1, 30) @ W1 + b1)`, "
         "`@ W2 + b2`, `F.cross_entropy`, `p.grad = None`, `loss.backward()`, `p.data += -lr * p.grad`, "
         "`loss.item()`); **loop** = `for j in range(k): losses.append(float(model.sgd_step(xs[j], ys[j], lr)))` "
         "(train.py before `sgd_steps`); **chunk** = `model.sgd_steps(xs, ys, [lr] * k).tolist()` (train.py now)",
         ""]
    contended = [str(r["batch"]) for r in results if r["contended"]]
    if contended:
        L += [f"> **Warning:** too few clean rounds at B={', '.join(contended)}: other processes kept using the "
              "CPUs; those rows include contended rounds. Rerun on a quiet machine.", ""]
    L += table(results) + [""]
    L += ["## Correctness gate (before timing)", "",
          "| batch | steps | loop vs chunk: losses | loop vs chunk: parameters | seed vs fused, first-step loss "
          "(rel. err, tol 1e-5) | loop vs chunk after timing |", "|---|---|---|---|---|---|"]
    for r in results:
        g = r["gate"]
        params = "bitwise equal" if g["loop_chunk_params_bitwise_equal"] else "DIFFER: " + ", ".join(g["params_differing"])
        L.append(f"| {r['batch']} | {g['steps']:,} | "
                 f"{'bitwise equal' if g['loop_chunk_losses_bitwise_equal'] else 'DIFFER'} | {params} | "
                 f"{g['seed_first_loss']:.6f} vs {g['fused_first_loss']:.6f} ({g['seed_first_loss_rel_err']:.1e}) | "
                 f"{'bitwise equal' if r['after_timing_bitwise_equal'] else 'DIFFER'} after "
                 f"{r['steps_per_arm']:,} steps |")
    verdict = "PASS" if all(r["gate"]["passed"] and r["after_timing_bitwise_equal"] for r in results) else "FAIL"
    L += ["", f"Gate: **{verdict}**.", ""]
    return L


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", default="32", help="comma-separated batch sizes (default 32, the lecture's)")
    p.add_argument("--chunk", type=int, default=None, help="steps per timed sample, k (default 1000; quick 20)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per batch size (default 15; quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up rounds (default 2; quick 1)")
    p.add_argument("--data", default="names", help="names (names.txt when found, else random) or random")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--quick", action="store_true", help="smoke test: k=20, 1 warm-up round, 2 timed rounds")
    p.add_argument("--out", default=None, help="directory for training_loop.md / .json (default: print only)")
    args = p.parse_args(argv)
    args.chunk = args.chunk or (20 if args.quick else 1000)
    args.rounds = args.rounds or (2 if args.quick else 15)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if args.chunk < 1 or args.rounds < 1 or args.warmup < 0:
        p.error("--chunk and --rounds must be >= 1, --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    batches = [int(b) for b in args.batch.split(",") if b.strip()]
    env = H.environment(torch.device("cpu"), threads)
    X, Y, source = load_data(args.data)
    print(f"training loop benchmark: {threads} threads, data {source}, k={args.chunk}, "
          f"{args.rounds} rounds (+{args.warmup} warm-up)", flush=True)
    t0 = time.perf_counter()
    results = []
    for batch in batches:
        r = bench(X, Y, batch, args.chunk, args.rounds, args.warmup)
        results.append(r)
        print(f"B={batch}: " + ", ".join(f"{a} {H.fmt_time(r['summary'][a]['median_s'])}/step" for a in ARMS)
              + f"; chunk vs loop {r['chunk_vs_loop']:.2f}x, vs seed {r['chunk_vs_seed']:.1f}x", flush=True)
    env["loadavg_end"] = H._loadavg()
    given = sys.argv[1:] if argv is None else list(argv)
    command = "python benchmarks/bench_training_loop.py" + (" " + shlex.join(given) if given else "")
    lines = render(results, env, source, args, command)
    print("\n".join(lines))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "training_loop.md").write_text("\n".join(lines))
        blob = {"command": command, "environment": env, "data": source, "lr": LR,
                "config": {"chunk": args.chunk, "rounds": args.rounds, "warmup": args.warmup, "batches": batches},
                "elapsed_s": time.perf_counter() - t0, "results": results}
        (out / "training_loop.json").write_text(json.dumps(H._jsonable(blob), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
