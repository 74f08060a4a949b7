"""The ``charmlp`` command: train, lr-find, sample, eval, plot.

Each subcommand is a thin layer over the library (:mod:`charmlp.train`,
:mod:`charmlp.sample`, :mod:`charmlp.plot`); what this module adds is argument parsing and
turning the library's errors into one-line messages with a non-zero exit status
(2: bad input or settings, 130: interrupted) instead of tracebacks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


# --------------------------------------------------------------------------- arguments


def _bounded(kind: type, minimum: float, inclusive: bool):
    """An argparse type: an int or a finite float that is >= minimum (> minimum if not inclusive)."""
    noun = "an integer" if kind is int else "a number"
    bound = f">= {minimum}" if inclusive else f"> {minimum}"

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        ok = v >= minimum if inclusive else v > minimum
        if not ok or v == float("inf"):  # `not ok` also catches nan
            raise argparse.ArgumentTypeError(f"expected {noun} {bound}, got {text}")
        return v

    return parse


_positive_int = _bounded(int, 1, inclusive=True)
_nonneg_int = _bounded(int, 0, inclusive=True)
_positive_float = _bounded(float, 0.0, inclusive=False)
_nonneg_float = _bounded(float, 0.0, inclusive=True)


def _seed(text: str) -> int:
    """An argparse type: a seed, 0 <= seed < 2**63 (torch generators take a signed 64-bit one)."""
    v = _nonneg_int(text)
    if v >= 2**63:
        raise argparse.ArgumentTypeError(f"expected an integer below 2**63 = {2**63}, got {text}")
    return v


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", metavar="PATH", default=None,
                   help="word list, one word per line (default: the embedded names corpus, 5,163 "
                        "US Census first names from the 'names' package)")
    g.add_argument("--keep-case", action="store_true", default=None,
                   help="keep upper case (default: lower-case every word)")
    g.add_argument("--split-seed", type=_nonneg_int, default=None, metavar="S",
                   help="seed of the word shuffle before splitting (default: the lecture's 42)")
    g.add_argument("--test-count", type=_nonneg_int, default=None, metavar="K",
                   help="fixed-size split: K test words, --dev-count dev words (default K), rest "
                        "train (default: the lecture's 80/10/10)")
    g.add_argument("--dev-count", type=_nonneg_int, default=None, metavar="K")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--block-size", type=_positive_int, default=None, metavar="T",
                   help="context length in characters (default: 3)")
    g.add_argument("--emb-dim", type=_positive_int, default=None, metavar="E",
                   help="embedding width (default: 10)")
    g.add_argument("--hidden", type=_positive_int, default=None, metavar="H",
                   help="hidden layer width (default: 200)")
    g.add_argument("--init", choices=("notebook", "default"), default=None,
                   help="parameter init: the notebook's randn draws (default) or nn.Linear's")
    g.add_argument("--seed", type=_seed, default=None, metavar="S",
                   help="seed of the init and minibatch generators, 0 <= S < 2**63 (default: the "
                        "notebook's 2147483647, which reproduces its parameters)")


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--reference", action="store_true", default=None,
                   help="plain PyTorch ops instead of the fused charmlp kernels (same numbers)")
    g.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cpu")
    g.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="torch intra-op threads (default: torch's choice)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="charmlp",
        description="Character-level MLP language model (Bengio et al. 2003; the makemore MLP "
                    "lecture) with fused CPU/CUDA kernels.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # ---- train
    p = sub.add_parser("train", help="train a model (defaults: the lecture's final model)",
                       description="Train the MLP language model. Defaults are the lecture's final "
                                   "model: block 3, emb 10, hidden 200, 200,000 steps of batch 32, "
                                   "SGD at 0.1 then 0.01 from step 100,000, notebook init. Works "
                                   "unchanged under torchrun --nproc-per-node N (DDP); there Ctrl-C "
                                   "or SIGTERM on any rank stops all ranks at the same step with a "
                                   "checkpoint, and a rank that waits longer than "
                                   "$CHARMLP_DIST_TIMEOUT seconds (default 60) for a dead or stopped "
                                   "peer ends the job. A run directory belongs to one process at a "
                                   "time (a lock file, RUN_DIR/.lock).")
    _add_data_args(p)
    _add_model_args(p)
    g = p.add_argument_group("optimization")
    g.add_argument("--preset", choices=tuple(_presets()), default=None, metavar="NAME",
                   help="start from a named recipe; flags given with it override its settings "
                        "(--steps replaces its time budget). lecture: the defaults (the lecture's "
                        "model); best-5min: the best model found for 5 minutes on 2 CPU cores "
                        "on names.txt (block 8, emb 32, hidden 1024, batch 256, AdamW 2e-3 -> 1e-5 "
                        "cosine, weight decay 0.1, --time-budget 300)")
    g.add_argument("--steps", type=_positive_int, default=None, help="default: 200000")
    g.add_argument("--time-budget", type=_positive_float, default=None, metavar="SECONDS",
                   help="train for SECONDS of wall time instead of --steps: the step rate (and the "
                        "cost of an evaluation) is measured in the first ~1%% of the budget, then the "
                        "number of steps is fixed so that the whole run, its periodic evaluations, "
                        "checkpoints and final report included, ends on time, with the learning-rate "
                        "schedule laid over it (recorded in the run's config: --resume finishes the "
                        "same steps). Not with --steps")
    g.add_argument("--batch-size", type=_positive_int, default=None, metavar="B",
                   help="minibatch size (per process under torchrun; default: 32)")
    g.add_argument("--optimizer", choices=("sgd", "adamw"), default=None, help="default: sgd")
    g.add_argument("--lr-schedule", choices=("step", "cosine", "constant"), default=None,
                   help="step: --lr, then --lr-final from half-way (the lecture); cosine: --lr "
                        "decaying to --lr-final; constant: --lr (default: step)")
    g.add_argument("--lr", type=_positive_float, default=None,
                   help="initial learning rate (default: 0.1 for sgd, 0.01 for adamw)")
    g.add_argument("--lr-final", type=_nonneg_float, default=None,
                   help="final learning rate (default: 0.01 for sgd, 0.001 for adamw)")
    g.add_argument("--weight-decay", type=_nonneg_float, default=None,
                   help="default: 0 for sgd, 0.01 for adamw (sgd with decay uses torch.optim.SGD)")
    _add_runtime_args(p)
    g = p.add_argument_group("output")
    g.add_argument("--out", metavar="RUN_DIR", default=None,
                   help="run directory (default: a new runs/YYYYmmdd-HHMMSS-XXXXXX, XXXXXX random)")
    g.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue the run in RUN_DIR (or RUN_DIR/checkpoint.pt) from its "
                        "checkpoint (its settings are kept; "
                        "only --steps, --threads, --device, --reference, --eval-every, "
                        "--checkpoint-every, --eval-batch-size, --samples may change)")
    g.add_argument("--eval-every", type=_nonneg_int, default=None, metavar="N",
                   help="evaluate the full train and dev loss every N steps, 0 = only at the end "
                        "(default: 20000)")
    g.add_argument("--checkpoint-every", type=_nonneg_int, default=None, metavar="N",
                   help="write a checkpoint every N steps, 0 = only at the end (default: 10000)")
    g.add_argument("--eval-batch-size", type=_positive_int, default=None, metavar="N",
                   help="rows per evaluation batch (default: 65536)")
    g.add_argument("--samples", type=_nonneg_int, default=None, dest="num_samples", metavar="N",
                   help="words to sample at the end (default: 10)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    # ---- lr-find
    p = sub.add_parser("lr-find", help="the lecture's learning-rate sweep",
                       description="One SGD step at each of 10**linspace(MIN, MAX, NUM) (the lecture: "
                                   "-3, 0, 1000), from the notebook init; plots loss against log10 "
                                   "learning rate and prints a suggested rate.")
    _add_data_args(p)
    _add_model_args(p)
    p.add_argument("--batch-size", type=_positive_int, default=None, metavar="B", help="default: 32")
    _add_runtime_args(p)
    p.add_argument("--lr-min-exp", type=float, default=-3.0, metavar="MIN")
    p.add_argument("--lr-max-exp", type=float, default=0.0, metavar="MAX")
    p.add_argument("--num", type=_positive_int, default=1000, help="number of rates (default: 1000)")
    p.add_argument("--out", metavar="PNG", default="runs/lr_find.png",
                   help="plot file (default: runs/lr_find.png)")
    p.set_defaults(func=cmd_lr_find)

    # ---- sample
    p = sub.add_parser("sample", help="sample new words from a trained run")
    p.add_argument("run", metavar="RUN_DIR", help="run directory (or a checkpoint file)")
    p.add_argument("-n", "--num", type=_nonneg_int, default=20, help="number of words (default: 20)")
    p.add_argument("--seed", type=_seed, default=None,
                   help="sampling seed, 0 <= seed < 2**63; the same seed gives the same words "
                        "(default: the notebook's 2147483657)")
    p.add_argument("--temperature", type=_positive_float, default=1.0,
                   help="divide the logits by T (default: 1)")
    p.add_argument("--top-k", type=_positive_int, default=None, metavar="K",
                   help="sample only from the K most likely characters")
    p.add_argument("--prefix", default="", help="start every word with these characters")
    p.add_argument("--max-len", type=_positive_int, default=64,
                   help="cut words at this length (default: 64)")
    p.add_argument("--reference", action="store_true", help="plain PyTorch ops")
    p.set_defaults(func=cmd_sample)

    # ---- eval
    p = sub.add_parser("eval", help="losses of a trained run on each split (or on --data)")
    p.add_argument("run", metavar="RUN_DIR", help="run directory (or a checkpoint file)")
    p.add_argument("--data", metavar="PATH", default=None,
                   help="evaluate on this word list instead (must use the run's characters)")
    p.add_argument("--batch-size", type=_positive_int, default=65_536)
    p.add_argument("--reference", action="store_true", help="plain PyTorch ops")
    p.add_argument("--threads", type=_positive_int, default=None)
    p.add_argument("--json", action="store_true", help="print the losses as JSON")
    p.set_defaults(func=cmd_eval)

    # ---- plot
    p = sub.add_parser("plot", help="loss curve and embedding PNGs of a run")
    p.add_argument("run", metavar="RUN_DIR")
    p.add_argument("--out-dir", default=None, help="where to write the PNGs (default: RUN_DIR)")
    p.set_defaults(func=cmd_plot)
    return parser


_TRAIN_KEYS = ("data", "block_size", "emb_dim", "hidden", "steps", "time_budget", "batch_size", "optimizer",
               "lr_schedule", "lr", "lr_final", "weight_decay", "seed", "init", "reference",
               "device", "threads", "split_seed", "test_count", "dev_count", "eval_every",
               "checkpoint_every", "eval_batch_size", "num_samples")


def _given(args: argparse.Namespace, keys) -> dict:
    """The settings given on the command line (every default is None)."""
    out = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    if getattr(args, "keep_case", None):
        out["lowercase"] = False
    return out


# --------------------------------------------------------------------------- commands


def _presets():
    from .train import PRESETS

    return PRESETS


def cmd_train(args) -> int:
    from .train import TrainConfig, preset_config, train
    from .train.config import _check_length
    from .train.rundir import _resume_dir

    given = _given(args, _TRAIN_KEYS)
    if args.resume is not None:
        if args.out is not None and Path(args.out) != _resume_dir(args.resume):
            raise _Usage("--resume continues a run in place; drop --out")
        if args.preset is not None:
            raise _Usage("--resume keeps the run's settings; drop --preset")
        train(TrainConfig(), resume=args.resume, overrides=given, progress=not args.quiet)
    elif args.preset is not None:
        train(preset_config(args.preset, **given), args.out, progress=not args.quiet)
    else:
        _check_length(given)
        train(TrainConfig(**given), args.out, progress=not args.quiet)
    return 0


def cmd_lr_find(args) -> int:
    from .plot import plot_lr_find
    from .train import TrainConfig, lr_find

    cfg = TrainConfig(**_given(args, ("data", "block_size", "emb_dim", "hidden", "batch_size",
                                      "seed", "init", "reference", "device", "threads",
                                      "split_seed", "test_count", "dev_count")))
    sweep = lr_find(cfg, args.lr_min_exp, args.lr_max_exp, args.num)
    out = Path(args.out)
    with _writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        plot_lr_find(sweep, out)
    print(f"wrote {out}")
    return 0


@contextlib.contextmanager
def _writing(path: Path):
    """Turns an OSError while writing ``path`` (read-only or full disk, a path through a
    file) into a WriteError: a one-line message naming the path."""
    from .checkpoint import WriteError

    try:
        yield
    except OSError as e:
        raise WriteError.from_os_error(e, path) from e


def _load_run(run: str, reference: bool):
    from .checkpoint import load_checkpoint, model_from_checkpoint
    from .data import Split, Vocab

    ckpt = load_checkpoint(run)
    model = model_from_checkpoint(ckpt, fused=False if reference else None)
    model.eval()
    return ckpt, model, Vocab.from_dict(ckpt["vocab"]), Split.from_dict(ckpt["split"])


def cmd_sample(args) -> int:
    import torch

    from .sample import DEFAULT_SAMPLE_SEED, format_samples, sample_words

    from .data import normalize_word

    ckpt, model, vocab, split = _load_run(args.run, args.reference)
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        raise _Failed(f"{args.run}: the model's parameters are not finite (the run diverged); "
                      f"there is nothing to sample")
    prefix = ""
    if args.prefix.strip():
        # The prefix goes through the run's character policy (NFC, lower case), like its data.
        prefix, reason = normalize_word(args.prefix, ckpt["train_config"].get("lowercase", True))
        if reason:
            raise _Usage(f"--prefix {args.prefix!r} {reason}")
    seed = DEFAULT_SAMPLE_SEED if args.seed is None else args.seed
    samples = sample_words(model, vocab, args.num, torch.Generator().manual_seed(seed),
                           temperature=args.temperature, top_k=args.top_k, prefix=prefix,
                           train_words=split.train, max_len=args.max_len)
    print(f"{len(samples)} samples from {args.run} (step {ckpt['step']:,}; seed {seed}, temperature "
          f"{args.temperature:g}" + (f", top-k {args.top_k}" if args.top_k else "") + "):")
    print(format_samples(samples))
    return 0


def cmd_eval(args) -> int:
    import torch

    from .checkpoint import json_safe
    from .data import build_examples, read_words
    from .train import evaluate, format_losses, loss_report

    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt, model, vocab, split = _load_run(args.run, args.reference)
    T = model.block_size
    if args.data is not None:
        words = read_words(args.data, lowercase=ckpt["train_config"].get("lowercase", True))
        parts = {Path(args.data).name[:12]: words}
    else:
        parts = split.parts()
    reports = {}
    for name, words in parts.items():
        X, Y = build_examples(words, vocab, T, source=args.data or f"{name} split")
        reports[name] = loss_report(evaluate(model, X, Y, args.batch_size), X.shape[0])
    if args.json:  # (a diverged run's inf/nan as strings: strict JSON)
        print(json.dumps(json_safe({"run": str(args.run), "step": ckpt["step"], "losses": reports}),
                         indent=2, allow_nan=False))
    else:
        print(f"{args.run} at step {ckpt['step']:,} (nats per character):")
        print(format_losses(reports))
    return 0


def cmd_plot(args) -> int:
    from .checkpoint import load_checkpoint
    from .plot import plot_embedding, plot_loss_curve

    run = Path(args.run)
    out_dir = Path(args.out_dir) if args.out_dir else run
    ckpt = load_checkpoint(run)  # (first: a mistyped RUN_DIR must not be created)
    with _writing(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if (run / "metrics.csv").exists():
        with _writing(out_dir / "loss.png"):
            written.append(plot_loss_curve(run, out_dir / "loss.png"))
    else:
        print(f"note: {run / 'metrics.csv'} not found; no loss curve", file=sys.stderr)
    from .data import Vocab

    vocab = Vocab.from_dict(ckpt["vocab"])
    table = ckpt["model"]["state_dict"]["embed.table"]
    with _writing(out_dir / "embedding.png"):
        written.append(plot_embedding(table, vocab.itos, out_dir / "embedding.png",
                                      title=f"character embeddings of {run.name} (step {ckpt['step']:,})"))
    for w in written:
        print(f"wrote {w}")
    return 0


# --------------------------------------------------------------------------- entry point


class _Usage(Exception):
    """A bad combination of command-line arguments."""


class _Failed(Exception):
    """A command that cannot do what was asked (a one-line error, exit status 2)."""


def _run(argv) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .checkpoint import CheckpointError, RunDirInUse, WriteError
    from .data import DataError, VocabError
    from .plot import PlotError
    from .train import ConfigError, PeerLost, TrainingDiverged, TrainingInterrupted

    prefix = f"charmlp {args.command}: error:"
    try:
        return args.func(args)
    except _Usage as e:
        parser.exit(EXIT_ERROR, f"{prefix} {e}\n")
    except TrainingDiverged as e:  # (every torchrun rank raises it: rank 0 tells)
        if _is_rank0():
            print(f"{prefix} {e}", file=sys.stderr)
        return EXIT_ERROR
    except (DataError, VocabError, CheckpointError, ConfigError, FloatingPointError, WriteError,
            RunDirInUse, PlotError, PeerLost, _Failed) as e:
        print(f"{prefix} {e}", file=sys.stderr)
        return EXIT_ERROR
    except FileNotFoundError as e:  # e.g. plot without metrics
        print(f"{prefix} {e}", file=sys.stderr)
        return EXIT_ERROR
    except TrainingInterrupted as e:
        if _is_rank0():
            print(f"charmlp {args.command}: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print(f"charmlp {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _is_rank0() -> bool:
    """Rank 0 of a torchrun job, or a single process."""
    return int(os.environ.get("WORLD_SIZE", "1")) <= 1 or os.environ.get("RANK", "0") == "0"


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit status.

    Under torchrun (``WORLD_SIZE`` > 1) the process ends with ``os._exit`` once the
    command has finished, the process group is destroyed and the output is flushed: the
    interpreter's own shutdown can race with the process group's background threads
    ("terminate called without an active exception"), which would turn a finished run into
    a failed one.
    """
    code = _run(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
