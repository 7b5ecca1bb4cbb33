"""Every training flag, and YAML configs whose keys become the flags' defaults.

The flag set and defaults are the original's (timm ``bits_and_tpu`` train.py plus the paper's
additions, see original-behaviour.md §1.1). Differences, each listed in the README:

* a YAML key that is not a flag is an error naming the key and the closest flag (the original
  silently accepted typos);
* ``data_dir`` is optional (the embedded ``digits`` dataset needs none) and may come from the YAML;
* ``--no-normalize`` keeps its effect (the training loader never normalizes) but is honest about it;
* flags the original accepted and ignored are either implemented or rejected with a clear error;
* every value has a rule (``values.py``) applied alike to the command line and YAML; flags that lower a
  safety check are command line only; keys of timm's old parser (``bn_tf``) warn and are dropped.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import yaml

from src.arg_parser.common import (ARGS_YAML_HEADER, CliParser, bool_flag, check_input_size, check_mean_std,
                                   load_yaml_config, norm_name)
from src.arg_parser.values import (CROP_PCT, INTERPOLATION, INTERPOLATIONS, INPUT_PATH, MEAN, OUTPUT_PATH, SEED, STD, MAX_WORKERS, WORKERS, Choice, Num, Text, finite_float,
                                   fraction, must, nonneg_float, nonneg_int, positive_float, positive_int, rate, show)
from src.errors import UsageError


def _check_opt(name: str) -> None:
    import timm.optim

    base = name.lower()
    base = base[len("lookahead_"):] if base.startswith("lookahead_") else base
    if base not in timm.optim.list_optimizers():
        raise ValueError(name)


def _check_aa(policy: str) -> None:
    """Build the policy with timm's factories (as src.data does), so a typo fails here, not after loading data."""
    if policy.lower() == "none":
        return
    import re

    # timm skips a section without a number ('rand-typo' = plain 'rand'): a typo would silently change the policy
    for section in policy.split("-")[1:]:
        if len(re.split(r"(\d.*)", section)) < 2:
            raise ValueError(section)
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform

    hparams = dict(translate_const=100, img_mean=(124, 116, 104))
    make = (rand_augment_transform if policy.startswith("rand") else
            augment_and_mix_transform if policy.startswith("augmix") else auto_augment_transform)
    make(policy, hparams)


def _check_folder_name(name: str) -> None:
    """One folder inside --output: a separator, '.' or '..' would put the run (and its checkpoints, summary.csv)
    outside --output or into an existing folder such as another run's, where it would overwrite that run's files."""
    if name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ValueError(name)


def _check_loss_spec(spec: str) -> None:
    """pgd, trades, '' (clean) or a plugin ``module.path:ClassName`` / ``path/to/file.py:ClassName`` whose parts are
    well formed; importing it is src.setup_task's job (it names the module or file it cannot load)."""
    if spec in ("", "pgd", "trades"):
        return
    module, _, cls = spec.rpartition(":")
    if not module or not cls.isidentifier():
        raise ValueError(spec)
    is_path = module.endswith(".py") or "/" in module or "\\" in module
    if not is_path and not all(part.isidentifier() for part in module.split(".")):
        raise ValueError(spec)


SCHEDULERS = ("cosine", "tanh", "step", "multistep", "plateau", "poly")
COOLDOWN_SCHEDULERS = ("cosine", "tanh", "poly")  # they train --epochs + --cooldown-epochs
EVAL_METRICS = ("top1", "top5", "robust_top1", "loss")
OPTIMIZER = Text(check=_check_opt, what="an optimizer name of timm (timm.optim.list_optimizers())", bad="sgdx")
AA_POLICY = Text(check=_check_aa, what="an auto-augment policy of timm (rand-..., augmix-..., original, v0, 3a, ...) "
                                       "or None", bad="rand-q9")
EXPERIMENT = Text(check=_check_folder_name, what="one folder name inside --output (no '/' or backslash, not '.' or "
                                                "'..'; '' for <date>-<time>-<model>-<size>)", bad="../run")
LOSS_SPEC = Text(check=_check_loss_spec, what="pgd, trades, module.path:ClassName or path/to/file.py:ClassName "
                                              "('' or null: clean training)", bad="madry")
TRUST_WHY = "it lets a checkpoint run code while it is loaded"
SKIP_NONFINITE_WHY = "it turns the stop on a NaN/inf loss into skipped steps"
# keys of timm's train.py the original's configs may hold, which this project has no flag for
LEGACY_KEYS = {
    "bn_tf": "TensorFlow BatchNorm defaults, dropped by timm",
    "grad_checkpointing": "the original's parser had no such flag, so its configs never took effect",
    "layer_decay": "the original's parser had no such flag, so its configs never took effect",
    "dataset_download": "the original's parser had no such flag; train.py never downloads datasets",
    "class_map": "the original's parser had no such flag, so its configs never took effect",
}


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Dataset")
    g.add_argument("data_dir", type=INPUT_PATH, metavar="DIR", nargs="?", default=None,
                   help="path to the dataset root; tfds/: the TFDS data dir, local or gs:// (default: TFDS's); not "
                        "needed for the embedded 'digits' dataset; may be set in the YAML as data_dir")
    g.add_argument("--dataset", "-d", metavar="NAME", default="",
                   help="dataset: '' (image folder), 'digits' (embedded), torch/<name>, hfds/<name>, "
                        "tfds/<name>[:version]")
    g.add_argument("--train-split", metavar="NAME", default="train",
                   help="training split (tfds/: TFDS slices work, e.g. 'train[:90%%]')")
    g.add_argument("--val-split", metavar="NAME", default="validation",
                   help="validation split (tfds/: e.g. 'train[90%%:]')")
    g.add_argument("--combine-dataset", metavar="NAME", default=None,
                   help="second training dataset mixed into every batch (e.g. tfds/cifar_ddpm)")
    g.add_argument("--combine-data-dir", type=INPUT_PATH, metavar="DIR", default=None,
                   help="root of the combined dataset (default: data_dir)")
    g.add_argument("--combined-dataset-ratio", type=finite_float(0, 1, lo_open=True, hi_open=True), default=0.5,
                   metavar="FRAC", help="fraction of each batch drawn from the combined dataset")
    g.add_argument("--epoch-repeats", type=nonneg_float(), default=0.0, metavar="N",
                   help="epoch repeat multiplier for streamed datasets (tfds/, wds/; an error for others, which "
                        "would ignore it)")
    g.add_argument("--workers", "-j", type=WORKERS, default=4, metavar="N",
                   help=f"data loading workers per process (at most {MAX_WORKERS})")
    bool_flag(g, "--pin-mem", help="pin CPU memory in the data loader")
    bool_flag(g, "--use-multi-epochs-loader", help="keep loader workers alive between epochs")
    bool_flag(g, "--use-mp-loader", help="on XLA, wrap loaders in torch_xla's MpDeviceLoader")
    g.add_argument("--train-num-samples", type=positive_int(nullable=True), default=None, metavar="N",
                   help="smoke test: train on a fixed random subset of N training images (the same every "
                        "epoch, resume and seed)")
    g.add_argument("--val-num-samples", type=positive_int(nullable=True), default=None, metavar="N",
                   help="smoke test: evaluate each epoch on a fixed random subset of N validation images")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Model")
    g.add_argument("--model", default="resnet50", metavar="MODEL", help="timm model name")
    bool_flag(g, "--pretrained", help="start from timm's pretrained weights (needs the network)")
    g.add_argument("--initial-checkpoint", default="", type=INPUT_PATH, metavar="PATH",
                   help="load these weights into the model before training (its EMA weights when it has "
                        "them, as timm does; the log names which)")
    g.add_argument("--resume", default="", type=INPUT_PATH, metavar="PATH",
                   help="resume model, EMA, optimizer and schedule from a checkpoint "
                        "('auto': the newest last/recovery checkpoint of the experiment folder)")
    bool_flag(g, "--no-resume-opt", help="do not restore the optimizer state when resuming")
    g.add_argument("--num-classes", type=positive_int(), default=None, metavar="N", help="number of classes")
    g.add_argument("--gp", default=None, metavar="POOL", help="global pool type (fast, avg, max, avgmax, ...)")
    g.add_argument("--img-size", type=positive_int(), default=None, metavar="N",
                   help="image size (H = W; with --input-size both must agree)")
    g.add_argument("--input-size", default=None, nargs=3, type=positive_int(), metavar="N",
                   help="input dimensions C H W (default: the model's)")
    g.add_argument("--crop-pct", default=None, type=CROP_PCT, metavar="PCT",
                   help="eval center-crop fraction")
    g.add_argument("--mean", type=MEAN, nargs="+", default=None, metavar="MEAN", help="dataset mean")
    g.add_argument("--std", type=STD, nargs="+", default=None, metavar="STD", help="dataset std")
    g.add_argument("--interpolation", default="", type=INTERPOLATION, metavar="NAME",
                   help="eval resize interpolation: " + ", ".join(INTERPOLATIONS) + " (default: the model's)")
    g.add_argument("-b", "--batch-size", type=positive_int(), default=256, metavar="N", help="batch size per process")
    g.add_argument("-vb", "--validation-batch-size", type=positive_int(), default=None, metavar="N",
                   help="validation batch size (default: --batch-size)")
    g.add_argument("-nn", "--no-normalize", action="store_true", default=True, help=argparse.SUPPRESS)
    bool_flag(g, "--normalize-model",
               help="prepend (x - mean) / std to the model, with --mean/--std or the model's defaults (the "
                    "training loader never normalizes: inputs stay in [0, 1], as in the original, whose "
                    "-nn/--no-normalize is accepted and always on)")
    g.add_argument("--finetune", default=None, type=INPUT_PATH, metavar="PATH",
                   help="fine-tune from this checkpoint: wrong-shape classifier weights are dropped")
    g.add_argument("--finetuning-patch-size", type=positive_int(), default=None, metavar="N",
                   help="XCiT patch size to adapt the model to before loading --finetune weights")
    bool_flag(g, "--reinit-patch-embedding",
              help="with --finetune, do not load the patch embedding weights (loading them is the default; "
                   "the original's --keep-patch-embedding is accepted and changes nothing)")
    g.add_argument("--keep-patch-embedding", action="store_true", default=False, help=argparse.SUPPRESS)
    bool_flag(g, "--trust-checkpoint", command_line_only=TRUST_WHY,
              help="allow checkpoints that need arbitrary unpickling (runs code from the file; command line only)")
    bool_flag(g, "--torchscript", help="build the model scriptable")


def _add_optim_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Optimizer")
    g.add_argument("--opt", default="sgd", type=OPTIMIZER, metavar="NAME", help="optimizer")
    g.add_argument("--opt-eps", default=None, type=positive_float(), metavar="EPS", help="optimizer epsilon")
    g.add_argument("--opt-betas", default=None, type=rate(counts=(2, 3)), nargs="+", metavar="BETA",
                   help="optimizer betas")
    g.add_argument("--momentum", type=rate(), default=0.9, metavar="M", help="SGD momentum")
    g.add_argument("--weight-decay", type=nonneg_float(), default=1e-4, metavar="WD", help="weight decay")
    g.add_argument("--clip-grad", type=positive_float(), default=None, metavar="NORM", help="gradient clipping value")
    g.add_argument("--clip-mode", type=Choice(names=("norm", "value", "agc")), default="norm", metavar="MODE",
                   help="gradient clipping mode: norm, value or agc")


def _add_sched_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Learning rate schedule")
    g.add_argument("--sched", default="cosine", type=Choice(names=SCHEDULERS), metavar="NAME",
                   help="LR scheduler: " + ", ".join(SCHEDULERS))
    g.add_argument("--lr", type=nonneg_float(nullable=True), default=0.1, metavar="LR",
                   help="learning rate (default: 0.1; null in YAML = scale --lr-base by the batch size)")
    g.add_argument("--lr-base", type=positive_float(), default=0.1, metavar="LR",
                   help="base LR for batch --lr-base-size")
    g.add_argument("--lr-base-size", type=positive_int(), default=256, metavar="N", help="batch size of --lr-base")
    g.add_argument("--lr-base-scale", type=Choice(names=("", "linear", "sqrt")), default="", metavar="SCALE",
                   help="'linear' or 'sqrt' (default: sqrt for adam/lamb/adabelief, else linear)")
    g.add_argument("--lr-noise", type=nonneg_float(counts=(1, 2)), nargs="+", default=None, metavar="EPOCH",
                   help="LR noise on/off epochs")
    g.add_argument("--lr-noise-pct", type=nonneg_float(), default=0.67, metavar="PCT", help="LR noise limit percent")
    g.add_argument("--lr-noise-std", type=nonneg_float(), default=1.0, metavar="STD", help="LR noise std-dev")
    g.add_argument("--lr-cycle-mul", type=positive_float(), default=1.0, metavar="MULT",
                   help="LR cycle length multiplier")
    g.add_argument("--lr-cycle-decay", type=finite_float(0, 1, lo_open=True), default=0.5, metavar="MULT",
                   help="LR decay per cycle")
    g.add_argument("--lr-cycle-limit", type=positive_int(), default=1, metavar="N", help="LR cycle limit")
    g.add_argument("--lr-k-decay", type=positive_float(), default=1.0, metavar="K", help="LR k-decay for cosine/poly")
    g.add_argument("--warmup-lr", type=nonneg_float(), default=1e-4, metavar="LR", help="warm-up LR")
    g.add_argument("--min-lr", type=nonneg_float(), default=1e-5, metavar="LR", help="lower LR bound")
    g.add_argument("--epochs", type=positive_int(), default=300, metavar="N",
                   help="epochs (cosine, tanh and poly: epochs of the first LR cycle; they train --lr-cycle-limit "
                        "cycles, each --lr-cycle-mul times longer, plus --cooldown-epochs)")
    g.add_argument("--start-epoch", default=None, type=nonneg_int(), metavar="N",
                   help="first epoch number (overrides the resumed epoch)")
    g.add_argument("--decay-milestones", default=[30, 60], type=nonneg_int(order="<"), nargs="+", metavar="EPOCH",
                   help="multistep milestones")
    g.add_argument("--decay-epochs", type=positive_float(nullable=True), default=100, metavar="N",
                   help="epoch interval to decay LR (step schedule; null in YAML where unused)")
    g.add_argument("--warmup-epochs", type=nonneg_int(), default=5, metavar="N", help="LR warm-up epochs")
    g.add_argument("--cooldown-epochs", type=nonneg_int(), default=10, metavar="N",
                   help="epochs at min LR after a cyclic schedule")
    g.add_argument("--patience-epochs", type=nonneg_int(), default=10, metavar="N", help="plateau patience")
    g.add_argument("--decay-rate", "--dr", type=finite_float(0, 1, lo_open=True), default=0.1, metavar="RATE",
                   help="LR decay rate")
    g.add_argument("--max-train-steps", type=positive_int(nullable=True), default=None, metavar="N",
                   help="smoke test: every epoch ends after N optimizer steps (the schedule counts N steps "
                        "per epoch)")


def _add_aug_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Augmentation and regularization")
    bool_flag(g, "--no-aug", help="no training augmentation (resize + center crop)")
    g.add_argument("--scale", type=positive_float(order="<="), nargs=2, default=[0.08, 1.0], metavar="PCT",
                   help="RRC scale range")
    g.add_argument("--ratio", type=positive_float(order="<="), nargs=2, default=[3.0 / 4.0, 4.0 / 3.0],
                   metavar="RATIO", help="RRC aspect ratio range")
    g.add_argument("--hflip", type=fraction(), default=0.5, metavar="PROB", help="horizontal flip probability")
    g.add_argument("--vflip", type=fraction(), default=0.0, metavar="PROB", help="vertical flip probability")
    g.add_argument("--color-jitter", type=nonneg_float(nullable=True), default=0.4, metavar="PCT",
                   help="color jitter factor (default: 0.4; null disables)")
    g.add_argument("--aa", type=AA_POLICY, default=None, metavar="NAME",
                   help="auto-augment policy, e.g. rand-m9-mstd0.5-inc1 ('None' disables)")
    g.add_argument("--aug-splits", type=nonneg_int(), default=0, metavar="N",
                   help="number of augmentation splits (0 or >= 2)")
    bool_flag(g, "--jsd-loss", help="Jensen-Shannon divergence + CE loss (needs --aug-splits)")
    bool_flag(g, "--bce-loss", help="binary cross-entropy loss (also with --smoothing 0, where the original used "
                                     "cross-entropy)")
    g.add_argument("--bce-target-thresh", type=fraction(), default=None, metavar="T", help="BCE target threshold")
    g.add_argument("--reprob", type=fraction(), default=0.0, metavar="PCT", help="random erase probability")
    g.add_argument("--remode", type=Choice(names=("pixel", "rand", "const")), default="pixel", metavar="MODE",
                   help="random erase fill mode: pixel, rand or const")
    g.add_argument("--recount", type=positive_int(), default=1, metavar="N", help="random erase count")
    bool_flag(g, "--resplit", help="do not random-erase the first (clean) augmentation split")
    g.add_argument("--mixup", type=nonneg_float(), default=0.0, metavar="ALPHA", help="mixup alpha")
    g.add_argument("--cutmix", type=nonneg_float(), default=0.0, metavar="ALPHA", help="cutmix alpha")
    g.add_argument("--cutmix-minmax", type=fraction(order="<="), nargs=2, default=None, metavar="RATIO",
                   help="cutmix min/max ratio")
    g.add_argument("--mixup-prob", type=fraction(), default=1.0, metavar="PROB",
                   help="mixup/cutmix probability per batch")
    g.add_argument("--mixup-switch-prob", type=fraction(), default=0.5, metavar="PROB",
                   help="probability of cutmix over mixup")
    g.add_argument("--mixup-mode", type=Choice(names=("batch", "pair", "elem")), default="batch", metavar="MODE",
                   help="batch, pair or elem")
    g.add_argument("--mixup-off-epoch", default=0, type=nonneg_int(), metavar="N",
                   help="epoch at which mixup is turned off (0: never)")
    g.add_argument("--smoothing", type=rate(), default=0.1, metavar="EPS", help="label smoothing")
    g.add_argument("--train-interpolation", type=Choice(names=("random",) + INTERPOLATIONS), default="random",
                   metavar="NAME", help="training interpolation: random, " + ", ".join(INTERPOLATIONS))
    g.add_argument("--drop", type=rate(), default=0.0, metavar="PCT", help="dropout rate")
    g.add_argument("--drop-connect", type=rate(), default=None, metavar="PCT", help="drop connect: the deprecated name of --drop-path (give one of the two)")
    g.add_argument("--drop-path", type=rate(), default=None, metavar="PCT", help="drop path rate")
    g.add_argument("--drop-block", type=rate(), default=None, metavar="PCT", help="drop block rate")
    g.add_argument("--rand-rotation", type=finite_float(0, 180), default=0, metavar="DEG",
                   help="random rotation in degrees")
    bool_flag(g, "--rand-crop", help="RandomCrop(size, padding=--pad) instead of RandomResizedCrop")
    g.add_argument("--pad", type=nonneg_int(), default=0, metavar="PIXELS",
                   help="padding for --rand-crop, or a Pad before RandomResizedCrop")


def _add_bn_ema_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("BatchNorm and EMA")
    g.add_argument("--bn-momentum", type=fraction(), default=None, metavar="M", help="BatchNorm momentum")
    g.add_argument("--bn-eps", type=positive_float(), default=None, metavar="EPS", help="BatchNorm epsilon")
    bool_flag(g, "--sync-bn", help="synchronized BatchNorm (distributed)")
    g.add_argument("--dist-bn", type=Choice(names=("broadcast", "reduce", "")), default="reduce", metavar="MODE",
                   help="distribute BatchNorm stats after each epoch: reduce, broadcast or ''")
    bool_flag(g, "--split-bn", help="separate BatchNorm per augmentation split")
    bool_flag(g, "--model-ema", help="keep an exponential moving average of the weights")
    g.add_argument("--model-ema-decay", type=fraction(), default=0.9998, metavar="DECAY", help="EMA decay")


def _add_adv_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Adversarial training")
    g.add_argument("--adv-training", type=LOSS_SPEC, default=None, metavar="LOSS",
                   help="pgd, trades, or module.path:ClassName of a custom loss (default: clean training)")
    g.add_argument("--attack", type=Choice(names=("pgd", "targeted_pgd")), default="pgd", metavar="NAME",
                   help="training attack: pgd or targeted_pgd")
    g.add_argument("--attack-eps", "--eps", type=nonneg_float(), default=4, metavar="EPS",
                   help="final epsilon, in /255 units")
    g.add_argument("--eps-schedule", type=Choice(names=("constant", "linear", "sine")), default="constant",
                   metavar="NAME", help="epsilon warm-up schedule, per epoch: constant, linear or sine")
    g.add_argument("--eps-schedule-period", type=nonneg_int(), default=10, metavar="N",
                   help="epoch at which full eps is reached")
    g.add_argument("--zero-eps-epochs", type=nonneg_int(), default=0, metavar="N", help="initial epochs with eps 0")
    g.add_argument("--attack-lr", type=positive_float(), default=None, metavar="LR",
                   help="attack step size in /255 units (default: 1.5 * eps / steps)")
    g.add_argument("--attack-steps", type=nonneg_int(), default=10, metavar="K",
                   help="PGD steps (training and per-epoch eval)")
    g.add_argument("--attack-norm", "--threat-model", type=Choice(names=("linf", "l2"), normalize=norm_name),
                   default="linf", metavar="NORM", help="threat model: linf or l2 (any case)")
    g.add_argument("--attack-boundaries", type=Num(kind=int, order="<"), nargs=2, default=(0, 1), metavar="L",
                   help="clipping box of adversarial inputs, low < high")
    g.add_argument("--eval-attack-eps", type=nonneg_float(), default=None, metavar="EPS",
                   help="eval epsilon, /255 (default: --attack-eps)")
    g.add_argument("--trades-beta", type=nonneg_float(), default=6.0, metavar="BETA", help="TRADES robust loss weight")
    g.add_argument("--attack-mode", type=Choice(names=("eval", "train")), default="eval", metavar="MODE",
                   help="model mode while crafting: eval (every backend) or train (what the original did on "
                        "TPU: BN statistics and dropout active)")
    g.add_argument("--adv-clean-logits", type=Choice(names=("train", "nograd", "skip")), default="train",
                   metavar="MODE", help="PGD training: clean logits for metrics computed in train mode with a graph "
                                        "(train, the original's), without graph and BN update (nograd), or not at "
                                        "all (skip)")
    g.add_argument("--eval-attack-steps", type=positive_int(nullable=True), default=None, metavar="N",
                   help="PGD steps of the per-epoch evaluation (default: --attack-steps, as the original); "
                        "step size --attack-lr or 1.5 * eps / N")
    g.add_argument("--monitor-attack-steps", type=positive_int(nullable=True), default=None, metavar="K",
                   help="attack-strength monitor: measure the relative robust-loss gap (L_K - L_train) / L_K "
                        "between the training attack and PGD-K (step 1.5 * eps / K) at the epoch's eps; "
                        "written to summary.csv (monitor_gap, in %%) and W&B (default: off)")
    g.add_argument("--monitor-every", type=positive_int(), default=1, metavar="N",
                   help="run the monitor every N epochs (and after the last one)")
    g.add_argument("--monitor-examples", type=positive_int(), default=512, metavar="N",
                   help="fixed random validation subset the monitor attacks")
    g.add_argument("--monitor-warn-gap", type=nonneg_float(), default=20.0, metavar="PCT",
                   help="warn when the monitor's gap exceeds PCT %% (healthy runs in the paper's data: "
                        "PGD-1 vs PGD-200 at most 12.7 %%)")


def _add_misc_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Miscellaneous")
    g.add_argument("--seed", type=SEED, default=42, metavar="S",
                   help="random seed (0 .. 2**32 - 1; per-epoch and per-process seeds are derived from it)")
    bool_flag(g, "--deterministic", help="deterministic algorithms (reproducible CPU runs)")
    g.add_argument("--log-interval", type=positive_int(), default=50, metavar="N", help="steps between log lines")
    g.add_argument("--recovery-interval", type=nonneg_int(), default=0, metavar="N",
                   help="steps between recovery checkpoints (0: none)")
    g.add_argument("--checkpoint-hist", type=positive_int(), default=10, metavar="N", help="checkpoints to keep")
    bool_flag(g, "--save-images", help="save the first training batch as a PNG grid in the output folder")
    bool_flag(g, "--amp", help="mixed precision: float16 autocast with a grad scaler on CUDA (the original's), "
                               "bfloat16 autocast on the CPU and XLA")
    g.add_argument("--amp-dtype", type=Choice(names=("auto", "bfloat16", "float16")), default="auto", metavar="DTYPE",
                   help="autocast dtype with --amp: auto (float16 on CUDA, bfloat16 elsewhere), bfloat16 or float16 "
                        "(CUDA only; uses a grad scaler)")
    bool_flag(g, "--channels-last", help="channels-last memory layout")
    g.add_argument("--output", default="", type=OUTPUT_PATH, metavar="PATH",
                   help="output root, local or gs:// (default: ./output/train)")
    g.add_argument("--experiment", default="", type=EXPERIMENT, metavar="NAME",
                   help="experiment folder name: one folder inside --output (default: <date>-<time>-<model>-<size>)")
    g.add_argument("--eval-metric", default="top1", type=Choice(names=EVAL_METRICS), metavar="METRIC",
                   help="checkpoint selection metric: " + ", ".join(EVAL_METRICS))
    bool_flag(g, "--skip-nonfinite", command_line_only=SKIP_NONFINITE_WHY,
              help="skip optimizer steps with a non-finite loss or gradient (counted in the log) "
                   "instead of stopping (command line only)")
    g.add_argument("--local_rank", "--local-rank", dest="local_rank", type=nonneg_int(), default=None,
                   metavar="N", help="set by torch.distributed.launch")
    bool_flag(g, "--force-cpu", help="run on the CPU even when an accelerator is present")
    bool_flag(g, "--log-wandb", help="log to Weights & Biases (project = --experiment)")
    g.add_argument("--run-notes", type=str, default="", metavar="TEXT", help="W&B run notes")
    g.add_argument("--tta", type=nonneg_int(), default=0, metavar="N",
                   help="not supported by train.py (use validate.py)")
    bool_flag(g, "--checkpoint-full-state",
              help="keep optimizer, grad-scaler and scheduler state in every checkpoint (the original's layout); "
                   "by default only last.pth.tar and recovery files, which resuming needs, keep them")
    bool_flag(g, "--checkpoint-weights-only",
              help="checkpoint-<epoch> and best files keep one set of weights: the ones their metric was "
                   "measured on (the EMA's with --model-ema, stored as 'model'), plus metadata")


def build_parser() -> CliParser:
    """train.py's flags: every value has its rule (``values.py``); YAML configs pass the same rules."""
    p = CliParser(prog="train.py", description="(Adversarial) training of timm image classifiers")
    p.add_argument("-c", "--config", default="", type=str, metavar="FILE",
                   help="YAML config whose keys become the defaults of the flags (the command line overrides)")
    for add in (_add_data_args, _add_model_args, _add_optim_args, _add_sched_args, _add_aug_args,
                _add_bn_ema_args, _add_adv_args, _add_misc_args):
        add(p)
    p.legacy_keys.update(LEGACY_KEYS)
    return p


def config_parser() -> argparse.ArgumentParser:
    p = CliParser(prog="train.py", add_help=False)
    p.add_argument("-c", "--config", default="", type=str, metavar="FILE",
                   help="YAML config whose keys become the defaults of the flags")
    return p


def _normalize_values(args: argparse.Namespace) -> None:
    # the original treated aa: None (the string) as "no auto-augment"
    if isinstance(args.aa, str) and args.aa.lower() == "none":
        args.aa = None


def parse_args(additional_args: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, str]:
    """Parse the train CLI (``additional_args`` instead of ``sys.argv[1:]`` when given).

    Returns ``(args, args_text)``: the namespace and its YAML dump (what goes to ``args.yaml``; its
    first line marks it as train.py's record, so ``-c <run>/args.yaml`` repeats the run).
    """
    import os

    from src.cli import setup_logging

    argv: List[str] = list(sys.argv[1:] if additional_args is None else additional_args)
    cfg_parser = config_parser()
    known, remaining = cfg_parser.parse_known_args(argv)
    parser = build_parser()
    if known.config:
        setup_logging(primary=os.environ.get("RANK", "0") == "0")  # the config's warning lines, once per job
        parser.set_defaults(**load_yaml_config(known.config, parser))
    args = parser.parse_args(remaining)
    args.config = known.config
    _normalize_values(args)
    from src.eval_config import explicit_dests

    given = explicit_dests(parser, remaining)  # what the command line itself sets (not the config or a default)
    parser.check(lambda a: check_args(a, given), args)
    args_text = ARGS_YAML_HEADER + yaml.safe_dump(namespace_to_dict(args), default_flow_style=False, sort_keys=True)
    return args, args_text


def namespace_to_dict(args: argparse.Namespace) -> Dict[str, Any]:
    out = {}
    for k, v in vars(args).items():
        if isinstance(v, tuple):
            v = list(v)
        out[k] = v
    return out


MAX_EPOCHS = 10 ** 7  # a schedule longer than this is a typo (--lr-cycle-limit 1000 --lr-cycle-mul 2)


def total_epochs(args: argparse.Namespace) -> int:
    """Epochs the schedule trains (timm's ``create_scheduler_v2``): cosine, tanh and poly run --lr-cycle-limit cycles
    of --epochs epochs (each --lr-cycle-mul times the previous), then --cooldown-epochs; the others --epochs."""
    if args.sched not in COOLDOWN_SCHEDULERS:
        return args.epochs
    cycles = max(1, args.lr_cycle_limit)
    if args.lr_cycle_mul == 1.0:
        return args.epochs * cycles + args.cooldown_epochs
    try:
        length = math.floor(-args.epochs * (args.lr_cycle_mul ** cycles - 1) / (1 - args.lr_cycle_mul))
    except OverflowError:  # a float power beyond float64: timm's own computation raised it, a traceback
        length = math.inf
    return length + args.cooldown_epochs if math.isfinite(length) else MAX_EPOCHS + 1


def _schedule_terms(args: argparse.Namespace) -> str:
    if args.sched not in COOLDOWN_SCHEDULERS:
        return f"--epochs {args.epochs}"
    cycles = f" x {args.lr_cycle_limit} cycles (--lr-cycle-limit, --lr-cycle-mul {args.lr_cycle_mul:g})" \
        if args.lr_cycle_limit > 1 else ""
    return f"--epochs {args.epochs}{cycles} + --cooldown-epochs {args.cooldown_epochs}"


def _check_sizes(args: argparse.Namespace) -> None:
    if args.input_size is not None and args.input_size[0] != 3:
        raise must("--input-size", "3 H W (this tool trains on 3-channel RGB images)", list(args.input_size))
    check_input_size(args)


def _mixup_active(a: argparse.Namespace) -> bool:
    return a.mixup > 0 or a.cutmix > 0 or a.cutmix_minmax is not None


_ADV = ("adv_training",)
_CLEAN_TRAINING = "--adv-training (clean training runs no attack)"


@dataclass(frozen=True)
class Needs:
    """A flag that acts only together with others: a value of ``dest`` other than ``off`` (its default) when
    ``active(args)`` is false would be silently ignored. ``partners``: the dests ``active`` reads; ``what``: what
    they must be, for the message."""

    dest: str
    off: Any
    partners: Tuple[str, ...]
    active: Callable[[argparse.Namespace], bool]
    what: str


# Not listed: keys the original's configs set without their partner (attack_eps, eps_schedule, attack_lr,
# finetuning_patch_size, model_ema_decay, cooldown_epochs under step, ...): those files must keep loading.
REQUIRES: Tuple[Needs, ...] = (
    Needs("attack", "pgd", _ADV, lambda a: bool(a.adv_training), _CLEAN_TRAINING),
    Needs("eval_attack_eps", None, _ADV, lambda a: bool(a.adv_training), _CLEAN_TRAINING),
    Needs("eval_attack_steps", None, _ADV, lambda a: bool(a.adv_training), _CLEAN_TRAINING),
    Needs("attack_mode", "eval", _ADV, lambda a: bool(a.adv_training), _CLEAN_TRAINING),
    Needs("adv_clean_logits", "train", _ADV, lambda a: a.adv_training == "pgd",
          "--adv-training pgd (TRADES and custom losses compute their own clean logits)"),
    Needs("zero_eps_epochs", 0, ("eps_schedule",), lambda a: a.eps_schedule != "constant",
          "--eps-schedule linear or sine (the constant schedule uses the full eps from epoch 0)"),
    Needs("bce_target_thresh", None, ("bce_loss",), lambda a: a.bce_loss, "--bce-loss"),
    Needs("amp_dtype", "auto", ("amp",), lambda a: a.amp, "--amp (training runs in float32)"),
    Needs("clip_mode", "norm", ("clip_grad",), lambda a: a.clip_grad is not None,
          "--clip-grad (nothing is clipped)"),
    Needs("reinit_patch_embedding", False, ("finetune",), lambda a: bool(a.finetune), "--finetune"),
    Needs("no_resume_opt", False, ("resume",), lambda a: bool(a.resume), "--resume"),
    Needs("mixup_off_epoch", 0, ("mixup", "cutmix", "cutmix_minmax"), _mixup_active,
          "--mixup, --cutmix or --cutmix-minmax"),
    Needs("combine_data_dir", None, ("combine_dataset",), lambda a: bool(a.combine_dataset), "--combine-dataset"),
    Needs("combined_dataset_ratio", 0.5, ("combine_dataset",), lambda a: bool(a.combine_dataset),
          "--combine-dataset"),
    Needs("monitor_every", 1, ("monitor_attack_steps",), lambda a: a.monitor_attack_steps is not None,
          "--monitor-attack-steps"),
    Needs("monitor_examples", 512, ("monitor_attack_steps",), lambda a: a.monitor_attack_steps is not None,
          "--monitor-attack-steps"),
    Needs("monitor_warn_gap", 20.0, ("monitor_attack_steps",), lambda a: a.monitor_attack_steps is not None,
          "--monitor-attack-steps"),
    Needs("resplit", False, ("aug_splits", "reprob"), lambda a: a.aug_splits >= 2 and a.reprob > 0,
          "--aug-splits >= 2 and --reprob > 0 (it keeps random erasing off the clean split)"),
)


def check_requirements(args: argparse.Namespace, given: Optional[Set[str]] = None) -> None:
    """Each ``REQUIRES`` flag set without what it needs is an error naming both. One case is an override, not a
    mistake: a config sets the flag and the command line (``given``: the dests it set) switches its partner off,
    e.g. ``-c adversarial.yaml --adv-training ''`` for a clean baseline; the config's value then rests unused."""
    for need in REQUIRES:
        value = getattr(args, need.dest)
        if value == need.off or need.active(args):
            continue
        if given is not None and need.dest not in given and any(p in given for p in need.partners):
            continue
        flag = "--" + need.dest.replace("_", "-")
        shown = "" if isinstance(value, bool) else " " + (value if isinstance(value, str) else show(value))
        raise UsageError(f"{flag}{shown} has no effect without {need.what}; add it or drop {flag}")


def check_args(args: argparse.Namespace, given: Optional[Set[str]] = None) -> None:
    """What one flag's rule cannot see: flags that must agree with each other, and refused values. ``given``: the
    dests the command line set (``src.eval_config.explicit_dests``; None: treat every value as given)."""
    _check_sizes(args)
    check_mean_std(args.mean, args.std)
    if not args.no_normalize:
        raise must("--no-normalize", "true: the training loader never normalizes (set normalize_model: true to "
                   "normalize inside the model)", False)
    if total_epochs(args) > MAX_EPOCHS:
        raise UsageError(f"the schedule would train more than {MAX_EPOCHS} epochs ({_schedule_terms(args)}); lower "
                         "--lr-cycle-limit or --lr-cycle-mul")
    if args.start_epoch is not None and args.start_epoch >= total_epochs(args):
        raise must("--start-epoch", f"below the {total_epochs(args)} epochs of the schedule ({_schedule_terms(args)}), "
                   "or nothing is trained", args.start_epoch)
    if args.sched == "step" and args.decay_epochs is None:
        raise must("--decay-epochs", "a number > 0 with --sched step", None)
    if args.tta:
        raise UsageError("--tta is not supported by train.py; evaluate with validate.py instead")
    if args.aug_splits == 1:
        raise must("--aug-splits", "0 or >= 2", args.aug_splits)
    if args.jsd_loss and args.aug_splits < 2:
        raise UsageError("--jsd-loss needs --aug-splits >= 2")
    if args.split_bn and args.aug_splits < 2:
        raise UsageError("--split-bn needs --aug-splits >= 2")
    if args.adv_training == "trades" and args.attack != "pgd":
        raise must("--attack", "pgd with --adv-training trades (TRADES maximizes the KL divergence to the clean "
                   "prediction; there is no target class)", args.attack)
    if args.eval_metric == "robust_top1" and not args.adv_training:
        raise UsageError("--eval-metric robust_top1 needs --adv-training (robust accuracy is not measured)")
    if args.reinit_patch_embedding and args.keep_patch_embedding:
        raise UsageError("--reinit-patch-embedding and --keep-patch-embedding exclude each other")
    if args.initial_checkpoint and args.finetune:
        raise UsageError("--initial-checkpoint and --finetune exclude each other (both load the starting weights; "
                         "the --finetune ones would silently replace the others): keep one")
    if args.drop_connect is not None and args.drop_path is not None:
        raise UsageError(f"--drop-connect {args.drop_connect:g} and --drop-path {args.drop_path:g}: --drop-connect is "
                         "the deprecated name of --drop-path (the --drop-path value would silently win); give one")
    if args.jsd_loss and args.bce_loss:
        raise UsageError("--jsd-loss and --bce-loss exclude each other (the JSD loss is a cross-entropy; timm would "
                         "silently drop --bce-loss)")
    check_requirements(args, given)
