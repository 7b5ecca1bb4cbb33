"""The reference to beat: adversarial training and PGD evaluation as a plain PyTorch loop.

No framework: the data are tensors held in memory (shuffled with ``randperm`` and sliced), PGD is
a dozen lines with input-only gradients, and a training step is attack, forward, backward, SGD.
It does the same work as ``train.py`` / ``validate.py`` in the settings the benchmarks use
(digits at 32 px without augmentation, cross-entropy without label smoothing, timm's SGD with the
same hyper-parameters, full training batches only, a PGD-k evaluation of the clean and adversarial
accuracy), so the time the CLIs spend beyond it is the framework's overhead.

``clean_logits`` mirrors ``--adv-clean-logits``: ``train`` (faithful) adds the original's
train-mode clean forward with graph (used only for the clean-accuracy metric), ``skip`` omits it.
"""
from __future__ import annotations

import time
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


def digits_tensors(split: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """The embedded digits split as float images in [0, 1] (N, 3, 32, 32) and int64 labels.

    Equal to what train.py / validate.py feed the model with ``--no-aug``, 32 px and crop 1.0
    (the images are already 32x32, so resize and center crop are identities).
    """
    from src.data import DigitsDataset

    ds = DigitsDataset(split)
    x = torch.from_numpy(ds.images).permute(0, 3, 1, 2).float().div_(255)
    return x.contiguous(), torch.from_numpy(ds.targets).long()


def pgd_linf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step_size: float,
             steps: int) -> torch.Tensor:
    """L-inf PGD from a uniform random start; the loss is NLL-sum of log-softmax, gradients w.r.t. x only."""
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp_(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.nll_loss(F.log_softmax(model(x_adv), dim=-1), y, reduction="sum")
        grad, = torch.autograd.grad(loss, x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + step_size * grad.sign(), x - eps), x + eps).clamp_(0, 1)
    return x_adv.detach()


def train_epoch(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                eps: float, steps: int, clean_logits: str = "train",
                generator: Optional[torch.Generator] = None) -> Dict[str, float]:
    """One epoch of PGD-k adversarial training (eval-mode attack) over full batches; returns metrics."""
    step_size = 1.5 * eps / steps if steps else 0.0
    order = torch.randperm(len(y), generator=generator)
    loss_sum = torch.zeros((), dtype=torch.float64)
    robust = torch.zeros((), dtype=torch.float64)
    correct = torch.zeros((), dtype=torch.float64)
    n = 0
    for start in range(0, len(y) - batch_size + 1, batch_size):
        idx = order[start:start + batch_size]
        xb, yb = x[idx], y[idx]
        model.eval()
        xb_adv = pgd_linf(model, xb, yb, eps, step_size, steps) if steps else xb
        model.train()
        logits = model(xb) if clean_logits == "train" else None  # the original's: graph kept until backward
        logits_adv = model(xb_adv)
        loss = F.cross_entropy(logits_adv, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += loss.detach().double() * len(yb)
        robust += (logits_adv.detach().argmax(1) == yb).sum()
        if logits is not None:
            correct += (logits.detach().argmax(1) == yb).sum()
        n += len(yb)
    top1 = 100.0 * float(correct) / max(n, 1) if clean_logits == "train" else float("nan")
    return {"loss": float(loss_sum) / max(n, 1), "top1": top1, "robust_top1": 100.0 * float(robust) / max(n, 1),
            "count": n}


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, eps: float,
             steps: int, step_size: Optional[float] = None) -> Dict[str, float]:
    """Clean and PGD-k accuracy over full batches (the CLIs also evaluate full batches only)."""
    step_size = step_size if step_size is not None else (1.5 * eps / steps if steps else 0.0)
    model.eval()
    correct = robust = n = 0
    for start in range(0, len(y) - batch_size + 1, batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        with torch.no_grad():
            correct += int((model(xb).argmax(1) == yb).sum())
        if steps:
            with torch.enable_grad():
                xb_adv = pgd_linf(model, xb, yb, eps, step_size, steps)
            with torch.no_grad():
                robust += int((model(xb_adv).argmax(1) == yb).sum())
        n += len(yb)
    return {"top1": 100.0 * correct / n, "robust_top1": 100.0 * robust / n if steps else float("nan"), "count": n}


def train_run(model_name: str, batch_size: int, eval_batch_size: int, eps: float, steps: int, lr: float,
              clean_logits: str, checkpoint_path: str, seed: int = 0) -> Dict[str, float]:
    """A whole one-epoch run, like ``train.py --epochs 1``: build, train, evaluate, save; with the wall
    and CPU seconds of each part (``<part>_wall_s`` / ``<part>_cpu_s``) and of the whole (``total_*``)."""
    from timm.optim import create_optimizer_v2

    from bench_common import create_model

    clocks = [(time.perf_counter(), time.process_time())]
    torch.manual_seed(seed)
    model = create_model(model_name, num_classes=10, img_size=32)
    opt = create_optimizer_v2(model, "sgd", lr=lr, weight_decay=1e-4, momentum=0.9)
    x_train, y_train = digits_tensors("train")
    x_val, y_val = digits_tensors("validation")
    gen = torch.Generator().manual_seed(seed)
    clocks.append((time.perf_counter(), time.process_time()))
    train_metrics = train_epoch(model, opt, x_train, y_train, batch_size, eps, steps, clean_logits, gen)
    clocks.append((time.perf_counter(), time.process_time()))
    eval_metrics = evaluate(model, x_val, y_val, eval_batch_size, eps, steps)
    clocks.append((time.perf_counter(), time.process_time()))
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 0}, checkpoint_path)
    clocks.append((time.perf_counter(), time.process_time()))
    out: Dict = {"train": train_metrics, "eval": eval_metrics}
    for i, part in enumerate(["setup", "train_epoch", "eval", "save"]):
        out[f"{part}_wall_s"] = clocks[i + 1][0] - clocks[i][0]
        out[f"{part}_cpu_s"] = clocks[i + 1][1] - clocks[i][1]
    out["total_wall_s"] = clocks[-1][0] - clocks[0][0]
    out["total_cpu_s"] = clocks[-1][1] - clocks[0][1]
    return out
