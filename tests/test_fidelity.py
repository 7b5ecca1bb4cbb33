"""Places where this project must give the numbers the original gives (issue: fidelity)."""
from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest
import torch


@pytest.mark.parametrize("opt,scale", [
    ("adamw", "sqrt"), ("adam", "sqrt"), ("nadam", "sqrt"), ("radam", "sqrt"), ("lamb", "sqrt"),
    ("lambc", "sqrt"), ("adabelief", "sqrt"), ("AdamW", "sqrt"),
    ("sgd", "linear"), ("momentum", "linear"), ("adagrad", "linear"), ("adafactor", "linear"),
    ("adan", "linear"), ("adadelta", "linear"), ("rmsprop", "linear"),
])
def test_lr_auto_scaling_rule_is_the_originals(opt, scale):
    """lr: null scales lr_base by sqrt only for adam*/lamb/adabelief, linearly for the rest."""
    from src.setup_task import default_lr_base_scale, scale_lr

    assert default_lr_base_scale(opt) == scale
    args = argparse.Namespace(lr=None, lr_base=1e-3, lr_base_size=256, lr_base_scale="", opt=opt, batch_size=256)
    expected = 1e-3 * (4 ** 0.5 if scale == "sqrt" else 4)
    assert scale_lr(args, world_size=4) == pytest.approx(expected)


def test_random_erasing_runs_after_mixup():
    """The original mixed in the collate function and erased the mixed batch afterwards."""
    from src.trainer import make_batch_transform

    calls = []

    def mixup(x, y):
        calls.append("mixup")
        return x + 1, y

    def erasing(x):
        calls.append("erase")
        return x * 0

    task = SimpleNamespace(args=SimpleNamespace(mixup_off_epoch=0), mixup_fn=mixup, random_erasing=erasing)
    x, y = make_batch_transform(task, epoch=0)(torch.ones(2, 3), torch.zeros(2))
    assert calls == ["mixup", "erase"]
    assert torch.equal(x, torch.zeros(2, 3))  # the erased values survive: nothing mixes them afterwards


def _optimizer_groups(argv):
    from src.arg_parser import parse_args
    from src.bits.device import initialize_device
    from src.trainer import build_task
    from src.utils import unwrap_model

    args, _ = parse_args(argv)
    task = build_task(args, initialize_device(force_cpu=True))
    names = {id(p): n for n, p in unwrap_model(task.parts.model).named_parameters()}
    groups = [(g["weight_decay"], [names[id(p)] for p in g["params"]]) for g in task.parts.optimizer.param_groups]
    ema = task.parts.model_ema
    return groups, (sorted(unwrap_model(ema).state_dict()) if ema is not None else None)


def test_weight_decay_groups_do_not_change_under_normalize_model(tiny_train_args):
    """--normalize-model must not decay cls_token / pos_embed (the network's no_weight_decay names)."""
    argv = tiny_train_args + ["--weight-decay", "0.5", "--model-ema"]
    plain, plain_ema = _optimizer_groups(argv)
    wrapped, wrapped_ema = _optimizer_groups(argv + ["--normalize-model"])
    assert wrapped == plain
    assert wrapped_ema == plain_ema
    no_decay = {n for wd, ns in plain if wd == 0 for n in ns}
    assert {"cls_token", "pos_embed"} <= no_decay


def test_amp_dtype_auto_is_float16_on_cuda_and_bfloat16_elsewhere():
    """--amp as the original: float16 autocast (with a grad scaler) on CUDA; bfloat16 on the CPU."""
    from src.bits.device import initialize_device, resolve_amp_dtype
    from src.errors import UsageError

    assert resolve_amp_dtype("auto", cuda=True) is torch.float16
    assert resolve_amp_dtype("auto", cuda=False) is torch.bfloat16
    assert resolve_amp_dtype("bfloat16", cuda=True) is torch.bfloat16
    env = initialize_device(force_cpu=True, amp=True)
    assert env.amp_dtype is torch.bfloat16 and env.create_grad_scaler() is None
    with pytest.raises(UsageError, match="needs a CUDA device"):
        initialize_device(force_cpu=True, amp=True, amp_dtype="float16")
    from src.arg_parser import parse_args

    assert parse_args(["--dataset", "digits", "--amp"])[0].amp_dtype == "auto"


def test_no_aug_resizes_with_the_data_config_interpolation():
    """--no-aug: Resize + CenterCrop with the data config's interpolation (bicubic for XCiT), as timm's
    no-aug path the original used; not the training interpolation, not bilinear."""
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    from src.data import build_train_transform

    args = SimpleNamespace(no_aug=True, train_interpolation="random")
    cfg = {"input_size": (3, 32, 32), "interpolation": "bicubic", "crop_pct": 1.0}
    t = build_train_transform(args, cfg)
    resize = [m for m in t.transforms if isinstance(m, transforms.Resize)][0]
    assert resize.interpolation == InterpolationMode.BICUBIC
