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
