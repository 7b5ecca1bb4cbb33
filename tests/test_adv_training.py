"""Adversarial training end to end on digits: it buys robustness, logs eps, selects by robust accuracy."""
import csv
import os

import pytest
import torch
import torch.nn as nn

import tests.tiny_models  # noqa: F401  (registers tiny_cnn_test)
from src import storage
from src.attacks import make_attack
from src.bits.device import DeviceEnv
from src.data import DigitsDataset, build_eval_transform, create_loader
from src.engine import evaluate
from src.errors import UsageError
from tests.conftest import TINY_TRAIN, run_train

pytestmark = pytest.mark.slow  # the integration lane, `make test-slow` (a separate CI step)

EPS = 32  # /255: at the paper's 8/255 blurry digits barely separate the methods (see DESIGN.md)
BASE = TINY_TRAIN + ["--model", "tiny_cnn_test", "--lr", "1e-2", "--epochs", "4", "--attack-eps", str(EPS),
                     "--attack-steps", "2"]


def _robust_acc(ckpt_path, steps=10):
    import timm

    model = timm.create_model("tiny_cnn_test", num_classes=10)
    model.load_state_dict(torch.load(ckpt_path, weights_only=True)["model"])
    ds = DigitsDataset("validation", transform=build_eval_transform(
        {"input_size": (3, 32, 32), "crop_pct": 1.0, "interpolation": "bicubic"}))
    loader = create_loader(ds, 100, False)
    eps = EPS / 255
    attack = make_attack("pgd", eps, 2.5 * eps / steps, steps, "linf", (0, 1), nn.NLLLoss(reduction="sum"))
    torch.manual_seed(0)
    return evaluate(model, loader, DeviceEnv(torch.device("cpu")), attack=attack)


@pytest.fixture(scope="module")
def adv_and_clean(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("adv"))
    adv = run_train(BASE + ["--adv-training", "pgd", "--eps-schedule", "linear", "--eps-schedule-period", "2",
                            "--eval-metric", "robust_top1", "--output", out, "--experiment", "adv"])
    clean = run_train(BASE + ["--output", out, "--experiment", "clean"])
    return adv, clean


def test_adversarial_training_buys_robustness(adv_and_clean):
    adv, clean = adv_and_clean
    r_adv = _robust_acc(os.path.join(adv["output_dir"], "last.pth.tar"))
    r_clean = _robust_acc(os.path.join(clean["output_dir"], "last.pth.tar"))
    # same model, data, epochs and eval attack (PGD-10, eps 32/255)
    assert r_clean["top1"] > 80 and r_adv["top1"] > 60
    assert r_adv["robust_top1"] > r_clean["robust_top1"] + 25, (r_adv, r_clean)


def test_summary_logs_eps_schedule_and_robust_columns(adv_and_clean):
    adv, _ = adv_and_clean
    rows = list(csv.DictReader(open(os.path.join(adv["output_dir"], "summary.csv"))))
    # linear warm-up over 2 epochs, logged in /255 units like the original
    assert [float(r["train_eps"]) for r in rows] == [0.0, EPS / 2, EPS, EPS]
    for r in rows[1:]:
        assert 0 <= float(r["train_robust_top1"]) <= 100 and 0 <= float(r["eval_robust_top1"]) <= 100
        assert float(r["eval_robust_top1"]) <= float(r["eval_top1"])
    best = torch.load(os.path.join(adv["output_dir"], "best.pth.tar"), weights_only=True)
    assert best["metric_name"] == "robust_top1"
    assert best["metrics"]["robust_top1"] == pytest.approx(max(float(r["eval_robust_top1"]) for r in rows))


def test_trades_and_clean_logit_options_run(tmp_path):
    common = TINY_TRAIN + ["--model", "tiny_cnn_test", "--epochs", "1", "--attack-eps", "8", "--attack-steps", "1",
                           "--output", str(tmp_path)]
    r = run_train(common + ["--adv-training", "trades", "--experiment", "trades"])
    assert 0 <= r["train"]["robust_top1"] <= 100 and 0 <= r["eval"]["robust_top1"] <= 100
    r = run_train(common + ["--adv-training", "pgd", "--adv-clean-logits", "skip", "--experiment", "skip"])
    assert r["train"]["top1"] != r["train"]["top1"]  # NaN: clean logits were not computed
    r = run_train(common + ["--adv-training", "pgd", "--adv-clean-logits", "nograd", "--attack-mode", "train",
                            "--experiment", "nograd"])
    assert 0 <= r["train"]["top1"] <= 100


def test_custom_loss_plugin(tmp_path):
    import tests.plugin_losses as plugin

    plugin.CALLS["forward"] = 0
    r = run_train(TINY_TRAIN + ["--model", "tiny_cnn_test", "--epochs", "2", "--attack-eps", "8",
                                "--adv-training", "tests.plugin_losses:FGSMLoss", "--output", str(tmp_path)])
    assert plugin.CALLS["forward"] == 2 * (1500 // 50) and plugin.CALLS["epochs"] == {0, 1}
    assert r["train"]["top1"] != r["train"]["top1"]  # the plugin returned no clean logits
    assert 0 <= r["train"]["robust_top1"] <= 100


@pytest.mark.parametrize("spec,match", [
    ("nosuchmodule:Loss", "cannot import"),
    ("tests.plugin_losses:Nope", "not an nn.Module"),
    ("fgsm", "pgd, trades, module.path:ClassName or path/to/file.py:ClassName"),
])
def test_bad_loss_spec(tmp_path, spec, match):
    with pytest.raises(UsageError, match=match):
        run_train(TINY_TRAIN + ["--model", "tiny_cnn_test", "--epochs", "1", "--adv-training", spec,
                                "--output", str(tmp_path)])


def test_finetune_through_train_py(tmp_path):
    """--finetune: every feature weight is loaded, the 12-class head is replaced by a 10-class one."""
    common = TINY_TRAIN + ["--model", "tiny_cnn_test", "--epochs", "1", "--output", str(tmp_path)]
    src_run = run_train(common + ["--num-classes", "12", "--experiment", "pre"])
    pre = torch.load(os.path.join(src_run["output_dir"], "last.pth.tar"), weights_only=True)["model"]
    # lr 0: the parameters after one epoch are exactly the loaded ones
    ft = run_train(common + ["--num-classes", "10", "--finetune", os.path.join(src_run["output_dir"], "last.pth.tar"),
                             "--lr", "0", "--warmup-lr", "0", "--min-lr", "0", "--experiment", "ft"])
    post = torch.load(os.path.join(ft["output_dir"], "last.pth.tar"), weights_only=True)["model"]
    assert post["fc.weight"].shape == (10, 64) and pre["fc.weight"].shape == (12, 64)
    for k, v in pre.items():
        if k.startswith("features.") and "running" not in k and "num_batches" not in k:
            assert torch.equal(v, post[k]), k


def test_amp_bfloat16_and_channels_last_on_cpu(tmp_path):
    """--amp (bfloat16 autocast on the CPU) and --channels-last train and evaluate adversarially."""
    r = run_train(TINY_TRAIN + ["--model", "tiny_cnn_test", "--epochs", "1", "--amp", "--channels-last",
                                "--adv-training", "pgd", "--attack-eps", "8", "--attack-steps", "1",
                                "--output", str(tmp_path)])
    assert 0 <= r["eval"]["top1"] <= 100 and 0 <= r["eval"]["robust_top1"] <= r["eval"]["top1"]
    ck = torch.load(os.path.join(r["output_dir"], "last.pth.tar"), weights_only=True)
    assert all(v.dtype == torch.float32 for k, v in ck["model"].items() if v.is_floating_point())
