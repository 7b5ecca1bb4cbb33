"""The evaluation CLIs' flags: validate.py, attack_effectiveness.py and validate_robustbench.py.

Each CLI keeps the original's flag names (original-behaviour.md §1.2-§1.5) and accepts the
other tools' spelling of the same thing as an alias: ``--attack-eps``/``--eps``,
``--attack-norm``/``--threat-model`` (any case: ``Linf``, ``linf``), ``--num-examples``/
``--n-examples``. attack_effectiveness.py is validate.py's parser built for a sweep (the flags it
sets per row are hidden and refused when given) plus the sweep's own flags.
"""
from __future__ import annotations

import argparse
import math
import sys
from collections import OrderedDict
from typing import Any, List, Mapping, Optional, Sequence

from src.arg_parser.common import FOLD_BN_HELP, CliParser, bool_flag, check_input_size, check_mean_std, norm_name
from src.arg_parser.values import (CROP_PCT, INTERPOLATION, INTERPOLATIONS, INPUT_PATH, MEAN, OUTPUT_PATH, SEED, STD, MAX_WORKERS, WORKERS, Choice, finite_float, must,
                                   nonneg_float, nonneg_int, positive_float, positive_int)
from src.errors import UsageError
from src.honesty import PGD_ATTACKS

__all__ = ["ATTACKS", "PGD_ATTACKS", "SWEEP_SETS", "DEFAULT_STEPS", "DEFAULT_EPOCHS", "DEFAULT_SEEDS",
           "DEFAULT_OUTPUT_NAME", "build_validate_parser", "parse_validate_args", "check_validate_args",
           "build_effectiveness_parser", "parse_effectiveness_args", "check_effectiveness_args",
           "build_robustbench_parser", "parse_robustbench_args", "check_robustbench_args"]

ATTACKS = ("", "pgd", "targeted_pgd", "apgd-ce", "autoattack")
DEFAULT_OUTPUT_NAME = "attack-effectiveness.csv"
DEFAULT_STEPS = (1, 2, 5, 10, 200)
DEFAULT_EPOCHS = tuple(range(9, 100, 10))  # 0-based: the 10th, 20th, ... 100th epoch
DEFAULT_SEEDS = (0, 1, 2)
TRUST_WHY = "it lets a checkpoint run code while it is loaded"
# validate.py flags attack_effectiveness.py sets itself for every row, or does not support: dest -> (flag, what to
# use instead; None: not supported)
SWEEP_SETS = OrderedDict([
    ("checkpoint", ("--checkpoint", "--checkpoints-dir (a folder of checkpoint-<epoch>.pth.tar files)")),
    ("attack_steps", ("--attack-steps", "--steps-to-try")),
    ("seed", ("--seed", "--seeds")),
    ("results_file", ("--results-file", "--output-file")),
    ("log_wandb", ("--log-wandb", None)),
    ("real_labels", ("--real-labels", None)),  # its rows' clean top1/top5 are against the dataset's labels
])


# ----------------------------------------------------------------------------------------------
# validate.py


def _add_validate_data(p: argparse.ArgumentParser, sweep: bool) -> None:
    """Dataset, loader and transform flags (timm's validate.py)."""
    g = p.add_argument_group("Data")
    g.add_argument("data", type=INPUT_PATH, metavar="DIR", nargs="?", default=None,
                   help="dataset root; tfds/: the TFDS data dir, local or gs:// (default: TFDS's); not needed for "
                        "the embedded 'digits' dataset")
    g.add_argument("--dataset", "-d", metavar="NAME", default="",
                   help="dataset: '' (image folder), digits (embedded), torch/<name>, hfds/<name>, "
                        "tfds/<name>[:version]")
    g.add_argument("--split", metavar="NAME", default="validation",
                   help="dataset split (tfds/: TFDS slices work, e.g. 'validation[:1000]')")
    g.add_argument("--dataset-download", action="store_true", default=False,
                   help="allow downloading torch/ datasets")
    g.add_argument("--class-map", default="", type=INPUT_PATH, metavar="FILE",
                   help="file mapping class folder names to indices")
    g.add_argument("-j", "--workers", default=4, type=WORKERS, metavar="N", help=f"data loading workers per process (at most {MAX_WORKERS})")
    g.add_argument("-b", "--batch-size", default=256, type=positive_int(), metavar="N", help="batch size per process")
    g.add_argument("--img-size", default=None, type=positive_int(), metavar="N", help="input image size")
    g.add_argument("--input-size", default=None, nargs=3, type=positive_int(), metavar="N", help="input dimensions C H W")
    g.add_argument("--crop-pct", default=None, type=CROP_PCT, metavar="PCT", help="center-crop fraction")
    g.add_argument("--mean", type=MEAN, nargs="+", default=None, metavar="MEAN", help="dataset mean")
    g.add_argument("--std", type=STD, nargs="+", default=None, metavar="STD", help="dataset std")
    g.add_argument("--interpolation", default="", type=INTERPOLATION, metavar="NAME",
                   help="resize interpolation: " + ", ".join(INTERPOLATIONS) + " (default: the model's)")
    g.add_argument("--pin-mem", action="store_true", default=False, help="pin CPU memory in the loader")
    g.add_argument("--use-mp-loader", action="store_true", default=False,
                   help="on XLA, wrap the loader in torch_xla's MpDeviceLoader (ignored elsewhere)")
    g.add_argument("--tf-preprocessing", action="store_true", default=False,
                   help="not supported (rejected): TensorFlow preprocessing")
    g.add_argument("--real-labels", default=None if sweep else "", type=INPUT_PATH, metavar="FILE",
                   help=argparse.SUPPRESS if sweep else
                   "ImageNet-ReaL labels (real.json): clean top1/top5 are ReaL accuracy (timm's "
                   "RealLabelsImagenet); robust accuracy is always against the dataset's labels")
    g.add_argument("--valid-labels", default="", type=INPUT_PATH, metavar="FILE",
                   help="file of valid class indices (one per line): the model's logits are restricted to "
                        "them for the clean forward AND the attack")
    g.add_argument("--num-examples", "--n-examples", type=positive_int(), default=None, metavar="N",
                   help="evaluate only min(batches, N // (batch size x processes)) full batches")


def _add_validate_model(p: argparse.ArgumentParser, sweep: bool) -> None:
    """Model, checkpoint and normalization flags."""
    g = p.add_argument_group("Model")
    g.add_argument("--model", "-m", metavar="NAME", default="resnet50",
                   help="timm model name; 'all', a wildcard or a text file of names for bulk evaluation")
    g.add_argument("--pretrained", action="store_true", default=False,
                   help="use timm's pretrained weights (forced when no --checkpoint)")
    g.add_argument("--checkpoint", default=None if sweep else "", type=INPUT_PATH, metavar="PATH",
                   help=argparse.SUPPRESS if sweep else
                   "checkpoint file (local, gs://, memory://), or a folder: every *.pth.tar / *.pth in it")
    # the sweep uses EMA weights by default (as the original): its switch is --no-ema, --use-ema is accepted
    g.add_argument("--use-ema", action="store_true", default=sweep,
                   help=argparse.SUPPRESS if sweep else "use the checkpoint's EMA weights")
    if sweep:
        g.add_argument("--no-ema", dest="use_ema", action="store_false", default=argparse.SUPPRESS,
                       help="evaluate the checkpoints' model weights even when they also hold EMA weights (EMA "
                            "weights, where a checkpoint has them, are the default here, as in the original)")
    bool_flag(g, "--trust-checkpoint", command_line_only=TRUST_WHY,
              help="allow checkpoints that need arbitrary unpickling (runs code from the file)")
    g.add_argument("--num-classes", type=positive_int(), default=None, metavar="N", help="number of classes")
    g.add_argument("--gp", default=None, type=str, metavar="POOL", help="global pool type")
    g.add_argument("--test-pool", action="store_true", default=False, help="timm test-time pooling")
    g.add_argument("--patch-size", type=positive_int(), default=None, metavar="N",
                   help="XCiT only: remove stem strides so the model uses N-pixel patches (2, 4, 8)")
    g.add_argument("--torchscript", action="store_true", default=False, help="torch.jit.script the model")
    g.add_argument("-nn", "--no-normalize", action="store_true", default=False,
                   help="feed raw [0, 1] inputs (the loader does not normalize)")
    g.add_argument("--normalize-model", action="store_true", default=False,
                   help="[0, 1] inputs, normalization inside the model (--mean/--std, else the checkpoint's "
                        "recorded mean/std, else the model's defaults)")


def _add_validate_attack(p: argparse.ArgumentParser, sweep: bool) -> None:
    """The attack and its budget."""
    g = p.add_argument_group("Attack")
    g.add_argument("--attack", default="pgd" if sweep else "", type=Choice(names=ATTACKS), metavar="NAME",
                   help="attack of the sweep: only pgd (APGD-CE rows: --run-apgd-ce)" if sweep else
                   "'' (none), pgd, targeted_pgd, apgd-ce or autoattack")
    if not p.several_eps:
        g.add_argument("--attack-eps", "--eps", default=4, type=nonneg_float(), metavar="EPS",
                       help="epsilon in /255 units")
    else:
        g.add_argument("--attack-eps", "--eps", default=[4.0], type=nonneg_float(), nargs="+", metavar="EPS",
                       help="epsilon in /255 units; several values give one result row each (with an attack_eps "
                            "column: the robustness curve that `python -m src.plots robustness` draws)")
    g.add_argument("--attack-lr", default=None, type=positive_float(), metavar="LR",
                   help="PGD step size in /255 units for every step count (unset: 1.5 * eps / steps)" if sweep
                   else "PGD step size in /255 units (default: 1.5 * eps / steps); pgd and targeted_pgd only")
    g.add_argument("--attack-steps", default=None if sweep else [10], type=nonneg_int(), nargs="+", metavar="K",
                   help=argparse.SUPPRESS if sweep else "PGD steps (pgd and targeted_pgd only); several values "
                                                         "evaluate each (one result row per value)")
    g.add_argument("--attack-norm", "--threat-model", default="linf", type=Choice(names=("linf", "l2"), normalize=norm_name),
                   metavar="NORM", help="threat model: linf or l2 (any case)")
    g.add_argument("--attack-boundaries", default=(0, 1), type=finite_float(order="<"), nargs=2, metavar="L",
                   help="clipping box of adversarial inputs, low < high")
    g.add_argument("--verbose", action="store_true", default=False, help="AutoAttack progress output")


def _add_validate_run(p: argparse.ArgumentParser, sweep: bool) -> None:
    """Seeding, precision, device and outputs."""
    g = p.add_argument_group("Run")
    g.add_argument("--seed", type=SEED, default=None if sweep else 0, metavar="S",
                   help=argparse.SUPPRESS if sweep else "random seed (reset for every evaluation)")
    g.add_argument("--log-freq", default=1, type=nonneg_int(), metavar="N", help="batches between log lines (no TTY)")
    g.add_argument("--amp", action="store_true", default=False, help="mixed precision (bfloat16 autocast)")
    g.add_argument("--amp-dtype", default="auto", type=Choice(names=("auto", "bfloat16", "float16")), metavar="DTYPE",
                   help="autocast dtype with --amp: auto (float16 on CUDA, bfloat16 elsewhere), bfloat16 or float16")
    g.add_argument("--channels-last", action="store_true", default=False, help="channels-last memory layout")
    g.add_argument("--fold-bn", action="store_true", default=False, help=FOLD_BN_HELP)
    g.add_argument("--force-cpu", action="store_true", default=False, help="run on the CPU")
    g.add_argument("--results-file", default=None if sweep else "", type=OUTPUT_PATH, metavar="PATH",
                   help=argparse.SUPPRESS if sweep else "write results here: .json gives JSON (with warnings), "
                                                         "anything else CSV; gs:// works")
    g.add_argument("--log-wandb", action="store_true", default=None if sweep else False,
                   help=argparse.SUPPRESS if sweep else "log the final numbers into the training run's W&B run "
                                                         "(wandb_run in args.yaml next to the checkpoint)")
    g.add_argument("--local_rank", "--local-rank", dest="local_rank", type=nonneg_int(), default=None,
                   help="set by torch.distributed.launch")


def build_validate_parser(prog: str = "validate.py", description: Optional[str] = None, sweep: bool = False,
                          overrides: Optional[Mapping[str, Mapping[str, Any]]] = None,
                          several_eps: bool = False) -> CliParser:
    """timm's validate flags plus the paper's (original-behaviour.md §1.2 and §1.3).

    ``sweep`` builds it for attack_effectiveness.py: the flags the sweep sets per row default to
    None (so a given value can be refused by name) and are hidden; ``--attack`` defaults to pgd and
    EMA weights are preferred (``--no-ema`` turns that off). ``overrides`` (dest -> add_argument
    keywords) lets another tool built on these flags change a default or a help text. ``several_eps``
    (validate.py itself) lets ``--attack-eps`` take several values, one result row each.
    """
    p = CliParser(prog=prog, description=description or "Clean and adversarial (PGD, APGD-CE, AutoAttack) "
                                                         "evaluation of timm image classifiers", overrides=overrides)
    p.several_eps = several_eps
    for add in (_add_validate_data, _add_validate_model, _add_validate_attack, _add_validate_run):
        add(p, sweep)
    g = p.add_argument_group("Checkpoint record")
    g.add_argument("--use-test-size", action="store_true", default=False,
                   help="use the model's timm test_input_size / test_crop_pct (newer timm cfgs; the original never "
                        "did) instead of the checkpoint's recorded input size and crop")
    return p


def parse_validate_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and check the validate CLI (``argv`` instead of ``sys.argv[1:]`` when given)."""
    from src.eval_config import parse_recording_explicit

    parser = build_validate_parser(several_eps=True)
    args = parse_recording_explicit(parser, sys.argv[1:] if argv is None else argv)  # flags left out never
    # override a checkpoint's record
    # several --attack-eps values: validate() runs one pass per value; args.attack_eps is the first,
    # so everything that reads one eps (attack building, honesty checks) keeps working
    args.attack_eps_values = list(dict.fromkeys(float(e) for e in args.attack_eps))
    if len(args.attack_eps_values) != len(args.attack_eps):
        raise must("--attack-eps", "values that are not repeated", list(args.attack_eps))
    args.attack_eps = args.attack_eps_values[0]
    parser.check(check_validate_args, args)
    return args


def check_validate_args(args: argparse.Namespace) -> None:
    """What one flag's rule cannot see (values.py checks each value): flags that must agree, refused flags.

    Also called on namespaces built by other tools (attack_effectiveness, attack_convergence), so the
    per-value rules that matter downstream are repeated here in the same message format."""
    if args.attack not in ATTACKS:
        raise must("--attack", "one of pgd, targeted_pgd, apgd-ce, autoattack (or '' for clean accuracy only)",
                   args.attack)
    if args.attack_eps is None or not math.isfinite(args.attack_eps) or args.attack_eps < 0:
        raise must("--attack-eps", "a finite number >= 0 (in /255 units)", args.attack_eps)
    if args.attack_lr is not None and (not math.isfinite(args.attack_lr) or args.attack_lr <= 0):
        # step 0: PGD never leaves its random start, a noise baseline reported as a PGD-k number
        raise must("--attack-lr", "a finite number > 0 (in /255 units)", args.attack_lr)
    if any(k < 0 for k in args.attack_steps):
        raise must("--attack-steps", "integers >= 0", list(args.attack_steps))
    if len(args.attack_steps) > 1 and args.attack not in PGD_ATTACKS:
        raise UsageError("several --attack-steps values need --attack pgd or targeted_pgd "
                         f"(got --attack '{args.attack}', whose result does not depend on the step count)")
    # a PGD budget flag given for an attack that has no such knob would be silently ignored
    if args.attack not in PGD_ATTACKS:
        from src.eval_config import flag_given  # here: eval_config imports this package

        unused = [flag for dest, flag, default in (("attack_steps", "--attack-steps", [10]),
                                                   ("attack_lr", "--attack-lr", None))
                  if flag_given(args, dest, default)]
        if unused:
            what = (f"--attack {args.attack} runs its own step schedule (APGD: 100 iterations, adaptive step size)"
                    if args.attack else "no --attack: only clean accuracy is measured")
            flags = " and ".join(unused)
            verb = "sets" if len(unused) == 1 else "set"
            raise UsageError(f"{flags} {verb} PGD's budget, but {what}; drop {flags} or use --attack pgd")
    eps_values = getattr(args, "attack_eps_values", None) or [args.attack_eps]
    if len(eps_values) > 1 and not args.attack:
        raise UsageError(f"several --attack-eps values ({' '.join(f'{e:g}' for e in eps_values)}) need an --attack: "
                         "without one only clean accuracy is measured, once")
    if len(set(args.attack_steps)) != len(args.attack_steps):
        raise must("--attack-steps", "values that are not repeated", list(args.attack_steps))
    lo, hi = args.attack_boundaries
    if not lo < hi:
        raise must("--attack-boundaries", "two values low < high", [lo, hi])
    if args.batch_size is None or args.batch_size < 1:
        raise must("--batch-size", "an integer >= 1", args.batch_size)
    check_mean_std(args.mean, args.std)
    if args.real_labels:
        from src import storage

        if not storage.exists(args.real_labels):
            raise UsageError(f"--real-labels file {args.real_labels} does not exist")
    if args.tf_preprocessing:
        raise UsageError("--tf-preprocessing is not supported: use the default (PIL) eval transform")
    check_input_size(args)


# ----------------------------------------------------------------------------------------------
# attack_effectiveness.py


def build_effectiveness_parser() -> argparse.ArgumentParser:
    """validate.py's parser built for a sweep (data, model, normalization, attack budget) plus the sweep flags."""
    p = build_validate_parser("attack_effectiveness.py",
                              "Robust accuracy and loss of PGD with several step counts (and APGD-CE) for the "
                              "checkpoints saved during training, over several seeds: how effective are few-step "
                              "attacks?", sweep=True)
    g = p.add_argument_group("Attack effectiveness")
    g.add_argument("--checkpoints-dir", default=None, type=INPUT_PATH, metavar="DIR",
                   help="required: folder (local, gs://, memory://) with the training run's "
                        "checkpoint-<epoch>.pth.tar files")
    g.add_argument("--epochs-to-try", type=nonneg_int(), nargs="+", default=list(DEFAULT_EPOCHS), metavar="E",
                   help="0-based epochs whose checkpoint-<E>.pth.tar to evaluate")
    g.add_argument("--validate-standard", action="store_true", default=False,
                   help="also evaluate checkpoint-standard.pth.tar (epoch label 'standard')")
    g.add_argument("--steps-to-try", type=nonneg_int(), nargs="+", default=list(DEFAULT_STEPS), metavar="K",
                   help="PGD step counts (one row each)")
    g.add_argument("--run-apgd-ce", action="store_true", default=False,
                   help="also run APGD-CE once per checkpoint and seed (attack_steps empty)")
    g.add_argument("--seeds", type=SEED, nargs="+", default=list(DEFAULT_SEEDS), metavar="S",
                   help="seeds (each row's RNG is reset to seed + rank)")
    g.add_argument("--output-file", default=None, type=OUTPUT_PATH, metavar="PATH",
                   help=f"results CSV (default <checkpoints-dir>/{DEFAULT_OUTPUT_NAME}); rows already in it are "
                        "kept and not recomputed")
    return p


def parse_effectiveness_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and check the attack_effectiveness CLI (``argv`` instead of ``sys.argv[1:]`` when given)."""
    from src.eval_config import parse_recording_explicit

    parser = build_effectiveness_parser()
    args = parse_recording_explicit(parser, sys.argv[1:] if argv is None else argv)
    parser.check(check_effectiveness_args, args)
    return args


def _repeated(values: Sequence[Any]) -> List[Any]:
    return sorted({v for v in values if list(values).count(v) > 1})


def check_effectiveness_args(args: argparse.Namespace) -> None:
    """Refuse what cannot work, before any checkpoint or dataset is touched."""
    for dest, (flag, instead) in SWEEP_SETS.items():
        if getattr(args, dest, None) is not None:
            if instead is None:
                raise UsageError(f"{flag} is not supported by attack_effectiveness.py")
            raise UsageError(f"attack_effectiveness.py sets {flag} itself for every row; use {instead}")
    if args.attack != "pgd":
        hint = "; for APGD-CE rows add --run-apgd-ce" if args.attack == "apgd-ce" else ""
        raise UsageError(f"attack_effectiveness.py sweeps PGD step counts (--steps-to-try); --attack "
                         f"'{args.attack}' is not supported{hint}")
    if not args.checkpoints_dir:
        raise UsageError("--checkpoints-dir is required: the training run's folder with checkpoint-<epoch>.pth.tar")
    for flag, values, low in (("--steps-to-try", args.steps_to_try, 0), ("--epochs-to-try", args.epochs_to_try, 0),
                              ("--seeds", args.seeds, 0)):
        bad = [v for v in values if v < low]
        if bad:
            raise must(flag, f"integers >= {low}", list(values))
        if _repeated(values):
            raise must(flag, "values that are not repeated", list(values))
    # the shared checks of validate.py (eps, step size, boundaries, batch size, mean/std, ...)
    check_validate_args(argparse.Namespace(**{**vars(args), "attack_steps": list(args.steps_to_try)}))


# ----------------------------------------------------------------------------------------------
# validate_robustbench.py


def build_robustbench_parser() -> argparse.ArgumentParser:
    """The original's flags (§1.4) and the resumable, sharded evaluation's."""
    p = CliParser(prog="validate_robustbench.py",
                  description="RobustBench evaluation (clean + AutoAttack 'standard' accuracy) of a timm / "
                              "robust-vits model.")
    g = p.add_argument_group("the original's flags")
    g.add_argument("--patch-size", type=positive_int(), default=None, metavar="N",
                   help="XCiT only: change the model's patch size by removing stem strides (e.g. 4 for a p16 "
                        "model on CIFAR); default: keep the model's own (the original defaulted to 16 and "
                        "crashed on *_p4_32 models)")
    g.add_argument("--dataset", default="cifar10",
                   help="cifar10, cifar100, imagenet, or tfds/<name>[:version]: RobustBench's ImageNet images from a "
                        "built TFDS dataset (tfds/robustbench_image_net from datasets/, or tfds/imagenet2012)")
    g.add_argument("--data-dir", type=INPUT_PATH, default=None,
                   help="CIFAR: folder holding cifar-10-batches-py/ or cifar-100-python/ (torchvision format); "
                        "ImageNet: folder holding val/<wnid>/ILSVRC2012_val_*.JPEG (both ~/torch_data/ when not given); "
                        "tfds/: the TFDS data dir it was built into, local or gs:// (default: TFDS's, "
                        "$TFDS_DATA_DIR or ~/tensorflow_datasets)")
    g.add_argument("--crop-pct", type=CROP_PCT, default=None, metavar="PCT",
                   help="override the model's crop_pct (ImageNet)")
    g.add_argument("--normalize", action="store_true",
                   help="ImageNet: normalize in the loader with the model's mean/std (attacks then run in "
                        "normalized space; prefer --mean/--std, which normalize inside the model)")
    g.add_argument("--checkpoint", type=INPUT_PATH, default=None,
                   help="weights (local, gs://); without it the model's timm pretrained weights are used")
    g.add_argument("--model", default=None, help="timm or robust-vits model name")
    g.add_argument("--batch-size", type=positive_int(), default=512, metavar="N", help="batch size of the forward passes and AutoAttack")
    g.add_argument("--num-classes", type=positive_int(), default=None, metavar="N",
                   help="classes of the model (default: 10 / 100 / 1000 for cifar10 / cifar100 / imagenet)")
    g.add_argument("--eps", "--attack-eps", type=nonneg_float(), default=8, metavar="EPS", help="radius in /255 units (both norms: L2 0.5 is 127.5)")
    g.add_argument("--threat-model", "--attack-norm", default="Linf", metavar="NORM",
                   type=Choice(names=("Linf", "L2"), normalize=lambda v: {"linf": "Linf", "l2": "L2"}.get(v.lower(), v)),
                   help="Linf or L2 (any case)")
    g.add_argument("--log-wandb", action="store_true",
                   help="log the numbers into the W&B run that trained the checkpoint (args.yaml next to it)")
    g.add_argument("--upsample-in-model", action="store_true",
                   help="CIFAR: resize and crop to the model's input size inside the model, so attacks "
                        "perturb the 32x32 pixels")
    g.add_argument("--mean", type=MEAN, nargs="+", default=None, metavar="MEAN",
                   help="normalize inside the model with this mean (missing --std: 1s)")
    g.add_argument("--std", type=STD, nargs="+", default=None, metavar="STD",
                   help="normalize inside the model with this std (missing --mean: 0s)")

    _add_robustbench_additions(p)
    return p


def _add_robustbench_additions(p: argparse.ArgumentParser) -> None:
    """Beyond the original: example count, seeding, safety, resumable sharded state, device."""
    g = p.add_argument_group("robust-vits additions")
    g.add_argument("--n-examples", "--num-examples", type=positive_int(), default=None, metavar="N",
                   help="evaluate the first N examples (default: RobustBench's 10000 for CIFAR, 5000 for ImageNet)")
    g.add_argument("--split", default=None, metavar="SPLIT",
                   help="tfds/ datasets: the split holding the images (default validation; TFDS slicing works); the "
                        "examples are still the first --n-examples RobustBench ids, in list order")
    g.add_argument("--seed", type=SEED, default=0, metavar="S",
                   help="AutoAttack seed; each chunk uses seed + index of its first example")
    bool_flag(g, "--trust-checkpoint", command_line_only=TRUST_WHY,
              help="allow checkpoints that need arbitrary unpickling (only for trusted files)")
    g.add_argument("--use-ema", action="store_true", help="evaluate the checkpoint's EMA weights")
    g.add_argument("--output", default=None, type=OUTPUT_PATH,
                   help="JSON report path, local or gs:// (default output/robustbench/<model>-<dataset>-"
                        "<threat>-eps<eps>.json)")
    g.add_argument("--state-dir", default=None, type=OUTPUT_PATH,
                   help="per-shard resumable state (default: <report without .json>.state next to the report)")
    g.add_argument("--chunk-size", type=nonneg_int(), default=None, metavar="N",
                   help="examples per chunk: the unit of resumption, sharding and seeding (default: --batch-size; "
                        "0 = all examples in one AutoAttack call, exactly like RobustBench)")
    g.add_argument("--num-shards", type=positive_int(), default=1, metavar="N", help="split the chunks over this many separate jobs")
    g.add_argument("--shard-id", type=nonneg_int(), default=0, metavar="I", help="which of the --num-shards jobs this is")
    g.add_argument("--merge-only", action="store_true",
                   help="evaluate nothing: merge the shards' state into the report (fails if examples are missing)")
    g.add_argument("--poll-seconds", type=positive_float(), default=5.0, metavar="S",
                   help="torchrun: how often rank 0 checks whether the other ranks have finished")
    g.add_argument("--force-cpu", action="store_true", help="run on the CPU even when a GPU is present")
    g.add_argument("--fold-bn", action="store_true", default=False, help=FOLD_BN_HELP)
    g.add_argument("--workers", type=WORKERS, default=4, metavar="N", help=f"data loading processes (ImageNet; at most {MAX_WORKERS})")


def parse_robustbench_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the validate_robustbench CLI; the checks run in ``src.robustbench.run``."""
    from src.eval_config import parse_recording_explicit

    return parse_recording_explicit(build_robustbench_parser(), sys.argv[1:] if argv is None else argv)


def check_robustbench_args(args: argparse.Namespace) -> None:
    """Refuse what cannot work; canonical threat model name, default chunk size (--batch-size)."""
    from src.robustbench import DATASETS, canonical_threat_model
    from src.robustbench_data import protocol_dataset
    from src.tfds_data import is_tfds

    tfds_data = is_tfds(args.dataset)
    if args.dataset not in DATASETS and not (tfds_data and len(args.dataset) > len("tfds/")):
        raise must("--dataset", "one of " + ", ".join(DATASETS) + " or tfds/<name>[:version]", args.dataset)
    if args.split is not None and not tfds_data:
        raise UsageError(f"--split applies to tfds/ datasets; --dataset {args.dataset} has RobustBench's fixed "
                         "example set")
    if args.data_dir is None and not tfds_data:
        args.data_dir = "~/torch_data/"  # the original's default; tfds/ keeps None (TFDS's default data dir)
    args.threat_model = canonical_threat_model(args.threat_model)
    if not math.isfinite(args.eps) or args.eps < 0:
        raise must("--eps", "a finite number >= 0 (in /255 units)", args.eps)
    if args.chunk_size is None:
        args.chunk_size = args.batch_size
    if args.log_wandb and not args.checkpoint:
        raise UsageError("--log-wandb needs --checkpoint (the W&B run is found through the args.yaml next to it)")
    if not 0 <= args.shard_id < args.num_shards:
        raise must("--shard-id", f"in 0..{args.num_shards - 1} (below --num-shards {args.num_shards})", args.shard_id)
    if not args.model and not args.checkpoint:
        raise UsageError("--model is required without --checkpoint (a timm or robust-vits model name)")
    if args.normalize and protocol_dataset(args.dataset) != "imagenet":
        raise UsageError("--normalize applies to --dataset imagenet only (or tfds/ ImageNet; as in the original); for "
                         "CIFAR models trained on normalized inputs pass --mean/--std to normalize inside the model")
    if args.upsample_in_model and protocol_dataset(args.dataset) == "imagenet":
        raise UsageError("--upsample-in-model is for CIFAR's 32x32 images; ImageNet preprocessing already "
                         "resizes and crops to the model's input size")
    check_mean_std(args.mean, args.std)
