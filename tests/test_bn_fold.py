"""--fold-bn (src/bn_fold.py): eval-mode BatchNorm folded into the convolution before it computes the same
function and crafts the same adversarial examples; what cannot be folded is left alone, and a fold that does
not reproduce the model's output on the probe batch is undone.

Tolerance of the robust-accuracy comparison: as in tests/test_fast_paths.py, 3 standard errors of the
difference of two binomial estimates (the folded attack differs only in float32 rounding, so nearly every
pixel of its examples is identical as well).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import tests.tiny_models  # noqa: F401  (registers tiny_cnn_test)
from src import bn_fold
from src.bits.device import DeviceEnv
from src.errors import run_cli
from tests.test_fast_paths import CPU, _craft, _robust_acc, _tolerance, eps_and_fp32, fixed_model, val  # noqa: F401
from tests.test_validate_robustbench import baseline, cifar  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_cpu_thread")


def _randomize_bn(model):
    """Running statistics and affine parameters far from the identity, so a wrong fold shows."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            if m.weight is not None:
                m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


def _count_bn(model):
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0"])
def test_folded_model_is_the_same_function_and_has_the_same_input_gradient(name):
    """resnet18: Conv2d -> BatchNorm2d; efficientnet_b0: timm's BatchNormAct2d (its activation is kept)."""
    import timm

    torch.manual_seed(0)
    model = _randomize_bn(timm.create_model(name, num_classes=10))
    ref = copy.deepcopy(model)
    n_bn = _count_bn(model)
    report = bn_fold.fold_batchnorm(model, torch.rand(2, 3, 32, 32))
    assert (report.folded, report.batchnorms) == (n_bn, n_bn)
    assert _count_bn(model) == 0
    x = torch.rand(8, 3, 32, 32, requires_grad=True)
    y = torch.randint(0, 10, (8,))
    out_ref, out = ref(x), model(x)
    assert float((out - out_ref).abs().max().detach()) <= 1e-5 * (float(out_ref.abs().max().detach()) + 1)
    g_ref, = torch.autograd.grad(nn.functional.cross_entropy(out_ref, y), x)
    g, = torch.autograd.grad(nn.functional.cross_entropy(out, y), x)
    assert float((g - g_ref).norm() / g_ref.norm()) < 1e-4
    assert float((g.sign() == g_ref.sign()).float().mean()) > 0.999


def test_folded_attack_crafts_the_same_examples(fixed_model, val, eps_and_fp32):  # noqa: F811
    x, y = val
    eps, acc32, _, x_adv32 = eps_and_fp32
    model = copy.deepcopy(fixed_model)
    report = bn_fold.fold_batchnorm(model, x[:2])
    assert report.folded == report.batchnorms == _count_bn(fixed_model) > 0
    x_adv = _craft(model, x, y, eps, DeviceEnv(CPU))
    acc = _robust_acc(fixed_model, x_adv, y)
    assert abs(acc - acc32) <= _tolerance(acc32, len(y)), (acc, acc32)
    assert float((x_adv - x_adv32).abs().le(1e-6).float().mean()) > 0.95


class _ConvUsedTwice(nn.Module):
    """The convolution's output feeds the BatchNorm and a skip connection: folding would change the skip."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(3)
        self.shared = nn.Conv2d(3, 3, 1)
        self.bn2 = nn.BatchNorm2d(3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        h = self.conv(x)
        h = self.bn(h) + h
        h = self.bn2(self.shared(h)) + self.shared(x)  # one module called twice
        return self.head(h.mean((2, 3)))


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = self.bn(self.conv(x))
        return x.mean((1, 2, 3))


def test_what_cannot_be_folded_is_left_alone():
    model = _randomize_bn(_ConvUsedTwice())
    before = copy.deepcopy(model.state_dict())
    report = bn_fold.fold_batchnorm(model, torch.rand(2, 3, 8, 8))
    assert report.folded == 0 and "no BatchNorm directly follows" in report.reason
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    report = bn_fold.fold_batchnorm(_randomize_bn(_Untraceable()), torch.rand(2, 3, 8, 8))
    assert report.folded == 0 and "torch.fx cannot trace" in report.reason
    assert bn_fold.fold_batchnorm(nn.Sequential(nn.Conv2d(3, 3, 1)), None).reason == "the model has no BatchNorm2d"
    # batch statistics in eval mode (track_running_stats=False) are not a fixed affine map
    seq = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, track_running_stats=False)).eval()
    assert bn_fold.fold_batchnorm(seq, torch.rand(2, 3, 4, 4)).folded == 0


def test_a_fold_that_changes_the_output_is_undone(monkeypatch):
    import timm

    model = _randomize_bn(timm.create_model("tiny_cnn_test", num_classes=10))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [type(m) for m in model.modules()]
    monkeypatch.setattr(bn_fold, "PROBE_RTOL", -1.0)  # any difference, even 0, counts as a change
    report = bn_fold.fold_batchnorm(model, torch.rand(2, 3, 32, 32))
    assert report.folded == 0 and "restored, not folded" in report.reason
    assert [type(m) for m in model.modules()] == modules
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training


def test_validate_fold_bn_reports_the_same_robust_accuracy(tmp_path, capsys):
    """validate.py --fold-bn on a BatchNorm model: the same numbers; on a model without BatchNorm: a warning."""
    import json

    import timm

    import validate

    torch.manual_seed(0)
    ckpt = tmp_path / "cnn.pth.tar"
    torch.save({"model": _randomize_bn(timm.create_model("tiny_cnn_test", num_classes=10)).state_dict()}, ckpt)
    base = ["--dataset", "digits", "--num-classes", "10", "--input-size", "3", "32", "32", "-j", "0",
            "--num-examples", "60", "-b", "30", "--log-freq", "0", "--attack", "pgd", "--attack-steps", "3",
            "--seed", "0"]
    results, logs = [], []
    for extra in ([], ["--fold-bn"]):
        rc = run_cli(validate.main, base + ["-m", "tiny_cnn_test", "--checkpoint", str(ckpt)] + extra)
        out, err = capsys.readouterr()
        assert rc == 0, err
        results.append(json.loads(out.split("--result\n", 1)[1]))
        logs.append(err)
    assert "--fold-bn" not in logs[0]
    assert "--fold-bn: 3 of the model's 3 BatchNorm layers folded" in logs[1]
    assert results[0]["top1"] == results[1]["top1"]
    assert abs(results[0]["robust_top1"] - results[1]["robust_top1"]) <= 100 * _tolerance(0.5, 60)
    vit = tmp_path / "vit.pth.tar"
    torch.save({"model": timm.create_model("test_vit", num_classes=10, img_size=32).state_dict()}, vit)
    rc = run_cli(validate.main, base + ["-m", "test_vit", "--checkpoint", str(vit), "--fold-bn"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "--fold-bn: nothing folded: the model has no BatchNorm2d" in err


def test_robustbench_fold_bn_is_part_of_the_configuration(baseline, cifar, tmp_path, capsys):  # noqa: F811
    """validate_robustbench.py --fold-bn: the same per-example results (the toy model has no BatchNorm: a
    warning says nothing was folded); resumable state of an unfolded run is not mixed with a folded one."""
    import os

    import validate_robustbench
    from src import robustbench
    from tests.test_validate_robustbench import _cifar_args, _read

    report, out = baseline
    folded = tmp_path / "folded.json"
    assert validate_robustbench.main(_cifar_args(cifar, folded, "--fold-bn")) == 0
    assert "--fold-bn: nothing folded: the model has no BatchNorm2d" in capsys.readouterr().err
    got = _read(folded)
    assert got["per_example"] == report["per_example"] and got["config_fingerprint"]["fold_bn"] is True
    state_dir = robustbench.default_state_dir(out)
    before = {n: open(os.path.join(state_dir, n)).read() for n in os.listdir(state_dir)}
    args = _cifar_args(cifar, tmp_path / "mixed.json", "--fold-bn", "--state-dir", state_dir)
    assert validate_robustbench.main(args) == 2
    assert "another configuration" in capsys.readouterr().err
    assert {n: open(os.path.join(state_dir, n)).read() for n in os.listdir(state_dir)} == before
