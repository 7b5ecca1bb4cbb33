"""A checkpoint is enough to evaluate it (issue 15 item 1, issue 10 item 2).

Two tiny adversarially trained runs on a 100-image folder of digits, each with preprocessing that
differs from its model's defaults, are evaluated from ``RUN/best.pth.tar`` with validate.py given
only the data folder and the run's attack (plus ``-j 0``, which changes no number): the result is
exactly the run's own final clean and robust accuracy. The per-epoch evaluation reseeds with
``EVAL_SEED`` (validate's default ``--seed``) and evaluates the same examples in the same batches,
so even PGD's random starts are the same.

* ``raw``: test_vit (timm default: 160 px, crop 0.9) trained at 32 px, crop 0.95, on raw [0, 1]
  inputs -- the case where the default flags used to normalize in the loader and score chance.
* ``xcit``: a 1-layer XCiT with a p16 stem (timm's xcit_nano cfg: 224 px) fine-tuned with
  ``--finetuning-patch-size 4`` at 32 px, crop 0.9, bilinear, behind ``--normalize-model`` with a
  custom mean/std -- the case where evaluation without ``--patch-size`` ran another network.

The same holds for the files util_scripts/prepare_checkpoint.py releases, and for original-format
checkpoints (a training checkpoint with ``hparams``, a bare state dict) converted by it.
"""
from __future__ import annotations

import argparse
import json
import os
from collections import OrderedDict

import pytest
import timm
import torch
from timm.data import resolve_data_config
from timm.models import register_model
from timm.models._registry import is_model

import src.models  # noqa: F401 - registers the project's models
import validate as validate_cli
from src.errors import run_cli
from src.eval_config import EvalRecord, explicit_dests, read_record, resolve_settings
from src.original_cfgs import ORIGINAL_DATA_CONFIGS
from tests.conftest import run_train
from tests.test_attack_effectiveness import make_digits_folder
from util_scripts import prepare_checkpoint

pytestmark = pytest.mark.usefixtures("single_cpu_thread")

if not is_model("xcit_tiny_test_p16"):
    @register_model
    def xcit_tiny_test_p16(pretrained: bool = False, **kwargs):
        """A 1-layer, 32-dim XCiT with the p16 convolutional stem; default cfg: xcit_nano's (224 px)."""
        args = dict(dict(depth=1, embed_dim=32, num_heads=2, cls_attn_layers=1), **kwargs)
        return timm.create_model("xcit_nano_12_p16_224", pretrained=False, **args)

EPS, STEPS = "6", "2"  # the runs train at eps 8 and evaluate at --eval-attack-eps 6
ATTACK = ["--attack", "pgd", "--attack-eps", EPS, "--attack-steps", STEPS]
TRAIN = ["-b", "20", "-vb", "256", "--opt", "adamw", "--lr", "2e-3", "--weight-decay", "0.05", "--sched", "cosine",
         "--warmup-epochs", "0", "--cooldown-epochs", "0", "--smoothing", "0", "--no-aug", "--workers", "0",
         "--log-interval", "1000", "--seed", "1", "--epochs", "1", "--adv-training", "pgd", "--attack-eps", "8",
         "--attack-steps", STEPS, "--eval-attack-eps", EPS]
XCIT_MEAN, XCIT_STD = ["0.4", "0.45", "0.5"], ["0.3", "0.25", "0.2"]
XCIT_HPARAMS = {"model": "xcit_tiny_test_p16", "num_classes": 10, "input_size": [3, 32, 32], "crop_pct": 0.9,
                "interpolation": "bilinear", "normalize_model": True, "no_normalize": True,
                "mean": [float(v) for v in XCIT_MEAN], "std": [float(v) for v in XCIT_STD],
                "finetuning_patch_size": 4}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_digits_folder(tmp_path_factory.mktemp("digits"), per_class_train=10, per_class_val=6)


@pytest.fixture(scope="module")
def runs(folder, tmp_path_factory):
    """``{'raw': best.pth.tar, 'xcit': best.pth.tar}`` of the two training runs."""
    out = tmp_path_factory.mktemp("runs")
    raw = run_train([folder, "--model", "test_vit", "--num-classes", "10", "--input-size", "3", "32", "32",
                     "--crop-pct", "0.95", "--interpolation", "bicubic", *TRAIN, "--output", str(out),
                     "--experiment", "raw"])
    base = str(out / "xcit-p16.pth")
    torch.manual_seed(0)
    torch.save(timm.create_model("xcit_tiny_test_p16", num_classes=10, img_size=32).state_dict(), base)
    xcit = run_train([folder, "--model", "xcit_tiny_test_p16", "--num-classes", "10", "--input-size", "3", "32", "32",
                      "--crop-pct", "0.9", "--interpolation", "bilinear", "--normalize-model", "--mean", *XCIT_MEAN,
                      "--std", *XCIT_STD, "--finetune", base, "--finetuning-patch-size", "4", *TRAIN,
                      "--output", str(out), "--experiment", "xcit"])
    return {"raw": os.path.join(raw["output_dir"], "best.pth.tar"),
            "xcit": os.path.join(xcit["output_dir"], "best.pth.tar")}


def _validate(argv, capsys):
    """validate.py in-process: (exit code, result dict or None, stdout WARNING lines, stderr)."""
    rc = run_cli(validate_cli.main, list(argv))
    out = capsys.readouterr()
    result = json.loads(out.out.split("--result\n", 1)[1]) if "--result\n" in out.out else None
    warnings = [line for line in out.out.split("--result", 1)[0].splitlines() if line.startswith("WARNING: ")]
    return rc, result, warnings, out.err


def _metrics(path):
    return torch.load(path, map_location="cpu", weights_only=True)["metrics"]


def _assert_reproduces(result, metrics):
    assert result["top1"] == round(metrics["top1"], 4)
    assert result["robust_top1"] == round(metrics["robust_top1"], 4)


# ----------------------------------------------------------------------------------------------
# training checkpoints


@pytest.mark.parametrize("run", ["raw", "xcit"])
def test_validate_reproduces_the_runs_own_accuracy(runs, folder, run, capsys):
    rc, result, _, err = _validate([folder, "--checkpoint", runs[run], "-j", "0", *ATTACK], capsys)
    assert rc == 0
    _assert_reproduces(result, _metrics(runs[run]))
    assert result["img_size"] == 32 and result["cropt_pct"] == (0.95 if run == "raw" else 0.9)
    line = [ln for ln in err.splitlines() if " evaluating " in ln]
    assert len(line) == 1  # one line says what was resolved
    if run == "raw":
        assert "test_vit (10 classes) at 32x32 px, crop_pct 0.95, bicubic, raw [0, 1] inputs" in line[0]
    else:
        assert "xcit_tiny_test_p16 (10 classes, patch size 4) at 32x32 px, crop_pct 0.9, bilinear" in line[0]
        assert "normalized inside the model (mean 0.4 0.45 0.5, std 0.3 0.25 0.2)" in line[0]


def test_checkpoint_records_what_evaluating_needs(runs):
    rec = torch.load(runs["xcit"], map_location="cpu", weights_only=True)["eval_config"]
    assert rec == {"model": "xcit_tiny_test_p16", "num_classes": 10, "patch_size": 4, "input_size": [3, 32, 32],
                   "crop_pct": 0.9, "interpolation": "bilinear", "crop_mode": "center", "normalization": "model",
                   "mean": [0.4, 0.45, 0.5], "std": [0.3, 0.25, 0.2]}
    raw = torch.load(runs["raw"], map_location="cpu", weights_only=True)["eval_config"]
    assert (raw["normalization"], raw["mean"], raw["patch_size"], raw["crop_pct"]) == ("raw", None, None, 0.95)


def test_flags_that_contradict_the_record_are_named(runs, folder, capsys):
    rc, result, warnings, _ = _validate([folder, "--checkpoint", runs["xcit"], "-j", "0", "--patch-size", "16",
                                         "--no-normalize", "--crop-pct", "0.9"], capsys)
    assert rc == 0
    assert any("--patch-size 16 overrides the checkpoint's patch size 4" in w for w in warnings)
    assert any("--no-normalize overrides the checkpoint's record (normalization inside the model, mean "
               "[0.4, 0.45, 0.5] std [0.3, 0.25, 0.2]" in w for w in warnings)
    assert not any("--crop-pct" in w for w in warnings)  # the same value as recorded: no contradiction
    assert result["top1"] != round(_metrics(runs["xcit"])["top1"], 4) or result["warnings"]
    rc, _, warnings, _ = _validate([folder, "--checkpoint", runs["raw"], "-j", "0", "--normalize-model",
                                    "--crop-pct", "0.8"], capsys)
    assert rc == 0
    assert any("--normalize-model overrides the checkpoint's record (raw [0, 1] inputs" in w for w in warnings)
    assert any("--crop-pct 0.8 overrides the checkpoint's crop_pct 0.95" in w for w in warnings)


# ----------------------------------------------------------------------------------------------
# releases and the original's formats


def _release(argv, capsys):
    rc = prepare_checkpoint.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out.split(), out.err


def test_released_files_reproduce_the_run(runs, folder, tmp_path, capsys):
    rc, paths, _ = _release(["--checkpoint", runs["xcit"], "--model", "xcit_tiny_test_p16", "--dataset", "digits",
                             "--eps", "8", "--output-dir", str(tmp_path)], capsys)
    assert rc == 0 and [os.path.basename(p) for p in paths] == ["xcit_tiny_test_p16-digits-eps-8.pth.tar",
                                                                 "xcit_tiny_test_p16-digits-eps-8.safetensors"]
    # still the original's release format: a bare state dict any loader takes
    sd = torch.load(paths[0], map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    net = timm.create_model("xcit_tiny_test_p16", num_classes=10, img_size=32)
    net.load_state_dict(sd)
    metrics = _metrics(runs["xcit"])
    for path in paths:
        rc, result, _, _ = _validate([folder, "--checkpoint", path, "-j", "0", *ATTACK], capsys)
        assert rc == 0
        _assert_reproduces(result, metrics)


def _original_training_checkpoint(best, path):
    """The original's training checkpoint (timm.bits, version 3): no eval_config, no normalization entry."""
    ck = torch.load(best, map_location="cpu", weights_only=True)
    torch.save({"epoch": 0, "step_count": 5, "step_count_global": 5, "model": ck["model"], "model_ema": None,
                "train_cfg": {}, "optimizer": ck.get("optimizer") or {"state": {}, "param_groups": []}, "version": 3, "arch": "xcit_tiny_test_p16",
                "hparams": XCIT_HPARAMS, "metrics": ck["metrics"], "metric_name": "robust_top1",
                "metric_decreasing": False}, path)
    return ck["model"]


def test_original_checkpoints_convert_to_self_describing_ones(runs, folder, tmp_path, capsys):
    metrics = _metrics(runs["xcit"])
    orig = str(tmp_path / "xcit-orig-best.pth.tar")
    weights = _original_training_checkpoint(runs["xcit"], orig)
    bare = str(tmp_path / "xcit_tiny_test_p16-digits-eps-8.pth.tar")  # an original release: the bare state dict
    torch.save(OrderedDict(weights), bare)

    # the original ignored --finetuning-patch-size, so its training arguments cannot tell the patch size
    rc, paths, _ = _release(["--checkpoint", orig, "--model", "xcit_tiny_test_p16", "--dataset", "digits",
                             "--output-dir", str(tmp_path / "from-train"), "--patch-size", "4"], capsys)
    assert rc == 0
    rc, result, _, _ = _validate([folder, "--checkpoint", paths[0], "-j", "0", *ATTACK], capsys)
    assert rc == 0
    _assert_reproduces(result, metrics)

    # a bare release says nothing: the conversion asks for what it cannot infer
    common = ["--checkpoint", bare, "--model", "xcit_tiny_test_p16", "--dataset", "digits"]
    rc, _, err = _release(common + ["--output-dir", str(tmp_path / "refused")], capsys)
    assert rc == 2 and err.count("\n") == 1
    assert "pass --input-size C H W, --crop-pct, --interpolation, --normalization" in err
    assert not os.path.exists(tmp_path / "refused")
    rc, paths, _ = _release(common + ["--output-dir", str(tmp_path / "from-bare"), "--input-size", "3", "32", "32",
                                      "--crop-pct", "0.9", "--interpolation", "bilinear", "--patch-size", "4",
                                      "--normalization", "model", "--mean", *XCIT_MEAN, "--std", *XCIT_STD], capsys)
    assert rc == 0
    for path in paths:
        rc, result, _, _ = _validate([folder, "--checkpoint", path, "-j", "0", *ATTACK], capsys)
        assert rc == 0
        _assert_reproduces(result, metrics)


def test_original_training_checkpoint_is_evaluated_from_its_hparams(runs, folder, tmp_path, capsys):
    """Without conversion the hparams give everything but the patch size (the original ignored the flag)."""
    orig = str(tmp_path / "orig.pth.tar")
    _original_training_checkpoint(runs["xcit"], orig)
    rc, result, _, err = _validate([folder, "--checkpoint", orig, "-j", "0", "--patch-size", "4", *ATTACK], capsys)
    assert rc == 0
    _assert_reproduces(result, _metrics(runs["xcit"]))
    assert "settings from the checkpoint's training arguments (hparams)" in err


# ----------------------------------------------------------------------------------------------
# data configs of the original's timm


def _args(**kw):
    base = dict(model="resnet50", num_classes=None, patch_size=None, input_size=None, img_size=None, crop_pct=None,
                interpolation="", mean=None, std=None, use_test_size=False)
    return argparse.Namespace(**{**base, **kw})


def test_bare_release_of_a_plain_timm_model_gets_the_original_data_config():
    rec = read_record(OrderedDict(w=torch.zeros(1)), model_hint="convnext_tiny")
    assert (rec.input_size, rec.crop_pct, rec.interpolation) == ((3, 224, 224), 0.875, "bicubic")
    with torch.device("meta"):
        net = timm.create_model("convnext_tiny")
    cfg = resolve_data_config(resolve_settings(_args(model="convnext_tiny"), rec).data_overrides, model=net)
    assert (cfg["input_size"], cfg["crop_pct"], cfg["interpolation"]) == ((3, 224, 224), 0.875, "bicubic")
    # timm 1.0.31's test_* fields (288 px, crop 1.0) only when asked for
    asked = resolve_settings(_args(model="convnext_tiny", use_test_size=True), rec).data_overrides
    cfg = resolve_data_config(asked, model=net, use_test_size=True)
    assert (cfg["input_size"], cfg["crop_pct"]) == ((3, 288, 288), 1.0)
    assert ORIGINAL_DATA_CONFIGS["resnet50"]["crop_pct"] == 0.95
    assert read_record(OrderedDict(w=torch.zeros(1)), model_hint="test_vit") is None  # no entry: timm's defaults


def test_given_flags_are_told_apart_from_defaults():
    from src.arg_parser.evaluate import build_validate_parser

    given = explicit_dests(build_validate_parser(), ["--model", "resnet50", "--crop-pct", "0.9", "DIR"])
    assert {"model", "crop_pct", "data"} <= given and "input_size" not in given and "attack_eps" not in given
    rec = EvalRecord(model="test_vit", input_size=(3, 32, 32), crop_pct=0.95)
    explicit = _args(explicit_flags={"model"})
    assert resolve_settings(explicit, rec).model == "resnet50"  # typed by the user: wins, with a warning
    assert resolve_settings(_args(explicit_flags=set()), rec).model == "test_vit"  # the default does not


# ----------------------------------------------------------------------------------------------
# a damaged record


RECORD = {"model": "resnet18", "num_classes": 10, "patch_size": None, "input_size": [3, 32, 32], "crop_pct": 1.0,
          "interpolation": "bicubic", "crop_mode": "center", "normalization": "model", "mean": [0.5] * 3,
          "std": [0.25] * 3}
DAMAGED = [("crop_pct", float("nan")), ("crop_pct", 0.0), ("interpolation", "weird"), ("std", [0.0, 1.0, 1.0]),
           ("mean", [0.5, 0.5]), ("mean", "abc"), ("input_size", [3, 0, 0]), ("input_size", [32, 32]),
           ("input_size", "abc"), ("num_classes", -3), ("num_classes", 2.5), ("patch_size", 0), ("model", 5),
           ("normalization", "sideways"), ("crop_mode", "diagonal")]


@pytest.mark.parametrize("key,value", DAMAGED)
def test_a_damaged_record_is_one_checkpoint_error_naming_the_key(key, value):
    """A record value its flag's rule refuses used to crash later (NaN crop: int(nan); std 0; unknown
    interpolation: KeyError; size 0) or was silently dropped (normalization); now one CheckpointError."""
    from src.errors import CheckpointError

    assert read_record({"eval_config": dict(RECORD)}) == EvalRecord.from_dict(RECORD)  # the undamaged one reads
    with pytest.raises(CheckpointError, match=rf"^checkpoint C\.pth\.tar: .* is damaged: key '{key}': must be "):
        read_record({"eval_config": {**RECORD, key: value}}, path="C.pth.tar")
    hparams = {"model": "resnet18", "input_size": [3, 32, 32], "crop_pct": 0.9, "interpolation": "bicubic",
               "normalize_model": True, "mean": [0.5], "std": [0.25]}
    assert read_record({"hparams": hparams}).std == (0.25, 0.25, 0.25)
    if key in hparams:  # the same rules for a record made from the training arguments
        with pytest.raises(CheckpointError, match=rf"training arguments \(hparams\) is damaged: key '{key}'"):
            read_record({"hparams": {**hparams, key: value}})


def test_validate_refuses_a_checkpoint_with_a_damaged_record(runs, folder, tmp_path, capsys):
    ck = torch.load(runs["raw"], map_location="cpu", weights_only=True)
    ck["eval_config"]["crop_pct"] = float("nan")
    path = str(tmp_path / "damaged.pth.tar")
    torch.save(ck, path)
    rc, result, _, err = _validate([folder, "--checkpoint", path, "-j", "0"], capsys)
    assert (rc, result) == (2, None)
    assert err.strip().splitlines() == [f"error: checkpoint {path}: the checkpoint's record is damaged: key "
                                        "'crop_pct': must be a finite number in (0, 1], got nan"]
