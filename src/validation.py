"""validate(): single and bulk evaluation over the engine's loop (what ``validate.py`` runs).

``validate.py`` parses the command line (``src.arg_parser``) and calls :func:`run`, which
evaluates one model/checkpoint once per ``--attack-steps`` value (:func:`validate`) or many of
them (bulk mode: a checkpoint folder, ``--model all``, a wildcard or a file of names), then
prints and writes the result rows. The parts live in their own modules and are re-exported here:
the model, data and attack in ``src.eval_setup``, the loop in ``src.engine``, the honesty checks
in ``src.honesty``, the rows and files in ``src.results``, W&B in ``src.wandb_link``.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from src import storage
from src.arg_parser.evaluate import ATTACKS  # noqa: F401 (re-exported)
from src.arg_parser.evaluate import build_validate_parser as build_parser  # noqa: F401 (re-exported)
from src.arg_parser.evaluate import check_validate_args as check_args  # noqa: F401 (re-exported)
from src.arg_parser.evaluate import parse_validate_args as parse_args  # noqa: F401 (re-exported)
from src.bits.device import DeviceEnv, initialize_device, shutdown
from src.cli import seed_everything
from src.engine import EvalResult, evaluate_loop, zero_gradient_fraction  # noqa: F401 (re-exported)
from src.errors import ExpectedError, UsageError, first_line
# re-exported: validation is where users and the analysis tools find the evaluation API
from src.eval_setup import (EvalModel, ValidLabels, build_eval_attack, create_eval_dataset,  # noqa: F401
                            create_eval_loader, create_eval_model, eval_batches)
from src.honesty import (FEW_STEPS, PGD_ATTACKS, attack_setting_warnings, attack_strength_warnings,  # noqa: F401
                         binomial_se, example_count_warnings,
                         gradient_warnings, honesty_warnings, normalization_warnings, robust_above_clean_warnings,
                         unchanged_by_attack_warnings, weak_attack_warnings)
from src.results import RESULT_KEYS, check_results_target, result_row, results_json, write_results  # noqa: F401
from src.wandb_link import attack_label, log_to_wandb, wandb_target  # noqa: F401

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
    "real_labels_accuracy",
    "find_checkpoints",
    "bulk_model_names",
    "validate_bulk",
    "bulk_results_path",
    "result_columns",
    "retry_smaller_batch",
    "write_results",
    "wandb_target",
    "log_to_wandb",
    "run",
]

NORMALIZATION_MODES = ("loader", "raw", "model")
DEFAULT_BULK_RESULTS_NAME = "results-all.csv"
DEFAULT_BULK_RESULTS = "./" + DEFAULT_BULK_RESULTS_NAME


# ----------------------------------------------------------------------------------------------
# Evaluation loop
# ----------------------------------------------------------------------------------------------

def evaluate_model(model: nn.Module, loader: Iterable, dev_env: DeviceEnv,
                   attack: Optional[Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]] = None, *,
                   max_batches: Optional[int] = None, log_freq: int = 0, return_per_example: bool = False,
                   check_gradients: bool = True, topk: int = 5) -> EvalResult:
    """``engine.evaluate_loop`` with validate's defaults (gradient-masking check on): the one loop."""
    return evaluate_loop(model, loader, dev_env, attack, max_batches=max_batches, log_freq=log_freq,
                         return_per_example=return_per_example, check_gradients=check_gradients, topk=topk)


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
    model_name: str = ""  # the model evaluated (the flag's, or the checkpoint's record)

    @property
    def warnings(self) -> List[str]:
        return list(dict.fromkeys(w for ws in self.row_warnings for w in ws))


def validate(args: argparse.Namespace, dev_env: Optional[DeviceEnv] = None,
             model_override: Optional[EvalModel] = None) -> ValidationRun:
    """Evaluate ``args.model`` / ``args.checkpoint`` once per ``--attack-eps`` and ``--attack-steps`` value.

    The model and loader are built once; the RNG is reset to ``seed + rank`` before every
    evaluation pass, so each pass's PGD random starts are reproducible. Rows get an
    ``attack_eps`` / ``attack_steps`` column when several eps / step counts ran.
    """
    own_env = dev_env is None
    if own_env:
        dev_env = initialize_device(force_cpu=args.force_cpu, amp=args.amp, amp_dtype=args.amp_dtype,
                                    channels_last=args.channels_last, local_rank=args.local_rank)
    try:
        seed_everything(args.seed)
        # the data first: a wrong dataset argument fails before a model is built (pretrained weights downloaded)
        dataset = create_eval_dataset(args)
        em = model_override or create_eval_model(args, dev_env)
        loader = create_eval_loader(args, em, dev_env, dataset)
        max_batches = eval_batches(args, loader, dev_env)
        if em.normalization == "loader" and args.attack:
            _logger.warning("=" * 100)
            _logger.warning("ATTACKING LOADER-NORMALIZED INPUTS: eps and the [0, 1] box apply in normalized space, "
                            "robust numbers are not in pixel units.")
            _logger.warning("Use --normalize-model (or --no-normalize for models trained on raw [0, 1] inputs).")
            _logger.warning("=" * 100)
        steps_list, eps_list = _sweep(args)
        multi, multi_eps = len(steps_list) > 1, len(eps_list) > 1
        rows, evals, groups = [], [], []
        for eps in eps_list:
            eps_args = argparse.Namespace(**{**vars(args), "attack_eps": eps})
            group = []
            for steps in steps_list:
                row, ev = _evaluate_once(eps_args, steps, em, loader, dev_env, max_batches)
                if multi_eps:
                    row["attack_eps"] = eps
                if multi:
                    row["attack_steps"] = steps
                rows.append(row)
                evals.append(ev)
                group.append(row)
            groups.append(group)
        if args.real_labels:  # after the attacks: this extra clean pass must not move their random starts
            _use_real_labels(rows, real_labels_accuracy(args.real_labels, em.model, loader, dev_env, max_batches))
        n = evals[0].num_examples if evals else 0
        flags = list(dict.fromkeys(f for ev in evals for f in ev.attack_flags))
        zero = max((ev.zero_grad_fraction for ev in evals if ev.zero_grad_fraction is not None), default=None)
        counted = example_count_warnings(args.num_examples, n, args.batch_size * dev_env.world_size)
        row_warnings = []
        for g, (eps, group) in enumerate(zip(eps_list, groups)):  # step counts are compared within one eps only
            group_evals = evals[g * len(steps_list):(g + 1) * len(steps_list)]
            nonfinite = (max(ev.nonfinite_clean for ev in group_evals), max(ev.nonfinite_adv for ev in group_evals))
            outside = max(group_evals, key=lambda ev: ev.outside_threat)
            settings = counted + attack_setting_warnings(args.attack, args.attack_norm, eps, args.attack_lr,
                                                         em.num_classes)
            run_level = honesty_warnings(group if multi else [], n, attack=args.attack,
                                         steps=steps_list if args.attack else (), normalization_mode=em.normalization,
                                         trained_inputs=em.trained_inputs, attack_flags=flags,
                                         zero_grad_fraction=zero, notes=em.notes + _ema_notes(args, em),
                                         nonfinite=nonfinite, settings=settings,
                                         outside_threat=outside.outside_threat, threat=outside.threat)
            row_warnings += [list(dict.fromkeys(robust_above_clean_warnings(r) + run_level
                                                + (unchanged_by_attack_warnings(r, eps, n, _row_steps(r, args, steps_list))
                                                   if args.attack else [])))
                             for r in group]
        return ValidationRun(rows=rows, row_warnings=row_warnings, num_examples=n, evals=evals,
                             model_name=em.model_name or args.model)
    finally:
        if own_env:
            shutdown(dev_env)


def _sweep(args: argparse.Namespace) -> Tuple[List[int], List[float]]:
    """The step counts and eps values one model is evaluated at (one each without an attack)."""
    if not args.attack:
        return [args.attack_steps[0]], [args.attack_eps]
    return list(args.attack_steps), list(getattr(args, "attack_eps_values", None) or [args.attack_eps])


def result_columns(args: argparse.Namespace, bulk: bool = False) -> Tuple[List[str], bool]:
    """The columns of the rows ``run`` writes and whether the JSON is a list: the result keys, then
    ``attack_eps`` / ``attack_steps`` for several values; bulk rows have ``model`` first and
    ``checkpoint`` last (always a list)."""
    steps_list, eps_list = _sweep(args)
    columns = list(RESULT_KEYS) + (["attack_eps"] if len(eps_list) > 1 else []) + \
        (["attack_steps"] if len(steps_list) > 1 else [])
    if bulk:
        return ["model"] + columns + ["checkpoint"], True
    return columns, len(steps_list) * len(eps_list) > 1


def _evaluate_once(args: argparse.Namespace, steps: int, em: EvalModel, loader: Any, dev_env: DeviceEnv,
                   max_batches: Optional[int]) -> Tuple["OrderedDict[str, Any]", Any]:
    """One evaluation pass (clean, or with the attack at ``args.attack_eps`` and ``steps``) from a fixed seed."""
    seed_everything(args.seed + dev_env.global_rank)
    attack = build_eval_attack(args, steps, em.num_classes, dev_env)
    what = f"{args.attack}-{steps}" if args.attack in PGD_ATTACKS else (args.attack or "clean")
    if attack is not None:
        _logger.info("attack %s eps %g/255 (%s)%s", what, args.attack_eps, args.attack_norm,
                     f" step {args.attack_lr:g}/255" if args.attack_lr is not None and
                     args.attack in PGD_ATTACKS else "")
    # every attack here (PGD, APGD-CE, AutoAttack) follows input gradients: zero ones make it blind
    ev = evaluate_model(em.model, loader, dev_env, attack, max_batches=max_batches, log_freq=args.log_freq,
                        check_gradients=True)
    row = result_row(ev, em)
    _logger.info("%s: evaluated %d examples%s in %.1fs: top1 %.4f robust_top1 %.4f", what, ev.num_examples,
                 f" (--num-examples {args.num_examples})" if args.num_examples else "", ev.seconds,
                 row["top1"], row["robust_top1"])
    return row, ev


def _row_steps(row: Mapping[str, Any], args: argparse.Namespace, steps_list: Sequence[int]) -> Optional[int]:
    """The PGD step count of a result row (None for attacks without one)."""
    if args.attack not in PGD_ATTACKS:
        return None
    return int(row.get("attack_steps", steps_list[0]))


def _ema_notes(args: argparse.Namespace, em: EvalModel) -> List[str]:
    """--use-ema on a checkpoint without EMA weights evaluates its model weights: the results say so too."""
    if getattr(args, "use_ema", False) and em.weights and em.weights not in ("model_ema", "state_dict_ema"):
        return [f"--use-ema: the checkpoint has no EMA weights; these are the numbers of its model weights "
                f"('{em.weights}')"]
    return []


def _use_real_labels(rows: Sequence["OrderedDict[str, Any]"], accuracy: Tuple[float, float]) -> None:
    top1, top5 = accuracy
    for row in rows:
        row.update(top1=round(top1, 4), top1_err=round(100 - top1, 4), top5=round(top5, 4),
                   top5_err=round(100 - top5, 4))
    _logger.info("ImageNet-ReaL clean accuracy: top1 %.4f top5 %.4f (robust accuracy is against the dataset's own "
                 "labels)", top1, top5)


def real_labels_accuracy(real_json: str, model: nn.Module, loader: Any, dev_env: DeviceEnv,
                         max_batches: Optional[int] = None) -> Tuple[float, float]:
    """Clean top-1 / top-5 against ImageNet-ReaL labels through timm's ``RealLabelsImagenet`` (the
    original's ``--real-labels``), in one clean pass over ``loader`` in dataset order.

    ReaL gives several correct classes per image (or none: such images are skipped), which defines
    no adversarial objective, so robust accuracy stays against the dataset's own labels.
    """
    from timm.data import RealLabelsImagenet

    if dev_env.world_size > 1:
        raise UsageError("--real-labels needs a single process (the ReaL labels follow the dataset's file order)")
    names = getattr(loader.dataset, "filenames", None)
    if not callable(names):
        raise UsageError("--real-labels needs an ImageNet validation image folder (files ILSVRC2012_val_*.JPEG); "
                         f"the dataset {type(loader.dataset).__name__} has no file names")
    names = list(names(basename=True))
    with tempfile.TemporaryDirectory() as tmp:
        path = real_json
        if not storage.is_local(real_json):  # timm opens the file itself: a local copy of gs:// / memory://
            path = os.path.join(tmp, "real.json")
            with open(path, "wb") as f:
                f.write(storage.read_bytes(real_json))
        try:
            real = RealLabelsImagenet(names, real_json=path)
        except (AssertionError, ValueError) as e:
            raise UsageError(f"--real-labels {real_json}: cannot match its labels to the {len(names)} images of the "
                             f"dataset ({first_line(e) or 'one label list per ILSVRC2012 validation image expected'})"
                             ) from None
    model.eval()
    with torch.no_grad():
        for i, (x, y) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x, _ = dev_env.to_device(x, y)
            with dev_env.autocast():
                logits = model(x)
            if logits.shape[-1] < 5:
                raise UsageError("--real-labels needs an ImageNet classifier (top-5 of at least 5 classes)")
            try:
                real.add_result(logits.float())
            except KeyError as e:
                raise UsageError(f"--real-labels {real_json}: no ReaL labels for image {e}: the dataset is not the "
                                 f"ImageNet validation set") from None
    return real.get_accuracy(k=1), real.get_accuracy(k=5)


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

    Returns rows sorted by robust_top1 when an attack ran, else by top1 (descending; ties by
    top1), their warnings, and one line per failed job (a
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
            rows.append(OrderedDict([("model", run_.model_name or model_name)] + list(row.items()) +
                                    [("checkpoint", ckpt)]))
            warns.append(w)
    # a robustness evaluation ranks by what it measured: robust accuracy when an attack ran
    key = "robust_top1" if any(_sort_key(r.get("robust_top1")) > -math.inf for r in rows) else "top1"
    order = sorted(range(len(rows)), key=lambda j: (-_sort_key(rows[j].get(key)), -_sort_key(rows[j]["top1"])))
    return [rows[j] for j in order], [warns[j] for j in order], failures


def bulk_results_path(args: argparse.Namespace) -> str:
    """Where bulk mode writes its table: ``--results-file``, else ``results-all.csv`` in the
    evaluated checkpoint folder (next to what it describes, never the current directory by
    surprise), else ``./results-all.csv`` for a list of models."""
    if args.results_file:
        return args.results_file
    if args.checkpoint and storage.isdir(args.checkpoint):
        return storage.join(args.checkpoint, DEFAULT_BULK_RESULTS_NAME)
    return DEFAULT_BULK_RESULTS


def _sort_key(v: float) -> float:
    return v if isinstance(v, (int, float)) and math.isfinite(v) else -math.inf


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
        if args.results_file and dev_env.primary:  # before hours of attacks, not after
            storage.check_output_location(args.results_file, "--results-file")
            check_results_target(args.results_file)
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
            results_path = bulk_results_path(args)
            if dev_env.primary:
                columns, as_list = result_columns(args, bulk=True)  # an earlier bulk table like it is replaced,
                check_results_target(results_path, columns=columns, as_list=as_list)  # nothing else
                _logger.info("bulk mode: %d evaluations; the table goes to %s (--results-file to change)",
                             len(jobs), results_path)
            rows, warns, failures = validate_bulk(args, jobs, dev_env)
            if dev_env.primary:
                if rows:
                    write_results(results_path, rows, warns, as_list=True)
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
        if args.results_file and dev_env.primary:  # an earlier file of the same columns is replaced, nothing else
            columns, as_list = result_columns(args)
            check_results_target(args.results_file, columns=columns, as_list=as_list)
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
