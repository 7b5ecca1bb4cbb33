"""Tests of validate.py and src/validation.py on the embedded digits data.

One small adversarially trained test_vit (a clean epoch, then one PGD-1 epoch at eps 8/255) is
trained once per module and reused: clean accuracy equals a direct forward, robust <= clean,
PGD-50 <= PGD-1 within noise, APGD-CE equals a direct pyautoattack call, result schemas, bulk mode,
several step counts, normalization metadata, XCiT --patch-size, bad input, honesty warnings, W&B
(offline) and torchrun.
"""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
import uuid

import pytest
import timm
import torch
import yaml
from timm.models import register_model
from timm.models._registry import is_model
from torchvision import transforms

import src.models  # noqa: F401 - registers the project's models
import validate as validate_cli
from src import storage
from src import validation as V
from src.bits.device import initialize_device
from src.checkpoint import CheckpointError
from src.data import DigitsDataset
from src.errors import run_cli
from src.utils import normalize_model
from tests.conftest import ROOT, TINY_TRAIN, run_train

# test_vit at 32 px, like TINY_TRAIN; --log-freq 0: no per-batch log lines
EVAL = ["--dataset", "digits", "-m", "test_vit", "--num-classes", "10", "--input-size", "3", "32", "32",
        "--crop-pct", "1.0", "--interpolation", "bicubic", "-j", "0", "--log-freq", "0"]
ADV_TRAIN = ["--adv-training", "pgd", "--attack-eps", "8", "--attack-steps", "1", "--eps-schedule", "linear",
             "--eps-schedule-period", "1", "--zero-eps-epochs", "1", "--epochs", "2", "--adv-clean-logits", "skip"]
EXPECTED_CSV = list(V.RESULT_KEYS)


pytestmark = pytest.mark.usefixtures("single_cpu_thread")


@pytest.fixture(scope="module")
def adv_run(tmp_path_factory):
    """Epoch 0 clean (eps 0), epoch 1 PGD-1 adversarial training at 8/255 (about 60% clean, 44% PGD-1)."""
    out = tmp_path_factory.mktemp("advtrain")
    res = run_train(TINY_TRAIN + ADV_TRAIN + ["--output", str(out), "--experiment", "adv"])
    return res["output_dir"]


@pytest.fixture(scope="module")
def adv_ckpt(adv_run):
    return os.path.join(adv_run, "last.pth.tar")


def _cli(argv, capsys):
    """Run validate.py in-process through run_cli: (exit code, stdout, stderr)."""
    rc = run_cli(validate_cli.main, list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _result(stdout: str):
    return json.loads(stdout.split("--result\n", 1)[1])


def _warning_lines(stdout: str):
    return [line for line in stdout.split("--result", 1)[0].splitlines() if line.startswith("WARNING: ")]


def _net(ckpt_path: str, name: str = "test_vit") -> torch.nn.Module:
    net = timm.create_model(name, num_classes=10, img_size=32)
    net.load_state_dict(torch.load(ckpt_path, map_location="cpu", weights_only=True)["model"])
    return net.eval()


def _digits(n=None):
    ds = DigitsDataset("validation")
    n = len(ds) if n is None else n
    x = torch.stack([transforms.ToTensor()(ds[i][0]) for i in range(n)])
    y = torch.as_tensor([ds[i][1] for i in range(n)])
    return x, y


def _noise(acc: float, n: int) -> float:
    return max(V.binomial_se(acc, n), 100.0 / n)


# ----------------------------------------------------------------------------------------------
# accuracy


def test_clean_accuracy_equals_direct_forward(adv_ckpt, capsys):
    rc, out, _ = _cli(EVAL + ["--checkpoint", adv_ckpt, "--no-normalize", "-b", "64"], capsys)
    assert rc == 0
    res = _result(out)
    x, y = _digits()
    with torch.no_grad():
        logits = _net(adv_ckpt)(x)
    top1 = 100.0 * (logits.argmax(1) == y).float().mean().item()
    top5 = 100.0 * (logits.topk(5, 1).indices == y[:, None]).any(1).float().mean().item()
    loss = torch.nn.functional.cross_entropy(logits, y).item()
    assert res["top1"] == pytest.approx(round(top1, 4), abs=1e-4)
    assert res["top5"] == pytest.approx(round(top5, 4), abs=1e-4)
    assert res["loss"] == pytest.approx(loss, abs=1e-3)
    assert res["top1"] > 40  # the fixture learned something (chance is 10%)
    # no attack: no robust numbers, written as JSON null (bare NaN is not JSON)
    assert res["robust_top1"] is None and res["adv_loss"] is None
    assert "NaN" not in out
    assert res["warnings"] == []


def test_pgd_steps_robust_below_clean_and_stronger_attack_lower(adv_ckpt, capsys, tmp_path):
    csv_path = str(tmp_path / "pgd.csv")
    rc, out, _ = _cli(EVAL + ["--checkpoint", adv_ckpt, "--no-normalize", "-b", "50", "--num-examples", "100",
                              "--attack", "pgd", "--attack-eps", "8", "--attack-steps", "1", "50",
                              "--results-file", csv_path], capsys)
    assert rc == 0
    rows = _result(out)
    assert [r["attack_steps"] for r in rows] == [1, 50]
    for r in rows:
        assert r["robust_top1"] <= r["top1"] and r["robust_top5"] <= r["top5"]
        assert r["robust_top1"] < r["top1"]  # eps 8/255 breaks some examples
    assert rows[0]["top1"] == rows[1]["top1"]  # same 100 examples for both step counts
    # PGD-50 may not beat PGD-1 by more than noise: one binomial standard error on the 100 examples
    assert rows[1]["robust_top1"] <= rows[0]["robust_top1"] + _noise(rows[0]["robust_top1"], 100)
    with open(csv_path) as f:
        table = list(csv.reader(f))
    assert table[0] == EXPECTED_CSV + ["attack_steps"]
    assert [r[-1] for r in table[1:]] == ["1", "50"]


def test_num_examples_full_batches_and_reported(adv_ckpt, capsys):
    args = V.parse_args(EVAL + ["--checkpoint", adv_ckpt, "--no-normalize", "-b", "40", "--num-examples", "100"])
    run_ = V.validate(args)
    assert run_.num_examples == 80  # 100 // 40 = 2 full batches, like the original
    rc, _, err = _cli(EVAL + ["--checkpoint", adv_ckpt, "--no-normalize", "-b", "200", "--num-examples", "100"],
                      capsys)
    assert rc == 2 and "less than one full batch" in err


@pytest.mark.slow  # the integration lane (make test-slow): keeps the main suite within its budget
def test_apgd_ce_matches_direct_pyautoattack(adv_ckpt, capsys):
    from pyautoattack import AutoAttack

    n, eps = 16, 8
    rc, out, _ = _cli(EVAL + ["--checkpoint", adv_ckpt, "--no-normalize", "-b", str(n), "--num-examples", str(n),
                              "--attack", "apgd-ce", "--attack-eps", str(eps), "--seed", "0"], capsys)
    assert rc == 0
    res = _result(out)
    x, y = _digits(n)
    model = _net(adv_ckpt)
    adversary = AutoAttack(model, norm="Linf", eps=eps / 255, version="custom", attacks=["apgd-ce"], seed=0,
                           device="cpu")
    adversary.apgd.n_restarts = 5  # the original's apgd-ce: constructor default of 5 restarts
    x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=n)
    with torch.no_grad():
        direct = 100.0 * (model(x_adv).argmax(1) == y).float().mean().item()
    assert res["robust_top1"] == pytest.approx(direct, abs=1e-4)
    assert 0 < res["robust_top1"] <= res["top1"]  # an intermediate, non-trivial comparison


@pytest.mark.slow  # integration lane (make test-slow): over 10 s on 2 cores
def test_autoattack_standard_matches_direct_pyautoattack(adv_ckpt, capsys):
    from pyautoattack import AutoAttack

    n, eps = 4, 8  # a few survivors: all four attacks run, so keep n small
    rc, out, _ = _cli(EVAL + ["--checkpoint", adv_ckpt, "--no-normalize", "-b", str(n), "--num-examples", str(n),
                              "--attack", "autoattack", "--attack-eps", str(eps), "--seed", "0"], capsys)
    assert rc == 0
    res = _result(out)
    assert res["robust_top1"] <= res["top1"]
    assert not any("AutoAttack check" in w for w in res["warnings"])
    x, y = _digits(n)
    model = _net(adv_ckpt)
    adversary = AutoAttack(model, norm="Linf", eps=eps / 255, version="standard", seed=0, device="cpu")
    x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=n)
    with torch.no_grad():
        direct = 100.0 * (model(x_adv).argmax(1) == y).float().mean().item()
    assert res["robust_top1"] == pytest.approx(direct, abs=1e-4)


# ----------------------------------------------------------------------------------------------
# outputs


def test_csv_and_json_schemas(adv_ckpt, capsys, tmp_path):
    csv_path = str(tmp_path / "out" / "r.csv")
    json_path = f"memory://validate-{uuid.uuid4().hex[:8]}/r.json"
    for path in (csv_path, json_path):
        rc, out, _ = _cli(EVAL + ["--checkpoint", adv_ckpt, "--no-normalize", "-b", "100", "--num-examples", "100",
                                  "--results-file", path], capsys)
        assert rc == 0
    with open(csv_path) as f:
        table = list(csv.reader(f))
    assert table[0] == EXPECTED_CSV and len(table) == 2
    row = dict(zip(table[0], table[1]))
    assert row["robust_top1"] == "nan" and row["img_size"] == "32" and row["cropt_pct"] == "1.0"
    assert float(row["param_count"]) == pytest.approx(0.3, abs=0.01)
    data = json.loads(storage.read_text(json_path))
    assert list(data) == EXPECTED_CSV + ["warnings"]
    assert data["top1"] == float(row["top1"]) and data["interpolation"] == "bicubic"
    assert not any(storage.is_temp_name(n) for n in os.listdir(tmp_path / "out"))  # atomic write


def test_bulk_mode_over_checkpoint_folder(adv_run, capsys, tmp_path, monkeypatch):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    shutil.copy(os.path.join(adv_run, "checkpoint-0.pth.tar"), folder / "ckpt-10.pth.tar")  # clean epoch
    shutil.copy(os.path.join(adv_run, "last.pth.tar"), folder / "ckpt-2.pth")
    (folder / "notes.txt").write_text("not a checkpoint")
    assert V.find_checkpoints(str(folder)) == [str(folder / "ckpt-2.pth"), str(folder / "ckpt-10.pth.tar")]
    monkeypatch.chdir(tmp_path)
    rc, out, _ = _cli(EVAL + ["--checkpoint", str(folder), "--no-normalize", "-b", "100", "--num-examples", "100",
                              "--attack", "pgd", "--attack-eps", "8", "--attack-steps", "2"], capsys)
    assert rc == 0
    assert not (tmp_path / "results-all.csv").exists()  # never the current directory by surprise
    with open(folder / "results-all.csv") as f:  # the default bulk results file: in the evaluated folder
        rows = list(csv.DictReader(f))
    with open(folder / "results-all.csv") as f:
        assert next(csv.reader(f)) == ["model"] + EXPECTED_CSV + ["checkpoint"]
    assert sorted(r["checkpoint"] for r in rows) == sorted([str(folder / "ckpt-2.pth"),
                                                            str(folder / "ckpt-10.pth.tar")])
    assert all(r["model"] == "test_vit" for r in rows)
    robust = [float(r["robust_top1"]) for r in rows]  # an attack ran: ranked by robust accuracy
    assert robust == sorted(robust, reverse=True)
    assert len(_result(out)) == 2


def test_bulk_mode_keeps_going_after_a_bad_checkpoint(adv_ckpt, capsys, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(adv_ckpt, folder / "good.pth.tar")
    (folder / "broken.pth.tar").write_bytes(b"\x00" * 10)
    out_csv = str(tmp_path / "bulk.csv")
    rc, out, err = _cli(EVAL + ["--checkpoint", str(folder), "--no-normalize", "-b", "100", "--num-examples", "100",
                                "--results-file", out_csv], capsys)
    assert rc == 2 and "1 of 2 evaluations failed" in err and "broken.pth.tar" in err
    with open(out_csv) as f:
        rows = list(csv.DictReader(f))
    assert [os.path.basename(r["checkpoint"]) for r in rows] == ["good.pth.tar"]


def test_retry_halves_batch_size_on_runtime_error():
    args = V.parse_args(EVAL + ["-b", "100"])
    seen = []

    def fake(a):
        seen.append(a.batch_size)
        if a.batch_size > 25:
            raise torch.OutOfMemoryError("out of memory")
        return a.batch_size

    assert V.retry_smaller_batch(fake, args) == 25
    assert seen == [100, 50, 25]

    def bug(a):
        seen.append(a.batch_size)
        raise RuntimeError("shape mismatch inside the model")

    seen.clear()
    with pytest.raises(RuntimeError, match="shape mismatch"):
        V.retry_smaller_batch(bug, args)
    assert seen == [100]  # only out-of-memory shrinks the batch; other errors are bugs to show

    def bad_checkpoint(a):
        seen.append(a.batch_size)
        raise CheckpointError("checkpoint x does not match model y")

    seen.clear()
    with pytest.raises(CheckpointError):
        V.retry_smaller_batch(bad_checkpoint, args)
    assert seen == [100]  # expected errors are not retried


# ----------------------------------------------------------------------------------------------
# model building


def test_normalize_model_metadata_restored_from_checkpoint(adv_ckpt, tmp_path, capsys):
    mean, std = (0.2, 0.3, 0.4), (0.5, 0.6, 0.7)
    ckpt = torch.load(adv_ckpt, map_location="cpu", weights_only=True)
    ckpt["normalization"] = {"mean": list(mean), "std": list(std)}
    path = str(tmp_path / "normalized.pth.tar")
    torch.save(ckpt, path)
    dev_env = initialize_device(force_cpu=True)
    for extra in (["--normalize-model"], []):  # restored with the flag, and implied without it
        args = V.parse_args(EVAL + ["--checkpoint", path, "-b", "100"] + extra)
        em = V.create_eval_model(args, dev_env)
        assert em.normalization == "model"
        assert em.mean == pytest.approx(mean) and em.std == pytest.approx(std)
    # evaluation equals a direct forward of the network behind a (x - mean) / std layer on [0, 1] pixels
    rc, out, _ = _cli(EVAL + ["--checkpoint", path, "--normalize-model", "-b", "100"], capsys)
    assert rc == 0
    x, y = _digits()
    with torch.no_grad():
        logits = normalize_model(_net(adv_ckpt), mean, std)(x)
    assert _result(out)["top1"] == pytest.approx(100.0 * (logits.argmax(1) == y).float().mean().item(), abs=1e-4)
    # explicit --mean/--std win, and a mismatch with the recorded normalization is reported
    args = V.parse_args(EVAL + ["--checkpoint", path, "--normalize-model", "--mean", "0.5", "--std", "0.5"])
    em = V.create_eval_model(args, dev_env)
    assert em.mean == (0.5, 0.5, 0.5) and any("override the checkpoint's recorded normalization" in n
                                              for n in em.notes)


def test_patch_size_surgery_on_xcit(tmp_path, capsys):
    torch.manual_seed(0)
    net = timm.create_model("xcit_nano_12_p16_224", num_classes=10, img_size=32)
    path = str(tmp_path / "xcit.pth.tar")
    torch.save({"model": net.state_dict()}, path)
    common = ["--dataset", "digits", "-m", "xcit_nano_12_p16_224", "--num-classes", "10", "--img-size", "32",
              "--crop-pct", "1.0", "-j", "0", "--log-freq", "0", "--checkpoint", path, "--no-normalize",
              "-b", "8", "--num-examples", "8"]
    em = V.create_eval_model(V.parse_args(common + ["--patch-size", "4"]), initialize_device(force_cpu=True))
    assert em.model.patch_embed.patch_size == 4
    with torch.no_grad():
        tokens = em.model.forward_features(torch.rand(2, 3, 32, 32))
    assert tokens.shape[1] == 1 + 8 * 8  # class token + an 8x8 grid of 4-pixel patches (2x2 without surgery)
    rc, out, _ = _cli(common + ["--patch-size", "4", "--attack", "pgd", "--attack-steps", "2"], capsys)
    assert rc == 0 and _result(out)["img_size"] == 32
    rc, _, err = _cli(common + ["--patch-size", "6"], capsys)
    assert rc == 2 and err.strip().splitlines()[-1].startswith("error: --patch-size 6")
    # the model's own patch size is a no-op (it exited 2 here while the other CLIs accepted it)
    em = V.create_eval_model(V.parse_args(common + ["--patch-size", "16"]), initialize_device(force_cpu=True))
    assert em.model.patch_embed.patch_size == 16
    rc, out, _ = _cli(common + ["--patch-size", "16"], capsys)
    assert rc == 0 and _result(out)["top1"] == _result(_cli(common, capsys)[1])["top1"]


def test_patch_size_rejected_for_non_xcit(adv_ckpt, capsys):
    rc, _, err = _cli(EVAL + ["--checkpoint", adv_ckpt, "--patch-size", "4"], capsys)
    assert rc == 2 and "--patch-size 4" in err and "XCiT" in err


def test_evaluate_model_per_example_api(adv_ckpt):
    """The reusable loop: exact counts plus per-example tensors with dataset indices."""
    args = V.parse_args(EVAL + ["--checkpoint", adv_ckpt, "--no-normalize", "-b", "32", "--attack", "pgd",
                                "--attack-steps", "2", "--attack-eps", "8"])
    dev_env = initialize_device(force_cpu=True)
    em = V.create_eval_model(args, dev_env)
    loader = V.create_eval_loader(args, em, dev_env)
    attack = V.build_eval_attack(args, 2, em.num_classes, dev_env)
    ev = V.evaluate_model(em.model, loader, dev_env, attack, max_batches=2, return_per_example=True)
    per = ev.per_example
    assert ev.num_examples == ev.local_examples == 64 and ev.indices.tolist() == list(range(64))
    assert int(per["clean_correct"].sum()) == ev.clean_correct1
    assert int(per["robust_correct"].sum()) == ev.robust_correct1
    assert torch.equal(per["clean_correct"], per["clean_pred"] == per["label"])
    assert ev.top1 == pytest.approx(100 * ev.clean_correct1 / 64) and ev.zero_grad_fraction == 0.0
    assert not any(p.requires_grad for p in em.model.parameters())  # attacks only need input gradients


def test_valid_labels_restrict_logits_for_clean_and_attack():
    base = torch.nn.Linear(4, 6)
    wrapped = V.ValidLabels(base, [5, 1, 3])
    x = torch.rand(2, 4)
    assert torch.equal(wrapped(x), base(x)[:, [5, 1, 3]])


# ----------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("extra, needle", [
    (["--attack", "fgsm"], "--attack: must be one of '', pgd, targeted_pgd, apgd-ce, autoattack, got 'fgsm'"),
    (["--attack", "pgd", "--attack-eps", "-1"], "--attack-eps/--eps: must be"),
    (["--checkpoint", "/nonexistent/ck.pth.tar"], "not found"),
    (["--attack", "apgd-ce", "--attack-steps", "10", "20"], "several --attack-steps"),
    (["--real-labels", "/nonexistent/real.json"], "--real-labels file /nonexistent/real.json does not exist"),
    (["--attack-lr", "-2", "--attack", "pgd"], "--attack-lr: must be"),
    (["--input-size", "3", "200000", "200000"], "--input-size 3 200000 200000: one batch of"),
    (["-j", "1000"], "--workers: must be an integer in [0, 128], got '1000'"),
])
def test_bad_input_one_line_exit_2(extra, needle, capsys):
    rc, out, err = _cli(EVAL + extra, capsys)
    assert rc == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and needle in lines[-1]
    assert sum(line.startswith("error: ") for line in lines) == 1
    assert "--result" not in out


def _imagenet_like_folder(root, n: int) -> str:
    """``<root>/validation/<label>/ILSVRC2012_val_<k>.JPEG`` from the first ``n`` validation digits."""
    from PIL import Image

    ds = DigitsDataset("validation")
    per_class = {c: [i for i, t in enumerate(ds.targets) if int(t) == c][:n // 10] for c in range(10)}
    picks = sorted(i for idx in per_class.values() for i in idx)  # every class present, as a real val split
    for k, i in enumerate(picks):
        folder = os.path.join(str(root), "validation", str(int(ds.targets[i])))
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(ds.images[i]).save(os.path.join(folder, f"ILSVRC2012_val_{k + 1:08d}.JPEG"))
    return str(root)


def test_real_labels_clean_real_accuracy_robust_against_dataset_labels(tmp_path, capsys):
    """--real-labels: top1/top5 through timm's RealLabelsImagenet (images with no ReaL label are skipped),
    robust accuracy unchanged (the dataset's labels)."""
    n = 20
    root = _imagenet_like_folder(tmp_path / "imagenet", n)
    real = tmp_path / "real.json"
    real.write_text(json.dumps([list(range(10)) if k % 2 == 0 else [] for k in range(n)]))
    torch.manual_seed(0)
    ckpt = str(tmp_path / "vit.pth")
    torch.save(timm.create_model("test_vit", num_classes=10, img_size=32).state_dict(), ckpt)
    common = [root, "--checkpoint", ckpt] + EVAL[2:] + ["--no-normalize", "--attack", "pgd", "--attack-steps", "1",
                                                         "--attack-eps", "8"]
    rc, out, _ = _cli(common, capsys)
    assert rc == 0
    plain = _result(out)
    rc, out, err = _cli(common + ["--real-labels", str(real)], capsys)
    assert rc == 0
    res = _result(out)
    assert plain["top1"] < 100 and res["top1"] == 100.0 and res["top5"] == 100.0  # every ReaL set holds all classes
    assert (res["robust_top1"], res["adv_loss"]) == (plain["robust_top1"], plain["adv_loss"])
    assert "ImageNet-ReaL clean accuracy" in err
    real.write_text(json.dumps([[1]] * (n + 1)))  # labels of another image set
    rc, _, err = _cli(common + ["--real-labels", str(real)], capsys)
    assert rc == 2 and err.strip().splitlines()[-1].startswith("error: --real-labels")
    rc, _, err = _cli(EVAL + ["--checkpoint", ckpt, "--no-normalize", "--real-labels", str(real)], capsys)  # digits
    assert rc == 2 and "needs an ImageNet validation image folder" in err


def test_checkpoint_for_another_class_count(adv_ckpt, capsys):
    argv = [a if a != "10" else "5" for a in EVAL] + ["--checkpoint", adv_ckpt]
    rc, _, err = _cli(argv, capsys)
    assert rc == 2
    assert err.strip().splitlines()[-1].startswith("error: checkpoint") and "does not match model" in err


def test_bad_input_real_process_exit_code():
    out = subprocess.run([sys.executable, "validate.py", "--dataset", "digits", "--attack", "fgsm"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]  # exactly one line
    assert out.stderr.startswith("error: validate.py: argument --attack: must be one of") and "'fgsm'" in out.stderr


# ----------------------------------------------------------------------------------------------
# honesty checks


def test_binomial_standard_error():
    assert V.binomial_se(50.0, 100) == pytest.approx(5.0)
    assert V.binomial_se(0.0, 100) == 0.0
    assert math.isnan(V.binomial_se(float("nan"), 100))


def test_stronger_attack_scoring_higher_is_flagged_beyond_noise_only():
    n = 300  # SE of 40% on 300 examples: 2.83 points
    rows = [{"attack_steps": 1, "robust_top1": 40.0}, {"attack_steps": 50, "robust_top1": 45.0}]
    w = V.attack_strength_warnings(rows, n)
    assert len(w) == 1 and "pgd-50 scored a HIGHER robust accuracy" in w[0] and "gradient masking" in w[0]
    rows[1]["robust_top1"] = 42.0  # within one standard error: noise of the random start
    assert V.attack_strength_warnings(rows, n) == []
    rows = [{"attack_steps": 50, "robust_top1": 44.0}, {"attack_steps": 10, "robust_top1": 40.0}]  # any order
    assert any("pgd-50 scored" in m for m in V.attack_strength_warnings(rows, n))


def test_unconverged_attack_is_flagged():
    rows = [{"attack_steps": k, "robust_top1": acc} for k, acc in ((1, 50.0), (10, 40.0), (20, 30.0))]
    w = V.attack_strength_warnings(rows, 300)
    assert len(w) == 1 and "has not converged" in w[0] and "too few" in w[0]
    rows[-1]["robust_top1"] = 39.0  # converged within noise
    assert V.attack_strength_warnings(rows, 300) == []


def test_zero_steps_is_the_random_start_not_an_unconverged_attack():
    """--attack-steps 0 10: PGD-0 is the random start only; the convergence check compares attacks (k >= 1), and
    PGD-0 alone is named as no attack (it said 'at most 0 steps is a weak attack')."""
    rows = [{"attack_steps": 0, "robust_top1": 80.0}, {"attack_steps": 10, "robust_top1": 40.0}]
    assert V.attack_strength_warnings(rows, 300) == []
    rows.append({"attack_steps": 20, "robust_top1": 30.0})
    w = V.attack_strength_warnings(rows, 300)
    assert len(w) == 1 and "from pgd-10 (40.00%) to pgd-20" in w[0]
    w = V.weak_attack_warnings("pgd", [0])
    assert len(w) == 1 and "0 steps is no attack" in w[0]
    assert "at most 5 steps" in V.weak_attack_warnings("pgd", [0, 5])[0]


def test_robust_above_clean_is_flagged():
    row = {"top1": 60.0, "robust_top1": 61.0, "top5": 90.0, "robust_top5": 80.0}
    w = V.robust_above_clean_warnings(row)
    assert len(w) == 1 and "above clean top-1" in w[0] and "randomized" in w[0]
    assert V.robust_above_clean_warnings({"top1": 60.0, "robust_top1": float("nan")}) == []
    assert V.robust_above_clean_warnings({"top1": 60.0, "robust_top1": 60.0}) == []


def test_normalization_and_other_checks():
    assert any("loader-normalized" in w for w in V.normalization_warnings("loader", "pgd"))
    assert V.normalization_warnings("loader", "") == []  # clean accuracy only: nothing to attack
    assert V.normalization_warnings("raw", "pgd", "raw") == []
    assert V.normalization_warnings("model", "pgd", "normalized") == []
    assert any("trained on raw [0, 1] inputs" in w for w in V.normalization_warnings("loader", "", "raw"))
    assert any("trained on normalized inputs" in w for w in V.normalization_warnings("raw", "", "normalized"))
    assert V.gradient_warnings(0.0) == [] and "zero input gradient" in V.gradient_warnings(0.25)[0]
    assert V.weak_attack_warnings("pgd", [1, 5]) and V.weak_attack_warnings("pgd", [1, 10]) == []
    assert V.weak_attack_warnings("apgd-ce", [1]) == []
    all_w = V.honesty_warnings([], 100, attack="apgd-ce", attack_flags=["the model has only 3 classes"])
    assert all_w == ["AutoAttack check: the model has only 3 classes"]


if not is_model("vit_quantized_for_tests"):
    @register_model
    def vit_quantized_for_tests(pretrained: bool = False, **kwargs):
        """test_vit that rounds its input to 8 bits: a gradient-masking 'defense' (zero input gradients)."""
        model = timm.create_model("test_vit", pretrained=pretrained, **kwargs)
        model.register_forward_pre_hook(lambda _m, inp: (torch.round(inp[0] * 255) / 255,))
        return model


def test_gradient_masking_model_is_flagged_end_to_end(adv_ckpt, capsys):
    argv = [a if a != "test_vit" else "vit_quantized_for_tests" for a in EVAL]
    rc, out, _ = _cli(argv + ["--checkpoint", adv_ckpt, "--no-normalize", "-b", "50", "--num-examples", "50",
                              "--attack", "pgd", "--attack-eps", "8", "--attack-steps", "10"], capsys)
    assert rc == 0
    res = _result(out)
    assert any("exactly zero input gradient" in w for w in res["warnings"])
    assert any("zero input gradient" in line for line in _warning_lines(out))
    # the same weights without the quantization: no gradient warning
    rc, out, _ = _cli(EVAL + ["--checkpoint", adv_ckpt, "--no-normalize", "-b", "50", "--num-examples", "50",
                              "--attack", "pgd", "--attack-eps", "8", "--attack-steps", "10"], capsys)
    assert rc == 0 and _result(out)["warnings"] == []


def test_loader_normalized_attack_and_input_mismatch_flagged(adv_ckpt, capsys, tmp_path):
    attack = ["-b", "50", "--num-examples", "50", "--attack", "pgd", "--attack-steps", "2"]
    # the training checkpoint records raw [0, 1] inputs: evaluated that way, without a normalization warning
    rc, out, _ = _cli(EVAL + ["--checkpoint", adv_ckpt] + attack, capsys)
    assert rc == 0
    assert not any("normaliz" in w for w in _result(out)["warnings"])
    # a bare state dict records nothing: the original's default (the loader normalizes), flagged
    bare = str(tmp_path / "bare.pth")
    torch.save(torch.load(adv_ckpt, map_location="cpu", weights_only=True)["model"], bare)
    csv_path = str(tmp_path / "r.csv")
    rc, out, _ = _cli(EVAL + ["--checkpoint", bare, "--results-file", csv_path] + attack, capsys)
    assert rc == 0
    warnings = _result(out)["warnings"]
    assert any("loader-normalized inputs" in w for w in warnings)
    assert any("weak attack" in w for w in warnings)
    assert len(_warning_lines(out)) == len(warnings)
    with open(csv_path) as f:
        assert next(csv.reader(f)) == EXPECTED_CSV  # warnings never become CSV columns
    # normalizing a raw-trained network: the flag contradicts the record, and the inputs mismatch
    rc, out, _ = _cli(EVAL + ["--checkpoint", adv_ckpt, "--normalize-model"] + attack, capsys)
    warnings = _result(out)["warnings"]
    assert any("--normalize-model overrides the checkpoint's record (raw [0, 1] inputs" in w for w in warnings)
    assert any("trained on raw [0, 1] inputs" in w for w in warnings)


# ----------------------------------------------------------------------------------------------
# W&B and distributed


def test_wandb_target_parses_url_and_offline(tmp_path):
    (tmp_path / "args.yaml").write_text(yaml.safe_dump({"wandb_run": "https://wandb.ai/ent/proj/runs/abc123"}))
    assert V.wandb_target(str(tmp_path / "last.pth.tar"))[:3] == ("ent", "proj", "abc123")
    (tmp_path / "args.yaml").write_text(yaml.safe_dump({"wandb_run": "offline:xyz", "experiment": "exp"}))
    assert V.wandb_target(str(tmp_path / "last.pth.tar"))[:3] == (None, "exp", "xyz")
    (tmp_path / "args.yaml").write_text(yaml.safe_dump({"model": "m"}))
    with pytest.raises(Exception, match="no wandb_run"):
        V.wandb_target(str(tmp_path / "last.pth.tar"))


def test_log_wandb_offline_into_the_training_run(adv_ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(adv_ckpt, run_dir / "last.pth.tar")
    (run_dir / "args.yaml").write_text(yaml.safe_dump({"experiment": "wbtest", "wandb_run": "offline:run42"}))
    rc, out, _ = _cli(EVAL + ["--checkpoint", str(run_dir / "last.pth.tar"), "--no-normalize", "-b", "50",
                              "--num-examples", "50", "--attack", "pgd", "--attack-eps", "8", "--attack-steps", "1",
                              "--attack-norm", "l2", "--log-wandb"], capsys)
    assert rc == 0
    runs = [d for d in os.listdir(run_dir / "wandb") if d.startswith("offline-run-")]
    assert len(runs) == 1 and runs[0].endswith("run42")  # resumed the training run's id
    logged = b"".join(open(os.path.join(root, f), "rb").read() for root, _, files in
                      os.walk(run_dir / "wandb" / runs[0]) for f in files if f.endswith(".wandb"))
    assert b"eval_top1-final" in logged and b"pgd-1-8-l2-eval_robust_top1_final" in logged
    # --log-wandb next to a checkpoint without a W&B run: a clear error before evaluating
    os.remove(run_dir / "args.yaml")
    rc, _, err = _cli(EVAL + ["--checkpoint", str(run_dir / "last.pth.tar"), "--log-wandb"], capsys)
    assert rc == 2 and "no args.yaml" in err


@pytest.mark.slow  # the integration lane (make test-slow): keeps the main suite within its budget
def test_torchrun_two_processes_exact_clean_metrics(adv_ckpt, tmp_path, capsys):
    single = str(tmp_path / "single.json")
    common = EVAL + ["--checkpoint", adv_ckpt, "--no-normalize", "--num-examples", "100", "--attack", "pgd",
                     "--attack-steps", "1", "--attack-eps", "8"]
    rc, _, _ = _cli(common + ["-b", "50", "--results-file", single], capsys)
    assert rc == 0
    ddp = str(tmp_path / "ddp.json")
    # 2 processes x 2 batches of 25: the same first 100 examples (process r takes every 2nd one)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "validate.py"] + \
        common + ["-b", "25", "--results-file", ddp]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = json.loads(open(single).read()), json.loads(open(ddp).read())
    for key in ("top1", "top5", "loss"):  # every example exactly once: identical clean numbers
        assert b[key] == pytest.approx(a[key], abs=1e-4), key
    # random starts differ per process, so robust accuracy may move by noise only
    assert abs(b["robust_top1"] - a["robust_top1"]) <= 2 * _noise(a["robust_top1"], 100)
    assert out.stdout.count("--result") == 1  # only the primary process reports


def test_several_eps_give_one_row_each_and_a_robustness_curve(adv_ckpt, tmp_path, capsys):
    """--attack-eps 0 8 32: one row per eps (attack_eps column), robust accuracy falling with eps,
    and the CSV draws as the robustness curve."""
    import csv

    from src.plots import draw

    out = str(tmp_path / "eps.csv")
    rc, stdout, err = _cli(EVAL + ["--checkpoint", adv_ckpt, "--attack", "pgd", "--attack-steps", "2",
                                   "--attack-eps", "0", "8", "32", "--num-examples", "100", "-b", "50",
                                   "--results-file", out], capsys)
    assert rc == 0, err
    rows = list(csv.DictReader(open(out)))
    assert [float(r["attack_eps"]) for r in rows] == [0.0, 8.0, 32.0]
    robust = [float(r["robust_top1"]) for r in rows]
    assert robust[0] == pytest.approx(float(rows[0]["top1"]))  # eps 0 changes nothing
    assert robust[0] >= robust[1] >= robust[2] and robust[2] < robust[0]
    assert len({r["top1"] for r in rows}) == 1  # the same clean pass every time
    files = draw("robustness", [out], str(tmp_path / "fig"))
    assert any(f.endswith(".png") for f in files)
    rc, _, err = _cli(EVAL + ["--checkpoint", adv_ckpt, "--attack", "pgd", "--attack-eps", "8", "8"], capsys)
    assert rc == 2 and "repeated" in err


def test_attack_that_changed_no_prediction_is_flagged():
    row = {"top1": 60.0, "robust_top1": 60.0}
    w = V.unchanged_by_attack_warnings(row, 8.0, 300)
    assert len(w) == 1 and "changed no prediction" in w[0] and "/255" in w[0]
    assert V.unchanged_by_attack_warnings(row, 0.0, 300) == []  # eps 0: nothing to change
    assert V.unchanged_by_attack_warnings(row, 8.0, 300, steps=0) == []  # PGD-0: the random start only
    assert V.unchanged_by_attack_warnings(row, 8.0, 20) == []  # 12 correct examples: plausible
    assert V.unchanged_by_attack_warnings({"top1": 60.0, "robust_top1": 59.0}, 8.0, 300) == []



def test_a_bad_dataset_fails_before_the_model_is_built(tmp_path, monkeypatch, capsys):
    """Without --checkpoint the model comes with pretrained weights: a wrong data argument used to be reported
    only after the weights' download (about 45 s of retries without a network)."""
    import src.validation as validation

    def built(*_a, **_k):
        raise AssertionError("the model was built before the data was checked")

    monkeypatch.setattr(validation, "create_eval_model", built)
    rc = run_cli(validate_cli.main, [str(tmp_path / "no_such_dir"), "-m", "test_vit", "--num-classes", "10", "-j", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and "no_such_dir" in err and "does not exist" in err and "Traceback" not in err
