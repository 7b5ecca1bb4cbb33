"""Tests of attack_convergence.py and src/convergence.py.

A randomly initialised test_vit (32 px, 10 classes) saved as a checkpoint is attacked on the
embedded digits: it classifies about a tenth of them correctly, enough points for the study.
One in-process run is shared by the schema, row-count and prefix tests; a subprocess run is
killed after two chunks (test hook) and resumed.
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import attack_convergence as ac_cli
from src import convergence as C
from src.errors import run_cli
from tests.conftest import ROOT

pytestmark = pytest.mark.usefixtures("single_cpu_thread")

N_POINTS, BATCH, RUNS, STEPS = 4, 2, 2, (0, 1, 3)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=10, img_size=32)
    path = tmp_path_factory.mktemp("ckpt") / "random.pth.tar"
    torch.save({"state_dict": model.state_dict()}, path)
    return str(path)


def study_args(checkpoint, out, steps=STEPS, extra=()):
    return ["--dataset", "digits", "-m", "test_vit", "--num-classes", "10", "--input-size", "3", "32", "32",
            "--crop-pct", "1.0", "--interpolation", "bicubic", "-j", "0", "--no-normalize", "--attack-eps", "8",
            "--checkpoint", checkpoint, "--n-points", str(N_POINTS), "-b", str(BATCH), "--runs", str(RUNS),
            "--steps-to-try", *map(str, steps), "--output-file", str(out), *extra]


def read_rows(path):
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        return header, [dict(zip(header, r)) for r in reader]


@pytest.fixture(scope="module")
def study(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "conv.csv"
    assert run_cli(ac_cli.main, study_args(checkpoint, out)) == 0
    return out


def test_schema_and_row_count(study):
    header, rows = read_rows(study)
    assert header == ["point", "seed", "steps", "loss"]
    assert len(rows) == N_POINTS * RUNS * len(STEPS)
    points = sorted({int(r["point"]) for r in rows})
    assert len(points) == N_POINTS
    assert {int(r["seed"]) for r in rows} == set(range(RUNS))
    keys = {(r["point"], r["seed"], r["steps"]) for r in rows}
    assert len(keys) == len(rows)  # each (point, seed, steps) exactly once
    assert all(np.isfinite(float(r["loss"])) for r in rows)


def _namespace(checkpoint, out, extra=()):
    return C.parse_args(study_args(checkpoint, out, extra=extra))


def test_points_are_correctly_classified_and_losses_are_prefixes(study, checkpoint):
    """Each CSV loss equals an independent PGD-k from the same seed: PGD-k is a prefix of PGD-K."""
    from src.attacks import make_attack
    from src.bits.device import initialize_device
    from src.cli import seed_everything

    args = _namespace(checkpoint, study)
    dev_env = initialize_device(force_cpu=True)
    em, loader = C.build_model_and_data(args, dev_env)
    ids, xs, ys = C.select_points(em.model, loader, N_POINTS, dev_env)
    with torch.no_grad():
        assert em.model(xs).argmax(-1).eq(ys).all()
    _, rows = read_rows(study)
    got = {(int(r["point"]), int(r["seed"]), int(r["steps"])): float(r["loss"]) for r in rows}
    assert {p for p, _, _ in got} == set(ids)
    eps = 8 / 255
    for seed in range(RUNS):
        for k in STEPS:
            seed_everything(seed)
            attack = make_attack("pgd", eps, 1.5 * eps / 10, k, "linf", (0.0, 1.0),
                                 criterion=torch.nn.NLLLoss(reduction="sum"))
            x_adv = attack(em.model, xs[:BATCH], ys[:BATCH])
            with torch.no_grad():
                loss = torch.nn.functional.cross_entropy(em.model(x_adv), ys[:BATCH], reduction="none")
            for j in range(BATCH):
                assert got[(ids[j], seed, k)] == pytest.approx(float(loss[j]), rel=1e-4, abs=1e-6)
    # a restart matters: seeds give different losses after the random start
    assert got[(ids[0], 0, 0)] != got[(ids[0], 1, 0)]


def test_tied_step_size_changes_only_attacked_losses(study, checkpoint, tmp_path):
    out = tmp_path / "tied.csv"
    assert run_cli(ac_cli.main, study_args(checkpoint, out, extra=["--tie-step-size"])) == 0
    base = {(r["point"], r["seed"], r["steps"]): r["loss"] for r in read_rows(study)[1]}
    tied = {(r["point"], r["seed"], r["steps"]): r["loss"] for r in read_rows(out)[1]}
    assert base.keys() == tied.keys()
    assert all(float(base[k]) == pytest.approx(float(tied[k]), rel=1e-5) for k in base if k[2] == "0")
    assert any(base[k] != tied[k] for k in base if k[2] == "1")  # step 1.5 eps instead of 0.15 eps


def test_one_instance_records_every_iteration(checkpoint, tmp_path):
    out = tmp_path / "one.csv"
    assert run_cli(ac_cli.main, study_args(checkpoint, out, steps=(3,), extra=["--one-instance"])) == 0
    _, rows = read_rows(out)
    assert len(rows) == N_POINTS * RUNS * 4
    assert sorted({int(r["steps"]) for r in rows}) == [0, 1, 2, 3]


@pytest.mark.slow  # the integration lane (make test-slow): keeps the main suite within its budget
def test_kill_and_resume_continues(study, checkpoint, tmp_path, capsys):
    out = tmp_path / "resumed.csv"
    cmd = [sys.executable, os.path.join(ROOT, "attack_convergence.py"), *study_args(checkpoint, out)]
    env = {**os.environ, "ROBUST_VITS_TEST_KILL_AFTER_CHUNKS": "2", "OMP_NUM_THREADS": "1"}
    killed = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    _, partial = read_rows(out)
    # the kill came right after the second chunk reached the state folder, before the CSV caught up
    assert len(partial) == BATCH * len(STEPS)
    assert run_cli(ac_cli.main, study_args(checkpoint, out)) == 0
    chunks = N_POINTS // BATCH * RUNS
    assert f"{chunks - 2} chunk(s) computed now" in capsys.readouterr().out
    assert out.read_text() == study.read_text()  # identical to the uninterrupted run


@pytest.mark.parametrize("extra, needle", [
    (["--attack", "apgd-ce"], "studies PGD"),
    (["-b", "3"], "multiple of --batch-size"),
    (["--attack-steps", "5", "10"], "one value"),
    (["--tie-step-size", "--attack-lr", "1"], "--tie-step-size"),
    (["--results-file", "x.csv"], "--output-file"),
])
def test_bad_flags_exit_2(checkpoint, tmp_path, capsys, extra, needle):
    assert run_cli(ac_cli.main, study_args(checkpoint, tmp_path / "x.csv", extra=extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0]
    assert not (tmp_path / "x.csv").exists()


def test_foreign_file_and_other_settings_are_refused(study, checkpoint, tmp_path, capsys):
    foreign = tmp_path / "mine.csv"
    foreign.write_text("a,b\n1,2\n")
    assert run_cli(ac_cli.main, study_args(checkpoint, foreign)) == 2
    assert foreign.read_text() == "a,b\n1,2\n"
    before = study.read_text()
    assert run_cli(ac_cli.main, study_args(checkpoint, study, extra=["--attack-eps", "2"])) == 2
    assert "another configuration" in capsys.readouterr().err
    assert study.read_text() == before


def test_a_mistyped_checkpoint_is_named_before_an_earlier_state(study, checkpoint, tmp_path, capsys):
    """With the output of an earlier study, a mistyped --checkpoint was reported as its state belonging to
    "another configuration" (the checkpoint path differs); the missing file is the error."""
    before = study.read_text()
    typo = tmp_path / "no_such.pth.tar"
    assert run_cli(ac_cli.main, study_args(str(typo), study)) == 2
    assert capsys.readouterr().err.strip() == f"error: checkpoint {typo} not found"
    assert study.read_text() == before


def test_parser_reuses_validate_flags():
    args = C.parse_args(["--num-examples", "6", "-b", "3", "--attack-steps", "5"])
    assert args.n_points == 6 and args.attack_steps == [5] and args.runs == 20
    assert list(args.steps_to_try) == list(C.DEFAULT_STEPS)
    sizes = C.step_sizes(argparse.Namespace(**{**vars(args), "steps_to_try": [1, 500]}))
    assert sizes[1] == sizes[500] == pytest.approx(1.5 * 4 / 255 / 5)


def test_a_bad_data_dir_fails_before_the_model_is_built(tmp_path, monkeypatch, capsys):
    """Without --checkpoint the model comes with pretrained weights: a wrong data dir was reported only after
    the weights' download had been retried (about 45 s without a network)."""
    def built(*_a, **_k):
        raise AssertionError("the model was built before the data was checked")

    monkeypatch.setattr(C, "create_eval_model", built)
    rc = run_cli(ac_cli.main, [str(tmp_path / "no_such_dir"), "--dataset", "", "-m", "resnet18", "-j", "0",
                               "--output-file", str(tmp_path / "c.csv")])
    err = capsys.readouterr().err
    assert rc == 2 and "no_such_dir" in err and "does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "c.csv").exists()


def test_a_file_where_the_state_folder_goes_is_one_error_line(checkpoint, tmp_path, capsys):
    out = tmp_path / "c.csv"
    blocker = tmp_path / "c.csv.state"
    blocker.write_text("not a folder")
    assert run_cli(ac_cli.main, study_args(checkpoint, out)) == 2
    err = capsys.readouterr().err
    assert f"{blocker} is a file, not a folder" in err and "Traceback" not in err
    assert blocker.read_text() == "not a folder" and not out.exists()


@pytest.mark.parametrize("text", ["{", "[]"])
def test_a_damaged_state_names_a_flag_this_tool_has(checkpoint, tmp_path, capsys, text):
    """The state errors told attack_convergence.py users to 'use another --state-dir', a flag it does not have."""
    out = tmp_path / "conv.csv"
    state = tmp_path / "conv.csv.state"
    state.mkdir()
    (state / "shard-0-of-1.json").write_text(text)
    assert run_cli(ac_cli.main, study_args(checkpoint, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(state) in err[0], err
    assert "use another --output-file (its state goes to <PATH>.state/)" in err[0] and "--state-dir" not in err[0]
    assert not out.exists() and (state / "shard-0-of-1.json").read_text() == text


def test_setup_warnings_are_reported_also_by_the_rerun_that_finds_the_study_done(checkpoint, tmp_path, capsys):
    """The notes of the run that computed the rows (here: attacking loader-normalized inputs) are printed as
    WARNING lines, and again by a rerun that computes nothing (they were only logged, once)."""
    out = tmp_path / "normalized.csv"
    argv = [a for a in study_args(checkpoint, out, steps=(0, 1)) if a != "--no-normalize"]
    assert run_cli(ac_cli.main, argv) == 0
    first = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("WARNING: ")]
    assert any("loader-normalized" in ln for ln in first), first
    assert run_cli(ac_cli.main, argv) == 0
    again = capsys.readouterr().out
    assert "0 chunk(s) computed now" in again
    assert [ln for ln in again.splitlines() if ln.startswith("WARNING: ")] == first
    assert run_cli(ac_cli.main, study_args(checkpoint, tmp_path / "raw.csv", steps=(0,))) == 0
    assert "WARNING: " not in capsys.readouterr().out  # raw [0, 1] inputs: nothing to say
