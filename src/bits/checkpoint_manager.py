"""Training checkpoints in the original's format (timm.bits CheckpointManager, version 3).

Files in the experiment folder: ``last.pth.tar`` (every epoch), ``checkpoint-<epoch>.pth.tar`` for
the top ``--checkpoint-hist`` epochs by ``--eval-metric``, ``best.pth.tar`` (strict improvement,
a hard link to its ``checkpoint-<epoch>`` where the filesystem allows), and
``recovery-<global step>.pth.tar`` every ``--recovery-interval`` steps (the two newest kept).
Only ``last`` and recovery files keep the optimizer / scaler / scheduler state resuming needs;
the retained files keep weights, EMA and metadata (``retain``; the original's full layout with
``--checkpoint-full-state``, one set of weights with ``--checkpoint-weights-only``).
Every file is written atomically through ``src.storage``: a kill at any instant leaves the old or
the new complete file, locally, on ``gs://`` and on ``memory://``.

Dict keys (original-behaviour.md §0.4): epoch, step_count, step_count_global, model, model_ema,
train_cfg, optimizer, [grad_scaler], version, arch, hparams, metrics, metric_name,
metric_decreasing. Additions (ignored by the original's loaders): ``eval_config`` (what evaluating
the checkpoint needs: model, classes, patch size, input size, crop, interpolation, normalization
mode and mean/std; ``src.eval_config``), ``normalization`` (mean/std of a ``--normalize-model``
run), ``checkpoint_history`` (the top-N table, so resume keeps it), ``lr_scheduler``,
``epoch_state`` / ``epoch_done`` / ``rng_state`` (mid-epoch recovery).
"""
from __future__ import annotations

import logging
import math
import re
from typing import Any, Dict, List, Optional, Tuple

import torch

from src import storage
from src.bits.device import tree_to_cpu
from src.checkpoint import normalization_entry
from src.eval_config import RECORD_KEY, training_record
from src.utils import unwrap_model

_logger = logging.getLogger("robust_vits")

CHECKPOINT_VERSION = 3

# What the retained checkpoints (checkpoint-<epoch>, best) keep; last.pth.tar and recovery files
# always keep the full state, because resuming needs it.
RETAIN_FULL = "full"              # everything, optimizer included (the original's layout)
RETAIN_WEIGHTS = "weights"        # weights, EMA weights and metadata (default)
RETAIN_WEIGHTS_ONLY = "weights-only"  # one set of weights: those the metric was measured on
RETAIN_MODES = (RETAIN_FULL, RETAIN_WEIGHTS, RETAIN_WEIGHTS_ONLY)
RESUME_ONLY_KEYS = ("optimizer", "grad_scaler", "lr_scheduler")


def retained_state(st: Dict[str, Any], retain: str) -> Dict[str, Any]:
    """The part of a full training state a retained checkpoint keeps (see ``RETAIN_MODES``).

    ``weights-only`` stores the weights the selection metric was measured on as ``model``: the
    EMA's when there is one (the per-epoch evaluation measures the EMA then), so every evaluation
    CLI loads exactly the selected weights; ``weights_from`` records which they were.
    """
    if retain == RETAIN_FULL:
        return st
    out = {k: v for k, v in st.items() if k not in RESUME_ONLY_KEYS}
    out["resumable"] = False  # resuming from it needs --no-resume-opt (a fresh optimizer)
    if retain == RETAIN_WEIGHTS_ONLY:
        if out.get("model_ema") is not None:
            out["model"], out["weights_from"] = out["model_ema"], "model_ema"
        else:
            out["weights_from"] = "model"
        out["model_ema"] = None
    return out


class CheckpointManager:
    """Writes and prunes the checkpoints of one experiment folder."""

    def __init__(self, output_dir: str, arch: str, hparams: Dict[str, Any], metric_name: str = "top1",
                 max_history: int = 10, train_cfg: Optional[Dict[str, Any]] = None,
                 data_config: Optional[Dict[str, Any]] = None, retain: str = RETAIN_WEIGHTS):
        if retain not in RETAIN_MODES:
            raise ValueError(f"retain must be one of {RETAIN_MODES}, got '{retain}'")
        self.retain = retain  # what checkpoint-<epoch> / best files keep (last and recovery keep everything)
        self.output_dir = output_dir
        self.arch = arch
        self.hparams = hparams
        self.metric_name = metric_name
        self.metric_decreasing = metric_name == "loss"
        self.max_history = max(1, max_history)
        self.train_cfg = train_cfg or {}
        self.history: List[Tuple[int, float]] = []  # (epoch, metric), best first
        self.best: Optional[Tuple[int, float]] = None
        # the run's resolved data config (None: resolved again from hparams and the model)
        self.data_config = data_config
        self._eval_config: Optional[Dict[str, Any]] = None

    # -- state ----------------------------------------------------------------------------------
    def _better(self, a: float, b: float) -> bool:
        return a < b if self.metric_decreasing else a > b

    def _state(self, model, optimizer, epoch: int, step_count: int, step_count_global: int,
               model_ema=None, grad_scaler=None, lr_scheduler=None, metrics=None,
               extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        st: Dict[str, Any] = {
            "epoch": epoch,
            "step_count": step_count,
            "step_count_global": step_count_global,
            "model": unwrap_model(model).state_dict(),
            "model_ema": unwrap_model(model_ema).state_dict()
            if model_ema is not None else None,
            "train_cfg": dict(self.train_cfg),
            "optimizer": optimizer.state_dict(),
            "version": CHECKPOINT_VERSION,
            "arch": self.arch,
            "hparams": self.hparams,
            "metrics": dict(metrics or {}),
            "metric_name": self.metric_name,
            "metric_decreasing": self.metric_decreasing,
            "checkpoint_history": [list(h) for h in self.history],
            "best": list(self.best) if self.best else None,
        }
        if grad_scaler is not None:
            st["grad_scaler"] = grad_scaler.state_dict()
        if lr_scheduler is not None:
            from src.setup_task import scheduler_state

            st["lr_scheduler"] = scheduler_state(lr_scheduler)
        norm = normalization_entry(model)
        if norm is not None:
            st["normalization"] = norm
        st[RECORD_KEY] = self.eval_config(model)
        if extra:
            st.update(extra)
        return tree_to_cpu(st)

    def eval_config(self, model) -> Dict[str, Any]:
        """What evaluating these checkpoints needs (``src.eval_config``); the same for every epoch."""
        if self._eval_config is None:
            self._eval_config = training_record(model, self.arch, self.hparams, self.data_config)
        return dict(self._eval_config)

    def restore_history(self, ckpt: Dict[str, Any]) -> None:
        self.history = [(int(e), float(m)) for e, m in ckpt.get("checkpoint_history") or []]
        b = ckpt.get("best")
        self.best = (int(b[0]), float(b[1])) if b else None

    # -- writing --------------------------------------------------------------------------------
    def path(self, name: str) -> str:
        return storage.join(self.output_dir, name)

    def save_epoch(self, model, optimizer, epoch: int, step_count: int, step_count_global: int,
                   metrics: Dict[str, float], **kw) -> Optional[Tuple[int, float]]:
        """After an epoch: top-N checkpoint, best, and last (last is written last: it marks the
        epoch as complete for resume). Returns the best (epoch, metric) so far."""
        metric = metrics.get(self.metric_name)
        st = None
        removed: List[Tuple[int, float]] = []
        if metric is not None and not (isinstance(metric, float) and math.isnan(metric)):
            worst = self.history[-1] if len(self.history) >= self.max_history else None
            if worst is None or self._better(metric, worst[1]):
                self.history = [h for h in self.history if h[0] != epoch] + [(epoch, float(metric))]
                self.history.sort(key=lambda h: h[1], reverse=not self.metric_decreasing)
                removed = self.history[self.max_history:]
                self.history = self.history[:self.max_history]
                is_best = self.best is None or self._better(metric, self.best[1])
                if is_best:
                    self.best = (epoch, float(metric))
                st = self._state(model, optimizer, epoch, step_count, step_count_global, metrics=metrics, **kw)
                storage.torch_save(retained_state(st, self.retain), self.path(f"checkpoint-{epoch}.pth.tar"))
                if is_best:  # the same bytes: a hard link where the filesystem allows
                    storage.link_or_copy(self.path(f"checkpoint-{epoch}.pth.tar"), self.path("best.pth.tar"))
        if st is None:
            st = self._state(model, optimizer, epoch, step_count, step_count_global, metrics=metrics, **kw)
        else:
            st["checkpoint_history"] = [list(h) for h in self.history]
            st["best"] = list(self.best) if self.best else None
        st["epoch_done"] = True
        storage.torch_save(st, self.path("last.pth.tar"))
        # Pruned only after last.pth.tar commits the new history: a kill before this point resumes
        # with the old history, whose files must all still exist.
        for e, _ in removed:
            storage.remove(self.path(f"checkpoint-{e}.pth.tar"))
        self.clean_recovery(keep=0)
        return self.best

    def save_recovery(self, model, optimizer, epoch: int, step_count: int, step_count_global: int,
                      epoch_state: Dict[str, Any], rng_state: Optional[List[Dict[str, Any]]] = None, **kw) -> str:
        """Mid-epoch recovery point: resuming from it continues the same epoch. ``rng_state`` (one
        ``src.cli.rng_state()`` per process, by rank) lets the rest of the epoch draw the same random
        numbers (attack starts, mixup, dropout) as an uninterrupted run."""
        extra = {"epoch_state": epoch_state, "epoch_done": False}
        if rng_state is not None:
            extra["rng_state"] = rng_state
        st = self._state(model, optimizer, epoch, step_count, step_count_global, extra=extra, **kw)
        p = self.path(f"recovery-{step_count_global}.pth.tar")
        storage.torch_save(st, p)
        self.clean_recovery(keep=2)
        return p

    def prepare_folder(self, start_epoch: int, resume_step: Optional[int] = None) -> None:
        """Make the folder agree with the restored history before the run writes to it again.

        A run killed between ``checkpoint-<epoch>`` and ``last.pth.tar`` leaves files of an epoch
        the resumed run trains again, and maybe a ``best.pth.tar`` that the restored history does
        not know; an explicit ``--resume`` from an older checkpoint leaves newer recovery files that
        ``--resume auto`` would otherwise prefer. Also deletes temporary files of killed writes.
        """
        if not storage.exists(self.output_dir):
            return
        for p in storage.remove_stale_temp(self.output_dir):
            _logger.info("removed %s (temporary file of an interrupted write)", p)
        kept = {e for e, _ in self.history}
        stale = []
        for name in storage.listdir(self.output_dir):
            m = re.fullmatch(r"checkpoint-(\d+)\.pth\.tar", name)
            if m and int(m.group(1)) >= start_epoch and int(m.group(1)) not in kept:
                stale.append(self.path(name))
        if stale:
            _logger.info("removing checkpoints of epochs that will be trained again: %s", stale)
            storage.remove_many(stale)
            # best.pth.tar is written right after checkpoint-<epoch>: it may be from the lost epoch too
            if self.best is not None and storage.exists(self.path(f"checkpoint-{self.best[0]}.pth.tar")):
                storage.link_or_copy(self.path(f"checkpoint-{self.best[0]}.pth.tar"), self.path("best.pth.tar"))
            elif self.best is None:
                storage.remove(self.path("best.pth.tar"))
        if resume_step is not None:
            for step, p in self.recovery_files():
                if step > resume_step:
                    _logger.info("removing %s (newer than the resumed checkpoint)", p)
                    storage.remove(p)

    def recovery_files(self) -> List[Tuple[int, str]]:
        if not storage.exists(self.output_dir):
            return []
        out = []
        for name in storage.listdir(self.output_dir):
            m = re.fullmatch(r"recovery-(\d+)\.pth\.tar", name)
            if m:
                out.append((int(m.group(1)), self.path(name)))
        return sorted(out)

    def clean_recovery(self, keep: int = 2) -> None:
        files = self.recovery_files()
        for _, p in files[:max(0, len(files) - keep)]:
            storage.remove(p)


def checkpoint_step(path: str) -> int:
    """The global step a checkpoint was written at, without reading its tensors where possible.

    Local files are memory-mapped (``torch.load(mmap=True)`` reads only the small pickle; tensors
    stay on disk); other filesystems and legacy formats are read whole.
    """
    if storage.is_local(path):
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return int(ck.get("step_count_global", -1))
        except (RuntimeError, ValueError, OSError):
            pass  # not a zip-format file: fall through to a full read (which raises if corrupt)
    with storage.open_file(path, "rb") as f:
        ck = torch.load(f, map_location="cpu", weights_only=True)
    return int(ck.get("step_count_global", -1))


def find_resume_checkpoint(folder: str) -> Optional[str]:
    """The newest of ``last.pth.tar`` and ``recovery-*.pth.tar`` in ``folder`` (for ``--resume auto``)."""
    if not storage.exists(folder):
        return None
    best: Tuple[int, Optional[str]] = (-1, None)
    for name in storage.listdir(folder):
        if name == "last.pth.tar" or re.fullmatch(r"recovery-\d+\.pth\.tar", name):
            p = storage.join(folder, name)
            try:
                step = checkpoint_step(p)
            except Exception:  # a damaged file is skipped; another one may still be good
                _logger.warning("skipping unreadable checkpoint %s", p)
                continue
            if step > best[0]:
                best = (step, p)
    return best[1]
