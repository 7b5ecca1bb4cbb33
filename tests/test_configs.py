"""Every shipped config parses and builds its model, optimizer, scheduler, loss and transforms."""
import glob
import os

import pytest
import torch

from src import setup_task as T
from src.arg_parser import parse_args
from src.attacks import AdvTrainingLoss, TRADESLoss
from src.bits.device import DeviceEnv
from src.data import build_train_transform, build_eval_transform
from tests.conftest import ROOT

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def test_all_paper_configs_present():
    names = {os.path.basename(c)[:-5] for c in CONFIGS}
    assert {"xcit-adv-training", "xcit-adv-finetuning", "xcit-adv-finetuning-hi-res", "xcit-adv-training-cifar10",
            "resnet-adv-training", "xcit-nano-adv-training", "xcit-nano-adv-finetuning", "xcit-nano", "xcit",
            "xcit-finetuning", "xcit-finetuning-hi-res", "quickstart"} <= names


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: os.path.basename(c))
def test_config_builds(cfg):
    args, _ = parse_args(["-c", cfg, "/data"])
    assert args.no_normalize is True
    with torch.device("meta"):  # full-size models without allocating or initializing weights
        model = T.create_model(args)
    data_config = T.resolve_data_config(args, model)
    if args.normalize_model:
        mean, std = T.model_mean_std(args, data_config)
        assert len(mean) == 3 and len(std) == 3
    args.lr = T.scale_lr(args, world_size=8)
    assert args.lr > 0
    opt = T.create_optimizer(args, model)
    sched, num_epochs = T.create_scheduler(args, opt, updates_per_epoch=10)
    expected = args.epochs + (args.cooldown_epochs if args.sched in ("cosine", "tanh", "poly") else 0)
    assert num_epochs == expected
    loss = T.create_train_loss(args, DeviceEnv(torch.device("cpu")), args.num_classes)
    if args.adv_training == "pgd":
        assert isinstance(loss, AdvTrainingLoss)
    elif args.adv_training == "trades":
        assert isinstance(loss, TRADESLoss)
    else:
        assert isinstance(loss, T.CleanTrainingLoss)
    if args.adv_training:
        assert args.eval_metric == "robust_top1"
    build_train_transform(args, data_config, separate=bool(args.aug_splits))
    build_eval_transform(data_config)


def test_light_recipe_values():
    args, _ = parse_args(["-c", os.path.join(ROOT, "configs", "xcit-adv-training.yaml"), "/data"])
    assert (args.model, args.opt, args.lr, args.weight_decay) == ("xcit_small_12_p16_224", "adamw", 5e-4, 0.5)
    assert (args.attack_eps, args.attack_steps, args.eps_schedule, args.eps_schedule_period) == (4, 1, "linear", 10)
    assert (args.epochs, args.cooldown_epochs, args.warmup_epochs, args.batch_size) == (100, 10, 10, 64)
    assert args.aa is None and args.mixup == 0 and args.cutmix == 0 and args.reprob == 0
    assert args.normalize_model is False and args.smoothing == 0.1 and args.drop_path == 0.05


def test_cifar_finetuning_lr_scaling():
    args, _ = parse_args(["-c", os.path.join(ROOT, "configs", "xcit-adv-finetuning.yaml"), "/data"])
    assert args.lr is None
    # adamw => sqrt scaling of lr_base 2e-4 at batch 512; 8 processes x 128 = 1024
    assert T.scale_lr(args, world_size=8) == pytest.approx(2e-4 * 2 ** 0.5)
