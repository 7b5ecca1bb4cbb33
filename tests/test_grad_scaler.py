"""The grad-scaler path of training (``--amp`` float16 on CUDA), exercised on the CPU.

train.py creates a ``torch.amp.GradScaler`` only for float16 autocast on CUDA. Its logic in the
training step (scaled backward, unscale before clipping, a dropped step on overflow, the scale in
checkpoints and on resume) does not depend on the device, so these tests run it with a CPU
GradScaler in float32, where scaling by a power of two is exact:

- with a scaler the weights are bit-identical to the unscaled step, with and without clipping;
- an overflowing step is dropped (weights untouched, scale lowered) and counted without a host
  sync per step; an epoch where the scaler drops most steps ends with a warning, a few drops while
  the scale settles with an info line;
- a resumed run continues with the scaler state of its checkpoint: it ends where an
  uninterrupted run ends, weights and scaler state alike.
"""
from __future__ import annotations

import logging
import os
import shutil

import pytest
import torch
import torch.nn as nn

import tests.tiny_models  # noqa: F401  (registers tiny_cnn_test)
from src.attacks import AdvTrainingLoss, AttackCfg
from src.bits.device import DeviceEnv
from src.engine import EpochHooks, StepOptions, TrainParts, train_one_epoch
from tests.conftest import TINY_TRAIN, run_train

CPU = torch.device("cpu")


def _scaler(init_scale: float, growth_interval: int = 10 ** 6, backoff: float = 0.5) -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=growth_interval,
                                backoff_factor=backoff)


def _batches(n: int, bsz: int = 10):
    from src.data import DigitsDataset, build_eval_transform

    ds = DigitsDataset("validation", transform=build_eval_transform(
        {"input_size": (3, 32, 32), "crop_pct": 1.0, "interpolation": "bicubic"}))
    x = torch.stack([ds[i][0] for i in range(n * bsz)])
    y = torch.as_tensor(ds.targets[:n * bsz]).long()
    return [(x[i * bsz:(i + 1) * bsz], y[i * bsz:(i + 1) * bsz]) for i in range(n)]


def _model():
    import timm

    torch.manual_seed(0)
    return timm.create_model("tiny_cnn_test", num_classes=10)


def _adv_loss():
    cfg = AttackCfg("pgd", 4 / 255, "constant", 0, 0, 1 / 255, 1, "linf", (0.0, 1.0))
    return AdvTrainingLoss(cfg, nn.CrossEntropyLoss(), clean_logits="skip")


def _steep(factor: float, first: int = 10 ** 6):
    """The adversarial loss times ``factor`` for the ``first`` steps: gradients that overflow float32
    under a 2**127 scale (NaN for a NaN factor)."""
    inner = _adv_loss()
    calls = []

    def loss_fn(model, x, y, epoch):
        loss, clean, adv = inner(model, x, y, epoch)
        calls.append(1)
        return (loss * factor if len(calls) <= first else loss), clean, adv
    return loss_fn


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _epoch(model, loader, scaler=None, clip=None, loss_fn=None):
    loss_fn = loss_fn or _adv_loss()
    torch.manual_seed(1)  # the attack's random start: the same draws in every run
    parts = TrainParts(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), loss_fn,
                       grad_scaler=scaler)
    out = train_one_epoch(0, parts, loader, DeviceEnv(CPU), StepOptions(clip_grad=clip),
                          EpochHooks(log_interval=1000))
    return out


@pytest.mark.parametrize("clip", [None, 0.5])
def test_scaled_steps_equal_unscaled_steps(clip):
    loader = _batches(6)
    plain, scaled = _model(), _model()
    _epoch(plain, loader, clip=clip)
    out = _epoch(scaled, loader, scaler=_scaler(2.0 ** 12), clip=clip)
    assert out["num_updates"] == 6 and out["state"].skipped_steps == 0
    for (name, a), b in zip(plain.state_dict().items(), scaled.state_dict().values()):
        assert torch.equal(a, b), name
    if clip is not None:  # the clip bites: unscaled before clipping, else the scaled norm would be clipped
        free = _model()
        _epoch(free, loader)
        assert not all(torch.equal(a, b) for a, b in zip(free.state_dict().values(), plain.state_dict().values()))


def test_overflowing_step_is_dropped_counted_and_reported(caplog):
    model = _model()
    before = _params(model)
    scaler = _scaler(2.0 ** 127, backoff=2.0 ** -64)  # the scaled gradients overflow float32 once
    with caplog.at_level(logging.INFO, logger="robust_vits"):
        out = _epoch(model, _batches(1), scaler=scaler, loss_fn=_steep(2.0 ** 20))
    assert out["state"].skipped_steps == 1 and out["num_updates"] == 1  # the schedule still moves on
    after = _params(model)
    assert all(torch.equal(after[k], v) for k, v in before.items())  # no update from the dropped step
    assert scaler.get_scale() == 2.0 ** 63
    msg = [r for r in caplog.records if "grad scaler dropped" in r.getMessage()]
    assert len(msg) == 1 and "dropped 1 of 1 optimizer steps" in msg[0].getMessage()
    assert msg[0].levelno == logging.WARNING  # every step of the epoch

    # one drop while the scale settles is the scaler working: an info line, the other steps update
    caplog.clear()
    model = _model()
    scaler = _scaler(2.0 ** 127, backoff=2.0 ** -64)
    with caplog.at_level(logging.INFO, logger="robust_vits"):
        out = _epoch(model, _batches(8), scaler=scaler, loss_fn=_steep(2.0 ** 20, first=1))
    assert out["state"].skipped_steps == 1 and scaler.get_scale() == 2.0 ** 63
    after = _params(model)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert not all(torch.equal(after[k], v) for k, v in before.items())
    msg = [r for r in caplog.records if "grad scaler dropped" in r.getMessage()]
    assert len(msg) == 1 and msg[0].levelno == logging.INFO and "dropped 1 of 8" in msg[0].getMessage()


def test_diverged_loss_under_a_scaler_warns_instead_of_training_silently(caplog):
    model = _model()
    before = _params(model)
    with caplog.at_level(logging.INFO, logger="robust_vits"):
        out = _epoch(model, _batches(4), scaler=_scaler(2.0 ** 8), loss_fn=_steep(float("nan")))
    assert out["state"].skipped_steps == 4
    after = _params(model)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    warn = [r for r in caplog.records if r.levelno == logging.WARNING and "grad scaler dropped 4 of 4" in r.getMessage()]
    assert warn


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_resume_restores_the_scaler_state(tmp_path, monkeypatch):
    created = []

    def cpu_scaler(self):  # what float16 --amp on CUDA creates, here on the CPU with a visible schedule
        created.append(_scaler(2.0 ** 4, growth_interval=5))
        return created[-1]

    monkeypatch.setattr(DeviceEnv, "create_grad_scaler", cpu_scaler)
    base = TINY_TRAIN + ["--train-num-samples", "300", "--val-num-samples", "100", "--epochs", "2",
                         "--checkpoint-full-state"]  # 6 steps an epoch; checkpoint-0 can be resumed
    full = run_train(base + ["--output", str(tmp_path), "--experiment", "full"])
    a = _load(os.path.join(full["output_dir"], "last.pth.tar"))
    assert a["grad_scaler"]["scale"] == 2.0 ** 6  # grown twice over 12 steps: the scaler was in the loop
    d = tmp_path / "resumed"
    d.mkdir()
    for n in ("args.yaml", "summary.csv", "checkpoint-0.pth.tar"):
        shutil.copy(os.path.join(full["output_dir"], n), d / n)
    assert _load(str(d / "checkpoint-0.pth.tar"))["grad_scaler"]["scale"] == 2.0 ** 5
    run_train(base + ["--resume", str(d / "checkpoint-0.pth.tar")])
    b = _load(str(d / "last.pth.tar"))
    assert b["grad_scaler"] == a["grad_scaler"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
