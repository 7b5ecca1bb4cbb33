"""Turn parsed arguments into the training task: model, data config, optimizer, schedule, losses.

Each function is a small factory over timm's own (``create_model``, ``resolve_data_config``,
``create_optimizer_v2``, ``create_scheduler_v2``) plus what timm lacks (adversarial losses,
normalization inside the model, fine-tuning, the pluggable loss interface).
"""
from __future__ import annotations

import argparse
import inspect
import logging
import math
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from src.attacks import AdvTrainingLoss, TRADESLoss, make_attack, resolve_attack_cfg  # noqa: F401
from src.errors import UsageError

_logger = logging.getLogger("robust_vits")


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------

def create_model(args: argparse.Namespace) -> nn.Module:
    """The training model through ``src.model_factory`` (timm registry + our models, with the
    drop-rate / BatchNorm / pooling / image-size overrides), then ``--initial-checkpoint`` or
    ``--finetune`` weights. ``args`` is not changed: the class count of a model built without
    ``--num-classes`` is ``model.num_classes``."""
    from src.model_factory import create_model as factory_create

    drop_path = args.drop_path if args.drop_path is not None else args.drop_connect
    model = factory_create(args.model, pretrained=args.pretrained, scriptable=args.torchscript or None,
                           num_classes=args.num_classes, drop_rate=args.drop, drop_path_rate=drop_path,
                           drop_block_rate=args.drop_block, global_pool=args.gp, bn_momentum=args.bn_momentum,
                           bn_eps=args.bn_eps,
                           img_size=args.img_size or (args.input_size[-1] if args.input_size else None))
    if args.initial_checkpoint:
        from src.checkpoint import load_model_weights

        # timm's choice: a checkpoint's EMA weights when it has them; said, so it is never a surprise
        report = load_model_weights(model, args.initial_checkpoint, use_ema=True, strict=True,
                                    trust=getattr(args, "trust_checkpoint", False))
        _logger.info("--initial-checkpoint: starting from the %s weights of %s%s", report.state_key,
                     args.initial_checkpoint, " (its EMA weights, preferred as in timm)"
                     if report.state_key in ("model_ema", "state_dict_ema") else "")
    if args.finetune:
        from src.checkpoint import finetune_from_checkpoint

        if args.num_classes is None:
            raise UsageError("--finetune needs --num-classes (the new dataset's number of classes)")
        finetune_from_checkpoint(model, args.finetune, num_classes=args.num_classes,
                                 finetuning_patch_size=args.finetuning_patch_size,
                                 reinit_patch_embedding=args.reinit_patch_embedding,
                                 trust=getattr(args, "trust_checkpoint", False))
    return model


def resolve_data_config(args: argparse.Namespace, model: nn.Module, verbose: bool = False) -> Dict[str, Any]:
    from timm.data import resolve_data_config as timm_resolve

    cfg = timm_resolve(vars(args), model=model, verbose=verbose)
    for key in ("mean", "std"):
        v = cfg.get(key)
        if v is not None and len(v) == 1:
            cfg[key] = tuple(v) * 3
    return cfg


def model_mean_std(args: argparse.Namespace, data_config: Dict[str, Any]) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """``--normalize-model``'s mean/std: the flags, else the model's defaults (model_factory's order)."""
    from src.model_factory import resolve_normalization

    mean, std, _ = resolve_normalization(args.mean, args.std, None, (data_config["mean"], data_config["std"]))
    if len(mean) != 3 or len(std) != 3:
        raise UsageError(f"--mean/--std need 3 values (RGB), got {len(mean)} and {len(std)}")
    return mean, std


# ----------------------------------------------------------------------------------------------
# Optimizer and schedule
# ----------------------------------------------------------------------------------------------

SQRT_SCALED_OPTIMIZERS = ("adam", "lamb", "adabelief")


def default_lr_base_scale(opt: str) -> str:
    """The original's rule: square-root scaling for optimizers whose name contains adam, lamb or
    adabelief (adamw, nadam, radam, lambc, ...), linear for every other (sgd, adagrad, adafactor, adan)."""
    name = opt.lower()
    return "sqrt" if any(o in name for o in SQRT_SCALED_OPTIMIZERS) else "linear"


def scale_lr(args: argparse.Namespace, world_size: int) -> float:
    """The ``--lr-base`` rule of §1.1 step 5; only applies when ``lr`` is null (None)."""
    if args.lr is not None:
        return args.lr
    global_batch = args.batch_size * world_size
    ratio = global_batch / args.lr_base_size
    scale = args.lr_base_scale
    if not scale:
        scale = default_lr_base_scale(args.opt)
    if scale == "sqrt":
        ratio = math.sqrt(ratio)
    elif scale != "linear":
        raise UsageError(f"--lr-base-scale must be linear or sqrt, got '{scale}'")
    lr = args.lr_base * ratio
    _logger.info("learning rate %.3g = base %.3g x %s(%d / %d)", lr, args.lr_base, scale, global_batch,
                 args.lr_base_size)
    return lr


def _check_optimizer_options(args: argparse.Namespace) -> None:
    """--opt-betas / --opt-eps against what the optimizer takes (timm's registry): timm silently keeps only the
    first betas when there are too many, fails with an IndexError when there are too few, and drops the ones an
    optimizer has no use for (SGD has neither)."""
    from timm.optim import get_optimizer_info

    name = str(getattr(args, "opt", "")).lower().split("_")[-1]
    try:
        info = get_optimizer_info(name)
    except ValueError:
        return  # an unknown name: timm's own error, turned into one line by create_optimizer
    betas = getattr(args, "opt_betas", None)
    if betas is not None and info.has_betas and len(betas) != info.num_betas:
        raise UsageError(f"--opt-betas: optimizer '{args.opt}' takes {info.num_betas} betas, got {len(betas)} "
                         f"({' '.join(format(b, 'g') for b in betas)})")
    ignored = []
    if betas is not None and not info.has_betas:
        ignored.append(f"--opt-betas {' '.join(format(b, 'g') for b in betas)}")
    eps = getattr(args, "opt_eps", None)
    if eps is not None and not info.has_eps:
        ignored.append(f"--opt-eps {eps:g}")
    if ignored:
        _logger.warning("%s: no effect with optimizer '%s', which has no such parameter", " and ".join(ignored),
                        args.opt)


def create_optimizer(args: argparse.Namespace, model: nn.Module, lr: Optional[float] = None) -> torch.optim.Optimizer:
    """timm's optimizer factory; ``lr`` (e.g. from ``scale_lr``) overrides ``args.lr`` without changing args."""
    from timm.optim import create_optimizer_v2, optimizer_kwargs

    cfg = args if lr is None else argparse.Namespace(**{**vars(args), "lr": lr})
    _check_optimizer_options(args)
    try:
        return create_optimizer_v2(model, **optimizer_kwargs(cfg=cfg))
    except (AssertionError, ValueError) as e:
        raise UsageError(f"cannot create optimizer '{args.opt}': {e}") from None


def create_scheduler(args: argparse.Namespace, optimizer: torch.optim.Optimizer, updates_per_epoch: int):
    """timm's scheduler factory; returns ``(scheduler, num_epochs)`` (cosine: epochs + cooldown)."""
    import warnings

    from timm.scheduler import create_scheduler_v2, scheduler_kwargs

    try:
        with warnings.catch_warnings():
            # timm's deprecation note says a plateau schedule's state is not saved in checkpoints and a resumed
            # run restarts it: not so here (scheduler_state / restore_scheduler_state keep it), so it is replaced
            # by a true line below
            warnings.filterwarnings("ignore", message="PlateauLRScheduler is deprecated", category=FutureWarning)
            created = create_scheduler_v2(optimizer, **scheduler_kwargs(args), updates_per_epoch=updates_per_epoch)
    except (AssertionError, ValueError) as e:
        raise UsageError(f"cannot create scheduler '{args.sched}': {e}") from None
    if _plateau(created[0]) is not None:
        _logger.info("--sched plateau: timm deprecates its plateau scheduler (a future timm may drop it); its "
                     "state (best metric, patience and cooldown counters) is saved in this project's checkpoints, "
                     "so a resumed run continues the plateau logic")
    return created


def schedule_warnings(args: argparse.Namespace) -> List[str]:
    """Settings timm accepts that leave part of the schedule unused (a warning each, not an error: they are legal)."""
    from src.arg_parser.train import total_epochs

    out = []
    epochs = total_epochs(args)
    if args.warmup_epochs and args.warmup_epochs >= epochs:
        out.append(f"--warmup-epochs {args.warmup_epochs} is not below the {epochs} epochs of the schedule: the "
                   f"LR rises from --warmup-lr {args.warmup_lr:g} for the whole run and never reaches --lr; lower "
                   "--warmup-epochs (e.g. --warmup-epochs 0)")
    if args.sched == "multistep":
        late = [m for m in args.decay_milestones if m >= epochs]
        if late:
            out.append(f"--decay-milestones {' '.join(map(str, late))} at or after the last epoch ({epochs - 1}): "
                       "the LR is never decayed there")
    elif args.sched == "step" and args.decay_epochs is not None and args.decay_epochs >= epochs:
        out.append(f"--decay-epochs {args.decay_epochs:g} is not below the {epochs} epochs: the LR is never decayed")
    if args.adv_training:
        from src.honesty import attack_setting_warnings

        for eps in dict.fromkeys([args.attack_eps, args.eval_attack_eps if args.eval_attack_eps is not None
                                  else args.attack_eps]):
            out += attack_setting_warnings(args.attack, args.attack_norm, eps, args.attack_lr)
    if args.adv_training and args.attack_steps == 0 and args.eval_attack_steps is None:
        out.append("--attack-steps 0: training and the per-epoch robust_top1 use the attack's random start only "
                   "(uniform noise in the eps ball, no gradient step); pass --eval-attack-steps K for a robust "
                   "accuracy under a real attack")
    return out


# Settings the original's configs give without the option they act through (so they must keep loading: a warning,
# not an error like src.arg_parser.train.REQUIRES): dest -> (is it in effect?, what it needs). Not listed:
# model_ema_decay, which every one of the paper's configs sets with model_ema off (a warning on every run).
_NEEDS_ADV = (lambda a: bool(a.adv_training), "--adv-training (clean training runs no attack)")
_NO_AUG = (lambda a: not a.no_aug, "training augmentation (--no-aug keeps only resize and center crop)")
_WARN_WITHOUT = {
    "attack_eps": _NEEDS_ADV, "attack_lr": _NEEDS_ADV, "eps_schedule": _NEEDS_ADV, "eps_schedule_period": _NEEDS_ADV,
    "attack_norm": _NEEDS_ADV, "attack_boundaries": _NEEDS_ADV,
    "trades_beta": (lambda a: a.adv_training not in ("", "pgd"), "--adv-training trades (or a loss taking beta)"),
    "finetuning_patch_size": (lambda a: bool(a.finetune), "--finetune"),
    **{dest: _NO_AUG for dest in ("aa", "color_jitter", "scale", "ratio", "hflip", "vflip", "rand_crop", "pad",
                                  "train_interpolation")},
}


def unused_setting_warnings(args: argparse.Namespace) -> List[str]:
    """Values other than their default for settings that act only through an option this run does not use."""
    from src.arg_parser.train import build_parser

    parser = build_parser()
    out = []
    for dest, (active, needs) in _WARN_WITHOUT.items():
        value, default = getattr(args, dest, None), parser.get_default(dest)
        if isinstance(value, tuple):
            value = list(value)
        if isinstance(default, tuple):
            default = list(default)
        if value != default and not active(args):
            out.append(f"--{dest.replace('_', '-')} {value} has no effect without {needs}")
    return out


# What a metric-driven schedule (--sched plateau) learned from the epochs so far; every other schedule is a
# function of the epoch and the arguments, rebuilt from them on resume (so --epochs or --lr may change).
_PLATEAU_COUNTERS = ("best", "num_bad_epochs", "cooldown_counter", "last_epoch")


def _plateau(lr_scheduler) -> Optional[torch.optim.lr_scheduler.ReduceLROnPlateau]:
    inner = getattr(lr_scheduler, "lr_scheduler", None)
    return inner if isinstance(inner, torch.optim.lr_scheduler.ReduceLROnPlateau) else None


def scheduler_state(lr_scheduler) -> Dict[str, Any]:
    """The scheduler's entry of a checkpoint: timm's ``state_dict()`` plus, for ``plateau``, the counters
    timm leaves out (epochs without improvement, cooldown) and the LR before its noise."""
    state = dict(lr_scheduler.state_dict())
    plateau = _plateau(lr_scheduler)
    if plateau is not None:
        state["plateau"] = {k: getattr(plateau, k) for k in _PLATEAU_COUNTERS}
        state["restore_lr"] = getattr(lr_scheduler, "restore_lr", None)
    return state


def restore_scheduler_state(lr_scheduler, state: Optional[Dict[str, Any]]) -> None:
    """Resume: put back what a metric-driven schedule learned (``scheduler_state``). A plateau schedule
    rebuilt from the arguments alone forgets its best metric and patience, so a resumed run would cut the LR
    epochs later than the uninterrupted one. Other schedules keep the state the arguments give."""
    plateau = _plateau(lr_scheduler)
    if plateau is None or not isinstance(state, dict):
        return
    counters = state.get("plateau") or {k: state[k] for k in ("best", "last_epoch") if k in state}  # older files
    for k, v in counters.items():
        if k in _PLATEAU_COUNTERS:
            setattr(plateau, k, v)
    if state.get("restore_lr") is not None:
        lr_scheduler.restore_lr = list(state["restore_lr"])


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------

class CleanTrainingLoss(nn.Module):
    """The loss interface for clean training: ``(loss, clean_logits, None)``."""

    def __init__(self, criterion: nn.Module):
        super().__init__()
        self.criterion = criterion

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int):
        logits = model(x)
        return self.criterion(logits, y), logits, None


def mixup_active(args: argparse.Namespace) -> bool:
    return args.mixup > 0 or args.cutmix > 0.0 or args.cutmix_minmax is not None


def create_mixup(args: argparse.Namespace, num_classes: Optional[int]):
    """timm's Mixup (mixup / cutmix, with label smoothing) when either is active, else None."""
    if not mixup_active(args):
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                 prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=args.smoothing, num_classes=num_classes)


def create_natural_criterion(args: argparse.Namespace) -> nn.Module:
    """Loss selection of §1.1 step 8 (JSD / soft-target / BCE / label smoothing / CE); ``--bce-loss`` is BCE
    also with ``--smoothing 0`` (the original fell back to cross-entropy there, ignoring the flag)."""
    from timm.loss import (BinaryCrossEntropy, JsdCrossEntropy, LabelSmoothingCrossEntropy,
                           SoftTargetCrossEntropy)

    if args.jsd_loss:
        return JsdCrossEntropy(num_splits=args.aug_splits, smoothing=args.smoothing)
    if mixup_active(args):
        if args.bce_loss:
            return BinaryCrossEntropy(target_threshold=args.bce_target_thresh)
        return SoftTargetCrossEntropy()
    if args.bce_loss:  # the original (timm's order) silently used cross-entropy here when --smoothing was 0
        return BinaryCrossEntropy(smoothing=args.smoothing, target_threshold=args.bce_target_thresh)
    if args.smoothing:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return nn.CrossEntropyLoss()


def _import_loss_module(mod_name: str, spec: str):
    """A module by dotted name, or a ``.py`` file by path (relative to the current directory)."""
    import importlib.util
    import os

    if mod_name.endswith(".py") or os.sep in mod_name or "/" in mod_name:
        path = os.path.abspath(os.path.expanduser(mod_name))
        if not os.path.isfile(path):
            raise UsageError(f"--adv-training {spec}: no such file {path}")
        name = "robust_vits_loss_" + os.path.splitext(os.path.basename(path))[0]
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:  # the user's file: say which one failed and why, in one line
            raise UsageError(f"--adv-training {spec}: importing {path} failed: {type(e).__name__}: {e}") from None
        return module
    try:
        return importlib.import_module(mod_name)
    except ImportError as e:
        import sys

        raise UsageError(f"--adv-training {spec}: cannot import the module '{mod_name}' ({e}); searched the "
                         f"Python path {sys.path[:4]}...; give a dotted module name on the path or a file "
                         f"path like path/to/loss.py:ClassName") from None


def load_loss_class(spec: str) -> type:
    """``module.path:ClassName`` or ``path/to/file.py:ClassName`` -> the class (a user's training loss)."""
    if ":" not in spec:
        raise UsageError(f"--adv-training must be pgd, trades, module.path:ClassName or path/to/file.py:ClassName, "
                         f"got '{spec}'")
    mod_name, cls_name = spec.rsplit(":", 1)
    mod = _import_loss_module(mod_name, spec)
    cls = getattr(mod, cls_name, None)
    if cls is None or not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
        raise UsageError(f"--adv-training {spec}: '{cls_name}' is not an nn.Module class in {mod_name}")
    return cls


def create_train_loss(args: argparse.Namespace, dev_env, num_classes: int) -> nn.Module:
    """The pluggable training loss: forward(model, x, y, epoch) -> (loss, clean_logits, adv_logits).

    Built-in ``pgd`` (AdvTrainingLoss) and ``trades`` (TRADESLoss); ``module.path:ClassName`` loads
    a user's class, constructed with the same keyword arguments as the built-ins:
    ``attack_cfg, natural_criterion, dev_env, num_classes, eval_mode`` (+ ``beta`` when the class
    accepts it).
    """
    natural = create_natural_criterion(args)
    if not args.adv_training:
        return CleanTrainingLoss(natural)
    attack_cfg = resolve_attack_cfg(args, eval=False)
    eval_mode = args.attack_mode == "eval"
    if args.adv_training == "pgd":
        return AdvTrainingLoss(attack_cfg, natural, dev_env=dev_env, num_classes=num_classes,
                               eval_mode=eval_mode, clean_logits=args.adv_clean_logits)
    if args.adv_training == "trades":
        return TRADESLoss(attack_cfg, natural, args.trades_beta, dev_env=dev_env, num_classes=num_classes,
                          eval_mode=eval_mode)
    cls = load_loss_class(args.adv_training)
    kwargs: Dict[str, Any] = dict(attack_cfg=attack_cfg, natural_criterion=natural, dev_env=dev_env,
                                  num_classes=num_classes, eval_mode=eval_mode)
    params = inspect.signature(cls.__init__).parameters
    if "beta" in params:
        kwargs["beta"] = args.trades_beta
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise UsageError(f"--adv-training {args.adv_training}: the class must accept the keyword arguments "
                         f"{sorted(kwargs)} ({e})") from None


def create_eval_attack(args: argparse.Namespace, dev_env, num_classes: int):
    """Per-epoch eval attack (§1.1 item 11): untargeted, eval eps, NLL-sum, with the training step
    count (the original) or ``--eval-attack-steps`` (step size ``--attack-lr`` or 1.5 * eps / steps)."""
    if not args.adv_training:
        return None
    steps = getattr(args, "eval_attack_steps", None)
    if steps is not None:
        args = argparse.Namespace(**{**vars(args), "attack_steps": steps})
    cfg = resolve_attack_cfg(args, eval=True)
    return make_attack(cfg.name, cfg.eps, cfg.step_size, cfg.steps, cfg.norm, cfg.boundaries,
                       criterion=nn.NLLLoss(reduction="sum"), dev_env=dev_env, num_classes=num_classes)
