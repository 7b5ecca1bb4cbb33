"""RobustBench's evaluation protocol, reimplemented without the ``robustbench`` package.

``robustbench`` cannot be installed next to timm 1.0.31 and pyautoattack (DESIGN.md §2), so
``validate_robustbench.py`` reproduces its ``benchmark()`` here:

* **Data.** RobustBench's example sets (``src.robustbench_data``): the CIFAR test sets in file
  order, RobustBench's 5000 ImageNet validation ids with its preprocessing.
* **Attack.** AutoAttack ``standard`` (APGD-CE, APGD-T, FAB-T, Square) with the threat model's
  norm and eps, through ``src.autoattack`` (the one pyautoattack adapter). Clean and robust
  accuracy are measured on the same examples.
* **Report.** RobustBench's ``model_info`` fields (``clean_acc`` / ``autoattack_acc`` as percent
  strings with two decimals, ``eps`` as ``"8/255"`` for Linf and a plain number for L2), plus
  per-example results and provenance (id-list hash, seed, package versions, preprocessing,
  AutoAttack's flags, shards, timings).

Beyond RobustBench: the examples are evaluated in fixed chunks whose AutoAttack seed is
``seed + first example index``, recorded per chunk in ``src.eval_state``; the evaluation can be
split over processes (torchrun, or ``--num-shards/--shard-id`` jobs) and resumed after a kill,
and the merged report equals that of one uninterrupted process.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import re
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from src import storage
from src.arg_parser.evaluate import check_robustbench_args as check_args  # noqa: F401 (re-exported)
from src.errors import UsageError
from src.honesty import attack_setting_warnings, threat_model_warnings
# re-exported: the protocol's data, as robustbench users and the tests find it
from src.robustbench_data import (DATASETS, DEFAULT_N_EXAMPLES, IMAGENET_CLASS_MAP_FILE,  # noqa: F401
                                  IMAGENET_IDS_FILE, REPO_ROOT, CifarTestSet, ExampleSet, ImageNetSubset,
                                  InModelResize, TfdsImageNetSubset, imagenet_transform, load_chunk, load_examples,
                                  load_imagenet_class_map, load_imagenet_ids, protocol_dataset, sha256_text)

_logger = logging.getLogger("robust_vits")

__all__ = [
    "DATASETS",
    "THREAT_MODELS",
    "DEFAULT_N_EXAMPLES",
    "IMAGENET_IDS_FILE",
    "IMAGENET_CLASS_MAP_FILE",
    "ExampleSet",
    "CifarTestSet",
    "ImageNetSubset",
    "canonical_threat_model",
    "format_eps",
    "format_accuracy",
    "load_imagenet_ids",
    "load_imagenet_class_map",
    "load_examples",
    "imagenet_transform",
    "InModelResize",
    "evaluate_chunk",
    "build_report",
    "run",
]


THREAT_MODELS = ("Linf", "L2")
DEFAULT_NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}
FIELDS = ("clean", "robust")
AUTOATTACK_VERSION = "standard"


# ----------------------------------------------------------------------------------------------
# names and formatting


def canonical_threat_model(name: str) -> str:
    """'linf' / 'Linf' / 'LINF' -> 'Linf'; 'l2' -> 'L2'."""
    for tm in THREAT_MODELS:
        if str(name).lower() == tm.lower():
            return tm
    raise UsageError(f"unknown threat model '{name}': choose Linf or L2")


def format_eps(eps_255: float, threat_model: str) -> str:
    """eps as RobustBench's model_info files write it: ``"8/255"`` (Linf), ``"0.5"`` (L2).

    ``eps_255`` is the CLI value in /255 units (the original's convention for both norms, so an
    L2 radius of 0.5 is passed as 127.5).
    """
    if canonical_threat_model(threat_model) == "Linf":
        return f"{eps_255:g}/255"
    return f"{eps_255 / 255:.6g}"


def format_accuracy(fraction: float) -> str:
    """RobustBench's accuracy strings: percent with two decimals (``0.4760 -> "47.60"``)."""
    return f"{100.0 * fraction:.2f}"


# ----------------------------------------------------------------------------------------------
# evaluation of one chunk


def chunk_seed(seed: int, start: int) -> int:
    """AutoAttack's seed for the chunk whose first example is ``start``: a function of the chunk
    only, so sharded and resumed runs draw exactly the random numbers of an uninterrupted run
    (and ``--chunk-size 0`` is AutoAttack(seed=seed) over all examples, like RobustBench)."""
    return int(seed) + int(start)


@torch.no_grad()
def _clean_predictions(model: nn.Module, x: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    from src.sanity import predicted_classes

    preds = []
    for i in range(0, len(x), batch_size):  # NaN/inf logits predict no class (-1): never clean, so never robust
        preds.append(predicted_classes(model(x[i:i + batch_size].to(device))).cpu())
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def evaluate_chunk(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, threat_model: str, eps: float,
                   seed: int, batch_size: int, device: torch.device
                   ) -> Tuple[List[int], List[int], List[str], int]:
    """Clean-correct and robust-correct (0/1 per example) under AutoAttack standard, its flags, and how
    many of its adversarial examples lie outside the threat model (eps-ball, [0, 1] box).

    ``eps`` is in [0, 1] units. An example counts as robust only if it is also clean-correct
    (AutoAttack never attacks misclassified points; the AND guards against a float tie that
    makes the two clean forward passes disagree).
    """
    from src.autoattack import run_autoattack
    from src.sanity import outside_threat_model

    clean = _clean_predictions(model, x, batch_size, device).eq(y)
    result = run_autoattack(model, x, y, version=AUTOATTACK_VERSION, norm=threat_model, eps=eps, seed=seed,
                            batch_size=batch_size, device=device, log_flags=False)
    robust = result.robust.cpu() & clean
    outside = int(outside_threat_model(x.cpu(), result.x_adv.cpu(), (threat_model, eps, (0.0, 1.0))).sum())
    return [int(v) for v in clean.tolist()], [int(v) for v in robust.tolist()], list(result.flags), outside


# ----------------------------------------------------------------------------------------------
# provenance and report


def package_versions() -> Dict[str, Optional[str]]:
    from importlib import metadata

    out: Dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "timm", "pyautoattack", "numpy", "pillow"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(repo: str = REPO_ROOT) -> Optional[str]:
    """The checked-out commit of the robust-vits repository, read from ``.git`` (None outside a checkout)."""
    git = os.path.join(repo, ".git")
    try:
        if os.path.isfile(git):  # worktree / submodule: "gitdir: <path>"
            with open(git) as f:
                git = os.path.join(repo, f.read().split(":", 1)[1].strip())
        with open(os.path.join(git, "HEAD")) as f:
            head = f.read().strip()
        if not head.startswith("ref:"):
            return head or None
        ref = head.split(":", 1)[1].strip()
        ref_path = os.path.join(git, *ref.split("/"))
        if os.path.isfile(ref_path):
            with open(ref_path) as f:
                return f.read().strip() or None
        packed = os.path.join(git, "packed-refs")
        if os.path.isfile(packed):
            with open(packed) as f:
                for line in f:
                    parts = line.strip().split(" ")
                    if len(parts) == 2 and parts[1] == ref:
                        return parts[0]
    except (OSError, IndexError):
        return None
    return None


def weights_sha256(model: nn.Module) -> str:
    """sha256 over the evaluated model's state dict (names, dtypes, shapes, bytes): what was
    evaluated, whatever file (or pretrained download) it came from."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool
                     else t.to(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _count_flags(merged: Any) -> Dict[str, int]:
    """AutoAttack's check messages and in how many chunks each appeared."""
    flags: Dict[str, int] = {}
    for res in merged.chunks.values():
        for msg in res.info.get("flags", []):
            flags[msg] = flags.get(msg, 0) + 1
    return flags


def build_report(*, merged, examples: ExampleSet, fingerprint: Dict[str, Any], args_summary: Dict[str, Any],
                 preprocessing: Dict[str, Any], threat_model: str, eps_255: float, seed: int,
                 chunk_size: int, batch_size: int, wall_seconds: float, state_dir: str,
                 file_infos: Dict[str, Dict[str, Any]], notes: Sequence[str] = ()) -> Dict[str, Any]:
    """The JSON report: RobustBench's model_info fields, then per-example results and provenance.

    ``warnings`` holds ``notes`` (what the model probe and the setup found: a randomized, batch-dependent
    or stateful model, normalized inputs), the attack-setting warnings and, when some of AutoAttack's
    adversarial examples lie outside the threat model, that count; chunks recorded by a version that did not
    count them are reported as ``outside_threat_model_unchecked`` examples, with a warning (never as inside).
    """
    n = merged.n_examples
    outside = sum(int(res.info.get("outside_threat_model", 0)) for res in merged.chunks.values())
    unchecked = sum(res.end - res.start for res in merged.chunks.values() if "outside_threat_model" not in res.info)
    unchecked_warnings = [] if not unchecked else [
        f"{unchecked} of the {n} examples come from state chunks written by an earlier robust-vits that did not "
        f"check AutoAttack's adversarial examples against the threat model (eps-ball, [0, 1] box): whether those "
        f"lie inside it is unknown; evaluate them again (a new --state-dir) to check"]
    clean = merged.values["clean"]
    robust = merged.values["robust"]
    n_clean, n_robust = int(sum(clean)), int(sum(robust))
    clean_frac = n_clean / n if n else float("nan")
    robust_frac = n_robust / n if n else float("nan")
    compute_seconds = sum(float(res.info.get("seconds", 0.0)) for res in merged.chunks.values())
    report: Dict[str, Any] = {
        # RobustBench model_info fields (left None where only the authors can fill them in)
        "link": None,
        "name": None,
        "authors": None,
        "additional_data": None,
        "number_forward_passes": None,
        "dataset": examples.name,
        "venue": None,
        "architecture": args_summary.get("model"),
        "eps": format_eps(eps_255, threat_model),
        "clean_acc": format_accuracy(clean_frac),
        "reported": None,
        "autoattack_acc": format_accuracy(robust_frac),
        "footnote": None,
        # the protocol and the numbers in full precision
        "threat_model": threat_model,
        "n_examples": n,
        "clean_accuracy": clean_frac,
        "robust_accuracy": robust_frac,
        "clean_correct": n_clean,
        "robust_correct": n_robust,
        "per_example": {
            "order": "example index 0..n_examples-1 of 'examples.source'; '1' = correct",
            "clean_correct": "".join(str(int(v)) for v in clean),
            "robust_correct": "".join(str(int(v)) for v in robust),
        },
        "examples": examples.provenance(),
        "preprocessing": preprocessing,
        "autoattack": {"version": AUTOATTACK_VERSION, "norm": threat_model, "eps": eps_255 / 255.0,
                       "eps_cli_255": eps_255, "seed": seed, "chunk_seed": "seed + index of the chunk's first example",
                       "chunk_size": chunk_size, "batch_size": batch_size, "flags": _count_flags(merged),
                       "outside_threat_model": outside, "outside_threat_model_unchecked": unchecked},
        "model": args_summary,
        # what makes the number mean something else than it seems: the model (randomized, batch-dependent,
        # stateful), the settings (an L2 radius in the wrong units), examples outside the threat model
        "warnings": list(dict.fromkeys(list(notes) + attack_setting_warnings("autoattack", threat_model, eps_255)
                                       + threat_model_warnings(outside, n, (threat_model, eps_255 / 255.0,
                                                                            (0.0, 1.0))) + unchecked_warnings)),
        "config_fingerprint": fingerprint,
        "shards": {
            "state_dir": state_dir,
            "n_chunks": len(merged.chunks),
            "n_state_files": len(file_infos),
            "state_files": file_infos,
            "duplicate_chunks_differing": merged.conflicts,
        },
        "timing": {"compute_seconds": round(compute_seconds, 3), "this_run_wall_seconds": round(wall_seconds, 3)},
        "provenance": provenance(),
    }
    return report


def provenance() -> Dict[str, Any]:
    """Which code and packages produced a report, and when."""
    return {
        "packages": package_versions(),
        "robust_vits_commit": git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tool": "robust-vits validate_robustbench.py (RobustBench protocol reimplemented; robustbench package not "
                "used)",
    }


# ----------------------------------------------------------------------------------------------
# the whole run (validate_robustbench.py)


@dataclass
class EvaluationSetup:
    model: nn.Module
    examples: ExampleSet
    preprocessing: Dict[str, Any]
    fingerprint: Dict[str, Any]
    model_summary: Dict[str, Any]
    notes: List[str] = field(default_factory=list)  # honesty notes of the setup, for the report's warnings




def _build_model(args: argparse.Namespace) -> Tuple[nn.Module, Any, str, Any]:
    """The network through model_factory: the checkpoint's record (``src.eval_config``) merged with
    the flags, pretrained or checkpoint weights, the patch size (a no-op at the model's own size).
    Returns ``(net, LoadedCheckpoint | None, weights source, EvalSettings)``."""
    from src.checkpoint import load_checkpoint_file
    from src.eval_config import read_record, resolve_settings
    from src.model_factory import create_model, load_checkpoint, set_patch_size

    ckpt = load_checkpoint_file(args.checkpoint, trust=args.trust_checkpoint) if args.checkpoint else None
    record = read_record(ckpt, model_hint=args.model, path=args.checkpoint) if ckpt is not None else None
    settings = resolve_settings(args, record)
    if settings.num_classes is None:
        settings.num_classes = DEFAULT_NUM_CLASSES[protocol_dataset(args.dataset)]
    net = create_model(settings.model, pretrained=not args.checkpoint, num_classes=settings.num_classes,
                       img_size=settings.img_size)
    loaded = None
    weights_source = "timm pretrained weights"
    if args.checkpoint:
        loaded = load_checkpoint(net, args.checkpoint, use_ema=args.use_ema, trust=args.trust_checkpoint, ckpt=ckpt)
        weights_source = f"{args.checkpoint} ({loaded.state_key})"
    set_patch_size(net, settings.patch_size)
    return net, loaded, weights_source, settings


def _normalization_layer(args: argparse.Namespace, net: nn.Module, record: Any, defaults: Any
                         ) -> Tuple[nn.Module, List[str]]:
    """Normalization inside the model when ``--mean/--std`` are given or the checkpoint records that
    its network saw normalized inputs (model_factory's precedence: flags > checkpoint > model
    defaults, per value). A record of raw [0, 1] inputs contradicted by ``--mean/--std`` is warned about."""
    from src.model_factory import RecordedNormalization, resolve_normalization, wrap_normalization

    rec_mode = record.normalization if record is not None else None
    recorded = RecordedNormalization(record.mean, record.std, record.source) \
        if rec_mode in ("model", "loader") and record.mean and record.std else None
    if args.mean is None and args.std is None and recorded is None:
        return net, []
    if rec_mode == "raw":
        _logger.warning("--mean/--std override the checkpoint's record (raw [0, 1] inputs; %s): the network sees "
                        "inputs it was not trained on", record.source)
    mean, std, source = resolve_normalization(args.mean, args.std, recorded, defaults)
    if recorded is not None and (args.mean or args.std) and (mean, std) != (recorded.mean, recorded.std):
        _logger.warning("--mean/--std %s/%s override the checkpoint's recorded normalization %s/%s (%s)", list(mean),
                        list(std), list(recorded.mean), list(recorded.std), record.source)
    if args.mean is None and args.std is None:
        _logger.info("normalizing inside the model with the mean %s / std %s %s (pass --mean/--std to override)",
                     list(mean), list(std), source)
    return wrap_normalization(net, mean, std), [f"ImageNormalizer(mean={list(mean)}, std={list(std)}) {source}"]


def setup_evaluation(args: argparse.Namespace) -> EvaluationSetup:
    """Model (weights, patch size, wrappers) and examples, with the run's fingerprint."""
    from timm.data import resolve_data_config

    from src.model_factory import patch_size_of, three

    # the examples first: a missing or bad data file is one error line before a (possibly large) model is built
    examples = _read_protocol_examples(args)
    net, loaded, weights_source, settings = _build_model(args)
    num_classes = settings.num_classes
    patch_size = patch_size_of(net)
    overrides = {k: v for k, v in settings.data_overrides.items() if k in ("input_size", "crop_pct", "interpolation",
                                                                             "crop_mode")}
    data_config = resolve_data_config(overrides, model=net)
    mean_default, std_default = three(data_config["mean"]), three(data_config["std"])
    model, in_model = _normalization_layer(args, net, settings.record, (mean_default, std_default))
    size = int(data_config["input_size"][-1])
    crop_pct = float(data_config.get("crop_pct") or 1.0)
    interp = data_config.get("interpolation") or "bilinear"
    if args.upsample_in_model:
        model = nn.Sequential(InModelResize(size, crop_pct, interp), model)
        in_model.insert(0, f"Resize({math.floor(size / crop_pct)}, {interp}, antialias) + CenterCrop({size})")

    desc, notes = _set_protocol_transform(examples, args, data_config, (mean_default, std_default), in_model)
    if max(examples.labels(), default=0) >= num_classes:
        raise UsageError(f"the {args.dataset} labels go up to {max(examples.labels())} but the model has "
                         f"{num_classes} classes; pass --num-classes")
    _logger.info("evaluating %s (%d classes%s) at %dx%d px, crop_pct %g, %s; %s; settings from %s", settings.model,
                 num_classes, f", patch size {patch_size}" if patch_size else "", size, size, crop_pct, interp,
                 " + ".join(in_model) if in_model else "no layer before the network",
                 settings.record.source if settings.record is not None else "the flags and the model's defaults")

    model.eval()
    from src.sanity import probe_model_outputs

    # outputs that are not [B, classes] logits: an error now, not a traceback inside AutoAttack; notes are logged
    # (AutoAttack's own randomness / probability checks also land in the report's flags)
    probed = probe_model_outputs(model, data_config["input_size"], num_classes, torch.device("cpu"))
    for note in probed:
        _logger.warning(note)
    notes = notes + probed
    preprocessing = {"loader": desc, "in_model": in_model,
                     "data_config": {"input_size": list(data_config["input_size"]), "crop_pct": crop_pct,
                                     "interpolation": interp}}
    model_summary = {"model": settings.model, "num_classes": num_classes, "weights": weights_source,
                     "use_ema": bool(args.use_ema), "patch_size": patch_size,
                     "weights_sha256": weights_sha256(model)}
    fingerprint = _fingerprint(args, examples, model_summary, {"loader": desc, "in_model": in_model})
    if args.fold_bn:
        from src.bn_fold import fold_for_evaluation

        # after the weights' hash (of the checkpoint's weights); a folded run's state is not mixed with an unfolded one
        fold_for_evaluation(net, data_config["input_size"])
        fingerprint["fold_bn"] = True
    return EvaluationSetup(model=model, examples=examples, preprocessing=preprocessing, fingerprint=fingerprint,
                           model_summary=model_summary, notes=notes)


class _TransformNotSet:
    """The ImageNet examples' transform until the model's data config is known (never called)."""

    def __call__(self, img):
        raise RuntimeError("the examples' transform was not set")


def _read_protocol_examples(args: argparse.Namespace) -> ExampleSet:
    """The protocol's examples (ids, labels, file checks), read before the model is built; ImageNet's
    resize + crop comes from the model and is set by ``_set_protocol_transform``."""
    if protocol_dataset(args.dataset) != "imagenet":
        return load_examples(args.dataset, args.data_dir, args.n_examples, None)
    return load_examples(args.dataset, args.data_dir, args.n_examples, _TransformNotSet(), split=args.split)


def _set_protocol_transform(examples: ExampleSet, args: argparse.Namespace, data_config: Dict[str, Any],
                            defaults: Any, in_model: List[str]) -> Tuple[str, List[str]]:
    """The loader's preprocessing (ImageNet: resize + crop [+ Normalize]) set on ``examples``; its description
    and the honesty notes it gives (logged here, and kept for the report's warnings)."""
    if protocol_dataset(args.dataset) != "imagenet":
        return "ToTensor", []
    transform, desc = imagenet_transform(data_config, defaults if args.normalize else None)
    notes: List[str] = []
    if args.normalize:
        notes.append(f"--normalize: the loader normalizes with mean {list(defaults[0])} / std {list(defaults[1])}, "
                     f"so AutoAttack perturbs normalized values (eps and the [0, 1] box no longer mean pixels); the "
                     f"numbers are not comparable with RobustBench's")
        if in_model and "ImageNormalizer" in in_model[-1]:
            notes.append("the inputs are normalized twice (--normalize and a normalization layer): the network sees "
                         "inputs it was not trained on")
    for note in notes:
        _logger.warning(note)
    examples.transform = transform
    return desc, notes


def _fingerprint(args: argparse.Namespace, examples: ExampleSet, model_summary: Dict[str, Any],
                 preprocessing: Dict[str, Any]) -> Dict[str, Any]:
    """Everything the per-example results depend on: resumed or sharded state must match it."""
    return {
        "task": "robustbench",
        "dataset": args.dataset,
        "n_examples": examples.n_examples,
        "examples_sha256": examples.examples_sha256,
        "data_file_md5": getattr(examples, "file_md5", None),
        "model": model_summary["model"],
        "num_classes": model_summary["num_classes"],
        "patch_size": model_summary["patch_size"],
        "weights_sha256": model_summary["weights_sha256"],
        "preprocessing": preprocessing,
        "threat_model": args.threat_model,
        "eps_255": float(args.eps),
        "autoattack": AUTOATTACK_VERSION,
        "seed": int(args.seed),
        "chunk_size": int(args.chunk_size),
        "attack_batch_size": int(min(args.batch_size, args.chunk_size or examples.n_examples)),
    }


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text)


def default_output(args: argparse.Namespace, model: Optional[str] = None) -> str:
    """``output/robustbench/<model>-<dataset>-<threat>-eps<eps>.json`` (the evaluated model's name)."""
    model = model or args.model
    return os.path.join("output", "robustbench",
                        _safe_name(f"{model}-{args.dataset}-{args.threat_model}-eps{args.eps:g}") + ".json")


def default_state_dir(output: str) -> str:
    stem = output[:-len(".json")] if output.endswith(".json") else output
    return stem + ".state"


def _shard_identity(args: argparse.Namespace, dev_env) -> Tuple[int, int]:
    if dev_env.distributed:
        if args.num_shards != 1:
            raise UsageError("use either torchrun (one shard per process) or --num-shards/--shard-id, not both")
        return dev_env.global_rank, dev_env.world_size
    return args.shard_id, args.num_shards


def _file_infos(state) -> Dict[str, Dict[str, Any]]:
    out: Dict[str, Dict[str, Any]] = {}
    for path in state.state_files():
        doc = json.loads(storage.read_text(path))
        chunks = doc.get("chunks") or {}
        out[storage.basename(path)] = {
            "chunks": len(chunks),
            "examples": sum(int(c["end"]) - int(s) for s, c in chunks.items()),
            "compute_seconds": round(sum(float((c.get("info") or {}).get("seconds", 0.0)) for c in chunks.values()), 3),
            "runs": doc.get("runs") or [],
        }
    return out


def _write_report(args, state, setup: EvaluationSetup, merged, t0: float) -> Dict[str, Any]:
    report = build_report(merged=merged, examples=setup.examples, fingerprint=setup.fingerprint,
                          args_summary=setup.model_summary, preprocessing=setup.preprocessing,
                          threat_model=args.threat_model, eps_255=float(args.eps), seed=int(args.seed),
                          chunk_size=int(args.chunk_size), batch_size=int(args.batch_size),
                          wall_seconds=time.time() - t0, state_dir=state.state_dir, file_infos=_file_infos(state),
                          notes=setup.notes)
    parent = storage.dirname(args.output)
    if parent:
        storage.makedirs(parent)
    storage.atomic_write_text(args.output, json.dumps(report, indent=2) + "\n")
    _logger.info("clean accuracy %s%%, AutoAttack (%s, eps %s) accuracy %s%% on %d %s examples; report: %s",
                 report["clean_acc"], args.threat_model, report["eps"], report["autoattack_acc"],
                 report["n_examples"], args.dataset, args.output)
    return report


def _evaluate_pending(args: argparse.Namespace, setup: EvaluationSetup, state: Any, done: Any, model: nn.Module,
                      dev_env: Any, tag: str) -> None:
    """Evaluate this shard's chunks that have no result yet, recording each as soon as it is done."""
    pending = state.pending(done)
    mine = len(state.pending({}))
    _logger.info("%s%d examples in %d chunks of %d; this shard: %d chunks, %d already done, %d to do; state in %s",
                 tag, setup.examples.n_examples, len(state.chunks), args.chunk_size or setup.examples.n_examples,
                 mine, mine - len(pending), len(pending), state.state_dir)
    state.begin_run({"device": str(dev_env.device)})
    eps = float(args.eps) / 255.0
    seen_flags: set = set()
    from src.progress import track_ranges  # chunks done, images/s and ETA (rank 0 only)

    for k, (start, end) in enumerate(track_ranges(pending, f"{tag}RobustBench AutoAttack", dev_env.primary)):
        t_chunk = time.time()
        x, y = load_chunk(setup.examples, start, end, args.workers)
        clean, robust, flags, outside = evaluate_chunk(model, x, y, threat_model=args.threat_model, eps=eps,
                                                       seed=chunk_seed(args.seed, start), batch_size=args.batch_size,
                                                       device=dev_env.device)
        seconds = time.time() - t_chunk
        for msg in flags:
            if msg not in seen_flags:  # each distinct check once; the report counts the chunks
                seen_flags.add(msg)
                _logger.warning("%sAutoAttack check: %s", tag, msg)
        state.record(start, end, {"clean": clean, "robust": robust},
                     {"seconds": round(seconds, 3), "flags": flags, "seed": chunk_seed(args.seed, start),
                      "device": str(dev_env.device), "outside_threat_model": outside})
        _logger.info("%sevaluated examples [%d, %d) (%d/%d): clean %d/%d, robust %d/%d, %.1f s, %.1f img/s", tag,
                     start, end, k + 1, len(pending), sum(clean), end - start, sum(robust), end - start, seconds,
                     (end - start) / max(seconds, 1e-9))


def _merged_results(args: argparse.Namespace, state: Any, dev_env: Any, n: int, tag: str) -> Any:
    """The merged per-example results when every chunk is done (rank 0 of torchrun waits for the
    others), else None: a shard that is not the last leaves the report to the last one."""
    from src.eval_state import EvalStateError

    merged = state.merge()
    if dev_env.distributed and not args.merge_only:
        if not dev_env.primary:
            _logger.info("%sdone; rank 0 writes the report", tag)
            return None
        last = -1
        while not merged.complete:  # the other ranks' chunks: wait for their state files
            if merged.n_done != last:
                _logger.info("waiting for the other ranks: %d of %d examples done", merged.n_done, n)
                last = merged.n_done
            time.sleep(args.poll_seconds)
            merged = state.merge()
    if merged.complete:
        return merged
    missing = sum(e - s for s, e in merged.missing)
    if args.merge_only:
        raise EvalStateError(f"cannot merge: {missing} of {n} examples ({len(merged.missing)} chunks, first "
                             f"[{merged.missing[0][0]}, {merged.missing[0][1]})) have no results in "
                             f"{state.state_dir}; run the missing shards first")
    _logger.info("%sfinished; %d of %d examples still to be done by other shards; the last shard to finish "
                 "(or --merge-only) writes the report", tag, missing, n)
    return None


def _is_report(text: str) -> bool:
    """True for a report this tool wrote (what ``--output`` may replace)."""
    try:
        doc = json.loads(text)
    except ValueError:
        return False
    return isinstance(doc, dict) and {"clean_acc", "autoattack_acc", "threat_model"} <= set(doc)


def _open_state(args: argparse.Namespace, setup: EvaluationSetup, dev_env: Any, shard: Tuple[int, int]) -> Any:
    """This shard's resumable state (checked against the other torchrun ranks) and the chunks done so far;
    the report's folder must be writable."""
    from src.eval_state import EvalState
    from src.results import check_results_target

    state_dir = args.state_dir or default_state_dir(args.output)
    if dev_env.primary:  # fail now, not after hours of attacks, when the report cannot be written
        # an earlier report is replaced (a resumed run writes it again), never a checkpoint or another file
        check_results_target(args.output, tool="validate_robustbench.py", flag="--output", kind="report",
                             is_ours=lambda text, _json: _is_report(text), inputs=(args.checkpoint,))
        if args.state_dir:
            storage.check_output_location(args.state_dir, "--state-dir")
        # a file where the state folder goes (the default is <output>.state) is one error line, not a traceback
        storage.check_output_folder(state_dir, "--state-dir" if args.state_dir else "--output (its .state folder)")
        storage.remove_stale_temp_of(args.output)  # what a killed earlier write of the report left behind
    state = EvalState(state_dir, setup.fingerprint, setup.examples.n_examples, args.chunk_size, FIELDS, shard[0],
                      shard[1])
    if dev_env.distributed and len(set(dev_env.all_gather_object(state.digest))) != 1:
        raise UsageError("the torchrun processes disagree on the configuration (model weights, data or flags "
                         "differ between ranks)")
    done = state.load()
    return state, done


def run(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    """Evaluate this process's share of the examples and write the report when all are done.

    Returns the report (when this process wrote it), else None.
    """
    from src.bits.device import initialize_device, shutdown

    t0 = time.time()
    check_args(args)
    dev_env = initialize_device(force_cpu=args.force_cpu)
    try:
        shard = _shard_identity(args, dev_env)
        tag = f"[shard {shard[0]}/{shard[1]}] " if shard[1] > 1 else ""
        if dev_env.primary:
            for warning in attack_setting_warnings("autoattack", args.threat_model, args.eps):
                _logger.warning(warning)  # and in the report's "warnings"
        torch.manual_seed(args.seed)
        setup = setup_evaluation(args)
        args.output = args.output or default_output(args, setup.model_summary["model"])
        state, done = _open_state(args, setup, dev_env, shard)
        model = setup.model.to(dev_env.device)
        if not args.merge_only:
            _evaluate_pending(args, setup, state, done, model, dev_env, tag)
        if args.merge_only and not dev_env.primary:
            return None  # torchrun --merge-only: rank 0 alone merges
        merged = _merged_results(args, state, dev_env, setup.examples.n_examples, tag)
        if merged is None:
            return None
        report = _write_report(args, state, setup, merged, t0)
        if args.log_wandb:
            from src.wandb_link import log_robustbench

            log_robustbench(args, report)
        return report
    finally:
        shutdown(dev_env)
