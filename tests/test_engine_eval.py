"""src.engine's evaluation loop: the one loop behind per-epoch evaluation and every evaluation CLI
(soft labels, top-1/top-5, train-mode crafting that restores only the BatchNorm statistics)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from src.bits.device import DeviceEnv
from src.engine import batchnorm_buffers, evaluate, evaluate_loop

CPU = DeviceEnv(torch.device("cpu"))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 7))


def _data(n: int = 12, batch: int = 4):
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 7, (n,), generator=g)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def _noise_attack(seen_modes):
    """A stand-in attack: runs the model (which in train mode updates BN statistics), then perturbs."""
    def attack(model, x, y):
        seen_modes.append(model.training)
        model(x + 0.5)  # a forward in train mode moves running_mean / running_var
        return (x + 0.1).clamp(0, 1)
    return attack


def test_train_mode_crafting_restores_batchnorm_statistics_only():
    model = _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    saved = batchnorm_buffers(model)
    assert {name for (_, name) in saved} == {"running_mean", "running_var", "num_batches_tracked"}
    assert {mod for (mod, _) in saved} == {"1"}  # the BatchNorm layer only: no weights are copied

    def no_state_dict(*_a, **_k):  # the old loop cloned the whole state_dict for every batch
        raise AssertionError("state_dict() must not be used per batch")

    model.state_dict = no_state_dict
    seen = []
    ev = evaluate_loop(model, _data(), CPU, _noise_attack(seen), attack_mode="train")
    del model.state_dict
    assert seen == [True, True, True] and not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    seen.clear()
    evaluate_loop(model, _data(), CPU, _noise_attack(seen), attack_mode="eval")
    assert seen == [False, False, False]
    assert ev.num_examples == 12 and ev.attacked


def test_soft_labels_top5_and_the_trainer_view():
    model = _net().eval()
    hard = _data()
    soft = [(x, nn.functional.one_hot(y, 7).float() * 0.9 + 0.1 / 7) for x, y in hard]
    a, b = evaluate_loop(model, hard, CPU), evaluate_loop(model, soft, CPU)
    assert (a.clean_correct1, a.clean_correct5, a.loss_sum) == (b.clean_correct1, b.clean_correct5, b.loss_sum)
    assert a.top1 <= a.top5 and a.topk == 5
    with torch.no_grad():
        logits = torch.cat([model(x) for x, _ in hard])
    labels = torch.cat([y for _, y in hard])
    assert a.top5 == pytest.approx(100 * logits.topk(5, 1).indices.eq(labels[:, None]).any(1).float().mean().item())
    out = evaluate(model, hard, CPU)
    assert out["top1"] == a.top1 and out["top5"] == a.top5 and out["robust_top1"] != out["robust_top1"]  # NaN
    assert set(out) == {"loss", "top1", "top5", "robust_top1", "robust_top5"}
