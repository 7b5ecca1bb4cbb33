"""The XLA lane (`make test-xla`): real torch_xla on PJRT's CPU backend, against the plain CPU path.

Runs in .venv-tpu (torch 2.9 + torch-xla 2.9). One adversarial training run of 2 epochs on the
embedded digits goes through ``launch_xla.py train.py`` (one XLA device: collectives between
CPU devices hang in torch_xla 2.9, see launch_xla.py), the same run goes through the plain CPU
device environment, and the XLA checkpoint is evaluated through ``launch_xla.py validate.py``
and through plain ``validate.py``.

Tolerances (digits validation split: 297 images, so one image is 0.34 points):
- Same checkpoint, XLA vs CPU evaluation: identical weights and images, only float rounding
  differs, so clean top-1 may differ by at most 1 point (3 images near a decision boundary).
  Robust top-1 also depends on the PGD random start, drawn from XLA's generator on one side and
  the CPU's on the other: 6 points (18 images) allows for that; a broken attack (no mark_step
  effect, eval/train mode mixed up, wrong eps units) moves it by tens of points.
- XLA training vs CPU training: the two runs share the seed, data order and initial weights, but
  not the random streams of the attack's start nor the float rounding, so they are two
  trajectories of the same recipe. The binomial standard error of one accuracy on 297 images is
  about 2.5 points at 75%, 3.5 points for a difference of two; 12 points is about 3.5 standard
  errors, loose enough for trajectory noise and far below what a wrong update (no gradient step,
  doubled learning rate, attack off) costs after 2 epochs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.xla

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = [
    "--dataset", "digits", "--model", "test_resnet", "--num-classes", "10", "--input-size", "3", "32", "32",
    "--crop-pct", "1.0", "--interpolation", "bicubic", "-b", "64", "-vb", "99", "--opt", "adamw", "--lr", "2e-3",
    "--weight-decay", "0.05", "--sched", "cosine", "--epochs", "2", "--warmup-epochs", "0", "--cooldown-epochs", "0",
    "--smoothing", "0", "--no-aug", "--workers", "0", "--log-interval", "10", "--seed", "1",
    "--adv-training", "pgd", "--attack", "pgd", "--attack-eps", "8", "--attack-steps", "2",
    "--eps-schedule", "constant",
]
# the training run's data config; --no-normalize as in training (the loader never normalizes there)
EVAL = ["--dataset", "digits", "--split", "validation", "--model", "test_resnet", "--num-classes", "10",
        "--input-size", "3", "32", "32", "--crop-pct", "1.0", "--interpolation", "bicubic", "--no-normalize",
        "--attack", "pgd", "--attack-eps", "8", "--attack-steps", "2", "-b", "99", "--workers", "0"]


def _run(argv, xla: bool) -> str:
    env = dict(os.environ, WANDB_MODE="offline")
    env.pop("PJRT_DEVICE", None)
    if xla:
        env["PJRT_DEVICE"] = "CPU"
        argv = ["launch_xla.py", "--num-devices", "1"] + argv
    proc = subprocess.run([sys.executable] + argv, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _result(stdout: str) -> dict:
    return json.loads(stdout.split("--result", 1)[1])


def _load_without_torch_xla(path: str) -> dict:
    """Load a checkpoint in a process that cannot import torch_xla (the main venv when present)."""
    main_python = os.path.join(ROOT, ".venv", "bin", "python")
    python = main_python if os.access(main_python, os.X_OK) else sys.executable
    code = ("import sys, json, torch; sys.modules['torch_xla'] = None\n"
            "ck = torch.load(sys.argv[1], map_location='cpu', weights_only=True)\n"
            "devs = sorted({t.device.type for t in ck['model'].values()} | "
            "{t.device.type for s in ck['optimizer']['state'].values() for t in s.values() if torch.is_tensor(t)})\n"
            "print(json.dumps({'devices': devs, 'steps': ck['step_count_global'], 'epoch': ck['epoch']}))\n")
    proc = subprocess.run([python, "-c", code, path], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("xla-lane")
    res = {}
    for name, xla in (("xla", True), ("cpu", False)):
        _run(["train.py"] + RECIPE + ["--output", str(out), "--experiment", name], xla=xla)
        res[name] = os.path.join(out, name)
    return res


def _summary(folder: str):
    import csv

    with open(os.path.join(folder, "summary.csv")) as f:
        return list(csv.DictReader(f))


def test_xla_training_matches_the_cpu_run(runs):
    xla, cpu = _summary(runs["xla"]), _summary(runs["cpu"])
    assert [r["epoch"] for r in xla] == [r["epoch"] for r in cpu] == ["0", "1"]
    ck_xla = _load_without_torch_xla(os.path.join(runs["xla"], "last.pth.tar"))
    ck_cpu = _load_without_torch_xla(os.path.join(runs["cpu"], "last.pth.tar"))
    assert ck_xla["devices"] == ["cpu"]  # loads where torch_xla is absent, every tensor on the CPU
    assert ck_xla["steps"] == ck_cpu["steps"] == 2 * (1500 // 64)  # same optimizer steps (drop_last)
    assert ck_xla["epoch"] == ck_cpu["epoch"] == 1
    for key in ("eval_top1", "eval_robust_top1"):
        assert abs(float(xla[-1][key]) - float(cpu[-1][key])) <= 12.0, (key, xla[-1], cpu[-1])
    assert float(xla[-1]["eval_top1"]) > 50.0  # it learned: 10 classes, chance is 10%


def test_xla_evaluation_of_the_checkpoint_matches_the_cpu_evaluation(runs):
    ckpt = os.path.join(runs["xla"], "last.pth.tar")
    on_xla = _result(_run(["validate.py"] + EVAL + ["--checkpoint", ckpt], xla=True))
    on_cpu = _result(_run(["validate.py"] + EVAL + ["--checkpoint", ckpt], xla=False))
    assert abs(on_xla["top1"] - on_cpu["top1"]) <= 1.0, (on_xla, on_cpu)
    assert abs(on_xla["robust_top1"] - on_cpu["robust_top1"]) <= 6.0, (on_xla, on_cpu)
    assert on_xla["robust_top1"] < on_xla["top1"]  # the attack did something
