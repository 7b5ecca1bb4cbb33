"""Tests of attack_effectiveness.py and src/effectiveness.py.

One tiny test_vit is trained once per module for 3 epochs on a 200-image folder of digits with
``--checkpoint-hist 3`` (so checkpoint-0..2 exist); one sweep over epochs 0 1 2 x seeds 0 1 x
PGD-1/PGD-5 on 40 validation digits is run once and reused: schema, row count, attack strength,
determinism, resume after truncation and after a SIGKILL (test hook), the training summary left
untouched, EMA preference, checkpoint-standard, APGD-CE rows, memory:// folders and bad input.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
import shutil
import subprocess
import sys
import uuid

import pytest
import torch

import attack_effectiveness as ae_cli
from src import effectiveness as E
from src import engine
from src import storage
from src import validation as V
from src.errors import run_cli
from tests.conftest import ROOT, TINY_TRAIN, run_train

pytestmark = pytest.mark.usefixtures("single_cpu_thread")

EPOCHS, SEEDS, STEPS = (0, 1, 2), (0, 1), (1, 5)
N_EXAMPLES = 40
# evaluation on the embedded digits validation split, raw [0, 1] inputs (the training loader never normalizes)
EVAL = ["--dataset", "digits", "-m", "test_vit", "--num-classes", "10", "--input-size", "3", "32", "32",
        "--crop-pct", "1.0", "--interpolation", "bicubic", "-j", "0", "--log-freq", "0", "--no-normalize",
        "-b", "20", "--num-examples", str(N_EXAMPLES), "--attack-eps", "8"]


def sweep_args(checkpoints_dir, epochs=EPOCHS, seeds=SEEDS, steps=STEPS, extra=()):
    return EVAL + ["--checkpoints-dir", str(checkpoints_dir),
                   "--epochs-to-try", *map(str, epochs), "--seeds", *map(str, seeds),
                   "--steps-to-try", *map(str, steps), *extra]


def make_digits_folder(root, per_class_train: int = 20, per_class_val: int = 5) -> str:
    """``<root>/{train,validation}/<class>/<i>.png`` from the embedded digits."""
    from PIL import Image

    from src.data import DigitsDataset

    for split, per_class in (("train", per_class_train), ("validation", per_class_val)):
        ds = DigitsDataset(split)
        count = {}
        for img, label in zip(ds.images, ds.targets):
            label = int(label)
            if count.get(label, 0) >= per_class:
                continue
            folder = os.path.join(str(root), split, str(label))
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(img).save(os.path.join(folder, f"{count.get(label, 0):03d}.png"))
            count[label] = count.get(label, 0) + 1
    return str(root)


def file_hashes(folder):
    return {n: hashlib.sha256(open(os.path.join(folder, n), "rb").read()).hexdigest()
            for n in sorted(os.listdir(folder)) if os.path.isfile(os.path.join(folder, n))}


def read_csv(path):
    text = storage.read_text(path)
    rows = list(csv.reader(io.StringIO(text)))
    return rows[0], [dict(zip(rows[0], r)) for r in rows[1:]]


def key(row):
    return row["epoch"], row["seed"], row["attack"], row["attack_steps"]


def cli(argv, capsys):
    rc = run_cli(ae_cli.main, list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture
def count_evals(monkeypatch):
    """Count the evaluation passes (one per computed row)."""
    calls = []
    real = engine.evaluate_loop

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "evaluate_loop", counting)
    return calls


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, single_cpu_thread):
    """A finished 3-epoch training run with checkpoint-0..2.pth.tar (and its summary.csv)."""
    data = make_digits_folder(tmp_path_factory.mktemp("digits_folder"))
    out = tmp_path_factory.mktemp("train")
    argv = [data] + list(TINY_TRAIN)
    argv[argv.index("--dataset") + 1] = ""
    argv[argv.index("-b") + 1] = "20"
    argv[argv.index("-vb") + 1] = "50"
    res = run_train(argv + ["--epochs", "3", "--checkpoint-hist", "3", "--output", str(out), "--experiment", "run"])
    folder = res["output_dir"]
    for e in EPOCHS:
        assert os.path.exists(os.path.join(folder, f"checkpoint-{e}.pth.tar"))
    return folder


@pytest.fixture(scope="module")
def sweep(run_dir):
    """The full sweep, run once through the CLI into the default output file of the run folder."""
    before = file_hashes(run_dir)
    rc = run_cli(ae_cli.main, sweep_args(run_dir))
    assert rc == 0
    path = os.path.join(run_dir, E.DEFAULT_OUTPUT_NAME)
    header, rows = read_csv(path)
    return dict(path=path, header=header, rows=rows, by_key={key(r): r for r in rows}, before=before,
                text=open(path).read())


# ----------------------------------------------------------------------------------------------
# the sweep


def test_schema_rows_and_training_summary_untouched(sweep, run_dir):
    assert tuple(sweep["header"]) == E.COLUMNS
    assert list(E.COLUMNS[:14]) == list(V.RESULT_KEYS)
    assert E.COLUMNS[-5:] == ("attack", "attack_steps", "model", "epoch", "seed")
    rows = sweep["rows"]
    assert len(rows) == len(EPOCHS) * len(SEEDS) * len(STEPS) == 12
    # the original's order: checkpoint, then seed, then step count
    assert [key(r) for r in rows] == [(str(e), str(s), "pgd", str(k)) for e in EPOCHS for s in SEEDS for k in STEPS]
    for r in rows:
        assert r["model"] == "test_vit" and r["img_size"] == "32" and r["cropt_pct"] == "1.0"
        assert r["interpolation"] == "bicubic"
        assert float(r["robust_top1"]) <= float(r["top1"])
        assert float(r["top1"]) + float(r["top1_err"]) == pytest.approx(100)
    # the training run's files are byte-identical; only the new CSV and its settings file appeared
    after = file_hashes(run_dir)
    assert {n: h for n, h in after.items() if n in sweep["before"]} == sweep["before"]
    assert set(after) - set(sweep["before"]) == {E.DEFAULT_OUTPUT_NAME, E.DEFAULT_OUTPUT_NAME + ".settings.json"}


def test_more_steps_is_a_stronger_attack(sweep):
    by_key = sweep["by_key"]
    noise = 100.0 / N_EXAMPLES  # one example
    gains = []
    for e in EPOCHS:
        for s in SEEDS:
            weak, strong = by_key[(str(e), str(s), "pgd", "1")], by_key[(str(e), str(s), "pgd", "5")]
            assert float(strong["robust_top1"]) <= float(weak["robust_top1"]) + noise
            assert weak["top1"] == strong["top1"] and weak["loss"] == strong["loss"]  # same clean examples
            gains.append(float(strong["adv_loss"]) - float(weak["adv_loss"]))
    assert sum(gains) / len(gains) > 0  # on average PGD-5 finds a higher loss than PGD-1
    assert all(float(r["adv_loss"]) > float(r["loss"]) for r in sweep["rows"])


def test_same_seed_same_numbers_and_seeds_matter(sweep, run_dir, tmp_path, count_evals):
    out = str(tmp_path / "again.csv")
    assert run_cli(ae_cli.main, sweep_args(run_dir, epochs=(1,), seeds=(1,), extra=["--output-file", out])) == 0
    _, rows = read_csv(out)
    assert len(count_evals) == 2
    for r in rows:
        assert r == sweep["by_key"][key(r)]  # every column identical
    by_key = sweep["by_key"]
    assert any(by_key[(str(e), "0", "pgd", k)]["adv_loss"] != by_key[(str(e), "1", "pgd", k)]["adv_loss"]
               for e in EPOCHS for k in ("1", "5"))  # the seed drives PGD's random start


def test_summary_table_printed(run_dir, sweep, capsys):
    rc, out, _ = cli(sweep_args(run_dir), capsys)  # everything is present: nothing recomputed
    assert rc == 0
    assert "0 computed now" in out and "12 of this sweep already present" in out
    assert "rel.diff pgd-1 %" in out
    assert open(sweep["path"]).read() == sweep["text"]


# ----------------------------------------------------------------------------------------------
# resuming


def test_resume_after_truncation_redoes_only_missing_rows(sweep, run_dir, tmp_path, count_evals):
    out = str(tmp_path / "resumed.csv")
    lines = sweep["text"].splitlines(keepends=True)
    k = 5
    with open(out, "w") as f:
        f.writelines(lines[:1 + k])
    shutil.copy(sweep["path"] + ".settings.json", out + ".settings.json")
    assert run_cli(ae_cli.main, sweep_args(run_dir, extra=["--output-file", out])) == 0
    assert len(count_evals) == 12 - k
    assert open(out).read() == sweep["text"]  # identical to the uninterrupted run
    assert run_cli(ae_cli.main, sweep_args(run_dir, extra=["--output-file", out])) == 0
    assert len(count_evals) == 12 - k  # complete: a rerun computes nothing


@pytest.mark.slow  # the integration lane (make test-slow): keeps the main suite within its budget
def test_killed_run_continues_where_it_stopped(sweep, run_dir, tmp_path, count_evals):
    out = str(tmp_path / "killed.csv")
    argv = sweep_args(run_dir, epochs=(0, 1), seeds=(0,), extra=["--output-file", out])
    env = dict(os.environ, OMP_NUM_THREADS="1", **{E.KILL_AFTER_ROWS_ENV: "3"})
    proc = subprocess.run([sys.executable, "attack_effectiveness.py", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode < 0 or proc.returncode == 137, proc.stderr[-2000:]  # SIGKILLed after its 3rd row
    _, rows = read_csv(out)
    assert len(rows) == 3  # every written row is whole
    assert not [n for n in os.listdir(tmp_path) if storage.is_temp_name(n)]
    assert run_cli(ae_cli.main, argv) == 0
    assert len(count_evals) == 1  # only the 4th row
    _, rows = read_csv(out)
    assert [key(r) for r in rows] == [("0", "0", "pgd", "1"), ("0", "0", "pgd", "5"), ("1", "0", "pgd", "1"),
                                      ("1", "0", "pgd", "5")]
    for r in rows:
        ref = sweep["by_key"][key(r)]
        assert {c: r[c] for c in E.COLUMNS[10:]} == {c: ref[c] for c in E.COLUMNS[10:]}
        for c in E.COLUMNS[:10]:  # another process (thread count): equal up to the last rounding digit
            assert float(r[c]) == pytest.approx(float(ref[c]), abs=2e-3)


def test_other_settings_are_refused_not_mixed(sweep, run_dir, tmp_path, capsys, count_evals):
    out = str(tmp_path / "mixed.csv")
    shutil.copy(sweep["path"], out)
    shutil.copy(sweep["path"] + ".settings.json", out + ".settings.json")
    rc, _, err = cli(sweep_args(run_dir, extra=["--output-file", out, "--attack-eps", "4"]), capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "attack_eps" in err and "other settings" in err
    assert open(out).read() == sweep["text"] and not count_evals
    # more seeds with the same settings is fine: only the new rows are computed, appended
    assert run_cli(ae_cli.main, sweep_args(run_dir, epochs=(2,), seeds=(0, 1, 7), extra=["--output-file", out])) == 0
    assert len(count_evals) == 2
    _, rows = read_csv(out)
    assert [key(r) for r in rows[-2:]] == [("2", "7", "pgd", "1"), ("2", "7", "pgd", "5")]


def test_rows_without_settings_file_are_kept_with_a_warning(sweep, run_dir, tmp_path, count_evals):
    out = str(tmp_path / "no-settings.csv")
    with open(out, "w") as f:
        f.writelines(sweep["text"].splitlines(keepends=True)[:12])  # header + 11 rows, no settings file
    assert run_cli(ae_cli.main, sweep_args(run_dir, extra=["--output-file", out])) == 0
    assert len(count_evals) == 1
    assert open(out).read() == sweep["text"]
    assert os.path.exists(out + ".settings.json")  # recorded for the next resume


def test_model_comes_from_the_checkpoints_unless_typed(run_dir, tmp_path, capsys):
    import json

    args = sweep_args(run_dir, epochs=(2,), seeds=(0,), steps=(1,))
    args = args[:args.index("-m")] + args[args.index("-m") + 2:]  # no --model: each checkpoint's record
    out = str(tmp_path / "from-record.csv")
    rc, _, _ = cli(args + ["--output-file", out], capsys)
    assert rc == 0
    _, rows = read_csv(out)
    assert [r["model"] for r in rows] == ["test_vit"]
    settings = json.loads(open(out + ".settings.json").read())["settings"]
    assert settings["model"] is None  # not the flag's default (resnet50), which is not what ran
    # typed at the flag's default value, it is what the user asked for: a mismatch, not the record
    rc, _, err = cli(args + ["--output-file", str(tmp_path / "typed.csv"), "--model", "resnet50"], capsys)
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc != 0 and "Traceback" not in err and len(errors) == 1
    assert "--model resnet50 overrides the checkpoint's model test_vit" in err


def test_honesty_warnings_are_reported(run_dir, tmp_path, capsys):
    argv = [a for a in sweep_args(run_dir, epochs=(1,), seeds=(0,), steps=(1,)) if a != "--no-normalize"]
    rc, out, _ = cli(argv + ["--output-file", str(tmp_path / "loader.csv"), "--normalize-model"], capsys)
    assert rc == 0
    warnings = [line for line in out.splitlines() if line.startswith("WARNING: ")]
    # trained on raw pixels (the checkpoints' record), attacked normalized inputs because a flag said so
    assert any("--normalize-model overrides the checkpoint's record (raw [0, 1] inputs" in w for w in warnings)
    assert any("--no-normalize" in w for w in warnings)


def test_fewer_examples_than_asked_and_warnings_of_earlier_rows_are_reported(run_dir, tmp_path, capsys):
    """--num-examples beyond the data evaluated fewer examples without a word (validate.py says so), and a
    resumed run printed only the warnings of the rows it computed: the same file read as clean."""
    out = str(tmp_path / "few.csv")
    argv = sweep_args(run_dir, epochs=(1,), seeds=(0,), steps=(1,)) + ["--output-file", out]
    argv[argv.index("--num-examples") + 1] = "1000"  # the digits validation split has 50 images here
    rc, text, err = cli(argv, capsys)
    assert rc == 0, err
    first = [line for line in text.splitlines() if line.startswith("WARNING: ")]
    assert any("not the 1000 asked for with --num-examples" in w for w in first), first
    rc, text, err = cli(argv, capsys)  # every row done: nothing computed, the warnings still reported
    assert rc == 0 and "0 computed now" in text, err
    assert [line for line in text.splitlines() if line.startswith("WARNING: ")] == first


# ----------------------------------------------------------------------------------------------
# checkpoints


def test_ema_preferred_and_standard_checkpoint(sweep, run_dir, tmp_path, count_evals):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    shutil.copy(os.path.join(run_dir, "checkpoint-2.pth.tar"), folder / "checkpoint-standard.pth.tar")
    ck = torch.load(os.path.join(run_dir, "checkpoint-2.pth.tar"), map_location="cpu", weights_only=True)
    ck["model_ema"] = torch.load(os.path.join(run_dir, "checkpoint-0.pth.tar"), map_location="cpu",
                                 weights_only=True)["model"]
    torch.save(ck, folder / "checkpoint-5.pth.tar")
    common = dict(epochs=(5,), seeds=(0,), steps=(1,))
    assert run_cli(ae_cli.main, sweep_args(folder, **common, extra=["--validate-standard"])) == 0
    _, rows = read_csv(str(folder / E.DEFAULT_OUTPUT_NAME))
    assert [key(r) for r in rows] == [("5", "0", "pgd", "1"), ("standard", "0", "pgd", "1")]
    ema_ref, model_ref = sweep["by_key"][("0", "0", "pgd", "1")], sweep["by_key"][("2", "0", "pgd", "1")]
    assert rows[0]["adv_loss"] == ema_ref["adv_loss"] and rows[0]["top1"] == ema_ref["top1"]  # EMA weights
    assert rows[1]["adv_loss"] == model_ref["adv_loss"] and rows[1]["top1"] == model_ref["top1"]
    out = str(tmp_path / "no-ema.csv")
    assert run_cli(ae_cli.main, sweep_args(folder, **common, extra=["--no-ema", "--output-file", out])) == 0
    _, rows = read_csv(out)
    assert rows[0]["adv_loss"] == model_ref["adv_loss"]  # the model weights
    assert len(count_evals) == 3


def test_apgd_ce_rows(run_dir, tmp_path):
    out = str(tmp_path / "apgd.csv")
    argv = sweep_args(run_dir, epochs=(2,), seeds=(0,), steps=(1,), extra=["--run-apgd-ce", "--output-file", out])
    argv[argv.index("-b") + 1] = "4"
    argv[argv.index("--num-examples") + 1] = "4"
    assert run_cli(ae_cli.main, argv) == 0
    _, rows = read_csv(out)
    assert [key(r) for r in rows] == [("2", "0", "pgd", "1"), ("2", "0", "apgd-ce", "")]
    assert float(rows[1]["robust_top1"]) <= float(rows[1]["top1"])


def test_memory_filesystem_folder(sweep, run_dir, count_evals):
    folder = f"memory://aeff-{uuid.uuid4().hex[:8]}/run"
    storage.makedirs(folder)
    storage.copy(os.path.join(run_dir, "checkpoint-1.pth.tar"), storage.join(folder, "checkpoint-1.pth.tar"))
    assert run_cli(ae_cli.main, sweep_args(folder, epochs=(1,), seeds=(0,), steps=(5,))) == 0
    _, rows = read_csv(storage.join(folder, E.DEFAULT_OUTPUT_NAME))
    assert rows == [sweep["by_key"][("1", "0", "pgd", "5")]]
    assert len(count_evals) == 1


# ----------------------------------------------------------------------------------------------
# bad input: one line, exit 2, nothing written


def test_missing_checkpoint_fails_before_any_work(run_dir, tmp_path, capsys, count_evals):
    out = str(tmp_path / "never.csv")
    rc, _, err = cli(sweep_args(run_dir, epochs=(0, 7), extra=["--output-file", out]), capsys)
    assert rc == 2
    assert len(err.strip().splitlines()) == 1
    assert "checkpoint-7.pth.tar" in err and "0 1 2" in err and "--epochs-to-try" in err
    assert not os.path.exists(out) and not count_evals


def test_mistyped_checkpoints_dir_is_named_before_the_rows_of_the_output(sweep, run_dir, tmp_path, capsys,
                                                                         count_evals):
    """With an output file of an earlier sweep, a mistyped --checkpoints-dir was reported as rows "computed with
    other settings" (checkpoints_dir differs); the folder that does not exist is the error."""
    out = str(tmp_path / "earlier.csv")
    shutil.copy(sweep["path"], out)
    shutil.copy(sweep["path"] + ".settings.json", out + ".settings.json")
    typo = str(tmp_path / "no_such_run")
    rc, _, err = cli(sweep_args(typo, extra=["--output-file", out]), capsys)
    assert rc == 2 and err.strip() == f"error: --checkpoints-dir {typo} does not exist"
    assert open(out).read() == sweep["text"] and not count_evals
    # the run folder moved away after a finished sweep: its rows are still reported, nothing to compute
    moved, kept = str(tmp_path / "moved"), str(tmp_path / "kept.csv")
    shutil.copytree(run_dir, moved)
    assert run_cli(ae_cli.main, sweep_args(moved, epochs=(1,), seeds=(0,), extra=["--output-file", kept])) == 0
    evals = len(count_evals)
    shutil.rmtree(moved)
    rc, _, err = cli(sweep_args(moved, epochs=(1,), seeds=(0,), extra=["--output-file", kept]), capsys)
    assert rc == 0, err
    assert len(count_evals) == evals > 0


def test_checkpoints_dir_that_is_a_file_says_so(run_dir, tmp_path, capsys, count_evals):
    ckpt = os.path.join(run_dir, "checkpoint-0.pth.tar")
    rc, _, err = cli(sweep_args(ckpt, epochs=(0,), extra=["--output-file", str(tmp_path / "x.csv")]), capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert f"--checkpoints-dir {ckpt} is a file" in err and not count_evals


def test_training_summary_is_never_the_output(run_dir, sweep, capsys):
    summary = os.path.join(run_dir, "summary.csv")
    before = open(summary, "rb").read()
    rc, _, err = cli(sweep_args(run_dir, extra=["--output-file", summary]), capsys)
    assert rc == 2 and "summary.csv" in err and len(err.strip().splitlines()) == 1
    assert open(summary, "rb").read() == before


def test_checkpoint_or_folder_as_output_is_refused_by_name(run_dir, sweep, tmp_path, capsys, count_evals):
    ckpt = os.path.join(run_dir, "checkpoint-1.pth.tar")
    before = open(ckpt, "rb").read()
    rc, _, err = cli(sweep_args(run_dir, epochs=(1,), extra=["--output-file", ckpt]), capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "would replace the input" in err and "checkpoint-1.pth.tar" in err  # not "cannot read ... (UnicodeDecodeError)"
    assert open(ckpt, "rb").read() == before
    rc, _, err = cli(sweep_args(run_dir, extra=["--output-file", str(tmp_path)]), capsys)
    assert rc == 2 and "is a folder" in err and len(err.strip().splitlines()) == 1
    assert not count_evals


def test_foreign_csv_is_refused(run_dir, tmp_path, capsys):
    out = tmp_path / "other.csv"
    out.write_text("epoch,train_loss\n0,1.0\n")
    rc, _, err = cli(sweep_args(run_dir, extra=["--output-file", str(out)]), capsys)
    assert rc == 2 and "not an attack-effectiveness results file" in err
    assert out.read_text() == "epoch,train_loss\n0,1.0\n"


@pytest.mark.parametrize("extra, message", [
    (["--checkpoint", "x.pth.tar"], "--checkpoints-dir"),
    (["--attack-steps", "3"], "--steps-to-try"),
    (["--seed", "3"], "--seeds"),
    (["--results-file", "r.csv"], "--output-file"),
    (["--attack", "apgd-ce"], "--run-apgd-ce"),
    (["--seeds", "0", "0"], "repeated"),
    (["--steps-to-try", "-1"], ">= 0"),
    (["--attack-eps", "-1"], "--attack-eps"),
])
def test_bad_flags(extra, message, tmp_path, capsys):
    rc, _, err = cli(sweep_args(tmp_path, extra=extra), capsys)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1


def test_checkpoints_dir_required(capsys):
    rc, _, err = cli(EVAL, capsys)
    assert rc == 2 and "--checkpoints-dir is required" in err


def test_defaults_match_the_original():
    args = E.build_parser().parse_args(["--checkpoints-dir", "d"])
    assert args.steps_to_try == [1, 2, 5, 10, 200]
    assert args.epochs_to_try == [9, 19, 29, 39, 49, 59, 69, 79, 89, 99]
    assert args.seeds == [0, 1, 2]
    assert args.attack == "pgd" and args.attack_eps == 4 and args.use_ema is True
    assert not args.run_apgd_ce and not args.validate_standard and args.split == "validation"
    assert E.output_path(args) == os.path.join("d", "attack-effectiveness.csv")
    jobs = E.plan_jobs([0], [0], [1, 2], run_apgd_ce=True, validate_standard=True)
    assert [j.key for j in jobs] == [("0", "0", "pgd", "1"), ("0", "0", "pgd", "2"), ("0", "0", "apgd-ce", ""),
                                     ("standard", "0", "pgd", "1"), ("standard", "0", "pgd", "2"),
                                     ("standard", "0", "apgd-ce", "")]
