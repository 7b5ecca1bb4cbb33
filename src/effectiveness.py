"""Attack effectiveness over training: the engine behind ``attack_effectiveness.py``.

How much weaker is a few-step PGD than PGD-200 at each stage of training (the paper's
"is PGD-1 enough?" study, original-behaviour.md §1.5 and §6.1)? For every saved checkpoint
``<checkpoints-dir>/checkpoint-<epoch>.pth.tar`` (and ``checkpoint-standard.pth.tar`` with
``--validate-standard``), every seed and every PGD step count, one evaluation with the evaluation
core of ``validate.py`` gives one CSV row: validate's result keys in the original's order
(``cropt_pct`` sic) followed by ``attack``, ``attack_steps``, ``model``, ``epoch``, ``seed``
(:data:`COLUMNS`, the schema the notebook reads). ``--run-apgd-ce`` adds an APGD-CE row per
checkpoint and seed (``attack_steps`` empty).

Differences from the original, all deliberate:

* The CSV is its own file, ``<checkpoints-dir>/attack-effectiveness.csv`` by default (the
  original appended to ``<checkpoints-dir>/summary.csv``, the training run's summary). A path
  named ``summary.csv`` in a training folder is refused.
* The whole (small) file is rewritten atomically after every row, so it is always complete, and
  a run is **resumable**: rows already in the file for ``(epoch, seed, attack, attack_steps)`` are
  not recomputed. The evaluation settings the rows depend on (model, data, eps, normalization,
  ...) are recorded next to the CSV in ``<csv>.settings.json``; a restart with other settings is
  refused instead of mixing numbers of two configurations in one file. The rows' honesty warnings
  are kept there too, so a resumed run reports those of the rows it skipped.
* Every checkpoint that still has work is checked for existence before any evaluation starts.
* Each row is seeded on its own (``seed + rank``, like validate), so its numbers do not depend on
  which rows ran before it: a resumed run writes the same file as an uninterrupted one.
* validate.py flags that this tool sets per row (``--checkpoint``, ``--attack-steps``, ``--seed``,
  ``--results-file``, ``--attack`` other than pgd) are refused with the flag to use instead,
  rather than silently overridden.

Test hook: ``ROBUST_VITS_TEST_KILL_AFTER_ROWS=k`` makes the process SIGKILL itself right after its
k-th row has been written (simulated pre-emption). Unset outside tests.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from src import engine, storage
from src.arg_parser.evaluate import DEFAULT_OUTPUT_NAME
from src.arg_parser.evaluate import build_effectiveness_parser as build_parser  # noqa: F401 (re-exported)
from src.arg_parser.evaluate import parse_effectiveness_args as parse_args  # noqa: F401 (re-exported)
from src.cli import seed_everything
from src.errors import UsageError
from src.eval_config import flag_given
from src.eval_setup import (build_eval_attack, create_eval_dataset, create_eval_loader, create_eval_model,
                             eval_batches, eval_settings)
from src.honesty import (attack_setting_warnings, attack_strength_warnings, example_count_warnings, gradient_warnings,
                         nonfinite_warnings, normalization_warnings, robust_above_clean_warnings,
                         threat_model_warnings)
from src.results import RESULT_KEYS, result_row

_logger = logging.getLogger("robust_vits")

__all__ = [
    "COLUMNS",
    "KEY_COLUMNS",
    "DEFAULT_OUTPUT_NAME",
    "STANDARD",
    "KILL_AFTER_ROWS_ENV",
    "Job",
    "ResultsCsv",
    "EffectivenessRun",
    "build_parser",
    "parse_args",
    "checkpoint_path",
    "plan_jobs",
    "output_path",
    "settings_of",
    "run_effectiveness",
    "summary_table",
    "run",
]

# The original's CSV schema (notebooks/data/attack-effectiveness-*.csv).
COLUMNS: Tuple[str, ...] = tuple(RESULT_KEYS) + ("attack", "attack_steps", "model", "epoch", "seed")
# What identifies a row for resuming.
KEY_COLUMNS = ("epoch", "seed", "attack", "attack_steps")
SETTINGS_SUFFIX = ".settings.json"
SETTINGS_FORMAT = "robust-vits-attack-effectiveness"
STANDARD = "standard"
KILL_AFTER_ROWS_ENV = "ROBUST_VITS_TEST_KILL_AFTER_ROWS"


# Settings that change the numbers of a row besides its (epoch, seed, attack, attack_steps) key.
# (validate's, src.eval_setup.eval_settings, plus the sweep's own)
_SETTING_KEYS = ("num_examples", "batch_size", "checkpoints_dir")


# ----------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------

EpochLabel = Union[int, str]


@dataclass(frozen=True)
class Job:
    """One row to compute: a checkpoint (epoch label), a seed, an attack and its step count."""
    epoch: EpochLabel
    seed: int
    attack: str  # 'pgd' | 'apgd-ce'
    steps: Optional[int]  # None for APGD-CE

    @property
    def key(self) -> Tuple[str, str, str, str]:
        """The row's identity as it reads in the CSV (strings; empty attack_steps for APGD-CE)."""
        return str(self.epoch), str(self.seed), self.attack, "" if self.steps is None else str(self.steps)

    @property
    def name(self) -> str:
        return f"{self.attack}-{self.steps}" if self.steps is not None else self.attack


def checkpoint_path(checkpoints_dir: str, epoch: EpochLabel) -> str:
    return storage.join(checkpoints_dir, f"checkpoint-{epoch}.pth.tar")


def plan_jobs(epochs: Sequence[int], seeds: Sequence[int], steps: Sequence[int], run_apgd_ce: bool = False,
              validate_standard: bool = False) -> List[Job]:
    """Every row of the sweep in the original's order: checkpoint, then seed, then step count (then APGD-CE)."""
    labels: List[EpochLabel] = list(epochs) + ([STANDARD] if validate_standard else [])
    jobs = []
    for epoch in labels:
        for seed in seeds:
            jobs += [Job(epoch, seed, "pgd", k) for k in steps]
            if run_apgd_ce:
                jobs.append(Job(epoch, seed, "apgd-ce", None))
    return jobs


def _norm_dir(path: str) -> str:
    return os.path.abspath(path) if storage.is_local(path) else str(path).rstrip("/")


def output_path(args: argparse.Namespace) -> str:
    """``--output-file`` or ``<checkpoints-dir>/attack-effectiveness.csv``; never a training summary.csv."""
    path = args.output_file or storage.join(args.checkpoints_dir, DEFAULT_OUTPUT_NAME)
    if storage.basename(path) == "summary.csv":
        folder = storage.dirname(path) or "."
        if _norm_dir(folder) == _norm_dir(args.checkpoints_dir) or storage.exists(storage.join(folder, "args.yaml")):
            raise UsageError(f"--output-file {path} is the training run's summary.csv; attack effectiveness writes "
                             f"its own file (default {DEFAULT_OUTPUT_NAME} in --checkpoints-dir)")
    return path


def settings_of(args: argparse.Namespace, world_size: int = 1) -> Dict[str, Any]:
    """The settings every row depends on besides its key (JSON-able, canonical)."""
    settings = {**eval_settings(args), **{k: getattr(args, k, None) for k in _SETTING_KEYS}}
    if not flag_given(args, "model"):  # the flag's default is not what ran: each checkpoint's record is
        settings["model"] = None
    settings["checkpoints_dir"] = _norm_dir(args.checkpoints_dir)
    settings["world_size"] = int(world_size)  # shards and per-rank seeds change the numbers
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


# ----------------------------------------------------------------------------------------------
# The results file
# ----------------------------------------------------------------------------------------------

def _cell(value: Any) -> str:
    """A value as csv.DictWriter writes it (None -> empty), so rows read back compare equal."""
    return "" if value is None else str(value)


class ResultsCsv:
    """The results CSV: existing rows (as read), new rows appended, whole file rewritten atomically."""

    def __init__(self, path: str):
        self.path = str(path)
        self.settings_path = self.path + SETTINGS_SUFFIX
        self.rows: List[List[str]] = []
        self.settings: Optional[Dict[str, Any]] = None  # as last written by write_settings

    def load(self) -> "ResultsCsv":
        """Read the existing file (if any); refuse one with another header or broken rows."""
        self.rows = []
        if not storage.exists(self.path):
            return self
        try:
            text = storage.read_text(self.path)
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read the results file {self.path} ({type(e).__name__}); pass another "
                             f"--output-file") from None
        if not text.strip():
            return self
        reader = csv.reader(io.StringIO(text))
        header = next(reader)
        if tuple(header) != COLUMNS:
            raise UsageError(f"{self.path} exists and is not an attack-effectiveness results file (its header starts "
                             f"{','.join(header[:4])}..., expected {','.join(COLUMNS[:4])}...); refusing to touch it: "
                             f"pass another --output-file")
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(COLUMNS):
                raise UsageError(f"{self.path} line {line} has {len(row)} fields, expected {len(COLUMNS)}; fix or "
                                 f"delete that line (it will be recomputed), or pass another --output-file")
            self.rows.append(list(row))
        return self

    def keys(self) -> set:
        idx = [COLUMNS.index(c) for c in KEY_COLUMNS]
        return {tuple(r[i] for i in idx) for r in self.rows}

    def dicts(self) -> List[Dict[str, str]]:
        return [dict(zip(COLUMNS, r)) for r in self.rows]

    def text(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows(self.rows)
        return buf.getvalue()

    def append(self, row: Mapping[str, Any], write: bool = True) -> None:
        """Add one row (all of :data:`COLUMNS`) and rewrite the file atomically."""
        self.rows.append([_cell(row[c]) for c in COLUMNS])
        if write:
            storage.atomic_write_text(self.path, self.text())

    # -- settings of the rows ---------------------------------------------------------------------

    def read_settings(self) -> Optional[Dict[str, Any]]:
        if not storage.exists(self.settings_path):
            return None
        try:
            doc = json.loads(storage.read_text(self.settings_path))
            if doc.get("format") != SETTINGS_FORMAT or not isinstance(doc.get("settings"), dict):
                raise ValueError("not a settings file")
        except (OSError, ValueError, UnicodeDecodeError, AttributeError):
            raise UsageError(f"{self.settings_path} (the settings of the rows of {self.path}) is damaged; delete it "
                             f"to accept the existing rows as they are, or pass another --output-file") from None
        return doc["settings"]

    def check_settings(self, settings: Mapping[str, Any]) -> None:
        """Existing rows must come from the same settings: refuse to mix two configurations."""
        if not self.rows:
            return
        theirs = self.read_settings()
        if theirs is None:
            _logger.warning("%s has %d rows but no %s: their evaluation settings cannot be checked; assuming they "
                            "match this run (%s)", self.path, len(self.rows), storage.basename(self.settings_path),
                            ", ".join(f"{k}={settings[k] if settings[k] is not None else 'from the checkpoints'}"
                                      for k in ("model", "attack_eps", "num_examples")))
            return
        diff = [k for k in sorted(set(theirs) | set(settings)) if theirs.get(k) != settings.get(k)]
        if diff:
            shown = "; ".join(f"{k}: {json.dumps(theirs.get(k))} there vs {json.dumps(settings.get(k))} now"
                              for k in diff[:3])
            raise UsageError(f"{self.path} holds rows computed with other settings ({shown}); refusing to mix them: "
                             f"pass another --output-file, or delete {storage.basename(self.settings_path)} to accept "
                             f"the existing rows as they are")

    def read_warnings(self) -> List[str]:
        """The honesty warnings of the rows already in the file (recorded with their settings)."""
        if not self.rows or not storage.exists(self.settings_path):
            return []
        self.read_settings()  # a damaged file is one error line
        warnings = json.loads(storage.read_text(self.settings_path)).get("warnings") or []
        return [str(w) for w in warnings] if isinstance(warnings, list) else []

    def write_settings(self, settings: Mapping[str, Any], warnings: Sequence[str] = ()) -> None:
        """The settings of the rows and their honesty warnings so far (printed again by a resumed run)."""
        self.settings = dict(settings)
        doc = {"format": SETTINGS_FORMAT, "version": 1, "columns": list(COLUMNS), "settings": dict(settings),
               "warnings": list(warnings)}
        storage.atomic_write_text(self.settings_path, json.dumps(doc, indent=2, sort_keys=True) + "\n")

    def write_warnings(self, warnings: Sequence[str]) -> None:
        """Rewrite the settings file with the warnings so far (after :meth:`write_settings`)."""
        if self.settings is not None:
            self.write_settings(self.settings, warnings)


# ----------------------------------------------------------------------------------------------
# Running the sweep
# ----------------------------------------------------------------------------------------------

@dataclass
class EffectivenessRun:
    """What a run did: the file, all its rows, the rows computed now and those found already done."""
    path: str
    rows: List[Dict[str, str]]
    computed: List[Job] = field(default_factory=list)
    skipped: int = 0
    warnings: List[str] = field(default_factory=list)


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: Sequence[str]):
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


@contextlib.contextmanager
def _ema_preferred(active: bool) -> Iterator[None]:
    """With EMA *preferred* (not demanded), a checkpoint without EMA weights is normal: no warning."""
    flt = _DropMessages(["--use-ema: checkpoint"])
    if active:
        _logger.addFilter(flt)
    try:
        yield
    finally:
        _logger.removeFilter(flt)


def _missing_checkpoints_message(checkpoints_dir: str, missing: Sequence[EpochLabel]) -> str:
    present: List[str] = []
    try:
        if storage.isdir(checkpoints_dir):
            names = storage.listdir(checkpoints_dir)
            present = [n[len("checkpoint-"):-len(".pth.tar")] for n in names
                       if n.startswith("checkpoint-") and n.endswith(".pth.tar")]
    except OSError:
        present = []  # an unreadable folder: the message then lists no present checkpoints
    from timm.utils import natural_key

    present = sorted(present, key=natural_key)
    have = (f"; it has checkpoints for epochs {' '.join(present)}" if present
            else "; it has no checkpoint-<epoch>.pth.tar")
    names = ", ".join(f"checkpoint-{m}.pth.tar" for m in missing[:5]) + (" ..." if len(missing) > 5 else "")
    return (f"{len(missing)} requested checkpoint(s) not found in {checkpoints_dir}: {names}{have} (training keeps "
            f"only the best --checkpoint-hist epochs); pass --epochs-to-try with epochs that have checkpoints"
            + (" (and drop --validate-standard)" if STANDARD in missing else ""))


def _note(warnings: List[str], new: Sequence[str]) -> None:
    """Collect honesty warnings for the final report, logging each the first time it appears."""
    for w in new:
        if w not in warnings:
            warnings.append(w)
            _logger.warning(w)


def _test_kill_point(written: int) -> None:
    """Test-only simulated pre-emption (see the module docstring)."""
    target = os.environ.get(KILL_AFTER_ROWS_ENV)
    if target and written >= int(target):
        os.kill(os.getpid(), signal.SIGKILL)


def _evaluate_checkpoint(args: argparse.Namespace, base: argparse.Namespace, dataset: Any, label: EpochLabel,
                         pending: Sequence[Job], results: "ResultsCsv", run_: "EffectivenessRun",
                         warnings: List[str], written: int, dev_env: Any) -> int:
    """Every pending row of one checkpoint (loaded once, EMA weights preferred); returns rows written so far."""
    ckpt = checkpoint_path(args.checkpoints_dir, label)
    with _ema_preferred(args.use_ema):
        em = create_eval_model(base, dev_env, checkpoint=ckpt)
    loader = create_eval_loader(base, em, dev_env, dataset)
    max_batches = eval_batches(base, loader, dev_env)
    _note(warnings, em.notes + normalization_warnings(em.normalization, "pgd", em.trained_inputs)
          + attack_setting_warnings("pgd", getattr(base, "attack_norm", "linf"), base.attack_eps, base.attack_lr))
    label_rows: Dict[int, List[Dict[str, Any]]] = {}
    n_examples = 0
    for job in (j for j in pending if j.epoch == label):
        seed_everything(job.seed + dev_env.global_rank)
        ns = argparse.Namespace(**{**vars(base), "attack": job.attack, "seed": job.seed})
        attack = build_eval_attack(ns, job.steps if job.steps is not None else 0, em.num_classes, dev_env)
        ev = engine.evaluate_loop(em.model, loader, dev_env, attack, max_batches=max_batches, log_freq=args.log_freq,
                                  check_gradients=True)  # PGD and APGD-CE both follow input gradients
        row = result_row(ev, em)
        row.update(attack=job.attack, attack_steps=job.steps, model=em.model_name or args.model, epoch=job.epoch,
                   seed=job.seed)
        n_examples = ev.num_examples
        _note(warnings, robust_above_clean_warnings(row) + gradient_warnings(ev.zero_grad_fraction)
              + nonfinite_warnings(ev.nonfinite_clean, ev.nonfinite_adv, ev.num_examples)
              + threat_model_warnings(ev.outside_threat, ev.num_examples, ev.threat)
              + example_count_warnings(base.num_examples, ev.num_examples, base.batch_size * dev_env.world_size)
              + [f"AutoAttack check: {f}" for f in ev.attack_flags])
        if job.attack == "pgd":
            label_rows.setdefault(job.seed, []).append(row)
        results.append(row, write=dev_env.primary)
        if dev_env.primary:  # the row's warnings live next to it: a resumed run reports them too
            results.write_warnings(warnings)
        run_.computed.append(job)
        written += 1
        _logger.info("[%d/%d] epoch %s seed %d %s: top1 %.2f robust_top1 %.2f loss %.4f adv_loss %.4f (%d examples, "
                     "%.1fs)", written, len(pending), job.epoch, job.seed, job.name, row["top1"], row["robust_top1"],
                     row["loss"], row["adv_loss"], ev.num_examples, ev.seconds)
        if dev_env.primary:
            _test_kill_point(written)
    for rows in label_rows.values():
        _note(warnings, [f"epoch {label}: {w}" for w in attack_strength_warnings(rows, n_examples, "pgd")])
    return written


def _refuse_checkpoints_dir(checkpoints_dir: str) -> None:
    if storage.exists(checkpoints_dir):
        raise UsageError(f"--checkpoints-dir {checkpoints_dir} is a file: pass the training run's folder "
                         f"(it holds checkpoint-<epoch>.pth.tar)")
    raise UsageError(f"--checkpoints-dir {checkpoints_dir} does not exist")


def run_effectiveness(args: argparse.Namespace, dev_env) -> EffectivenessRun:
    """Evaluate every pending row of the sweep on ``dev_env``; returns what was done.

    Up front (before any evaluation): the results file is read (and refused when it is not
    ours or was computed with other settings), the rows still to do are planned, and the
    checkpoint of every epoch with work is checked to exist. The dataset is created once; each
    checkpoint is loaded once (EMA weights preferred) for all its seeds and step counts.
    """
    path = output_path(args)
    # a folder, or one of the checkpoints it evaluates, is refused by name (not read as a damaged CSV)
    storage.check_output_file(path, "--output-file",
                              inputs=[checkpoint_path(args.checkpoints_dir, e) for e in args.epochs_to_try])
    results = ResultsCsv(path).load()
    settings = settings_of(args, dev_env.world_size)
    if not storage.isdir(args.checkpoints_dir):  # a typo is named as one, not as rows of "other settings"
        theirs = results.read_settings() if results.rows else None
        if theirs is None or theirs.get("checkpoints_dir") != settings["checkpoints_dir"]:
            _refuse_checkpoints_dir(args.checkpoints_dir)
    results.check_settings(settings)
    jobs = plan_jobs(args.epochs_to_try, args.seeds, args.steps_to_try, args.run_apgd_ce, args.validate_standard)
    done = results.keys()
    pending = [j for j in jobs if j.key not in done]
    skipped = len(jobs) - len(pending)
    labels = list(dict.fromkeys(j.epoch for j in pending))
    if labels and not storage.isdir(args.checkpoints_dir):
        _refuse_checkpoints_dir(args.checkpoints_dir)
    missing = [e for e in labels if not storage.exists(checkpoint_path(args.checkpoints_dir, e))]
    if missing:
        raise UsageError(_missing_checkpoints_message(args.checkpoints_dir, missing))
    if skipped:
        _logger.info("%s already holds %d of the %d rows of this sweep; computing the other %d", path, skipped,
                     len(jobs), len(pending))
    earlier = results.read_warnings()  # of the rows already there: the report covers every row of the file
    run_ = EffectivenessRun(path=path, rows=results.dicts(), skipped=skipped, warnings=list(earlier))
    if not pending:
        return run_

    folder = storage.dirname(path)
    if dev_env.primary and folder:
        storage.check_output_folder(folder, "--output-file")
    # a validate-style namespace for the shared evaluation core
    base = argparse.Namespace(**{**vars(args), "checkpoint": "", "attack_steps": list(args.steps_to_try),
                                 "seed": args.seeds[0], "results_file": "", "log_wandb": False})
    dataset = create_eval_dataset(base)  # a wrong data argument is an error before anything is written
    if dev_env.primary:
        for written_file in (path, results.settings_path):  # what a killed earlier write left behind
            storage.remove_stale_temp_of(written_file)
        results.write_settings(settings, earlier)
    warnings: List[str] = list(earlier)
    written = 0
    for label in labels:
        written = _evaluate_checkpoint(args, base, dataset, label, pending, results, run_, warnings, written, dev_env)
    run_.rows = results.dicts()
    run_.warnings = warnings
    return run_


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

def _float(v: str) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _mean(vals: Sequence[float]) -> float:
    vals = [v for v in vals if math.isfinite(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def summary_table(rows: Sequence[Mapping[str, str]]) -> str:
    """Mean over seeds of PGD ``adv_loss`` per epoch and step count, and the notebook's relative
    difference to the strongest attack: ``|L_max - L_k| / L_max * 100`` (in %)."""
    from timm.utils import natural_key

    pgd = [r for r in rows if r["attack"] == "pgd" and r["attack_steps"] != ""]
    if not pgd:
        return ""
    steps = sorted({int(r["attack_steps"]) for r in pgd})
    epochs = sorted({r["epoch"] for r in pgd}, key=natural_key)
    k_max = steps[-1]
    head = ["epoch"] + [f"pgd-{k}" for k in steps] + [f"rel.diff pgd-{k} %" for k in steps[:-1]]
    lines = [head]
    for e in epochs:
        loss = {k: _mean([_float(r["adv_loss"]) for r in pgd if r["epoch"] == e and int(r["attack_steps"]) == k])
                for k in steps}
        rel = [abs(loss[k_max] - loss[k]) / loss[k_max] * 100 if loss[k_max] else float("nan") for k in steps[:-1]]
        lines.append([e] + [f"{loss[k]:.4f}" for k in steps] + [f"{v:.2f}" for v in rel])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    out = ["adversarial loss (mean over seeds) and relative difference to the strongest PGD:"]
    out += ["  ".join(str(c).rjust(w) for c, w in zip(line, widths)) for line in lines]
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    """The CLI: device, sweep, report; returns the exit code."""
    from src.bits.device import initialize_device, shutdown
    from src.data import check_dataset_name
    from src.cli import setup_logging

    dev_env = initialize_device(force_cpu=args.force_cpu, amp=args.amp, amp_dtype=args.amp_dtype,
                                channels_last=args.channels_last, local_rank=args.local_rank)
    setup_logging(dev_env.primary)
    try:
        check_dataset_name(args.dataset)
        t0 = time.time()
        result = run_effectiveness(args, dev_env)
        if dev_env.primary:
            for w in result.warnings:
                print(f"WARNING: {w}")
            table = summary_table(result.rows)
            if table:
                print(table)
            print(f"results: {result.path} ({len(result.rows)} rows: {len(result.computed)} computed now in "
                  f"{time.time() - t0:.1f}s, {result.skipped} of this sweep already present)")
            sys.stdout.flush()
        return 0
    finally:
        shutdown(dev_env)
