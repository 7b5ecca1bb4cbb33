"""The analysis tools' flags: attack_convergence.py (validate.py's flags plus the study's),
``python -m src.plots`` and benchmark.py (timm's benchmark flags plus adversarial training).

attack_convergence.py takes every data, model and normalization flag of validate.py; it changes
some of their defaults and help texts through the parser's ``overrides`` (no argparse internals)
and refuses those that do not apply here (``--results-file``, ``--log-wandb``, ``--real-labels``).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from src.arg_parser.common import FOLD_BN_HELP, CliParser, check_input_size
from src.arg_parser.evaluate import build_validate_parser, check_validate_args
from src.arg_parser.values import INPUT_PATH, OUTPUT_PATH, REQUIRED_OUTPUT_PATH, Choice, must, nonneg_float, nonneg_int, positive_int, rate
from src.errors import UsageError

__all__ = ["CONVERGENCE_DEFAULT_STEPS", "CONVERGENCE_DEFAULT_RUNS", "CONVERGENCE_DEFAULT_POINTS",
           "build_convergence_parser", "parse_convergence_args", "check_convergence_args", "build_plots_parser", "parse_plots_args",
           "BENCHES", "PRECISIONS", "build_benchmark_parser", "parse_benchmark_args", "check_device", "check_compile_backend"]

# ----------------------------------------------------------------------------------------------
# attack_convergence.py

CONVERGENCE_DEFAULT_STEPS = (0, 1, 2, 5, 10, 50, 100, 200, 500)
CONVERGENCE_DEFAULT_RUNS = 20
CONVERGENCE_DEFAULT_POINTS = 100
# validate.py flags that do not apply here: dest -> (flag, what to use instead)
_CONVERGENCE_REFUSED = {"results_file": ("--results-file", "--output-file"), "log_wandb": ("--log-wandb", None),
                        # points are chosen and attacked against the dataset's own labels
                        "real_labels": ("--real-labels", None)}
_CONVERGENCE_OVERRIDES = {
    **{dest: {"default": None, "help": argparse.SUPPRESS} for dest in _CONVERGENCE_REFUSED},
    "attack": {"default": "pgd", "help": "attack of the study: only pgd"},
    "attack_steps": {"help": "sets the default step size 1.5 * eps / K used for every step count (the original's; "
                             "one value)"},
    "num_examples": {"help": "same as --n-points"},
    "seed": {"help": "restart r is seeded with seed + r (the CSV's seed column)"},
}


def build_convergence_parser() -> CliParser:
    """validate.py's parser (data, model, normalization, attack budget) plus the study's flags."""
    p = build_validate_parser("attack_convergence.py", "Per-example robust loss against the number of PGD steps, "
                              "over random restarts, on correctly classified points",
                              overrides=_CONVERGENCE_OVERRIDES)
    g = p.add_argument_group("Attack convergence")
    g.add_argument("--n-points", type=positive_int(), default=None, metavar="N",
                   help=f"number of correctly classified points, first in dataset order (default "
                        f"{CONVERGENCE_DEFAULT_POINTS}; a multiple of --batch-size)")
    g.add_argument("--runs", type=positive_int(), default=CONVERGENCE_DEFAULT_RUNS, metavar="R",
                   help="random restarts per point")
    g.add_argument("--steps-to-try", type=nonneg_int(), nargs="+", default=list(CONVERGENCE_DEFAULT_STEPS),
                   metavar="K", help="PGD step counts whose loss is recorded")
    g.add_argument("--tie-step-size", action="store_true", default=False,
                   help="step size 1.5 * eps / k for PGD-k (each k its own attack) instead of the original's "
                        "1.5 * eps / --attack-steps for every k")
    g.add_argument("--one-instance", action="store_true", default=False,
                   help="record the loss after every iteration 0 .. max(--steps-to-try), batch size 1")
    g.add_argument("--output-file", default=None, type=OUTPUT_PATH, metavar="PATH",
                   help="results CSV (default ./<model>.csv); its resumable state goes to <PATH>.state/")
    return p


def parse_convergence_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and check the attack_convergence CLI (``argv`` instead of ``sys.argv[1:]`` when given)."""
    from src.eval_config import parse_recording_explicit

    parser = build_convergence_parser()
    args = parse_recording_explicit(parser, sys.argv[1:] if argv is None else argv)
    parser.check(check_convergence_args, args)
    return args


def check_convergence_args(args: argparse.Namespace) -> None:
    """Refuse what cannot work and resolve the derived settings (n_points, steps, batch size)."""
    for dest, (flag, instead) in _CONVERGENCE_REFUSED.items():
        if getattr(args, dest, None) is not None:
            raise UsageError(f"{flag} is not supported by attack_convergence.py" + (f"; use {instead}" if instead else ""))
    if args.attack != "pgd":
        raise UsageError(f"attack_convergence.py studies PGD; --attack '{args.attack}' is not supported")
    if len(args.attack_steps) != 1:
        raise UsageError("--attack-steps takes one value here (it sets the step size 1.5 * eps / K); the step "
                         "counts to record are --steps-to-try")
    if args.n_points is not None and args.num_examples is not None and args.n_points != args.num_examples:
        raise UsageError(f"--n-points {args.n_points} and --num-examples {args.num_examples} disagree; pass one")
    args.n_points = args.n_points or args.num_examples or CONVERGENCE_DEFAULT_POINTS
    args.num_examples = None  # validate's meaning (a batch limit) does not apply
    if args.n_points < 1 or args.runs < 1:
        raise UsageError(f"--n-points and --runs must be >= 1, got {args.n_points} and {args.runs}")
    if any(k < 0 for k in args.steps_to_try) or len(set(args.steps_to_try)) != len(args.steps_to_try):
        raise must("--steps-to-try", "distinct integers >= 0", list(args.steps_to_try))
    from src.eval_config import flag_given  # here: eval_config imports this package

    if args.tie_step_size and (args.attack_lr is not None or args.one_instance or flag_given(args, "attack_steps", [10])):
        raise UsageError("--tie-step-size gives each step count its own step size; it cannot be combined with "
                         "--attack-lr (one step size), --attack-steps (the K of the shared step 1.5 * eps / K) or "
                         "--one-instance (one trajectory)")
    if args.one_instance:
        args.steps_to_try = list(range(max(args.steps_to_try) + 1))
        args.batch_size = 1
    args.steps_to_try = sorted(args.steps_to_try)
    args.batch_size = min(args.batch_size, args.n_points)
    check_validate_args(args)
    if args.n_points % args.batch_size:
        raise UsageError(f"--n-points {args.n_points} must be a multiple of --batch-size {args.batch_size}")


# ----------------------------------------------------------------------------------------------
# python -m src.plots


def build_plots_parser(kinds: Sequence[str]) -> CliParser:
    """``KIND CSV... --out DIR``; ``kinds`` are src.plots' figure kinds."""
    p = CliParser(prog="python -m src.plots", description="Draw the analyses' figures (PNG + PDF) from their CSVs.")
    p.add_argument("kind", metavar="KIND", help=f"one of: {', '.join(kinds)}")
    p.add_argument("csv", nargs="+", metavar="CSV", help="input CSV file(s); one line (or model) per file")
    p.add_argument("--out", required=True, type=REQUIRED_OUTPUT_PATH, metavar="DIR", help="output folder")
    p.add_argument("--labels", nargs="+", default=None, metavar="L", help="one label per CSV (default: file names)")
    p.add_argument("--metric", default=None, metavar="COLUMN",
                   help="learning-curves: summary.csv column (default eval_robust_top1; a W&B export draws its "
                        "own metric, which must match when given)")
    p.add_argument("--point", type=nonneg_int(), default=None, metavar="ID",
                   help="convergence: point id to draw (default: random, seed 42)")
    return p


def parse_plots_args(kinds: Sequence[str], argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse ``python -m src.plots``'s command line; an unknown KIND names the kinds."""
    args = build_plots_parser(kinds).parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.kind not in kinds:
        raise UsageError(f"unknown plot kind '{args.kind}': choose one of {', '.join(kinds)}")
    for flag, value, kind in (("--metric", args.metric, "learning-curves"), ("--point", args.point, "convergence")):
        if value is not None and args.kind != kind:  # never an option silently ignored
            raise UsageError(f"{flag} applies to {kind} only, not to {args.kind}")
    return args


# ----------------------------------------------------------------------------------------------
# benchmark.py

BENCHES = ("inference", "train", "both", "adv-train", "all")
PRECISIONS = ("float32", "float16", "bfloat16", "amp")


def build_benchmark_parser() -> CliParser:
    """timm's benchmark flags (original-behaviour.md §1.7) plus adversarial training and torch.compile."""
    p = CliParser(prog="benchmark.py", description="Inference / training / adversarial-training speed of timm models")
    p.add_argument("--model-list", default="", type=INPUT_PATH, metavar="FILE", help="text file of model names (bulk mode)")
    p.add_argument("--model", "-m", default="resnet50", metavar="NAME", help="model name, or a wildcard (bulk mode)")
    p.add_argument("--bench", default="both", type=Choice(names=BENCHES), metavar="WHAT",
                   help="what to time: " + ", ".join(BENCHES) + " ('both': inference and train)")
    p.add_argument("--results-file", default="", type=OUTPUT_PATH, metavar="PATH",
                   help="write results here: .json gives JSON, anything else CSV (bulk default ./benchmark.csv)")
    p.add_argument("--num-warm-iter", type=nonneg_int(), default=10, metavar="N", help="untimed warm-up steps")
    p.add_argument("--num-bench-iter", type=positive_int(), default=40, metavar="N", help="timed steps")
    p.add_argument("-b", "--batch-size", type=positive_int(), default=256, metavar="N", help="batch size")
    p.add_argument("--img-size", type=positive_int(), default=None, metavar="N", help="input image size")
    p.add_argument("--input-size", type=positive_int(), nargs=3, default=None, metavar="N",
                   help="input dimensions C H W")
    p.add_argument("--use-train-size", action="store_true", default=False,
                   help="the model's training input size instead of its test size")
    p.add_argument("--num-classes", type=positive_int(), default=None, metavar="N", help="number of classes")
    p.add_argument("--gp", default=None, metavar="POOL", help="global pool type")
    p.add_argument("--channels-last", action="store_true", default=False, help="channels-last memory layout")
    p.add_argument("--fold-bn", action="store_true", default=False, help=FOLD_BN_HELP + "; --bench inference only")
    p.add_argument("--amp", action="store_true", default=False, help="same as --precision amp")
    p.add_argument("--amp-dtype", default="bfloat16", type=Choice(names=("bfloat16", "float16")), metavar="DTYPE",
                   help="autocast dtype for amp: bfloat16 or float16")
    p.add_argument("--precision", default="float32", type=Choice(names=PRECISIONS), metavar="NAME",
                   help="numeric precision: " + ", ".join(PRECISIONS))
    p.add_argument("--torchscript", action="store_true", default=False, help="torch.jit.script the model")
    p.add_argument("--torch-compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the model (backend, default inductor)")
    p.add_argument("--device", default=None, help="device (default: cuda when available, else cpu)")
    g = p.add_argument_group("Training step")
    g.add_argument("--opt", default="sgd", metavar="NAME", help="optimizer (timm create_optimizer_v2 name)")
    g.add_argument("--lr", type=nonneg_float(), default=1e-4, metavar="LR", help="learning rate")
    g.add_argument("--momentum", type=rate(), default=0.9, metavar="M", help="SGD momentum")
    g.add_argument("--weight-decay", type=nonneg_float(), default=1e-4, metavar="WD", help="weight decay")
    g.add_argument("--smoothing", type=rate(), default=0.1, metavar="EPS", help="label smoothing")
    g.add_argument("--drop", type=rate(), default=0.0, metavar="PCT", help="dropout rate")
    g.add_argument("--drop-path", type=rate(), default=None, metavar="PCT", help="drop-path rate")
    g.add_argument("--attack-steps", type=positive_int(), default=2, metavar="K", help="adv-train: PGD steps")
    g.add_argument("--attack-eps", type=nonneg_float(), default=4.0, metavar="EPS", help="adv-train: eps in /255 units")
    return p


def check_device(device: str) -> None:
    """``--device``: a device string torch parses, of a kind this machine has."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise must("--device", "a torch device such as cpu, cuda or cuda:1", device) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise must("--device", "a device this machine has (no CUDA GPU is available here)", device)
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise must("--device", f"a GPU index below {torch.cuda.device_count()}", device)
    if dev.type not in ("cpu", "cuda", "mps", "xpu"):
        raise must("--device", "cpu, cuda[:N], mps or xpu (benchmark.py times eager PyTorch devices)", device)


def check_compile_backend(flag: str, backend: str) -> None:
    """``--torch-compile`` / ``--backend``: a torch.compile backend this torch knows (a typo failed inside the
    first compiled call, after the model was built: a traceback in benchmarks/compile_check.py)."""
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise must(flag, "a torch.compile backend: " + ", ".join(b for b in ("inductor", "aot_eager", "eager")
                                                                   if b in known) + " or another of "
                   "torch._dynamo.list_backends()", backend)


def parse_benchmark_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and check the benchmark CLI (``argv`` instead of ``sys.argv[1:]`` when given)."""
    parser = build_benchmark_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))

    def check(a: argparse.Namespace) -> None:
        if a.torchscript and a.torch_compile:
            raise UsageError("--torchscript and --torch-compile exclude each other")
        if a.fold_bn and a.bench != "inference":
            raise must("--fold-bn", "used with --bench inference only (training steps normalize with batch "
                       "statistics, which cannot be folded)", a.bench)
        if a.device is not None:
            check_device(a.device)
        if a.torch_compile:
            check_compile_backend("--torch-compile", a.torch_compile)
        check_input_size(a)

    parser.check(check, args)
    if args.amp:
        args.precision = "amp"
    return args
