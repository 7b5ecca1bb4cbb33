"""End-to-end training on the embedded digits data: outputs, checkpoints, resume, fsspec, DDP, W&B."""
import csv
import io
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from src import storage
from src.bits.summary import SUMMARY_COLUMNS
from tests.conftest import ROOT, TINY_TRAIN, run_train

CKPT_KEYS = {"epoch", "step_count", "step_count_global", "model", "model_ema", "train_cfg", "optimizer",
             "version", "arch", "hparams", "metrics", "metric_name", "metric_decreasing"}


def _load(path):
    with storage.open_file(path, "rb") as f:
        return torch.load(f, map_location="cpu", weights_only=True)


def _rows(path):
    return list(csv.DictReader(io.StringIO(storage.read_text(path))))


@pytest.fixture(scope="module")
def three_epoch_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    # the original's layout (optimizer in every checkpoint), so a checkpoint-<epoch> resumes exactly
    res = run_train(TINY_TRAIN + ["--epochs", "3", "--output", str(out), "--experiment", "run",
                                  "--model-ema", "--model-ema-decay", "0.9", "--checkpoint-full-state"])
    return res


def test_outputs_and_formats(three_epoch_run):
    d = three_epoch_run["output_dir"]
    names = set(os.listdir(d))
    assert {"args.yaml", "summary.csv", "last.pth.tar", "best.pth.tar", "checkpoint-0.pth.tar",
            "checkpoint-1.pth.tar", "checkpoint-2.pth.tar"} <= names
    assert not any(n.startswith(".") and "tmp" in n for n in names)  # no temporary files left behind
    args = yaml.safe_load(open(os.path.join(d, "args.yaml")))
    assert args["model"] == "test_vit" and args["epochs"] == 3
    with open(os.path.join(d, "summary.csv")) as f:
        header = f.readline().strip().split(",")
    assert header == SUMMARY_COLUMNS
    rows = _rows(os.path.join(d, "summary.csv"))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    for r in rows:
        assert r["train_robust_top1"] == "nan" and r["eval_robust_top1"] == "nan"  # clean training
        assert 0 <= float(r["eval_top1"]) <= 100
    ck = _load(os.path.join(d, "last.pth.tar"))
    assert CKPT_KEYS <= set(ck)
    assert ck["epoch"] == 2 and ck["version"] == 3 and ck["arch"] == "test_vit"
    assert ck["model_ema"] is not None and ck["metric_name"] == "top1" and ck["metric_decreasing"] is False
    assert set(ck["train_cfg"]) == {"num_epochs", "log_interval", "recovery_interval", "accumulate_steps"}
    assert set(ck["metrics"]) == {"loss", "top1", "robust_top1"}
    assert not any(k.startswith(("module.", "model.")) for k in ck["model"])
    # the classifier learns something in 3 epochs (10 classes: chance is 10%)
    assert float(rows[-1]["eval_top1"]) > 30
    best = _load(os.path.join(d, "best.pth.tar"))
    best_top1 = max(float(r["eval_top1"]) for r in rows)
    assert best["metrics"]["top1"] == pytest.approx(best_top1)


def test_checkpoint_hist_keeps_top_n(tmp_path):
    res = run_train(TINY_TRAIN + ["--epochs", "3", "--output", str(tmp_path), "--experiment", "h",
                                  "--checkpoint-hist", "1"])
    d = res["output_dir"]
    kept = [n for n in os.listdir(d) if n.startswith("checkpoint-")]
    assert len(kept) == 1
    rows = _rows(os.path.join(d, "summary.csv"))
    best_epoch = max(rows, key=lambda r: float(r["eval_top1"]))["epoch"]
    assert kept == [f"checkpoint-{best_epoch}.pth.tar"]


def test_resume_matches_uninterrupted_run(three_epoch_run, tmp_path):
    src_dir = three_epoch_run["output_dir"]
    d = tmp_path / "resumed"
    d.mkdir()
    for n in ("args.yaml", "summary.csv", "checkpoint-1.pth.tar"):
        shutil.copy(os.path.join(src_dir, n), d / n)
    res = run_train(TINY_TRAIN + ["--epochs", "3", "--model-ema", "--model-ema-decay", "0.9",
                                  "--resume", str(d / "checkpoint-1.pth.tar")])
    assert res["output_dir"] == str(d)
    a, b = _load(os.path.join(src_dir, "last.pth.tar")), _load(str(d / "last.pth.tar"))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["model_ema"]:
        assert torch.equal(a["model_ema"][k], b["model_ema"][k]), k
    assert a["step_count_global"] == b["step_count_global"]
    ra, rb = _rows(os.path.join(src_dir, "summary.csv")), _rows(str(d / "summary.csv"))
    assert ra == rb  # same rows, no duplicated or missing epoch


def test_memory_output_same_files(tmp_path):
    res = run_train(TINY_TRAIN + ["--epochs", "1", "--output", "memory://runs", "--experiment", "m"])
    d = res["output_dir"]
    assert d.startswith("memory://")
    names = set(storage.listdir(d))
    assert {"args.yaml", "summary.csv", "last.pth.tar", "best.pth.tar", "checkpoint-0.pth.tar"} <= names
    assert _rows(storage.join(d, "summary.csv"))[0]["epoch"] == "0"
    assert CKPT_KEYS <= set(_load(storage.join(d, "last.pth.tar")))


def test_experiment_folder_suffixes(tmp_path):
    r1 = run_train(TINY_TRAIN + ["--epochs", "1", "--output", str(tmp_path), "--experiment", "e"])
    r2 = run_train(TINY_TRAIN + ["--epochs", "1", "--output", str(tmp_path), "--experiment", "e"])
    assert r1["output_dir"].endswith("e") and r2["output_dir"].endswith("e-1")
    r3 = run_train(TINY_TRAIN + ["--epochs", "1", "--output", str(tmp_path)])
    assert "test_vit-32" in os.path.basename(r3["output_dir"])


def test_wandb_offline_logs_and_appends_url(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    res = run_train(TINY_TRAIN + ["--epochs", "1", "--output", str(tmp_path), "--experiment", "wb", "--log-wandb"])
    text = open(os.path.join(res["output_dir"], "args.yaml")).read()
    assert "wandb_run:" in yaml.safe_load(text) or "wandb_run:" in text
    assert os.path.isdir(os.path.join(res["output_dir"], "wandb"))


def _torchrun(args, nproc):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "train.py"] + args
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow  # the integration lane (make test-slow): keeps the main suite within its budget
def test_two_process_gloo_matches_single_process(tmp_path):
    # lr 0 keeps the weights fixed, so every reduced metric must equal the single-process one exactly
    common = TINY_TRAIN + ["--epochs", "1", "--lr", "0", "--warmup-lr", "0", "--min-lr", "0",
                           "--output", str(tmp_path)]
    single = run_train(common + ["-b", "50", "--experiment", "single"])
    out = _torchrun(common + ["-b", "25", "--experiment", "ddp"], 2)
    assert out.returncode == 0, out.stderr[-3000:]
    rows_single = _rows(os.path.join(single["output_dir"], "summary.csv"))
    rows_ddp = _rows(os.path.join(str(tmp_path), "ddp", "summary.csv"))
    for col in ("train_loss", "train_top1", "eval_loss", "eval_top1"):
        assert float(rows_ddp[0][col]) == pytest.approx(float(rows_single[0][col]), rel=1e-5, abs=1e-6), col


def test_eval_metric_top5_selects_checkpoints(tmp_path):
    """--eval-metric top5 is measured, so the top-N checkpoints and best.pth.tar are written."""
    res = run_train(TINY_TRAIN + ["--epochs", "1", "--output", str(tmp_path), "--experiment", "t5",
                                  "--eval-metric", "top5"])
    d = res["output_dir"]
    assert {"best.pth.tar", "checkpoint-0.pth.tar"} <= set(os.listdir(d))
    ck = _load(os.path.join(d, "best.pth.tar"))
    assert ck["metric_name"] == "top5" and set(ck["metrics"]) == {"loss", "top1", "robust_top1", "top5"}
    assert ck["metrics"]["top5"] >= ck["metrics"]["top1"]


def test_summary_png_is_drawn_every_epoch(three_epoch_run):
    """summary.png (accuracy, loss, eps, lr per epoch) is kept next to summary.csv."""
    import numpy as np
    from PIL import Image

    path = os.path.join(three_epoch_run["output_dir"], "summary.png")
    img = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    assert img.shape[0] > 200 and img.shape[1] > 400
    assert img.std() > 10  # not blank: curves, axes and labels were drawn


@pytest.mark.parametrize("extra, needle", [
    (["{tmp}/no_such_dir", "--dataset", ""], "data dir {tmp}/no_such_dir does not exist"),
    (["{tmp}", "--dataset", ""], "holds no image"),
    (["--combine-dataset", "torch/cifar10", "--combine-data-dir", "{tmp}/nothing_here"],
     "data dir {tmp}/nothing_here does not exist"),
    (["--adv-training", "no_such_module_xyz:MyLoss"], "cannot import"),
])
def test_bad_data_is_reported_before_the_model_is_built(tmp_path, monkeypatch, capsys, extra, needle):
    """With --pretrained the model's weights come first from the network: a wrong data dir was reported only
    after a minute of download retries offline (or a download of hundreds of MB)."""
    import train
    from src import setup_task
    from src.errors import run_cli

    def built(*_a, **_k):
        raise AssertionError("the model was built before the data was read")

    monkeypatch.setattr(setup_task, "create_model", built)
    argv = [a.format(tmp=tmp_path) for a in TINY_TRAIN + ["--epochs", "1", "--output", str(tmp_path / "out")] + extra]
    assert run_cli(train.main, argv) == 2
    err = capsys.readouterr().err
    assert needle.format(tmp=tmp_path) in err and "Traceback" not in err


@pytest.mark.parametrize("extra, needle", [
    (["--epochs", "2", "--warmup-epochs", "5"], "--warmup-epochs 5 is not below the 2 epochs of the schedule"),
    (["--epochs", "3", "--sched", "multistep", "--decay-milestones", "1", "5"], "--decay-milestones 5 at or after"),
    (["--epochs", "2", "--sched", "step", "--decay-epochs", "4"], "--decay-epochs 4 is not below the 2 epochs"),
    (["--adv-training", "pgd", "--attack-steps", "0"], "--attack-steps 0: training and the per-epoch robust_top1"),
    (["--adv-training", "pgd", "--attack-norm", "l2", "--attack-eps", "0.5"], "L2 eps 0.5/255"),
])
def test_schedule_and_attack_settings_that_leave_parts_unused_are_warned_about(extra, needle):
    from src.arg_parser import parse_args
    from src.setup_task import schedule_warnings

    args, _ = parse_args(TINY_TRAIN + extra)
    warnings = schedule_warnings(args)
    assert len(warnings) == 1 and needle in warnings[0], warnings
    args, _ = parse_args(TINY_TRAIN + ["--epochs", "2"])
    assert schedule_warnings(args) == []


@pytest.mark.parametrize("extra, needle", [
    (["--attack-eps", "8"], "--attack-eps 8.0 has no effect without --adv-training"),
    (["--eps-schedule", "linear"], "--eps-schedule linear has no effect without --adv-training"),
    (["--adv-training", "pgd", "--trades-beta", "3"], "--trades-beta 3.0 has no effect without --adv-training trades"),
    (["--finetuning-patch-size", "4"], "--finetuning-patch-size 4 has no effect without --finetune"),
    (["--aa", "rand-m9-mstd0.5"], "--aa rand-m9-mstd0.5 has no effect without training augmentation"),
])
def test_settings_the_original_configs_give_without_their_option_are_warned_about(extra, needle):
    """The original's configs set them (so they are not refused like --amp-dtype without --amp), but a value
    that changes nothing is said once, not silently dropped."""
    from src.arg_parser import parse_args
    from src.setup_task import unused_setting_warnings

    args, _ = parse_args(TINY_TRAIN + extra)  # TINY_TRAIN trains clean with --no-aug
    warnings = unused_setting_warnings(args)
    assert len(warnings) == 1 and needle in warnings[0], warnings
    args, _ = parse_args(TINY_TRAIN)
    assert unused_setting_warnings(args) == []
    args, _ = parse_args(["-c", os.path.join(ROOT, "configs", "quickstart.yaml")])
    assert unused_setting_warnings(args) == [] and schedule_warnings_of(args) == []


def schedule_warnings_of(args):
    from src.setup_task import schedule_warnings

    return schedule_warnings(args)
