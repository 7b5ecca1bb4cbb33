"""The training and evaluation loops, driven by the pluggable loss interface.

``train_one_epoch`` asks the loss module for ``(loss, clean_logits, adv_logits)`` and does the
optimizer step (AMP, gradient clipping, EMA update, recovery checkpoints); ``evaluate`` measures
clean loss / top-1 and, with an attack, robust top-1. Metrics are accumulated as device tensors
(no host synchronisation per step except for log lines) and summed across processes at the end.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn

from src.bits.device import DeviceEnv
from src.errors import NonFiniteLossError
from src.progress import Progress

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


def finite_flag(loss: torch.Tensor, params) -> torch.Tensor:
    """A 0-d bool tensor on the device: the loss and every gradient are finite (no host sync).

    One fused max-norm of the gradients: a NaN or inf anywhere makes it non-finite (the max of the
    absolute values, unlike a 2-norm, cannot overflow for finite gradients).
    """
    ok = torch.isfinite(loss)
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        total = torch.nn.utils.get_total_norm([g.detach() for g in grads], norm_type=float("inf"))
        ok = ok & torch.isfinite(total)
    return ok


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
    should_stop: Optional[Callable[[int], bool]] = None  # asked after each step with the epoch's batch count


class _Sums:
    """Device-side running sums of an epoch (no host sync per step); flushed into an EpochState."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.float64, device=device)
        self.robust = torch.zeros((), dtype=torch.float64, device=device)
        self.scaler_skipped = torch.zeros((), dtype=torch.long, device=device)  # steps a grad scaler dropped
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
        state.skipped_steps += int(self.scaler_skipped)
        self.loss.zero_(), self.correct.zero_(), self.robust.zero_(), self.scaler_skipped.zero_()
        self.clean_count = self.robust_count = self.count = 0


def _backward(parts: TrainParts, loss: torch.Tensor, params, options: StepOptions, dev_env: DeviceEnv) -> None:
    from timm.utils import dispatch_clip_grad

    parts.optimizer.zero_grad(set_to_none=True)
    if parts.grad_scaler is not None:
        parts.grad_scaler.scale(loss).backward()
        if options.clip_grad is not None:
            parts.grad_scaler.unscale_(parts.optimizer)
            dispatch_clip_grad(params, options.clip_grad, mode=options.clip_mode)
    else:
        loss.backward()
        dev_env.reduce_gradients(parts.optimizer)  # XLA: the gradient all-reduce (DDP does it in backward)
        if options.clip_grad is not None:
            dispatch_clip_grad(params, options.clip_grad, mode=options.clip_mode)


def _nonfinite_message(where: str) -> str:
    return (f"non-finite loss or gradient at {where}; the last good checkpoint is kept. Lower the learning "
            f"rate, enable --clip-grad, or pass --skip-nonfinite to skip such steps")


def _step_is_finite(parts: TrainParts, loss: torch.Tensor, params) -> bool:
    """--skip-nonfinite: False (gradients dropped) for a non-finite step. Deciding whether to skip
    this step's update costs one host sync per step; only this mode pays it (see ``FiniteGuard``)."""
    if bool(finite_flag(loss, params)):
        return True
    parts.optimizer.zero_grad(set_to_none=True)
    return False


class FiniteGuard:
    """Stops training at the first non-finite loss or gradient without a host sync per step.

    Each step's verdict is folded into a device tensor holding the epoch-step index of the first
    bad step; :meth:`check` reads it (one sync) and is called every log interval, before every
    recovery checkpoint, before a signal stop and at the end of the epoch, so weights updated by a
    non-finite step can never reach a checkpoint: the run stops with the step named instead.
    """

    def __init__(self, device: torch.device, first_step: int, first_update: int):
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.first_step, self.first_update = first_step, first_update
        self.pending = False

    def observe(self, loss: torch.Tensor, params, step: int) -> None:
        bad = ~finite_flag(loss, params) & (self.first_bad < 0)
        self.first_bad = torch.where(bad, torch.full_like(self.first_bad, step), self.first_bad)
        self.pending = True

    def check(self, epoch: int) -> None:
        if not self.pending:
            return
        self.pending = False
        step = int(self.first_bad)
        if step >= 0:
            # without --skip-nonfinite every step updates, so the global step follows from the epoch step
            update = self.first_update + step - self.first_step
            raise NonFiniteLossError(_nonfinite_message(
                f"epoch {epoch}, step {step} of the epoch (global step {update})"))


@contextlib.contextmanager
def _step_overflow_is_nonfinite():
    """A learning rate or weight decay near float32's limit makes a value the optimizer derives from it (AdamW's
    lr / (1 - beta1**t), ...) overflow when torch converts it to float32: a RuntimeError mid-step, which is the
    same failure as a non-finite update (stop, the last good checkpoint stays), said in one line."""
    try:
        yield
    except RuntimeError as e:
        if "overflow" not in str(e):
            raise
        raise NonFiniteLossError(f"the optimizer step overflowed float32 ({str(e).strip().splitlines()[0]}): the "
                                 "learning rate or weight decay is far too large; the last good checkpoint is "
                                 "kept") from None


def _optimizer_step(parts: TrainParts, num_updates: int, sums: Optional[_Sums] = None) -> int:
    """One update. A grad scaler drops a step whose scaled gradients overflowed and lowers its
    scale: such steps still count as updates (the schedule moves on, as in the original) and are
    counted on the device into ``sums.scaler_skipped`` (the scale fell), without a host sync."""
    scaler = parts.grad_scaler
    if scaler is not None:
        scale = getattr(scaler, "_scale", None)  # the scale tensor GradScaler updates in place
        before = scale.clone() if isinstance(scale, torch.Tensor) and sums is not None else None
        with _step_overflow_is_nonfinite():
            scaler.step(parts.optimizer)
        scaler.update()
        if before is not None:
            sums.scaler_skipped += (scaler._scale < before).long()
    else:
        with _step_overflow_is_nonfinite():
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
    """Train one epoch; returns the summary metrics, the updated global step, the epoch state and
    whether ``hooks.should_stop`` ended it early (a signal: the caller saves a recovery point).

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
    # a grad scaler skips non-finite steps itself; --skip-nonfinite decides per step (one sync each)
    guard = None
    if parts.grad_scaler is None and not options.skip_nonfinite:
        guard = FiniteGuard(dev_env.device, state.batches_done, num_updates)
    # --skip-nonfinite: a skipped step must leave no trace, but its train-mode forward has already updated
    # the buffers (BatchNorm running statistics, possibly to NaN): they are copied before and put back
    buffers = [b for b in parts.model.buffers()] if guard is None and parts.grad_scaler is None else []
    stopped = False
    for x, y in loader:
        x, y = dev_env.to_device(x, y)
        if hooks.on_first_batch is not None and state.batches_done == 0 and sums.count == 0:
            hooks.on_first_batch(x)
        if batch_transform is not None:
            x, y = batch_transform(x, y)
        saved = [b.clone() for b in buffers]
        with dev_env.autocast():
            loss, clean_logits, adv_logits = parts.loss_fn(parts.model, x, y, epoch)
        loss_det = loss.detach().float()
        _backward(parts, loss, params, options, dev_env)
        step_ok = True
        if guard is not None:
            guard.observe(loss_det, params, state.batches_done)
        elif parts.grad_scaler is None:
            step_ok = _step_is_finite(parts, loss_det, params)
        if step_ok:
            num_updates = _optimizer_step(parts, num_updates, sums)
            sums.add(loss_det, clean_logits, adv_logits, y)
        else:
            state.skipped_steps += 1
            with torch.no_grad():
                for b, before in zip(buffers, saved):
                    b.copy_(before)
        dev_env.mark_step()
        state.batches_done += 1
        if guard is not None and hooks.log_interval and state.batches_done % hooks.log_interval == 0:
            guard.check(epoch)  # the log line below syncs anyway
        log.batch(x.shape[0], state.batches_done, loss_det, parts.optimizer)
        if hooks.save_recovery is not None and hooks.recovery_interval and step_ok \
                and num_updates % hooks.recovery_interval == 0:
            if guard is not None:
                guard.check(epoch)
            sums.flush(state)
            hooks.save_recovery(epoch, num_updates, state)
        if hooks.should_stop is not None and hooks.should_stop(state.batches_done):
            stopped = True
            break
    if guard is not None:
        guard.check(epoch)
    log.close()
    sums.flush(state)
    metrics = _epoch_metrics(state, dev_env, eps, _mean_lr(parts.optimizer))
    if state.skipped_steps and parts.grad_scaler is not None:
        # a few dropped steps while the scale settles are the scaler working; most of an epoch is divergence
        level = logging.WARNING if 2 * state.skipped_steps > state.batches_done else logging.INFO
        _logger.log(level, "epoch %d: the float16 grad scaler dropped %d of %d optimizer steps (non-finite scaled "
                    "gradients; its scale is now %g) on this process", epoch, int(state.skipped_steps),
                    int(state.batches_done), float(parts.grad_scaler.get_scale()))
    elif state.skipped_steps:
        _logger.warning("epoch %d: skipped %d optimizer steps with a non-finite loss or gradient on this process",
                        epoch, int(state.skipped_steps))
    if dev_env.primary:
        _logger.info("train epoch %d done in %.1fs: loss %.4f top1 %.2f robust_top1 %.2f", epoch, log.seconds(),
                     metrics["loss"], metrics["top1"], metrics["robust_top1"])
    return {"metrics": metrics, "num_updates": num_updates, "stopped": stopped, "state": state}


class _EpochLog:
    """Training progress: a bar on a TTY, else a line every ``interval`` batches (primary only)."""

    def __init__(self, desc: str, total: int, done: int, dev_env: DeviceEnv, interval: int):
        self.progress = Progress(total, desc, primary=dev_env.primary, log_every=interval, log_seconds=None,
                                 world_size=dev_env.world_size, done=done)
        self.interval, self.t_start = interval, time.time()

    def batch(self, bsz: int, done: int, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        status = None
        if self.interval and done % self.interval == 0:
            status = lambda: f"loss {float(loss):.4f} lr {_mean_lr(optimizer):.3e}"  # noqa: E731 (synced when shown)
        self.progress.update(1, images=bsz, status=status)

    def close(self) -> None:
        self.progress.close()

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


# ----------------------------------------------------------------------------------------------
# The evaluation loop (per-epoch evaluation of train.py and every evaluation CLI)
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
    attack_flags: list = field(default_factory=list)
    nonfinite_clean: int = 0  # examples whose clean logits hold NaN/inf (counted wrong)
    nonfinite_adv: int = 0  # the same for the adversarial logits
    outside_threat: int = 0  # adversarial examples outside the attack's eps-ball / box (the numbers use them)
    threat: Optional[tuple] = None  # the attack's (norm, eps, (lo, hi)) they were checked against
    per_example: Optional[dict] = None
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
    from src.errors import UsageError

    autocast = dev_env.autocast() if dev_env is not None else torch.autocast("cpu", enabled=False)
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        with autocast:
            logits = model(x)
        loss = nn.functional.cross_entropy(logits.float(), y, reduction="sum")
        if not loss.requires_grad:
            raise UsageError("the model's output has no gradient with respect to its input (it detaches or "
                             "recomputes the input outside autograd): gradient attacks cannot run on it")
        grad, = torch.autograd.grad(loss, x, allow_unused=True)
    if grad is None:
        return 1.0
    zero = grad.detach().flatten(1).abs().amax(dim=1) == 0
    return float(zero.float().mean())


def batchnorm_buffers(model: nn.Module) -> dict:
    """Copies of the running statistics of every BatchNorm-style layer (modules with
    ``track_running_stats``), keyed by module and buffer name: what crafting in train mode changes."""
    saved = {}
    for mod_name, module in model.named_modules():
        if hasattr(module, "track_running_stats"):
            for name, buf in module.named_buffers(recurse=False):
                if buf is not None:
                    saved[(mod_name, name)] = buf.detach().clone()
    return saved


def restore_batchnorm_buffers(model: nn.Module, saved: dict) -> None:
    """Write back the statistics saved by :func:`batchnorm_buffers` (in place, no reallocation)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for (mod_name, name), value in saved.items():
            getattr(modules[mod_name], name).copy_(value)


def craft_adversarial(model: nn.Module, attack: Callable, x: torch.Tensor, y: torch.Tensor, dev_env: DeviceEnv,
                      attack_mode: str = "eval") -> torch.Tensor:
    """``attack(model, x, y)`` with gradients on; the model is in eval mode afterwards.

    ``attack_mode='train'`` crafts in train mode (what the original did on TPU: BN batch
    statistics and dropout active); only the BatchNorm running statistics are saved and restored,
    so evaluation never changes the model (the weights are not touched by an attack).
    """
    saved = None
    if attack_mode == "train":
        saved = batchnorm_buffers(model)
        model.train()
    try:
        with torch.enable_grad(), dev_env.autocast():
            x_adv = attack(model, x, y)
    finally:
        if saved is not None:
            restore_batchnorm_buffers(model, saved)
        model.eval()  # an attack must not leave the model in train mode
    return x_adv.detach()


def _topk_correct(logits: torch.Tensor, y: torch.Tensor, k: int) -> tuple:
    """Per-example top-1 and top-k correctness, and the top-1 prediction."""
    top = logits.topk(k, dim=1).indices
    hit = top.eq(y.unsqueeze(1))
    return hit[:, 0], hit.any(dim=1), top[:, 0]


def _forward_metrics(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dev_env: DeviceEnv, topk: int) -> dict:
    """One no-grad forward: per-example top-1/top-k correctness, prediction and float32 CE loss.

    An example whose logits hold a NaN or inf is never counted correct (``argmax`` would pick the
    NaN's class, so class-0 examples of a diverging model would count as robust); ``nonfinite``
    counts them so the report can say so.
    """
    from src.sanity import check_logits

    with torch.no_grad(), dev_env.autocast():
        logits = model(x)
    logits = check_logits(logits, x.shape[0]).float()
    finite = torch.isfinite(logits).all(dim=-1)
    c1, ck, pred = _topk_correct(logits, y, min(topk, logits.shape[-1]))
    return {"c1": c1 & finite, "ck": ck & finite, "pred": pred,
            "loss": nn.functional.cross_entropy(logits, y, reduction="none"), "k": min(topk, logits.shape[-1]),
            "nonfinite": (~finite).sum()}


class _EvalProgress:
    """Evaluation progress with images/s and ETA: a bar on a TTY, else a line every ``log_freq``
    batches and at least every ``progress.LOG_SECONDS`` (primary process only)."""

    def __init__(self, total: int, dev_env: DeviceEnv, log_freq: int, desc: str, attacked: bool):
        self.attacked = attacked
        self.progress = Progress(total, desc, primary=dev_env.primary, log_every=log_freq,
                                 world_size=dev_env.world_size)

    def update(self, i: int, batch: int, sums: torch.Tensor, count: int, k: int) -> None:
        def status() -> str:  # one host sync, only when a line or the bar shows it
            s = sums.tolist()
            robust = f" robust@1 {100 * s[3] / count:.2f}" if self.attacked else ""
            return f"loss {s[2] / count:.4f} acc@1 {100 * s[0] / count:.2f} acc@{k} {100 * s[1] / count:.2f}{robust}"

        self.progress.update(1, images=batch, status=status)

    def close(self) -> None:
        self.progress.close()


def _sampler_indices(loader, count: int) -> Optional[torch.Tensor]:
    sampler = getattr(loader, "sampler", None)
    try:
        idx = list(iter(sampler)) if sampler is not None else None
    except TypeError:  # a sampler that is not iterable (e.g. an iterable dataset's)
        idx = None
    return torch.as_tensor(idx[:count], dtype=torch.long) if idx is not None and len(idx) >= count else None


def evaluate_loop(model: nn.Module, loader, dev_env: DeviceEnv, attack: Optional[Callable] = None, *,
                  attack_mode: str = "eval", max_batches: Optional[int] = None, log_freq: int = 0,
                  return_per_example: bool = False, check_gradients: bool = False, topk: int = 5,
                  desc: str = "validate") -> EvalResult:
    """Clean (and, with ``attack(model, x, y) -> x_adv``, adversarial) accuracy over ``loader``.

    Per batch: soft labels become their argmax; clean forward without a graph; with an attack,
    :func:`craft_adversarial` (eval mode, or ``attack_mode='train'``) and the adversarial forward.
    Float32 cross-entropy losses, top-1 and top-``min(topk, classes)`` correctness are exact counts
    on the device, summed over processes once at the end (each process evaluates its own shard).
    ``max_batches`` stops early (``--num-examples``). ``check_gradients`` measures the zero input
    gradients of the first batch before attacking (gradient masking, :func:`zero_gradient_fraction`).
    Every crafted example is checked against the attack's threat model (``src.sanity``): those outside
    its eps-ball or box are counted (``outside_threat``), not dropped -- the honesty report says so.
    """
    from src.bits.device import reduce_sums
    from src.sanity import attack_threat_model, check_input_batch, outside_threat_model

    model.eval()
    # c1, ck, loss, r1, rk, adv_loss, examples with non-finite clean / adversarial logits, adversarial examples
    # outside the threat model
    sums = torch.zeros(9, dtype=torch.float64, device=dev_env.device)
    threat = attack_threat_model(attack)
    total = len(loader) if hasattr(loader, "__len__") else 0
    if max_batches is not None:
        total = min(total, max_batches) if total else max_batches
    progress = _EvalProgress(total, dev_env, log_freq, desc, attack is not None)
    per, count, k_used, zero_frac, t0 = {}, 0, topk, None, time.time()
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x, y = dev_env.to_device(x, y)
        if i == 0:  # NaN pixels: error; pixels outside the attack's box: warning (src.sanity)
            check_input_batch(x, attack)
        y = _hard_targets(y)
        clean = _forward_metrics(model, x, y, dev_env, topk)
        k_used = clean["k"]
        items = {"label": y, "clean_pred": clean["pred"], "clean_correct": clean["c1"], "clean_loss": clean["loss"]}
        batch = [clean["c1"].sum(), clean["ck"].sum(), clean["loss"].sum()]
        nonfinite = [clean["nonfinite"], torch.zeros((), device=dev_env.device)]
        outside = torch.zeros((), device=dev_env.device)
        if attack is not None:
            if check_gradients and i == 0:
                zero_frac = zero_gradient_fraction(model, x, y, dev_env)
            x_adv = craft_adversarial(model, attack, x, y, dev_env, attack_mode)
            if threat is not None:
                outside = outside_threat_model(x, x_adv, threat).sum()
            adv = _forward_metrics(model, x_adv, y, dev_env, topk)
            items.update(adv_pred=adv["pred"], robust_correct=adv["c1"], adv_loss=adv["loss"])
            batch += [adv["c1"].sum(), adv["ck"].sum(), adv["loss"].sum()]
            nonfinite[1] = adv["nonfinite"]
        else:
            batch += [torch.zeros((), device=dev_env.device)] * 3
        sums += torch.stack([b.double() for b in batch + nonfinite + [outside]])
        if return_per_example:
            for key, v in items.items():
                per.setdefault(key, []).append(v.detach().cpu())
        count += x.shape[0]
        dev_env.mark_step()
        progress.update(i, x.shape[0], sums, count, k_used)
    progress.close()
    c1, ck, loss_sum, r1, rk, adv_loss_sum, bad_clean, bad_adv, outside_n, n = reduce_sums(dev_env,
                                                                                        sums.tolist() + [count])
    if (bad_clean or bad_adv) and dev_env.primary:
        _logger.warning("%s: %d of %d examples have NaN/inf logits (%d clean, %d adversarial); they count as wrong",
                        desc, int(max(bad_clean, bad_adv)), int(n), int(bad_clean), int(bad_adv))
    flags: list = []
    if attack is not None:
        from src.autoattack import attack_flags

        flags = attack_flags(attack)
    return EvalResult(num_examples=int(n), clean_correct1=c1, clean_correct5=ck, loss_sum=loss_sum,
                      attacked=attack is not None, robust_correct1=r1, robust_correct5=rk,
                      adv_loss_sum=adv_loss_sum, topk=k_used, seconds=time.time() - t0, local_examples=count,
                      zero_grad_fraction=zero_frac, attack_flags=flags, nonfinite_clean=int(bad_clean),
                      nonfinite_adv=int(bad_adv), outside_threat=int(outside_n), threat=threat,
                      per_example={k: torch.cat(v) for k, v in per.items()} if return_per_example else None,
                      indices=_sampler_indices(loader, count) if return_per_example else None)


def evaluate(model: nn.Module, loader, dev_env: DeviceEnv, attack: Optional[Callable] = None,
             attack_mode: str = "eval", phase: str = "eval") -> Dict[str, float]:
    """Per-epoch evaluation: ``loss``, ``top1``, ``top5`` and, with ``attack(model, x, y)``,
    ``robust_top1`` / ``robust_top5`` (NaN without an attack), through :func:`evaluate_loop`."""
    ev = evaluate_loop(model, loader, dev_env, attack, attack_mode=attack_mode, desc=phase)
    out = {"loss": ev.loss, "top1": ev.top1, "top5": ev.top5, "robust_top1": ev.robust_top1,
           "robust_top5": ev.robust_top5}
    if dev_env.primary:
        _logger.info("%s: loss %.4f top1 %.2f robust_top1 %.2f (%d images, %.1fs)", phase, out["loss"],
                     out["top1"], out["robust_top1"], ev.num_examples, ev.seconds)
    return out


def is_nan(v: float) -> bool:
    return isinstance(v, float) and math.isnan(v)
