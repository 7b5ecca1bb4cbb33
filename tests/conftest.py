"""Shared fixtures: tiny training runs on the embedded digits data (fast on 2 CPU cores)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(2)

# A clean-training run that takes a few seconds: a 0.3M-parameter ViT on 32x32 digits.
TINY_TRAIN = [
    "--dataset", "digits", "--model", "test_vit", "--num-classes", "10", "--input-size", "3", "32", "32",
    "--crop-pct", "1.0", "--interpolation", "bicubic", "-b", "50", "-vb", "100", "--opt", "adamw", "--lr", "1e-3",
    "--weight-decay", "0.05", "--sched", "cosine", "--warmup-epochs", "0", "--cooldown-epochs", "0",
    "--smoothing", "0", "--no-aug", "--workers", "0", "--log-interval", "1000", "--seed", "1",
]


def run_train(argv):
    """Run train.py in-process and return run_training's result dict."""
    from src.arg_parser import parse_args
    from src.trainer import run_training

    args, text = parse_args(list(argv))
    return run_training(args, text)


@pytest.fixture(scope="module")
def single_cpu_thread():
    """Tiny CPU forwards run far faster on one thread when the cores are shared (restored after).

    Modules opt in with ``pytestmark = pytest.mark.usefixtures("single_cpu_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_train_args():
    return list(TINY_TRAIN)
