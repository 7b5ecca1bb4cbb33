"""Attack convergence: the engine behind ``attack_convergence.py`` (original-behaviour.md §1.6, §6.2).

How does the robust loss of single examples grow with the number of PGD steps, over many random
restarts? On the first ``--n-points`` examples of the evaluation split that the model classifies
correctly (dataset order), every restart (``--runs``) attacks every point with PGD and records the
per-example cross-entropy after each step count of ``--steps-to-try``. The CSV has the original's
columns ``point, seed, steps, loss`` (``point`` = dataset index, ``seed`` = the restart's seed).

Step size. By default it is the original's: ``--attack-lr``, else ``1.5 * eps / --attack-steps``
for *every* step count (``--attack-steps`` defaults to 10, so 0.15 * eps). Each restart is reseeded
with its seed before attacking, so its random start is the same for every step count and PGD-k is
the first k steps of PGD-K: one trajectory of ``max(--steps-to-try)`` steps is run and the loss is
read off at each step count (losses at the start of iteration k, measured by ``src.attacks.pgd``'s
criterion, are the losses after k steps). ``--tie-step-size`` instead gives PGD-k the step
``1.5 * eps / k`` (the usual convention); each step count then runs its own attack.

``--one-instance`` (the original's "one run" mode) records the loss after every iteration
``0 .. max(--steps-to-try)`` with batch size 1.

Resuming and several processes. The work is cut into chunks, one per (batch of points, restart),
kept in ``<output>.state/`` by :class:`src.eval_state.EvalState`: a killed run continues where it
stopped, a run with other settings is refused, and ``torchrun`` processes share the chunks (the
numbers do not depend on the process count: restarts are seeded by their seed alone, where the
original added the process rank). The CSV is rewritten atomically from that state after every
chunk, in the original's row order (batch, restart, step count, point).
"""
from __future__ import annotations

import argparse
import csv
import io
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from src import storage
from src.arg_parser.analysis import CONVERGENCE_DEFAULT_POINTS as DEFAULT_POINTS  # noqa: F401 (re-exported)
from src.arg_parser.analysis import CONVERGENCE_DEFAULT_RUNS as DEFAULT_RUNS  # noqa: F401 (re-exported)
from src.arg_parser.analysis import CONVERGENCE_DEFAULT_STEPS as DEFAULT_STEPS  # noqa: F401 (re-exported)
from src.arg_parser.analysis import build_convergence_parser as build_parser  # noqa: F401 (re-exported)
from src.arg_parser.analysis import check_convergence_args as check_args  # noqa: F401 (re-exported)
from src.arg_parser.analysis import parse_convergence_args as parse_args  # noqa: F401 (re-exported)
from src.cli import seed_everything
from src.errors import UsageError
from src.eval_config import flag_given
from src.eval_setup import create_eval_dataset, create_eval_loader, create_eval_model, eval_settings
from src.eval_state import EvalState
from src.honesty import normalization_warnings

_logger = logging.getLogger("robust_vits")

__all__ = ["COLUMNS", "DEFAULT_STEPS", "build_parser", "parse_args", "check_args", "build_model_and_data",
           "select_points", "step_sizes", "attack_losses", "output_path", "fingerprint_of", "csv_text",
           "ConvergenceRun", "run_convergence", "run"]

COLUMNS = ("point", "seed", "steps", "loss")
STATE_SUFFIX = ".state"

# settings that change the numbers (the fingerprint of the state folder)
# (validate's, src.eval_setup.eval_settings, plus the study's own)
_SETTING_KEYS = ("checkpoint", "attack_steps", "tie_step_size", "one_instance", "batch_size", "seed", "runs",
                 "n_points", "steps_to_try")


# ----------------------------------------------------------------------------------------------
# Model, data and points
# ----------------------------------------------------------------------------------------------

def build_model_and_data(args: argparse.Namespace, dev_env) -> Tuple[Any, Any]:
    """The evaluated model (``EvalModel``) and a loader over the whole split in dataset order.

    The one place this module builds models and data, through the evaluation core's public
    factories. Every process scans the whole split, so all agree on the points.
    """
    from src.data import create_loader

    dataset = create_eval_dataset(args)  # first: a wrong data dir is one error line before any model is built
    em = create_eval_model(args, dev_env)
    loader = create_eval_loader(args, em, dev_env, dataset)
    if dev_env.world_size > 1:
        loader = create_loader(dataset, args.batch_size, is_training=False, workers=args.workers,
                               pin_memory=args.pin_mem)
    return em, loader


def _per_example_ce(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per example, in float32, computed like the attack's criterion."""
    return F.nll_loss(F.log_softmax(model(x).float(), dim=-1), y, reduction="none")


def select_points(model: torch.nn.Module, loader: Any, n_points: int, dev_env) -> Tuple[List[int], torch.Tensor,
                                                                                         torch.Tensor]:
    """Dataset ids, images and labels of the first ``n_points`` correctly classified examples."""
    from src.sanity import predicted_classes

    ids: List[int] = []
    xs: List[torch.Tensor] = []
    ys: List[torch.Tensor] = []
    seen = 0
    with torch.no_grad():
        for x, y in loader:
            x, y = dev_env.to_device(x, y)
            with dev_env.autocast():
                correct = predicted_classes(model(x)).eq(y).cpu()  # NaN/inf logits: not correct
            for j in torch.nonzero(correct).flatten().tolist():
                if len(ids) < n_points:
                    ids.append(seen + j)
                    xs.append(x[j])
                    ys.append(y[j])
            seen += int(y.shape[0])
            if len(ids) >= n_points:
                return ids, torch.stack(xs), torch.stack(ys)
    raise UsageError(f"only {len(ids)} of the {seen} examples are classified correctly; lower --n-points to at "
                     f"most {len(ids)}" if ids else f"none of the {seen} examples is classified correctly")


# ----------------------------------------------------------------------------------------------
# The attack
# ----------------------------------------------------------------------------------------------

class _RecordingLoss:
    """NLL-sum for the attack that keeps each example's loss at every iteration."""

    def __init__(self) -> None:
        self.history: List[torch.Tensor] = []

    def __call__(self, log_probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        per_example = F.nll_loss(log_probs, y, reduction="none")
        self.history.append(per_example.detach())
        return per_example.sum()


def step_sizes(args: argparse.Namespace) -> Dict[int, float]:
    """Step size (input units) of PGD-k for each recorded k."""
    from src.attacks import resolve_attack_cfg

    def size(steps: int) -> float:
        ns = argparse.Namespace(attack="pgd", attack_eps=args.attack_eps, attack_lr=args.attack_lr,
                                attack_steps=steps, attack_norm=args.attack_norm,
                                attack_boundaries=tuple(args.attack_boundaries))
        return resolve_attack_cfg(ns).step_size

    if args.tie_step_size:
        return {k: size(k) for k in args.steps_to_try}
    shared = size(args.attack_steps[0])
    return {k: shared for k in args.steps_to_try}


def _pgd(model, x, y, steps: int, step_size: float, args: argparse.Namespace, dev_env, criterion) -> torch.Tensor:
    from src.attacks import make_attack

    attack = make_attack("pgd", args.attack_eps / 255, step_size, steps, args.attack_norm,
                         tuple(args.attack_boundaries), criterion=criterion, dev_env=dev_env)
    with dev_env.autocast():
        return attack(model, x, y)


def attack_losses(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int, args: argparse.Namespace,
                  dev_env) -> torch.Tensor:
    """``[len(steps_to_try), B]`` per-example losses after k PGD steps, for one restart ``seed``.

    With one step size for every k, PGD-k is a prefix of PGD-K (same seed, same start), so one
    trajectory gives every k; otherwise each k is its own attack, reseeded with ``seed``.
    """
    sizes = step_sizes(args)
    steps = args.steps_to_try
    out = []
    if len(set(sizes.values())) == 1:
        seed_everything(seed)
        record = _RecordingLoss()
        x_adv = _pgd(model, x, y, steps[-1], sizes[steps[-1]], args, dev_env, record)
        with torch.no_grad(), dev_env.autocast():
            final = _per_example_ce(model, x_adv, y)
        trajectory = record.history[:steps[-1]] + [final]  # loss after 0, 1, ..., K steps
        out = [trajectory[k] for k in steps]
    else:
        for k in steps:
            seed_everything(seed)
            x_adv = _pgd(model, x, y, k, sizes[k], args, dev_env, _RecordingLoss())
            with torch.no_grad(), dev_env.autocast():
                out.append(_per_example_ce(model, x_adv, y))
    return torch.stack([t.float() for t in out]).cpu()


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------

def output_path(args: argparse.Namespace) -> str:
    """``--output-file`` or ``./<model>.csv`` (the original's default)."""
    return args.output_file or f"{args.model.replace('/', '_')}.csv"


def fingerprint_of(args: argparse.Namespace) -> Dict[str, Any]:
    """Everything the losses depend on (not the process count: see the module docstring)."""
    settings = {**eval_settings(args), **{k: getattr(args, k, None) for k in _SETTING_KEYS}}
    if not flag_given(args, "model"):  # the flag's default is not what ran: the checkpoint's record is
        settings["model"] = None
    return {"format": "robust-vits-attack-convergence", **settings}


def _loss_text(v: float) -> str:
    return str(np.float32(v))  # float32's shortest repr, as the original's files


def csv_text(merged_values: Dict[str, List[Any]], args: argparse.Namespace) -> str:
    """The CSV of every finished chunk: rows by batch, restart, step count, then point."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    b, runs = args.batch_size, args.runs
    points, losses = merged_values["point"], merged_values["loss"]
    for start in range(0, len(points), b):
        if points[start] is None:
            continue
        seed = args.seed + (start // b) % runs
        for si, k in enumerate(args.steps_to_try):
            w.writerows([points[i], seed, k, _loss_text(losses[i][si])] for i in range(start, start + b))
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# The study
# ----------------------------------------------------------------------------------------------

@dataclass
class ConvergenceRun:
    """What a run did: the CSV, its row count, chunks computed now and chunks found done."""
    path: str
    rows: int
    computed: int
    skipped: int
    warnings: List[str] = field(default_factory=list)  # of every run that computed rows of this CSV


def _open_state(args: argparse.Namespace, path: str, dev_env) -> EvalState:
    state_dir = path + STATE_SUFFIX
    storage.check_output_file(path, "--output-file", inputs=(args.checkpoint,))
    # a mistyped checkpoint is named as such, not as an earlier study's state "of another configuration"
    if args.checkpoint and not storage.exists(args.checkpoint):
        from src.errors import CheckpointError

        raise CheckpointError(f"checkpoint {args.checkpoint} not found")
    if storage.exists(path) and not storage.isdir(state_dir):
        raise UsageError(f"{path} exists but has no {storage.basename(state_dir)}/ folder to resume from; refusing "
                         f"to overwrite it: pass another --output-file, or delete it")
    storage.check_output_folder(state_dir, "--output-file (its .state folder)")  # a file there: one error line
    # chunk c covers batch c // runs and restart c % runs (the original's loop order)
    return EvalState(state_dir, fingerprint_of(args), n_examples=args.n_points * args.runs,
                     chunk_size=args.batch_size, fields=("point", "loss"), shard_id=dev_env.global_rank,
                     num_shards=dev_env.world_size,  # no --state-dir here: the state lives next to the CSV
                     elsewhere=f"use another --output-file (its state goes to <PATH>{STATE_SUFFIX}/)")


def _write_csv(state: EvalState, path: str, args: argparse.Namespace) -> int:
    merged = state.merge()
    storage.atomic_write_text(path, csv_text(merged.values, args))
    return merged.n_done * len(args.steps_to_try)


def run_convergence(args: argparse.Namespace, dev_env) -> ConvergenceRun:
    """Attack every pending (batch, restart) chunk and keep the CSV current; returns what was done."""
    path = output_path(args)
    state = _open_state(args, path, dev_env)
    if dev_env.primary:
        storage.remove_stale_temp_of(path)  # what a killed earlier write of the CSV left behind
    pending = state.pending(state.load())
    skipped = len(state.chunks) - len(pending)
    if skipped:
        _logger.info("%s: %d of %d chunks already done", state.state_dir, skipped, len(state.chunks))
    if pending:
        em, loader = build_model_and_data(args, dev_env)
        notes = em.notes + normalization_warnings(em.normalization, "pgd", em.trained_inputs)
        for w in notes:
            _logger.warning(w)
        ids, xs, ys = select_points(em.model, loader, args.n_points, dev_env)
        _logger.info("selected %d correctly classified points (dataset ids %d .. %d)", len(ids), ids[0], ids[-1])
        # kept in the state, so the run that completes the CSV (or a rerun that finds it done) reports them
        state.begin_run({"chunks_pending": len(pending), "warnings": list(notes)})
        b, runs = args.batch_size, args.runs
        for n, (start, end) in enumerate(pending, 1):
            batch, run = divmod(start // b, runs)
            sl = slice(batch * b, batch * b + b)
            t0 = time.time()
            losses = attack_losses(em.model, xs[sl], ys[sl], args.seed + run, args, dev_env)
            state.record(start, end, {"point": ids[sl], "loss": losses.t().tolist()})
            if dev_env.primary:
                _write_csv(state, path, args)
            _logger.info("[%d/%d] points %d..%d seed %d: mean loss %s (%.1fs)", n, len(pending), batch * b,
                         batch * b + b - 1, args.seed + run,
                         " ".join(f"{v:.3f}" for v in losses.mean(dim=1).tolist()), time.time() - t0)
    dev_env.barrier()
    rows = _write_csv(state, path, args) if dev_env.primary else 0
    return ConvergenceRun(path=path, rows=rows, computed=len(pending), skipped=skipped, warnings=_run_warnings(state))


def _run_warnings(state: EvalState) -> List[str]:
    """The honesty notes recorded by every run in the state folder (each process's file), de-duplicated."""
    out: List[str] = []
    for path in state.state_files():
        for entry in state.read_runs(path):
            for w in entry.get("warnings") or []:
                if isinstance(w, str) and w not in out:
                    out.append(w)
    return out


def run(args: argparse.Namespace) -> int:
    """The CLI: device session, study, one report line; returns the exit code."""
    from src.cli import device_session
    from src.data import check_dataset_name

    with device_session(force_cpu=args.force_cpu, amp=args.amp, amp_dtype=args.amp_dtype,
                        channels_last=args.channels_last, local_rank=args.local_rank) as dev_env:
        check_dataset_name(args.dataset)
        t0 = time.time()
        result = run_convergence(args, dev_env)
        if dev_env.primary:
            for w in result.warnings:
                print(f"WARNING: {w}")
            print(f"results: {result.path} ({result.rows} rows: {result.computed} chunk(s) computed now in "
                  f"{time.time() - t0:.1f}s, {result.skipped} already done)")
            sys.stdout.flush()
    return 0
