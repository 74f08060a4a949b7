#!/usr/bin/env python
"""Question: what is this machine's float32 GEMM peak (the roofline the arms are measured
against)?

    python benchmarks/bench_sgemm.py [--device cpu|cuda] [--threads N] [--n 2048 4096]

Times torch.mm of n x n float32 matrices (median of 7 after 2 warm-ups) and prints GFLOP/s.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import cpu_model, fmt_time, measure_sgemm_peak  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--n", type=int, nargs="*", default=None, help="matrix sizes (default 1024 2048 4096 on CPU)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    ns = args.n or ([1024, 2048, 4096] if dev.type == "cpu" else [4096, 8192])
    print(f"{cpu_model()}; torch {torch.__version__}; {torch.get_num_threads()} threads")
    print("| n | median | GFLOP/s (median) | GFLOP/s (best) |\n|---|---|---|---|")
    for n in ns:
        r = measure_sgemm_peak(dev, n=n)
        print(f"| {n} | {fmt_time(r['median_s'])} | {r['gflops']:.1f} | {r['best_gflops']:.1f} |")


if __name__ == "__main__":
    main()
