"""The catalogue of bad inputs: each gives one ``error: ...`` line, exit code 2, no traceback, and
leaves every file already written byte-identical.

Every case runs against a finished one-epoch run with ``--resume auto --epochs 1`` pointing at its
folder, the setting where a careless error path could most easily damage outputs (rewrite
``args.yaml``, truncate ``summary.csv``, replace a checkpoint). A case that was not rejected
would resume, find nothing left to train and exit 0, so the exit code assertion catches it.
Most cases run in-process through ``run_cli`` (the CLI's own wrapper); a few run ``train.py`` as
a real process to prove the exit code and the absence of a traceback end to end.
"""
from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, TINY_TRAIN, run_train


pytestmark = pytest.mark.usefixtures("single_cpu_thread")


class MakeMarker:
    """Unpickling this object creates a directory: stands for any code a checkpoint could run."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def tree(root) -> dict:
    """Every file and folder under ``root`` with the hash of its bytes (folders: None)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = None
        for f in filenames:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def _write_idx(path: str, magic: int, dims, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(struct.pack(">" + "I" * (1 + len(dims)), magic, *dims))
        f.write(data)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A finished run (``out/e``) plus the bad files the cases point at (under ``inputs/``)."""
    base = tmp_path_factory.mktemp("bad_inputs")
    out, inp = base / "out", base / "inputs"
    inp.mkdir()
    run_train(TINY_TRAIN + ["--epochs", "1", "--output", str(out), "--experiment", "e"])
    run_dir = out / "e"
    good = (run_dir / "last.pth.tar").read_bytes()
    files = {
        "typo.yaml": "epochs: 1\nmodle: test_vit\n",
        "unknown.yaml": "epochs: 1\ntotally_unknown_option: 3\n",
        "bad.yaml": "epochs: [1, 2\nmodel: test_vit\n",
        "list.yaml": "- epochs\n- 1\n",
        "notes.txt": "these are not weights\n",
    }
    for name, text in files.items():
        (inp / name).write_text(text)
    (inp / "truncated.pth.tar").write_bytes(good[:len(good) // 2])
    broken = out / "broken"  # a run whose only resumable checkpoint is damaged
    broken.mkdir()
    for name in ("args.yaml", "summary.csv", "checkpoint-0.pth.tar"):
        (broken / name).write_bytes((run_dir / name).read_bytes())
    (broken / "last.pth.tar").write_bytes(good[:1000])
    (inp / "random.pth.tar").write_bytes(os.urandom(4096))
    (inp / "empty.pth.tar").write_bytes(b"")
    (inp / "empty_dir").mkdir()
    (inp / "a_file").write_text("a regular file, so nothing can be created under it\n")
    import timm

    torch.save(timm.create_model("test_vit2", num_classes=10).state_dict(), inp / "other_arch.pth")
    torch.save(timm.create_model("test_vit", num_classes=5, img_size=32).state_dict(), inp / "five_classes.pth")
    weights = torch.load(run_dir / "last.pth.tar", map_location="cpu", weights_only=True)["model"]
    torch.save(weights, inp / "bare_weights.pth")
    torch.save({"model": weights, "epoch": 0, "payload": MakeMarker(str(base / "MARKER"))}, inp / "evil.pth.tar")
    # a 1-channel dataset: torchvision's MNIST files, 20 training and 10 test images of 28x28
    raw = inp / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", 20), ("t10k", 10)):
        _write_idx(str(raw / f"{prefix}-images-idx3-ubyte"), 2051, (n, 28, 28), os.urandom(n * 28 * 28))
        _write_idx(str(raw / f"{prefix}-labels-idx1-ubyte"), 2049, (n,), bytes(i % 10 for i in range(n)))
    return {"base": base, "out": out, "inp": inp, "marker": base / "MARKER"}


def _argv(world, extra):
    return TINY_TRAIN + ["--epochs", "1", "--output", str(world["out"]), "--experiment", "e",
                         "--resume", "auto"] + [a.format(inp=world["inp"], base=world["base"]) for a in extra]


# (id, extra argv ({inp}: the bad files), words the error line must contain)
CASES = [
    ("unknown-config-key", ["-c", "{inp}/unknown.yaml"], ["unknown key 'totally_unknown_option'"]),
    ("mistyped-config-key", ["-c", "{inp}/typo.yaml"], ["unknown key 'modle'", "--model"]),
    ("malformed-yaml", ["-c", "{inp}/bad.yaml"], ["not valid YAML", "line"]),
    ("config-not-a-mapping", ["-c", "{inp}/list.yaml"], ["must be a mapping"]),
    ("missing-config-file", ["-c", "{inp}/nope.yaml"], ["config file", "does not exist"]),
    ("unknown-flag", ["--no-such-flag"], ["unrecognized arguments", "--no-such-flag"]),
    ("mistyped-value", ["--attack-steps", "three"], ["--attack-steps", "must be an integer >= 0", "'three'"]),
    ("missing-data-dir", ["--dataset", ""], ["no data dir"]),
    ("data-dir-does-not-exist", ["{inp}/no_such_dir", "--dataset", ""], ["no_such_dir", "does not exist"]),
    ("data-dir-without-images", ["{inp}/empty_dir", "--dataset", ""], ["holds no image", "empty_dir"]),
    ("unknown-dataset", ["--dataset", "imagenet_typo"], ["unknown dataset 'imagenet_typo'"]),
    ("unknown-torch-dataset", ["{inp}", "--dataset", "torch/no_such_set"], ["no_such_set"]),
    ("unknown-model", ["--model", "vit_tiny_patch16_typo"], ["unknown model 'vit_tiny_patch16_typo'"]),
    ("checkpoint-of-another-architecture", ["--initial-checkpoint", "{inp}/other_arch.pth"],
     ["other_arch.pth", "test_vit"]),
    ("checkpoint-of-another-class-count", ["--initial-checkpoint", "{inp}/five_classes.pth"],
     ["five_classes.pth", "head"]),
    ("truncated-checkpoint", ["--initial-checkpoint", "{inp}/truncated.pth.tar"], ["truncated or corrupt"]),
    ("corrupt-checkpoint", ["--initial-checkpoint", "{inp}/random.pth.tar"], ["truncated or corrupt"]),
    ("empty-checkpoint", ["--initial-checkpoint", "{inp}/empty.pth.tar"], ["empty"]),
    ("one-channel-dataset", ["{inp}/mnist", "--dataset", "torch/mnist", "-b", "10"], ["1 channel", "3"]),
    ("one-channel-input-size", ["--input-size", "1", "32", "32"], ["--input-size", "3-channel"]),
    ("input-size-beyond-memory", ["--input-size", "3", "100000", "100000"], ["--input-size 3 100000 100000", "GiB"]),
    ("batch-beyond-memory", ["--input-size", "3", "4096", "4096", "-b", "1000000"],
     ["one batch of 1000000 such images", "memory available"]),
    ("too-many-workers", ["--workers", "4000"], ["--workers", "[0, 128]", "4000"]),
    ("negative-eps", ["--attack-eps", "-1"], ["--attack-eps", ">= 0"]),
    ("negative-eval-eps", ["--eval-attack-eps", "-2"], ["--eval-attack-eps", ">= 0"]),
    ("negative-steps", ["--attack-steps", "-1"], ["--attack-steps", ">= 0"]),
    ("unknown-attack", ["--adv-training", "pgd", "--attack", "fgsm_typo"], ["--attack: must be one of", "fgsm_typo"]),
    ("unknown-adv-training-loss", ["--adv-training", "madry"], ["--adv-training", "madry"]),
    ("custom-loss-not-importable", ["--adv-training", "no_such_module:Loss"], ["cannot import", "no_such_module"]),
    ("resume-pointing-at-nothing", ["--resume", "{inp}/missing.pth.tar"], ["missing.pth.tar", "no such"]),
    ("resume-a-text-file", ["--resume", "{inp}/notes.txt"], ["notes.txt", "truncated or corrupt"]),
    ("resume-bare-weights", ["--resume", "{inp}/bare_weights.pth"], ["not a training checkpoint"]),
    ("resume-auto-with-a-damaged-last-checkpoint", ["--experiment", "broken"],
     ["--resume auto", "no readable", "--resume PATH"]),
    ("resume-a-directory", ["--resume", "{inp}/empty_dir"], ["empty_dir", "directory"]),
    ("resume-another-architecture", ["--model", "test_vit2"], ["last.pth.tar", "test_vit2"]),
    ("mean-of-wrong-length", ["--mean", "0.5", "0.5"], ["--mean", "3 values"]),
    ("std-of-wrong-length", ["--std", "0.2", "0.2", "0.2", "0.2"], ["--std", "3 values"]),
    ("std-of-zero", ["--std", "0"], ["--std", "> 0"]),
    ("batch-larger-than-dataset", ["-b", "100000"], ["fewer examples than one batch"]),
    ("zero-epochs", ["--epochs", "0"], ["--epochs", ">= 1"]),
    ("fewer-classes-than-the-dataset", ["--num-classes", "5", "--resume", ""], ["10 classes", "--num-classes 10"]),
    ("robust-metric-without-attack", ["--eval-metric", "robust_top1"], ["robust_top1", "--adv-training"]),
    ("unwritable-output", ["--output", "{inp}/a_file/sub", "--resume", ""], ["cannot write", "a_file"]),
    ("untrusted-initial-checkpoint", ["--initial-checkpoint", "{inp}/evil.pth.tar"],
     ["needs arbitrary code", "--trust-checkpoint"]),
    ("untrusted-resume-checkpoint", ["--resume", "{inp}/evil.pth.tar"], ["needs arbitrary code", "posix.mkdir"]),
]


def _check(world, rc, err, words, before):
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert tree(world["base"]) == before  # nothing already written changed, nothing new written
    assert not world["marker"].exists()


@pytest.mark.parametrize("extra,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_in_process(world, extra, words, capsys):
    import train
    from src.errors import run_cli

    before = tree(world["base"])
    capsys.readouterr()
    rc = run_cli(train.main, _argv(world, extra))
    _check(world, rc, capsys.readouterr().err, words, before)


SUBPROCESS_CASES = ["mistyped-config-key", "truncated-checkpoint", "untrusted-resume-checkpoint"]


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_bad_input_as_a_real_process(world, case):
    extra, words = next(c[1:] for c in CASES if c[0] == case)
    before = tree(world["base"])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "train.py", *_argv(world, extra)], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    _check(world, p.returncode, p.stderr, words, before)
    assert "error:" not in p.stdout


def test_trusted_checkpoint_would_run_the_payload(world):
    """The payload is real: loading the file with trust runs it (so the refusals above matter)."""
    from src.checkpoint import load_checkpoint_file

    marker = world["base"] / "TRUSTED_MARKER"
    torch.save({"payload": MakeMarker(str(marker))}, world["inp"] / "evil2.pth.tar")
    with pytest.raises(Exception, match="needs arbitrary code"):
        load_checkpoint_file(str(world["inp"] / "evil2.pth.tar"))
    assert not marker.exists()
    load_checkpoint_file(str(world["inp"] / "evil2.pth.tar"), trust=True)
    assert marker.is_dir()
    os.rmdir(marker)
    os.remove(world["inp"] / "evil2.pth.tar")


def test_catalogue_is_complete():
    assert len(CASES) >= 20
    assert len({c[0] for c in CASES}) == len(CASES)


def test_readme_counts_the_catalogue():
    """The README's Reliability section quotes this catalogue's size; it must follow the catalogue."""
    import re

    with open(os.path.join(ROOT, "README.md")) as f:
        quoted = re.findall(r"`tests/test_bad_inputs.py` holds the catalogue \((\d+) cases\)", f.read())
    assert quoted == [str(len(CASES))]
