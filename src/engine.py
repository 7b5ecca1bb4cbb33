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


def train_one_epoch(
        epoch: int,
        model: nn.Module,
        loader,
        optimizer: torch.optim.Optimizer,
        loss_fn: nn.Module,
        dev_env: DeviceEnv,
        lr_scheduler=None,
        model_ema=None,
        grad_scaler=None,
        mixup_fn: Optional[Callable] = None,
        random_erasing: Optional[Callable] = None,
        clip_grad: Optional[float] = None,
        clip_mode: str = "norm",
        log_interval: int = 50,
        num_updates: int = 0,
        eps_for_epoch: float = float("nan"),
        recovery_interval: int = 0,
        save_recovery: Optional[Callable[[int, int, EpochState], None]] = None,
        state: Optional[EpochState] = None,
        skip_nonfinite: bool = False,
        on_first_batch: Optional[Callable[[torch.Tensor], None]] = None,
) -> Dict[str, Any]:
    """Train one epoch; returns the summary metrics and the updated global step.

    ``state`` carries the sums of a partially done epoch (mid-epoch resume); the loader must
    already skip its ``batches_done`` batches.
    """
    from timm.utils import dispatch_clip_grad

    state = state or EpochState()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    total = len(loader) + state.batches_done if hasattr(loader, "__len__") else 0
    bar = _progress(total, f"train {epoch}", dev_env.primary)
    if bar is not None:
        bar.update(state.batches_done)
    t_start = time.time()
    t_log, n_log = time.time(), 0
    loss_acc = torch.zeros((), dtype=torch.float64, device=dev_env.device)
    corr_acc = torch.zeros((), dtype=torch.float64, device=dev_env.device)
    rob_acc = torch.zeros((), dtype=torch.float64, device=dev_env.device)
    rob_count = 0
    clean_count = 0
    count = 0
    for x, y in loader:
        x, y = dev_env.to_device(x, y)
        if on_first_batch is not None and state.batches_done == 0 and count == 0:
            on_first_batch(x)
        if random_erasing is not None:
            x = random_erasing(x)
        if mixup_fn is not None:
            x, y = mixup_fn(x, y)
        with dev_env.autocast():
            loss, clean_logits, adv_logits = loss_fn(model, x, y, epoch)
        bsz = x.shape[0]
        loss_det = loss.detach().float()
        optimizer.zero_grad(set_to_none=True)
        if grad_scaler is not None:
            grad_scaler.scale(loss).backward()
            if clip_grad is not None:
                grad_scaler.unscale_(optimizer)
                dispatch_clip_grad(params, clip_grad, mode=clip_mode)
        else:
            loss.backward()
            dev_env.reduce_gradients(optimizer)
            if clip_grad is not None:
                dispatch_clip_grad(params, clip_grad, mode=clip_mode)
        step_ok = True
        if grad_scaler is None:
            # one host sync per step: the price of never writing NaN weights into a checkpoint
            finite = bool(torch.isfinite(loss_det)) and _all_finite(params)
            if not finite:
                if not skip_nonfinite:
                    raise NonFiniteLossError(
                        f"non-finite loss or gradient at epoch {epoch}, step {state.batches_done} of the "
                        f"epoch (global step {num_updates}); the last good checkpoint is kept. Lower the "
                        f"learning rate, enable --clip-grad, or pass --skip-nonfinite to skip such steps")
                step_ok = False
                state.skipped_steps += 1
                optimizer.zero_grad(set_to_none=True)
        if step_ok:
            if grad_scaler is not None:
                grad_scaler.step(optimizer)
                grad_scaler.update()
            else:
                optimizer.step()
            num_updates += 1
            if model_ema is not None:
                model_ema.update(model, step=num_updates)
            if lr_scheduler is not None:
                lr_scheduler.step_update(num_updates=num_updates)
            y_hard = _hard_targets(y)
            loss_acc += loss_det.double() * bsz
            if clean_logits is not None:
                corr_acc += _correct(clean_logits, y_hard).double()
                clean_count += bsz
            if adv_logits is not None:
                rob_acc += _correct(adv_logits, y_hard).double()
                rob_count += bsz
            count += bsz
        dev_env.mark_step()
        state.batches_done += 1
        n_log += bsz
        if bar is not None:
            bar.update(1)
        if dev_env.primary and log_interval and (state.batches_done % log_interval == 0):
            now = time.time()
            lr = _mean_lr(optimizer)
            msg = (f"train epoch {epoch} [{state.batches_done}/{total}] loss {float(loss_det):.4f} "
                   f"lr {lr:.3e} {n_log * dev_env.world_size / max(now - t_log, 1e-9):.1f} img/s")
            if bar is not None:
                bar.set_postfix_str(f"loss {float(loss_det):.4f}")
            else:
                _logger.info(msg)
            t_log, n_log = now, 0
        if save_recovery is not None and recovery_interval and num_updates % recovery_interval == 0 and step_ok:
            _flush(state, loss_acc, corr_acc, rob_acc, rob_count, clean_count, count)
            loss_acc.zero_(), corr_acc.zero_(), rob_acc.zero_()
            rob_count = clean_count = count = 0
            save_recovery(epoch, num_updates, state)
    if bar is not None:
        bar.close()
    _flush(state, loss_acc, corr_acc, rob_acc, rob_count, clean_count, count)
    from src.bits.device import reduce_sums

    loss_sum, correct, clean_n, robust_correct, robust_count, n, skipped = reduce_sums(
        dev_env, [state.loss_sum, state.correct, state.clean_count, state.robust_correct, state.robust_count,
                  state.count, state.skipped_steps])
    metrics = {
        "loss": loss_sum / n if n else float("nan"),
        "top1": 100.0 * correct / clean_n if clean_n else float("nan"),
        "robust_top1": 100.0 * robust_correct / robust_count if robust_count else float("nan"),
        "eps": eps_for_epoch,
        "lr": _mean_lr(optimizer),
    }
    if skipped:
        _logger.warning("epoch %d: skipped %d optimizer steps with a non-finite loss or gradient", epoch,
                        int(skipped))
    if dev_env.primary:
        _logger.info("train epoch %d done in %.1fs: loss %.4f top1 %.2f robust_top1 %.2f", epoch,
                     time.time() - t_start, metrics["loss"], metrics["top1"], metrics["robust_top1"])
    return {"metrics": metrics, "num_updates": num_updates}


def _flush(state: EpochState, loss_acc, corr_acc, rob_acc, rob_count, clean_count, count) -> None:
    state.loss_sum += float(loss_acc)
    state.correct += float(corr_acc)
    state.robust_correct += float(rob_acc)
    state.robust_count += rob_count
    state.clean_count += clean_count
    state.count += count


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
