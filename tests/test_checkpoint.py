"""Tests of src/checkpoint.py and util_scripts/prepare_checkpoint.py.

Covers: released vs training checkpoint formats giving identical logits, wrapper prefixes,
refusal of code-running pickles (and the trust escape hatch), clear errors for damaged or
mismatched files, DeiT-style fine-tuning (ImageNet XCiT-S12 head -> 10-class p4 CIFAR model),
export round trips (.pth.tar and .safetensors, mean/std metadata) and ``memory://`` paths.
"""
from __future__ import annotations

import pathlib
import uuid
from collections import OrderedDict

import numpy as np
import pytest
import timm
import torch
from torch import nn

import src.models  # noqa: F401 - registers the project's models
from src import storage
from src.checkpoint import (CheckpointError, FinetuneArgumentError, UntrustedCheckpointError, checkpoint_normalization,
                            extract_state_dict, finetune_from_checkpoint, load_checkpoint_file, load_model_weights,
                            normalization_entry)
from src.checkpoint_export import export_released_checkpoint, released_checkpoint_name
from src.errors import UsageError
from src.eval_config import EvalRecord, read_record
from src.utils import normalize_model
from util_scripts.prepare_checkpoint import main as prepare_main

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2471, 0.2435, 0.2616)
# Reduced XCiT-S12 (dim 384, 8 heads) for speed; both sides of every load use the same depth.
TINY = dict(depth=1, embed_dim=64, num_heads=4)
S12_SHALLOW = dict(depth=2)


pytestmark = pytest.mark.usefixtures("single_cpu_thread")


def _tiny(num_classes: int = 10, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("xcit_small_12_p4_32", num_classes=num_classes, **TINY).eval()


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _training_checkpoint(model: nn.Module, ema: nn.Module = None, normalization=None) -> dict:
    """A dict shaped like the trainer's checkpoints (original-behaviour §0.4)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    opt.step()
    opt.zero_grad()
    ckpt = {
        "epoch": 3, "step_count": 40, "step_count_global": 40,
        "model": model.state_dict(),
        "model_ema": None if ema is None else ema.state_dict(),
        "train_cfg": {"num_epochs": 10, "log_interval": 50, "recovery_interval": 0, "accumulate_steps": 1},
        "optimizer": opt.state_dict(),
        "version": 3, "arch": "xcit_small_12_p4_32",
        "hparams": {"model": "xcit_small_12_p4_32", "lr": 1e-3, "input_size": [3, 32, 32], "mean": None},
        "metrics": {"loss": 1.5, "top1": np.float64(40.0), "robust_top1": 20.0},
        "metric_name": "robust_top1", "metric_decreasing": False,
    }
    if normalization is not None:
        ckpt["normalization"] = normalization
    return ckpt


@pytest.fixture(scope="module")
def trained() -> dict:
    """A tiny model, its EMA twin (different weights) and a training checkpoint of both."""
    model, ema = _tiny(seed=0).train(), _tiny(seed=1)
    ckpt = _training_checkpoint(model, ema, normalization={"mean": list(MEAN), "std": list(STD)})
    model.eval()
    return {"model": model, "ema": ema, "ckpt": ckpt, "x": torch.rand(3, 3, 32, 32)}


class _CodeRunning:
    """Unpickling this creates ``marker``: stands for any payload a malicious checkpoint could run."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


# ---------------------------------------------------------------------------- formats

def test_released_and_training_checkpoints_give_identical_logits(trained, tmp_path) -> None:
    released, training = tmp_path / "released.pth.tar", tmp_path / "last.pth.tar"
    torch.save(trained["model"].state_dict(), released)
    torch.save(trained["ckpt"], training)
    expected = _logits(trained["model"], trained["x"])
    for path in (released, training):
        model = _tiny(seed=7)
        report = load_model_weights(model, str(path))
        assert report.missing_keys == [] and report.unexpected_keys == []
        assert torch.equal(_logits(model, trained["x"]), expected)
    assert load_model_weights(_tiny(seed=7), str(training)).state_key == "model"
    assert load_model_weights(_tiny(seed=7), str(released)).state_key == "bare"


def test_use_ema_picks_the_ema_weights_and_falls_back(trained) -> None:
    model = _tiny(seed=7)
    assert load_model_weights(model, trained["ckpt"], use_ema=True).state_key == "model_ema"
    assert torch.equal(_logits(model, trained["x"]), _logits(trained["ema"], trained["x"]))
    no_ema = dict(trained["ckpt"], model_ema=None)
    assert load_model_weights(model, no_ema, use_ema=True).state_key == "model"
    assert torch.equal(_logits(model, trained["x"]), _logits(trained["model"], trained["x"]))


def test_wrapper_prefixes_are_stripped(trained) -> None:
    sd = trained["model"].state_dict()
    expected = _logits(trained["model"], trained["x"])
    ddp = OrderedDict(("module." + k, v) for k, v in sd.items())
    wrapped = normalize_model(trained["model"], MEAN, STD).state_dict()  # normalize.* + model.*
    ddp_wrapped = OrderedDict(("module." + k, v) for k, v in wrapped.items())
    for ckpt in (ddp, {"model": ddp}, {"state_dict": ddp}, wrapped, {"model": ddp_wrapped}):
        model = _tiny(seed=7)
        load_model_weights(model, ckpt)
        assert torch.equal(_logits(model, trained["x"]), expected)
    state, meta = extract_state_dict(wrapped)
    assert set(state) == set(sd)
    assert meta["normalization"][0] == pytest.approx(MEAN) and meta["normalization"][1] == pytest.approx(STD)


def test_load_into_a_normalization_wrapped_model(trained) -> None:
    target = normalize_model(_tiny(seed=7), (0.5,) * 3, (0.5,) * 3)
    report = load_model_weights(target, trained["ckpt"])
    assert torch.equal(target.model.state_dict()["head.weight"], trained["model"].state_dict()["head.weight"])
    assert target.normalize.mean.flatten().tolist() == [0.5] * 3  # the caller decides on normalization
    assert report.normalization[0] == pytest.approx(MEAN)


def test_checkpoint_normalization_metadata(trained) -> None:
    mean, std = checkpoint_normalization(trained["ckpt"])
    assert mean == pytest.approx(MEAN) and std == pytest.approx(STD)
    assert checkpoint_normalization(trained["model"].state_dict()) is None
    assert checkpoint_normalization(dict(trained["ckpt"], normalization=None)) is None
    entry = normalization_entry(normalize_model(nn.Identity(), MEAN, STD))
    assert entry["mean"] == pytest.approx(list(MEAN)) and normalization_entry(nn.Identity()) is None


def test_numpy_scalars_in_metrics_load_without_trust(trained, tmp_path) -> None:
    path = tmp_path / "last.pth.tar"
    torch.save(trained["ckpt"], path)
    ckpt = load_checkpoint_file(str(path))
    assert float(ckpt["metrics"]["top1"]) == 40.0


# ---------------------------------------------------------------------------- safety and errors

def test_code_running_checkpoint_is_refused_unless_trusted(trained, tmp_path) -> None:
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pth.tar"
    torch.save({"model": trained["model"].state_dict(), "payload": _CodeRunning(marker)}, path)

    with pytest.raises(UntrustedCheckpointError) as err:
        load_checkpoint_file(str(path))
    message = str(err.value)
    assert "needs arbitrary code to load" in message and "--trust-checkpoint" in message
    assert str(path) in message and "\n" not in message
    assert not marker.exists()
    with pytest.raises(UntrustedCheckpointError):
        load_model_weights(_tiny(), str(path))
    assert not marker.exists()

    ckpt = load_checkpoint_file(str(path), trust=True)
    assert marker.exists()
    model = _tiny(seed=7)
    load_model_weights(model, ckpt)
    assert torch.equal(_logits(model, trained["x"]), _logits(trained["model"], trained["x"]))


def test_legacy_non_zip_format(trained, tmp_path) -> None:
    """Pre-1.6 torch.save format: loads, refuses payloads, reports damage as damage."""
    sd = trained["model"].state_dict()
    clean, evil = tmp_path / "clean.pth", tmp_path / "evil.pth"
    torch.save(sd, clean, _use_new_zipfile_serialization=False)
    torch.save({"model": sd, "payload": _CodeRunning(tmp_path / "MARKER")}, evil, _use_new_zipfile_serialization=False)
    assert set(load_checkpoint_file(str(clean))) == set(sd)
    with pytest.raises(UntrustedCheckpointError):
        load_checkpoint_file(str(evil))
    assert not (tmp_path / "MARKER").exists()
    data = clean.read_bytes()
    for n in (len(data) // 2, 50):
        cut = tmp_path / f"cut{n}.pth"
        cut.write_bytes(data[:n])
        with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
            load_checkpoint_file(str(cut))
        assert not isinstance(err.value, UntrustedCheckpointError)


def test_truncated_empty_and_missing_files(trained, tmp_path) -> None:
    full = tmp_path / "full.pth.tar"
    torch.save(trained["ckpt"], full)
    data = full.read_bytes()
    for n in (len(data) // 2, 100, 10):
        cut = tmp_path / f"cut{n}.pth.tar"
        cut.write_bytes(data[:n])
        with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
            load_checkpoint_file(str(cut))
        assert str(cut) in str(err.value) and not isinstance(err.value, UntrustedCheckpointError)
        with pytest.raises(CheckpointError):
            load_checkpoint_file(str(cut), trust=True)
    empty = tmp_path / "empty.pth.tar"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint_file(str(empty))
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint_file(str(tmp_path / "nope.pth.tar"))


def test_checkpoint_for_another_class_count_is_a_clear_error(trained) -> None:
    with pytest.raises(CheckpointError) as err:
        load_model_weights(_tiny(num_classes=100), trained["ckpt"])
    message = str(err.value)
    assert "does not match model xcit_small_12_p4_32" in message
    assert "head.weight shape (10, 64) in checkpoint vs (100, 64) in model" in message
    assert "\n" not in message


def test_checkpoint_for_another_architecture_is_a_clear_error(trained) -> None:
    other = timm.create_model("preact_resnet_18", num_blocks=(1, 1, 1, 1))
    with pytest.raises(CheckpointError, match=r"does not match model preact_resnet_18: \d+ missing keys"):
        load_model_weights(other, trained["ckpt"])
    with pytest.raises(CheckpointError, match="contains no model weights"):
        load_model_weights(other, {"epoch": 1, "optimizer": {}})


def test_non_strict_load_reports_differences(trained) -> None:
    sd = OrderedDict(trained["model"].state_dict())
    del sd["head.bias"]
    sd["extra.weight"] = torch.zeros(1)
    report = load_model_weights(_tiny(seed=7), sd, strict=False)
    assert report.missing_keys == ["head.bias"] and report.unexpected_keys == ["extra.weight"]
    with pytest.raises(CheckpointError, match="1 missing keys .*1 unexpected keys"):
        load_model_weights(_tiny(seed=7), sd, strict=True)


# ---------------------------------------------------------------------------- fine-tuning

def test_finetune_imagenet_xcit_s12_into_10_class_p4_32(tmp_path) -> None:
    torch.manual_seed(0)
    imagenet = timm.create_model("xcit_small_12_p16_224", **S12_SHALLOW)  # 1000 classes, p16
    ckpt_path = tmp_path / "best.pth.tar"
    torch.save(_training_checkpoint(imagenet), ckpt_path)
    source = {k: v.clone() for k, v in imagenet.state_dict().items()}

    model = timm.create_model("xcit_small_12_p4_32", num_classes=1000, **S12_SHALLOW)
    report = finetune_from_checkpoint(model, str(ckpt_path), num_classes=10, global_pool="token")
    assert sorted(report.missing_keys) == ["head.bias", "head.weight"] and report.unexpected_keys == []
    assert model.global_pool == "token" and model.patch_embed.patch_size == 4
    loaded = model.state_dict()
    for key, value in source.items():
        if key.startswith("head."):
            continue
        assert torch.equal(loaded[key], value), key  # bit-identical
    assert loaded["head.weight"].shape == (10, 384) and loaded["head.bias"].shape == (10,)
    assert not torch.equal(loaded["head.weight"], source["head.weight"][:10])
    with torch.no_grad():
        tokens, (hp, wp) = model.patch_embed(torch.rand(1, 3, 32, 32))
        assert (hp, wp) == (8, 8)
        assert model.eval()(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_finetuning_patch_size_adapts_a_p16_model(trained) -> None:
    torch.manual_seed(0)
    imagenet = timm.create_model("xcit_small_12_p16_224", num_classes=1000, **TINY)
    model = timm.create_model("xcit_small_12_p16_224", num_classes=1000, img_size=32, **TINY)
    finetune_from_checkpoint(model, {"model": imagenet.state_dict()}, num_classes=10, finetuning_patch_size=4)
    assert model.patch_embed.patch_size == 4
    with torch.no_grad():
        assert model.patch_embed(torch.rand(1, 3, 32, 32))[1] == (8, 8)
    with pytest.raises(FinetuneArgumentError, match="--finetuning-patch-size"):
        finetune_from_checkpoint(timm.create_model("preact_resnet_18", num_blocks=(1, 1, 1, 1)),
                                 {"model": imagenet.state_dict()}, num_classes=10, finetuning_patch_size=4)
    with pytest.raises(FinetuneArgumentError, match="--finetuning-patch-size 6"):
        finetune_from_checkpoint(timm.create_model("xcit_small_12_p16_224", num_classes=1000, img_size=32, **TINY),
                                 {"model": imagenet.state_dict()}, num_classes=10, finetuning_patch_size=6)
    assert issubclass(FinetuneArgumentError, ValueError)


def test_reinit_patch_embedding_keeps_the_fresh_stem(trained) -> None:
    model = _tiny(seed=7)
    fresh = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("patch_embed.")}
    report = finetune_from_checkpoint(model, trained["ckpt"], num_classes=10, reinit_patch_embedding=True)
    assert sorted(report.missing_keys) == sorted(k for k in fresh if not k.endswith("num_batches_tracked"))
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in fresh.items())
    assert torch.equal(loaded["head.weight"], trained["model"].state_dict()["head.weight"])


def test_finetune_same_head_shape_keeps_the_checkpoint_head(trained) -> None:
    model = _tiny(seed=7)
    report = finetune_from_checkpoint(model, trained["ckpt"], num_classes=10)
    assert report.missing_keys == []
    assert torch.equal(_logits(model, trained["x"]), _logits(trained["model"], trained["x"]))


def test_finetune_requires_num_classes(trained) -> None:
    with pytest.raises(ValueError, match="--num-classes"):
        finetune_from_checkpoint(_tiny(), trained["ckpt"], num_classes=None)


def test_finetune_drops_the_models_own_classifier_name() -> None:
    """PreAct ResNet's classifier is `linear` (not head/fc): a new class count still works."""
    src_model = timm.create_model("preact_resnet_18", num_blocks=(1, 1, 1, 1), num_classes=10)
    model = timm.create_model("preact_resnet_18", num_blocks=(1, 1, 1, 1), num_classes=10)
    report = finetune_from_checkpoint(model, src_model.state_dict(), num_classes=100)
    assert sorted(report.missing_keys) == ["linear.bias", "linear.weight"]
    assert model.linear.out_features == 100
    assert torch.equal(model.conv1.weight, src_model.conv1.weight)


def test_finetune_interpolates_absolute_pos_embed() -> None:
    kwargs = dict(depth=1, embed_dim=32, num_heads=2, patch_size=16)
    src_model = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=5, **kwargs)  # 4x4 grid + cls
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=5, **kwargs)  # 2x2 grid + cls
    finetune_from_checkpoint(model, {"model": src_model.state_dict()}, num_classes=3)
    assert model.pos_embed.shape == (1, 5, 32)
    assert torch.equal(model.pos_embed[:, 0], src_model.pos_embed[:, 0])  # class token position kept
    assert torch.equal(model.patch_embed.proj.weight, src_model.patch_embed.proj.weight)


def test_finetune_other_architecture_is_a_clear_error(trained) -> None:
    model = timm.create_model("xcit_small_12_p4_32", num_classes=10, depth=1, embed_dim=128, num_heads=4)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        finetune_from_checkpoint(model, trained["ckpt"], num_classes=10)


# ---------------------------------------------------------------------------- export

def test_released_checkpoint_name() -> None:
    assert released_checkpoint_name("xcit_small_12_p4_32", "cifar10", 8) == "xcit_small_12_p4_32-cifar10-eps-8"
    assert released_checkpoint_name("resnet50_gelu", "imagenet", 4.0) == "resnet50_gelu-imagenet-eps-4"
    assert released_checkpoint_name("m", "d", 0.5) == "m-d-eps-0.5"
    assert released_checkpoint_name("m", "d") == "m-d"
    with pytest.raises(ValueError):
        released_checkpoint_name("m", "torch/cifar10")


def _check_exported(out_dir: str, stem: str, trained: dict, expect_norm: bool = True) -> None:
    pth, st = storage.join(out_dir, stem + ".pth.tar"), storage.join(out_dir, stem + ".safetensors")
    expected = _logits(trained["model"], trained["x"])
    bare = load_checkpoint_file(pth)
    assert set(bare) == set(trained["model"].state_dict())  # released format: the bare state dict
    assert all(isinstance(v, torch.Tensor) for v in bare.values())
    for path in (pth, st):
        model = _tiny(seed=7)
        load_model_weights(model, path)
        assert torch.equal(_logits(model, trained["x"]), expected), path
    loaded_st = load_checkpoint_file(st)
    assert loaded_st["safetensors_metadata"]["arch"] == "xcit_small_12_p4_32"
    if expect_norm:
        mean, std = checkpoint_normalization(loaded_st)
        assert mean == pytest.approx(MEAN) and std == pytest.approx(STD)


def test_export_script_round_trip(trained, tmp_path, capsys) -> None:
    ckpt_path = tmp_path / "run" / "best.pth.tar"
    ckpt_path.parent.mkdir()
    torch.save(trained["ckpt"], ckpt_path)
    out = tmp_path / "released"
    rc = prepare_main(["--checkpoint", str(ckpt_path), "--model", "xcit_small_12_p4_32", "--dataset", "cifar10",
                       "--eps", "8", "--output-dir", str(out), "--no-verify"])
    assert rc == 0
    printed = capsys.readouterr().out.split()
    stem = "xcit_small_12_p4_32-cifar10-eps-8"
    assert printed == [str(out / f"{stem}.pth.tar"), str(out / f"{stem}.safetensors")]
    _check_exported(str(out), stem, trained)


def test_export_verifies_the_architecture_and_uses_ema(trained, tmp_path) -> None:
    """Verification builds the named model (meta device) with the checkpoint's class count."""
    small = timm.create_model("preact_resnet_18", num_blocks=(2, 2, 2, 2), num_classes=10)
    ckpt = {"model": small.state_dict(), "model_ema": None}
    facts = {"input_size": [3, 32, 32], "crop_pct": 1.0, "interpolation": "bilinear", "normalization": "raw"}
    with pytest.raises(UsageError, match="pass --input-size C H W, --crop-pct, --interpolation, --normalization"):
        export_released_checkpoint(ckpt, "preact_resnet_18", "cifar10", str(tmp_path), eps=8)  # records nothing
    paths = export_released_checkpoint(ckpt, "preact_resnet_18", "cifar10", str(tmp_path), eps=8, eval_overrides=facts)
    released = load_checkpoint_file(paths["pth"])
    assert set(released) == set(small.state_dict())
    assert read_record(released) == EvalRecord(model="preact_resnet_18", num_classes=10, input_size=(3, 32, 32),
                                               crop_pct=1.0, interpolation="bilinear", normalization="raw")
    with pytest.raises(CheckpointError, match="does not match model wide_resnet28_10"):
        export_released_checkpoint(ckpt, "wide_resnet28_10", "cifar10", str(tmp_path))
    with pytest.raises(CheckpointError, match="no EMA weights"):
        export_released_checkpoint(ckpt, "preact_resnet_18", "cifar10", str(tmp_path), use_ema=True)
    ema_paths = export_released_checkpoint(trained["ckpt"], "xcit_small_12_p4_32", "c10", str(tmp_path),
                                           use_ema=True, verify=False)
    model = _tiny(seed=3)
    load_model_weights(model, ema_paths["safetensors"])
    assert torch.equal(_logits(model, trained["x"]), _logits(trained["ema"], trained["x"]))


EXPORT_ERRORS = {
    "missing": "not found",
    "untrusted": "needs arbitrary code to load",
    "wrong_model": "does not match model resnet18_gelu",
    "unknown_model": "unknown model 'no_such_model'",
    "bad_dataset": "dataset name 'torch/cifar10' cannot be used in a file name",
    "bad_args": "the following arguments are required: --output-dir",
    # '' (an unset shell variable in --output-dir "$DIR") wrote the released files into the working directory
    "empty_output_dir": "argument --output-dir: must be a non-empty path",
}


@pytest.mark.parametrize("case", list(EXPORT_ERRORS))
def test_export_script_errors_exit_2_with_one_line(case, trained, tmp_path, capsys, monkeypatch) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    ckpt_path = tmp_path / "best.pth.tar"
    payload = {"model": trained["model"].state_dict()}
    if case == "untrusted":
        payload["payload"] = _CodeRunning(tmp_path / "MARKER")
    torch.save(payload, ckpt_path)
    args = {"--checkpoint": str(ckpt_path), "--model": "xcit_small_12_p4_32", "--dataset": "cifar10",
            "--output-dir": str(tmp_path / "out")}
    if case == "missing":
        args["--checkpoint"] = str(tmp_path / "nope.pth.tar")
    elif case == "wrong_model":
        args["--model"] = "resnet18_gelu"
    elif case == "unknown_model":
        args["--model"] = "no_such_model"
    elif case == "bad_dataset":
        args["--dataset"] = "torch/cifar10"
    elif case == "empty_output_dir":
        args["--output-dir"] = ""
    argv = [x for kv in args.items() for x in kv]
    if case == "bad_args":
        argv = argv[:-2]  # --output-dir missing: argparse error
    assert prepare_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    if case != "bad_args":
        assert len(err) == 1 and err[0].startswith("error: ")
    assert EXPORT_ERRORS[case] in err[-1]
    assert not (tmp_path / "MARKER").exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert not any(cwd.iterdir())


def test_memory_paths_for_load_and_export(trained) -> None:
    base = f"memory://robust-vits-test-{uuid.uuid4().hex[:8]}"
    ckpt_path = f"{base}/run/last.pth.tar"
    storage.torch_save(trained["ckpt"], ckpt_path)
    model = _tiny(seed=7)
    load_model_weights(model, ckpt_path)
    assert torch.equal(_logits(model, trained["x"]), _logits(trained["model"], trained["x"]))
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint_file(f"{base}/missing.pth.tar")
    rc = prepare_main(["--checkpoint", ckpt_path, "--model", "xcit_small_12_p4_32", "--dataset", "cifar10",
                       "--output-dir", f"{base}/released", "--no-verify"])
    assert rc == 0
    _check_exported(f"{base}/released", "xcit_small_12_p4_32-cifar10", trained)
    finetune_from_checkpoint(_tiny(num_classes=3), f"{base}/released/xcit_small_12_p4_32-cifar10.safetensors",
                             num_classes=3)


def test_a_pickled_class_that_is_not_available_here_is_named_not_called_damage(trained, tmp_path) -> None:
    """An intact file pickling a class of the saving script's __main__ (or of a module that is not
    installed) used to be reported as 'truncated or corrupt', with or without --trust-checkpoint."""
    import sys
    import types

    sd = trained["model"].state_dict()
    saved = {}
    for module in ("__main__", "not_installed_models_xyz"):
        cls = type("SavedBy", (), {"__module__": module})
        fake = types.ModuleType(module)
        fake.SavedBy = cls
        real = sys.modules.get(module)
        sys.modules[module] = fake
        try:
            path = tmp_path / f"{module}.pth.tar"
            torch.save({"model": sd, "extra": cls()}, path)
        finally:
            if real is None:
                del sys.modules[module]
            else:
                sys.modules[module] = real
        saved[module] = str(path)
    for module, path in saved.items():
        trusted = [True] if module != "__main__" else [False, True]  # an absent __main__ name is no payload
        for trust in trusted:
            with pytest.raises(CheckpointError, match="pickles " + module + r"\.SavedBy, which is not available "
                               "here") as err:
                load_checkpoint_file(path, trust=trust)
            assert "truncated" not in str(err.value) and path in str(err.value)
        if module != "__main__":  # a module that is not loaded may hold a payload: trusting stays the user's call
            with pytest.raises(UntrustedCheckpointError):
                load_checkpoint_file(path)
