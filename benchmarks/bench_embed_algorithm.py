#!/usr/bin/env python
"""Question: which of charmlp's CPU algorithms for the embedding + first layer is faster at
each size -- the direct gather-GEMM or the folded gather-sum (P_j = table @ W1_j^T) -- and
does the C++ cost model ("auto") pick the faster one?

    python benchmarks/bench_embed_algorithm.py [--sizes lecture-32,lecture-4096] [--quick]

Forces each algorithm with charmlp._C._set_embed_algorithm, gates it against the float64
reference, then times forward / backward / forward+backward / training step interleaved.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ablation_table, arg_parser, config_from_args, run_embed_ablation  # noqa: E402

DEFAULT = "lecture-32,lecture-256,lecture-4096,lecture-32768,lecture-full,large-4096"


def main(argv=None):
    p = arg_parser(__doc__.split("\n\n")[0])
    args = p.parse_args(argv)
    if args.sizes is None:
        args.sizes = DEFAULT
    cfg, sizes, _ = config_from_args(args)
    if cfg.device.type != "cpu":
        raise SystemExit("the embedding-algorithm switch is a CPU-kernel setting")
    cfg.memory = False
    abl = run_embed_ablation(sizes, cfg)
    print()
    print("\n".join(ablation_table(abl)))


if __name__ == "__main__":
    main()
