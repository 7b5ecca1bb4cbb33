"""The one adapter over ``pyautoattack`` (AutoAttack, Croce & Hein 2020).

The rest of the project never touches pyautoattack's API: it calls :func:`run_autoattack` or
:func:`make_autoattack` (what ``src.attacks.make_attack`` returns for ``apgd-ce`` and
``autoattack``). This module takes care of:

* names: ``'apgd-ce'`` is APGD-CE alone with 5 restarts (the original's ``version='custom'``,
  ``attacks_to_run=['apgd-ce']``); ``'standard'`` is standard AutoAttack (APGD-CE, APGD-T,
  FAB-T, Square); ``'plus'`` and ``'rand'`` are passed through. Norms are accepted in any
  case ('linf' -> 'Linf').
* honesty: AutoAttack's sanity checks (randomized defense, probability outputs, dynamic
  defense, too few classes, zero gradients, Square beating the gradient attacks) are logged by
  pyautoattack on the ``'auto-attack'`` logger at WARNING level, where nobody sees them. They
  are captured here, returned as ``flags`` and re-logged on the ``'robust_vits'`` logger so
  validate.py can print them in its report. We add one check of our own: a model left in
  train mode.
* reproducibility: a given ``seed`` makes the result repeatable; with ``seed=None`` AutoAttack
  seeds from the clock, like the original. Either way the caller's global RNG state is
  restored afterwards (pyautoattack calls ``torch.manual_seed`` internally).
* robustness: the device defaults to the model's; fp16/bf16 logits are cast to float32 (and
  inputs to the model's dtype) so half-precision models can be attacked.
"""
from __future__ import annotations

import contextlib
import logging
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Union

import torch
from torch import nn

_logger = logging.getLogger("robust_vits")

AUTOATTACK_LOGGER = "auto-attack"
VERSIONS = ("apgd-ce", "standard", "plus", "rand")
_NORMS = {"linf": "Linf", "l2": "L2", "l1": "L1"}
APGD_CE_RESTARTS = 5
TRAIN_MODE_FLAG = ("the model is in train mode: dropout / BatchNorm batch statistics make the evaluation "
                   "stochastic and batch-dependent; call model.eval() unless this is intended")


def autoattack_norm(norm: str) -> str:
    """Map 'linf' / 'l2' / 'l1' (any case) to AutoAttack's 'Linf' / 'L2' / 'L1'."""
    key = str(norm).lower()
    if key not in _NORMS:
        raise ValueError(f"unknown norm '{norm}' for AutoAttack: choose one of {sorted(_NORMS)}")
    return _NORMS[key]


def _check_version(version: str) -> None:
    if version not in VERSIONS:
        raise ValueError(f"unknown AutoAttack version '{version}': choose one of {list(VERSIONS)}")


# The fewest classes each version can attack: the untargeted DLR loss (APGD-DLR) needs 3, the
# targeted one (APGD-T) 4; APGD-CE alone needs a second class to move towards.
MIN_CLASSES = {"apgd-ce": 2, "standard": 4, "plus": 4, "rand": 3}


def check_num_classes(version: str, num_classes: Optional[int]) -> None:
    """Refuse, before any work, a model with too few classes for ``version`` (None: unknown, not checked).

    pyautoattack would otherwise fail inside the first batch (or, with one class, attack nothing).
    """
    needed = MIN_CLASSES.get(version, 2)
    if num_classes is not None and num_classes < needed:
        hint = "; use apgd-ce instead" if version != "apgd-ce" else ""
        raise ValueError(f"AutoAttack '{version}' needs at least {needed} classes, the model has {num_classes}"
                         f"{hint}")


def _check_eps(eps: float) -> None:
    if eps < 0:
        raise ValueError(f"AutoAttack eps must be >= 0, got {eps}")


def _model_device_dtype(model: nn.Module, fallback: torch.device) -> tuple[torch.device, Optional[torch.dtype]]:
    """Device and floating dtype of the model's first parameter (or buffer)."""
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device, (t.dtype if t.is_floating_point() else None)
    return fallback, None


class _FloatLogits(nn.Module):
    """Feeds the model inputs in its own dtype and hands AutoAttack float32 logits."""

    def __init__(self, model: nn.Module, input_dtype: Optional[torch.dtype]):
        super().__init__()
        self.model = model
        self.input_dtype = input_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_dtype is not None and x.dtype != self.input_dtype:
            x = x.to(self.input_dtype)
        return self.model(x).float()


_INITIAL = re.compile(r"initial accuracy: ([\d.]+)%")
_RUNNING = re.compile(r"running (\S+)$")
_BATCH = re.compile(r"(\S+) - (\d+)/(\d+) - (\d+) out of (\d+) successfully perturbed")
_AFTER = re.compile(r"robust accuracy after (\S+): ([\d.]+)% \(total time ([\d.]+) s\)")


class _AttackProgress:
    """AutoAttack's progress from its own log lines: which attack runs, how many points are left
    robust, and (through its ``attack_single_run`` calls) each restart / target class of it.

    pyautoattack logs these at DEBUG level once per attack and batch, and nothing during the
    restarts (one APGD-CE batch of 20 ImageNet images: minutes of silence); here they become a
    :class:`src.progress.Progress` (a bar on a TTY, log lines otherwise, rank 0 only).
    """

    def __init__(self, adversary, n: int, label: str):
        from src.progress import Progress

        self.adversary, self.n = adversary, n
        self.attacks = list(adversary.attacks_to_run)
        self.progress = Progress(len(self.attacks), f"AutoAttack {label} on {n} images", unit="attack")
        self.robust: Optional[int] = None
        self.attack, self.runs, self.batch, self.t_attack, self.t_runs = "", 0, (1, 1), time.time(), 0.0
        self.points, self.t_run = n, time.time()
        for obj in {id(a): a for a in (adversary.apgd, adversary.apgd_targeted, adversary.fab,
                                        adversary.square)}.values():
            obj.attack_single_run = self._counted(obj.attack_single_run)
        self.queries = 0
        adversary.square.margin_and_loss = self._queries_counted(adversary.square.margin_and_loss)

    def _runs_per_batch(self) -> int:
        a = self.adversary
        return {"apgd-ce": a.apgd.n_restarts, "apgd-dlr": a.apgd.n_restarts, "fab": a.fab.n_restarts,
                "apgd-t": a.apgd_targeted.n_target_classes * a.apgd_targeted.n_restarts,
                "fab-t": a.fab.n_target_classes, "square": a.square.n_restarts}.get(self.attack, 1)

    def _counted(self, run):
        def counted(*args, **kwargs):
            t0 = self.t_run = time.time()
            self.queries = 0
            out = run(*args, **kwargs)
            self.runs += 1
            self.t_runs += time.time() - t0
            total = max(self._runs_per_batch(), self.runs)
            eta = self.t_runs / self.runs * (total - self.runs)
            from src.progress import format_eta

            self.progress.note(f"{self.attack.upper()} run {self.runs}/{total} of batch {self.batch[0]}/"
                               f"{self.batch[1]} ({self.t_runs / self.runs:.1f} s/run, batch ETA {format_eta(eta)})"
                               f"{self._left()}")
            return out
        return counted

    def _queries_counted(self, margin_and_loss):
        """Square makes up to ``n_queries`` model queries per run without a word: count them."""
        def counted(*args, **kwargs):
            self.queries += 1
            if self.queries % 50 == 0:
                from src.progress import format_eta

                n_q, spent = self.adversary.square.n_queries, time.time() - self.t_run
                eta = spent / self.queries * max(n_q - self.queries, 0)
                self.progress.note(f"SQUARE query {self.queries}/{n_q} of run {self.runs + 1} (ETA of the run "
                                   f"{format_eta(eta)}){self._left()}")
            return margin_and_loss(*args, **kwargs)
        return counted

    def _left(self) -> str:
        return f", {self.robust}/{self.n} left robust" if self.robust is not None else ""

    def message(self, msg: str) -> None:
        m = _INITIAL.match(msg)
        if m:
            self.robust = round(float(m.group(1)) / 100 * self.n)
            self.progress.note(f"{self.robust}/{self.n} correctly classified; attacks: "
                               f"{', '.join(a.upper() for a in self.attacks)}", force=True)
            return
        m = _RUNNING.match(msg)
        if m:
            self.attack, self.runs, self.t_runs, self.batch, self.t_attack = m.group(1), 0, 0.0, (1, 1), time.time()
            self.points = self.robust if self.robust is not None else self.n  # what this attack works on
            self.progress.note(f"running {self.attack.upper()}{self._left()}")
            return
        m = _BATCH.match(msg)
        if m:
            if self.robust is not None:
                self.robust -= int(m.group(4))
            nb = int(m.group(3))
            self.batch, self.runs, self.t_runs = (min(int(m.group(2)) + 1, nb), nb), 0, 0.0
            self.progress.note(f"{self.attack.upper()} batch {m.group(2)}/{nb} done{self._left()}")
            return
        m = _AFTER.match(msg)
        if m:
            self.robust = round(float(m.group(2)) / 100 * self.n)
            self.progress.update(1, images=self.points,
                                 status=f"{m.group(1)} done in {time.time() - self.t_attack:.1f} s: {self.robust}/"
                                        f"{self.n} left robust ({m.group(2)}%)", force=True)
        elif msg.startswith("no robust datapoints left"):
            self.progress.note("no robust points left: the remaining attacks are skipped", force=True)

    def close(self) -> None:
        self.progress.close()


class _CaptureHandler(logging.Handler):
    """Collects AutoAttack's warnings as flags; turns its progress lines into progress (and forwards
    them verbatim when verbose)."""

    def __init__(self, verbose: bool):
        super().__init__(logging.DEBUG)
        self.verbose = verbose
        self.flags: List[str] = []
        self.progress: Optional[_AttackProgress] = None

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if record.levelno >= logging.WARNING:
            self.flags.append(msg)
            return
        if self.progress is not None:
            self.progress.message(msg)
        if self.verbose:
            _logger.info("AutoAttack: %s", msg)


@contextlib.contextmanager
def _captured_messages(verbose: bool) -> Iterator[_CaptureHandler]:
    """Route the 'auto-attack' logger (and pyautoattack's warnings.warn calls) into a handler that
    keeps the flags (``handler.flags``) and reports progress (``handler.progress``, set by the caller).

    The logger's level and propagation are restored afterwards; warnings not raised by
    pyautoattack are re-emitted unchanged.
    """
    aa_logger = logging.getLogger(AUTOATTACK_LOGGER)
    handler = _CaptureHandler(verbose)
    old_level, old_propagate = aa_logger.level, aa_logger.propagate
    aa_logger.setLevel(logging.DEBUG)  # its progress lines are DEBUG records
    aa_logger.propagate = False
    aa_logger.addHandler(handler)
    flags = handler.flags
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield handler
    finally:
        aa_logger.removeHandler(handler)
        aa_logger.setLevel(old_level)
        aa_logger.propagate = old_propagate
        if handler.progress is not None:
            handler.progress.close()
    for w in caught:
        if "pyautoattack" in str(w.filename):
            flags.append(str(w.message))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _reset_dynamic_check() -> None:
    """pyautoattack counts grad/backward calls in a module-level dict it never resets, so after
    one dynamic model every later run would be flagged; start each run from zero."""
    from pyautoattack import checks

    counters = getattr(checks, "funcs", None)
    if isinstance(counters, dict):
        for key in counters:
            counters[key] = 0


def _fork_rng(device: torch.device) -> contextlib.AbstractContextManager:
    cuda_devices = []
    if device.type == "cuda":
        cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    return torch.random.fork_rng(devices=cuda_devices)


def _num_classes(model: nn.Module, x: torch.Tensor, device: torch.device) -> int:
    with torch.no_grad():
        return int(model(x[:1].to(device)).shape[-1])


def _fit_targets_to_classes(adversary, version: str, n_cls: int) -> List[str]:
    """Use at most n_cls - 1 target classes in APGD-T / FAB-T.

    pyautoattack always uses 9 target classes and crashes with an IndexError on models with
    fewer than 10 classes; the targeted DLR loss also needs at least 4 classes (3 for the
    untargeted one). Too few classes is a clear error; fewer targets is a flag.
    """
    attacks = adversary.attacks_to_run
    needed = 4 if "apgd-t" in attacks else 3 if "apgd-dlr" in attacks else 2
    if n_cls < needed:
        raise ValueError(f"AutoAttack '{version}' needs at least {needed} classes (DLR loss), the model has "
                         f"{n_cls}; use apgd-ce instead")
    flags = []
    for name, attack in (("apgd-t", adversary.apgd_targeted), ("fab-t", adversary.fab)):
        if name in attacks and attack.n_target_classes > n_cls - 1:
            flags.append(f"the model has only {n_cls} classes: {name.upper()} uses {n_cls - 1} target classes "
                         f"instead of {attack.n_target_classes}")
            attack.n_target_classes = n_cls - 1
    return flags


@dataclass
class AutoAttackResult:
    """Adversarial examples, the model's predictions on them, and AutoAttack's flags."""
    x_adv: torch.Tensor
    y_adv: torch.Tensor
    y: torch.Tensor
    flags: List[str] = field(default_factory=list)

    @property
    def robust(self) -> torch.Tensor:
        """Per-example bool: still classified correctly after the attack."""
        return self.y_adv.eq(self.y)


def run_autoattack(model: nn.Module,
                   x: torch.Tensor,
                   y: torch.Tensor,
                   *,
                   version: str,
                   norm: str,
                   eps: float,
                   seed: Optional[int] = None,
                   batch_size: Optional[int] = None,
                   device: Optional[Union[str, torch.device]] = None,
                   verbose: bool = False,
                   state_path: Optional[Union[str, Path]] = None,
                   log_flags: bool = True) -> AutoAttackResult:
    """Run AutoAttack (``version``: 'standard', 'apgd-ce', 'plus' or 'rand') on one tensor batch.

    ``x`` are images in [0, 1], ``y`` integer labels (2-D soft labels are reduced to their
    argmax). ``batch_size`` defaults to ``len(x)`` (the original attacked each loader batch
    whole). ``state_path`` lets AutoAttack resume an interrupted run. The model is used in
    whatever mode it is in; a model in train mode is flagged. With ``log_flags`` every flag
    is also logged as a warning on the 'robust_vits' logger.
    """
    _check_version(version)
    _check_eps(eps)
    aa_norm = autoattack_norm(norm)
    from pyautoattack import AutoAttack

    model_device, model_dtype = _model_device_dtype(model, x.device)
    device = torch.device(device) if device is not None else model_device
    if y.dim() > 1:
        y = y.argmax(dim=-1)
    y = y.long()
    bs = int(batch_size) if batch_size else max(len(x), 1)
    wrapped = _FloatLogits(model, model_dtype)

    own_flags: List[str] = [TRAIN_MODE_FLAG] if model.training else []
    with _captured_messages(verbose) as handler, _fork_rng(device):
        flags = handler.flags
        _reset_dynamic_check()
        if version == "apgd-ce":
            adversary = AutoAttack(wrapped, attacks=["apgd-ce"], device=device, eps=float(eps), norm=aa_norm,
                                   seed=seed, version="custom")
            adversary.apgd.n_restarts = APGD_CE_RESTARTS
        else:
            adversary = AutoAttack(wrapped, device=device, eps=float(eps), norm=aa_norm, seed=seed,
                                   version=version)
        if version != "apgd-ce":
            own_flags += _fit_targets_to_classes(adversary, version, _num_classes(wrapped, x, device))
        handler.progress = _AttackProgress(adversary, len(x), version)
        x_adv, y_adv = adversary.run_standard_evaluation(
            x, y, batch_size=bs, state_path=Path(state_path) if state_path is not None else None)
    all_flags = list(dict.fromkeys(own_flags + flags))  # AutoAttack repeats some checks per attack
    if log_flags:
        for msg in all_flags:
            _logger.warning("AutoAttack check: %s", msg)
    return AutoAttackResult(x_adv=x_adv.detach(), y_adv=y_adv.to(y.device), y=y, flags=all_flags)


class AutoAttackFn:
    """``attack(model, x, y) -> x_adv`` running AutoAttack per batch, remembering its flags.

    Evaluation scripts call it once per loader batch; ``flag_counts`` maps each distinct flag
    to the number of calls that raised it and ``last_flags`` holds the latest call's flags, so
    the final report can list them. Each distinct flag is logged once, the first time it
    appears.
    """

    def __init__(self, version: str, eps: float, norm: str, seed: Optional[int] = None, verbose: bool = False,
                 device: Optional[Union[str, torch.device]] = None, batch_size: Optional[int] = None,
                 num_classes: Optional[int] = None):
        _check_version(version)
        _check_eps(eps)
        check_num_classes(version, num_classes)
        autoattack_norm(norm)
        self.version = version
        self.eps = eps
        self.norm = norm
        self.seed = seed
        self.verbose = verbose
        self.device = device
        self.batch_size = batch_size
        self.flag_counts: Dict[str, int] = {}
        self.last_flags: List[str] = []
        self.calls = 0

    @property
    def flags(self) -> List[str]:
        """Every distinct flag raised so far, in the order first seen."""
        return list(self.flag_counts)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        result = run_autoattack(model, x, y, version=self.version, norm=self.norm, eps=self.eps, seed=self.seed,
                                batch_size=self.batch_size, device=self.device, verbose=self.verbose,
                                log_flags=False)
        self.calls += 1
        self.last_flags = result.flags
        for msg in dict.fromkeys(result.flags):
            if msg not in self.flag_counts:
                _logger.warning("AutoAttack check: %s", msg)
            self.flag_counts[msg] = self.flag_counts.get(msg, 0) + 1
        return result.x_adv


def make_autoattack(version: str, eps: float, norm: str, seed: Optional[int] = None, verbose: bool = False,
                    device: Optional[Union[str, torch.device]] = None,
                    batch_size: Optional[int] = None, num_classes: Optional[int] = None) -> AutoAttackFn:
    """Build an :class:`AutoAttackFn` ('apgd-ce' or 'standard' are the ones the CLIs use); a known
    ``num_classes`` too small for ``version`` is a ValueError here, before any batch."""
    return AutoAttackFn(version, eps, norm, seed=seed, verbose=verbose, device=device, batch_size=batch_size,
                        num_classes=num_classes)


def attack_flags(attack: object) -> List[str]:
    """Report lines for the AutoAttack flags an evaluation attack raised, for honesty reports.

    Works on anything ``make_attack`` returns: PGD attacks have no flags and give ``[]``.
    Each line reads ``"<message> (in k of n batches)"``.
    """
    counts = getattr(attack, "flag_counts", None)
    if not counts:
        return []
    calls = getattr(attack, "calls", 0)
    return [f"{msg} (in {k} of {calls} batches)" for msg, k in counts.items()]
