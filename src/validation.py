"""Clean and adversarial evaluation: the engine behind ``validate.py``.

``validate.py`` only parses the command line and calls :func:`run`; everything else is here, in
functions other tools can reuse:

* :func:`evaluate_model` runs a model over a loader (clean forward, optional attack, adversarial
  forward) and returns exact counts summed over processes, plus per-example tensors on request;
* :func:`create_eval_model` / :func:`create_eval_loader` build what the CLI evaluates (timm model +
  checkpoint, XCiT patch surgery, normalization mode, eval transform, sharded loader);
* :func:`validate` evaluates one model/checkpoint for every ``--attack-steps`` value;
* :func:`honesty_warnings` and its parts say when a result cannot be trusted;
* :func:`write_results` writes the original's CSV schema (or JSON, with the warnings).

Normalization modes (original-behaviour §0.2): ``loader`` (default, the original's: the loader
normalizes, so attacks run in normalized space with [0, 1] clipping -- semantically wrong, and
said so loudly), ``raw`` (``--no-normalize``: the model sees [0, 1] pixels) and ``model``
(``--normalize-model``: [0, 1] pixels, normalization inside the model, with ``--mean/--std``, else
the mean/std the checkpoint records, else the model's defaults). A checkpoint that records its
normalization (``--normalize-model`` training runs) is always evaluated with that normalization
inside the model, whatever the mode: its network was trained that way.

"Beyond noise" (used by the attack-strength checks): a difference between two robust accuracies
measured on the same ``n`` examples is beyond noise when it exceeds one binomial standard error
``100 * sqrt(p * (1 - p) / n)`` percentage points of the weaker attack's robust accuracy ``p``, and
at least one example (``100 / n`` points).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import random
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from src import storage
from src.bits.device import DeviceEnv, initialize_device, reduce_sums, shutdown
from src.cli import seed_everything
from src.errors import ExpectedError, UsageError

_logger = logging.getLogger("robust_vits")

__all__ = [
    "RESULT_KEYS",
    "ATTACKS",
    "build_parser",
    "parse_args",
    "EvalResult",
    "evaluate_model",
    "zero_gradient_fraction",
    "EvalModel",
    "create_eval_model",
    "create_eval_dataset",
    "create_eval_loader",
    "eval_batches",
    "build_eval_attack",
    "result_row",
    "binomial_se",
    "robust_above_clean_warnings",
    "attack_strength_warnings",
    "normalization_warnings",
    "gradient_warnings",
    "weak_attack_warnings",
    "honesty_warnings",
    "ValidationRun",
    "validate",
    "find_checkpoints",
    "bulk_model_names",
    "validate_bulk",
    "retry_smaller_batch",
    "write_results",
    "wandb_target",
    "log_to_wandb",
    "run",
]

# The original's result dict, in its order (the CSV schema downstream tools read; `cropt_pct` sic).
RESULT_KEYS = ("top1", "top1_err", "top5", "top5_err", "robust_top1", "robust_top1_err", "robust_top5",
               "robust_top5_err", "loss", "adv_loss", "param_count", "img_size", "cropt_pct", "interpolation")
ATTACKS = ("", "pgd", "targeted_pgd", "apgd-ce", "autoattack")
PGD_ATTACKS = ("pgd", "targeted_pgd")
NORMALIZATION_MODES = ("loader", "raw", "model")
DEFAULT_BULK_RESULTS = "./results-all.csv"
# Below this many PGD steps robust accuracy is a loose upper bound (the paper reports AutoAttack).
FEW_STEPS = 10


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse that raises ``UsageError`` (one line, exit 2) instead of printing usage."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    """timm's validate flags plus the paper's (original-behaviour.md §1.2 and §1.3)."""
    p = _Parser(prog="validate.py", description="Clean and adversarial (PGD, APGD-CE, AutoAttack) evaluation "
                                                "of timm image classifiers",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("Data")
    g.add_argument("data", metavar="DIR", nargs="?", default=None,
                   help="dataset root (not needed for the embedded 'digits' dataset)")
    g.add_argument("--dataset", "-d", metavar="NAME", default="",
                   help="dataset: '' (image folder), digits (embedded), torch/<name>, hfds/<name>, tfds/<name>")
    g.add_argument("--split", metavar="NAME", default="validation", help="dataset split")
    g.add_argument("--dataset-download", action="store_true", default=False,
                   help="allow downloading torch/ datasets")
    g.add_argument("--class-map", default="", type=str, metavar="FILE",
                   help="file mapping class folder names to indices")
    g.add_argument("-j", "--workers", default=4, type=int, metavar="N", help="data loading workers per process")
    g.add_argument("-b", "--batch-size", default=256, type=int, metavar="N", help="batch size per process")
    g.add_argument("--img-size", default=None, type=int, metavar="N", help="input image size")
    g.add_argument("--input-size", default=None, nargs=3, type=int, metavar="N", help="input dimensions C H W")
    g.add_argument("--crop-pct", default=None, type=float, metavar="PCT", help="center-crop fraction")
    g.add_argument("--mean", type=float, nargs="+", default=None, metavar="MEAN", help="dataset mean")
    g.add_argument("--std", type=float, nargs="+", default=None, metavar="STD", help="dataset std")
    g.add_argument("--interpolation", default="", type=str, metavar="NAME", help="resize interpolation")
    g.add_argument("--pin-mem", action="store_true", default=False, help="pin CPU memory in the loader")
    g.add_argument("--use-mp-loader", action="store_true", default=False,
                   help="on XLA, wrap the loader in torch_xla's MpDeviceLoader (ignored elsewhere)")
    g.add_argument("--tf-preprocessing", action="store_true", default=False,
                   help="not supported (rejected): TensorFlow preprocessing")
    g.add_argument("--real-labels", default="", type=str, metavar="FILE",
                   help="not supported (rejected): ImageNet-ReaL labels define no robust accuracy")
    g.add_argument("--valid-labels", default="", type=str, metavar="FILE",
                   help="file of valid class indices (one per line): the model's logits are restricted to "
                        "them for the clean forward AND the attack")
    g.add_argument("--num-examples", type=int, default=None, metavar="N",
                   help="evaluate only min(batches, N // (batch size x processes)) full batches")

    g = p.add_argument_group("Model")
    g.add_argument("--model", "-m", metavar="NAME", default="resnet50",
                   help="timm model name; 'all', a wildcard or a text file of names for bulk evaluation")
    g.add_argument("--pretrained", action="store_true", default=False,
                   help="use timm's pretrained weights (forced when no --checkpoint)")
    g.add_argument("--checkpoint", default="", type=str, metavar="PATH",
                   help="checkpoint file (local, gs://, memory://), or a folder: every *.pth.tar / *.pth in it")
    g.add_argument("--use-ema", action="store_true", default=False, help="use the checkpoint's EMA weights")
    g.add_argument("--trust-checkpoint", action="store_true", default=False,
                   help="allow checkpoints that need arbitrary unpickling (runs code from the file)")
    g.add_argument("--num-classes", type=int, default=None, metavar="N", help="number of classes")
    g.add_argument("--gp", default=None, type=str, metavar="POOL", help="global pool type")
    g.add_argument("--test-pool", action="store_true", default=False, help="timm test-time pooling")
    g.add_argument("--patch-size", type=int, default=None, metavar="N",
                   help="XCiT only: remove stem strides so the model uses N-pixel patches (2, 4, 8)")
    g.add_argument("--torchscript", action="store_true", default=False, help="torch.jit.script the model")
    g.add_argument("-nn", "--no-normalize", action="store_true", default=False,
                   help="feed raw [0, 1] inputs (the loader does not normalize)")
    g.add_argument("--normalize-model", action="store_true", default=False,
                   help="[0, 1] inputs, normalization inside the model (--mean/--std, else the checkpoint's "
                        "recorded mean/std, else the model's defaults)")

    g = p.add_argument_group("Attack")
    g.add_argument("--attack", default="", type=str, metavar="NAME",
                   help="'' (none), pgd, targeted_pgd, apgd-ce or autoattack")
    g.add_argument("--attack-eps", default=4, type=float, metavar="EPS", help="epsilon in /255 units")
    g.add_argument("--attack-lr", default=None, type=float, metavar="LR",
                   help="PGD step size in /255 units (default: 1.5 * eps / steps)")
    g.add_argument("--attack-steps", default=[10], type=int, nargs="+", metavar="K",
                   help="PGD steps; several values evaluate each (one result row per value)")
    g.add_argument("--attack-norm", default="linf", type=str, choices=["linf", "l2"], help="threat model")
    g.add_argument("--attack-boundaries", default=(0, 1), type=float, nargs=2, metavar="L",
                   help="clipping box of adversarial inputs")
    g.add_argument("--verbose", action="store_true", default=False, help="AutoAttack progress output")

    g = p.add_argument_group("Run")
    g.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (reset for every evaluation)")
    g.add_argument("--log-freq", default=1, type=int, metavar="N", help="batches between log lines (no TTY)")
    g.add_argument("--amp", action="store_true", default=False, help="mixed precision (bfloat16 autocast)")
    g.add_argument("--amp-dtype", default="bfloat16", choices=["bfloat16", "float16"], help="autocast dtype")
    g.add_argument("--channels-last", action="store_true", default=False, help="channels-last memory layout")
    g.add_argument("--force-cpu", action="store_true", default=False, help="run on the CPU")
    g.add_argument("--results-file", default="", type=str, metavar="PATH",
                   help="write results here: .json gives JSON (with warnings), anything else CSV; gs:// works")
    g.add_argument("--log-wandb", action="store_true", default=False,
                   help="log the final numbers into the training run's W&B run (wandb_run in args.yaml next "
                        "to the checkpoint)")
    g.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                   help="set by torch.distributed.launch")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and check the validate CLI (``argv`` instead of ``sys.argv[1:]`` when given)."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Reject input that would crash deep inside or, worse, give a wrong robust number."""
    if args.attack not in ATTACKS:
        raise UsageError(f"unknown attack '{args.attack}': choose pgd, targeted_pgd, apgd-ce, autoattack "
                         "(or '' for clean accuracy only)")
    if args.attack_eps is None or not math.isfinite(args.attack_eps) or args.attack_eps < 0:
        raise UsageError(f"--attack-eps must be a number >= 0 (in /255 units), got {args.attack_eps}")
    if args.attack_lr is not None and (not math.isfinite(args.attack_lr) or args.attack_lr < 0):
        raise UsageError(f"--attack-lr must be >= 0 (in /255 units), got {args.attack_lr}")
    if any(k < 0 for k in args.attack_steps):
        raise UsageError(f"--attack-steps must be >= 0, got {args.attack_steps}")
    if len(args.attack_steps) > 1 and args.attack not in PGD_ATTACKS:
        raise UsageError("several --attack-steps values need --attack pgd or targeted_pgd "
                         f"(got --attack '{args.attack}', whose result does not depend on the step count)")
    if len(set(args.attack_steps)) != len(args.attack_steps):
        raise UsageError(f"--attack-steps has repeated values: {args.attack_steps}")
    lo, hi = args.attack_boundaries
    if not lo < hi:
        raise UsageError(f"--attack-boundaries must be two numbers low < high, got {lo} {hi}")
    if args.batch_size is None or args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    if args.num_examples is not None and args.num_examples < 1:
        raise UsageError(f"--num-examples must be >= 1, got {args.num_examples}")
    if args.log_freq < 0:
        raise UsageError(f"--log-freq must be >= 0, got {args.log_freq}")
    from src.arg_parser import check_mean_std

    check_mean_std(args.mean, args.std)
    if args.real_labels:
        raise UsageError("--real-labels is not supported: ImageNet-ReaL labels give several correct classes per "
                         "image, which defines no robust accuracy (the original crashed on its robust metrics); "
                         "evaluate clean ReaL accuracy with timm's validate.py")
    if args.tf_preprocessing:
        raise UsageError("--tf-preprocessing is not supported: use the default (PIL) eval transform")
    if args.patch_size is not None and args.patch_size < 1:
        raise UsageError(f"--patch-size must be >= 1, got {args.patch_size}")


def attack_label(attack: str, steps: int, eps: float, norm: str) -> str:
    """``<attack>-<steps>-<eps>[-<norm>]``: the original's W&B key prefix (norm only when not linf)."""
    label = f"{attack}-{steps}-{eps:g}"
    return label if norm == "linf" else f"{label}-{norm}"


# ----------------------------------------------------------------------------------------------
# Evaluation loop
# ----------------------------------------------------------------------------------------------

@dataclass
class EvalResult:
    """Exact counts of one evaluation pass (summed over processes) and optional per-example data.

    ``per_example`` (local process only) holds tensors of length ``local_examples``: ``label``,
    ``clean_pred``, ``clean_correct``, ``clean_loss`` and, with an attack, ``adv_pred``,
    ``robust_correct``, ``adv_loss``; ``indices`` are the dataset indices of those examples when
    the loader's sampler exposes them (``ShardSampler`` does).
    """
    num_examples: int
    clean_correct1: float
    clean_correct5: float
    loss_sum: float
    attacked: bool
    robust_correct1: float = 0.0
    robust_correct5: float = 0.0
    adv_loss_sum: float = 0.0
    topk: int = 5
    seconds: float = 0.0
    local_examples: int = 0
    zero_grad_fraction: Optional[float] = None
    attack_flags: List[str] = field(default_factory=list)
    per_example: Optional[Dict[str, torch.Tensor]] = None
    indices: Optional[torch.Tensor] = None

    def _pct(self, v: float, attacked_only: bool = False) -> float:
        if not self.num_examples or (attacked_only and not self.attacked):
            return float("nan")
        return 100.0 * v / self.num_examples

    @property
    def top1(self) -> float:
        return self._pct(self.clean_correct1)

    @property
    def top5(self) -> float:
        return self._pct(self.clean_correct5)

    @property
    def robust_top1(self) -> float:
        return self._pct(self.robust_correct1, attacked_only=True)

    @property
    def robust_top5(self) -> float:
        return self._pct(self.robust_correct5, attacked_only=True)

    @property
    def loss(self) -> float:
        return self.loss_sum / self.num_examples if self.num_examples else float("nan")

    @property
    def adv_loss(self) -> float:
        if not (self.num_examples and self.attacked):
            return float("nan")
        return self.adv_loss_sum / self.num_examples


def zero_gradient_fraction(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                           dev_env: Optional[DeviceEnv] = None) -> float:
    """Fraction of examples whose cross-entropy input gradient is exactly zero.

    Non-zero means gradient masking: a non-differentiable or quantizing input step, or a softmax
    so saturated that float32 rounds its gradient away. Gradient attacks (PGD, APGD) do not move
    such examples, so their robust accuracy overstates robustness. A model whose output does not
    depend differentiably on its input at all raises ``UsageError``.
    """
    autocast = dev_env.autocast() if dev_env is not None else torch.autocast("cpu", enabled=False)
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        with autocast:
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, reduction="sum")
        if not loss.requires_grad:
            raise UsageError("the model's output has no gradient with respect to its input (it detaches or "
                             "recomputes the input outside autograd): gradient attacks cannot run on it")
        grad, = torch.autograd.grad(loss, x, allow_unused=True)
    if grad is None:
        return 1.0
    zero = grad.detach().flatten(1).abs().amax(dim=1) == 0
    return float(zero.float().mean())


def _progress(total: int, enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="validate", leave=False, dynamic_ncols=True)


def _topk_correct(logits: torch.Tensor, y: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example top-1 and top-k correctness, and the top-1 prediction."""
    top = logits.topk(k, dim=1).indices
    hit = top.eq(y.unsqueeze(1))
    return hit[:, 0], hit.any(dim=1), top[:, 0]


def evaluate_model(model: nn.Module,
                   loader: Iterable,
                   dev_env: DeviceEnv,
                   attack: Optional[Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]] = None,
                   *,
                   max_batches: Optional[int] = None,
                   log_freq: int = 0,
                   return_per_example: bool = False,
                   check_gradients: bool = True,
                   topk: int = 5) -> EvalResult:
    """Clean (and, with ``attack(model, x, y) -> x_adv``, adversarial) accuracy over ``loader``.

    Per batch: clean forward without a graph; if attacking, the attack runs with gradients
    enabled and the model in eval mode, then the adversarial forward. Cross-entropy losses, top-1
    and top-``min(topk, classes)`` correctness are accumulated as exact counts on the device and
    summed over processes once at the end (each process evaluates its own shard; no example is
    counted twice). ``max_batches`` stops after that many batches (``--num-examples``).
    With ``check_gradients`` the input gradient of the first batch is checked for exact zeros
    before attacking (gradient masking; see :func:`zero_gradient_fraction`).
    """
    model.eval()
    dev = dev_env.device
    sums = torch.zeros(6, dtype=torch.float64, device=dev)  # c1, c5, loss, r1, r5, adv_loss
    count = 0
    total = len(loader) if hasattr(loader, "__len__") else 0
    if max_batches is not None:
        total = min(total, max_batches) if total else max_batches
    bar = _progress(total, dev_env.primary)
    per: Dict[str, List[torch.Tensor]] = {}
    zero_frac: Optional[float] = None
    k_used = topk
    t0 = time.time()
    t_log, n_log = t0, 0
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x, y = dev_env.to_device(x, y)
        if y.dim() > 1:
            y = y.argmax(dim=-1)
        with torch.no_grad(), dev_env.autocast():
            logits = model(x)
        logits = logits.float()
        k_used = min(topk, logits.shape[-1])
        c1, c5, pred = _topk_correct(logits, y, k_used)
        loss = F.cross_entropy(logits, y, reduction="none")
        batch = [c1.sum(), c5.sum(), loss.sum()]
        if attack is not None:
            if check_gradients and i == 0:
                zero_frac = zero_gradient_fraction(model, x, y, dev_env)
            with torch.enable_grad(), dev_env.autocast():
                x_adv = attack(model, x, y)
            model.eval()  # an attack must not leave the model in train mode
            with torch.no_grad(), dev_env.autocast():
                adv_logits = model(x_adv.detach())
            adv_logits = adv_logits.float()
            r1, r5, adv_pred = _topk_correct(adv_logits, y, k_used)
            adv_loss = F.cross_entropy(adv_logits, y, reduction="none")
            batch += [r1.sum(), r5.sum(), adv_loss.sum()]
        else:
            batch += [torch.zeros((), device=dev)] * 3
        sums += torch.stack([b.double() for b in batch])
        if return_per_example:
            items = {"label": y, "clean_pred": pred, "clean_correct": c1, "clean_loss": loss}
            if attack is not None:
                items.update(adv_pred=adv_pred, robust_correct=r1, adv_loss=adv_loss)
            for key, v in items.items():
                per.setdefault(key, []).append(v.detach().cpu())
        count += x.shape[0]
        n_log += x.shape[0]
        dev_env.mark_step()
        if bar is not None:
            bar.update(1)
        if dev_env.primary and (bar is not None or (log_freq and ((i + 1) % log_freq == 0 or i + 1 == total))):
            now = time.time()
            s = sums.tolist()
            rate = n_log * dev_env.world_size / max(now - t_log, 1e-9)
            robust = f" robust@1 {100 * s[3] / count:.2f}" if attack is not None else ""
            if bar is not None:
                bar.set_postfix_str(f"{rate:.1f} img/s acc@1 {100 * s[0] / count:.2f}{robust}")
            else:
                _logger.info("Test: [%d/%d] %.1f img/s loss %.4f acc@1 %.2f acc@%d %.2f%s", i + 1, total, rate,
                             s[2] / count, 100 * s[0] / count, k_used, 100 * s[1] / count, robust)
            t_log, n_log = now, 0
    if bar is not None:
        bar.close()
    c1, c5, loss_sum, r1, r5, adv_loss_sum, n = reduce_sums(dev_env, sums.tolist() + [count])
    per_example = {k: torch.cat(v) for k, v in per.items()} if return_per_example else None
    indices = None
    if return_per_example:
        sampler = getattr(loader, "sampler", None)
        try:
            idx = list(iter(sampler)) if sampler is not None else None
        except TypeError:
            idx = None
        if idx is not None and len(idx) >= count:
            indices = torch.as_tensor(idx[:count], dtype=torch.long)
    flags: List[str] = []
    if attack is not None:
        from src.autoattack import attack_flags

        flags = attack_flags(attack)
    return EvalResult(num_examples=int(n), clean_correct1=c1, clean_correct5=c5, loss_sum=loss_sum,
                      attacked=attack is not None, robust_correct1=r1, robust_correct5=r5,
                      adv_loss_sum=adv_loss_sum, topk=k_used, seconds=time.time() - t0, local_examples=count,
                      zero_grad_fraction=zero_frac, attack_flags=flags, per_example=per_example, indices=indices)


# ----------------------------------------------------------------------------------------------
# Model, data, attack
# ----------------------------------------------------------------------------------------------

class ValidLabels(nn.Module):
    """Restrict the model's logits to a subset of classes (``--valid-labels``).

    Inside the model, so clean accuracy, the attack's loss and robust accuracy all use the same
    restricted classifier (the original masked the clean logits only).
    """

    def __init__(self, model: nn.Module, valid: Sequence[int]):
        super().__init__()
        self.model = model
        self.register_buffer("valid", torch.as_tensor(list(valid), dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).index_select(-1, self.valid)


@dataclass
class EvalModel:
    """The model to evaluate and what was decided while building it."""
    model: nn.Module
    data_config: Dict[str, Any]
    normalization: str  # 'loader' | 'raw' | 'model'
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    num_classes: int
    param_count: float
    trained_inputs: Optional[str] = None  # 'raw' | 'normalized' | None (unknown), from the checkpoint
    notes: List[str] = field(default_factory=list)  # extra honesty warnings found while building


def _three(v: Sequence[float]) -> Tuple[float, ...]:
    v = tuple(float(x) for x in v)
    return v * 3 if len(v) == 1 else v


def _timm_create(args: argparse.Namespace, pretrained: bool) -> nn.Module:
    import timm

    import src.models  # noqa: F401  (registers the project's models)

    if not timm.is_model(args.model):
        close = timm.list_models(f"*{args.model.split('_')[0]}*")[:5]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise UsageError(f"unknown model '{args.model}'{hint}")
    kwargs: Dict[str, Any] = dict(pretrained=pretrained, num_classes=args.num_classes, global_pool=args.gp,
                                  scriptable=args.torchscript or None)
    if args.input_size:
        kwargs["in_chans"] = args.input_size[0]
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    img_size = args.img_size or (args.input_size[-1] if args.input_size else None)
    try:
        try:
            # position embeddings etc. must be built for the evaluated size (a ViT trained at 32 px)
            return timm.create_model(args.model, **kwargs, **({"img_size": img_size} if img_size else {}))
        except TypeError:
            if not img_size:
                raise
            return timm.create_model(args.model, **kwargs)
    except TypeError as e:
        raise UsageError(f"model '{args.model}' does not accept these options: {e}") from None
    except (RuntimeError, OSError, ValueError) as e:
        if not pretrained:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot load pretrained weights for '{args.model}' ({first}); pass --checkpoint, or "
                         "check the network connection") from None


def _hparams_inputs(hparams: Any) -> Optional[str]:
    """What the checkpoint's *network* was trained on: 'raw' [0, 1] or 'normalized' inputs."""
    if not isinstance(hparams, Mapping) or "no_normalize" not in hparams:
        return None
    if hparams.get("normalize_model"):
        return "normalized"  # the wrapper normalized before the network
    return "raw" if hparams.get("no_normalize") else "normalized"


def create_eval_model(args: argparse.Namespace, dev_env: DeviceEnv, checkpoint: Optional[str] = None) -> EvalModel:
    """Build the model ``validate.py`` evaluates, in eval mode on ``dev_env``'s device.

    timm model (``pretrained`` forced without a checkpoint) -> checkpoint weights (weights-only
    unless ``--trust-checkpoint``) -> ``--patch-size`` XCiT stem surgery -> data config ->
    ``--test-pool`` -> normalization per mode -> ``--valid-labels`` -> device, channels-last,
    TorchScript. Parameters are frozen (``requires_grad=False``): attacks only need input
    gradients.
    """
    from timm.data import resolve_data_config

    from src.checkpoint import load_checkpoint_file, load_model_weights
    from src.utils import adapt_model_patches, normalize_model, unwrap_model

    checkpoint = args.checkpoint if checkpoint is None else checkpoint
    model = _timm_create(args, pretrained=args.pretrained or not checkpoint)
    notes: List[str] = []
    ckpt_norm: Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]] = None
    norm_source = ""
    trained_inputs: Optional[str] = None
    hparams: Any = None
    if checkpoint:
        ckpt = load_checkpoint_file(checkpoint, trust=args.trust_checkpoint)
        report = load_model_weights(model, ckpt, use_ema=args.use_ema, strict=True)
        if args.use_ema and report.state_key not in ("model_ema", "state_dict_ema"):
            _logger.warning("--use-ema: checkpoint %s has no EMA weights; evaluating its model weights", checkpoint)
        _logger.info("loaded %s weights from %s", report.state_key, checkpoint)
        hparams = ckpt.get("hparams") if isinstance(ckpt, Mapping) else None
        trained_inputs = _hparams_inputs(hparams)
        if report.normalization is not None:
            ckpt_norm, norm_source = (_three(report.normalization[0]), _three(report.normalization[1])), \
                "recorded in the checkpoint"
    if args.patch_size is not None:
        patch_embed = getattr(unwrap_model(model), "patch_embed", None)
        if not isinstance(getattr(patch_embed, "proj", None), nn.Sequential):
            raise UsageError(f"--patch-size {args.patch_size} applies to XCiT models (a convolutional patch stem); "
                             f"{args.model} has none")
        try:
            adapt_model_patches(model, args.patch_size)
        except AssertionError as e:
            raise UsageError(f"--patch-size {args.patch_size}: {e}") from None
        _logger.info("adapted the XCiT stem of %s to patch size %d", args.model, args.patch_size)

    data_config = resolve_data_config(vars(args), model=model, use_test_size=True, verbose=False)
    for key in ("mean", "std"):
        data_config[key] = _three(data_config[key])
    if args.test_pool:
        from timm.layers import apply_test_time_pool

        model, test_time_pool = apply_test_time_pool(model, data_config, use_test_size=True)
        if test_time_pool:
            data_config["crop_pct"] = 1.0
    if ckpt_norm is None and isinstance(hparams, Mapping) and hparams.get("normalize_model"):
        # an original-style checkpoint of a --normalize-model run: mean/std are in its training args
        ckpt_norm = (_three(hparams.get("mean") or data_config["mean"]),
                     _three(hparams.get("std") or data_config["std"]))
        norm_source = "from the checkpoint's training arguments (hparams)"

    user_norm = (_three(args.mean) if args.mean else None, _three(args.std) if args.std else None)
    if args.normalize_model or ckpt_norm is not None:
        mode = "model"
        if args.normalize_model and (user_norm[0] or user_norm[1]):
            mean = user_norm[0] or (ckpt_norm[0] if ckpt_norm else data_config["mean"])
            std = user_norm[1] or (ckpt_norm[1] if ckpt_norm else data_config["std"])
            if ckpt_norm is not None and (tuple(mean), tuple(std)) != ckpt_norm:
                notes.append(f"--mean/--std {mean}/{std} differ from the normalization the checkpoint was trained "
                             f"with ({ckpt_norm[0]}/{ckpt_norm[1]}): the model sees inputs it was not trained on")
            source = "from --mean/--std"
        elif ckpt_norm is not None:
            mean, std = ckpt_norm
            source = norm_source
            if not args.normalize_model:
                _logger.info("the checkpoint was trained with normalization inside the model: evaluating it the "
                             "same way (--normalize-model implied)")
        else:
            mean, std = data_config["mean"], data_config["std"]
            source = "the model's defaults"
        _logger.info("normalizing inside the model with mean %s std %s (%s); inputs are [0, 1] pixels",
                     tuple(mean), tuple(std), source)
        model = normalize_model(model, mean, std)
    elif args.no_normalize:
        mode, mean, std = "raw", data_config["mean"], data_config["std"]
        _logger.info("raw [0, 1] inputs (--no-normalize)")
    else:
        mode, mean, std = "loader", data_config["mean"], data_config["std"]
        _logger.info("the loader normalizes inputs with mean %s std %s", tuple(mean), tuple(std))

    if args.valid_labels:
        valid = _read_valid_labels(args.valid_labels)
        model = ValidLabels(model, valid)
    num_classes = _num_outputs(model, unwrap_model)
    param_count = sum(p.numel() for p in model.parameters())
    model.requires_grad_(False)
    model = dev_env.to_model_device(model)
    model.eval()
    if args.torchscript:
        try:
            model = torch.jit.script(model)
        except Exception as e:  # noqa: BLE001 - scripting failures are many kinds of error
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(f"--torchscript: cannot script {args.model} ({first})") from None
    return EvalModel(model=model, data_config=data_config, normalization=mode, mean=tuple(mean), std=tuple(std),
                     num_classes=num_classes, param_count=param_count, trained_inputs=trained_inputs, notes=notes)


def _read_valid_labels(path: str) -> List[int]:
    if not storage.exists(path):
        raise UsageError(f"--valid-labels file {path} does not exist")
    try:
        labels = [int(line) for line in storage.read_text(path).split() if line.strip()]
    except ValueError:
        raise UsageError(f"--valid-labels file {path} must hold one integer class index per line") from None
    if not labels:
        raise UsageError(f"--valid-labels file {path} is empty")
    return labels


def _num_outputs(model: nn.Module, unwrap_model: Callable[[nn.Module], nn.Module]) -> int:
    if isinstance(model, ValidLabels):
        return int(model.valid.numel())
    net = unwrap_model(model)
    n = getattr(net, "num_classes", None)
    if isinstance(n, int) and n > 0:
        return n
    raise UsageError(f"cannot tell how many classes {type(net).__name__} predicts; pass --num-classes")


def create_eval_dataset(args: argparse.Namespace):
    """The evaluation split: ``src.data.create_dataset``, or timm's with ``--class-map`` / downloads."""
    from src import data as D

    if not (args.class_map or args.dataset_download) or str(args.dataset).lower() == "digits":
        if args.class_map:
            raise UsageError("--class-map does not apply to the embedded digits dataset")
        return D.create_dataset(args.dataset, args.data, args.split, is_training=False, batch_size=args.batch_size)
    D.check_dataset_name(args.dataset)
    if args.class_map and not storage.exists(args.class_map):
        raise UsageError(f"--class-map file {args.class_map} does not exist")
    from timm.data import create_dataset as timm_create_dataset

    try:
        return timm_create_dataset(args.dataset, root=args.data, split=args.split, is_training=False,
                                   class_map=args.class_map or None, download=args.dataset_download,
                                   batch_size=args.batch_size)
    except (RuntimeError, FileNotFoundError, AssertionError, ValueError, KeyError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot load dataset '{args.dataset or 'image folder'}' split '{args.split}' from "
                         f"{args.data}: {msg}") from None


def create_eval_loader(args: argparse.Namespace, em: EvalModel, dev_env: DeviceEnv, dataset: Any = None):
    """Eval transform (+ Normalize in 'loader' mode) and a loader over this process's shard."""
    from torchvision import transforms

    from src import data as D

    if dataset is None:
        dataset = create_eval_dataset(args)
    transform = D.build_eval_transform(em.data_config)
    if em.normalization == "loader":
        transform = transforms.Compose(list(transform.transforms) + [transforms.Normalize(em.mean, em.std)])
    D.set_transform(dataset, transform)
    D.check_three_channels(dataset, em.data_config["input_size"][0])
    ds_classes = D.dataset_num_classes(dataset)
    if ds_classes is not None and ds_classes > em.num_classes:
        raise UsageError(f"the dataset has {ds_classes} classes but the model predicts {em.num_classes}; pass "
                         f"--num-classes {ds_classes} (with a checkpoint trained for them)")
    loader = D.create_loader(dataset, args.batch_size, is_training=False, world_size=dev_env.world_size,
                             rank=dev_env.global_rank, workers=args.workers, pin_memory=args.pin_mem, seed=args.seed)
    return dev_env.wrap_loader(loader, args.use_mp_loader)


def eval_batches(args: argparse.Namespace, loader: Any, dev_env: DeviceEnv) -> Optional[int]:
    """Batches per process for ``--num-examples`` (None: all): ``min(len, N // (batch x processes))``."""
    if args.num_examples is None:
        return None
    per_step = args.batch_size * dev_env.world_size
    n = args.num_examples // per_step
    if n == 0:
        raise UsageError(f"--num-examples {args.num_examples} is less than one full batch ({args.batch_size} x "
                         f"{dev_env.world_size} process(es)); lower --batch-size")
    return min(len(loader), n) if hasattr(loader, "__len__") else n


def build_eval_attack(args: argparse.Namespace, steps: int, num_classes: int, dev_env: DeviceEnv):
    """The evaluation attack for one step count (None without ``--attack``).

    PGD / targeted PGD: ``make_attack`` with the NLL-sum criterion, eps and ``--attack-lr`` in /255
    units, default step 1.5 * eps / steps. APGD-CE / AutoAttack: the pyautoattack adapter, seeded
    with ``--seed`` (reproducible; the original seeded it from the clock) and run per batch.
    """
    if not args.attack:
        return None
    dev_env.warn_unsuited_attack(args.attack)
    from src.attacks import make_attack, resolve_attack_cfg

    ns = argparse.Namespace(attack=args.attack, attack_eps=args.attack_eps, attack_lr=args.attack_lr,
                            attack_steps=steps, attack_norm=args.attack_norm,
                            attack_boundaries=tuple(args.attack_boundaries))
    cfg = resolve_attack_cfg(ns, eval=False)  # keeps targeted_pgd targeted (eval=True would drop it)
    try:
        if args.attack in PGD_ATTACKS:
            return make_attack(cfg.name, cfg.eps, cfg.step_size, cfg.steps, cfg.norm, cfg.boundaries,
                               criterion=nn.NLLLoss(reduction="sum"), dev_env=dev_env, num_classes=num_classes)
        return make_attack(cfg.name, cfg.eps, cfg.step_size, cfg.steps, cfg.norm, cfg.boundaries,
                           criterion=nn.NLLLoss(reduction="sum"), device=dev_env.device, verbose=args.verbose,
                           seed=args.seed, batch_size=args.batch_size)
    except ValueError as e:
        raise UsageError(f"--attack {args.attack}: {e}") from None


def result_row(ev: EvalResult, em: EvalModel) -> "OrderedDict[str, Any]":
    """The original's result dict (keys and order of ``RESULT_KEYS``), accuracies in % to 4 places."""
    def r4(v: float) -> float:
        return round(v, 4)

    return OrderedDict([
        ("top1", r4(ev.top1)), ("top1_err", r4(100 - ev.top1)),
        ("top5", r4(ev.top5)), ("top5_err", r4(100 - ev.top5)),
        ("robust_top1", r4(ev.robust_top1)), ("robust_top1_err", r4(100 - ev.robust_top1)),
        ("robust_top5", r4(ev.robust_top5)), ("robust_top5_err", r4(100 - ev.robust_top5)),
        ("loss", r4(ev.loss)), ("adv_loss", r4(ev.adv_loss)),
        ("param_count", round(em.param_count / 1e6, 2)),
        ("img_size", em.data_config["input_size"][-1]),
        ("cropt_pct", em.data_config["crop_pct"]),
        ("interpolation", em.data_config["interpolation"]),
    ])


# ----------------------------------------------------------------------------------------------
# Honest-evaluation checks
# ----------------------------------------------------------------------------------------------

def binomial_se(acc_percent: float, n: int) -> float:
    """One binomial standard error of an accuracy (in %) measured on ``n`` examples, in % points."""
    if n <= 0 or not math.isfinite(acc_percent):
        return float("nan")
    p = min(max(acc_percent / 100.0, 0.0), 1.0)
    return 100.0 * math.sqrt(p * (1 - p) / n)


def _noise(acc_percent: float, n: int) -> float:
    """The "beyond noise" threshold: one binomial SE, and never less than one example."""
    return max(binomial_se(acc_percent, n), 100.0 / n)


def robust_above_clean_warnings(row: Mapping[str, Any]) -> List[str]:
    """Robust accuracy above clean accuracy on the same examples: the evaluation is broken.

    An attack can only remove correct predictions; more robust than clean means the model is
    randomized or stateful (train-mode dropout/BatchNorm, random input transforms), the attack is
    not maximizing the loss, or the attack's inputs differ from the clean ones (range/normalization).
    """
    out = []
    for k in ("1", "5"):
        clean, robust = row.get(f"top{k}"), row.get(f"robust_top{k}")
        if clean is None or robust is None or not (math.isfinite(clean) and math.isfinite(robust)):
            continue
        if robust > clean:
            out.append(f"robust top-{k} accuracy ({robust:.2f}%) is above clean top-{k} accuracy ({clean:.2f}%) on "
                       f"the same examples: an attack can only remove correct predictions, so the evaluation is "
                       f"broken -- a randomized or stateful model (dropout/BatchNorm in train mode, random "
                       f"defenses), an attack that does not maximize the loss, or inputs in the wrong range")
    return out


def attack_strength_warnings(rows: Sequence[Mapping[str, Any]], num_examples: int,
                             attack: str = "pgd") -> List[str]:
    """Compare PGD runs with different step counts on the same examples (rows need ``attack_steps``).

    * a stronger attack (more steps) scoring a HIGHER robust accuracy than a weaker one beyond noise
      (one binomial standard error of the weaker one's accuracy, at least one example): gradient
      masking / obfuscated gradients (the loss surface defeats longer optimization), a step size
      unsuited to the longer attack, or a randomized model;
    * robust accuracy still falling, beyond noise, between the two largest step counts: the attack
      has not converged (too few steps), so the reported number overstates robustness.
    """
    runs = sorted((int(r["attack_steps"]), float(r["robust_top1"])) for r in rows
                  if "attack_steps" in r and r.get("robust_top1") is not None and math.isfinite(r["robust_top1"]))
    if len(runs) < 2 or num_examples <= 0:
        return []
    out = []
    for i, (k_weak, acc_weak) in enumerate(runs):
        for k_strong, acc_strong in runs[i + 1:]:
            if k_strong == k_weak:
                continue
            thr = _noise(acc_weak, num_examples)
            if acc_strong - acc_weak > thr:
                out.append(f"{attack}-{k_strong} scored a HIGHER robust accuracy ({acc_strong:.2f}%) than the weaker "
                           f"{attack}-{k_weak} ({acc_weak:.2f}%) on the same {num_examples} examples, beyond noise "
                           f"(difference {acc_strong - acc_weak:.2f} > {thr:.2f} points, one binomial standard "
                           f"error): more optimization should never help the model -- suspect gradient masking / "
                           f"obfuscated gradients, a step size unsuited to the longer attack (--attack-lr), or a "
                           f"randomized model; confirm with AutoAttack")
    (k_a, acc_a), (k_b, acc_b) = runs[-2], runs[-1]
    thr = _noise(acc_a, num_examples)
    if acc_a - acc_b > thr:
        out.append(f"robust accuracy still falls from {attack}-{k_a} ({acc_a:.2f}%) to {attack}-{k_b} ({acc_b:.2f}%), "
                   f"beyond noise ({acc_a - acc_b:.2f} > {thr:.2f} points): the attack has not converged (too few "
                   f"steps), so {acc_b:.2f}% overstates robustness; try more steps, APGD-CE or AutoAttack")
    return out


def normalization_warnings(mode: str, attack: str, trained_inputs: Optional[str] = None) -> List[str]:
    """Mismatches between what the evaluated network receives and how it was trained.

    ``mode`` is the evaluation's normalization mode; ``trained_inputs`` what the checkpoint's
    network was trained on ('raw' [0, 1] pixels or 'normalized' inputs; None when unknown).
    """
    out = []
    if mode == "loader" and attack:
        out.append("the attack ran on loader-normalized inputs (the default mode, as in the original): the eps-ball "
                   "and the [0, 1] clipping were applied in normalized space, so eps is not in pixel units and the "
                   "robust accuracy is not comparable to published numbers; use --normalize-model (normalization "
                   "inside the model) or --no-normalize for a model trained on raw [0, 1] inputs")
    fed = {"loader": "normalized", "raw": "raw", "model": "normalized"}.get(mode)
    if trained_inputs is not None and fed is not None and trained_inputs != fed:
        if trained_inputs == "raw":
            out.append("the checkpoint's network was trained on raw [0, 1] inputs (its training arguments have "
                       "no_normalize and no normalize_model) but received normalized inputs here: clean and robust "
                       "accuracy are wrong; evaluate with --no-normalize")
        else:
            out.append("the checkpoint's network was trained on normalized inputs but received raw [0, 1] pixels "
                       "here: clean and robust accuracy are wrong; evaluate with --normalize-model (and the "
                       "training --mean/--std)")
    return out


def gradient_warnings(zero_grad_fraction: Optional[float]) -> List[str]:
    """Examples with an exactly zero input gradient: gradient attacks cannot move them."""
    if zero_grad_fraction is None or zero_grad_fraction <= 0:
        return []
    return [f"{100 * zero_grad_fraction:.0f}% of the examples of the first batch have an exactly zero input gradient: "
            f"gradient masking (a non-differentiable or quantizing input step, or a saturated softmax) -- PGD and "
            f"APGD cannot move them, so robust accuracy is overstated; check with a gradient-free attack "
            f"(AutoAttack's Square) or BPDA"]


def weak_attack_warnings(attack: str, steps: Sequence[int]) -> List[str]:
    """PGD with few steps only gives an upper bound on robust accuracy."""
    if attack not in PGD_ATTACKS or not steps or max(steps) >= FEW_STEPS:
        return []
    return [f"{attack} with at most {max(steps)} steps is a weak attack: its robust accuracy is an upper bound "
            f"(too few steps); report APGD-CE or AutoAttack (the paper's numbers are AutoAttack)"]


def honesty_warnings(rows: Sequence[Mapping[str, Any]], num_examples: int, *, attack: str = "",
                     steps: Sequence[int] = (), normalization_mode: str = "raw",
                     trained_inputs: Optional[str] = None, attack_flags: Sequence[str] = (),
                     zero_grad_fraction: Optional[float] = None, notes: Sequence[str] = ()) -> List[str]:
    """Every honesty warning of one evaluation run, de-duplicated, in a stable order.

    ``rows`` are result rows of the same examples (several when several ``--attack-steps`` ran);
    ``attack_flags`` are AutoAttack's own checks (``src.autoattack.attack_flags``).
    """
    out: List[str] = list(notes)
    out += normalization_warnings(normalization_mode, attack, trained_inputs)
    for row in rows:
        out += robust_above_clean_warnings(row)
    out += attack_strength_warnings(rows, num_examples, attack or "pgd")
    out += gradient_warnings(zero_grad_fraction)
    out += weak_attack_warnings(attack, steps)
    out += [f"AutoAttack check: {f}" for f in attack_flags]
    return list(dict.fromkeys(out))


# ----------------------------------------------------------------------------------------------
# One model / checkpoint
# ----------------------------------------------------------------------------------------------

@dataclass
class ValidationRun:
    """Result rows of one model/checkpoint (one per step count) and the warnings of each row."""
    rows: List["OrderedDict[str, Any]"]
    row_warnings: List[List[str]]
    num_examples: int
    evals: List[EvalResult] = field(default_factory=list)

    @property
    def warnings(self) -> List[str]:
        return list(dict.fromkeys(w for ws in self.row_warnings for w in ws))


def validate(args: argparse.Namespace, dev_env: Optional[DeviceEnv] = None,
             model_override: Optional[EvalModel] = None) -> ValidationRun:
    """Evaluate ``args.model`` / ``args.checkpoint`` once per ``--attack-steps`` value.

    The model and loader are built once; the RNG is reset to ``seed + rank`` before every
    evaluation pass, so each step count's PGD random starts are reproducible. Rows get an
    ``attack_steps`` column when several step counts ran.
    """
    own_env = dev_env is None
    if own_env:
        dev_env = initialize_device(force_cpu=args.force_cpu, amp=args.amp, amp_dtype=args.amp_dtype,
                                    channels_last=args.channels_last, local_rank=args.local_rank)
    try:
        seed_everything(args.seed)
        em = model_override or create_eval_model(args, dev_env)
        loader = create_eval_loader(args, em, dev_env)
        max_batches = eval_batches(args, loader, dev_env)
        if em.normalization == "loader" and args.attack:
            _logger.warning("=" * 100)
            _logger.warning("ATTACKING LOADER-NORMALIZED INPUTS: eps and the [0, 1] box apply in normalized space, "
                            "robust numbers are not in pixel units.")
            _logger.warning("Use --normalize-model (or --no-normalize for models trained on raw [0, 1] inputs).")
            _logger.warning("=" * 100)
        steps_list = list(args.attack_steps) if args.attack else [args.attack_steps[0]]
        multi = len(args.attack_steps) > 1
        rows, evals = [], []
        for steps in steps_list:
            seed_everything(args.seed + dev_env.global_rank)
            attack = build_eval_attack(args, steps, em.num_classes, dev_env)
            what = f"{args.attack}-{steps}" if args.attack in PGD_ATTACKS else (args.attack or "clean")
            if attack is not None:
                _logger.info("attack %s eps %g/255 (%s)%s", what, args.attack_eps, args.attack_norm,
                             f" step {args.attack_lr:g}/255" if args.attack_lr is not None and
                             args.attack in PGD_ATTACKS else "")
            ev = evaluate_model(em.model, loader, dev_env, attack, max_batches=max_batches, log_freq=args.log_freq,
                                check_gradients=args.attack in PGD_ATTACKS)
            row = result_row(ev, em)
            if multi:
                row["attack_steps"] = steps
            rows.append(row)
            evals.append(ev)
            _logger.info("%s: evaluated %d examples%s in %.1fs: top1 %.4f robust_top1 %.4f", what, ev.num_examples,
                         f" (--num-examples {args.num_examples})" if args.num_examples else "", ev.seconds,
                         row["top1"], row["robust_top1"])
        n = evals[0].num_examples if evals else 0
        flags = list(dict.fromkeys(f for ev in evals for f in ev.attack_flags))
        zero = max((ev.zero_grad_fraction for ev in evals if ev.zero_grad_fraction is not None), default=None)
        run_level = honesty_warnings(rows if multi else [], n, attack=args.attack,
                                     steps=steps_list if args.attack else (), normalization_mode=em.normalization,
                                     trained_inputs=em.trained_inputs, attack_flags=flags, zero_grad_fraction=zero,
                                     notes=em.notes)
        row_warnings = [list(dict.fromkeys(robust_above_clean_warnings(r) + run_level)) for r in rows]
        return ValidationRun(rows=rows, row_warnings=row_warnings, num_examples=n, evals=evals)
    finally:
        if own_env:
            shutdown(dev_env)


# ----------------------------------------------------------------------------------------------
# Bulk mode
# ----------------------------------------------------------------------------------------------

def find_checkpoints(folder: str) -> List[str]:
    """Every ``*.pth.tar`` and ``*.pth`` directly in ``folder`` (local or fsspec), in natural order."""
    from timm.utils import natural_key

    found = storage.glob(storage.join(folder, "*.pth.tar")) + storage.glob(storage.join(folder, "*.pth"))
    found = [p for p in dict.fromkeys(found) if not storage.is_temp_name(p)]
    return sorted(found, key=natural_key)


def bulk_model_names(model: str) -> Optional[List[str]]:
    """Model names for bulk mode, or None when ``model`` is one registered name.

    ``all``: every timm model with pretrained weights (no in21k/in22k/dino); a wildcard: timm's
    matches; an existing text file: its lines. Nothing matched is an error.
    """
    import timm

    import src.models  # noqa: F401

    if model == "all":
        return timm.list_models(pretrained=True, exclude_filters=["*_in21k", "*_in22k", "*_dino"])
    if timm.is_model(model):
        return None
    names = timm.list_models(model) if any(c in model for c in "*?[") else []
    if not names and os.path.isfile(model):
        with open(model) as f:
            names = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    if not names:
        raise UsageError(f"unknown model '{model}': not a registered name, a wildcard with matches, or a file of "
                         f"model names")
    return names


def retry_smaller_batch(fn: Callable[[argparse.Namespace], ValidationRun], args: argparse.Namespace) -> ValidationRun:
    """Run ``fn(args)``; on a RuntimeError (e.g. out of memory) retry with half the batch size.

    Expected errors (bad checkpoint, bad input) are not retried. The original's retry crashed on a
    missing ``args.num_gpu``.
    """
    batch_size = args.batch_size
    while True:
        try:
            return fn(argparse.Namespace(**{**vars(args), "batch_size": batch_size}))
        except ExpectedError:
            raise
        except torch.OutOfMemoryError as e:
            if batch_size <= 1:
                raise
            batch_size = max(batch_size // 2, 1)
            _logger.warning("validation failed (%s); retrying with batch size %d",
                            str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__, batch_size)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def validate_bulk(args: argparse.Namespace, jobs: Sequence[Tuple[str, str]], dev_env: DeviceEnv
                  ) -> Tuple[List["OrderedDict[str, Any]"], List[List[str]], List[str]]:
    """Validate every ``(model, checkpoint)``; rows get ``model`` first and ``checkpoint`` last.

    Returns rows sorted by top1 (descending), their warnings, and one line per failed job (a
    failed job does not stop the others).
    """
    rows, warns, failures = [], [], []
    for i, (model_name, ckpt) in enumerate(jobs):
        _logger.info("[%d/%d] validating %s%s", i + 1, len(jobs), model_name, f" with {ckpt}" if ckpt else "")
        job_args = argparse.Namespace(**{**vars(args), "model": model_name, "checkpoint": ckpt,
                                         "pretrained": args.pretrained or not ckpt})
        try:
            run_ = retry_smaller_batch(lambda a: validate(a, dev_env), job_args)
        except ExpectedError as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            _logger.error("%s%s: %s", model_name, f" ({ckpt})" if ckpt else "", msg)
            failures.append(f"{model_name}{f' ({ckpt})' if ckpt else ''}: {msg}")
            continue
        for row, w in zip(run_.rows, run_.row_warnings):
            rows.append(OrderedDict([("model", model_name)] + list(row.items()) + [("checkpoint", ckpt)]))
            warns.append(w)
    order = sorted(range(len(rows)), key=lambda j: -_sort_key(rows[j]["top1"]))
    return [rows[j] for j in order], [warns[j] for j in order], failures


def _sort_key(v: float) -> float:
    return v if isinstance(v, (int, float)) and math.isfinite(v) else -math.inf


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------

def _json_rows(rows: Sequence[Mapping[str, Any]], warnings: Sequence[Sequence[str]]) -> List[Dict[str, Any]]:
    return [dict(list(r.items()) + [("warnings", list(w))]) for r, w in zip(rows, warnings)]


def results_json(rows: Sequence[Mapping[str, Any]], warnings: Sequence[Sequence[str]], as_list: bool = False) -> str:
    """JSON text: one dict for a single row (timm), else a list; every row has a ``warnings`` list."""
    data: Any = _json_rows(rows, warnings)
    if len(data) == 1 and not as_list:
        data = data[0]
    return json.dumps(data, indent=4)


def write_results(path: str, rows: Sequence[Mapping[str, Any]], warnings: Optional[Sequence[Sequence[str]]] = None,
                  as_list: bool = False) -> None:
    """Write rows atomically to ``path`` (local, gs://, memory://): ``.json`` -> JSON, else CSV.

    The CSV has exactly the rows' keys (the original's schema; warnings are never CSV columns).
    """
    warnings = warnings if warnings is not None else [[] for _ in rows]
    if str(path).lower().endswith(".json"):
        text = results_json(rows, warnings, as_list=as_list) + "\n"
    else:
        buf = io.StringIO()
        fields = list(rows[0].keys()) if rows else list(RESULT_KEYS)
        writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow(r)
        text = buf.getvalue()
    folder = storage.dirname(path)
    if folder:
        storage.makedirs(folder)
    storage.atomic_write_text(path, text)
    _logger.info("results written to %s", path)


# ----------------------------------------------------------------------------------------------
# Weights & Biases
# ----------------------------------------------------------------------------------------------

def wandb_target(checkpoint: str) -> Tuple[Optional[str], str, str, str]:
    """``(entity, project, run_id, folder)`` of the training run that wrote ``checkpoint``.

    Read from ``wandb_run`` in the ``args.yaml`` next to the checkpoint: a run URL
    ``https://wandb.ai/<entity>/<project>/runs/<id>`` (split on '/': parts 3, 4 and 6, as the
    original), or ``offline:<id>`` for offline runs (project = the run's ``experiment`` or the
    folder name, as train.py chose it).
    """
    import yaml

    folder = storage.dirname(checkpoint)
    path = storage.join(folder, "args.yaml")
    if not storage.exists(path):
        raise UsageError(f"--log-wandb: no args.yaml next to the checkpoint ({path}); it logs into the training "
                         "run that wrote the checkpoint")
    try:
        cfg = yaml.safe_load(storage.read_text(path)) or {}
    except yaml.YAMLError:
        raise UsageError(f"--log-wandb: {path} is not valid YAML") from None
    url = cfg.get("wandb_run") if isinstance(cfg, Mapping) else None
    if not url:
        raise UsageError(f"--log-wandb: {path} has no wandb_run (the training run did not use --log-wandb)")
    url = str(url)
    if url.startswith("offline:"):
        project = cfg.get("experiment") or storage.basename(folder)
        return None, str(project), url[len("offline:"):], folder
    parts = url.rstrip("/").split("/")
    if len(parts) < 7:
        raise UsageError(f"--log-wandb: cannot parse the wandb_run URL '{url}' in {path}")
    return parts[3], parts[4], parts[6], folder


def log_to_wandb(args: argparse.Namespace, rows: Sequence[Mapping[str, Any]]) -> Dict[str, float]:
    """Log ``eval_top1-final`` and ``<attack>-<steps>-<eps>[-<norm>]-eval_robust_top1_final`` into the run."""
    try:
        import wandb
    except ImportError:
        raise UsageError("--log-wandb needs the wandb package (pip install wandb)") from None
    entity, project, run_id, folder = wandb_target(args.checkpoint)
    metrics: Dict[str, float] = {"eval_top1-final": rows[0]["top1"]}
    if args.attack:
        for row in rows:
            steps = row.get("attack_steps", args.attack_steps[0])
            metrics[f"{attack_label(args.attack, steps, args.attack_eps, args.attack_norm)}-eval_robust_top1_final"] = \
                row["robust_top1"]
    kwargs: Dict[str, Any] = dict(id=run_id, project=project, resume="allow")
    if entity:
        kwargs["entity"] = entity
    if storage.is_local(folder):
        kwargs["dir"] = folder
    run_ = wandb.init(**kwargs)
    try:
        run_.log(metrics)
        for k, v in metrics.items():
            run_.summary[k] = v
    finally:
        run_.finish()
    _logger.info("logged %s into W&B run %s (project %s)", ", ".join(metrics), run_id, project)
    return metrics


# ----------------------------------------------------------------------------------------------
# The CLI
# ----------------------------------------------------------------------------------------------

def _print_report(rows: Sequence[Mapping[str, Any]], warnings: Sequence[Sequence[str]], as_list: bool) -> None:
    for w in dict.fromkeys(w for ws in warnings for w in ws):
        print(f"WARNING: {w}")
    print("--result")
    print(results_json(rows, warnings, as_list=as_list))
    sys.stdout.flush()


def run(args: argparse.Namespace) -> int:
    """Single, multi-step or bulk validation according to ``args``; returns the exit code."""
    from src.cli import setup_logging

    dev_env = initialize_device(force_cpu=args.force_cpu, amp=args.amp, amp_dtype=args.amp_dtype,
                                channels_last=args.channels_last, local_rank=args.local_rank)
    setup_logging(dev_env.primary)
    try:
        from src.data import check_dataset_name

        check_dataset_name(args.dataset)
        jobs: List[Tuple[str, str]] = []
        if args.checkpoint and storage.isdir(args.checkpoint):
            checkpoints = find_checkpoints(args.checkpoint)
            if not checkpoints:
                raise UsageError(f"checkpoint folder {args.checkpoint} holds no *.pth.tar or *.pth files")
            jobs = [(args.model, c) for c in checkpoints]
        else:
            names = bulk_model_names(args.model)
            if names is not None:
                if args.checkpoint:
                    raise UsageError("a single --checkpoint cannot be evaluated with several models; pass one "
                                     "--model or a checkpoint folder")
                jobs = [(n, "") for n in names]
        if jobs:
            if args.log_wandb:
                raise UsageError("--log-wandb logs one checkpoint into its training run; it does not work in bulk "
                                 "mode")
            rows, warns, failures = validate_bulk(args, jobs, dev_env)
            if dev_env.primary:
                if rows:
                    write_results(args.results_file or DEFAULT_BULK_RESULTS, rows, warns, as_list=True)
                    _print_report(rows, warns, as_list=True)
                if failures:
                    print(f"error: {len(failures)} of {len(jobs)} evaluations failed: " + "; ".join(failures),
                          file=sys.stderr)
            return 2 if failures else 0

        if args.checkpoint and not storage.exists(args.checkpoint):
            raise UsageError(f"checkpoint {args.checkpoint} not found")
        if args.log_wandb:
            if not args.checkpoint:
                raise UsageError("--log-wandb needs --checkpoint (it logs into the checkpoint's training run)")
            wandb_target(args.checkpoint)  # fail before the (long) evaluation
        result = validate(args, dev_env)
        if dev_env.primary:
            multi = len(result.rows) > 1
            if args.results_file:
                write_results(args.results_file, result.rows, result.row_warnings, as_list=multi)
            _print_report(result.rows, result.row_warnings, as_list=multi)
            if args.log_wandb:
                log_to_wandb(args, result.rows)
        return 0
    finally:
        shutdown(dev_env)
