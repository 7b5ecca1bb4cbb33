"""``summary.csv``: one row per epoch, columns exactly as the original (§1.1 item 15); an extra
column only when an option asks for it (``--monitor-attack-steps``: ``monitor_gap``).

The file is rewritten atomically on every row (it is small), so a kill never leaves half a line;
on resume the rows of epochs that will be trained again are dropped, so the file never holds a
duplicated or a missing epoch.
"""
from __future__ import annotations

import csv
import io
import math
from typing import Dict, List, Optional

from src import storage

SUMMARY_COLUMNS = ["epoch", "train_loss", "train_top1", "train_robust_top1", "train_eps", "train_lr",
                   "eval_loss", "eval_top1", "eval_robust_top1"]


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else repr(v)
    return str(v)


def read_rows(path: str) -> List[Dict[str, str]]:
    if not storage.exists(path):
        return []
    return list(csv.DictReader(io.StringIO(storage.read_text(path))))


def _write(path: str, columns: List[str], rows: List[Dict[str, str]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([r.get(c, "") for c in columns])
    storage.atomic_write_text(path, buf.getvalue())


class SummaryCsv:
    def __init__(self, path: str, columns: Optional[List[str]] = None):
        self.path = path
        self.columns = list(columns or SUMMARY_COLUMNS)

    def truncate_from(self, epoch: int) -> None:
        """Drop the rows of ``epoch`` and later (they are about to be trained again)."""
        rows = read_rows(self.path)
        if not rows:
            return
        kept = [r for r in rows if int(float(r["epoch"])) < epoch]
        if len(kept) != len(rows):
            _write(self.path, self.columns, kept)

    def append(self, row: Dict[str, object]) -> None:
        rows = read_rows(self.path)
        epoch = int(row["epoch"])
        rows = [r for r in rows if int(float(r["epoch"])) != epoch]
        rows.append({c: _fmt(row.get(c, float("nan"))) for c in self.columns})
        _write(self.path, self.columns, rows)


def summary_row(epoch: int, train: Dict[str, float], evaluation: Dict[str, float],
                extra: Optional[Dict[str, float]] = None) -> Dict[str, object]:
    """The original's columns, plus ``extra`` ones (e.g. the attack monitor's gap; written only when
    the ``SummaryCsv`` was made with those columns)."""
    row: Dict[str, object] = {"epoch": epoch}
    for k in ("loss", "top1", "robust_top1", "eps", "lr"):
        row[f"train_{k}"] = float(train.get(k, float("nan")))
    for k in ("loss", "top1", "robust_top1"):
        row[f"eval_{k}"] = float(evaluation.get(k, float("nan")))
    for k, v in (extra or {}).items():
        row[k] = float(v)
    return row
