"""Tests of src/plots.py: every kind drawn from small CSVs (PNG + PDF, not blank, labelled axes), bad input."""
from __future__ import annotations

import csv
import os

import numpy as np
import pytest

from src import plots
from src.bits.summary import SUMMARY_COLUMNS
from src.errors import UsageError, run_cli


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def effectiveness_csv(path, scale=1.0):
    rows = []
    for epoch in (0, 9, 19):
        for seed in (0, 1):
            for k, loss in ((1, 1.0), (2, 1.1), (5, 1.15), (10, 1.2)):
                rows.append(["pgd", k, epoch, seed, scale * loss * (1 + epoch / 50) + 0.01 * seed])
    rows.append(["apgd-ce", "", 9, 0, 9.9])  # ignored: not PGD
    return write_csv(path, ["attack", "attack_steps", "epoch", "seed", "adv_loss"], rows)


def convergence_csv(path, shift=0.0):
    rows = [[p, s, k, shift + 0.1 * p + 0.01 * s + np.log1p(k)] for p in (3, 7) for s in (0, 1) for k in (0, 1, 5, 20)]
    return write_csv(path, ["point", "seed", "steps", "loss"], rows)


@pytest.fixture
def inputs(tmp_path):
    summary = write_csv(tmp_path / "summary.csv", SUMMARY_COLUMNS,
                        [[e, 2.0, 10 + e, 5 + e, 0.01, 0.1, 1.9, 12 + e, 6 + e] for e in range(4)])
    wandb = write_csv(tmp_path / "wandb.csv",
                      ["epoch", "model: a - _step", "a", "model: a - eval_robust_top1__MIN",
                       "model: a - eval_robust_top1__MAX", "b"],
                      [[e, e, 10 + e, 9 + e, 11 + e, 8 + e] for e in range(4)])
    return {
        "effectiveness": [effectiveness_csv(tmp_path / "m1.csv"), effectiveness_csv(tmp_path / "m2.csv", 1.3)],
        "convergence": [convergence_csv(tmp_path / "c1.csv"), convergence_csv(tmp_path / "c2.csv", 0.5)],
        "learning-curves": [summary, wandb],
        "robustness": [write_csv(tmp_path / "r.csv", ["attack_eps", "robust_top1", "top1"],
                                 [[0, 70, 70], [4, 40, 70], [8, 10, 70]])],
    }


EXPECTED = {
    "effectiveness": {"epoch_vs_pgd-1", "steps", "steps_unaggregated", "steps_vs_relative_difference"},
    "convergence": {"c1-point", "c1-all", "c2-point", "c2-all", "c1_c2"},
    "learning-curves": {"learning-curves"},
    "robustness": {"robust_accuracy_vs_eps"},
}


@pytest.mark.parametrize("kind", plots.KINDS)
def test_every_kind_is_drawn_not_blank_and_labelled(kind, inputs, tmp_path, capsys):
    import matplotlib.image as mpimg

    out = tmp_path / "figs"
    assert run_cli(plots.main, [kind, *inputs[kind], "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(printed) == sorted(str(out / f"{n}.{e}") for n in EXPECTED[kind] for e in ("png", "pdf"))
    for name in EXPECTED[kind]:
        img = mpimg.imread(out / f"{name}.png")
        assert img.shape[0] > 100 and img.shape[1] > 100
        assert img[..., :3].std() > 0.02  # something is drawn on the white page
        assert (out / f"{name}.pdf").read_bytes().startswith(b"%PDF")
    for name, fig in plots.figures(kind, inputs[kind]).items():
        axes = [ax for ax in fig.axes if ax.get_visible()]
        assert axes and all(ax.get_xlabel() and ax.lines for ax in axes), name
        assert axes[0].get_ylabel(), name


def test_relative_gap_is_the_papers_formula(tmp_path):
    gap, ref = plots.relative_gap(plots.read_csv(effectiveness_csv(tmp_path / "e.csv")))
    assert ref == 10
    assert sorted(gap.epoch.unique()) == [10, 20]  # epoch 0 (-> 1) is left out, ids count from 1
    row = gap[(gap.epoch == 10) & (gap.seed == 0) & (gap.steps == 1)].gap.item()
    l1, l10 = 1.0 * (1 + 9 / 50), 1.2 * (1 + 9 / 50)
    assert row == pytest.approx(abs(l10 - l1) / l10 * 100)


def test_learning_curves_read_summary_metric_and_wandb_runs(inputs):
    fig = plots.learning_curve_figures(inputs["learning-curves"], metric="eval_robust_top1")["learning-curves"]
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.lines] == ["summary", "a", "b"]
    assert list(ax.lines[0].get_ydata()) == [6, 7, 8, 9]
    # the W&B export holds eval_robust_top1: another --metric is refused, not drawn under its name
    with pytest.raises(UsageError, match="W&B export of eval_robust_top1, not of --metric eval_top1"):
        plots.learning_curve_figures(inputs["learning-curves"], metric="eval_top1")
    assert len(ax.collections) == 1  # the min-max band of run a


@pytest.mark.parametrize("make, kind, needle", [
    (lambda d: write_csv(d / "x.csv", ["point", "seed", "loss"], [[1, 0, 1.0]]), "convergence", "steps"),
    (lambda d: write_csv(d / "x.csv", ["robust_top1"], [[1.0]]), "robustness", "eps"),
    (lambda d: write_csv(d / "x.csv", ["eps", "robust_top1"], [[1, 2], [1, 3]]), "robustness", "several rows"),
    (lambda d: write_csv(d / "x.csv", ["adv_loss", "attack_steps", "epoch", "seed"], []), "effectiveness", "no rows"),
    (lambda d: (d / "x.csv").write_text("") and str(d / "x.csv") or str(d / "x.csv"), "learning-curves", "empty"),
    (lambda d: str(d / "missing.csv"), "robustness", "does not exist"),
    (lambda d: str(d), "robustness", "is a folder; give the CSV file in it"),
    (lambda d: write_csv(d / "x.csv", ["a"], [[1]]), "histogram", "unknown plot kind"),
])
def test_bad_input_is_one_error_line_exit_2(tmp_path, capsys, make, kind, needle):
    path = make(tmp_path)
    assert run_cli(plots.main, [kind, path, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err
    assert not os.path.exists(tmp_path / "o") or not os.listdir(tmp_path / "o")


@pytest.mark.parametrize("out", ["", "  "])
def test_an_empty_out_is_refused_not_the_working_directory(inputs, tmp_path, capsys, monkeypatch, out):
    """--out '' (an unset variable in --out "$DIR") was a FileNotFoundError traceback from makedirs('');
    the rule of the flag refuses it before anything is read."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert run_cli(plots.main, ["convergence", *inputs["convergence"], "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: python -m src.plots: argument --out: must be a non-empty path whose $VARIABLES are set "
                   f"in the environment, got {out!r}"], err
    assert os.listdir(cwd) == []
