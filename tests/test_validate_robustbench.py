"""validate_robustbench.py: RobustBench protocol, report, resume after a kill, shards, merge, errors.

The model (tests/robustbench_toy.py) classifies by the mean red value, so which examples are
clean-correct and which survive AutoAttack at eps 8/255 is known in closed form. Only example 0
of the CIFAR set survives (AutoAttack's four attacks then run in full on it, ~5 s); every other
example is misclassified or broken by APGD-CE at once.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import robustbench_toy as toy  # noqa: E402  (registers rb_toy / rb_toy_16 in timm)

import validate_robustbench  # noqa: E402
from src import eval_state, robustbench, storage  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY_SCRIPT = os.path.join(ROOT, "tests", "robustbench_toy.py")

CENTRES = {0: 0.125, 1: 0.375, 2: 0.625, 3: 0.875}  # decision boundaries at 0.25, 0.5, 0.75
# (red value, label): clean-correct and robust (margin 0.125 > 8/255); correct but 0.009 from a
# boundary (broken); misclassified. Examples 6.. are never evaluated (n_examples 6).
CIFAR_EXAMPLES = [(0.125, 0), (0.26, 1), (0.49, 1), (0.6, 0), (0.74, 2), (0.875, 1),
                  (0.375, 1), (0.625, 2), (0.125, 0), (0.875, 3)]
N = 6
EPS = 8


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """AutoAttack on a tiny model is dominated by per-op overhead: one thread is fastest on 2 shared cores."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _red_bytes(red: float) -> int:
    return int(round(red * 255))


def _write_cifar(root: str, examples) -> None:
    """torchvision's cifar-10-batches-py/test_batch layout: a python-2-style pickle of a dict."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(len(examples), 3, 32, 32), dtype=np.uint8)
    for i, (red, _) in enumerate(examples):
        imgs[i, 0] = _red_bytes(red)
    entry = {"batch_label": "testing batch 1 of 1", "labels": [lab for _, lab in examples],
             "data": imgs.reshape(len(examples), -1), "filenames": [f"img_{i}.png" for i in range(len(examples))]}
    with open(os.path.join(folder, "test_batch"), "wb") as f:
        pickle.dump(entry, f, protocol=2)


def _expected(examples, centres, eps_255):
    clean, robust = [], []
    for red, label in examples:
        r = _red_bytes(red) / 255
        ok = toy.predict(r, centres) == label
        clean.append(int(ok))
        robust.append(int(ok and toy.margin(r, centres) > eps_255 / 255 + 1e-3))
    return clean, robust


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("rb_cifar")
    _write_cifar(str(root), CIFAR_EXAMPLES)
    ckpt = root / "toy.pth"
    torch.save(toy.toy_state_dict(CENTRES, 4), ckpt)
    return {"root": str(root), "ckpt": str(ckpt)}


def _cifar_args(cifar, out, *extra):
    return ["--model", "rb_toy", "--checkpoint", cifar["ckpt"], "--dataset", "cifar10", "--data-dir", cifar["root"],
            "--num-classes", "4", "--n-examples", str(N), "--batch-size", "2", "--eps", str(EPS), "--workers", "0",
            "--output", str(out), *extra]


def _read(path):
    with open(path) as f:
        return json.load(f)


def _processed_chunks(text: str):
    return re.findall(r"evaluated examples \[(\d+), (\d+)\)", text)


PROTOCOL_KEYS = ("dataset", "eps", "clean_acc", "autoattack_acc", "threat_model", "n_examples", "clean_accuracy",
                 "robust_accuracy", "clean_correct", "robust_correct", "per_example", "examples", "config_fingerprint")


def _protocol(report):
    return {k: report[k] for k in PROTOCOL_KEYS}


@pytest.fixture(scope="module")
def baseline(cifar, tmp_path_factory):
    """One uninterrupted single-process run (3 chunks of 2 examples)."""
    out = tmp_path_factory.mktemp("rb_base") / "report.json"
    assert validate_robustbench.main(_cifar_args(cifar, out)) == 0
    return _read(out), str(out)


# ----------------------------------------------------------------------------------------------
# shipped data


def test_shipped_imagenet_ids_and_class_map():
    ids = robustbench.load_imagenet_ids()
    class_map = robustbench.load_imagenet_class_map()
    assert robustbench.IMAGENET_IDS_FILE.startswith(os.path.join(ROOT, "data"))
    assert len(ids) == 5000 and len(set(ids)) == 5000
    assert all(re.fullmatch(r"n\d{8}/ILSVRC2012_val_\d{8}\.JPEG", i) for i in ids)
    assert all(i.split("/")[0] in class_map for i in ids)
    assert sorted(class_map.values()) == list(range(1000))
    assert [w for w, _ in sorted(class_map.items(), key=lambda kv: kv[1])] == sorted(class_map)  # wnid -> index


def test_eps_and_accuracy_formats():
    assert robustbench.format_eps(8, "Linf") == "8/255"
    assert robustbench.format_eps(4, "linf") == "4/255"
    assert robustbench.format_eps(127.5, "L2") == "0.5"
    assert robustbench.format_accuracy(0.476) == "47.60"
    assert robustbench.canonical_threat_model("l2") == "L2"


# ----------------------------------------------------------------------------------------------
# evaluation state (generic)


def test_eval_state_chunks_record_merge_and_refusal():
    assert eval_state.plan_chunks(5, 2) == [(0, 2), (2, 4), (4, 5)]
    assert eval_state.plan_chunks(5, 0) == [(0, 5)]
    assert eval_state.shard_chunks(eval_state.plan_chunks(7, 1), 3, 1) == [(1, 2), (4, 5)]

    folder = "memory://rb_state_unit"
    fp = {"model": "m", "eps": 8, "seed": 0}
    s0 = eval_state.EvalState(folder, fp, 5, 2, ("ok",), shard_id=0, num_shards=2)
    assert s0.load() == {}
    s0.begin_run()
    s0.record(0, 2, {"ok": [1, 0]})
    s0.record(4, 5, {"ok": [1]}, {"seconds": 1.0})
    with pytest.raises(ValueError):
        s0.record(1, 3, {"ok": [1, 1]})  # not a chunk
    merged = s0.merge()
    assert not merged.complete and merged.missing == [(2, 4)]
    # a later run with another shard count sees what is done and only does the rest
    s1 = eval_state.EvalState(folder, fp, 5, 2, ("ok",), shard_id=0, num_shards=1)
    done = s1.load()
    assert sorted(done) == [0, 4] and s1.pending(done) == [(2, 4)]
    s1.record(2, 4, {"ok": [0, 1]})
    merged = s1.merge()
    assert merged.complete and merged.values["ok"] == [1, 0, 0, 1, 1]
    # another configuration is refused, naming what differs
    other = eval_state.EvalState(folder, {**fp, "eps": 4}, 5, 2, ("ok",))
    with pytest.raises(eval_state.EvalStateError, match="another configuration.*eps"):
        other.load()
    # a damaged file is refused too
    storage.atomic_write_text(storage.join(folder, "shard-1-of-2.json"), "{not json")
    with pytest.raises(eval_state.EvalStateError, match="cannot be read"):
        s1.load()


# ----------------------------------------------------------------------------------------------
# CIFAR: report, resume, shards, torchrun


def test_cifar_report_matches_direct_computation(baseline, cifar):
    report, _ = baseline
    clean, robust = _expected(CIFAR_EXAMPLES[:N], CENTRES, EPS)
    assert clean == [1, 1, 1, 0, 1, 0] and robust == [1, 0, 0, 0, 0, 0]  # the fixture's design
    assert report["per_example"]["clean_correct"] == "".join(map(str, clean))
    assert report["per_example"]["robust_correct"] == "".join(map(str, robust))

    # direct computation: the protocol's examples through the checkpoint's model
    examples = robustbench.load_examples("cifar10", cifar["root"], N)
    x, y = robustbench.load_chunk(examples, 0, N)
    assert x.shape == (N, 3, 32, 32) and float(x.min()) >= 0 and float(x.max()) <= 1
    model = toy.RedMeanClassifier(4)
    model.load_state_dict(toy.toy_state_dict(CENTRES, 4))
    direct = model(x).argmax(1).eq(y).int().tolist()
    assert direct == clean

    assert report["dataset"] == "cifar10" and report["threat_model"] == "Linf" and report["eps"] == "8/255"
    assert report["n_examples"] == N == report["examples"]["n_examples"]
    assert report["clean_acc"] == f"{100 * 4 / 6:.2f}" and report["autoattack_acc"] == f"{100 / 6:.2f}"
    assert report["clean_accuracy"] == pytest.approx(4 / 6) and report["robust_accuracy"] == pytest.approx(1 / 6)
    for key in ("link", "name", "authors", "additional_data", "number_forward_passes", "venue", "architecture",
                "reported", "footnote"):
        assert key in report  # RobustBench's model_info fields
    assert report["architecture"] == "rb_toy"
    assert report["examples"]["examples_sha256"] == robustbench.sha256_text("\n".join(map(str, range(N))))
    assert "md5" in report["examples"]["data_check"]  # generated data: not the official file
    assert report["preprocessing"]["loader"] == "ToTensor"
    aa = report["autoattack"]
    assert aa["version"] == "standard" and aa["seed"] == 0 and aa["chunk_size"] == 2
    assert any("target classes" in f for f in aa["flags"])
    prov = report["provenance"]["packages"]
    assert {"torch", "torchvision", "timm", "pyautoattack"} <= set(prov)
    assert report["shards"]["n_chunks"] == 3 and list(report["shards"]["state_files"]) == ["shard-0-of-1.json"]
    assert report["timing"]["compute_seconds"] > 0


@pytest.mark.slow  # the integration lane (make test-slow): keeps the main suite within its budget
def test_killed_run_resumes_without_redoing_examples(baseline, cifar, tmp_path, capsys):
    out = tmp_path / "report.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline",
               **{eval_state.KILL_AFTER_CHUNKS_ENV: "1"})
    proc = subprocess.run([sys.executable, TOY_SCRIPT, *_cifar_args(cifar, out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert "0 already done, 3 to do" in proc.stderr  # killed right after committing its first chunk
    assert not out.exists()
    state = _read(tmp_path / "report.state" / "shard-0-of-1.json")
    assert list(state["chunks"]) == ["0"]

    assert validate_robustbench.main(_cifar_args(cifar, out)) == 0
    err = capsys.readouterr().err
    assert _processed_chunks(err) == [("2", "4"), ("4", "6")]  # chunk [0, 2) is not evaluated again
    assert "1 already done, 2 to do" in err
    report = _read(out)
    assert _protocol(report) == _protocol(baseline[0])
    runs = report["shards"]["state_files"]["shard-0-of-1.json"]["runs"]
    assert [r["chunks_already_done"] for r in runs] == [0, 1]

    # a third run has nothing left to do and rewrites the same report
    assert validate_robustbench.main(_cifar_args(cifar, out)) == 0
    assert _processed_chunks(capsys.readouterr().err) == []
    assert _protocol(_read(out)) == _protocol(baseline[0])


def test_chunks_from_before_the_threat_model_check_are_unknown_not_inside(cifar, tmp_path, capsys):
    """State chunks written before the evaluation counted examples outside the threat model added 0 to
    autoattack.outside_threat_model: a resumed or merged report said 'all inside' for examples never checked."""
    out = tmp_path / "report.json"
    assert validate_robustbench.main(_cifar_args(cifar, out)) == 0
    capsys.readouterr()
    first = _read(out)
    assert first["autoattack"]["outside_threat_model_unchecked"] == 0 and first["warnings"] == []
    state_file = tmp_path / "report.state" / "shard-0-of-1.json"
    state = _read(state_file)
    chunk = state["chunks"]["0"]
    del chunk["info"]["outside_threat_model"]  # as an earlier robust-vits wrote it
    state_file.write_text(json.dumps(state))
    assert validate_robustbench.main(_cifar_args(cifar, out)) == 0
    assert _processed_chunks(capsys.readouterr().err) == []  # nothing evaluated again: the report is rebuilt
    report = _read(out)
    n_old = chunk["end"]  # chunk [0, end)
    assert report["autoattack"]["outside_threat_model_unchecked"] == n_old
    assert any(w.startswith(f"{n_old} of the {N} examples come from state chunks written by an earlier") and
               "unknown" in w for w in report["warnings"]), report["warnings"]
    assert report["robust_accuracy"] == first["robust_accuracy"]


def test_two_shard_jobs_merge_equal_one_shard(baseline, cifar, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert validate_robustbench.main(_cifar_args(cifar, out, "--num-shards", "2", "--shard-id", "1")) == 0
    err = capsys.readouterr().err
    assert _processed_chunks(err) == [("2", "4")] and not out.exists()
    assert "still to be done by other shards" in err
    # --merge-only before every shard is done: one clear line, exit 2
    assert validate_robustbench.main(_cifar_args(cifar, out, "--num-shards", "2", "--merge-only")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cannot merge: 4 of 6 examples")

    assert validate_robustbench.main(_cifar_args(cifar, out, "--num-shards", "2", "--shard-id", "0")) == 0
    assert _processed_chunks(capsys.readouterr().err) == [("0", "2"), ("4", "6")]
    report = _read(out)  # written by the last shard to finish
    assert _protocol(report) == _protocol(baseline[0])
    assert sorted(report["shards"]["state_files"]) == ["shard-0-of-2.json", "shard-1-of-2.json"]

    os.remove(out)
    assert validate_robustbench.main(_cifar_args(cifar, out, "--num-shards", "2", "--merge-only")) == 0
    assert _processed_chunks(capsys.readouterr().err) == []
    assert _protocol(_read(out)) == _protocol(baseline[0])


@pytest.mark.slow  # the integration lane (make test-slow): keeps the main suite within its budget
def test_torchrun_two_processes_merge_equal_one_shard(cifar, tmp_path, capsys):
    # eps 40/255 breaks every example at once (no AutoAttack run in full: the launcher and two
    # interpreters are the cost); survivors across shards are covered by the --num-shards test
    single = tmp_path / "single.json"
    assert validate_robustbench.main(_cifar_args(cifar, single, "--eps", "40")) == 0
    assert _read(single)["per_example"]["robust_correct"] == "000000"
    capsys.readouterr()

    out = tmp_path / "report.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline")
    env.pop(eval_state.KILL_AFTER_CHUNKS_ENV, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", TOY_SCRIPT,
           *_cifar_args(cifar, out, "--eps", "40", "--poll-seconds", "0.2")]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(_processed_chunks(proc.stderr)) == [("0", "2"), ("2", "4"), ("4", "6")]
    assert "[shard 1/2] evaluated examples [2, 4)" in proc.stderr
    report = _read(out)
    assert _protocol(report) == _protocol(_read(single))
    assert sorted(report["shards"]["state_files"]) == ["shard-0-of-2.json", "shard-1-of-2.json"]


def test_state_of_another_configuration_is_refused(baseline, cifar, capsys):
    _, out = baseline
    state_dir = robustbench.default_state_dir(out)
    before = {n: open(os.path.join(state_dir, n)).read() for n in os.listdir(state_dir)}
    args = _cifar_args(cifar, out, "--seed", "1", "--output", out + ".seed1.json", "--state-dir", state_dir)
    assert validate_robustbench.main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: evaluation state") and "another configuration" in lines[-1]
    assert "seed: 0 there vs 1 now" in lines[-1]
    assert {n: open(os.path.join(state_dir, n)).read() for n in os.listdir(state_dir)} == before
    assert not os.path.exists(out + ".seed1.json")


# ----------------------------------------------------------------------------------------------
# ImageNet subset


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    """The first 5 RobustBench ids as solid-colour JPEGs in <root>/val/<wnid>/ (plus a stray image)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("rb_imagenet")
    ids = robustbench.load_imagenet_ids()[:5]
    class_map = robustbench.load_imagenet_class_map()
    labels = [class_map[i.split("/")[0]] for i in ids]
    centres = {}
    for lab in labels:
        centres.setdefault(lab, 0.1 + 0.2 * len(centres))
    # examples 0, 2, 4 clean-correct but 0.01 from a boundary (broken at 8/255); 1, 3 misclassified
    reds = []
    for k, lab in enumerate(labels):
        c = centres[lab]
        up = any(o > c for o in centres.values())  # is there a decision boundary above c?
        reds.append((c + 0.09 if up else c - 0.09) if k % 2 == 0 else (c + 0.2 if c + 0.2 < 1 else c - 0.2))
    for entry, red in zip(ids, reds):
        path = root / "val" / entry
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (24, 20), (_red_bytes(red), 90, 160)).save(path, format="JPEG", quality=100)
    stray = root / "val" / "n01440764" / "ILSVRC2012_val_99999999.JPEG"
    stray.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 20), (0, 0, 0)).save(stray, format="JPEG")
    ckpt = root / "toy1000.pth"
    torch.save(toy.toy_state_dict(centres, 1000), ckpt)
    return {"root": str(root), "ckpt": str(ckpt), "ids": ids, "labels": labels, "centres": centres}


def _imagenet_args(imagenet, out, *extra):
    return ["--model", "rb_toy_16", "--checkpoint", imagenet["ckpt"], "--dataset", "imagenet",
            "--data-dir", imagenet["root"], "--n-examples", "5", "--batch-size", "8", "--eps", str(EPS),
            "--workers", "0", "--output", str(out), *extra]


def test_imagenet_subset_report(imagenet, tmp_path):
    out = tmp_path / "imagenet.json"
    assert validate_robustbench.main(_imagenet_args(imagenet, out)) == 0
    report = _read(out)
    # direct computation on the same examples, read and preprocessed independently
    model = toy.RedMeanClassifier(1000)
    model.load_state_dict(toy.toy_state_dict(imagenet["centres"], 1000))
    tf, desc = robustbench.imagenet_transform(
        {"input_size": (3, 16, 16), "crop_pct": 0.875, "interpolation": "bicubic"}, None)
    from PIL import Image

    xs = torch.stack([tf(Image.open(os.path.join(imagenet["root"], "val", i)).convert("RGB"))
                      for i in imagenet["ids"]])
    assert xs.shape == (5, 3, 16, 16)
    direct = model(xs).argmax(1).eq(torch.tensor(imagenet["labels"])).int().tolist()
    assert direct == [1, 0, 1, 0, 1]
    assert report["per_example"]["clean_correct"] == "10101"
    assert report["per_example"]["robust_correct"] == "00000"
    assert report["clean_acc"] == "60.00" and report["autoattack_acc"] == "0.00"
    assert report["dataset"] == "imagenet" and report["n_examples"] == 5 and report["eps"] == "8/255"
    assert report["preprocessing"]["loader"] == desc == "Resize(18, bicubic) + CenterCrop(16) + ToTensor"
    ex = report["examples"]
    assert ex["examples_sha256"] == robustbench.sha256_text("\n".join(imagenet["ids"]))
    with open(robustbench.IMAGENET_IDS_FILE, "rb") as f:
        import hashlib

        assert ex["ids_file_sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert report["model"]["num_classes"] == 1000  # ImageNet's default class count


def test_imagenet_missing_image_is_one_clear_line(imagenet, tmp_path, capsys):
    args = _imagenet_args(imagenet, tmp_path / "r.json", "--n-examples", "6")
    assert validate_robustbench.main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "1 of the 6 RobustBench ImageNet images are missing" in lines[0]


# ----------------------------------------------------------------------------------------------
# patch size and bad input


def test_patch_size_only_adapted_when_asked(cifar, tmp_path):
    import argparse

    import timm

    net = timm.create_model("xcit_nano_12_p8_224", num_classes=4)
    ckpt = tmp_path / "xcit.pth"
    torch.save(net.state_dict(), ckpt)
    base = ["--model", "xcit_nano_12_p8_224", "--checkpoint", str(ckpt), "--data-dir", cifar["root"],
            "--num-classes", "4", "--n-examples", "2"]
    for extra, expected in (([], 8), (["--patch-size", "4"], 4)):
        args = validate_robustbench.build_parser().parse_args(base + extra)
        robustbench.check_args(args)
        setup = robustbench.setup_evaluation(args)
        assert setup.model_summary["patch_size"] == expected == setup.fingerprint["patch_size"]
        assert isinstance(args, argparse.Namespace)
    args = validate_robustbench.build_parser().parse_args(base + ["--patch-size", "6"])
    robustbench.check_args(args)
    with pytest.raises(robustbench.UsageError, match="--patch-size 6"):
        robustbench.setup_evaluation(args)


def test_normalization_and_in_model_resize(cifar, tmp_path):
    # a training checkpoint whose run normalized inside the model: its mean/std are used
    ckpt = tmp_path / "train.pth.tar"
    torch.save({"model": toy.toy_state_dict(CENTRES, 4), "epoch": 3,
                "normalization": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}, ckpt)
    base = ["--model", "rb_toy", "--checkpoint", str(ckpt), "--data-dir", cifar["root"], "--num-classes", "4",
            "--n-examples", "2"]

    def setup(*extra):
        args = validate_robustbench.build_parser().parse_args(base + list(extra))
        robustbench.check_args(args)
        return robustbench.setup_evaluation(args)

    s = setup()
    assert s.preprocessing["in_model"] == ["ImageNormalizer(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25]) "
                                           "stored in the checkpoint"]
    net = toy.RedMeanClassifier(4)
    net.load_state_dict(toy.toy_state_dict(CENTRES, 4))
    x = torch.full((1, 3, 32, 32), 0.75)
    assert torch.allclose(s.model(x), net(torch.full((1, 3, 32, 32), 1.0)))  # (0.75 - 0.5) / 0.25 = 1
    # --mean/--std win; a missing --std comes from the checkpoint (model_factory's one precedence order:
    # flags > checkpoint > model defaults; the original used 1s here while validate.py used the checkpoint's)
    s = setup("--mean", "0.1")
    assert s.preprocessing["in_model"][0].startswith("ImageNormalizer(mean=[0.1, 0.1, 0.1], std=[0.25, 0.25, 0.25])")
    assert s.fingerprint["preprocessing"]["in_model"] == s.preprocessing["in_model"]

    # --upsample-in-model: the model resizes 32x32 inputs to its own size, differentiably
    resize = robustbench.InModelResize(16, 0.875, "bicubic")
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    y = resize(x)
    assert y.shape == (2, 3, 16, 16)
    y.sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    s = setup("--upsample-in-model")
    assert isinstance(s.model[0], robustbench.InModelResize)
    assert s.preprocessing["in_model"][0] == "Resize(32, bicubic, antialias) + CenterCrop(32)"

    # --normalize (ImageNet only): Normalize appended to the loader's transform
    tf, desc = robustbench.imagenet_transform({"input_size": (3, 224, 224), "crop_pct": 0.875,
                                               "interpolation": "bilinear"}, ((0.5,) * 3, (0.25,) * 3))
    assert desc == ("Resize(256, bilinear) + CenterCrop(224) + ToTensor + "
                    "Normalize(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])")
    assert type(tf.transforms[-1]).__name__ == "Normalize"


@pytest.mark.parametrize("extra, message", [
    (["--data-dir", "/nonexistent/rb"], "CIFAR-10 test set not found: looked for /nonexistent/rb/cifar-10-batches-py"),
    (["--dataset", "svhn"], "--dataset: must be one of cifar10"),
    (["--eps", "-1"], "--eps/--attack-eps: must be a finite number >= 0"),
    (["--threat-model", "L1"], "must be one of Linf, L2, got 'L1'"),
    (["--dataset", "imagenet", "--data-dir", "/nonexistent/rb", "--num-classes", "4"],
     "ImageNet validation images not found: looked for /nonexistent/rb/val"),
    (["--normalize"], "--normalize applies to --dataset imagenet only"),
    (["--patch-size", "4"], "--patch-size applies to XCiT-style models"),
    (["--num-shards", "2", "--shard-id", "2"], "--shard-id: must be in 0..1"),
    (["--n-examples", "11"], "--n-examples 11 is more than the 10 test images"),
    (["--num-classes", "2"], "does not match model rb_toy"),
    (["--num-classes", "2", "--checkpoint", ""], "labels go up to 2 but the model has 2 classes"),
    (["--checkpoint", "/nonexistent/ckpt.pth"], "checkpoint /nonexistent/ckpt.pth not found"),
    (["--log-wandb", "--checkpoint", ""], "--log-wandb needs --checkpoint"),
])
def test_bad_input_is_one_line_and_exit_2(cifar, tmp_path, capsys, extra, message):
    out = tmp_path / "r.json"
    assert validate_robustbench.main(_cifar_args(cifar, out, *extra)) == 2  # argparse: the last value wins
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0] and err.strip().splitlines()[-1] == errors[0], err
    assert "Traceback" not in err and not out.exists()


def test_a_folder_in_place_of_the_cifar_test_file_is_one_line(tmp_path, capsys):
    """<data-dir>/cifar-10-batches-py/test_batch being a folder was an IsADirectoryError traceback."""
    (tmp_path / "cifar-10-batches-py" / "test_batch").mkdir(parents=True)
    out = tmp_path / "r.json"
    args = ["--model", "rb_toy", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--num-classes", "4",
            "--n-examples", "2", "--workers", "0", "--output", str(out)]
    assert validate_robustbench.main(args) == 2
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "test_batch cannot be read as the CIFAR-10 test batch (Is a directory)" in errors[0], err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.parametrize("dataset", ["cifar10", "imagenet"])
def test_missing_data_is_reported_before_the_model_is_built(cifar, imagenet, tmp_path, capsys, monkeypatch, dataset):
    # the examples are read first: a wrong --data-dir costs no model construction (a large model, a download)
    built = []
    monkeypatch.setattr(robustbench, "_build_model", lambda args: built.append(args) or pytest.fail("model built"))
    args = _cifar_args(cifar, tmp_path / "r.json", "--dataset", dataset, "--data-dir", str(tmp_path / "none"))
    assert validate_robustbench.main(args) == 2
    err = capsys.readouterr().err
    assert "not found: looked for " + str(tmp_path / "none") in err and not built


@pytest.mark.parametrize("data_dir", [[], ["--data-dir", "/nonexistent/tfds"]])
def test_tfds_dataset_without_tensorflow_datasets_is_one_line(imagenet, tmp_path, capsys, monkeypatch, data_dir):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # what `import` sees when it is not installed
    out = tmp_path / "r.json"
    args = ["--model", "rb_toy_16", "--checkpoint", imagenet["ckpt"], "--dataset", "tfds/robustbench_image_net",
            "--n-examples", "5", "--eps", str(EPS), "--workers", "0", "--output", str(out), *data_dir]
    assert validate_robustbench.main(args) == 2
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "pip install -r requirements-tfds.txt" in errors[0], err
    assert "Traceback" not in err and not out.exists()


def test_unwritable_report_fails_before_any_attack(cifar, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = blocker / "r.json"
    assert validate_robustbench.main(_cifar_args(cifar, out, "--state-dir", str(tmp_path / "state"))) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (f"error: --output: cannot create the folder {blocker}: {blocker} is a "
                                            "file, not a folder")
    assert _processed_chunks(err) == [] and not (tmp_path / "state").exists()


def test_cifar100_reader_uses_fine_labels_and_file_order(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data = np.arange(3 * 3072, dtype=np.int64).reshape(3, 3072) % 256
    with open(folder / "test", "wb") as f:
        pickle.dump({"data": data.astype(np.uint8), "fine_labels": [42, 7, 99], "coarse_labels": [1, 2, 3],
                     "filenames": ["a", "b", "c"]}, f, protocol=2)
    ex = robustbench.load_examples("cifar100", str(tmp_path), 2)
    assert len(ex) == 2 and ex.labels() == [42, 7]
    x, y = robustbench.load_chunk(ex, 0, 2)
    assert y.tolist() == [42, 7] and x.shape == (2, 3, 32, 32)
    assert float(x[1, 0, 0, 0]) == pytest.approx((3072 % 256) / 255)  # CHW rows, in file order
    assert "first 2 images in file order" in ex.source
    # the pickle may only hold numpy data: anything else is refused, not executed
    with open(folder / "test", "wb") as f:
        pickle.dump({"data": os.system, "fine_labels": []}, f, protocol=2)
    with pytest.raises(robustbench.UsageError, match="not a CIFAR-100 test batch"):
        robustbench.load_examples("cifar100", str(tmp_path), 2)


@pytest.mark.parametrize("explicit", [True, False])
def test_a_file_where_the_state_folder_goes_is_one_error_line(cifar, tmp_path, capsys, explicit):
    """A file named like the state folder (--state-dir FILE, or <output>.state) was a FileExistsError traceback."""
    out = tmp_path / "r.json"
    blocker = tmp_path / ("given" if explicit else "r.state")
    blocker.write_text("not a folder")
    extra = ["--state-dir", str(blocker)] if explicit else []
    assert validate_robustbench.main(_cifar_args(cifar, out, *extra)) == 2
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and f"{blocker} is a file, not a folder" in errors[0] and "Traceback" not in err
    assert blocker.read_text() == "not a folder" and not out.exists()


def test_an_l2_radius_in_pixel_units_is_flagged_in_the_report(cifar, tmp_path, caplog):
    """--eps is in /255 units for L2 too: RobustBench's L2 0.5 typed as is attacks with 0.5/255 (nothing); the
    report says so instead of presenting the number as L2 robustness."""
    out = tmp_path / "l2.json"
    # one example: at this radius every example stays robust, so the whole of AutoAttack runs on each
    assert validate_robustbench.main(_cifar_args(cifar, out, "--threat-model", "L2", "--eps", "0.5",
                                                 "--n-examples", "1")) == 0
    report = _read(out)
    assert report["threat_model"] == "L2" and any("is --attack-eps 127.5" in w for w in report["warnings"])
    assert validate_robustbench.main(_cifar_args(cifar, tmp_path / "linf.json")) == 0
    assert _read(tmp_path / "linf.json")["warnings"] == []


def test_setup_notes_and_examples_outside_the_threat_model_reach_the_report(imagenet, tmp_path):
    """--normalize makes AutoAttack perturb normalized values and clip them into [0, 1]: its adversarial
    examples lie outside the eps-ball of the images, and the probe's/setup's notes were only logged -- the
    report's 'warnings' (what a results table is built from) said nothing."""
    out = tmp_path / "normalized.json"
    assert validate_robustbench.main(_imagenet_args(imagenet, out, "--normalize")) == 0
    report = _read(out)
    assert any(w.startswith("--normalize: the loader normalizes") for w in report["warnings"]), report["warnings"]
    outside = report["autoattack"]["outside_threat_model"]
    assert outside > 0 and any(f"{outside} of the 5 adversarial examples lie outside the attack's threat model" in w
                               for w in report["warnings"]), report["warnings"]
    assert validate_robustbench.main(_imagenet_args(imagenet, tmp_path / "plain.json")) == 0
    plain = _read(tmp_path / "plain.json")
    assert plain["warnings"] == [] and plain["autoattack"]["outside_threat_model"] == 0
