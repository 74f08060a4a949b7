"""The kernel tour's stages, timed side by side (docs/tour.md).

For ``embed_linear_tanh`` and ``cross_entropy``, forward and forward + backward:

* ``reference``: ``charmlp.reference``, the plain-PyTorch ground truth;
* ``naive``: charmlp's op with the naive kernels (``charmlp.use_kernel_impl("naive")``):
  plain loops on the CPU, one thread per output on CUDA;
* ``fast``: the same op with the optimized kernels (the default).

Then the training step of the whole model: the lecture notebook's step
(``reference.notebook_step``), the loop users write on charmlp's model
(``model(x, y)``, ``loss.backward()``, ``optim.SGD.step()``) and the fused step
(``model.sgd_step``). Every arm is checked against the reference before it is timed; arms
run interleaved in rounds (``harness.timing``), medians reported.

    python benchmarks/bench_tour.py            # writes benchmarks/results/<device>/tour.md and .json
    python benchmarks/bench_tour.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (Block, environment, fmt_time, make_batch, make_params, parse_size, rel_err,  # noqa: E402
                     summarize, timed_rounds)

import charmlp  # noqa: E402
from charmlp import ops  # noqa: E402
from charmlp import reference as R  # noqa: E402

DEFAULT_SIZES = "lecture-32,lecture-4096"


def op_fns(op: str, size, device) -> tuple[dict, list[torch.Tensor]]:
    """``{impl: fn()}`` returning the op's output, and the leaves that get gradients."""
    idx, y, _ = make_batch(size, "names", device)
    p = make_params(size, device)
    if op == "embed_linear_tanh":
        leaves = [p["table"], p["W1"], p["b1"]]
        ref = lambda: R.embed_linear_tanh(idx, *leaves)  # noqa: E731
        ours = lambda: ops.embed_linear_tanh(idx, *leaves)  # noqa: E731
    else:
        logits = R.mlp_logits(idx, *p.values()).detach()
        leaves = [logits]
        ref = lambda: R.cross_entropy(logits, y)  # noqa: E731
        ours = lambda: ops.cross_entropy(logits, y)  # noqa: E731
    return {"reference": ref, "naive": ours, "fast": ours}, [t.requires_grad_() for t in leaves]


def checked(fn, impl: str, leaves, want) -> None:
    """The arm's output and gradients against the reference's, before any timing."""
    with charmlp.use_kernel_impl("naive" if impl == "naive" else "fast"):
        out = fn()
        grads = torch.autograd.grad(out.sum(), leaves)
    for name, got, exp in zip(("output", "gradient 0", "gradient 1", "gradient 2"), (out, *grads), want):
        err = rel_err(got, exp.double())  # relative to the largest magnitude, as the suite's gate
        if err > 1e-4:
            raise SystemExit(f"bench_tour: {impl} {name} is off by {err:.2e} (relative): not timed")


def op_blocks(op: str, size, device) -> dict:
    fns, leaves = op_fns(op, size, device)
    ref_out = fns["reference"]()
    want = (ref_out, *torch.autograd.grad(ref_out.sum(), leaves))
    blocks = {}
    for impl, fn in fns.items():
        checked(fn, impl, leaves, want)
        setup = f"charmlp.set_kernel_impl({'naive' if impl == 'naive' else 'fast'!r})"
        g = {"fn": fn, "leaves": leaves, "charmlp": charmlp}
        blocks[(op, size.name, "forward", impl)] = Block("fn()", setup, g, device)
        blocks[(op, size.name, "forward + backward", impl)] = Block(
            "torch.autograd.grad(fn().sum(), leaves)", setup, g, device)
    return blocks


def step_blocks(size, device) -> dict:
    """The training step three ways, each from the same weights and batch."""
    idx, y, _ = make_batch(size, "names", device)
    p = make_params(size, device)
    # A timed block runs up to 2,000 steps on one batch, and every block starts from the
    # weights the last one left. At the lecture's 0.1 the logits grow until exp underflows
    # to subnormals, which slows the float arithmetic of the arms unequally (the reference
    # step took 5x its time after a few thousand steps, measured); 1e-3 keeps the weights
    # near their start. The work of a step does not depend on the rate.
    lr = 1e-3
    notebook = [p["table"].clone(), p["W1"].t().contiguous(), p["b1"].clone(), p["W2"].t().contiguous(),
                p["b2"].clone()]
    notebook = [t.requires_grad_() for t in notebook]
    model = charmlp.MLPLanguageModel(size.V, size.T, size.E, size.H)
    with torch.no_grad():
        for dst, src in zip(model.parameters(), p.values()):
            dst.copy_(src)
    fused = charmlp.MLPLanguageModel(size.V, size.T, size.E, size.H)
    fused.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=lr)

    def loop_step():
        _, loss = model(idx, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss

    want = R.mlp_loss(idx, y, *p.values())
    arms = {"reference: notebook_step": lambda: R.notebook_step(notebook, idx, y, lr),
            "the loop users write": loop_step,
            "fused: model.sgd_step": lambda: fused.sgd_step(idx, y, lr)}
    for name, fn in arms.items():  # the first step's loss is the reference's (every arm starts from p)
        if rel_err(fn(), want.double()) > 1e-5:
            raise SystemExit(f"bench_tour: {name}'s loss is not the reference's: not timed")
    return {("training step", size.name, "step", name): Block(fn, device=device) for name, fn in arms.items()}


def run(args) -> dict:
    device = torch.device(args.device)
    rounds = 3 if args.quick else args.rounds
    results = []
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    for size in sizes:
        for op in ("embed_linear_tanh", "cross_entropy"):
            results += measure(op_blocks(op, size, device), rounds)
    for size in sizes:
        results += measure(step_blocks(size, device), rounds)
    return {"environment": environment(device, torch.get_num_threads()), "rounds": rounds, "results": results}


def measure(blocks: dict, rounds: int, block_s: float = 0.1) -> list[dict]:
    """Medians of interleaved rounds. Each sample is a block of back-to-back calls lasting
    ``block_s`` (at least 3 calls). Long blocks, because a call that follows another arm's
    block runs on cold caches and sleeping threads: measured here, the fast
    ``embed_linear_tanh`` forward + backward at 4,096 rows took 1.9 ms a call in a row, 2.5 ms
    right after a 15-ms pause, and 2-3x its time in blocks of a few calls among the naive
    kernels' long ones."""
    number = {k: max(3, min(2000, round(block_s / max(b(1), 1e-7)))) for k, b in blocks.items()}
    groups = [[(k, (lambda b=b, n=number[k]: b(n))) for k, b in blocks.items()]]
    got = timed_rounds(groups, rounds, warmup=1)
    # Too few rounds free of other processes' load: all of them count, and the report says so.
    contended = got.kept < rounds
    samples = {k: got.samples[k] + (got.spare[k] if contended else []) for k in blocks}
    return [{"what": k[0], "size": k[1], "measure": k[2], "arm": k[3], "contended": contended,
             **summarize(samples[k])} for k in blocks]


def render(res: dict) -> str:
    env = res["environment"]
    where = env.get("gpu") or env["cpu_model"]
    lines = ["# The kernel tour, timed", "",
             f"`python benchmarks/bench_tour.py`: {where}, {env['threads']} threads, torch {env['torch']}, "
             f"CPU kernels `{env['cpu_capability']}`; names.txt rows where found. Median of {res['rounds']} "
             "interleaved rounds; in brackets, the speed-up over the group's first arm (the reference).", ""]
    groups: dict = {}
    for r in res["results"]:
        groups.setdefault((r["what"], r["size"], r["measure"]), []).append((r["arm"], r["median_s"]))
    ops_rows = [(k, v) for k, v in groups.items() if k[0] != "training step"]
    lines += ["| op | size | measure | reference | naive | fast |", "|---|---|---|---|---|---|"]
    for (what, size, measure), arms in ops_rows:
        base = arms[0][1]
        cells = " | ".join(f"{fmt_time(t)} ({base / t:.2f}x)" for _, t in arms)
        lines.append(f"| `{what}` | {size} | {measure} | {cells} |")
    lines += ["", "| training step | size | time |", "|---|---|---|"]
    for (what, size, measure), arms in groups.items():
        if what == "training step":
            base = arms[0][1]
            for arm, t in arms:
                lines.append(f"| {arm} | {size} | {fmt_time(t)} ({base / t:.2f}x) |")
    if any(r["contended"] for r in res["results"]):
        lines += ["", "Other processes loaded the machine during some groups: their disturbed rounds count too."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", default=DEFAULT_SIZES, help=f"harness sizes (default {DEFAULT_SIZES})")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="smoke test: 3 rounds")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device>)")
    args = ap.parse_args(argv)
    res = run(args)
    out = Path(args.out or Path(__file__).resolve().parent / "results" / torch.device(args.device).type)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tour.json").write_text(json.dumps(res, indent=1))
    (out / "tour.md").write_text(render(res))
    print(render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
