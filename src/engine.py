"""The training and evaluation loops, driven by the pluggable loss interface.

``train_one_epoch`` asks the loss module for ``(loss, clean_logits, adv_logits)`` and does the
optimizer step (AMP, gradient clipping, EMA update, recovery checkpoints); ``evaluate`` measures
clean loss / top-1 and, with an attack, robust top-1. Metrics are accumulated as device tensors
(no host synchronisation per step except for log lines) and summed across processes at the end.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn

from src.bits.device import DeviceEnv
from src.errors import NonFiniteLossError

_logger = logging.getLogger("robust_vits")


@dataclass
class EpochState:
    """Running sums of one epoch; saved in recovery checkpoints so a resumed epoch reports whole."""

    loss_sum: float = 0.0
    correct: float = 0.0
    robust_correct: float = 0.0
    robust_count: float = 0.0
    clean_count: float = 0.0
    count: float = 0.0
    batches_done: int = 0
    skipped_steps: int = 0

    def to_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: Optional[Dict[str, Any]]) -> "EpochState":
        s = cls()
        for k, v in (d or {}).items():
            if hasattr(s, k):
                setattr(s, k, v)
        return s


def _hard_targets(y: torch.Tensor) -> torch.Tensor:
    return y.argmax(dim=-1) if y.dim() > 1 else y


def _correct(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (logits.detach().argmax(dim=-1) == y).sum()


def _progress(total: int, desc: str, enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def _all_finite(params) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    norms = torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads])
    return bool(torch.isfinite(norms).all())


@dataclass
class TrainParts:
    """The objects one optimizer step reads and updates."""
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: Optional[nn.Module]
    lr_scheduler: Any = None
    model_ema: Any = None
    grad_scaler: Any = None


@dataclass
class StepOptions:
    """How a step treats its gradients."""
    clip_grad: Optional[float] = None
    clip_mode: str = "norm"
    skip_nonfinite: bool = False


@dataclass
class EpochHooks:
    """What the epoch loop reports and saves along the way."""
    log_interval: int = 50
    recovery_interval: int = 0
    save_recovery: Optional[Callable[[int, int, EpochState], None]] = None
    on_first_batch: Optional[Callable[[torch.Tensor], None]] = None


class _Sums:
    """Device-side running sums of an epoch (no host sync per step); flushed into an EpochState."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.float64, device=device)
        self.robust = torch.zeros((), dtype=torch.float64, device=device)
        self.clean_count = self.robust_count = self.count = 0

    def add(self, loss: torch.Tensor, clean_logits, adv_logits, y: torch.Tensor) -> None:
        bsz = y.shape[0]
        y_hard = _hard_targets(y)
        self.loss += loss.double() * bsz
        if clean_logits is not None:
            self.correct += _correct(clean_logits, y_hard).double()
            self.clean_count += bsz
        if adv_logits is not None:
            self.robust += _correct(adv_logits, y_hard).double()
            self.robust_count += bsz
        self.count += bsz

    def flush(self, state: EpochState) -> None:
        state.loss_sum += float(self.loss)
        state.correct += float(self.correct)
        state.robust_correct += float(self.robust)
        state.robust_count += self.robust_count
        state.clean_count += self.clean_count
        state.count += self.count
        self.loss.zero_(), self.correct.zero_(), self.robust.zero_()
        self.clean_count = self.robust_count = self.count = 0


def _backward(parts: TrainParts, loss: torch.Tensor, params, options: StepOptions) -> None:
    from timm.utils import dispatch_clip_grad

    parts.optimizer.zero_grad(set_to_none=True)
    if parts.grad_scaler is not None:
        parts.grad_scaler.scale(loss).backward()
        if options.clip_grad is not None:
            parts.grad_scaler.unscale_(parts.optimizer)
            dispatch_clip_grad(params, options.clip_grad, mode=options.clip_mode)
    else:
        loss.backward()
        if options.clip_grad is not None:
            dispatch_clip_grad(params, options.clip_grad, mode=options.clip_mode)


def _step_is_finite(parts: TrainParts, loss: torch.Tensor, params, options: StepOptions, where: str) -> bool:
    """False (gradients dropped) for a non-finite step under --skip-nonfinite; raises otherwise.

    With a grad scaler the scaler itself skips such steps. Without one, this costs one host sync
    per step: the price of never writing NaN weights into a checkpoint.
    """
    if parts.grad_scaler is not None:
        return True
    if bool(torch.isfinite(loss)) and _all_finite(params):
        return True
    if not options.skip_nonfinite:
        raise NonFiniteLossError(
            f"non-finite loss or gradient at {where}; the last good checkpoint is kept. Lower the learning "
            f"rate, enable --clip-grad, or pass --skip-nonfinite to skip such steps")
    parts.optimizer.zero_grad(set_to_none=True)
    return False


def _optimizer_step(parts: TrainParts, num_updates: int) -> int:
    if parts.grad_scaler is not None:
        parts.grad_scaler.step(parts.optimizer)
        parts.grad_scaler.update()
    else:
        parts.optimizer.step()
    num_updates += 1
    if parts.model_ema is not None:
        parts.model_ema.update(parts.model, step=num_updates)
    if parts.lr_scheduler is not None:
        parts.lr_scheduler.step_update(num_updates=num_updates)
    return num_updates


def train_one_epoch(epoch: int, parts: TrainParts, loader, dev_env: DeviceEnv, options: StepOptions,
                    hooks: Optional[EpochHooks] = None, batch_transform: Optional[Callable] = None,
                    num_updates: int = 0, eps: float = float("nan"), state: Optional[EpochState] = None,
                    ) -> Dict[str, Any]:
    """Train one epoch; returns the summary metrics and the updated global step.

    ``batch_transform(x, y)`` runs on the device before the loss (random erasing, mixup);
    ``state`` carries the sums of a partially done epoch (mid-epoch resume) and the loader must
    already skip its ``batches_done`` batches. ``eps`` is only reported (the loss owns the attack).
    """
    hooks = hooks or EpochHooks()
    state = state or EpochState()
    parts.model.train()
    params = [p for p in parts.model.parameters() if p.requires_grad]
    total = len(loader) + state.batches_done if hasattr(loader, "__len__") else 0
    log = _EpochLog(f"train epoch {epoch}", total, state.batches_done, dev_env, hooks.log_interval)
    sums = _Sums(dev_env.device)
    for x, y in loader:
        x, y = dev_env.to_device(x, y)
        if hooks.on_first_batch is not None and state.batches_done == 0 and sums.count == 0:
            hooks.on_first_batch(x)
        if batch_transform is not None:
            x, y = batch_transform(x, y)
        with dev_env.autocast():
            loss, clean_logits, adv_logits = parts.loss_fn(parts.model, x, y, epoch)
        loss_det = loss.detach().float()
        _backward(parts, loss, params, options)
        where = f"epoch {epoch}, step {state.batches_done} of the epoch (global step {num_updates})"
        step_ok = _step_is_finite(parts, loss_det, params, options, where)
        if step_ok:
            num_updates = _optimizer_step(parts, num_updates)
            sums.add(loss_det, clean_logits, adv_logits, y)
        else:
            state.skipped_steps += 1
        dev_env.mark_step()
        state.batches_done += 1
        log.batch(x.shape[0], state.batches_done, loss_det, parts.optimizer)
        if hooks.save_recovery is not None and hooks.recovery_interval and step_ok \
                and num_updates % hooks.recovery_interval == 0:
            sums.flush(state)
            hooks.save_recovery(epoch, num_updates, state)
    log.close()
    sums.flush(state)
    metrics = _epoch_metrics(state, dev_env, eps, _mean_lr(parts.optimizer))
    if state.skipped_steps:
        _logger.warning("epoch %d: skipped %d optimizer steps with a non-finite loss or gradient on this process",
                        epoch, int(state.skipped_steps))
    if dev_env.primary:
        _logger.info("train epoch %d done in %.1fs: loss %.4f top1 %.2f robust_top1 %.2f", epoch, log.seconds(),
                     metrics["loss"], metrics["top1"], metrics["robust_top1"])
    return {"metrics": metrics, "num_updates": num_updates}


class _EpochLog:
    """A progress bar on a TTY, else a log line every ``interval`` batches (primary process only)."""

    def __init__(self, desc: str, total: int, done: int, dev_env: DeviceEnv, interval: int):
        self.desc, self.total, self.dev_env, self.interval = desc, total, dev_env, interval
        self.bar = _progress(total, desc, dev_env.primary)
        if self.bar is not None:
            self.bar.update(done)
        self.t_start = self.t_log = time.time()
        self.n_log = 0

    def batch(self, bsz: int, done: int, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        self.n_log += bsz
        if self.bar is not None:
            self.bar.update(1)
        if not (self.dev_env.primary and self.interval and done % self.interval == 0):
            return
        now = time.time()
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {float(loss):.4f}")
        else:
            rate = self.n_log * self.dev_env.world_size / max(now - self.t_log, 1e-9)
            _logger.info("%s [%d/%d] loss %.4f lr %.3e %.1f img/s", self.desc,
                         done, self.total, float(loss), _mean_lr(optimizer), rate)
        self.t_log, self.n_log = now, 0

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def seconds(self) -> float:
        return time.time() - self.t_start


def _epoch_metrics(state: EpochState, dev_env: DeviceEnv, eps: float, lr: float) -> Dict[str, float]:
    """The epoch's training metrics, summed over every process."""
    from src.bits.device import reduce_sums

    loss_sum, correct, clean_n, robust_correct, robust_count, n = reduce_sums(
        dev_env, [state.loss_sum, state.correct, state.clean_count, state.robust_correct, state.robust_count,
                  state.count])
    return {
        "loss": loss_sum / n if n else float("nan"),
        "top1": 100.0 * correct / clean_n if clean_n else float("nan"),
        "robust_top1": 100.0 * robust_correct / robust_count if robust_count else float("nan"),
        "eps": eps,
        "lr": lr,
    }


def _mean_lr(optimizer: torch.optim.Optimizer) -> float:
    lrs = [g["lr"] for g in optimizer.param_groups if g.get("lr", 0) > 0]
    return sum(lrs) / len(lrs) if lrs else 0.0


def evaluate(model: nn.Module, loader, dev_env: DeviceEnv, attack: Optional[Callable] = None,
             attack_mode: str = "eval", phase: str = "eval") -> Dict[str, float]:
    """Clean loss / top-1 and, with ``attack(model, x, y)``, robust top-1 (NaN without an attack).

    ``attack_mode='train'`` crafts in train mode (what the original did on TPU); BatchNorm buffers
    are restored afterwards so evaluation never changes the model.
    """
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    loss_acc = torch.zeros((), dtype=torch.float64, device=dev_env.device)
    corr_acc = torch.zeros((), dtype=torch.float64, device=dev_env.device)
    rob_acc = torch.zeros((), dtype=torch.float64, device=dev_env.device)
    count = 0
    bar = _progress(len(loader) if hasattr(loader, "__len__") else 0, phase, dev_env.primary)
    t0 = time.time()
    for x, y in loader:
        x, y = dev_env.to_device(x, y)
        with torch.no_grad(), dev_env.autocast():
            logits = model(x)
        loss_acc += criterion(logits.float(), y).double()
        corr_acc += _correct(logits, y).double()
        if attack is not None:
            if attack_mode == "train":
                backup = {k: v.clone() for k, v in model.state_dict().items()}
                model.train()
            with dev_env.autocast():
                x_adv = attack(model, x, y)
            if attack_mode == "train":
                model.load_state_dict(backup)
                model.eval()
            with torch.no_grad(), dev_env.autocast():
                adv_logits = model(x_adv)
            rob_acc += _correct(adv_logits, y).double()
        count += x.shape[0]
        dev_env.mark_step()
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    from src.bits.device import reduce_sums

    loss_sum, correct, robust_correct, n = reduce_sums(dev_env, [float(loss_acc), float(corr_acc),
                                                                 float(rob_acc), count])
    out = {
        "loss": loss_sum / n if n else float("nan"),
        "top1": 100.0 * correct / n if n else float("nan"),
        "robust_top1": 100.0 * robust_correct / n if (n and attack is not None) else float("nan"),
    }
    if dev_env.primary:
        _logger.info("%s: loss %.4f top1 %.2f robust_top1 %.2f (%d images, %.1fs)", phase, out["loss"],
                     out["top1"], out["robust_top1"], int(n), time.time() - t0)
    return out


def is_nan(v: float) -> bool:
    return isinstance(v, float) and math.isnan(v)
