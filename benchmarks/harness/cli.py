"""The options every suite script shares (``--quick``, ``--sizes``, ``--arms``, ``--threads`` ...)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .arms import ARMS, DEFAULT_ARMS
from .sizes import BENCH, DEFAULT_SIZES, SIZES, Size, parse_size
from .suite import Config


def arg_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="smoke test: 1 warm-up round, 2-3 timed rounds")
    p.add_argument("--sizes", default=None,
                   help=f"comma-separated sizes: names ({', '.join(SIZES)}) or T:E:H:V:B (default: {','.join(DEFAULT_SIZES)})")
    p.add_argument("--arms", default=None,
                   help=f"comma-separated arms ({', '.join(ARMS)}); default: {','.join(DEFAULT_ARMS)} "
                        "(CUDA-only arms are skipped on CPU)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--budget", type=float, default=None, help="timed seconds per size (default 20, quick 0.5)")
    p.add_argument("--repeats", type=int, default=None, help="fixed number of timed rounds (overrides --budget)")
    p.add_argument("--block-ms", type=float, default=None,
                   help="a timed sample is a block of back-to-back calls of one arm lasting about this long "
                        "(default 1 ms; 0 = one call per sample, i.e. strict per-call interleaving)")
    p.add_argument("--data", default="names", help="names (names.txt when found, else random), random, or a word-list path")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--rss-sizes", default=None,
                   help="sizes whose step memory is also measured as resident-set growth in fresh processes "
                        "(CPU; default lecture-4096,lecture-full,large-4096 where run; 'none' for none)")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device>)")
    return p


def config_from_args(args) -> tuple[Config, list[Size], list[str] | None]:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    kw = {"data": args.data, "memory": not args.no_memory}
    cfg = Config.quick_config(device, threads, **kw) if args.quick else Config(device=device, threads=threads, **kw)
    if args.budget is not None:
        cfg.budget_s = args.budget
    if args.block_ms is not None:
        cfg.block_s = args.block_ms / 1e3
    if args.rss_sizes is not None:
        cfg.rss_sizes = tuple(parse_size(x).name for x in args.rss_sizes.split(",") if x and x != "none")
    if args.repeats is not None:
        cfg.min_repeats = cfg.max_repeats = args.repeats
    sizes = [parse_size(s) for s in (args.sizes.split(",") if args.sizes else DEFAULT_SIZES)]
    arms = [a.strip() for a in args.arms.split(",")] if args.arms else None
    return cfg, sizes, arms


def default_outdir(device: torch.device) -> Path:
    return BENCH / "results" / device.type
