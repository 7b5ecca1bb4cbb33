"""Audit of how the CLIs load checkpoints: bad input is one ``error:`` line (exit 2), never a traceback
and never a silently wrong model.

* files of another kind (gzip, TorchScript, a zip that is no checkpoint) are named as such, not as a
  truncated or corrupt checkpoint;
* a weights entry holding junk (non-tensor values, another type, an empty EMA) names the entry;
* a ``.safetensors`` file whose ``eval_config`` metadata is not JSON stops the evaluation like any
  damaged record (it used to be ignored with a warning: the network was then evaluated with the
  model's default preprocessing);
* ``--resume`` loads the EMA weights with the same checks as the model's (it used to call
  ``load_state_dict`` directly: tracebacks for a shape mismatch or a ``module.`` prefix, and NaN
  EMA weights went unnoticed while they picked every best checkpoint);
* ``prepare_checkpoint.py`` refuses a record that contradicts the weights (a class count other than
  the classifier's, a patch size the network cannot take) instead of releasing a file that every
  evaluation CLI later fails on, far from the flag that caused it;
* ``--initial-checkpoint`` says which weights it started from (EMA ones when the file has them).
"""
from __future__ import annotations

import gzip
import io
import json
import logging
import zipfile
from collections import OrderedDict

import pytest
import timm
import torch
from safetensors.torch import save_file

import src.models  # noqa: F401 - registers the project's models
import train as train_cli
import validate as validate_cli
from src.checkpoint import CheckpointError, extract_state_dict, load_checkpoint_file
from src.errors import run_cli
from src.eval_config import read_record
from tests.conftest import TINY_TRAIN, run_train
from util_scripts import prepare_checkpoint

pytestmark = pytest.mark.usefixtures("single_cpu_thread")


def _vit_state_dict(seed: int = 0) -> "OrderedDict[str, torch.Tensor]":
    torch.manual_seed(seed)
    return timm.create_model("test_vit", num_classes=10, img_size=32).state_dict()


def _cli(main, argv, capsys):
    rc = run_cli(main, [str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _assert_one_error(rc, err, *needles):
    assert rc == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), err
    for needle in needles:
        assert needle in last, last
    return last


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A one-epoch test_vit run with EMA weights (its last.pth.tar has model, model_ema, optimizer)."""
    out = tmp_path_factory.mktemp("ckaudit")
    res = run_train(TINY_TRAIN + ["--epochs", "1", "--model-ema", "--output", str(out), "--experiment", "ema"])
    return res["output_dir"]


# ---------------------------------------------------------------------------- files of another kind


def test_files_of_another_kind_are_named_not_called_damaged(tmp_path):
    good = tmp_path / "good.pth.tar"
    torch.save(_vit_state_dict(), good)
    gz = tmp_path / "good.pth.tar.gz"
    gz.write_bytes(gzip.compress(good.read_bytes()))
    ts = tmp_path / "model.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(ts))
    other_zip = tmp_path / "weights.zip"
    with zipfile.ZipFile(other_zip, "w") as z:
        z.writestr("readme.txt", "not weights")
    for path, needle in ((gz, "gzip-compressed"), (ts, "TorchScript archive"),
                         (other_zip, "zip archive but not a PyTorch checkpoint")):
        for trust in (False, True):
            with pytest.raises(CheckpointError) as e:
                load_checkpoint_file(path, trust=trust)
            assert needle in str(e.value) and "corrupt" not in str(e.value), str(e.value)
    # a real checkpoint still loads, a truncated one is still called truncated
    assert set(load_checkpoint_file(good)) == set(_vit_state_dict())
    cut = tmp_path / "cut.pth.tar"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint_file(cut)


def test_validate_names_a_torchscript_file(tmp_path, capsys):
    ts = tmp_path / "model.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(ts))
    rc, _, err = _cli(validate_cli.main, ["--dataset", "digits", "-j", "0", "--checkpoint", ts], capsys)
    _assert_one_error(rc, err, str(ts), "TorchScript", "state_dict()")


# ---------------------------------------------------------------------------- junk in the weights' entry


def test_junk_in_the_weights_entry_is_named():
    sd = _vit_state_dict()
    junk = OrderedDict(sd)
    junk["note"] = "hello"
    with pytest.raises(CheckpointError, match=r"'model' entry holds 80 tensors and 1 other entries \(note \(str\)\)"):
        extract_state_dict({"model": junk, "epoch": 1}, source="x")
    with pytest.raises(CheckpointError, match=r"mixes 80 tensors with 1 other entries \(epoch \(int\)\)"):
        extract_state_dict({**sd, "epoch": 3}, source="x")
    with pytest.raises(CheckpointError, match="'model' entry is a str, not a state dict"):
        extract_state_dict({"model": "weights", "epoch": 1}, source="x")
    with pytest.raises(CheckpointError, match="'model_ema' entry is empty"):
        extract_state_dict({"model": sd, "model_ema": {}}, use_ema=True, source="x")
    with pytest.raises(CheckpointError, match="'model_ema' entry is a list"):
        extract_state_dict({"model": sd, "model_ema": [1, 2]}, use_ema=True, source="x")
    # what stays valid: no EMA (None) falls back to the model weights; a bare state dict
    assert extract_state_dict({"model": sd, "model_ema": None}, use_ema=True)[1]["state_key"] == "model"
    assert extract_state_dict(sd)[1]["state_key"] == "bare"


# ---------------------------------------------------------------------------- safetensors eval_config


def test_unreadable_safetensors_record_stops_the_evaluation(tmp_path, capsys):
    record = {"model": "test_vit", "num_classes": 10, "patch_size": None, "input_size": [3, 32, 32],
              "crop_pct": 1.0, "interpolation": "bicubic", "crop_mode": "center", "normalization": "raw",
              "mean": None, "std": None}
    good, bad = tmp_path / "good.safetensors", tmp_path / "bad.safetensors"
    save_file(_vit_state_dict(), str(good), metadata={"format": "pt", "eval_config": json.dumps(record)})
    save_file(_vit_state_dict(), str(bad), metadata={"format": "pt", "eval_config": json.dumps(record)[:-5]})
    assert read_record(load_checkpoint_file(good)).normalization == "raw"
    with pytest.raises(CheckpointError, match="'eval_config' metadata is not a JSON object"):
        read_record(load_checkpoint_file(bad), path=str(bad))
    # with the model flags given, the damaged file used to be evaluated with the loader normalizing
    rc, _, err = _cli(validate_cli.main, ["--dataset", "digits", "-j", "0", "--checkpoint", bad, "-m", "test_vit",
                                          "--num-classes", "10", "--img-size", "32"], capsys)
    _assert_one_error(rc, err, str(bad), "eval_config")


# ---------------------------------------------------------------------------- --resume and the EMA weights


def _damaged_ema(run, tmp_path, name, change):
    ck = torch.load(f"{run}/last.pth.tar", map_location="cpu", weights_only=True)
    ema = OrderedDict(ck["model_ema"])
    ck["model_ema"] = change(ema)
    path = tmp_path / f"{name}.pth.tar"
    torch.save(ck, path)
    return path


def _nan_head(ema):
    ema["head.weight"] = ema["head.weight"].clone()
    ema["head.weight"][0, 0] = float("nan")
    return ema


@pytest.mark.parametrize("name, change, needles", [
    ("nan", _nan_head, ("EMA weights", "non-finite", "head.weight")),
    ("shape", lambda e: OrderedDict({**e, "head.weight": torch.zeros(5, 64), "head.bias": torch.zeros(5)}),
     ("EMA weights", "shape mismatches", "head.weight")),
    ("junk", lambda e: "weights", ("EMA weights", "'model_ema' entry is a str")),
])
def test_resume_checks_the_ema_weights(run, tmp_path, capsys, name, change, needles):
    path = _damaged_ema(run, tmp_path, name, change)
    out = tmp_path / "out"
    rc, _, err = _cli(train_cli.main, TINY_TRAIN + ["--epochs", "2", "--model-ema", "--resume", path,
                                                    "--output", out, "--experiment", "r"], capsys)
    _assert_one_error(rc, err, str(path), *needles)
    assert not (out / "r" / "last.pth.tar").exists()


def test_resume_strips_a_wrapper_prefix_of_the_ema_weights(run, tmp_path, capsys):
    path = _damaged_ema(run, tmp_path, "prefixed", lambda e: OrderedDict(("module." + k, v) for k, v in e.items()))
    rc, _, err = _cli(train_cli.main, TINY_TRAIN + ["--epochs", "2", "--model-ema", "--resume", path,
                                                    "--output", tmp_path / "out", "--experiment", "r"], capsys)
    assert rc == 0, err
    saved = torch.load(tmp_path / "out" / "r" / "last.pth.tar", map_location="cpu", weights_only=True)
    assert saved["epoch"] == 1 and set(saved["model_ema"]) == set(saved["model"])


# ---------------------------------------------------------------------------- prepare_checkpoint's record


@pytest.mark.parametrize("flags, needles", [
    (["--num-classes", "5"], ("10-class classifier", "--num-classes 10")),
    (["--patch-size", "8"], ("--patch-size", "VisionTransformer")),
])
def test_export_refuses_a_record_that_contradicts_the_weights(run, tmp_path, capsys, flags, needles):
    out = tmp_path / "released"
    rc, _, err = _cli(prepare_checkpoint.main, ["--checkpoint", f"{run}/last.pth.tar", "--model", "test_vit",
                                                "--dataset", "digits", "--output-dir", out] + flags, capsys)
    _assert_one_error(rc, err, *needles)
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("dataset, needle", [
    ("imagenet", "--dataset imagenet has 1000 classes, but the model has 10"),
    ("CIFAR-100", "--dataset CIFAR-100 has 100 classes, but the model has 10"),
])
def test_export_refuses_a_dataset_name_with_another_class_count(run, tmp_path, capsys, dataset, needle):
    """The dataset name goes into the file name and the metadata: a 10-class model is not an ImageNet release."""
    out = tmp_path / "released"
    rc, _, err = _cli(prepare_checkpoint.main, ["--checkpoint", f"{run}/last.pth.tar", "--model", "test_vit",
                                                "--dataset", dataset, "--eps", "4", "--output-dir", out], capsys)
    _assert_one_error(rc, err, needle)
    assert not out.exists() or not any(out.iterdir())
    rc, _, err = _cli(prepare_checkpoint.main, ["--checkpoint", f"{run}/last.pth.tar", "--model", "test_vit",
                                                "--dataset", "cifar10", "--eps", "4", "--output-dir", out], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["test_vit-cifar10-eps-4.pth.tar",
                                                    "test_vit-cifar10-eps-4.safetensors"]


def test_export_replaces_only_its_own_earlier_release(run, tmp_path, capsys, caplog):
    """A file of the release's name that this tool did not write (here a training checkpoint copied there) was
    overwritten without a word; an earlier export is replaced with a warning."""
    out = tmp_path / "released"
    out.mkdir()
    argv = ["--checkpoint", f"{run}/last.pth.tar", "--model", "test_vit", "--dataset", "cifar10", "--output-dir", out]
    foreign = out / "test_vit-cifar10.pth.tar"
    foreign.write_bytes(open(f"{run}/checkpoint-0.pth.tar", "rb").read())
    before = foreign.read_bytes()
    rc, _, err = _cli(prepare_checkpoint.main, argv, capsys)
    _assert_one_error(rc, err, f"{foreign} exists and is not a release prepare_checkpoint.py wrote")
    assert foreign.read_bytes() == before and sorted(p.name for p in out.iterdir()) == [foreign.name]
    foreign.unlink()
    rc, _, err = _cli(prepare_checkpoint.main, argv, capsys)
    assert rc == 0, err
    from safetensors import safe_open

    def release():  # metadata and tensors (safetensors orders its header keys differently from run to run)
        with safe_open(str(out / "test_vit-cifar10.safetensors"), "pt") as f:
            return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}

    first_meta, first_tensors = release()
    with caplog.at_level("WARNING", logger="robust_vits"):
        rc, _, err = _cli(prepare_checkpoint.main, argv, capsys)
    assert rc == 0, err
    assert "replacing the earlier export" in caplog.text + err
    meta, tensors = release()
    assert meta == first_meta and tensors.keys() == first_tensors.keys()
    assert all(torch.equal(tensors[k], first_tensors[k]) for k in tensors)


# ---------------------------------------------------------------------------- --initial-checkpoint


def test_initial_checkpoint_says_which_weights_it_started_from(run, tmp_path, caplog):
    from src import setup_task
    from src.arg_parser import parse_args

    ck = torch.load(f"{run}/last.pth.tar", map_location="cpu", weights_only=True)
    no_ema = tmp_path / "no_ema.pth.tar"
    torch.save({**ck, "model_ema": None}, no_ema)
    for path, expected in ((f"{run}/last.pth.tar", "model_ema"), (no_ema, "model")):
        args, _ = parse_args(TINY_TRAIN + ["--initial-checkpoint", str(path)])
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="robust_vits"):
            model = setup_task.create_model(args)
        line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("--initial-checkpoint"))
        assert f"the {expected} weights of {path}" in line, line
        assert ("EMA" in line) == (expected == "model_ema")
        loaded = model.state_dict()["head.weight"]
        assert torch.equal(loaded, ck[expected]["head.weight"])


def test_timm_checkpoint_arch_names_the_model(tmp_path, capsys):
    """timm's train.py saves {'state_dict', 'arch', ...}; without training arguments the 'arch' entry was ignored
    and validate.py built its default resnet50 (a shape-mismatch error about a model the user never named)."""
    model = timm.create_model("test_vit", num_classes=10, img_size=32)
    path = tmp_path / "timm.pth.tar"
    torch.save({"state_dict": model.state_dict(), "arch": "test_vit", "epoch": 3}, path)
    rec = read_record(torch.load(path, weights_only=True), path=str(path))
    assert rec is not None and rec.model == "test_vit"
    rc = run_cli(validate_cli.main, ["--dataset", "digits", "-j", "0", "--checkpoint", str(path), "--num-classes",
                                     "10", "--input-size", "3", "32", "32", "--num-examples", "20", "-b", "20",
                                     "--log-freq", "0"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "evaluating test_vit (10 classes)" in err


def test_use_ema_without_ema_weights_is_in_the_results(tmp_path, capsys):
    """--use-ema on a checkpoint without EMA weights: the log warned, but the results file's warnings were empty,
    so the numbers did not say which weights they are."""
    model = timm.create_model("test_vit", num_classes=10, img_size=32)
    path = tmp_path / "plain.pth.tar"
    torch.save({"model": model.state_dict()}, path)
    out = tmp_path / "r.json"
    base = ["--dataset", "digits", "-j", "0", "--checkpoint", str(path), "-m", "test_vit", "--num-classes", "10",
            "--input-size", "3", "32", "32", "--num-examples", "20", "-b", "20", "--log-freq", "0"]
    assert run_cli(validate_cli.main, base + ["--use-ema", "--results-file", str(out)]) == 0
    capsys.readouterr()
    warnings = json.loads(out.read_text())
    text = json.dumps(warnings)
    assert "--use-ema: the checkpoint has no EMA weights" in text and "('model')" in text
    assert run_cli(validate_cli.main, base + ["--results-file", str(out)]) == 0
    assert "--use-ema" not in out.read_text()
