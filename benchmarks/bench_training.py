#!/usr/bin/env python
"""Question: how fast is each arm at each size -- forward, backward, forward+backward and a
full SGD training step -- and how close does it come to this machine's SGEMM peak?

    python benchmarks/bench_training.py [--quick] [--sizes lecture-32,lecture-full] [--arms seed,charmlp]

Prints the Markdown report (timing tables, roofline, correctness gate) to stdout; pass
--out DIR to also write results.md / results.json / plots there. run_all.py runs this
together with the other questions.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import arg_parser, config_from_args, render_markdown, run_suite, write_report  # noqa: E402


def main(argv=None):
    args = arg_parser(__doc__.split("\n\n")[0]).parse_args(argv)
    cfg, sizes, arms = config_from_args(args)
    if args.no_memory:
        cfg.memory = False
    res = run_suite(sizes, arms, cfg)
    if args.out:
        write_report(res, Path(args.out))
    print(render_markdown(res))


if __name__ == "__main__":
    main()
