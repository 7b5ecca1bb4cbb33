"""Every training flag, and YAML configs whose keys become the flags' defaults.

The flag set and defaults are the original's (timm ``bits_and_tpu`` train.py plus the paper's
additions, see original-behaviour.md §1.1). Differences, each listed in the README:

* a YAML key that is not a flag is an error naming the key and the closest flag (the original
  silently accepted typos);
* ``data_dir`` is optional (the embedded ``digits`` dataset needs none) and may come from the YAML;
* ``--no-normalize`` keeps its effect (the training loader never normalizes) but is honest about it;
* flags the original accepted and ignored are either implemented or rejected with a clear error.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from src.arg_parser.common import CliParser, bool_flag, check_mean_std, load_yaml_config, norm_name
from src.errors import UsageError


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Dataset")
    g.add_argument("data_dir", metavar="DIR", nargs="?", default=None,
                   help="path to the dataset root (not needed for the embedded 'digits' dataset; may be set "
                        "in the YAML as data_dir)")
    g.add_argument("--dataset", "-d", metavar="NAME", default="",
                   help="dataset: '' (image folder), 'digits' (embedded), torch/<name>, hfds/<name>, tfds/<name>")
    g.add_argument("--train-split", metavar="NAME", default="train", help="training split (default: train)")
    g.add_argument("--val-split", metavar="NAME", default="validation",
                   help="validation split (default: validation)")
    g.add_argument("--combine-dataset", metavar="NAME", default=None,
                   help="second training dataset mixed into every batch (e.g. tfds/cifar_ddpm)")
    g.add_argument("--combine-data-dir", metavar="DIR", default=None,
                   help="root of the combined dataset (default: data_dir)")
    g.add_argument("--combined-dataset-ratio", type=float, default=0.5,
                   help="fraction of each batch drawn from the combined dataset (default: 0.5)")
    g.add_argument("--epoch-repeats", type=float, default=0.0,
                   help="epoch repeat multiplier for iterable datasets (default: 0)")
    g.add_argument("--workers", "-j", type=int, default=4, metavar="N",
                   help="data loading workers per process (default: 4)")
    bool_flag(g, "--pin-mem", help="pin CPU memory in the data loader")
    bool_flag(g, "--use-multi-epochs-loader", help="keep loader workers alive between epochs")
    bool_flag(g, "--use-mp-loader", help="on XLA, wrap loaders in torch_xla's MpDeviceLoader")
    g.add_argument("--train-num-samples", type=int, default=None, metavar="N",
                   help="smoke test: train on a fixed random subset of N training images (the same every "
                        "epoch, resume and seed)")
    g.add_argument("--val-num-samples", type=int, default=None, metavar="N",
                   help="smoke test: evaluate each epoch on a fixed random subset of N validation images")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Model")
    g.add_argument("--model", default="resnet50", metavar="MODEL", help="timm model name (default: resnet50)")
    bool_flag(g, "--pretrained", help="start from timm's pretrained weights (needs the network)")
    g.add_argument("--initial-checkpoint", default="", metavar="PATH",
                   help="load these weights into the model before training")
    g.add_argument("--resume", default="", metavar="PATH",
                   help="resume model, EMA, optimizer and schedule from a checkpoint "
                        "('auto': the newest last/recovery checkpoint of the experiment folder)")
    bool_flag(g, "--no-resume-opt", help="do not restore the optimizer state when resuming")
    g.add_argument("--num-classes", type=int, default=None, metavar="N", help="number of classes")
    g.add_argument("--gp", default=None, metavar="POOL", help="global pool type (fast, avg, max, avgmax, ...)")
    g.add_argument("--img-size", type=int, default=None, metavar="N", help="image size")
    g.add_argument("--input-size", default=None, nargs=3, type=int, metavar="N",
                   help="input dimensions C H W (default: the model's)")
    g.add_argument("--crop-pct", default=None, type=float, metavar="PCT", help="eval center-crop fraction")
    g.add_argument("--mean", type=float, nargs="+", default=None, metavar="MEAN", help="dataset mean")
    g.add_argument("--std", type=float, nargs="+", default=None, metavar="STD", help="dataset std")
    g.add_argument("--interpolation", default="", type=str, metavar="NAME", help="eval resize interpolation")
    g.add_argument("-b", "--batch-size", type=int, default=256, metavar="N", help="batch size per process")
    g.add_argument("-vb", "--validation-batch-size", type=int, default=None, metavar="N",
                   help="validation batch size (default: --batch-size)")
    g.add_argument("-nn", "--no-normalize", action="store_true", default=True,
                   help="the training loader never normalizes: inputs stay in [0, 1] (always on, as in the "
                        "original; use --normalize-model to normalize inside the model)")
    bool_flag(g, "--normalize-model",
               help="prepend (x - mean) / std to the model, with --mean/--std or the model's defaults")
    g.add_argument("--finetune", default=None, metavar="PATH",
                   help="fine-tune from this checkpoint: wrong-shape classifier weights are dropped")
    g.add_argument("--finetuning-patch-size", type=int, default=None, metavar="N",
                   help="XCiT patch size to adapt the model to before loading --finetune weights")
    bool_flag(g, "--reinit-patch-embedding", help="with --finetune, do not load the patch embedding weights")
    bool_flag(g, "--keep-patch-embedding",
               help="with --finetune, load the patch embedding weights (the default; kept for the configs)")
    bool_flag(g, "--trust-checkpoint",
               help="allow checkpoints that need arbitrary unpickling (runs code from the file)")
    bool_flag(g, "--torchscript", help="build the model scriptable")


def _add_optim_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Optimizer")
    g.add_argument("--opt", default="sgd", metavar="NAME", help="optimizer (default: sgd)")
    g.add_argument("--opt-eps", default=None, type=float, metavar="EPS", help="optimizer epsilon")
    g.add_argument("--opt-betas", default=None, type=float, nargs="+", metavar="BETA", help="optimizer betas")
    g.add_argument("--momentum", type=float, default=0.9, metavar="M", help="SGD momentum (default: 0.9)")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="weight decay (default: 1e-4)")
    g.add_argument("--clip-grad", type=float, default=None, metavar="NORM", help="gradient clipping value")
    g.add_argument("--clip-mode", type=str, default="norm", choices=["norm", "value", "agc"],
                   help="gradient clipping mode (default: norm)")


def _add_sched_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Learning rate schedule")
    g.add_argument("--sched", default="cosine", metavar="NAME", help="LR scheduler (default: cosine)")
    g.add_argument("--lr", type=float, default=0.1, metavar="LR",
                   help="learning rate (default: 0.1; null in YAML = scale --lr-base by the batch size)")
    g.add_argument("--lr-base", type=float, default=0.1, metavar="LR", help="base LR for batch --lr-base-size")
    g.add_argument("--lr-base-size", type=int, default=256, metavar="N", help="batch size of --lr-base")
    g.add_argument("--lr-base-scale", type=str, default="", metavar="SCALE",
                   help="'linear' or 'sqrt' (default: sqrt for adam/lamb/adabelief, else linear)")
    g.add_argument("--lr-noise", type=float, nargs="+", default=None, metavar="pct", help="LR noise on/off epochs")
    g.add_argument("--lr-noise-pct", type=float, default=0.67, help="LR noise limit percent")
    g.add_argument("--lr-noise-std", type=float, default=1.0, help="LR noise std-dev")
    g.add_argument("--lr-cycle-mul", type=float, default=1.0, help="LR cycle length multiplier")
    g.add_argument("--lr-cycle-decay", type=float, default=0.5, help="LR decay per cycle")
    g.add_argument("--lr-cycle-limit", type=int, default=1, help="LR cycle limit")
    g.add_argument("--lr-k-decay", type=float, default=1.0, help="LR k-decay for cosine/poly")
    g.add_argument("--warmup-lr", type=float, default=1e-4, help="warm-up LR (default: 1e-4)")
    g.add_argument("--min-lr", type=float, default=1e-5, help="lower LR bound (default: 1e-5)")
    g.add_argument("--epochs", type=int, default=300, help="epochs (cosine adds --cooldown-epochs)")
    g.add_argument("--start-epoch", default=None, type=int,
                   help="first epoch number (overrides the resumed epoch)")
    g.add_argument("--decay-milestones", default=[30, 60], type=int, nargs="+", help="multistep milestones")
    g.add_argument("--decay-epochs", type=float, default=100, help="epoch interval to decay LR")
    g.add_argument("--warmup-epochs", type=int, default=5, help="LR warm-up epochs")
    g.add_argument("--cooldown-epochs", type=int, default=10, help="epochs at min LR after a cyclic schedule")
    g.add_argument("--patience-epochs", type=int, default=10, help="plateau patience")
    g.add_argument("--decay-rate", "--dr", type=float, default=0.1, help="LR decay rate")
    g.add_argument("--max-train-steps", type=int, default=None, metavar="N",
                   help="smoke test: every epoch ends after N optimizer steps (the schedule counts N steps "
                        "per epoch)")


def _add_aug_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Augmentation and regularization")
    bool_flag(g, "--no-aug", help="no training augmentation (resize + center crop)")
    g.add_argument("--scale", type=float, nargs=2, default=[0.08, 1.0], metavar="PCT", help="RRC scale range")
    g.add_argument("--ratio", type=float, nargs=2, default=[3.0 / 4.0, 4.0 / 3.0], metavar="RATIO",
                   help="RRC aspect ratio range")
    g.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability")
    g.add_argument("--vflip", type=float, default=0.0, help="vertical flip probability")
    g.add_argument("--color-jitter", type=float, default=0.4, metavar="PCT",
                   help="color jitter factor (default: 0.4; null disables)")
    g.add_argument("--aa", type=str, default=None, metavar="NAME",
                   help="auto-augment policy, e.g. rand-m9-mstd0.5-inc1 ('None' disables)")
    g.add_argument("--aug-splits", type=int, default=0, help="number of augmentation splits (0 or >= 2)")
    bool_flag(g, "--jsd-loss", help="Jensen-Shannon divergence + CE loss (needs --aug-splits)")
    bool_flag(g, "--bce-loss", help="binary cross-entropy loss")
    g.add_argument("--bce-target-thresh", type=float, default=None, help="BCE target threshold")
    g.add_argument("--reprob", type=float, default=0.0, metavar="PCT", help="random erase probability")
    g.add_argument("--remode", type=str, default="pixel", choices=["pixel", "rand", "const"],
                   help="random erase fill mode (default: pixel)")
    g.add_argument("--recount", type=int, default=1, help="random erase count")
    bool_flag(g, "--resplit", help="do not random-erase the first (clean) augmentation split")
    g.add_argument("--mixup", type=float, default=0.0, help="mixup alpha")
    g.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha")
    g.add_argument("--cutmix-minmax", type=float, nargs=2, default=None, help="cutmix min/max ratio")
    g.add_argument("--mixup-prob", type=float, default=1.0, help="mixup/cutmix probability per batch")
    g.add_argument("--mixup-switch-prob", type=float, default=0.5, help="probability of cutmix over mixup")
    g.add_argument("--mixup-mode", type=str, default="batch", help="batch, pair or elem")
    g.add_argument("--mixup-off-epoch", default=0, type=int, help="epoch at which mixup is turned off")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing (default: 0.1)")
    g.add_argument("--train-interpolation", type=str, default="random", help="training interpolation")
    g.add_argument("--drop", type=float, default=0.0, metavar="PCT", help="dropout rate")
    g.add_argument("--drop-connect", type=float, default=None, metavar="PCT", help="drop connect (deprecated)")
    g.add_argument("--drop-path", type=float, default=None, metavar="PCT", help="drop path rate")
    g.add_argument("--drop-block", type=float, default=None, metavar="PCT", help="drop block rate")
    g.add_argument("--rand-rotation", type=float, default=0, metavar="DEG", help="random rotation in degrees")
    bool_flag(g, "--rand-crop", help="RandomCrop(size, padding=--pad) instead of RandomResizedCrop")
    g.add_argument("--pad", type=int, default=0, metavar="PIXELS",
                   help="padding for --rand-crop, or a Pad before RandomResizedCrop")


def _add_bn_ema_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("BatchNorm and EMA")
    g.add_argument("--bn-momentum", type=float, default=None, help="BatchNorm momentum")
    g.add_argument("--bn-eps", type=float, default=None, help="BatchNorm epsilon")
    bool_flag(g, "--sync-bn", help="synchronized BatchNorm (distributed)")
    g.add_argument("--dist-bn", type=str, default="reduce", choices=["broadcast", "reduce", ""],
                   help="distribute BatchNorm stats after each epoch: reduce, broadcast or '' (default: reduce)")
    bool_flag(g, "--split-bn", help="separate BatchNorm per augmentation split")
    bool_flag(g, "--model-ema", help="keep an exponential moving average of the weights")
    g.add_argument("--model-ema-decay", type=float, default=0.9998, help="EMA decay (default: 0.9998)")


def _add_adv_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Adversarial training")
    g.add_argument("--adv-training", type=str, default=None, metavar="LOSS",
                   help="pgd, trades, or module.path:ClassName of a custom loss (default: clean training)")
    g.add_argument("--attack", type=str, default="pgd", help="training attack: pgd or targeted_pgd")
    g.add_argument("--attack-eps", "--eps", type=float, default=4,
                   help="final epsilon, in /255 units (default: 4)")
    g.add_argument("--eps-schedule", type=str, default="constant", choices=["constant", "linear", "sine"],
                   help="epsilon warm-up schedule, per epoch (default: constant)")
    g.add_argument("--eps-schedule-period", type=int, default=10, help="epoch at which full eps is reached")
    g.add_argument("--zero-eps-epochs", type=int, default=0, help="initial epochs with eps 0")
    g.add_argument("--attack-lr", type=float, default=None,
                   help="attack step size in /255 units (default: 1.5 * eps / steps)")
    g.add_argument("--attack-steps", type=int, default=10, help="PGD steps (training and per-epoch eval)")
    g.add_argument("--attack-norm", "--threat-model", type=norm_name, default="linf", choices=["linf", "l2"],
                   help="threat model")
    g.add_argument("--attack-boundaries", type=int, nargs=2, default=(0, 1), metavar="L",
                   help="clipping box of adversarial inputs (default: 0 1)")
    g.add_argument("--eval-attack-eps", type=float, default=None, help="eval epsilon, /255 (default: --attack-eps)")
    g.add_argument("--trades-beta", type=float, default=6.0, help="TRADES robust loss weight (default: 6)")
    g.add_argument("--attack-mode", type=str, default="eval", choices=["eval", "train"],
                   help="model mode while crafting: eval (default, every backend) or train (what the "
                        "original did on TPU: BN statistics and dropout active)")
    g.add_argument("--adv-clean-logits", type=str, default="train", choices=["train", "nograd", "skip"],
                   help="PGD training: clean logits for metrics computed in train mode with a graph "
                        "(original), without graph and BN update (nograd), or not at all (skip)")
    g.add_argument("--eval-attack-steps", type=int, default=None, metavar="N",
                   help="PGD steps of the per-epoch evaluation (default: --attack-steps, as the original); "
                        "step size --attack-lr or 1.5 * eps / N")
    g.add_argument("--monitor-attack-steps", type=int, default=None, metavar="K",
                   help="attack-strength monitor: measure the relative robust-loss gap (L_K - L_train) / L_K "
                        "between the training attack and PGD-K (step 1.5 * eps / K) at the epoch's eps; "
                        "written to summary.csv (monitor_gap, in %%) and W&B (default: off)")
    g.add_argument("--monitor-every", type=int, default=1, metavar="N",
                   help="run the monitor every N epochs (and after the last one)")
    g.add_argument("--monitor-examples", type=int, default=512, metavar="N",
                   help="fixed random validation subset the monitor attacks")
    g.add_argument("--monitor-warn-gap", type=float, default=20.0, metavar="PCT",
                   help="warn when the monitor's gap exceeds PCT %% (healthy runs in the paper's data: "
                        "PGD-1 vs PGD-200 at most 12.7 %%)")


def _add_misc_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Miscellaneous")
    g.add_argument("--seed", type=int, default=42, metavar="S", help="random seed (default: 42)")
    bool_flag(g, "--deterministic", help="deterministic algorithms (reproducible CPU runs)")
    g.add_argument("--log-interval", type=int, default=50, metavar="N", help="steps between log lines")
    g.add_argument("--recovery-interval", type=int, default=0, metavar="N",
                   help="steps between recovery checkpoints (0: none)")
    g.add_argument("--checkpoint-hist", type=int, default=10, metavar="N", help="checkpoints to keep")
    bool_flag(g, "--save-images", help="save the first training batch as a PNG grid in the output folder")
    bool_flag(g, "--amp", help="mixed precision (bfloat16 autocast; float16 + grad scaler on CUDA)")
    g.add_argument("--amp-dtype", type=str, default="bfloat16", choices=["bfloat16", "float16"],
                   help="autocast dtype with --amp (default: bfloat16)")
    bool_flag(g, "--channels-last", help="channels-last memory layout")
    g.add_argument("--output", default="", metavar="PATH",
                   help="output root, local or gs:// (default: ./output/train)")
    g.add_argument("--experiment", default="", metavar="NAME",
                   help="experiment folder name (default: <date>-<time>-<model>-<size>)")
    g.add_argument("--eval-metric", default="top1", metavar="METRIC",
                   help="checkpoint selection metric: top1, robust_top1 or loss (default: top1)")
    bool_flag(g, "--skip-nonfinite",
               help="skip optimizer steps with a non-finite loss or gradient (counted in the log) "
                    "instead of stopping")
    g.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                   help="set by torch.distributed.launch")
    bool_flag(g, "--force-cpu", help="run on the CPU even when an accelerator is present")
    bool_flag(g, "--log-wandb", help="log to Weights & Biases (project = --experiment)")
    g.add_argument("--run-notes", type=str, default="", help="W&B run notes")
    g.add_argument("--tta", type=int, default=0, help="not supported by train.py (use validate.py)")
    bool_flag(g, "--checkpoint-full-state",
              help="keep optimizer, grad-scaler and scheduler state in every checkpoint (the original's layout); "
                   "by default only last.pth.tar and recovery files, which resuming needs, keep them")
    bool_flag(g, "--checkpoint-weights-only",
              help="checkpoint-<epoch> and best files keep one set of weights: the ones their metric was "
                   "measured on (the EMA's with --model-ema, stored as 'model'), plus metadata")


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(prog="train.py", description="(Adversarial) training of timm image classifiers",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-c", "--config", default="", type=str, metavar="FILE",
                   help="YAML config whose keys become the defaults of the flags (the command line overrides)")
    for add in (_add_data_args, _add_model_args, _add_optim_args, _add_sched_args, _add_aug_args,
                _add_bn_ema_args, _add_adv_args, _add_misc_args):
        add(p)
    return p


def config_parser() -> argparse.ArgumentParser:
    p = CliParser(prog="train.py", add_help=False)
    p.add_argument("-c", "--config", default="", type=str, metavar="FILE",
                   help="YAML config whose keys become the defaults of the flags")
    return p


def _normalize_yaml_values(cfg: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(cfg)
    # the original treated aa: None (the string) as "no auto-augment"
    if isinstance(out.get("aa"), str) and out["aa"].lower() == "none":
        out["aa"] = None
    return out


def parse_args(additional_args: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, str]:
    """Parse the train CLI (``additional_args`` instead of ``sys.argv[1:]`` when given).

    Returns ``(args, args_text)``: the namespace and its YAML dump (what goes to ``args.yaml``).
    """
    argv: List[str] = list(sys.argv[1:] if additional_args is None else additional_args)
    cfg_parser = config_parser()
    known, remaining = cfg_parser.parse_known_args(argv)
    parser = build_parser()
    if known.config:
        cfg = _normalize_yaml_values(load_yaml_config(known.config, parser))
        parser.set_defaults(**cfg)
    args = parser.parse_args(remaining)
    args.config = known.config
    check_args(args)
    args_text = yaml.safe_dump(namespace_to_dict(args), default_flow_style=False, sort_keys=True)
    return args, args_text


def namespace_to_dict(args: argparse.Namespace) -> Dict[str, Any]:
    out = {}
    for k, v in vars(args).items():
        if isinstance(v, tuple):
            v = list(v)
        out[k] = v
    return out


def check_args(args: argparse.Namespace) -> None:
    """Reject values that would otherwise give a silent wrong result or a crash deep inside."""
    if args.attack_eps is not None and args.attack_eps < 0:
        raise UsageError(f"--attack-eps must be >= 0, got {args.attack_eps}")
    if args.eval_attack_eps is not None and args.eval_attack_eps < 0:
        raise UsageError(f"--eval-attack-eps must be >= 0, got {args.eval_attack_eps}")
    if args.attack_steps is None or args.attack_steps < 0:
        raise UsageError(f"--attack-steps must be >= 0, got {args.attack_steps}")
    if args.attack_lr is not None and args.attack_lr < 0:
        raise UsageError(f"--attack-lr must be >= 0, got {args.attack_lr}")
    if args.attack not in ("pgd", "targeted_pgd"):
        raise UsageError(f"--attack must be pgd or targeted_pgd for training, got '{args.attack}'")
    if args.eps_schedule_period < 0 or args.zero_eps_epochs < 0:
        raise UsageError("--eps-schedule-period and --zero-eps-epochs must be >= 0")
    check_mean_std(args.mean, args.std)
    if args.input_size is not None and args.input_size[0] != 3:
        raise UsageError(f"--input-size {' '.join(map(str, args.input_size))}: this tool trains on 3-channel (RGB) "
                         f"images, so C must be 3")
    if args.batch_size is None or args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.epochs is None or args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {args.epochs}")
    if args.tta:
        raise UsageError("--tta is not supported by train.py; evaluate with validate.py instead")
    if args.aug_splits and args.aug_splits < 2 and args.aug_splits != 0:
        raise UsageError("--aug-splits must be 0 or >= 2")
    if args.jsd_loss and args.aug_splits < 2:
        raise UsageError("--jsd-loss needs --aug-splits >= 2")
    if args.split_bn and args.aug_splits < 2:
        raise UsageError("--split-bn needs --aug-splits >= 2")
    if args.eval_metric not in ("top1", "robust_top1", "loss", "top5"):
        raise UsageError(f"--eval-metric must be top1, robust_top1 or loss, got '{args.eval_metric}'")
    if args.eval_metric == "robust_top1" and not args.adv_training:
        raise UsageError("--eval-metric robust_top1 needs --adv-training (robust accuracy is not measured)")
    if args.combine_dataset and not 0 < args.combined_dataset_ratio < 1:
        raise UsageError("--combined-dataset-ratio must be in (0, 1)")
    if args.reinit_patch_embedding and args.keep_patch_embedding:
        raise UsageError("--reinit-patch-embedding and --keep-patch-embedding exclude each other")
