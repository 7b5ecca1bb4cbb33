"""Audit of the analyses (``python -m src.plots``, the paper-data notebooks' figures).

Fidelity: the figures drawn from the paper's own data (``notebooks/data``, the original's
measurements) carry exactly the numbers of those CSVs, computed here independently with the csv
module, on the right axes. Robustness: bad input is one ``error:`` line (exit 2, nothing written),
never a traceback or a figure with rows silently dropped, averaged or series silently merged.
"""
from __future__ import annotations

import contextlib
import csv
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from statistics import mean

import numpy as np
import pytest

from src import plots
from src.errors import UsageError, run_cli
from tests.conftest import ROOT

DATA = os.path.join(ROOT, "notebooks", "data")
EFFECTIVENESS = {"XCiT-S12": "xcit", "XCiT-S12*": "xcit-original", "ResNet-50": "resnet", "ConvNeXt-T": "convnext"}


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plots._pyplot().close("all")


def _rows(path):
    with open(path, newline="", encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


def _errorbars(ax):
    """{label: (x, y)} of the error-bar series of an axes."""
    return {c.get_label(): (np.asarray(c.lines[0].get_xdata(), float), np.asarray(c.lines[0].get_ydata(), float))
            for c in ax.containers}


def _write(path, text):
    with open(path, "w", newline="") as f:
        f.write(text)
    return str(path)


# ----------------------------------------------------------------------------------------------
# Fidelity: the paper's data, drawn
# ----------------------------------------------------------------------------------------------

def _paper_gaps(path):
    """{(epoch, k): [gap per seed]} from the CSV, by hand: epochs from 1, epoch 1 left out, vs PGD-200."""
    loss = {(int(r["epoch"]) + 1, int(r["seed"]), int(r["attack_steps"])): float(r["adv_loss"])
            for r in _rows(path) if r["attack"] == "pgd"}
    gaps = defaultdict(list)
    for (epoch, seed, k), value in sorted(loss.items()):
        if epoch != 1 and k != 200:
            ref = loss[(epoch, seed, 200)]
            gaps[(epoch, k)].append(abs(ref - value) / ref * 100)
    return gaps


def test_effectiveness_figures_carry_the_papers_gaps():
    paths = [os.path.join(DATA, f"attack-effectiveness-{v}.csv") for v in EFFECTIVENESS.values()]
    figs = plots.effectiveness_figures(paths, labels=list(EFFECTIVENESS))
    assert set(figs) == {"epoch_vs_pgd-1", "steps", "steps_unaggregated", "steps_vs_relative_difference"}
    ax = figs["epoch_vs_pgd-1"].axes[0]
    assert ax.get_xlabel() == "Epoch" and ax.get_ylabel() == "PGD-1 rel. loss gap to PGD-200 (%)"
    drawn = _errorbars(ax)
    assert list(drawn) == list(EFFECTIVENESS)  # the paper's order, one series per model
    ends = {}
    for label, path in zip(EFFECTIVENESS, paths):
        gaps = _paper_gaps(path)
        x, y = drawn[label]
        assert list(x) == list(range(10, 101, 10))
        assert y == pytest.approx([mean(gaps[(e, 1)]) for e in range(10, 101, 10)], rel=1e-9)
        assert all(len(gaps[(e, 1)]) == 3 for e in range(10, 101, 10))  # every seed counted
        ends[label] = round(y[-1], 1)
        sx, sy = _errorbars(figs["steps"].axes[0])[label]  # mean over every epoch and seed
        assert list(sx) == [1, 2, 5, 10]
        assert sy == pytest.approx([mean(g for e in range(10, 101, 10) for g in gaps[(e, k)]) for k in (1, 2, 5, 10)])
    assert ends == {"XCiT-S12": 6.8, "XCiT-S12*": 71.5, "ResNet-50": 12.7, "ConvNeXt-T": 5.7}  # the README's numbers
    assert figs["steps"].axes[0].get_xscale() == "log"
    panels = [a for a in figs["steps_vs_relative_difference"].axes if a.get_visible()]
    assert [a.get_title() for a in panels] == ["PGD-1", "PGD-2", "PGD-5", "PGD-10"]
    epochs = [a for a in figs["steps_unaggregated"].axes if a.get_visible()]
    assert [a.get_title() for a in epochs] == [f"epoch {e}" for e in range(10, 101, 10)]
    # xcit-original has no epoch-0 row; its series still starts at epoch 10 like the others
    assert _errorbars(epochs[0])["XCiT-S12*"][1] == pytest.approx(
        [mean(_paper_gaps(paths[1])[(10, k)]) for k in (1, 2, 5, 10)])


def test_convergence_figures_carry_the_papers_losses():
    conv = os.path.join(DATA, "attack_convergence")
    paths = [os.path.join(conv, "xcit-robust-99.csv"), os.path.join(conv, "resnet-robust-99.csv")]
    figs = plots.convergence_figures(paths, labels=["XCiT-S12", "GELU ResNet-50"], point=None)
    point = int(figs["XCiT-S12-point"].axes[0].get_title().rsplit(" ", 1)[1])
    for label, path in zip(["XCiT-S12", "GELU ResNet-50"], paths):
        losses = defaultdict(dict)
        for r in _rows(path):
            if int(r["point"]) == point:
                losses[int(r["seed"])][int(r["steps"])] = float(r["loss"])
        ax = figs[f"{label}-point"].axes[0]
        assert ax.get_xlabel() == "Attack steps" and ax.get_ylabel() == "Loss"
        assert len(ax.lines) == 20  # a line per restart, none merged
        for line, seed in zip(ax.lines, sorted(losses)):
            assert list(line.get_xdata()) == [0, 1, 2, 5, 10, 50, 100, 200, 500]
            assert list(line.get_ydata()) == pytest.approx([losses[seed][k] for k in line.get_xdata()])
        colours = {tuple(line.get_color()) for line in ax.lines}
        assert len(colours) == 20  # restarts 0 and 10 do not share a colour
        assert len([a for a in figs[f"{label}-all"].axes if a.get_visible()]) == 32
    assert len(figs["XCiT-S12_GELU ResNet-50"].axes[0].lines) == 2 * 20 + 2  # + the two legend keys


@pytest.mark.parametrize("name, label", [("robust_acc_xcits.csv", "Eval robust top-1 (%)"),
                                         ("robust_acc_xcits_train.csv", "Train robust top-1 (%)"),
                                         ("robust_acc.csv", "Eval robust top-1 (%)")])
def test_learning_curves_carry_the_wandb_exports(name, label):
    path = os.path.join(DATA, name)
    ax = plots.learning_curve_figures([path])["learning-curves"].axes[0]
    assert ax.get_xlabel() == "Epoch" and ax.get_ylabel() == label
    rows = _rows(path)
    x = "epoch" if "epoch" in rows[0] else "Step"
    runs = [c for c in rows[0] if c != x and " - " not in c]
    assert [line.get_label() for line in ax.lines] == runs
    for line, run in zip(ax.lines, runs):
        kept = [r for r in rows if r[run] != ""]  # resnet50_gelu's export ends at epoch 99
        assert list(line.get_xdata()) == [float(r[x]) for r in kept]
        assert list(line.get_ydata()) == pytest.approx([float(r[run]) for r in kept])
    assert len(ax.collections) == len(runs)  # each run's min-max band


def test_robustness_figure_carries_the_aa_sanity_numbers():
    ax = plots.robustness_figures([os.path.join(DATA, "aa_sanity_check.csv")])["robust_accuracy_vs_eps"].axes[0]
    assert ax.get_xlabel() == r"$\epsilon$ (/255)" and ax.get_ylabel() == "Robust top-1 (%)"
    (line,) = ax.lines
    assert list(line.get_xdata()) == list(range(0, 17, 2))
    assert list(line.get_ydata()) == [72.34, 58.80, 41.78, 25.18, 12.98, 5.50, 2.04, 0.60, 0.24]


# ----------------------------------------------------------------------------------------------
# Robustness: bad input is one error line
# ----------------------------------------------------------------------------------------------

EFF_HEADER = "attack,attack_steps,epoch,seed,adv_loss\n"


def _eff(replace=None, extra=""):
    lines = [f"pgd,{k},{e},{s},{(1.0 + 0.1 * i) * (1 + e / 50) + 0.01 * s}"
             for e in (0, 9, 19) for s in (0, 1) for i, k in enumerate((1, 2, 200))]
    if replace:
        lines = [replace(line) for line in lines]
    return EFF_HEADER + "\n".join(line for line in lines if line) + "\n" + extra


def _swap(prefix, new):
    """Replace the row starting with ``prefix`` by ``new`` (None: drop it)."""
    return lambda line: (new or "") if line.startswith(prefix) else line


def _prefix(old, new):
    """Replace the start ``old`` of every row that has it by ``new``."""
    return lambda line: new + line[len(old):] if line.startswith(old) else line


CONV = "point,seed,steps,loss\n" + "".join(f"{p},{s},{k},{0.1 * p + 0.01 * k + 0.001 * s}\n"
                                           for p in (1, 2) for s in (0, 1) for k in (0, 1, 5))
SUMMARY = "epoch,eval_robust_top1,eval_top1\n0,1.0,3.0\n1,2.0,4.0\n"
ROB = "attack_eps,robust_top1\n0,70\n4,40\n8,10\n"

BAD = [
    # effectiveness: values that were dropped, averaged or crashed
    ("effectiveness", {"e.csv": _eff(extra="pgd,1,9,0,5.0\n")}, [], "several rows for epoch 9, seed 0, attack_steps 1"),
    ("effectiveness", {"e.csv": _eff(_swap("pgd,1,9,0,", "pgd,1,9,0,nan"))}, [], "adv_loss is 'nan'"),
    ("effectiveness", {"e.csv": _eff(_swap("pgd,1,9,0,", "pgd,1,9,0,"))}, [], "adv_loss is empty"),
    ("effectiveness", {"e.csv": _eff(_swap("pgd,1,9,0,", "pgd,1,9,0,inf"))}, [], "adv_loss is 'inf'"),
    ("effectiveness", {"e.csv": _eff(_swap("pgd,2,9,0,", "pgd,two,9,0,1.0"))}, [],
     "attack_steps is 'two', not a number"),
    ("effectiveness", {"e.csv": _eff(_prefix("pgd,2,", "pgd,2.5,"))}, [], "attack_steps is '2.5'; it must be a whole"),
    ("effectiveness", {"e.csv": _eff(_swap("pgd,1,19,1,", "pgd,1,19,,1.0"))}, [], "seed is empty"),
    ("effectiveness", {"e.csv": _eff(_prefix("pgd,1,19,", "pgd,1,nineteen,"))}, [], "epoch is 'nineteen'"),
    ("effectiveness", {"e.csv": _eff(_swap("pgd,200,19,1,", None))}, [], "seed 1 has no PGD-200 row"),
    ("effectiveness", {"e.csv": _eff(_swap("pgd,200,9,0,", "pgd,200,9,0,0"))}, [], "needs a positive reference loss"),
    ("effectiveness", {"a.csv": _eff(), "b.csv": _eff(lambda s: s.replace("pgd,1,", "pgd,5,"))}, [],
     "b has no PGD-1 rows"),
    ("effectiveness", {"a.csv": _eff(), "b.csv": _eff()}, ["--labels", "X", "X"], "gives 'X' to several CSVs"),
    ("effectiveness", {"a.csv": _eff()}, ["--metric", "adv_loss"], "--metric applies to learning-curves only"),
    # convergence
    ("convergence", {"c.csv": CONV + "1,0,5,9.0\n"}, [], "several rows for point 1, seed 0, steps 5"),
    ("convergence", {"c.csv": CONV + "1,0,10,\n"}, [], "loss is empty"),
    ("convergence", {"c.csv": CONV + "1.5,0,1,1.0\n"}, [], "point is '1.5'"),
    ("convergence", {"c.csv": "point,seed,steps,loss\n1,0,0,1.0\n"}, [], "at least two step counts"),
    ("convergence", {"a.csv": CONV, "b.csv": CONV}, ["--labels", "m/1", "m_1"], "would be written to the same file"),
    ("convergence", {f"c{i}.csv": CONV for i in range(5)}, [], "at most 4 CSVs"),
    # robustness
    ("robustness", {"r.csv": "attack_eps,robust_top1\n0,70\n4/255,40\n8,10\n"}, [], "attack_eps is '4/255'"),
    ("robustness", {"r.csv": "attack_eps,robust_top1\n0,70\n,40\n8,10\n"}, [], "attack_eps is empty"),
    ("robustness", {"r.csv": "attack_eps,robust_top1\n0,70,5\n4,40\n"}, [], "line 2 has 3 field(s), its header 2"),
    ("robustness", {"r.csv": "eps,attack_eps,robust_top1\n0.0157,4,40\n"}, [], "both eps and attack_eps"),
    ("robustness", {"r.csv": "attack_eps,robust_top1\n0,70\n0.0157,40\n0.0314,10\n"}, [], "look like [0, 1] units"),
    ("robustness", {"r.csv": "attack_eps,robust_top1,robust_top1\n0,70,70\n"}, [], "names robust_top1 twice"),
    ("robustness", {"r.json": '[{"attack_eps": 0, "robust_top1": 70}]'}, [], "is JSON, not CSV"),
    ("robustness", {"r.csv": "attack_eps,robust_top1\n0,70\n"}, ["--point", "3"], "--point applies to convergence"),
    ("robustness", {"r.csv": "attack_eps,robust_top1\n0,70\n4,140\n"}, [], "line 3: robust_top1 is 140; accuracies"),
    ("learning-curves", {"s.csv": SUMMARY + "2,-3,5.0\n"}, [], "eval_robust_top1 is -3; accuracies are percentages"),
    # learning curves
    ("learning-curves", {"s.csv": SUMMARY}, ["--metric", "nope"], "has no column nope (--metric)"),
    ("learning-curves", {"s.csv": SUMMARY + "2,abc,5.0\n"}, [], "eval_robust_top1 is 'abc', not a number"),
    ("learning-curves", {"s.csv": SUMMARY + "1,5.0,6.0\n"}, [], "several rows for epoch 1"),
    ("learning-curves", {"s.csv": SUMMARY, "w.csv": open(os.path.join(DATA, "robust_acc_xcits_train.csv")).read()},
     [], "the CSVs hold different metrics"),
]


@pytest.mark.parametrize("kind, files, extra, needle", BAD, ids=[f"{b[0]}-{b[3][:30]}" for b in BAD])
def test_bad_input_is_one_error_line(tmp_path, capsys, kind, files, extra, needle):
    paths = [_write(tmp_path / name, text) for name, text in files.items()]
    out = tmp_path / "figs"
    assert run_cli(plots.main, [kind, *paths, "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err
    assert not out.exists()


def test_the_same_csv_twice_is_refused(tmp_path, capsys):
    path = _write(tmp_path / "r.csv", ROB)
    assert run_cli(plots.main, ["robustness", path, path, "--out", str(tmp_path / "o")]) == 2
    assert "is given twice" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Robustness: odd but valid input draws the right figure
# ----------------------------------------------------------------------------------------------

def test_bom_and_windows_line_endings_draw_the_same_figure(tmp_path):
    plain = _write(tmp_path / "plain.csv", _eff())
    odd = _write(tmp_path / "odd.csv", "\ufeff" + _eff().replace("\n", "\r\n"))
    a = _errorbars(plots.effectiveness_figures([plain])["steps"].axes[0])["plain"]
    b = _errorbars(plots.effectiveness_figures([odd])["steps"].axes[0])["odd"]
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


@pytest.mark.parametrize("kind, text", [("robustness", "attack_eps,robust_top1\n0,0.7\n4,0.4\n8,0.1\n"),
                                         ("learning-curves", "epoch,eval_robust_top1\n0,0.25\n1,0.31\n")])
def test_accuracies_given_as_fractions_are_warned_about(tmp_path, capsys, kind, text):
    path = _write(tmp_path / "r.csv", text)
    assert run_cli(plots.main, [kind, path, "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "if these are fractions, multiply them by 100" in err


def test_convergence_of_many_points_is_drawn_on_pages(tmp_path):
    # 70 points (attack_convergence.py's default is 100): pages of 32 panels, every point drawn once
    text = "point,seed,steps,loss\n" + "".join(f"{p},0,{k},{0.1 * p + k}\n" for p in range(70) for k in (0, 1))
    figs = plots.convergence_figures([_write(tmp_path / "c.csv", text)], point=3)
    pages = [figs[f"c-all-{n}"] for n in (1, 2, 3)]
    assert "c-all" not in figs and "c-all-4" not in figs
    titles = [a.get_title() for fig in pages for a in fig.axes if a.get_visible()]
    assert titles == [f"point {p}" for p in range(70)]
    assert max(fig.get_size_inches()[1] for fig in pages) < 13


def test_robustness_draws_a_line_per_step_count(tmp_path):
    path = _write(tmp_path / "r.csv", "attack_eps,attack_steps,robust_top1\n0,2,70\n0,20,70\n4,2,40\n4,20,35\n"
                                      "8,2,12\n8,20,5\n")
    ax = plots.robustness_figures([path])["robust_accuracy_vs_eps"].axes[0]
    assert [line.get_label() for line in ax.lines] == ["r (2 steps)", "r (20 steps)"]
    assert [list(line.get_ydata()) for line in ax.lines] == [[70, 40, 12], [70, 35, 5]]
    assert ax.get_legend() is not None


def test_default_labels_tell_files_of_the_same_name_apart(tmp_path):
    paths = []
    for run in ("run1", "run2"):
        (tmp_path / run).mkdir()
        paths.append(_write(tmp_path / run / "summary.csv", SUMMARY))
    ax = plots.learning_curve_figures(paths)["learning-curves"].axes[0]
    assert [line.get_label() for line in ax.lines] == ["run1/summary", "run2/summary"]


def test_a_w_and_b_run_in_two_exports_is_labelled_by_file(tmp_path):
    text = "Step,a\n0,1\n1,2\n"
    paths = [_write(tmp_path / "x.csv", text), _write(tmp_path / "y.csv", text)]
    ax = plots.learning_curve_figures(paths)["learning-curves"].axes[0]
    assert [line.get_label() for line in ax.lines] == ["x: a", "y: a"]


def test_many_csvs_get_distinct_lines_and_too_many_are_refused(tmp_path):
    paths = [_write(tmp_path / f"s{i:02d}.csv", SUMMARY) for i in range(plots.MAX_LINES + 1)]
    ax = plots.learning_curve_figures(paths[:-1])["learning-curves"].axes[0]
    assert len(ax.lines) == plots.MAX_LINES
    assert len({(line.get_color(), line.get_linestyle()) for line in ax.lines}) == plots.MAX_LINES
    with pytest.raises(UsageError, match="cannot be told apart"):
        plots.learning_curve_figures(paths)


def test_a_one_row_learning_curve_is_visible(tmp_path):
    path = _write(tmp_path / "s.csv", "epoch,eval_robust_top1\n0,12.5\n")
    (line,) = plots.learning_curve_figures([path])["learning-curves"].axes[0].lines
    assert line.get_marker() == "o" and list(line.get_ydata()) == [12.5]


def test_unmeasured_epochs_in_a_summary_are_gaps(tmp_path):
    """summary.csv writes 'nan' where a metric was not measured: a gap, not an error."""
    path = _write(tmp_path / "s.csv", "epoch,eval_robust_top1\n0,nan\n1,3.0\n2,4.0\n")
    (line,) = plots.learning_curve_figures([path])["learning-curves"].axes[0].lines
    assert list(line.get_xdata()) == [1, 2]


# ----------------------------------------------------------------------------------------------
# util_scripts/readme_numbers.py: the README is never damaged
# ----------------------------------------------------------------------------------------------

from tests.test_usability import _readme_numbers  # noqa: E402 - the one loader of util_scripts/readme_numbers.py


README = "a\n<!-- readme-numbers:demo -->\nold\n<!-- /readme-numbers:demo -->\nb\n" \
         "<!-- readme-numbers:validate -->\nold\n<!-- /readme-numbers:validate -->\nc\n"


@pytest.mark.parametrize("text, needle", [(None, "cannot be read"), ("no markers\n", "needs exactly one")])
def test_readme_numbers_bad_readme_is_one_error_line_before_measuring(tmp_path, capsys, monkeypatch, text, needle):
    rn = _readme_numbers()
    monkeypatch.setattr(rn, "measure", lambda: pytest.fail("measured before checking the README"))
    path = tmp_path / "README.md"
    if text is not None:
        path.write_text(text)
    with pytest.raises(SystemExit) as exc:
        rn.main(["--readme", str(path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err


def test_readme_numbers_a_failed_write_leaves_the_readme_whole(tmp_path, monkeypatch):
    rn = _readme_numbers()
    path = tmp_path / "README.md"
    path.write_text(README)
    path.chmod(0o644)
    monkeypatch.setattr(rn, "measure", lambda: {"demo": "new \ud800", "validate": "new"})  # cannot be encoded
    with pytest.raises(UnicodeEncodeError):
        rn.main(["--readme", str(path)])
    assert path.read_text() == README and os.listdir(tmp_path) == ["README.md"]
    monkeypatch.setattr(rn, "measure", lambda: {"demo": "new 1", "validate": "new 2"})
    rn.main(["--readme", str(path)])
    assert "new 1" in path.read_text() and "new 2" in path.read_text()
    assert path.stat().st_mode & 0o777 == 0o644 and os.listdir(tmp_path) == ["README.md"]


@pytest.mark.parametrize("signum, code, line", [pytest.param(signal.SIGINT, 130, "interrupted: stopped by Ctrl-C (SIGINT)",
                                                              marks=pytest.mark.slow),
                                                 (signal.SIGTERM, 143, "interrupted: terminated (SIGTERM)")])
def test_readme_numbers_stopped_while_measuring_is_one_line_and_stops_its_child(tmp_path, signum, code, line):
    """Ctrl-C while the demo trained was a KeyboardInterrupt traceback; SIGTERM killed the script and left the
    training child running as an orphan. The script runs as a user runs it; the child it starts is a stand-in
    (sys.executable replaced by a script that records its pid and sleeps) so that nothing is trained."""
    readme = tmp_path / "README.md"
    readme.write_text(README)
    pid_file = tmp_path / "child.pid"
    fake = tmp_path / "fake_python"
    fake.write_text(f"#!/bin/sh\necho $$ > {pid_file}.tmp && mv {pid_file}.tmp {pid_file}\nexec sleep 600\n")
    fake.chmod(0o755)
    code_text = (f"import runpy, sys; sys.executable = {str(fake)!r}; "
                 f"sys.argv = ['readme_numbers.py', '--readme', {str(readme)!r}]; "
                 f"runpy.run_path({os.path.join(ROOT, 'util_scripts', 'readme_numbers.py')!r}, run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", code_text], stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a terminal's Ctrl-C
    child = None
    try:
        while not pid_file.exists() and proc.poll() is None:  # the stand-in child has started
            time.sleep(0.1)
        assert proc.poll() is None, proc.stderr.read()
        child = int(pid_file.read_text())
        proc.send_signal(signum)
        err = proc.communicate()[1]
        assert proc.returncode == code and "Traceback" not in err, err
        assert err.strip().splitlines()[-1] == line
        with pytest.raises(ProcessLookupError):  # killed and reaped by subprocess.run
            os.kill(child, 0)
        assert readme.read_text() == README
    finally:
        if proc.poll() is None:
            proc.kill()
        if child is not None:
            with contextlib.suppress(ProcessLookupError):  # already gone: what the test expects
                os.kill(child, signal.SIGKILL)
