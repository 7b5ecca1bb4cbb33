"""W&B: log evaluation numbers into the training run that wrote the checkpoint.

The run is found through ``wandb_run`` in the ``args.yaml`` next to the checkpoint (train.py
writes it): a run URL, or ``offline:<id>`` for offline runs. validate.py and
validate_robustbench.py log through :func:`log_into_training_run`, so they find, resume and
write to the run the same way.
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from src import storage
from src.errors import UsageError

_logger = logging.getLogger("robust_vits")

__all__ = ["attack_label", "wandb_target", "log_into_training_run", "log_to_wandb", "log_robustbench"]


def attack_label(attack: str, steps: int, eps: float, norm: str) -> str:
    """``<attack>-<steps>-<eps>[-<norm>]``: the original's W&B key prefix (norm only when not linf)."""
    label = f"{attack}-{steps}-{eps:g}"
    return label if norm == "linf" else f"{label}-{norm}"


def wandb_target(checkpoint: str) -> Tuple[Optional[str], str, str, str]:
    """``(entity, project, run_id, folder)`` of the training run that wrote ``checkpoint``.

    Read from ``wandb_run`` in the ``args.yaml`` next to the checkpoint: a run URL
    ``https://wandb.ai/<entity>/<project>/runs/<id>`` (split on '/': parts 3, 4 and 6, as the
    original), or ``offline:<id>`` for offline runs (project = the run's ``experiment`` or the
    folder name, as train.py chose it).
    """
    import yaml

    folder = storage.dirname(checkpoint)
    path = storage.join(folder, "args.yaml")
    if not storage.exists(path):
        raise UsageError(f"--log-wandb: no args.yaml next to the checkpoint ({path}); it logs into the training "
                         "run that wrote the checkpoint")
    try:
        cfg = yaml.safe_load(storage.read_text(path)) or {}
    except yaml.YAMLError:
        raise UsageError(f"--log-wandb: {path} is not valid YAML") from None
    url = cfg.get("wandb_run") if isinstance(cfg, Mapping) else None
    if not url:
        raise UsageError(f"--log-wandb: {path} has no wandb_run (the training run did not use --log-wandb)")
    url = str(url)
    if url.startswith("offline:"):
        project = cfg.get("experiment") or storage.basename(folder)
        return None, str(project), url[len("offline:"):], folder
    parts = url.rstrip("/").split("/")
    if len(parts) < 7:
        raise UsageError(f"--log-wandb: cannot parse the wandb_run URL '{url}' in {path}")
    return parts[3], parts[4], parts[6], folder


def log_into_training_run(checkpoint: str, metrics: Mapping[str, float], wandb_dir: Optional[str] = None
                          ) -> Dict[str, float]:
    """Resume the training run of ``checkpoint`` and log ``metrics`` (also as its summary values).

    W&B's files go to ``wandb_dir``, else next to the checkpoint when it is local.
    """
    try:
        import wandb
    except ImportError:
        raise UsageError("--log-wandb needs the wandb package (pip install wandb)") from None
    entity, project, run_id, folder = wandb_target(checkpoint)
    kwargs: Dict[str, Any] = dict(id=run_id, project=project, resume="allow")
    if entity:
        kwargs["entity"] = entity
    if wandb_dir or storage.is_local(folder):
        kwargs["dir"] = wandb_dir or folder
    run_ = wandb.init(**kwargs)
    try:
        run_.log(dict(metrics))
        for k, v in metrics.items():
            run_.summary[k] = v
    finally:
        run_.finish()
        # finish() only tells W&B's service process that the run is done: the service closes (and, offline,
        # flushes) the run's file later, at the latest when the process exits. Shut the service down now, so the
        # numbers are on disk when this returns (a caller in the same process reads or syncs them), unless the
        # caller has a W&B run of its own still open.
        if getattr(wandb, "run", None) is None:
            wandb.teardown()
    _logger.info("logged %s into W&B run %s (project %s)", ", ".join(metrics), run_id, project)
    return dict(metrics)


def log_to_wandb(args: argparse.Namespace, rows: Sequence[Mapping[str, Any]]) -> Dict[str, float]:
    """validate.py: ``eval_top1-final`` and ``<attack>-<steps>-<eps>[-<norm>]-eval_robust_top1_final``."""
    metrics: Dict[str, float] = {"eval_top1-final": rows[0]["top1"]}
    if args.attack:
        for row in rows:
            steps = row.get("attack_steps", args.attack_steps[0])
            metrics[f"{attack_label(args.attack, steps, args.attack_eps, args.attack_norm)}-eval_robust_top1_final"] = \
                row["robust_top1"]
    return log_into_training_run(args.checkpoint, metrics)


def log_robustbench(args: argparse.Namespace, report: Mapping[str, Any]) -> Dict[str, float]:
    """validate_robustbench.py: clean and AutoAttack accuracy in %, keyed as the original
    (``autoattack-None-<eps in [0, 1]>[-l2]-eval_robust_top1_final``); W&B's files next to the report."""
    suffix = "" if args.threat_model == "Linf" else f"-{args.threat_model.lower()}"
    metrics = {"eval_top1-final": 100 * report["clean_accuracy"],
               f"autoattack-None-{args.eps / 255}{suffix}-eval_robust_top1_final": 100 * report["robust_accuracy"]}
    wandb_dir = os.path.dirname(os.path.abspath(args.output)) if storage.is_local(args.output) else None
    return log_into_training_run(args.checkpoint, metrics, wandb_dir)


def init_training_run(args: argparse.Namespace, output_dir: str):
    """The W&B run of a training run (``--log-wandb``): project = ``--experiment``, config = the
    arguments, notes = ``--run-notes`` (+ the bucket), recorded as ``wandb_run`` in args.yaml."""
    try:
        import wandb
    except ImportError:
        raise UsageError("--log-wandb needs the wandb package (pip install wandb)") from None
    config = dict(vars(args))
    config["output"] = output_dir if storage.is_local(output_dir) else \
        "https://console.cloud.google.com/storage/" + output_dir.split("://", 1)[1]
    notes = args.run_notes + (f" Bucket: {output_dir}" if output_dir.startswith("gs://") else "")
    dir_ = output_dir if storage.is_local(output_dir) else None
    run = wandb.init(project=args.experiment or os.path.basename(output_dir), config=config, notes=notes,
                     dir=dir_, name=os.path.basename(output_dir))
    url = getattr(run, "url", None)
    from src.resume_record import set_record

    set_record(storage.join(output_dir, "args.yaml"), "wandb_run", url or "offline:" + run.id)
    return run
