"""Audit of the evaluation CLIs' flag combinations: validate.py, attack_effectiveness.py, attack_convergence.py.

Each case is one the audit found: a flag silently ignored (PGD budget flags for APGD-CE/AutoAttack or no
attack, several eps without an attack, ``--real-labels`` in the two studies, ``--attack-steps`` with
``--tie-step-size``, a DIR given to the embedded digits set, typically the second value of a one-value
flag), a wrong number (a repeated ``--valid-labels`` class shifts every label after it), resumable
results mixed across data folders or ``--use-test-size``, and a validate.py results file of another
kind (bulk table, eps/step sweep) replaced by a table with other columns. Errors are one ``error:``
line, exit code 2, and files written before keep their bytes.
"""
from __future__ import annotations

import argparse
import os

import pytest
import torch
from PIL import Image

import attack_convergence as convergence_cli
import attack_effectiveness as effectiveness_cli
import tests.tiny_models  # noqa: F401  (registers tiny_cnn_test)
import validate as validate_cli
from src import convergence, effectiveness
from src.arg_parser.analysis import parse_convergence_args
from src.arg_parser.evaluate import parse_effectiveness_args, parse_validate_args
from src.data import DigitsDataset
from src.errors import run_cli
from src.results import RESULT_KEYS
from tests.tiny_models import TinyCNN

pytestmark = pytest.mark.usefixtures("single_cpu_thread")

MODEL = ["--model", "tiny_cnn_test", "--num-classes", "10", "--no-normalize", "-j", "0", "--log-freq", "0"]
DIGITS = ["--dataset", "digits"] + MODEL
SMALL = ["-b", "20", "--num-examples", "20"]
CLIS = {"validate": validate_cli.main, "effectiveness": effectiveness_cli.main, "convergence": convergence_cli.main}


def _run(cli: str, argv, capsys):
    rc = run_cli(CLIS[cli], [str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _one_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], err


def _tree(folder) -> dict:
    """Every file under ``folder`` with its bytes."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    """A training-like folder with checkpoint-0.pth.tar: a bare state dict of tiny_cnn_test."""
    folder = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    torch.save(TinyCNN(num_classes=10).state_dict(), folder / "checkpoint-0.pth.tar")
    return folder


@pytest.fixture(scope="module")
def image_folders(tmp_path_factory):
    """Two image folders (val/c<k>/, 10 classes, 2 digits each) holding different images."""
    ds = DigitsDataset("validation")
    roots = []
    for name, start in (("A", 0), ("B", 100)):
        root = tmp_path_factory.mktemp(f"img{name}")
        counts = {}
        for i in range(start, len(ds)):
            img, y = ds[i]
            if counts.get(y, 0) < 2:
                counts[y] = counts.get(y, 0) + 1
                os.makedirs(root / "val" / f"c{y}", exist_ok=True)
                img.save(root / "val" / f"c{y}" / f"{i}.png")
            if len(counts) == 10 and all(v == 2 for v in counts.values()):
                break
        roots.append(root)
    return roots


# ----------------------------------------------------------------------------------------------
# flags that would be silently ignored: refused before anything is built


@pytest.mark.parametrize("cli,argv,needles", [
    # several eps without an attack: one clean row, the eps list dropped
    ("validate", ["--attack-eps", "0", "4"], ["several --attack-eps", "need an --attack"]),
    # APGD-CE / AutoAttack run their own schedule: PGD's steps and step size had no effect
    ("validate", ["--attack", "apgd-ce", "--attack-steps", "5"], ["--attack-steps sets PGD's budget", "apgd-ce"]),
    ("validate", ["--attack", "autoattack", "--attack-lr", "1"], ["--attack-lr sets PGD's budget", "autoattack"]),
    ("validate", ["--attack", "apgd-ce", "--attack-steps", "5", "--attack-lr", "1"],
     ["--attack-steps and --attack-lr set PGD's budget"]),
    ("validate", ["--attack-steps", "20"], ["--attack-steps sets PGD's budget", "no --attack"]),
    # the studies never used ReaL labels (validate.py's clean-accuracy feature)
    ("effectiveness", ["--checkpoints-dir", "x", "--real-labels", "real.json"],
     ["--real-labels is not supported by attack_effectiveness.py"]),
    ("convergence", ["--real-labels", "real.json"], ["--real-labels is not supported by attack_convergence.py"]),
    # --tie-step-size replaces the shared step 1.5 * eps / K: K had no effect
    ("convergence", ["--tie-step-size", "--attack-steps", "5"], ["--tie-step-size", "--attack-steps"]),
])
def test_ignored_flag_combinations_are_refused(capsys, tmp_path, cli, argv, needles):
    before = _tree(tmp_path)
    rc, out, err = _run(cli, DIGITS + argv + (["--output-file", tmp_path / "o.csv"] if cli != "validate" else []),
                        capsys)
    _one_error(rc, err, *needles)
    assert "--result" not in out and _tree(tmp_path) == before


@pytest.mark.parametrize("parse,argv", [
    (parse_validate_args, ["--attack", "pgd", "--attack-steps", "1", "2", "--attack-eps", "2", "4"]),
    (parse_validate_args, ["--attack", "apgd-ce", "--attack-eps", "2", "4"]),
    (parse_validate_args, ["--attack", "targeted_pgd", "--attack-lr", "1", "--attack-steps", "3"]),
    (parse_validate_args, ["--attack", "autoattack", "--attack-eps", "4"]),
    (parse_validate_args, ["--no-normalize", "--normalize-model"]),  # the original's mode (c), both spelled out
    (parse_effectiveness_args, ["--checkpoints-dir", "x", "--run-apgd-ce", "--attack-lr", "1"]),  # PGD rows' step
    (parse_convergence_args, ["--tie-step-size"]),
    (parse_convergence_args, ["--attack-steps", "5", "--attack-lr", "1"]),
])
def test_supported_combinations_still_parse(parse, argv):
    assert isinstance(parse(["--dataset", "digits"] + argv), argparse.Namespace)


# ----------------------------------------------------------------------------------------------
# a DIR for the embedded digits set: typically the second value of a one-value flag


def test_digits_with_a_data_dir_is_refused(capsys, tmp_path, ckpt_dir):
    before = _tree(ckpt_dir)
    cases = [
        ("validate", DIGITS + SMALL + ["--attack", "pgd", str(tmp_path / "nowhere")]),
        # --attack-eps takes one value here: '4' became DIR and only eps 2 would have run
        ("effectiveness", DIGITS + SMALL + ["--checkpoints-dir", ckpt_dir, "--epochs-to-try", "0", "--seeds", "0",
                                            "--steps-to-try", "1", "--output-file", tmp_path / "e.csv",
                                            "--attack-eps", "2", "4"]),
        ("convergence", DIGITS + ["--checkpoint", ckpt_dir / "checkpoint-0.pth.tar", "--n-points", "2", "-b", "2",
                                  "--runs", "1", "--steps-to-try", "1", "--output-file", tmp_path / "c.csv",
                                  "--attack-eps", "2", "4"]),
    ]
    for cli, argv in cases:
        rc, out, err = _run(cli, argv, capsys)
        _one_error(rc, err, "--dataset digits is embedded and takes no data dir")
    assert _tree(tmp_path) == {} and _tree(ckpt_dir) == before


# ----------------------------------------------------------------------------------------------
# --valid-labels: a repeated class shifts every dataset label after it


def test_repeated_valid_labels_are_refused(capsys, tmp_path):
    labels = tmp_path / "valid.txt"
    labels.write_text("0\n1\n1\n2\n3\n4\n5\n6\n7\n8\n9\n")
    rc, out, err = _run("validate", DIGITS + SMALL + ["--valid-labels", labels], capsys)
    _one_error(rc, err, "--valid-labels", "class 1 more than once")


# ----------------------------------------------------------------------------------------------
# resumable studies: settings that change the numbers are part of what a restart must match


def test_effectiveness_refuses_to_mix_data_folders(capsys, ckpt_dir, image_folders, tmp_path):
    a, b = image_folders
    out_csv = tmp_path / "eff.csv"
    common = MODEL + SMALL + ["--dataset", "", "--split", "val", "--checkpoints-dir", ckpt_dir, "--epochs-to-try",
                              "0", "--seeds", "0", "--output-file", out_csv]
    rc, _, err = _run("effectiveness", [a] + common + ["--steps-to-try", "1"], capsys)
    assert rc == 0, err
    written = _tree(tmp_path)
    assert set(written) == {"eff.csv", "eff.csv.settings.json"}
    # the same sweep extended with a step count, on other images: its rows would sit next to folder A's
    rc, _, err = _run("effectiveness", [b] + common + ["--steps-to-try", "1", "2"], capsys)
    _one_error(rc, err, "other settings", "data")
    assert _tree(tmp_path) == written


@pytest.mark.parametrize("module,parse,extra", [
    (effectiveness, parse_effectiveness_args, ["--checkpoints-dir", "x"]),
    (convergence, parse_convergence_args, ["--checkpoint", "c.pth.tar"]),
])
def test_study_settings_record_data_dir_and_test_size(module, parse, extra, tmp_path):
    fingerprint = module.settings_of if module is effectiveness else module.fingerprint_of

    def settings(argv):
        return fingerprint(parse(extra + argv))

    base = settings(["--dataset", "digits"])
    # files written before these were recorded still match a run at their default
    assert "data" not in base and "use_test_size" not in base
    folder_a, folder_b = settings([str(tmp_path / "a")]), settings([str(tmp_path / "b")])
    assert folder_a["data"] == str(tmp_path / "a") and folder_a != folder_b
    # a relative DIR is the same folder from the same place
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert settings(["a"])["data"] == folder_a["data"]
    finally:
        os.chdir(cwd)
    assert settings(["--dataset", "digits", "--use-test-size"])["use_test_size"] is True


# ----------------------------------------------------------------------------------------------
# validate.py --results-file: an earlier table of another kind is not replaced


def _csv(columns):
    return (",".join(columns) + "\n" + ",".join("1" for _ in columns) + "\n").encode()


BULK_CSV = _csv(["model"] + list(RESULT_KEYS) + ["checkpoint"])
STEPS_CSV = _csv(list(RESULT_KEYS) + ["attack_steps"])
EPS_STEPS_CSV = _csv(list(RESULT_KEYS) + ["attack_eps", "attack_steps"])
SINGLE_CSV = _csv(list(RESULT_KEYS))
SINGLE_JSON = b'{"top1": 1.0, "robust_top1": null}\n'
BULK_JSON = b'[{"model": "m", "top1": 1.0, "robust_top1": null, "checkpoint": "c", "warnings": []}]\n'
PGD = ["--attack", "pgd", "--attack-eps", "8"]


@pytest.mark.parametrize("name,content,argv", [
    ("r.csv", BULK_CSV, []),                                           # a bulk table, then one checkpoint
    ("r.csv", STEPS_CSV, PGD + ["--attack-steps", "1"]),               # a step sweep, then one step count
    ("r.csv", EPS_STEPS_CSV, PGD + ["--attack-steps", "1", "2"]),      # an eps x steps sweep, then steps only
    ("r.csv", SINGLE_CSV, PGD + ["--attack-steps", "1", "2"]),         # one row, then a step sweep
    ("r.json", SINGLE_JSON, PGD + ["--attack-eps", "2", "4"]),         # one dict, then an eps sweep
    ("r.json", BULK_JSON, []),                                         # a bulk list, then one checkpoint
])
def test_results_file_of_another_kind_is_not_replaced(capsys, tmp_path, name, content, argv):
    (tmp_path / name).write_bytes(content)
    before = _tree(tmp_path)
    rc, out, err = _run("validate", DIGITS + SMALL + argv + ["--results-file", tmp_path / name], capsys)
    _one_error(rc, err, "another kind of validate.py results table", "not replaced")
    assert "--result" not in out and _tree(tmp_path) == before


@pytest.mark.parametrize("name,content,argv,header", [
    ("r.csv", SINGLE_CSV, [], list(RESULT_KEYS)),
    ("r.csv", STEPS_CSV, PGD + ["--attack-steps", "1", "2"], list(RESULT_KEYS) + ["attack_steps"]),
    ("r.json", SINGLE_JSON, [], None),
])
def test_results_file_of_the_same_kind_is_replaced(capsys, tmp_path, name, content, argv, header):
    path = tmp_path / name
    path.write_bytes(content)
    rc, _, err = _run("validate", DIGITS + SMALL + argv + ["--results-file", path], capsys)
    assert rc == 0, err
    assert path.read_bytes() != content
    if header is not None:
        assert path.read_text().splitlines()[0].split(",") == header


def test_bulk_table_does_not_replace_a_single_result(capsys, ckpt_dir, tmp_path):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    (folder / "a.pth.tar").write_bytes((ckpt_dir / "checkpoint-0.pth.tar").read_bytes())
    (folder / "results-all.csv").write_bytes(SINGLE_CSV)  # one checkpoint's row, written by hand to that name
    before = _tree(folder)
    rc, out, err = _run("validate", DIGITS + SMALL + ["--checkpoint", folder], capsys)
    _one_error(rc, err, "results-all.csv", "another kind of validate.py results table")
    assert _tree(folder) == before
