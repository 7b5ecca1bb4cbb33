"""Inputs that used to end in a traceback, a hang or an overwritten file (issue: reliability II, items
2 and 6): a resume with another optimizer or a damaged step count, invalid normalization metadata,
--valid-labels past the class count, a FIFO as --checkpoint, a --results-file that is not a results file.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from src.errors import run_cli
from tests.conftest import TINY_TRAIN, run_train

pytestmark = pytest.mark.usefixtures("single_cpu_thread")

EVAL = ["--dataset", "digits", "-m", "test_vit", "--num-classes", "10", "--input-size", "3", "32", "32", "-j", "0",
        "--num-examples", "50", "-b", "50", "--log-freq", "0"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    res = run_train(TINY_TRAIN + ["--epochs", "1", "--opt", "sgd", "--lr", "0.01", "--output", str(out),
                                  "--experiment", "a"])
    return res["output_dir"]


def _cli(module, argv, capsys):
    rc = run_cli(module.main, list(argv))
    err = capsys.readouterr().err
    return rc, err


def _one_clean_error(rc, err, *words):
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], lines[0]


def _hashes(folder):
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}


@pytest.mark.parametrize("opt", ["adamw", "adam", "lamb"])
def test_resume_with_another_optimizer_is_one_error(run_dir, opt, capsys):
    import train

    before = _hashes(run_dir)
    argv = TINY_TRAIN + ["--epochs", "2", "--opt", opt, "--resume", os.path.join(run_dir, "last.pth.tar")]
    _one_clean_error(*_cli(train, argv, capsys), "optimizer 'sgd'", "--no-resume-opt")
    assert _hashes(run_dir) == before


@pytest.mark.parametrize("key,value", [("epoch", "x"), ("epoch", 1.5), ("epoch", -3), ("step_count_global", "7")])
def test_damaged_step_counts_in_a_resume_checkpoint(run_dir, tmp_path, key, value, capsys):
    import train

    ck = torch.load(os.path.join(run_dir, "last.pth.tar"), weights_only=True)
    ck[key] = value
    bad = str(tmp_path / "bad.pth.tar")
    torch.save(ck, bad)
    argv = TINY_TRAIN + ["--epochs", "2", "--opt", "sgd", "--resume", bad, "--output", str(tmp_path / "o")]
    _one_clean_error(*_cli(train, argv, capsys), key)


@pytest.mark.parametrize("meta", [
    {"mean": "[0.5, 0.5]", "std": "[0.5, 0.5, 0.5]"},
    {"mean": "[0.5, 0.5, 0.5]", "std": "[0.5, 0, 0.5]"},
    {"mean": "[0.5, NaN, 0.5]", "std": "[0.5, 0.5, 0.5]"},
    {"mean": "not json", "std": "[1]"},
])
def test_invalid_safetensors_normalization_metadata(tmp_path, meta, capsys):
    import timm
    from safetensors.torch import save_file

    import validate

    sd = {k: v.contiguous() for k, v in timm.create_model("test_vit", num_classes=10, img_size=32).state_dict().items()}
    path = str(tmp_path / "m.safetensors")
    save_file(sd, path, metadata=meta)
    _one_clean_error(*_cli(validate, EVAL + ["--checkpoint", path], capsys), "m")


@pytest.mark.parametrize("labels", [[0, 1, 10], [3, -1], [99]])
def test_valid_labels_past_the_class_count(run_dir, tmp_path, labels, capsys):
    import validate

    f = tmp_path / "labels.txt"
    f.write_text("\n".join(str(i) for i in labels) + "\n")
    rc, err = _cli(validate, EVAL + ["--checkpoint", os.path.join(run_dir, "last.pth.tar"), "--valid-labels", str(f)],
                   capsys)
    _one_clean_error(rc, err, "--valid-labels", "classes")


def test_fifo_as_checkpoint_does_not_hang(tmp_path, capsys):
    import validate

    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    _one_clean_error(*_cli(validate, EVAL + ["--checkpoint", fifo], capsys), "not a regular file")


@pytest.mark.parametrize("name,content", [
    ("summary.csv", "epoch,train_loss,train_top1,train_robust_top1,train_eps,train_lr,eval_loss,eval_top1,"
                    "eval_robust_top1\n0,1,2,3,4,5,6,7,8\n"),
    ("last.pth.tar", None),
    ("notes.json", json.dumps({"author": "me"})),
    ("results.csv", "a,b\n1,2\n"),
])
def test_results_file_never_replaces_another_kind_of_file(run_dir, tmp_path, name, content, capsys):
    import validate

    target = tmp_path / name
    if content is None:
        target.write_bytes(open(os.path.join(run_dir, "last.pth.tar"), "rb").read())
    else:
        target.write_text(content)
    before = target.read_bytes()
    rc, err = _cli(validate, EVAL + ["--checkpoint", os.path.join(run_dir, "last.pth.tar"), "--attack", "pgd",
                                     "--attack-steps", "1", "--results-file", str(target)], capsys)
    _one_clean_error(rc, err, "--results-file", "not replaced")
    assert target.read_bytes() == before


def test_results_file_of_the_same_kind_is_replaced(run_dir, tmp_path, capsys):
    import validate

    for suffix in (".csv", ".json"):
        target = str(tmp_path / f"res{suffix}")
        argv = EVAL + ["--checkpoint", os.path.join(run_dir, "last.pth.tar"), "--results-file", target]
        assert _cli(validate, argv, capsys)[0] == 0
        assert _cli(validate, argv, capsys)[0] == 0  # its own earlier results: replaced


@pytest.mark.parametrize("opt", ["adamw", "sgd"])
def test_learning_rate_that_overflows_the_optimizer_step(tmp_path, opt, capsys):
    """lr 1e38 is a valid float32, but AdamW's step size lr / (1 - beta1) is not: torch raised 'value cannot be
    converted to type float without overflow' mid-step (a traceback); now the non-finite stop, one line."""
    import train

    rc, err = _cli(train, TINY_TRAIN + ["--epochs", "1", "--max-train-steps", "1", "--opt", opt, "--lr", "3e38",
                                        "--weight-decay", "3e38", "--output", str(tmp_path), "--experiment", "e"],
                   capsys)
    _one_clean_error(rc, err, "non-finite" if opt == "sgd" else "overflowed float32", "last good checkpoint")
    assert not any(n.endswith(".pth.tar") for n in os.listdir(tmp_path / "e"))


def test_resume_of_a_finished_run_that_would_train_nothing(run_dir, tmp_path, capsys):
    """Before: 'training epochs 1..0', args.yaml rewritten (or a new folder with --experiment), exit 0, nothing
    trained. --resume auto of a finished run stays a harmless no-op (re-running a job script)."""
    import train

    before = _hashes(run_dir)
    last = os.path.join(run_dir, "last.pth.tar")
    common = TINY_TRAIN + ["--opt", "sgd", "--lr", "0.01", "--epochs", "1", "--resume", last]
    rc, err = _cli(train, common, capsys)
    _one_clean_error(rc, err, "already trained 1 epochs", "schedule has 1", "--epochs")
    rc, err = _cli(train, common + ["--output", str(tmp_path), "--experiment", "other"], capsys)
    _one_clean_error(rc, err, "nothing to train")
    assert _hashes(run_dir) == before and not (tmp_path / "other").exists()
    out = os.path.dirname(run_dir)
    rc, err = _cli(train, TINY_TRAIN + ["--opt", "sgd", "--lr", "0.01", "--epochs", "1", "--resume", "auto",
                                        "--output", out, "--experiment", os.path.basename(run_dir)], capsys)
    assert rc == 0, err


@pytest.mark.parametrize("opt,betas,what", [("adamw", ["0.9", "0.99", "0.9"], "takes 2 betas, got 3"),
                                            ("adan", ["0.9", "0.99"], "takes 3 betas, got 2")])
def test_opt_betas_of_the_wrong_count_are_one_error(tmp_path, opt, betas, what, capsys):
    """timm kept the first two of three betas for AdamW without a word, and raised an IndexError for Adan with
    two; the count is checked against timm's optimizer registry before the optimizer is built."""
    import train

    rc, err = _cli(train, TINY_TRAIN + ["--epochs", "1", "--opt", opt, "--opt-betas", *betas, "--output",
                                        str(tmp_path), "--experiment", "e"], capsys)
    _one_clean_error(rc, err, "--opt-betas", what)
    assert not (tmp_path / "e").exists() or not any(n.endswith(".pth.tar") for n in os.listdir(tmp_path / "e"))


def test_optimizer_options_the_optimizer_ignores_are_named(caplog):
    """SGD has neither betas nor eps: timm drops them silently; the run says so (a warning, as the original's
    resnet config sets opt_eps with sgd and must still run)."""
    import argparse
    import logging

    from src import setup_task

    model = torch.nn.Linear(3, 2)
    args = argparse.Namespace(opt="sgd", opt_betas=[0.5, 0.6], opt_eps=1e-3, lr=0.1, weight_decay=0.0,
                              momentum=0.9)
    with caplog.at_level(logging.WARNING, logger="robust_vits"):
        opt = setup_task.create_optimizer(args, model)
    assert "--opt-betas 0.5 0.6 and --opt-eps 0.001: no effect with optimizer 'sgd'" in caplog.text
    assert "betas" not in opt.defaults
    caplog.clear()
    args = argparse.Namespace(opt="lookahead_adamw", opt_betas=[0.5, 0.6], opt_eps=1e-3, lr=0.1, weight_decay=0.0,
                              momentum=0.9)
    with caplog.at_level(logging.WARNING, logger="robust_vits"):
        opt = setup_task.create_optimizer(args, model)
    assert "no effect" not in caplog.text
    assert tuple(opt.param_groups[0]["betas"]) == (0.5, 0.6)
