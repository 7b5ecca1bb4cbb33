"""The training run: build everything from the parsed arguments, then loop over epochs.

``train.py`` only parses the command line and calls ``run_training``; tests call it in-process.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import random
import sys
import time
from datetime import datetime
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from src import storage
from src.bits.checkpoint_manager import CheckpointManager, find_resume_checkpoint
from src.bits.device import DeviceEnv, initialize_device, shutdown
from src.bits.summary import SummaryCsv, summary_row
from src.engine import EpochState, NonFiniteLossError, evaluate, train_one_epoch
from src.cli import seed_everything, set_deterministic, setup_logging
from src.errors import UsageError
from src.utils import unwrap_model

_logger = logging.getLogger("robust_vits")


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
        return path, True
    if storage.exists(path):
        for i in range(1, 100):
            cand = f"{path}-{i}"
            if not storage.exists(cand):
                path = cand
                break
        else:
            raise UsageError(f"experiment folders {path}-1 .. -99 all exist; choose another --experiment")
    return path, False


def _mixup(args, num_classes: int):
    from src.setup_task import mixup_active

    if not mixup_active(args):
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                 prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=args.smoothing, num_classes=num_classes)


def build_loaders(args, data_config, dev_env: DeviceEnv, num_classes: Optional[int]):
    from src import data as D

    if args.aug_splits:
        transform = D.build_train_transform(args, data_config, separate=True)
    else:
        transform = D.build_train_transform(args, data_config)
    eval_transform = D.build_eval_transform(data_config)

    def make_train_ds(name, root):
        ds = D.create_dataset(name, root, args.train_split, is_training=True, batch_size=args.batch_size,
                              repeats=args.epoch_repeats, seed=args.seed)
        if args.aug_splits:
            return D.AugSplitsDataset(ds, transform, args.aug_splits)
        D.set_transform(ds, transform)
        return ds

    train_ds = make_train_ds(args.dataset, args.data_dir)
    eval_ds = D.create_dataset(args.dataset, args.data_dir, args.val_split, is_training=False,
                               batch_size=args.validation_batch_size or args.batch_size)
    D.set_transform(eval_ds, eval_transform)
    D.check_three_channels(eval_ds, data_config["input_size"][0])
    ds_classes = D.dataset_num_classes(train_ds.dataset if args.aug_splits else train_ds)
    if ds_classes is not None and num_classes is not None and ds_classes > num_classes:
        raise UsageError(f"dataset has {ds_classes} classes but the model has {num_classes} outputs; "
                         f"pass --num-classes {ds_classes}")
    common = dict(world_size=dev_env.world_size, rank=dev_env.global_rank, pin_memory=args.pin_mem,
                  seed=args.seed, persistent_workers=args.use_multi_epochs_loader)
    if args.combine_dataset:
        comb_bs = int(args.batch_size * args.combined_dataset_ratio)
        main_bs = args.batch_size - comb_bs
        comb_ds = make_train_ds(args.combine_dataset, args.combine_data_dir or args.data_dir)
        la = D.create_loader(train_ds, main_bs, True, workers=args.workers, **common)
        lb = D.create_loader(comb_ds, comb_bs, True, workers=args.workers, **{**common, "seed": args.seed + 1})
        train_loader = D.CombinedLoaders(la, lb, seed=args.seed)
    else:
        train_loader = D.create_loader(train_ds, args.batch_size, True, workers=args.workers, **common)
    eval_workers = min(args.workers, 2) if str(args.dataset).startswith(("tfds/", "wds/")) else args.workers
    eval_loader = D.create_loader(eval_ds, args.validation_batch_size or args.batch_size, False,
                                  workers=eval_workers, **common)
    if len(train_loader) == 0:
        raise UsageError(f"the training set has fewer examples than one batch ({args.batch_size} per process "
                         f"x {dev_env.world_size}); lower --batch-size")
    return train_loader, eval_loader


def _load_resume(path: str, args) -> Dict[str, Any]:
    from src.checkpoint import load_checkpoint_file

    if not storage.exists(path):
        raise UsageError(f"--resume {path}: no such checkpoint")
    ckpt = load_checkpoint_file(path, trust=args.trust_checkpoint)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "epoch" not in ckpt:
        raise UsageError(f"--resume {path} is not a training checkpoint (no 'model'/'epoch' keys); use "
                         "--initial-checkpoint or --finetune for bare weights")
    return ckpt


def run_training(args: argparse.Namespace, args_text: str) -> Dict[str, Any]:
    """Train according to ``args``; returns the final metrics and where the outputs are."""
    from src import setup_task as T
    from src.utils import normalize_model

    dev_env = initialize_device(force_cpu=args.force_cpu, amp=args.amp, amp_dtype=args.amp_dtype,
                                channels_last=args.channels_last, local_rank=args.local_rank)
    setup_logging(dev_env.primary)
    restore_determinism = set_deterministic(args.deterministic)
    try:
        return _run(args, args_text, dev_env, T, normalize_model)
    finally:
        restore_determinism()
        shutdown(dev_env)


def _check_finite_weights(model: nn.Module, epoch: int, where: str) -> None:
    """Refuse to checkpoint weights that overflowed (a finite loss with a huge step can do that)."""
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        raise NonFiniteLossError(f"the weights became non-finite in epoch {epoch} ({where}); the last good "
                                 "checkpoint is kept. Lower the learning rate or enable --clip-grad")


def _run(args, args_text, dev_env: DeviceEnv, T, normalize_model) -> Dict[str, Any]:
    """Everything that can fail on bad input runs before the first write to the output folder."""
    from src.data import check_dataset_name

    seed_everything(args.seed)  # identical initial weights on every process
    check_dataset_name(args.dataset)
    if args.combine_dataset:
        check_dataset_name(args.combine_dataset)
    from src.data import needs_data_dir

    if args.data_dir is None and needs_data_dir(args.dataset):
        raise UsageError("no data dir given: pass DIR (or data_dir in the config), or use --dataset digits")

    model = T.create_model(args)
    data_config = T.resolve_data_config(args, model, verbose=False)
    if args.normalize_model:
        mean, std = T.model_mean_std(args, data_config)
        model = normalize_model(model, mean, std)
        _logger.info("normalizing inside the model with mean %s std %s", mean, std)
    num_classes = args.num_classes

    # output folder (decided by the primary process, shared with the others)
    output_dir, continuing = resolve_output_dir(args, data_config) if dev_env.primary else (None, False)
    output_dir, continuing = dev_env.broadcast_object((output_dir, continuing))
    resume_path = args.resume
    if args.resume == "auto":
        resume_path = find_resume_checkpoint(output_dir) if continuing else None
        if resume_path is None and continuing and any(
                n == "last.pth.tar" or n.startswith("recovery-") for n in storage.listdir(output_dir)):
            # starting over would drop the summary rows and the checkpoints of the earlier run
            raise UsageError(f"--resume auto: no readable last/recovery checkpoint in {output_dir}; resume one "
                             "explicitly with --resume PATH (e.g. a checkpoint-<epoch>.pth.tar there) or use "
                             "another --experiment")
        if resume_path is None:
            _logger.info("--resume auto: nothing to resume in %s, starting from scratch", output_dir)
    resume_ckpt = _load_resume(resume_path, args) if resume_path else None

    if args.split_bn:
        from timm.models import convert_splitbn_model

        model = convert_splitbn_model(model, max(args.aug_splits, 2))
    model = dev_env.to_model_device(model)
    if args.sync_bn and dev_env.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)

    args.lr = T.scale_lr(args, dev_env.world_size)
    optimizer = T.create_optimizer(args, model)
    model_ema = None
    if args.model_ema:
        from timm.utils import ModelEmaV3

        model_ema = ModelEmaV3(model, decay=args.model_ema_decay)
    grad_scaler = dev_env.create_grad_scaler()

    train_loader, eval_loader = build_loaders(args, data_config, dev_env, num_classes)
    lr_scheduler, num_epochs = T.create_scheduler(args, optimizer, updates_per_epoch=len(train_loader))

    start_epoch, num_updates, epoch_state = 0, 0, None
    manager = CheckpointManager(output_dir, args.model, dict(vars(args)), metric_name=args.eval_metric,
                                max_history=args.checkpoint_hist,
                                train_cfg=dict(num_epochs=num_epochs, log_interval=args.log_interval,
                                               recovery_interval=args.recovery_interval, accumulate_steps=1))
    if resume_ckpt is not None:
        from src.checkpoint import CheckpointError, load_model_weights

        try:
            load_model_weights(model, resume_ckpt, use_ema=False, strict=True)
        except CheckpointError as e:  # name the file, not the in-memory dict it was read into
            raise CheckpointError(str(e).replace("<in-memory checkpoint>", f"--resume {resume_path}")) from None
        if model_ema is not None and resume_ckpt.get("model_ema") is not None:
            unwrap_model(model_ema).load_state_dict(resume_ckpt["model_ema"])
        if not args.no_resume_opt:
            optimizer.load_state_dict(resume_ckpt["optimizer"])
        if grad_scaler is not None and resume_ckpt.get("grad_scaler") is not None:
            grad_scaler.load_state_dict(resume_ckpt["grad_scaler"])
        num_updates = int(resume_ckpt.get("step_count_global", 0))
        if resume_ckpt.get("epoch_done", True):
            start_epoch = int(resume_ckpt["epoch"]) + 1
        else:
            start_epoch = int(resume_ckpt["epoch"])
            epoch_state = EpochState.from_dict(resume_ckpt.get("epoch_state"))
        manager.restore_history(resume_ckpt)
        _logger.info("resumed from %s: epoch %d%s, global step %d", resume_path, start_epoch,
                     f" (batch {epoch_state.batches_done})" if epoch_state else "", num_updates)
    if args.start_epoch is not None:
        start_epoch, epoch_state = args.start_epoch, None
    if start_epoch > 0:
        lr_scheduler.step(start_epoch)

    model = dev_env.wrap_distributed(model)
    train_loss = T.create_train_loss(args, dev_env, num_classes).to(dev_env.device)
    eval_attack = T.create_eval_attack(args, dev_env, num_classes)
    eps_schedule = None
    if args.adv_training:
        from src.attacks import eps_schedule as make_eps_schedule

        # logged in /255 units, as the original's summary (train_eps 4.0 for eps 4/255)
        eps_schedule = make_eps_schedule(args.eps_schedule, args.attack_eps, args.eps_schedule_period,
                                         args.zero_eps_epochs)
    mixup_fn = _mixup(args, num_classes)
    random_erasing = None
    if args.reprob > 0:
        from src.data import NotNormalizedRandomErasing

        random_erasing = NotNormalizedRandomErasing(args.reprob, mode=args.remode, max_count=args.recount,
                                                    num_splits=args.aug_splits if args.resplit else 0)

    summary = SummaryCsv(storage.join(output_dir, "summary.csv"))
    wandb_run = None
    if dev_env.primary:
        # first write of the run: every check on the user's input has passed by now
        try:
            storage.check_writable(output_dir)
        except OSError as e:
            raise UsageError(f"cannot write to the output folder {output_dir}: {e.strerror or e}") from None
        manager.prepare_folder(start_epoch, int(resume_ckpt.get("step_count_global", 0))
                               if resume_ckpt is not None else None)
        if not (continuing and storage.exists(storage.join(output_dir, "args.yaml"))):
            storage.atomic_write_text(storage.join(output_dir, "args.yaml"), args_text)
        summary.truncate_from(start_epoch)
        if args.log_wandb:
            wandb_run = _init_wandb(args, output_dir)
        _logger.info("output folder %s; training epochs %d..%d", output_dir, start_epoch, num_epochs - 1)

    def save_recovery(epoch: int, step: int, st: EpochState) -> None:
        _check_finite_weights(model, epoch, f"global step {step}")  # every rank: all stop together
        if dev_env.primary:
            manager.save_recovery(model, optimizer, epoch, st.batches_done, step, st.to_dict(),
                                  model_ema=model_ema, grad_scaler=grad_scaler, lr_scheduler=lr_scheduler)

    def save_first_batch(x: torch.Tensor) -> None:
        if args.save_images and dev_env.primary:
            import io

            import torchvision

            buf = io.BytesIO()
            torchvision.utils.save_image(x[:64].float().cpu(), buf, format="png")
            storage.atomic_write_bytes(storage.join(output_dir, "train-batch.png"), buf.getvalue())

    best = manager.best
    eval_metrics: Dict[str, float] = {}
    train_metrics: Dict[str, float] = {}
    t0 = time.time()
    # what the loops iterate (--use-mp-loader on XLA); samplers stay reachable through the plain loaders
    train_batches = dev_env.wrap_loader(train_loader, args.use_mp_loader)
    eval_batches = dev_env.wrap_loader(eval_loader, args.use_mp_loader)
    try:
        for epoch in range(start_epoch, num_epochs):
            seed_everything(epoch_seed(args.seed, epoch, dev_env.global_rank))
            if hasattr(train_loader, "sampler") and hasattr(train_loader.sampler, "set_epoch"):
                train_loader.sampler.set_epoch(epoch)
            if hasattr(train_loader.sampler, "set_start"):
                skip = epoch_state.batches_done if epoch_state is not None else 0
                if isinstance(train_loader, torch.utils.data.DataLoader):
                    train_loader.sampler.set_start(skip * train_loader.batch_size)
                else:
                    train_loader.set_start(skip)
            if mixup_fn is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
                mixup_fn.mixup_enabled = False
            eps_now = float(eps_schedule(epoch)) if eps_schedule is not None else float("nan")
            out = train_one_epoch(
                epoch, model, train_batches, optimizer, train_loss, dev_env, lr_scheduler=lr_scheduler,
                model_ema=model_ema, grad_scaler=grad_scaler, mixup_fn=mixup_fn, random_erasing=random_erasing,
                clip_grad=args.clip_grad, clip_mode=args.clip_mode, log_interval=args.log_interval,
                num_updates=num_updates, eps_for_epoch=eps_now, recovery_interval=args.recovery_interval,
                save_recovery=save_recovery, state=epoch_state, skip_nonfinite=args.skip_nonfinite,
                on_first_batch=save_first_batch if epoch == start_epoch else None)
            epoch_state = None
            _check_finite_weights(model, epoch, "end of the epoch")
            num_updates = out["num_updates"]
            train_metrics = out["metrics"]
            if args.dist_bn in ("broadcast", "reduce"):
                dev_env.distribute_bn(model, args.dist_bn == "reduce")
            eval_metrics = evaluate(model, eval_batches, dev_env, attack=eval_attack,
                                    attack_mode=args.attack_mode)
            if model_ema is not None:
                if args.dist_bn in ("broadcast", "reduce"):
                    dev_env.distribute_bn(model_ema, args.dist_bn == "reduce")
                eval_metrics = evaluate(model_ema.module, eval_batches, dev_env, attack=eval_attack,
                                        attack_mode=args.attack_mode, phase="eval EMA")
            lr_scheduler.step(epoch + 1, eval_metrics.get(args.eval_metric))
            if dev_env.primary:
                row = summary_row(epoch, train_metrics, eval_metrics)
                summary.append(row)
                if wandb_run is not None:
                    wandb_run.log(row)
                best = manager.save_epoch(model, optimizer, epoch, len(train_loader), num_updates, eval_metrics,
                                          model_ema=model_ema, grad_scaler=grad_scaler, lr_scheduler=lr_scheduler)
            dev_env.barrier()
    except KeyboardInterrupt:
        _logger.warning("interrupted: stopping after the last complete epoch")
    finally:
        if wandb_run is not None:
            wandb_run.finish()
    if dev_env.primary and best is not None:
        _logger.info("*** Best metric: %s (epoch %d)", best[1], best[0])
    return {"output_dir": output_dir, "eval": eval_metrics, "train": train_metrics, "best": best,
            "num_epochs": num_epochs, "seconds": time.time() - t0}


def _init_wandb(args, output_dir: str):
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
    storage.atomic_append_text(storage.join(output_dir, "args.yaml"),
                               f"wandb_run: {url or 'offline:' + run.id}\n")
    return run
