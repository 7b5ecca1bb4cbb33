"""The training run as a few named steps: build the task, restore, prepare the output folder, run.

``train.py`` only parses the command line and calls ``run_training``; tests call it in-process.
Everything that can fail on bad input (flags, data, model, resume checkpoint) runs before the
first write to the output folder, so a refused run never damages an earlier one.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn

from src import storage
from src.bits.checkpoint_manager import CheckpointManager, find_resume_checkpoint
from src.bits.device import DeviceEnv
from src.bits.summary import SummaryCsv, summary_row
from src.cli import device_session, seed_everything, set_deterministic
from src.eval_config import EVAL_SEED
from src.engine import EpochHooks, EpochState, StepOptions, TrainParts, evaluate, train_one_epoch
from src.bits.run_lock import RunLock
from src.errors import CheckpointError, Interrupted, NonFiniteLossError, UsageError
from src.utils import unwrap_model

_logger = logging.getLogger("robust_vits")


# ----------------------------------------------------------------------------------------------
# The objects of a run
# ----------------------------------------------------------------------------------------------

@dataclass
class TrainTask:
    """Everything built from the arguments before anything is written."""
    args: argparse.Namespace
    dev_env: DeviceEnv
    parts: TrainParts
    data_config: Dict[str, Any]
    num_classes: Optional[int]
    lr: float
    train_loader: Any
    eval_loader: Any
    num_epochs: int
    eval_attack: Optional[Callable] = None
    eps_schedule: Optional[Callable[[int], float]] = None
    mixup_fn: Optional[Callable] = None
    random_erasing: Optional[Callable] = None
    monitor: Any = None  # src.attack_monitor.AttackMonitor with --monitor-attack-steps

    @property
    def hparams(self) -> Dict[str, Any]:
        """The arguments as recorded in checkpoints: with the learning rate and class count actually used."""
        return {**vars(self.args), "lr": self.lr, "num_classes": self.num_classes}


@dataclass
class OutputPlan:
    """Where the run writes and what it resumes from."""
    output_dir: str
    continuing: bool
    resume_path: Optional[str] = None
    resume_ckpt: Optional[Dict[str, Any]] = None


@dataclass
class Progress:
    """Where training (re)starts."""
    start_epoch: int = 0
    num_updates: int = 0
    epoch_state: Optional[EpochState] = None
    rng_state: Optional[list] = None  # a mid-epoch recovery point's random generator states, by rank


@dataclass
class RunOutputs:
    """The writers of one run (primary process only; ``None`` elsewhere)."""
    manager: CheckpointManager
    summary: SummaryCsv
    wandb_run: Any = None
    results: Dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------

def run_training(args: argparse.Namespace, args_text: str) -> Dict[str, Any]:
    """Train according to ``args``; returns the final metrics and where the outputs are.

    Raises ``Interrupted`` (exit 130 / 143 through ``run_cli``) when Ctrl-C or SIGTERM stopped the
    run, after saving a checkpoint to resume from.
    """
    with device_session(force_cpu=args.force_cpu, amp=args.amp, amp_dtype=args.amp_dtype,
                        channels_last=args.channels_last, local_rank=args.local_rank) as dev_env:
        restore_determinism = set_deterministic(args.deterministic)
        try:
            check_inputs(args, primary=dev_env.primary)
            seed_everything(args.seed)  # identical initial weights on every process
            task = build_task(args, dev_env)
            plan = plan_output(task)
            lock = RunLock(plan.output_dir) if dev_env.primary else None
            if lock is not None:
                lock.acquire()  # before the first write: one run per experiment folder
            try:
                progress = restore(task, plan)
                if progress.start_epoch >= task.num_epochs:
                    return _nothing_to_train(task, plan, progress)
                outputs = prepare_output(task, plan, progress, args_text)
                with StopSignals() as stop:
                    return run_epochs(task, plan, progress, outputs, stop)
            finally:
                if lock is not None:
                    lock.release()
        finally:
            restore_determinism()


def _nothing_to_train(task: TrainTask, plan: OutputPlan, progress: Progress) -> Dict[str, Any]:
    """``--resume auto`` of a finished run (a job script run again): a no-op that writes nothing. Preparing the
    folder would rewrite its args.yaml with this command's arguments (another --epochs, --model-ema, ...) and add a
    resume_history entry for a resume that trained nothing, so the record would no longer describe the run."""
    if task.dev_env.primary:
        _logger.info("--resume auto: %s already trained %d epochs and this schedule has %d: nothing to train; its "
                     "files are left as they are", plan.output_dir, progress.start_epoch, task.num_epochs)
    return {"output_dir": plan.output_dir, "eval": {}, "train": {}, "best": None, "num_epochs": task.num_epochs,
            "seconds": 0.0, "primary": task.dev_env.primary}


class StopSignals:
    """Ctrl-C / SIGTERM during the epochs ask the loop to stop at the next step boundary (where a
    recovery checkpoint is consistent); a second signal stops at once without saving."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def _handle(self, signum, _frame) -> None:
        if self.signum is not None:
            raise Interrupted(f"{signal.Signals(signum).name} received twice: stopped at once, without a "
                              "recovery checkpoint", signum)
        self.signum = signum
        _logger.warning("%s received: stopping after this step and saving a recovery checkpoint (send it again "
                        "to stop at once)", signal.Signals(signum).name)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def requested(self) -> bool:
        return self.signum is not None


# ----------------------------------------------------------------------------------------------
# Step 1: build the task
# ----------------------------------------------------------------------------------------------

def check_inputs(args: argparse.Namespace, primary: bool = True) -> None:
    """Training-specific checks of the arguments that need no model or data (warnings from the primary process)."""
    from src.data import check_dataset_name, needs_data_dir

    retain_mode(args)
    check_dataset_name(args.dataset)
    if args.combine_dataset:
        check_dataset_name(args.combine_dataset)
    if args.data_dir is None and needs_data_dir(args.dataset):
        raise UsageError("no data dir given: pass DIR (or data_dir in the config), or use --dataset digits")
    from src import setup_task

    if args.adv_training and args.adv_training not in ("pgd", "trades"):
        setup_task.load_loss_class(args.adv_training)  # a missing module or class: one line before data and model
    for warning in setup_task.schedule_warnings(args) + setup_task.unused_setting_warnings(args) if primary else ():
        _logger.warning(warning)


def build_task(args: argparse.Namespace, dev_env: DeviceEnv) -> TrainTask:
    """Model (normalized, on the device), optimizer, EMA, loaders, schedule, losses, attacks."""
    from src import setup_task
    from src.data import create_train_datasets

    # the data first: a wrong data dir, split or class map is one error line before any model is built (a
    # pretrained model's weights would otherwise be downloaded, or retried for a minute offline, first)
    datasets = create_train_datasets(args)
    model = setup_task.create_model(args)
    num_classes = args.num_classes if args.num_classes is not None else getattr(model, "num_classes", None)
    data_config = setup_task.resolve_data_config(args, model, verbose=False)
    if args.normalize_model:
        from src.utils import normalize_model

        mean, std = setup_task.model_mean_std(args, data_config)
        model = normalize_model(model, mean, std)
        _logger.info("normalizing inside the model with mean %s std %s", mean, std)
    if args.split_bn:
        model = _split_batchnorm(model, args)
    model = dev_env.to_model_device(model)
    if args.sync_bn and dev_env.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)

    lr = setup_task.scale_lr(args, dev_env.world_size)
    # The optimizer sees the network itself: the normalization wrapper has no parameters, and the
    # network's no_weight_decay() names (cls_token, pos_embed, ...) keep their meaning.
    optimizer = setup_task.create_optimizer(args, unwrap_model(model), lr=lr)
    model_ema = None
    if args.model_ema:
        from timm.utils import ModelEmaV3

        model_ema = ModelEmaV3(model, decay=args.model_ema_decay)
    train_loader, eval_loader = build_loaders(args, data_config, dev_env, num_classes, datasets)
    lr_scheduler, num_epochs = setup_task.create_scheduler(args, optimizer, updates_per_epoch=len(train_loader))
    parts = TrainParts(model=model, optimizer=optimizer, loss_fn=None, lr_scheduler=lr_scheduler,
                       model_ema=model_ema, grad_scaler=dev_env.create_grad_scaler())
    task = TrainTask(args=args, dev_env=dev_env, parts=parts, data_config=data_config, num_classes=num_classes,
                     lr=lr, train_loader=train_loader, eval_loader=eval_loader, num_epochs=num_epochs)
    _build_objectives(task)
    return task


def _split_batchnorm(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    """``--split-bn``: one BatchNorm per augmentation split (timm's ``convert_splitbn_model``, which lives in
    ``timm.layers``); a model without BatchNorm2d layers would train exactly as without the flag."""
    from timm.layers import SplitBatchNorm2d, convert_splitbn_model

    model = convert_splitbn_model(model, args.aug_splits)
    if not any(isinstance(m, SplitBatchNorm2d) for m in model.modules()):
        raise UsageError(f"--split-bn: model '{args.model}' has no BatchNorm2d layers to split, so the flag would "
                         "change nothing; drop --split-bn or pick a model with BatchNorm")
    return model


def _build_objectives(task: TrainTask) -> None:
    """The training loss, the per-epoch evaluation attack, the eps schedule and batch mixing."""
    from src import setup_task

    args, dev_env = task.args, task.dev_env
    task.parts.loss_fn = setup_task.create_train_loss(args, dev_env, task.num_classes).to(dev_env.device)
    task.eval_attack = setup_task.create_eval_attack(args, dev_env, task.num_classes)
    if args.adv_training:
        from src.attacks import eps_schedule

        # logged in /255 units, as the original's summary (train_eps 4.0 for eps 4/255)
        task.eps_schedule = eps_schedule(args.eps_schedule, args.attack_eps, args.eps_schedule_period,
                                         args.zero_eps_epochs)
    from src.attack_monitor import build_monitor

    task.monitor = build_monitor(args, task.eval_loader, task.num_classes, task.num_epochs, dev_env)
    task.mixup_fn = setup_task.create_mixup(args, task.num_classes)
    if args.reprob > 0:
        from src.data import NotNormalizedRandomErasing

        task.random_erasing = NotNormalizedRandomErasing(args.reprob, mode=args.remode, max_count=args.recount,
                                                         num_splits=args.aug_splits if args.resplit else 0)


def build_loaders(args, data_config, dev_env: DeviceEnv, num_classes: Optional[int], datasets=None):
    """The training loader (optionally combined with a second dataset) and the evaluation loader."""
    from src.data import create_train_loaders
    from src.smoke import apply_sample_caps

    loaders = create_train_loaders(args, data_config, dev_env.world_size, dev_env.global_rank, num_classes,
                                   datasets)
    return apply_sample_caps(args, *loaders)  # the smoke-test caps, when given


# ----------------------------------------------------------------------------------------------
# Step 2: the output folder and the checkpoint to resume
# ----------------------------------------------------------------------------------------------

def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Every epoch starts from its own seed, so a resumed run replays the same randomness."""
    return seed + rank + 10007 * (epoch + 1)


def default_experiment_name(args: argparse.Namespace, data_config: Dict[str, Any]) -> str:
    safe_model = args.model.replace("/", "-")
    return "-".join([datetime.now().strftime("%Y%m%d-%H%M%S"), safe_model, str(data_config["input_size"][-1])])


def resolve_output_dir(args: argparse.Namespace, data_config: Dict[str, Any]) -> Tuple[str, bool]:
    """The experiment folder (§0.5) and whether the run continues in an existing one (resume)."""
    root = args.output or os.path.join(".", "output", "train")
    if args.resume and args.resume != "auto" and not args.experiment:
        folder = storage.dirname(args.resume)
        if storage.exists(storage.join(folder, "args.yaml")):
            return folder, True
    name = args.experiment or default_experiment_name(args, data_config)
    path = storage.join(root, name)
    if args.resume and storage.exists(path):
        if args.resume == "auto" or _same_folder(storage.dirname(args.resume), path):
            return path, True
        # Another run's checkpoint: its resume must not rewind or prune this folder's files.
        _logger.info("--resume %s is not in %s: continuing it as a new run in a new folder", args.resume, path)
    if storage.exists(path):
        for i in range(1, 100):
            cand = f"{path}-{i}"
            if not storage.exists(cand):
                return cand, False
        raise UsageError(f"experiment folders {path}-1 .. -99 all exist; choose another --experiment")
    return path, False


def _same_folder(a: str, b: str) -> bool:
    if storage.is_local(a) and storage.is_local(b):
        return os.path.realpath(a) == os.path.realpath(b)
    return a.rstrip("/") == b.rstrip("/")


def plan_output(task: TrainTask) -> OutputPlan:
    """Decide the folder (on the primary process, shared with the others) and read the resume file."""
    args, dev_env = task.args, task.dev_env
    if dev_env.primary and args.output:
        storage.check_output_location(args.output, "--output")
    output_dir, continuing = resolve_output_dir(args, task.data_config) if dev_env.primary else (None, False)
    output_dir, continuing = dev_env.broadcast_object((output_dir, continuing))
    plan = OutputPlan(output_dir=output_dir, continuing=continuing, resume_path=args.resume)
    if args.resume == "auto":
        plan.resume_path = find_resume_checkpoint(output_dir) if continuing else None
        if plan.resume_path is None and continuing and any(
                n == "last.pth.tar" or n.startswith("recovery-") for n in storage.listdir(output_dir)):
            # starting over would drop the summary rows and the checkpoints of the earlier run
            raise UsageError(f"--resume auto: no readable last/recovery checkpoint in {output_dir}; resume one "
                             "explicitly with --resume PATH (e.g. a checkpoint-<epoch>.pth.tar there, with "
                             "--no-resume-opt unless the run kept --checkpoint-full-state) or use another "
                             "--experiment")
        if plan.resume_path is None and not args.experiment:
            _logger.warning("--resume auto without --experiment starts a new run in %s: the default experiment "
                            "name is new for every run (date and time), so there is nothing to resume. Pass the "
                            "--experiment NAME (and --output) of the run to resume it", output_dir)
        elif plan.resume_path is None:
            _logger.info("--resume auto: nothing to resume in %s, starting from scratch", output_dir)
    if plan.resume_path:
        plan.resume_ckpt = _load_resume(plan.resume_path, args)
        _check_epoch_layout(plan.resume_path, plan.resume_ckpt, args, dev_env.world_size)
        ckpt = plan.resume_ckpt
        start = int(ckpt["epoch"]) + (1 if ckpt.get("epoch_done", True) else 0)
        start = start if args.start_epoch is None else args.start_epoch
        if args.resume != "auto" and start >= task.num_epochs:
            # it would write args.yaml (a new folder with --experiment), train nothing and exit 0; --resume auto of
            # a finished run stays a no-op, so re-running a job script after the run completed is harmless
            raise UsageError(f"--resume {plan.resume_path}: that run already trained {start} epochs and this "
                             f"schedule has {task.num_epochs}: nothing to train; raise --epochs to train longer")
    return plan


# The settings that decide which images the first N batches of an epoch are: a mid-epoch resume skips N batches.
EPOCH_LAYOUT_KEYS = ("dataset", "train_split", "batch_size", "combine_dataset", "combined_dataset_ratio",
                     "epoch_repeats", "train_num_samples", "seed")


def _check_epoch_layout(path: str, ckpt: Dict[str, Any], args: argparse.Namespace, world_size: int) -> None:
    """A mid-epoch recovery point skips the batches its epoch already did. With another batch size, process
    count or training data those batches are other images: the rest of the epoch would see some images twice
    and others never. Refused before anything is written; the epoch boundary (last.pth.tar) has no such limit."""
    state = ckpt.get("epoch_state") or {}
    if ckpt.get("epoch_done", True) or not state.get("batches_done") or args.start_epoch is not None:
        return
    old = dict(ckpt.get("hparams") or {})
    if state.get("world_size") is not None:
        old["processes"] = state["world_size"]
    new = {**vars(args), "processes": world_size}
    changed = [f"{k} {old[k]!r} -> {new[k]!r}" for k in EPOCH_LAYOUT_KEYS + ("processes",)
               if k in old and k in new and old[k] != new[k]]
    if changed:
        raise UsageError(f"--resume {path} is a recovery point {state['batches_done']} batches into epoch "
                         f"{ckpt['epoch']}; this run changes what those batches are ({', '.join(changed)}): resume "
                         "it with the settings it was trained with, or resume an epoch boundary (the run's "
                         "last.pth.tar) with the new ones")


def _load_resume(path: str, args: argparse.Namespace) -> Dict[str, Any]:
    from src.checkpoint import load_checkpoint_file

    if not storage.exists(path):
        raise UsageError(f"--resume {path}: no such checkpoint")
    ckpt = load_checkpoint_file(path, trust=args.trust_checkpoint)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "epoch" not in ckpt:
        raise UsageError(f"--resume {path} is not a training checkpoint (no 'model'/'epoch' keys); use "
                         "--initial-checkpoint or --finetune for bare weights")
    for key in ("epoch", "step_count_global"):
        value = ckpt.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CheckpointError(f"--resume {path}: its '{key}' is {value!r}, not a count; the file is damaged "
                                  "or was not written by train.py")
    saved_opt = (ckpt.get("hparams") or {}).get("opt")
    if not args.no_resume_opt and saved_opt is not None and str(saved_opt).lower() != str(args.opt).lower():
        raise UsageError(f"--resume {path} holds the state of optimizer '{saved_opt}', this run uses '{args.opt}'; "
                         "pass --no-resume-opt to start the optimizer state fresh")
    if not args.no_resume_opt and ckpt.get("optimizer") is None:
        raise CheckpointError(
            f"--resume {path} holds no optimizer state (checkpoint-<epoch> and best files keep weights only, "
            "unless trained with --checkpoint-full-state): resume from last.pth.tar or a recovery-<step>.pth.tar "
            "of the run, or pass --no-resume-opt to continue from these weights with a fresh optimizer")
    return ckpt


# ----------------------------------------------------------------------------------------------
# Step 3: restore the state of a resumed run
# ----------------------------------------------------------------------------------------------

def restore(task: TrainTask, plan: OutputPlan) -> Progress:
    """Load weights, EMA, optimizer and scaler state from the resume checkpoint; step the schedule."""
    args, parts, ckpt = task.args, task.parts, plan.resume_ckpt
    progress = Progress()
    if ckpt is not None:
        from src.checkpoint import load_model_weights

        source = f"--resume {plan.resume_path}"
        load_model_weights(parts.model, ckpt, use_ema=False, strict=True, source=source)
        if parts.model_ema is not None:
            if ckpt.get("model_ema") is not None:
                # the same checks as the model's (prefixes, shapes, NaN/inf, junk): a damaged EMA would
                # otherwise crash with a traceback or silently pick every best checkpoint from garbage
                load_model_weights(parts.model_ema, {"model_ema": ckpt["model_ema"]}, use_ema=True, strict=True,
                                   source=f"{source} (EMA weights)")
            else:  # no EMA in the file: the average restarts from the resumed weights, not from the init
                parts.model_ema.set(parts.model)
        if not args.no_resume_opt:  # present and of the same optimizer: _load_resume checked
            try:
                parts.optimizer.load_state_dict(ckpt["optimizer"])
            except (KeyError, ValueError, TypeError, RuntimeError) as e:
                raise UsageError(f"--resume {plan.resume_path}: its optimizer state does not fit this run's "
                                 f"optimizer ({type(e).__name__}: {e}); pass --no-resume-opt to start it "
                                 "fresh") from None
        if parts.grad_scaler is not None and ckpt.get("grad_scaler") is not None:
            parts.grad_scaler.load_state_dict(ckpt["grad_scaler"])
        from src.setup_task import restore_scheduler_state

        restore_scheduler_state(parts.lr_scheduler, ckpt.get("lr_scheduler"))  # what --sched plateau learned
        progress.num_updates = int(ckpt.get("step_count_global", 0))
        if ckpt.get("epoch_done", True):
            progress.start_epoch = int(ckpt["epoch"]) + 1
        else:
            progress.start_epoch = int(ckpt["epoch"])
            progress.epoch_state = EpochState.from_dict(ckpt.get("epoch_state"))
            progress.rng_state = ckpt.get("rng_state")
        _logger.info("resumed from %s: epoch %d%s, global step %d", plan.resume_path, progress.start_epoch,
                     f" (batch {progress.epoch_state.batches_done})" if progress.epoch_state else "",
                     progress.num_updates)
    if args.start_epoch is not None:
        progress.start_epoch, progress.epoch_state, progress.rng_state = args.start_epoch, None, None
    if progress.start_epoch > 0:
        parts.lr_scheduler.step(progress.start_epoch)
    parts.model = task.dev_env.wrap_distributed(parts.model)
    return progress


# ----------------------------------------------------------------------------------------------
# Step 4: prepare the output folder (the run's first write)
# ----------------------------------------------------------------------------------------------

def retain_mode(args: argparse.Namespace) -> str:
    """What checkpoint-<epoch> / best files keep (``--checkpoint-full-state``, ``--checkpoint-weights-only``)."""
    from src.bits.checkpoint_manager import RETAIN_FULL, RETAIN_WEIGHTS, RETAIN_WEIGHTS_ONLY

    if args.checkpoint_full_state and args.checkpoint_weights_only:
        raise UsageError("--checkpoint-full-state and --checkpoint-weights-only exclude each other")
    return RETAIN_FULL if args.checkpoint_full_state else \
        RETAIN_WEIGHTS_ONLY if args.checkpoint_weights_only else RETAIN_WEIGHTS


def prepare_output(task: TrainTask, plan: OutputPlan, progress: Progress, args_text: str) -> RunOutputs:
    """Checkpoint manager, summary and W&B; on the primary, make the folder agree with the resume point."""
    args = task.args
    manager = CheckpointManager(plan.output_dir, args.model, task.hparams, metric_name=args.eval_metric,
                                max_history=args.checkpoint_hist, retain=retain_mode(args),
                                train_cfg=dict(num_epochs=task.num_epochs, log_interval=args.log_interval,
                                               recovery_interval=args.recovery_interval, accumulate_steps=1),
                                data_config=task.data_config)
    if plan.resume_ckpt is not None:
        manager.restore_history(plan.resume_ckpt)
    from src.attack_monitor import MONITOR_COLUMN
    from src.bits.summary import SUMMARY_COLUMNS

    columns = SUMMARY_COLUMNS + ([MONITOR_COLUMN] if task.monitor is not None else [])
    outputs = RunOutputs(manager=manager, summary=SummaryCsv(storage.join(plan.output_dir, "summary.csv"), columns))
    if not task.dev_env.primary:
        return outputs
    # first write of the run: every check on the user's input has passed by now
    try:
        storage.check_writable(plan.output_dir)
    except OSError as e:
        raise UsageError(f"cannot write to the output folder {plan.output_dir}: {e.strerror or e}") from None
    resume_step = int(plan.resume_ckpt.get("step_count_global", 0)) if plan.resume_ckpt is not None else None
    manager.prepare_folder(progress.start_epoch, resume_step)
    _write_args_yaml(task, plan, progress, args_text)
    outputs.summary.truncate_from(progress.start_epoch)
    if args.log_wandb:
        from src.wandb_link import init_training_run

        outputs.wandb_run = init_training_run(args, plan.output_dir)
    _logger.info("output folder %s; training epochs %d..%d", plan.output_dir, progress.start_epoch,
                 task.num_epochs - 1)
    return outputs


def _write_args_yaml(task: TrainTask, plan: OutputPlan, progress: Progress, args_text: str) -> None:
    """``args.yaml``: written by a new run; on resume rewritten with the arguments now in use and a
    ``resume_history`` entry, after ONE warning line listing what changed against the checkpoint."""
    from src.resume_record import changed_hparams, describe_changes, history_entry, write_args_yaml

    path = storage.join(plan.output_dir, "args.yaml")
    if plan.resume_ckpt is None:
        if not (plan.continuing and storage.exists(path)):
            storage.atomic_write_text(path, args_text)
        return
    changes = changed_hparams(plan.resume_ckpt.get("hparams"), task.hparams)
    if changes:
        _logger.warning("resuming %s with %d changed setting%s: %s (recorded in args.yaml resume_history)",
                        plan.resume_path, len(changes), "" if len(changes) == 1 else "s", describe_changes(changes))
    write_args_yaml(path, args_text, history_entry(plan.resume_path, progress.start_epoch, changes),
                    keep_record=plan.continuing)


# ----------------------------------------------------------------------------------------------
# Step 5: the epochs
# ----------------------------------------------------------------------------------------------

def _check_finite_weights(model: nn.Module, epoch: int, where: str) -> None:
    """Refuse to checkpoint weights that overflowed (a finite loss with a huge step can do that), or
    NaN in a saved floating-point buffer such as BatchNorm's running statistics: the forward pass of a
    step that --skip-nonfinite or the grad scaler drops has already updated them (a NaN or inf batch
    makes the running variance NaN). Only NaN: a buffer may hold -inf on purpose (an attention mask)."""
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        raise NonFiniteLossError(f"the weights became non-finite in epoch {epoch} ({where}); the last good "
                                 "checkpoint is kept. Lower the learning rate or enable --clip-grad")
    saved = model.state_dict(keep_vars=True).keys()
    bad = [name for name, b in model.named_buffers()
           if name in saved and b.is_floating_point() and bool(torch.isnan(b).any())]
    if bad:
        raise NonFiniteLossError(f"the buffer {bad[0]} (e.g. BatchNorm running statistics) became NaN in "
                                 f"epoch {epoch} ({where}): a forward pass with non-finite activations updated it, "
                                 "even if its optimizer step was skipped; the last good checkpoint is kept. Check "
                                 "the inputs, lower the learning rate or enable --clip-grad")


def _stop_check(task: TrainTask, stop: "StopSignals") -> Callable[[int], bool]:
    """Whether every process agrees to stop: checked each step on one process, and every
    ``--log-interval`` steps with an all-reduce in distributed runs (all ranks must stop together)."""
    from src.bits.device import reduce_sums

    dev_env, interval = task.dev_env, max(1, task.args.log_interval or 1)

    def should_stop(batches_done: int) -> bool:
        if not dev_env.distributed:
            return stop.requested
        if batches_done % interval:
            return False
        return reduce_sums(dev_env, [1.0 if stop.requested else 0.0])[0] > 0

    return should_stop


def _epoch_hooks(task: TrainTask, outputs: RunOutputs, first_epoch: bool) -> EpochHooks:
    """Recovery checkpoints and the first-batch image of the epoch loop."""
    args, dev_env, parts = task.args, task.dev_env, task.parts

    def save_recovery(epoch: int, step: int, st: EpochState) -> None:
        from src.cli import rng_state

        _check_finite_weights(parts.model, epoch, f"global step {step}")  # every rank: all stop together
        rngs = dev_env.all_gather_object(rng_state())  # every rank's generators, by rank
        if dev_env.primary:
            outputs.manager.save_recovery(parts.model, parts.optimizer, epoch, st.batches_done, step,
                                          {**st.to_dict(), "world_size": dev_env.world_size},
                                          rng_state=rngs, model_ema=parts.model_ema, grad_scaler=parts.grad_scaler,
                                          lr_scheduler=parts.lr_scheduler)

    def save_first_batch(x: torch.Tensor) -> None:
        import io

        import torchvision

        buf = io.BytesIO()
        torchvision.utils.save_image(x[:64].float().cpu(), buf, format="png")
        storage.atomic_write_bytes(storage.join(outputs.manager.output_dir, "train-batch.png"), buf.getvalue())

    return EpochHooks(log_interval=args.log_interval, recovery_interval=args.recovery_interval,
                      save_recovery=save_recovery,
                      on_first_batch=save_first_batch if (first_epoch and args.save_images and dev_env.primary)
                      else None)


def _restore_rng(states: Optional[list], dev_env: DeviceEnv) -> None:
    """A mid-epoch resume continues the random numbers where the recovery point left them (the epoch's
    seed alone would replay the epoch's first steps' attack starts, mixup and dropout draws)."""
    from src.cli import set_rng_state

    if not states:  # a recovery file of an older version: the epoch's seed, as before
        _logger.warning("the recovery checkpoint holds no random generator state: the rest of the epoch draws "
                        "other random numbers than the interrupted run would have")
        return
    if len(states) != dev_env.world_size:
        _logger.warning("the recovery checkpoint holds the random generator states of %d processes, this run has "
                        "%d: the rest of the epoch draws other random numbers than the interrupted run would have",
                        len(states), dev_env.world_size)
        return
    set_rng_state(states[dev_env.global_rank])


def _position_loader(loader, epoch: int, epoch_state: Optional[EpochState]) -> None:
    """Shuffle for this epoch and skip the batches a mid-epoch recovery point already did."""
    from src.data import set_loader_epoch
    from src.smoke import CappedLoader

    start = epoch_state.batches_done if epoch_state is not None else 0
    if isinstance(loader, CappedLoader):  # --max-train-steps: the cap counts from the epoch's start
        loader.start = start
        loader = loader.loader
    set_loader_epoch(loader, epoch, start)


def _evaluate_epoch(task: TrainTask) -> Dict[str, float]:
    """The per-epoch evaluation of the model (and of the EMA, whose metrics then count)."""
    args, dev_env, parts = task.args, task.dev_env, task.parts
    sync_bn = dev_env.distributed and args.dist_bn in ("broadcast", "reduce")
    eval_batches = dev_env.wrap_loader(task.eval_loader, args.use_mp_loader)
    if sync_bn:
        dev_env.distribute_bn(parts.model, args.dist_bn == "reduce")
    metrics = evaluate(parts.model, eval_batches, dev_env, attack=task.eval_attack, attack_mode=args.attack_mode)
    if parts.model_ema is not None:
        if sync_bn:
            dev_env.distribute_bn(parts.model_ema, args.dist_bn == "reduce")
        metrics = evaluate(parts.model_ema.module, eval_batches, dev_env, attack=task.eval_attack,
                           attack_mode=args.attack_mode, phase="eval EMA")
    if args.eval_metric not in metrics:
        raise UsageError(f"--eval-metric {args.eval_metric} is not measured by the per-epoch evaluation "
                         f"(it measures {', '.join(sorted(metrics))})")
    # checkpoints and the summary keep the original's metric keys (+ the selection metric if another)
    return {k: v for k, v in metrics.items() if k in ("loss", "top1", "robust_top1", args.eval_metric)}


def make_batch_transform(task: TrainTask, epoch: int) -> Optional[Callable]:
    """Mixup/cutmix, then random erasing, of a batch on the device: the original's order (it mixed
    in the collate function and erased the mixed batch afterwards)."""
    args, mixup_fn, erasing = task.args, task.mixup_fn, task.random_erasing
    if mixup_fn is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
        mixup_fn.mixup_enabled = False
    if mixup_fn is None and erasing is None:
        return None

    def transform(x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if mixup_fn is not None:
            x, y = mixup_fn(x, y)
        if erasing is not None:
            x = erasing(x)
        return x, y

    return transform


def run_epochs(task: TrainTask, plan: OutputPlan, progress: Progress, outputs: RunOutputs,
               stop: Optional[StopSignals] = None) -> Dict[str, Any]:
    """Train, evaluate and checkpoint each epoch; a stop signal saves a recovery point and raises."""
    args, dev_env, parts = task.args, task.dev_env, task.parts
    stop = stop or StopSignals()
    options = StepOptions(clip_grad=args.clip_grad, clip_mode=args.clip_mode, skip_nonfinite=args.skip_nonfinite)
    best, eval_metrics, train_metrics = outputs.manager.best, {}, {}
    num_updates, epoch_state = progress.num_updates, progress.epoch_state
    t0 = time.time()
    try:
        for epoch in range(progress.start_epoch, task.num_epochs):
            seed_everything(epoch_seed(args.seed, epoch, dev_env.global_rank))
            _position_loader(task.train_loader, epoch, epoch_state)
            if epoch_state is not None:
                _restore_rng(progress.rng_state, dev_env)
            eps_now = float(task.eps_schedule(epoch)) if task.eps_schedule is not None else float("nan")
            hooks = _epoch_hooks(task, outputs, epoch == progress.start_epoch)
            hooks.should_stop = _stop_check(task, stop)
            train_batches = dev_env.wrap_loader(task.train_loader, args.use_mp_loader)
            out = train_one_epoch(epoch, parts, train_batches, dev_env, options, hooks=hooks,
                                  batch_transform=make_batch_transform(task, epoch), num_updates=num_updates,
                                  eps=eps_now, state=epoch_state)
            epoch_state = None
            num_updates, train_metrics = out["num_updates"], out["metrics"]
            if out["stopped"]:
                hooks.save_recovery(epoch, num_updates, out["state"])
                _stopped(stop, plan, f"in epoch {epoch} at global step {num_updates}",
                         outputs.manager.path(f"recovery-{num_updates}.pth.tar"))
            _check_finite_weights(parts.model, epoch, "end of the epoch")
            seed_everything(EVAL_SEED + dev_env.global_rank)  # validate.py's default seed: it reproduces this
            eval_metrics = _evaluate_epoch(task)
            monitor = task.monitor.measure(parts.model, epoch, dev_env, args.attack_mode) \
                if task.monitor is not None and task.monitor.due(epoch) else {}
            parts.lr_scheduler.step(epoch + 1, eval_metrics.get(args.eval_metric))
            if dev_env.primary:
                best = _record_epoch(task, outputs, epoch, num_updates, train_metrics, eval_metrics, monitor)
            dev_env.barrier()
            if stop.requested and epoch + 1 < task.num_epochs:
                _stopped(stop, plan, f"after epoch {epoch}", outputs.manager.path("last.pth.tar"))
    finally:
        if outputs.wandb_run is not None:
            outputs.wandb_run.finish()
    if dev_env.primary and best is not None:
        _logger.info("*** Best metric: %s (epoch %d)", best[1], best[0])
    return {"output_dir": plan.output_dir, "eval": eval_metrics, "train": train_metrics, "best": best,
            "num_epochs": task.num_epochs, "seconds": time.time() - t0, "primary": dev_env.primary}


def _stopped(stop: StopSignals, plan: OutputPlan, where: str, checkpoint: str) -> None:
    signum = stop.signum or signal.SIGINT
    raise Interrupted(f"{signal.Signals(signum).name}: training stopped {where}; saved {checkpoint}. Resume with "
                      f"the same command and --resume {checkpoint} (or --resume auto with the same --output/"
                      f"--experiment)", signum)


def _record_epoch(task: TrainTask, outputs: RunOutputs, epoch: int, num_updates: int,
                  train_metrics: Dict[str, float], eval_metrics: Dict[str, float],
                  monitor: Optional[Dict[str, float]] = None):
    """Summary row, W&B, and the epoch's checkpoints; returns the best (epoch, metric) so far."""
    from src.attack_monitor import MONITOR_COLUMN

    parts = task.parts
    row = summary_row(epoch, train_metrics, eval_metrics,
                      {MONITOR_COLUMN: (monitor or {}).get(MONITOR_COLUMN, float("nan"))} if task.monitor else None)
    outputs.summary.append(row)
    _write_summary_png(outputs.summary, task.args.model)
    if outputs.wandb_run is not None:
        outputs.wandb_run.log({**row, **(monitor or {})})
    return outputs.manager.save_epoch(parts.model, parts.optimizer, epoch, len(task.train_loader), num_updates,
                                      eval_metrics, model_ema=parts.model_ema, grad_scaler=parts.grad_scaler,
                                      lr_scheduler=parts.lr_scheduler)


def _write_summary_png(summary: SummaryCsv, title: str) -> None:
    """``summary.png`` next to ``summary.csv``, redrawn every epoch; a failure to draw only warns."""
    from src.bits.summary import read_rows
    from src.plots import summary_png

    path = storage.join(storage.dirname(summary.path), "summary.png")
    try:
        png = summary_png(read_rows(summary.path), title)
    except Exception as e:  # a plotting problem must never stop training
        _logger.warning("could not draw %s: %s: %s", path, type(e).__name__, e)
        return
    storage.atomic_write_bytes(path, png)
