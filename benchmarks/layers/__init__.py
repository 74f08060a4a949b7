"""``bench_layers.py``'s parts: the shape grid and inputs (:mod:`~layers.cases`), the arms and
their gate (:mod:`~layers.arms`), gating and timing one case and its memory probes
(:mod:`~layers.bench`), the issue's targets (:mod:`~layers.targets`), layers.md / .json
(:mod:`~layers.report`) and layers.png (:mod:`~layers.plot`). Timing, contention and the
fresh-process memory method are the suite's (:mod:`harness`)."""
