#!/usr/bin/env python
"""Question: how much memory does one training step of each arm need at each size?

    python benchmarks/bench_memory.py [--sizes lecture-full] [--arms seed,compile,charmlp]

Gates every arm (wrong arms are not measured), then measures the peak of one training
step: on CPU with torch.profiler's allocator events (tensor bytes live above the level
before the step), on CUDA with torch.cuda.max_memory_allocated(). No timing.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ARMS, DEFAULT_ARMS, arg_parser, bench_size, config_from_args, memory_table  # noqa: E402


def main(argv=None):
    p = arg_parser(__doc__.split("\n\n")[0])
    args = p.parse_args(argv)
    cfg, sizes, arms = config_from_args(args)
    cfg.memory = True
    registry = ARMS
    names = arms or [n for n in DEFAULT_ARMS if cfg.device.type == "cuda" or not registry[n].cuda_only]
    res = {"arms": names, "sizes": [bench_size(s, [registry[n] for n in names], cfg, time_it=False) for s in sizes]}
    print()
    print("\n".join(memory_table(res)))


if __name__ == "__main__":
    main()
