"""Resume tells the truth: what changed against the checkpoint's arguments, said once and recorded.

A resumed run compares the checkpoint's ``hparams`` (the arguments it was trained with) with its
own. Every difference in a setting that shapes training or its evaluation is listed in ONE warning
line, and ``args.yaml`` is rewritten (atomically, valid YAML) with the arguments now in use plus a
``resume_history`` list: one entry per resume with its time, checkpoint, epoch and the changed
keys as ``{old, new}``. Settings that naturally differ between two invocations of the same run
(paths, workers, logging, resume flags) are ignored.
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any, Dict, List, Optional, Tuple

import yaml

from src.arg_parser.common import ARGS_YAML_HEADER, RECORD_KEYS  # record-only keys of args.yaml (not flags)

from src import storage

_logger = logging.getLogger("robust_vits")

# Keys that say where and how a run is carried out, not what it trains.
IGNORED_KEYS = frozenset({
    "resume", "no_resume_opt", "start_epoch", "output", "experiment", "config", "data_dir", "combine_data_dir",
    "workers", "pin_mem", "use_multi_epochs_loader", "use_mp_loader", "local_rank", "log_interval",
    "log_wandb", "run_notes", "save_images", "recovery_interval", "checkpoint_hist", "trust_checkpoint",
    "checkpoint_full_state", "checkpoint_weights_only", "force_cpu", "monitor_attack_steps", "monitor_every",
    "monitor_examples", "monitor_warn_gap",
})

__all__ = ["IGNORED_KEYS", "RECORD_KEYS", "changed_hparams", "describe_changes", "history_entry",
           "write_args_yaml", "set_record"]


def _plain(v: Any) -> Any:
    """YAML-safe and comparable: tuples become lists (checkpoints and YAML disagree on them)."""
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def changed_hparams(old: Optional[Dict[str, Any]], new: Dict[str, Any]) -> Dict[str, Tuple[Any, Any]]:
    """``{key: (old, new)}`` for every key both know whose value differs (ignored keys aside).

    A key the checkpoint does not know (a flag newer than the checkpoint) is not a change: its old
    value is unknown.
    """
    out: Dict[str, Tuple[Any, Any]] = {}
    for key in sorted(set(old or {}) & set(new)):
        if key in IGNORED_KEYS:
            continue
        a, b = _plain(old[key]), _plain(new[key])
        if a != b:
            out[key] = (a, b)
    return out


def describe_changes(changes: Dict[str, Tuple[Any, Any]]) -> str:
    """``lr 0.1 -> 0.01, epochs 3 -> 5``."""
    return ", ".join(f"{k} {a!r} -> {b!r}" if isinstance(a, str) or isinstance(b, str) else f"{k} {a} -> {b}"
                     for k, (a, b) in changes.items())


def history_entry(checkpoint: str, epoch: int, changes: Dict[str, Tuple[Any, Any]]) -> Dict[str, Any]:
    return {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "checkpoint": str(checkpoint),
            "epoch": int(epoch), "changed": {k: {"old": a, "new": b} for k, (a, b) in changes.items()}}


def _read_yaml(path: str) -> Dict[str, Any]:
    if not storage.exists(path):
        return {}
    try:
        doc = yaml.safe_load(storage.read_text(path))
    except yaml.YAMLError:
        _logger.warning("%s is not valid YAML: its resume history is lost and it is rewritten", path)
        return {}
    return doc if isinstance(doc, dict) else {}


def _write(path: str, doc: Dict[str, Any]) -> None:
    # the header marks the file as train.py's own record, so `train.py -c args.yaml` accepts its keys
    storage.atomic_write_text(path, ARGS_YAML_HEADER + yaml.safe_dump(_plain(doc), default_flow_style=False,
                                                                      sort_keys=True))


def write_args_yaml(path: str, args_text: str, entry: Optional[Dict[str, Any]] = None,
                    keep_record: bool = True) -> None:
    """Write ``args.yaml``: the arguments of ``args_text``, the record keys the file already has
    (when ``keep_record``) and ``entry`` appended to its ``resume_history``. Atomic: a kill leaves
    the old or the new complete file."""
    doc = yaml.safe_load(args_text) or {}
    old = _read_yaml(path) if keep_record else {}
    history: List[Dict[str, Any]] = list(old.get("resume_history") or [])
    if entry is not None:
        history.append(entry)
    if history:
        doc["resume_history"] = history
    if old.get("wandb_run") is not None:
        doc["wandb_run"] = old["wandb_run"]
    _write(path, doc)


def set_record(path: str, key: str, value: Any) -> None:
    """Set one record-only key (``wandb_run``) of an existing ``args.yaml``, keeping it valid YAML
    (appending a line would duplicate the key on every resume)."""
    if key not in RECORD_KEYS:
        raise ValueError(f"{key} is not a record key of args.yaml ({RECORD_KEYS})")
    doc = _read_yaml(path)
    doc[key] = value
    _write(path, doc)
