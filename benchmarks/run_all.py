#!/usr/bin/env python
"""Runs the whole charmlp benchmark suite and writes benchmarks/results/<device>/.

    python benchmarks/run_all.py                 # the full CPU suite (~10 min on 2 cores)
    python benchmarks/run_all.py --quick         # smoke run (1 warm-up round, 2-3 timed rounds)
    python benchmarks/run_all.py --device cuda   # the CUDA suite (adds the reduce-overhead and CUDA-graph arms)

Writes results.md (tables: training step, forward, backward, forward+backward with speedups
vs the seed notebook's eager code; roofline; peak memory; correctness gate; the embedding
algorithm ablation), results.json (everything, raw samples included) and the PNG plots
time_vs_batch.png and speedup.png.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (Config, arg_parser, config_from_args, default_outdir, parse_size, render_markdown,  # noqa: E402
                     run_embed_ablation, run_suite, wait_quiet, write_report)


def main(argv: list[str] | None = None) -> int:
    p = arg_parser(__doc__.split("\n\n")[0])
    p.add_argument("--no-ablation", action="store_true", help="skip the embedding-algorithm ablation")
    p.add_argument("--ablation-sizes", default="lecture-32,lecture-256,lecture-4096,lecture-32768,large-4096",
                   help="sizes of the embedding-algorithm ablation (CPU only)")
    p.add_argument("--no-output-layer", action="store_true", help="skip the output-layer (linear + loss) op benchmark")
    p.add_argument("--output-layer-sizes", default="lecture-32,lecture-4096,lecture-full,large-4096")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                   help="first wait (up to SECONDS) until the 1-minute load average is below 0.5: "
                        "CPU timings on a busy machine are meaningless")
    p.add_argument("--from-json", default=None, metavar="RESULTS_JSON",
                   help="run nothing: re-render results.md and the plots from an earlier results.json")
    args = p.parse_args(argv)
    if args.from_json:
        import json

        src = Path(args.from_json)
        res = json.loads(src.read_text())
        out = Path(args.out) if args.out else src.parent
        files = write_report(res, out, res.get("ablation"), plots=not args.no_plots, command=res.get("command"))
        print(f"wrote {', '.join(str(f) for f in files.values())}")
        return 0
    if args.wait_quiet > 0:
        wait_quiet(args.wait_quiet)
    t0 = time.perf_counter()
    cfg, sizes, arms = config_from_args(args)
    res = run_suite(sizes, arms, cfg)
    ablation = None
    if not args.no_ablation and cfg.device.type == "cpu":
        abl_sizes = [parse_size(s) for s in args.ablation_sizes.split(",")] if args.ablation_sizes else []
        if args.quick and args.sizes:
            abl_sizes = sizes[:1]
        if abl_sizes:
            print("ablation: charmlp CPU embedding algorithm")
            abl_cfg = Config(**{**cfg.__dict__, "budget_s": min(cfg.budget_s, 6.0), "memory": False})
            ablation = run_embed_ablation(abl_sizes, abl_cfg)
    if not args.no_output_layer:
        import bench_output_layer as OL

        print("output layer: F.linear + F.cross_entropy vs charmlp's fused ops")
        ol_sizes = sizes[:1] if args.quick and args.sizes else [parse_size(s) for s in args.output_layer_sizes.split(",")]
        ol_cfg = Config(**{**cfg.__dict__, "budget_s": min(cfg.budget_s, 5.0)})
        res["output_layer"] = OL.bench_output_layer(ol_sizes, ol_cfg)
        res["output_layer_table"] = OL.output_layer_table(res["output_layer"])
    res["total_s"] = time.perf_counter() - t0
    out = Path(args.out) if args.out else default_outdir(cfg.device)
    cmd = "python benchmarks/run_all.py" + ("" if argv is None and len(sys.argv) == 1 else " " + shlex.join(sys.argv[1:] if argv is None else argv))
    res["command"] = cmd
    files = write_report(res, out, ablation, plots=not args.no_plots, command=cmd)
    print(render_markdown(res, ablation, None, cmd))
    print(f"wrote {', '.join(str(f) for f in files.values())} in {res['total_s']:.0f} s")
    failed = [(s["name"], a["name"]) for s in res["sizes"] for a in s["arms"] if a["status"] in ("FAILED", "ERROR")]
    if failed:
        print(f"arms that failed the gate or crashed: {failed}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
