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
  ``<label>-point`` (one point, a line per restart) and ``<label>-all`` (a panel per point); with
  two or more CSVs also ``<label1>_<label2>`` (the same point under each model).
* ``learning-curves`` -- training ``summary.csv`` files (``epoch`` and ``--metric``, default
  ``eval_robust_top1``) or W&B CSV exports (``epoch`` or ``Step``, then one column per run, with
  optional ``<...>__MIN`` / ``<...>__MAX`` columns drawn as a band); a line per run.
* ``robustness`` -- validate.py result CSVs with one row per eps: ``eps`` or ``attack_eps``
  (in /255 units, like ``--attack-eps``) and ``robust_top1`` (%); a line per CSV.

Labels default to the CSV's file name without extension. One style everywhere: sized for a
paper column (3.25 in wide; panel grids 6.75 in), 8 pt text, labelled axes.
"""
from __future__ import annotations

import functools
import io
import os
import random
import re
import sys
from typing import Dict, List, Optional, Sequence, Tuple

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
    if legend_ax is not None and legend_ax.get_legend_handles_labels()[0]:
        legend_ax.legend()
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------
# Input
# ----------------------------------------------------------------------------------------------

def read_csv(path: str, required: Sequence[str] = ()) -> pd.DataFrame:
    """A CSV as a DataFrame; a missing file, an empty file or missing columns are a UsageError."""
    if os.path.isdir(path):
        raise UsageError(f"{path} is a folder; give the CSV file in it")
    if not os.path.isfile(path):
        raise UsageError(f"{path} does not exist")
    try:
        df = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise UsageError(f"{path} is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not a readable CSV ({type(e).__name__})") from None
    if df.empty:
        raise UsageError(f"{path} has a header but no rows")
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise UsageError(f"{path} lacks the column(s) {', '.join(missing)} (it has {', '.join(map(str, df.columns[:8]))}"
                         f"{' ...' if len(df.columns) > 8 else ''})")
    return df


def _labels(paths: Sequence[str], labels: Optional[Sequence[str]]) -> List[str]:
    if labels:
        if len(labels) != len(paths):
            raise UsageError(f"--labels has {len(labels)} value(s) for {len(paths)} CSV file(s)")
        return list(labels)
    return [os.path.splitext(os.path.basename(p))[0] for p in paths]


def _numeric(df: pd.DataFrame, columns: Sequence[str], path: str) -> pd.DataFrame:
    for c in columns:
        values = pd.to_numeric(df[c], errors="coerce")
        if values.isna().all():
            raise UsageError(f"{path}: column {c} has no numeric values")
        df[c] = values
    return df


# ----------------------------------------------------------------------------------------------
# Attack effectiveness (§6.1)
# ----------------------------------------------------------------------------------------------

def relative_gap(df: pd.DataFrame, source: str = "data") -> Tuple[pd.DataFrame, int]:
    """Long table ``epoch, seed, steps, gap`` of ``|L_max - L_k| / L_max * 100`` and the reference k_max."""
    df = df.copy()
    if "attack" in df.columns:
        df = df[df["attack"].astype(str) == "pgd"]
    df["epoch"] = pd.to_numeric(df["epoch"], errors="coerce") + 1  # 0-based ids -> epochs; 'standard' dropped
    df = _numeric(df.dropna(subset=["epoch"]), ["attack_steps", "adv_loss"], source)
    df = df[df["epoch"] != 1].dropna(subset=["attack_steps", "adv_loss"])
    steps = sorted(df["attack_steps"].astype(int).unique())
    if len(steps) < 2:
        raise UsageError(f"{source}: needs PGD rows of at least two step counts after epoch 1 (has {steps})")
    table = df.pivot_table(index=["epoch", "seed"], columns="attack_steps", values="adv_loss", aggfunc="mean")
    ref = steps[-1]
    parts = []
    for k in steps[:-1]:
        gap = ((table[ref] - table[k]).abs() / table[ref] * 100).rename("gap").reset_index()
        parts.append(gap.assign(steps=k))
    out = pd.concat(parts, ignore_index=True).dropna(subset=["gap"])
    out["epoch"] = out["epoch"].astype(int)
    return out, int(ref)


def _mean_std(df: pd.DataFrame, by: str) -> pd.DataFrame:
    return df.groupby(by)["gap"].agg(["mean", "std"]).fillna(0.0).reset_index()


def _errorbar(ax, frame: pd.DataFrame, x: str, label: str, color: str) -> None:
    ax.errorbar(frame[x], frame["mean"], yerr=frame["std"], label=label, color=color, marker="o", capsize=2)


def _colors(n: int) -> List[str]:
    return [f"C{i % 10}" for i in range(n)]


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
    colors = _colors(len(data))
    k_min = min(int(g["steps"].min()) for _, g, _ in data)
    figs: Dict[str, object] = {}

    fig, axes = _figure()
    for (label, gap, _), c in zip(data, colors):
        _errorbar(axes[0, 0], _mean_std(gap[gap["steps"] == k_min], "epoch"), "epoch", label, c)
    axes[0, 0].set(xlabel="Epoch", ylabel=ylabel.replace("Rel.", f"PGD-{k_min} rel."))
    figs[f"epoch_vs_pgd-{k_min}"] = _finish(fig, axes[0, 0])

    fig, axes = _figure()
    for (label, gap, _), c in zip(data, colors):
        _errorbar(axes[0, 0], _mean_std(gap, "steps"), "steps", label, c)
    axes[0, 0].set(xlabel="Attack steps", ylabel=ylabel, xscale="log")
    figs["steps"] = _finish(fig, axes[0, 0])

    for name, facet, x, xlabel in (("steps_unaggregated", "epoch", "steps", "Attack steps"),
                                   ("steps_vs_relative_difference", "steps", "epoch", "Epoch")):
        keys = sorted(set().union(*[set(g[facet].unique()) for _, g, _ in data]))
        fig, axes = _grid(len(keys))
        for ax, key in zip(axes, keys):
            for (label, gap, _), c in zip(data, colors):
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

def _convergence_frame(path: str) -> pd.DataFrame:
    df = _numeric(read_csv(path, ("point", "seed", "steps", "loss")), ["point", "seed", "steps", "loss"], path)
    return df.dropna(subset=["point", "seed", "steps", "loss"]).sort_values(["point", "seed", "steps"])


def _loss_lines(ax, frame: pd.DataFrame, linestyle: str = "-", label_prefix: str = "", legend: bool = True) -> None:
    for i, (seed, part) in enumerate(frame.groupby("seed")):
        label = f"{label_prefix}seed {int(seed)}" if legend and i < 5 else None
        ax.plot(part["steps"], part["loss"], linestyle=linestyle, color=f"C{i % 10}", alpha=0.8, label=label)
    ax.set_xscale("symlog", linthresh=1)
    ax.set(xlabel="Attack steps", ylabel="Loss")


@_styled
def convergence_figures(paths: Sequence[str], labels: Optional[Sequence[str]] = None,
                        point: Optional[int] = None, seed: int = 42) -> Dict[str, object]:
    """Per CSV: one point (``point``, else one drawn with ``random.seed(seed)`` among the points
    common to all CSVs) and every point; with several CSVs also that point under each model."""
    names = _labels(paths, labels)
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
        fig, axes = _grid(len(pts))
        for ax, p in zip(axes, pts):
            _loss_lines(ax, frame[frame["point"] == p], legend=False)
            ax.set_title(f"point {p}")
        figs[f"{label}-all"] = _finish(fig)
    if len(frames) > 1:
        fig, axes = _figure()
        for i, (label, frame) in enumerate(zip(names, frames)):
            _loss_lines(axes[0, 0], frame[frame["point"] == point], linestyle=["-", "--", ":", "-."][i % 4],
                        legend=False)
            axes[0, 0].plot([], [], color="0.3", linestyle=["-", "--", ":", "-."][i % 4], label=label)
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


def _wandb_runs(df: pd.DataFrame, x: str, path: str) -> Tuple[str, List[Tuple[str, pd.DataFrame]]]:
    """Runs of a W&B export: plain columns are runs; ``<run> - <metric>__MIN/MAX`` their band."""
    bands: Dict[str, Dict[str, str]] = {}
    metric = ""
    for col in map(str, df.columns):
        m = _WANDB_BAND.match(col)
        if m and not m.group("metric").startswith("_"):
            bands.setdefault(m.group("run"), {})["lo" if m.group("agg") == "MIN" else "hi"] = col
            metric = m.group("metric")
    runs = []
    for col in map(str, df.columns):
        if col == x or " - " in col or col.endswith(("__MIN", "__MAX")):
            continue
        band = bands.get(col, {})
        keep = {x: "x", col: "y", **({band["lo"]: "lo", band["hi"]: "hi"} if len(band) == 2 else {})}
        frame = _numeric(df[list(keep)].copy(), list(keep), path).rename(columns=keep)
        runs.append((col, frame.dropna(subset=["x", "y"])))
    return metric, runs


def _curves(df: pd.DataFrame, path: str, label: str, metric: str) -> Tuple[str, List[Tuple[str, pd.DataFrame]]]:
    """``(metric, [(run label, frame with x, y[, lo, hi])])`` from a summary.csv or a W&B export."""
    x = "epoch" if "epoch" in df.columns else "Step" if "Step" in df.columns else None
    if x is None:
        raise UsageError(f"{path} lacks an epoch column ('epoch' in summary.csv, 'epoch' or 'Step' in W&B exports)")
    if metric in df.columns:  # a training summary.csv
        frame = _numeric(df[[x, metric]].copy(), [x, metric], path).rename(columns={x: "x", metric: "y"})
        return metric, [(label, frame.dropna())]
    found, runs = _wandb_runs(df, x, path)
    if not runs:
        raise UsageError(f"{path} has no column {metric} (summary.csv) and no run columns (W&B export)")
    return found or metric, runs


@_styled
def learning_curve_figures(paths: Sequence[str], labels: Optional[Sequence[str]] = None,
                           metric: str = "eval_robust_top1", run_labels: Optional[Dict[str, str]] = None,
                           name: str = "learning-curves") -> Dict[str, object]:
    """One figure: ``metric`` against epoch, a line per summary.csv or per run of a W&B export."""
    fig, axes = _figure()
    ax = axes[0, 0]
    shown = metric
    i = 0
    for path, label in zip(paths, _labels(paths, labels)):
        shown, runs = _curves(read_csv(path), path, label, metric)
        for run, frame in runs:
            run = (run_labels or {}).get(run, run)
            ax.plot(frame["x"], frame["y"], color=f"C{i % 10}", label=run)
            if "lo" in frame.columns:
                ax.fill_between(frame["x"], frame["lo"], frame["hi"], color=f"C{i % 10}", alpha=0.2, linewidth=0)
            i += 1
    ax.set(xlabel="Epoch", ylabel=_metric_label(shown))
    return {name: _finish(fig, ax)}


@_styled
def robustness_figures(paths: Sequence[str], labels: Optional[Sequence[str]] = None,
                       name: str = "robust_accuracy_vs_eps") -> Dict[str, object]:
    """Robust top-1 against eps (/255), a line per validate.py results CSV with one row per eps."""
    fig, axes = _figure()
    ax = axes[0, 0]
    for i, (path, label) in enumerate(zip(paths, _labels(paths, labels))):
        df = read_csv(path, ("robust_top1",))
        eps = "eps" if "eps" in df.columns else "attack_eps" if "attack_eps" in df.columns else None
        if eps is None:
            raise UsageError(f"{path} lacks an eps column ('eps' or 'attack_eps', in /255 units)")
        df = _numeric(df, [eps, "robust_top1"], path).dropna(subset=[eps, "robust_top1"]).sort_values(eps)
        repeated = df[eps][df[eps].duplicated()].unique()
        if len(repeated):
            raise UsageError(f"{path} has several rows for eps {repeated[0]:g}; keep one row per eps")
        ax.plot(df[eps], df["robust_top1"], marker="o", color=f"C{i % 10}", label=label)
    ax.set(xlabel=r"$\epsilon$ (/255)", ylabel="Robust top-1 (%)")
    return {name: _finish(fig, ax if len(paths) > 1 else None)}


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
        return learning_curve_figures(paths, labels, metric=options.get("metric") or "eval_robust_top1")
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
