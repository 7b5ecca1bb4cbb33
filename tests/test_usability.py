"""Small things a user hits, through the real CLIs (``run_cli``): each ends in one ``error:`` line
(exit code 2, no traceback) or one warning, and the README's measured numbers are rewritten only
between their markers."""
from __future__ import annotations

import csv
import importlib.util
import os
import urllib.error

import fsspec
import pytest
import torch
from fsspec.spec import AbstractFileSystem

import src.models  # noqa: F401 - registers the project's models
import train as train_cli
import validate as validate_cli
from src import storage
from src.errors import run_cli
from src.model_factory import check_model_name
from tests.conftest import ROOT, TINY_TRAIN

pytestmark = pytest.mark.usefixtures("single_cpu_thread")

EVAL = ["--dataset", "digits", "-m", "test_vit", "--num-classes", "10", "--input-size", "3", "32", "32",
        "--crop-pct", "1.0", "--interpolation", "bicubic", "-j", "0", "--log-freq", "0", "--no-normalize"]
SMOKE = ["--epochs", "1", "--max-train-steps", "2", "--val-num-samples", "100"]


def _cli(module, argv, capsys):
    rc = run_cli(module.main, [str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _one_error(rc: int, err: str, *words: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(lines) == 1, err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A test_vit state dict: validate.py needs weights, not a trained model, for these checks."""
    import timm

    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth.tar"
    model = timm.create_model("test_vit", num_classes=10, img_size=32)
    torch.save({"state_dict": model.state_dict()}, path)
    return str(path)


# ------------------------------------------------------------------------------------------------
# datasets
# ------------------------------------------------------------------------------------------------

def test_torchvision_dataset_without_its_files_is_one_error(tmp_path, capsys):
    empty = tmp_path / "data"
    empty.mkdir()
    rc, _, err = _cli(train_cli, [empty] + TINY_TRAIN + SMOKE + ["--dataset", "torch/cifar10",
                                                                 "--output", tmp_path / "out"], capsys)
    _one_error(rc, err, "torch/cifar10", str(empty), "download")


def test_dataset_download_offline_is_one_error(tmp_path, capsys, monkeypatch, tiny_ckpt):
    import torchvision.datasets.cifar as tv_cifar

    def offline(*args, **kwargs):
        raise urllib.error.URLError(OSError(-2, "Name or service not known"))

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    empty = tmp_path / "data"
    empty.mkdir()
    argv = [empty] + EVAL + ["--dataset", "torch/cifar10", "--dataset-download", "--checkpoint", tiny_ckpt]
    rc, _, err = _cli(validate_cli, argv, capsys)
    _one_error(rc, err, "cannot download", "torch/cifar10", "Name or service not known", "network")


# ------------------------------------------------------------------------------------------------
# outputs: memory:// and unreachable remote locations, checked before any work
# ------------------------------------------------------------------------------------------------

class UnreachableFS(AbstractFileSystem):
    """Stands for gs:// without network or credentials: every metadata call fails like a client."""

    protocol = "unreachable"
    calls = 0

    def info(self, path, **kwargs):
        UnreachableFS.calls += 1
        raise ConnectionError("Cannot connect to host storage.example:443")


@pytest.fixture
def unreachable_protocol():
    fsspec.register_implementation("unreachable", UnreachableFS, clobber=True)
    UnreachableFS.calls = 0
    return "unreachable"  # stays registered: a made-up protocol nothing else uses


def test_unreachable_output_fails_at_start_with_one_line(tmp_path, capsys, unreachable_protocol, monkeypatch):
    import src.trainer as trainer

    def no_training(*args, **kwargs):
        raise AssertionError("the run started although its output cannot be reached")

    monkeypatch.setattr(trainer, "resolve_output_dir", no_training)
    rc, _, err = _cli(train_cli, TINY_TRAIN + SMOKE + ["--output", "unreachable://bucket/runs"], capsys)
    _one_error(rc, err, "--output unreachable://bucket/runs", "cannot be reached", "Cannot connect")
    assert UnreachableFS.calls >= 1


def test_unreachable_results_file_fails_before_evaluating(capsys, unreachable_protocol, monkeypatch, tiny_ckpt):
    import src.validation as V

    monkeypatch.setattr(V, "validate", lambda *a, **k: pytest.fail("evaluated although the results file "
                                                                    "cannot be written"))
    argv = EVAL + ["--checkpoint", tiny_ckpt, "--results-file", "unreachable://bucket/r.json"]
    rc, _, err = _cli(validate_cli, argv, capsys)
    _one_error(rc, err, "--results-file unreachable://bucket/r.json", "cannot be reached")


class NoBucketFS(AbstractFileSystem):
    """A reachable store where nothing exists: the bucket of the output is missing."""

    protocol = "nobucket"

    def info(self, path, **kwargs):
        raise FileNotFoundError(path)


def test_missing_bucket_is_named():
    from src.errors import UsageError

    fsspec.register_implementation("nobucket", NoBucketFS, clobber=True)
    with pytest.raises(UsageError, match=r"--output nobucket://nope/runs: its bucket does not exist"):
        storage.check_output_location("nobucket://nope/runs", "--output")


def test_memory_output_of_a_run_warns_once(capsys):
    out_dir = f"memory://ux-{os.getpid()}/runs"
    rc, _, err = _cli(train_cli, TINY_TRAIN + SMOKE + ["--output", out_dir, "--experiment", "x"], capsys)
    assert rc == 0, err
    warns = [ln for ln in err.splitlines() if "memory://" in ln and "WARNING" in ln]
    assert len(warns) == 1 and "gone when the process exits" in warns[0] and "--output" in warns[0], err
    assert "Traceback" not in err
    assert storage.exists(storage.join(out_dir, "x", "summary.csv"))  # the run itself still writes there


def test_memory_results_file_warns_once(capsys, tiny_ckpt):
    path = f"memory://ux-{os.getpid()}/results.json"
    argv = EVAL + ["--checkpoint", tiny_ckpt, "-b", "100", "--num-examples", "100", "--results-file", path]
    rc, _, err = _cli(validate_cli, argv, capsys)
    assert rc == 0, err
    warns = [ln for ln in err.splitlines() if "memory://" in ln and "WARNING" in ln]
    assert len(warns) == 1 and "--results-file" in warns[0], err
    assert storage.exists(path)


# ------------------------------------------------------------------------------------------------
# bulk validation: where the table goes and how it is ranked
# ------------------------------------------------------------------------------------------------

def test_bulk_results_go_next_to_the_checkpoints_ranked_by_robust_accuracy(tmp_path, capsys, monkeypatch,
                                                                             tiny_ckpt):
    import shutil

    import timm

    folder = tmp_path / "ckpts"
    folder.mkdir()
    shutil.copy(tiny_ckpt, folder / "a.pth.tar")
    torch.manual_seed(3)  # a second, different model
    torch.save({"state_dict": timm.create_model("test_vit", num_classes=10, img_size=32).state_dict()},
               folder / "b.pth.tar")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    argv = EVAL + ["--checkpoint", folder, "-b", "100", "--num-examples", "100", "--attack", "pgd",
                   "--attack-eps", "8", "--attack-steps", "1"]
    rc, _, err = _cli(validate_cli, argv, capsys)
    assert rc == 0, err
    assert os.listdir(cwd) == []  # nothing in the current directory
    table = folder / "results-all.csv"
    assert f"the table goes to {table}" in err
    with open(table) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    robust = [float(r["robust_top1"]) for r in rows]
    assert robust == sorted(robust, reverse=True)


def test_bulk_ranking_uses_robust_accuracy_when_an_attack_ran(monkeypatch):
    import argparse

    import src.validation as V

    results = {"a": (90.0, 10.0), "b": (80.0, 50.0), "c": (85.0, 30.0)}

    def fake_run(fn, job_args):
        top1, robust = results[job_args.checkpoint]
        return argparse.Namespace(rows=[dict(top1=top1, robust_top1=robust)], row_warnings=[[]], model_name="m")

    monkeypatch.setattr(V, "retry_smaller_batch", fake_run)
    args = argparse.Namespace(model="m", checkpoint="", pretrained=False)
    rows, _, _ = V.validate_bulk(args, [("m", c) for c in results], None)
    assert [r["checkpoint"] for r in rows] == ["b", "c", "a"]
    results.update(a=(90.0, float("nan")), b=(80.0, float("nan")), c=(85.0, float("nan")))  # clean only
    rows, _, _ = V.validate_bulk(args, [("m", c) for c in results], None)
    assert [r["checkpoint"] for r in rows] == ["a", "c", "b"]


# ------------------------------------------------------------------------------------------------
# model names
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("typed, meant", [("resnet_18", "resnet18"), ("ResNet-18", "resnet18"),
                                          ("xcit_smal_12_p16_224", "xcit_small_12_p16_224"),
                                          ("resnett50", "resnet50")])
def test_unknown_model_suggests_the_obvious_name(typed, meant):
    from src.errors import UsageError

    with pytest.raises(UsageError) as e:
        check_model_name(typed)
    similar = str(e.value).split("(similar: ")[1].rstrip(")").split(", ")
    assert similar[0] == meant, str(e.value)


def test_unknown_model_through_the_cli(tmp_path, capsys):
    rc, _, err = _cli(train_cli, TINY_TRAIN + SMOKE + ["--model", "resnet_18", "--output", tmp_path], capsys)
    _one_error(rc, err, "unknown model 'resnet_18'", "similar: resnet18")


# ------------------------------------------------------------------------------------------------
# util_scripts/readme_numbers.py: the README rewriting (no training)
# ------------------------------------------------------------------------------------------------

def _readme_numbers():
    spec = importlib.util.spec_from_file_location("readme_numbers", os.path.join(ROOT, "util_scripts",
                                                                                 "readme_numbers.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_blocks_are_replaced_between_their_markers_only():
    rn = _readme_numbers()
    text = ("intro 1.00 %\n<!-- readme-numbers:demo -->\nold 96.97 %\n<!-- /readme-numbers:demo -->\nmiddle\n"
            "<!-- readme-numbers:validate -->\n<!-- /readme-numbers:validate -->\nend\n")
    out = rn.replace_block(text, "demo", "new 95.00 %\n")
    out = rn.replace_block(out, "validate", "clean 94.00 %")
    assert out == ("intro 1.00 %\n<!-- readme-numbers:demo -->\nnew 95.00 %\n<!-- /readme-numbers:demo -->\n"
                   "middle\n<!-- readme-numbers:validate -->\nclean 94.00 %\n<!-- /readme-numbers:validate -->\n"
                   "end\n")
    assert rn.replace_block(out, "demo", "new 95.00 %") == out  # idempotent
    with pytest.raises(ValueError):
        rn.replace_block("no markers here", "demo", "x")
    with pytest.raises(ValueError):  # two blocks of one name: ambiguous, never rewritten
        rn.replace_block(text + text, "demo", "x")


def test_readme_number_blocks_from_measured_values():
    rn = _readme_numbers()
    demo = rn.demo_block(96.3, 67.68, 101.4, "Some CPU, 2 threads", "2026-01-02")
    assert "| 96.30 % | 67.68 % | 101 s" in demo and "Some CPU, 2 threads" in demo and "2026-01-02" in demo
    warning = ("robust accuracy still falls from pgd-2 (68.01%) to pgd-20 (61.62%), beyond noise (6.39 > 2.71 "
               "points): the attack has not converged (too few steps), so 61.62% overstates robustness")
    rows = [{"attack_steps": 2, "top1": 96.3, "robust_top1": 68.01, "warnings": [warning]},
            {"attack_steps": 20, "top1": 96.3, "robust_top1": 61.62, "warnings": [warning]}]
    text = rn.validate_block(rows, 297, 35.2, "Some CPU, 2 threads", "2026-01-02")
    assert "clean 96.30 %, PGD-2 68.01 %, PGD-20 61.62 %" in text
    assert "overstates robustness by 6.39 points (noise 2.71)" in text and "297 validation images" in text


def test_the_readme_has_both_marked_blocks():
    rn = _readme_numbers()
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    # demo and validate are written by util_scripts/readme_numbers.py, speed by benchmarks/summarize.py
    for name in ("demo", "validate", "speed"):
        assert rn.replace_block(text, name, "x").count("<!-- readme-numbers:") == 3
