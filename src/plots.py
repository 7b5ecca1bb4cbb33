"""Every figure of the analyses, from the CSVs the scripts write (and the paper's own data).

``python -m src.plots KIND CSV... --out DIR [--labels L...]`` draws each figure of KIND as PNG
(300 dpi) and PDF into DIR and prints their paths. Kinds and the columns their CSVs need:

* ``effectiveness`` -- attack_effectiveness.py CSVs (``adv_loss, attack_steps, epoch, seed``; rows
  whose ``attack`` is not ``pgd`` are left out). The paper's relative robust-loss gap of PGD-k to
  the strongest PGD in the file (PGD-200 in the paper), ``|L_max - L_k| / L_max * 100``, per
  checkpoint and seed, with epochs counted from 1 and the untrained checkpoint (epoch 1) left out,
  as the paper's notebook did (original-behaviour.md §6.1). Four figures: ``epoch_vs_pgd-<k>``
  (fewest steps), ``steps``, ``steps_unaggregated`` (a panel per epoch) and
  ``steps_vs_relative_difference`` (a panel per step count). One line per CSV.
* ``convergence`` -- attack_convergence.py CSVs (``point, seed, steps, loss``), §6.2: per CSV
  ``<label>-point`` (one point, a line per restart) and ``<label>-all`` (a panel per point; with more than
  32 points, pages of 32: ``<label>-all-1``, ``<label>-all-2``, ...); with
  two or more CSVs also ``<label1>_<label2>`` (the same point under each model).
* ``learning-curves`` -- training ``summary.csv`` files (``epoch`` and ``--metric``, default
  ``eval_robust_top1``) or W&B CSV exports (``epoch`` or ``Step``, then one column per run, with
  optional ``<...>__MIN`` / ``<...>__MAX`` columns drawn as a band; the export's own metric, which
  ``--metric`` must match when given); a line per run, one metric per figure.
* ``robustness`` -- validate.py result CSVs with one row per eps: ``eps`` or ``attack_eps``
  (in /255 units, like ``--attack-eps``) and ``robust_top1`` (%); a line per CSV (per attack and
  step count where a CSV holds several).

Labels default to the CSV's file name without extension (with its folders where two files share
a name: ``run1/summary``). Input is read strictly: a value that is not a number, an empty or NaN
value (except the gaps of a learning curve), a repeated row (same epoch/seed/steps, point/seed/
steps, eps, epoch), an incomplete effectiveness grid, a ragged row, repeated labels or more lines
than can be told apart are each one ``error:`` line, never rows dropped or averaged behind the
user's back. One style everywhere: sized for a paper column (3.25 in wide; panel grids 6.75 in),
8 pt text, labelled axes.
"""
from __future__ import annotations

import csv
import functools
import io
import os
import random
import re
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from src import storage
from src.errors import UsageError, run_cli

__all__ = ["KINDS", "STYLE", "read_csv", "relative_gap", "effectiveness_figures", "convergence_figures",
           "learning_curve_figures", "robustness_figures", "run_summary_figure", "summary_png", "figures",
           "save_figure", "draw", "main"]

KINDS = ("effectiveness", "convergence", "learning-curves", "robustness")
COLUMN_WIDTH, TEXT_WIDTH = 3.25, 6.75  # inches, a two-column paper
STYLE = {
    "font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "legend.fontsize": 7, "xtick.labelsize": 7,
    "ytick.labelsize": 7, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
    "axes.spines.right": False, "lines.linewidth": 1.2, "lines.markersize": 3, "legend.frameon": False,
    "savefig.bbox": "tight", "savefig.dpi": 300, "pdf.fonttype": 42,
}
GAP_LABEL = "Rel. loss gap to PGD-{ref} (%)"


def _pyplot():
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules and not os.environ.get("MPLBACKEND"):
        matplotlib.use("Agg")  # files only, unless a notebook chose its backend already
    import matplotlib.pyplot as plt

    return plt


def _styled(fn):
    """Draw everything inside ``fn`` with :data:`STYLE` (rc settings apply when artists are made)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _pyplot().rc_context(STYLE):
            return fn(*args, **kwargs)

    return wrapper


def _figure(width: float = COLUMN_WIDTH, height: float = 2.1, nrows: int = 1, ncols: int = 1, **kwargs):
    fig, axes = _pyplot().subplots(nrows, ncols, figsize=(width, height), squeeze=False, **kwargs)
    return fig, axes


def _finish(fig, legend_ax=None):
    """Legend (beside the axes when it has many entries, so it hides no data) and tight layout."""
    entries = legend_ax.get_legend_handles_labels()[0] if legend_ax is not None else []
    if len(entries) > 6:
        legend_ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), ncol=(len(entries) + 19) // 20)
    elif entries:
        legend_ax.legend()
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------
# Input
# ----------------------------------------------------------------------------------------------

def read_csv(path: str, required: Sequence[str] = ()) -> pd.DataFrame:
    """A CSV as a DataFrame of strings indexed by file line (``df.index.name == "line"``).

    Read strictly, so nothing is dropped or shifted behind the user's back: a missing, empty,
    binary or JSON file, a row with more or fewer fields than the header, a column named twice or
    missing ``required`` columns are each a UsageError. A UTF-8 BOM and Windows line endings are
    fine. Numbers are checked where they are used (:func:`_numeric`)."""
    if os.path.isdir(path):
        raise UsageError(f"{path} is a folder; give the CSV file in it")
    if not os.path.isfile(path):
        raise UsageError(f"{path} does not exist")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UsageError(f"{path} cannot be read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not a readable CSV (not UTF-8 text)") from None
    if "\x00" in text:
        raise UsageError(f"{path} is not a readable CSV (binary data)")
    if not text.strip():
        raise UsageError(f"{path} is empty")
    if text.lstrip()[:1] in ("{", "["):
        raise UsageError(f"{path} is JSON, not CSV: give the CSV (validate.py writes one for --results-file X.csv)")
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: List[List[str]] = []
    lines: List[int] = []
    try:
        header = [h.strip() for h in next(reader)]
        for row in reader:
            if not row or not any(v.strip() for v in row):
                continue  # a blank line
            if len(row) != len(header):
                raise UsageError(f"{path} line {reader.line_num} has {len(row)} field(s), its header {len(header)}; "
                                 "fix the file (a row of another table, or a value with an unquoted comma?)")
            rows.append(row)
            lines.append(reader.line_num)
    except csv.Error as e:
        raise UsageError(f"{path} is not a readable CSV (line {reader.line_num}: {e})") from None
    named = [h for h in header if h]
    twice = sorted({h for h in named if named.count(h) > 1})
    if twice or len(named) != len(header):
        raise UsageError(f"{path}: the header " + (f"names {twice[0]} twice" if twice else "has an unnamed column"))
    missing = [c for c in required if c not in header]
    if missing:
        raise UsageError(f"{path} lacks the column(s) {', '.join(missing)} (it has {', '.join(header[:8])}"
                         f"{' ...' if len(header) > 8 else ''})")
    if not rows:
        raise UsageError(f"{path} has a header but no rows")
    return pd.DataFrame(rows, columns=header, index=pd.Index(lines, name="line"), dtype=object)


def _where(df: pd.DataFrame, index) -> str:
    """``line N`` of the file for frames from :func:`read_csv`, else ``row N``."""
    return f"line {index}" if df.index.name == "line" else f"row {index}"


def _numeric(df: pd.DataFrame, columns: Sequence[str], path: str, integer: Sequence[str] = (),
             missing_ok: bool = False) -> pd.DataFrame:
    """``columns`` of ``df`` as numbers, checked value by value (the first bad one is a UsageError
    naming its line): text that is not a number always; an empty, NaN or infinite value unless
    ``missing_ok`` (a gap in a learning curve; it stays NaN); a value of an ``integer`` column that
    is not a whole number >= 0. Never a row silently dropped for a typo."""
    df = df.copy()
    for c in columns:
        raw = df[c]
        text = raw.astype(str).str.strip()
        values = pd.to_numeric(raw, errors="coerce").astype(float)
        blank = raw.isna() | text.isin(["", "nan", "NaN", "NAN", "None", "null"])
        bad = values.isna() & ~blank
        if bad.any():
            i = bad.idxmax()
            raise UsageError(f"{path} {_where(df, i)}: {c} is '{raw[i]}', not a number")
        gaps = blank | ~np.isfinite(values.fillna(0.0))
        if missing_ok:
            values[gaps] = np.nan
        elif gaps.any():
            i = gaps.idxmax()
            raise UsageError(f"{path} {_where(df, i)}: {c} is {'empty' if text[i] == '' else repr(raw[i])}; every row "
                             f"needs a finite {c} (remove the row, or measure it again)")
        if values.isna().all():
            raise UsageError(f"{path}: column {c} has no numeric values")
        if c in integer:
            whole = values.dropna()
            wrong = whole[(whole != np.round(whole)) | (whole < 0)]
            if len(wrong):
                raise UsageError(f"{path} {_where(df, wrong.index[0])}: {c} is '{raw[wrong.index[0]]}'; it must be a "
                                 "whole number >= 0")
        df[c] = values
    return df


def _is_accuracy(metric: str) -> bool:
    return bool(re.search(r"top[15]$", metric))


def _check_percent(values: pd.Series, path: str, what: str, where: Optional[pd.DataFrame] = None) -> None:
    """Accuracies are percentages: outside [0, 100] is an error; every value in (0, 1] is warned about
    (fractions drawn as percentages would hug the axis, 100x too small)."""
    finite = values.dropna()
    wrong = finite[(finite < 0) | (finite > 100)]
    if len(wrong):
        at = f" {_where(where, wrong.index[0])}" if where is not None else ""
        raise UsageError(f"{path}{at}: {what} is {wrong.iloc[0]:g}; accuracies are percentages in [0, 100]")
    if len(finite) and 0 < finite.max() <= 1:
        print(f"warning: {path}: every {what} is at most 1 (largest {finite.max():g}): if these are fractions, "
              "multiply them by 100 (the axis is in %)", file=sys.stderr)


def _unique(df: pd.DataFrame, keys: Sequence[str], path: str, what: str) -> None:
    """Refuse two rows for the same ``keys`` (they would be averaged or drawn as one zigzag line)."""
    dup = df.duplicated(subset=list(keys), keep=False)
    if dup.any():
        first = df[dup].iloc[0]
        where = [_where(df, i) for i in df[dup & (df[list(keys)] == first[list(keys)]).all(axis=1)].index[:2]]
        key = ", ".join(f"{k} {first[k]:g}" if isinstance(first[k], float) else f"{k} {first[k]}" for k in keys)
        raise UsageError(f"{path} has several rows for {key} ({' and '.join(where)}); keep one row per {what}")


def _labels(paths: Sequence[str], labels: Optional[Sequence[str]]) -> List[str]:
    """One distinct label per CSV: ``--labels``, else the file name without extension (with as many
    of its folders as it takes to tell files of the same name apart, e.g. ``run1/summary``)."""
    if labels:
        if len(labels) != len(paths):
            raise UsageError(f"--labels has {len(labels)} value(s) for {len(paths)} CSV file(s)")
        labels = [str(label) for label in labels]
        bad = [label for label in labels if not label.strip() or label.startswith("_")]
        if bad:
            raise UsageError(f"--labels: '{bad[0]}' cannot label a line (empty, or starts with '_', which "
                             "matplotlib leaves out of legends)")
        twice = sorted({label for label in labels if labels.count(label) > 1})
        if twice:
            raise UsageError(f"--labels gives '{twice[0]}' to several CSVs; their lines could not be told apart")
        return labels
    real = [os.path.realpath(p) for p in paths]
    twice = sorted({p for p, r in zip(paths, real) if real.count(r) > 1})
    if twice:
        raise UsageError(f"{twice[0]} is given twice")
    parts = [os.path.splitext(os.path.abspath(p))[0].strip(os.sep).split(os.sep) for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        out = ["/".join(p[-depth:]) for p in parts]
        if len(set(out)) == len(out):
            return [label.lstrip("_") or label for label in out]
    return ["/".join(p) for p in parts]


MAX_LINES = 40  # 10 colours x 4 line styles


def _line_style(i: int, n: int) -> Dict[str, str]:
    """Colour and line style of the i-th of n lines: distinct for up to :data:`MAX_LINES`."""
    if n > MAX_LINES:
        raise UsageError(f"{n} lines in one figure cannot be told apart (at most {MAX_LINES}); draw fewer CSVs at once")
    return {"color": f"C{i % 10}", "linestyle": ("-", "--", ":", "-.")[i // 10]}


# ----------------------------------------------------------------------------------------------
# Attack effectiveness (§6.1)
# ----------------------------------------------------------------------------------------------

def relative_gap(df: pd.DataFrame, source: str = "data") -> Tuple[pd.DataFrame, int]:
    """Long table ``epoch, seed, steps, gap`` of ``|L_max - L_k| / L_max * 100`` and the reference k_max.

    Only ``pgd`` rows count (where there is an ``attack`` column), and checkpoints with an epoch
    number (``standard``, of ``--validate-standard``, is left out). Every checkpoint and seed must
    have one row of each step count: a gap is never averaged over fewer seeds, or over repeated rows,
    without a word."""
    df = df.copy()
    if "attack" in df.columns:
        df = df[df["attack"].astype(str).str.strip() == "pgd"]
    df = df[df["epoch"].astype(str).str.strip() != "standard"]
    if df.empty:
        raise UsageError(f"{source} has no PGD rows of a numbered checkpoint")
    key = ["epoch", "seed", "attack_steps"]
    df = _numeric(df, key + ["adv_loss"], source, integer=key)
    df[key] = df[key].astype(int)
    _unique(df, key, source, "checkpoint, seed and step count")
    df["epoch"] = df["epoch"] + 1  # 0-based ids -> epochs
    df = df[df["epoch"] != 1]
    steps = sorted(df["attack_steps"].unique())
    if len(steps) < 2:
        raise UsageError(f"{source}: needs PGD rows of at least two step counts after epoch 1 (has "
                         f"{[int(s) for s in steps]})")
    table = df.pivot(index=["epoch", "seed"], columns="attack_steps", values="adv_loss")
    holes = table.isna().stack()
    if holes.any():
        (epoch, seed, k) = holes[holes].index[0]
        raise UsageError(f"{source}: checkpoint {epoch - 1} (epoch {epoch}) seed {seed} has no PGD-{k} row; every "
                         f"checkpoint and seed needs every step count ({', '.join(map(str, steps))})")
    ref = int(steps[-1])
    if (table[ref] <= 0).any():
        epoch, seed = table.index[(table[ref] <= 0).to_numpy()][0]
        raise UsageError(f"{source}: the PGD-{ref} loss of checkpoint {epoch - 1} seed {seed} is "
                         f"{table[ref][(epoch, seed)]:g}; the relative gap needs a positive reference loss")
    parts = []
    for k in steps[:-1]:
        gap = ((table[ref] - table[k]).abs() / table[ref] * 100).rename("gap").reset_index()
        parts.append(gap.assign(steps=int(k)))
    out = pd.concat(parts, ignore_index=True)
    out["epoch"] = out["epoch"].astype(int)
    return out, ref


def _mean_std(df: pd.DataFrame, by: str) -> pd.DataFrame:
    return df.groupby(by)["gap"].agg(["mean", "std"]).fillna(0.0).reset_index()


def _errorbar(ax, frame: pd.DataFrame, x: str, label: str, style: Dict[str, str]) -> None:
    ax.errorbar(frame[x], frame["mean"], yerr=frame["std"], label=label, marker="o", capsize=2, **style)


def _grid(n: int, ncols: int = 4):
    nrows = (n + ncols - 1) // ncols
    fig, axes = _figure(TEXT_WIDTH, 1.5 * nrows + 0.4, nrows, ncols)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


@_styled
def effectiveness_figures(paths: Sequence[str], labels: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """The four figures of §6.1 for one or more attack-effectiveness CSVs (a line per CSV)."""
    data = []
    for path, label in zip(paths, _labels(paths, labels)):
        gap, ref = relative_gap(read_csv(path, ("adv_loss", "attack_steps", "epoch", "seed")), path)
        data.append((label, gap, ref))
    refs = sorted({r for _, _, r in data})
    ylabel = GAP_LABEL.format(ref="/".join(map(str, refs)))
    styles = [_line_style(i, len(data)) for i in range(len(data))]
    k_min = min(int(g["steps"].min()) for _, g, _ in data)
    lacking = [label for label, g, _ in data if not (g["steps"] == k_min).any()]
    if lacking:
        raise UsageError(f"{lacking[0]} has no PGD-{k_min} rows after epoch 1, which the other CSVs' "
                         f"epoch_vs_pgd-{k_min} figure needs: give CSVs of the same step counts")
    figs: Dict[str, object] = {}

    fig, axes = _figure()
    for (label, gap, _), c in zip(data, styles):
        _errorbar(axes[0, 0], _mean_std(gap[gap["steps"] == k_min], "epoch"), "epoch", label, c)
    axes[0, 0].set(xlabel="Epoch", ylabel=ylabel.replace("Rel.", f"PGD-{k_min} rel."))
    figs[f"epoch_vs_pgd-{k_min}"] = _finish(fig, axes[0, 0])

    fig, axes = _figure()
    for (label, gap, _), c in zip(data, styles):
        _errorbar(axes[0, 0], _mean_std(gap, "steps"), "steps", label, c)
    axes[0, 0].set(xlabel="Attack steps", ylabel=ylabel, xscale="log")
    figs["steps"] = _finish(fig, axes[0, 0])

    for name, facet, x, xlabel in (("steps_unaggregated", "epoch", "steps", "Attack steps"),
                                   ("steps_vs_relative_difference", "steps", "epoch", "Epoch")):
        keys = sorted(set().union(*[set(g[facet].unique()) for _, g, _ in data]))
        fig, axes = _grid(len(keys))
        for ax, key in zip(axes, keys):
            for (label, gap, _), c in zip(data, styles):
                part = gap[gap[facet] == key]
                if len(part):
                    _errorbar(ax, _mean_std(part, x), x, label, c)
            ax.set(title=f"epoch {key}" if facet == "epoch" else f"PGD-{key}", xlabel=xlabel)
            if ax is axes[0] or len(axes) > 4 and axes.index(ax) % 4 == 0:
                ax.set_ylabel(ylabel)
            if x == "steps":
                ax.set_xscale("log")
        figs[name] = _finish(fig, axes[0])
    return figs


# ----------------------------------------------------------------------------------------------
# Attack convergence (§6.2)
# ----------------------------------------------------------------------------------------------

MODEL_LINESTYLES = ("-", "--", ":", "-.")


# panels per "-all" figure (8 rows of 4, 12.4 in tall): more points go on further pages, not one page too tall to
# read (or, past ~170 rows, to render at 300 dpi)
POINTS_PER_PAGE = 32


def _convergence_frame(path: str) -> pd.DataFrame:
    key = ["point", "seed", "steps"]
    df = _numeric(read_csv(path, key + ["loss"]), key + ["loss"], path, integer=key)
    df[key] = df[key].astype(int)
    _unique(df, key, path, "point, seed and step count")
    if df["steps"].nunique() < 2:
        raise UsageError(f"{path}: needs losses after at least two step counts to draw against steps (has "
                         f"{sorted(df['steps'].unique().tolist())})")
    return df.sort_values(key)


def _loss_lines(ax, frame: pd.DataFrame, linestyle: str = "-", label_prefix: str = "", legend: bool = True) -> None:
    """A line per restart, coloured along a colour map so that no two restarts share a colour."""
    cmap = _pyplot().get_cmap("viridis")
    seeds = sorted(frame["seed"].unique())
    for i, seed in enumerate(seeds):
        part = frame[frame["seed"] == seed]
        label = f"{label_prefix}seed {int(seed)}" if legend and i < 5 else None
        ax.plot(part["steps"], part["loss"], linestyle=linestyle, color=cmap(i / max(len(seeds) - 1, 1) * 0.9),
                alpha=0.8, label=label)
    ax.set_xscale("symlog", linthresh=1)
    ax.set(xlabel="Attack steps", ylabel="Loss")


@_styled
def convergence_figures(paths: Sequence[str], labels: Optional[Sequence[str]] = None,
                        point: Optional[int] = None, seed: int = 42) -> Dict[str, object]:
    """Per CSV: one point (``point``, else one drawn with ``random.seed(seed)`` among the points
    common to all CSVs) and every point; with several CSVs also that point under each model."""
    names = _labels(paths, labels)
    if len(paths) > len(MODEL_LINESTYLES):
        raise UsageError(f"convergence tells models apart by line style: at most {len(MODEL_LINESTYLES)} CSVs at once "
                         f"(got {len(paths)})")
    frames = [_convergence_frame(p) for p in paths]
    common = sorted(set.intersection(*[set(f["point"].astype(int)) for f in frames]))
    if point is None:
        if not common:
            raise UsageError("the CSVs have no point in common; pass --point for each file separately")
        point = random.Random(seed).choice(common)
    elif point not in common:
        raise UsageError(f"point {point} is not in every CSV (common points: {common[:10]}...)")
    figs: Dict[str, object] = {}
    for label, frame in zip(names, frames):
        fig, axes = _figure()
        _loss_lines(axes[0, 0], frame[frame["point"] == point])
        axes[0, 0].set_title(f"{label}, point {point}")
        figs[f"{label}-point"] = _finish(fig)
        pts = sorted(frame["point"].astype(int).unique())
        pages = [pts[i:i + POINTS_PER_PAGE] for i in range(0, len(pts), POINTS_PER_PAGE)]
        for n, page in enumerate(pages, 1):
            fig, axes = _grid(len(page))
            for ax, p in zip(axes, page):
                _loss_lines(ax, frame[frame["point"] == p], legend=False)
                ax.set_title(f"point {p}")
            figs[f"{label}-all" if len(pages) == 1 else f"{label}-all-{n}"] = _finish(fig)
    if len(frames) > 1:
        fig, axes = _figure()
        for i, (label, frame) in enumerate(zip(names, frames)):
            _loss_lines(axes[0, 0], frame[frame["point"] == point], linestyle=MODEL_LINESTYLES[i], legend=False)
            axes[0, 0].plot([], [], color="0.3", linestyle=MODEL_LINESTYLES[i], label=label)
        axes[0, 0].set_title(f"point {point}, a line per restart")
        figs["_".join(names)] = _finish(fig, axes[0, 0])
    return figs


# ----------------------------------------------------------------------------------------------
# Learning curves and robustness curves
# ----------------------------------------------------------------------------------------------

_WANDB_BAND = re.compile(r"^(?:[^:]*: )?(?P<run>.+?) - (?P<metric>[^ ]+?)__(?P<agg>MIN|MAX)$")
_METRIC_LABELS = {"robust_top1": "Robust top-1 (%)", "top1": "Top-1 (%)", "loss": "Loss", "eps": "Eps",
                  "lr": "Learning rate"}


def _metric_label(metric: str) -> str:
    prefix = "Train " if metric.startswith("train_") else "Eval " if metric.startswith("eval_") else ""
    base = re.sub(r"^(train_|eval_)", "", metric)
    return prefix + _METRIC_LABELS.get(base, base).lower() if prefix else _METRIC_LABELS.get(base, base)


DEFAULT_METRIC = "eval_robust_top1"


def _is_wandb_export(df: pd.DataFrame) -> bool:
    """W&B CSV exports have a ``Step`` column or ``<run> - <metric>`` columns; summary.csv has neither."""
    return "Step" in df.columns or any(" - " in str(c) for c in df.columns)


def _wandb_runs(df: pd.DataFrame, x: str, path: str) -> Tuple[str, List[Tuple[str, pd.DataFrame]]]:
    """Runs of a W&B export: plain columns are runs; ``<run> - <metric>__MIN/MAX`` their band."""
    bands: Dict[str, Dict[str, str]] = {}
    metrics = set()
    for col in map(str, df.columns):
        m = _WANDB_BAND.match(col)
        if m and not m.group("metric").startswith("_"):
            bands.setdefault(m.group("run"), {})["lo" if m.group("agg") == "MIN" else "hi"] = col
            metrics.add(m.group("metric"))
    if len(metrics) > 1:
        raise UsageError(f"{path} is a W&B export of several metrics ({', '.join(sorted(metrics))}); export one")
    runs = []
    for col in map(str, df.columns):
        if col == x or " - " in col or col.endswith(("__MIN", "__MAX")):
            continue
        band = bands.get(col, {})
        keep = {x: "x", col: "y", **({band["lo"]: "lo", band["hi"]: "hi"} if len(band) == 2 else {})}
        frame = _numeric(df[list(keep)], list(keep), path, missing_ok=True).rename(columns=keep)
        runs.append((col, frame.dropna(subset=["x", "y"])))  # a run shorter than the export: its empty cells
    return (metrics.pop() if metrics else ""), runs


def _curves(df: pd.DataFrame, path: str, label: str,
            metric: Optional[str]) -> Tuple[str, List[Tuple[str, pd.DataFrame]]]:
    """``(metric, [(run label, frame with x, y[, lo, hi])])`` from a summary.csv or a W&B export.

    ``metric`` None: summary.csv's ``eval_robust_top1``, or whatever a W&B export holds; a metric
    asked for that the file does not hold is an error, never another column drawn instead."""
    x = "epoch" if "epoch" in df.columns else "Step" if "Step" in df.columns else None
    if x is None:
        raise UsageError(f"{path} lacks an epoch column ('epoch' in summary.csv, 'epoch' or 'Step' in W&B exports)")
    if _is_wandb_export(df):
        found, runs = _wandb_runs(df, x, path)
        if not runs:
            raise UsageError(f"{path} is a W&B export without run columns")
        if metric and found and metric != found:
            raise UsageError(f"{path} is a W&B export of {found}, not of --metric {metric}")
        shown = found or metric or DEFAULT_METRIC
    else:
        shown = metric or DEFAULT_METRIC
        if shown not in df.columns:
            numeric = [str(c) for c in df.columns if c != x]
            raise UsageError(f"{path} has no column {shown} (--metric); it has {', '.join(numeric[:10])}"
                             f"{' ...' if len(numeric) > 10 else ''}")
        frame = _numeric(df[[x, shown]], [x, shown], path, missing_ok=True).rename(columns={x: "x", shown: "y"})
        runs = [(label, frame.dropna(subset=["x", "y"]))]  # epochs where the metric was not measured ('nan')
    for run, frame in runs:
        if _is_accuracy(shown):
            _check_percent(frame["y"], path, shown + (f" (run {run})" if run != label else ""), frame)
        if frame["x"].isna().all():
            raise UsageError(f"{path}: the {x} column is empty")
        repeated = frame["x"][frame["x"].duplicated()]
        if len(repeated):
            raise UsageError(f"{path} has several rows for {x} {repeated.iloc[0]:g}" +
                             (f" (run {run})" if run != label else "") + "; keep one row per epoch")
    return shown, runs


@_styled
def learning_curve_figures(paths: Sequence[str], labels: Optional[Sequence[str]] = None,
                           metric: Optional[str] = None, run_labels: Optional[Dict[str, str]] = None,
                           name: str = "learning-curves") -> Dict[str, object]:
    """One figure: ``metric`` (default ``eval_robust_top1``; a W&B export's own metric) against
    epoch, a line per summary.csv or per run of a W&B export. Every file must show the same metric."""
    series = []
    shown = set()
    for path, label in zip(paths, _labels(paths, labels)):
        found, runs = _curves(read_csv(path), path, label, metric)
        shown.add(found)
        series += [(label, (run_labels or {}).get(run, run), frame) for run, frame in runs]
    if len(shown) > 1:
        raise UsageError(f"the CSVs hold different metrics ({', '.join(sorted(shown))}); draw one metric per figure "
                         "(--metric)")
    names = [run for _, run, _ in series]
    if len(set(names)) < len(names):  # the same run name in two files: say which file
        names = [run if names.count(run) == 1 else f"{label}: {run}" for label, run, _ in series]
        if len(set(names)) < len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise UsageError(f"two lines would be labelled '{twice[0]}'; give distinct --labels")
    fig, axes = _figure()
    ax = axes[0, 0]
    for i, (run, (_, _, frame)) in enumerate(zip(names, series)):
        style = _line_style(i, len(series))
        ax.plot(frame["x"], frame["y"], label=run, marker="o" if len(frame) == 1 else None, **style)
        if "lo" in frame.columns:
            band = frame.dropna(subset=["lo", "hi"])
            ax.fill_between(band["x"], band["lo"], band["hi"], color=style["color"], alpha=0.2, linewidth=0)
    ax.set(xlabel="Epoch", ylabel=_metric_label(shown.pop()))
    return {name: _finish(fig, ax)}


@_styled
def robustness_figures(paths: Sequence[str], labels: Optional[Sequence[str]] = None,
                       name: str = "robust_accuracy_vs_eps") -> Dict[str, object]:
    """Robust top-1 against eps (/255), a line per validate.py results CSV with one row per eps (a
    line per attack and step count where the CSV holds several, e.g. ``--attack-steps 2 20``)."""
    lines = []
    for path, label in zip(paths, _labels(paths, labels)):
        df = read_csv(path, ("robust_top1",))
        found = [c for c in ("eps", "attack_eps") if c in df.columns]
        if len(found) != 1:
            raise UsageError(f"{path} " + ("has both eps and attack_eps columns; keep one" if found else
                                           "lacks an eps column ('eps' or 'attack_eps', in /255 units)"))
        eps = found[0]
        df = _numeric(df, [eps, "robust_top1"], path)
        _check_percent(df["robust_top1"], path, "robust_top1", df)
        if (df[eps] < 0).any():
            raise UsageError(f"{path} {_where(df, df.index[(df[eps] < 0).to_numpy()][0])}: {eps} must be >= 0")
        if 0 < df[eps].max() < 1:  # every eps below 1/255: [0, 1] units, which would be drawn 255x too small
            raise UsageError(f"{path}: every {eps} is below 1 (largest {df[eps].max():g}): these look like [0, 1] "
                             "units; give eps in /255 units like --attack-eps (multiply by 255)")
        keys = [c for c in ("attack", "attack_steps") if c in df.columns and df[c].astype(str).nunique() > 1]
        groups = df.groupby([df[c].astype(str).str.strip() for c in keys], sort=False) if keys else [((), df)]
        for key, part in groups:
            key = key if isinstance(key, tuple) else (key,)
            _unique(part, [eps], path, "eps" + (" and " + " and ".join(keys) if keys else ""))
            suffix = ", ".join(f"{v} steps" if c == "attack_steps" else v for c, v in zip(keys, key))
            lines.append((f"{label} ({suffix})" if suffix else label, part.sort_values(eps), eps))
    fig, axes = _figure()
    ax = axes[0, 0]
    for i, (label, df, eps) in enumerate(lines):
        ax.plot(df[eps], df["robust_top1"], marker="o", label=label, **_line_style(i, len(lines)))
    ax.set(xlabel=r"$\epsilon$ (/255)", ylabel="Robust top-1 (%)")
    return {name: _finish(fig, ax if len(lines) > 1 else None)}


# ----------------------------------------------------------------------------------------------
# Output and command line
# ----------------------------------------------------------------------------------------------

def figures(kind: str, paths: Sequence[str], labels: Optional[Sequence[str]] = None, **options) -> Dict[str, object]:
    """The figures of ``kind`` (one of :data:`KINDS`) by name."""
    if kind == "effectiveness":
        return effectiveness_figures(paths, labels)
    if kind == "convergence":
        return convergence_figures(paths, labels, point=options.get("point"))
    if kind == "learning-curves":
        return learning_curve_figures(paths, labels, metric=options.get("metric"))
    if kind == "robustness":
        return robustness_figures(paths, labels)
    raise UsageError(f"unknown plot kind '{kind}': choose one of {', '.join(KINDS)}")


def _summary_series(rows: Sequence[Dict[str, str]], key: str) -> Tuple[List[int], List[float]]:
    xs, ys = [], []
    for r in rows:
        try:
            v = float(r.get(key, "nan"))
        except ValueError:
            continue
        if v == v:  # not NaN
            xs.append(int(r["epoch"]))
            ys.append(v)
    return xs, ys


@_styled
def run_summary_figure(rows: Sequence[Dict[str, str]], title: str = ""):
    """A training run at a glance (``summary.png``): clean and robust top-1 (train and eval), the
    losses, eps and lr per epoch, from the rows of its ``summary.csv``."""
    fig, axes = _figure(TEXT_WIDTH, 3.6, nrows=2, ncols=2, sharex=True)
    panels = [
        (axes[0][0], "Top-1 (%)", [("train_top1", "train clean"), ("eval_top1", "eval clean"),
                                   ("train_robust_top1", "train robust"), ("eval_robust_top1", "eval robust")]),
        (axes[0][1], "Loss", [("train_loss", "train"), ("eval_loss", "eval")]),
        (axes[1][0], "Eps (/255)", [("train_eps", "train eps")]),
        (axes[1][1], "Learning rate", [("train_lr", "lr")]),
    ]
    for ax, ylabel, series in panels:
        for key, label in series:
            xs, ys = _summary_series(rows, key)
            if xs:
                ax.plot(xs, ys, marker="o", label=label, linestyle="--" if key.startswith("train") else "-")
        ax.set_ylabel(ylabel)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    for ax in axes[1]:
        ax.set_xlabel("Epoch")
    if title:
        fig.suptitle(title)
    return _finish(fig)


def summary_png(rows: Sequence[Dict[str, str]], title: str = "") -> bytes:
    """``run_summary_figure`` as PNG bytes (written atomically by the caller)."""
    import io

    fig = run_summary_figure(rows, title)
    buf = io.BytesIO()
    with _pyplot().rc_context(STYLE):
        fig.savefig(buf, format="png", dpi=120)
    _pyplot().close(fig)
    return buf.getvalue()


def _figure_paths(out_dir: str, name: str) -> List[str]:
    safe = re.sub(r"[^\w.+-]+", "_", name)
    return [storage.join(out_dir, f"{safe}.{ext}") for ext in ("png", "pdf")]


@_styled
def save_figure(fig, out_dir: str, name: str) -> List[str]:
    """Write ``<out_dir>/<name>.png`` and ``.pdf`` (each atomically: a kill never leaves half a
    figure, an earlier figure stays until the new one is complete); returns both paths."""
    storage.makedirs(out_dir)
    out = []
    for path in _figure_paths(out_dir, name):
        buf = io.BytesIO()
        fig.savefig(buf, format=path.rsplit(".", 1)[1])
        storage.atomic_write_bytes(path, buf.getvalue())
        out.append(path)
    return out


def draw(kind: str, paths: Sequence[str], out_dir: str, labels: Optional[Sequence[str]] = None,
         **options) -> List[str]:
    """Draw every figure of ``kind`` into ``out_dir`` (PNG + PDF); returns the files written.

    Every target is checked before the first is written (``--out`` a file, a figure name taken by
    a folder or by one of the input CSVs): an error line, and no figure set half written."""
    figs = figures(kind, paths, labels, **options)
    try:
        files: Dict[str, str] = {}
        for name in figs:
            other = files.setdefault(_figure_paths(out_dir, name)[0], name)
            if other != name:
                raise UsageError(f"the figures '{other}' and '{name}' would be written to the same file; give --labels "
                                 "that differ in letters or digits")
        storage.check_output_folder(out_dir, "--out")
        for name in figs:
            for target in _figure_paths(out_dir, name):
                storage.check_output_file(target, "--out", inputs=paths)
        written: List[str] = []
        for name, fig in figs.items():
            written += save_figure(fig, out_dir, name)
        return written
    finally:
        for fig in figs.values():
            _pyplot().close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from src.arg_parser.analysis import parse_plots_args

    args = parse_plots_args(KINDS, argv)
    for path in draw(args.kind, args.csv, args.out, args.labels, metric=args.metric, point=args.point):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
