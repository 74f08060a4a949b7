"""Shared machinery of the charmlp benchmark suite, one concern per module:

* :mod:`~harness.sizes`: the sizes (lecture T=3, E=10, H=200, V=27 at several batch sizes;
  the large T=8, E=64, H=1024 model), the batches (rows of names.txt when it can be found,
  otherwise uniform random ids; identical for every arm) and the starting weights;
* :mod:`~harness.arms`: the same model trained the seed notebook's way, with ``F.embedding``
  / ``F.linear`` / ``torch.optim.SGD``, under ``torch.compile``, and with charmlp, plus the
  CUDA-only arms; plain PyTorch comes from ``charmlp.reference``;
* :mod:`~harness.gate`: before any timing, each arm's loss, gradients and one SGD step
  against ``charmlp.reference`` in float64; an arm that does not match is FAILED, not timed;
* :mod:`~harness.timing`: ``timeit`` blocks, rounds in which every arm
  runs each measurement once in a rotating order, contention detection, medians;
* :mod:`~harness.memory`: peak memory of a training step (profiler, fresh-process RSS);
* :mod:`~harness.machine`: the environment every report states, the SGEMM peak (roofline);
* :mod:`~harness.suite`: one size (:func:`bench_size`), all sizes (:func:`run_suite`), the
  embedding-algorithm ablation;
* :mod:`~harness.report` and :mod:`~harness.plots`: results.md / results.json, the PNGs;
* :mod:`~harness.cli`: the options every suite script shares;
* :mod:`~harness.inductor_cache`: one TorchInductor cache per ``ATEN_CPU_CAPABILITY`` (set
  on import, before anything compiles; why is in the module).

The scripts in ``benchmarks/`` import what they use from here; ``run_all.py`` runs the suite.
"""

from .inductor_cache import isolate_inductor_cache

isolate_inductor_cache()

from .arms import (ARMS, DEFAULT_ARMS, REFERENCE_ARM, Arm, CharmlpAlgorithmArm, CharmlpArm, CharmlpGraphArm,
                   CharmlpLoopArm, CompileArm, CompileReduceOverheadArm, CompileTracedArm, FunctionalArm, SeedArm,
                   charmlp_capability_arm)
from .cli import arg_parser, config_from_args, default_outdir
from .gate import GATE_RTOL, check_arm, gate_errors, gate_passes, reference, rel_err
from .machine import cpu_model, environment, loadavg, measure_sgemm_peak, wait_quiet
from .memory import RSS_PROBE_ENV, peak_memory, proc_status_kib, rss_memory, rss_probe
from .report import ablation_table, fmt_bytes, fmt_time, jsonable, memory_table, render_markdown, write_report
from .sizes import (BENCH, DEFAULT_SIZES, LR, MEASUREMENT_LABELS, MEASUREMENTS, PARAM_NAMES, SIZES, Size,
                    find_names_txt, make_batch, make_params, parse_size)
from .suite import ArmResult, Config, bench_size, run_embed_ablation, run_suite
from .timing import Block, Contention, Rounds, choose_inner, summarize, timed_rounds
