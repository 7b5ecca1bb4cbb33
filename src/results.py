"""Result rows and their files: the original's keys and order (the CSV schema notebooks and
downstream tools read, ``cropt_pct`` sic), CSV or JSON (with each row's honesty warnings)."""
from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence

from src import storage
from src.errors import UsageError

if TYPE_CHECKING:  # annotations only
    from src.engine import EvalResult
    from src.eval_setup import EvalModel

_logger = logging.getLogger("robust_vits")

__all__ = ["RESULT_KEYS", "result_row", "json_safe", "results_json", "write_results"]

# The original's result dict, in its order (the CSV schema downstream tools read; `cropt_pct` sic).
RESULT_KEYS = ("top1", "top1_err", "top5", "top5_err", "robust_top1", "robust_top1_err", "robust_top5",
               "robust_top5_err", "loss", "adv_loss", "param_count", "img_size", "cropt_pct", "interpolation")


def result_row(ev: EvalResult, em: EvalModel) -> "OrderedDict[str, Any]":
    """The original's result dict (keys and order of ``RESULT_KEYS``), accuracies in % to 4 places."""
    def r4(v: float) -> float:
        return round(v, 4)

    return OrderedDict([
        ("top1", r4(ev.top1)), ("top1_err", r4(100 - ev.top1)),
        ("top5", r4(ev.top5)), ("top5_err", r4(100 - ev.top5)),
        ("robust_top1", r4(ev.robust_top1)), ("robust_top1_err", r4(100 - ev.robust_top1)),
        ("robust_top5", r4(ev.robust_top5)), ("robust_top5_err", r4(100 - ev.robust_top5)),
        ("loss", r4(ev.loss)), ("adv_loss", r4(ev.adv_loss)),
        ("param_count", round(em.param_count / 1e6, 2)),
        ("img_size", em.data_config["input_size"][-1]),
        ("cropt_pct", em.data_config["crop_pct"]),
        ("interpolation", em.data_config["interpolation"]),
    ])


def _json_rows(rows: Sequence[Mapping[str, Any]], warnings: Sequence[Sequence[str]]) -> List[Dict[str, Any]]:
    return [dict(list(r.items()) + [("warnings", list(w))]) for r, w in zip(rows, warnings)]


def json_safe(value: Any) -> Any:
    """``value`` with every NaN / inf float replaced by None (JSON ``null``), recursively.

    Python's ``json`` writes bare ``NaN`` / ``Infinity`` tokens, which are not JSON: strict parsers
    (``jq``, JavaScript, Go, ``json.loads(..., parse_constant=...)`` checks) reject the whole file.
    A metric that was not measured (robust accuracy without ``--attack``) is ``null``.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def results_json(rows: Sequence[Mapping[str, Any]], warnings: Sequence[Sequence[str]], as_list: bool = False) -> str:
    """Strict JSON text (NaN -> ``null``): one dict for a single row (timm), else a list; every row has
    a ``warnings`` list."""
    data: Any = _json_rows(rows, warnings)
    if len(data) == 1 and not as_list:
        data = data[0]
    return json.dumps(json_safe(data), indent=4, allow_nan=False)


def check_results_target(path: str, tool: str = "validate.py",
                         is_ours: Optional[Callable[[str, bool], bool]] = None, flag: str = "--results-file",
                         inputs: Sequence[str] = (), kind: Optional[str] = None,
                         columns: Optional[Sequence[str]] = None, as_list: bool = False) -> None:
    """Refuse, before any work, a results file (``flag``) that would replace something other than an
    earlier results file of the same kind (a training ``summary.csv``, a checkpoint, a folder, a
    JSON or CSV of another tool) or one of the run's ``inputs``; also make sure its folder can be
    written.

    ``is_ours(text, is_json)`` recognizes ``tool``'s own files (default: validate.py's rows);
    ``kind`` names them in the message (default: JSON for ``.json``, else CSV). ``columns`` (and
    ``as_list``: a JSON list rather than one dict) are what this run will write: an earlier
    results file with other columns (a bulk table, an eps or step sweep) is another kind of table
    and is not replaced either."""
    what = f"{flag} {path}"
    storage.check_reachable(path, flag)
    if storage.isdir(path):
        raise UsageError(f"{what} is a folder; give a file name" + ("" if kind else " ending in .csv or .json"))
    storage.check_output_file(path, flag, inputs=inputs)
    if storage.exists(path):
        json_file = str(path).lower().endswith(".json")
        ours = is_ours or (lambda t, j: _is_results_json(t) if j else _is_results_csv(t))
        try:
            text = storage.read_bytes(path)[:1 << 20].decode("utf-8")
        except (OSError, UnicodeDecodeError):
            text = None
        if text is None or not ours(text, json_file):
            kind = kind or ("JSON" if json_file else "CSV")
            raise UsageError(f"{what} exists and is not a {tool} results {kind}; "
                             "it is not replaced: choose another file name")
        if columns is not None:
            theirs = _results_layout(text, json_file)
            ours = _kind_columns(columns), bool(as_list) and json_file
            if theirs is not None and theirs != ours:
                raise UsageError(f"{what} holds another kind of {tool} results table (it has "
                                 f"{_layout_text(theirs)}; this run writes {_layout_text(ours)}): it is not replaced: "
                                 f"choose another file name, or delete it first")


def _kind_columns(columns: Sequence[str]) -> List[str]:
    """What makes a table of another kind: the columns besides the result keys (``model`` and
    ``checkpoint`` of a bulk table, ``attack_eps`` / ``attack_steps`` of a sweep)."""
    return [c for c in columns if c not in RESULT_KEYS and c != "warnings"]


def _results_layout(text: str, json_file: bool) -> Optional[tuple]:
    """``(extra columns, is a JSON list)`` of a validate.py results file's text (None: unreadable)."""
    if not json_file:
        return _kind_columns(next(csv.reader(io.StringIO(text)), [])), False
    try:
        data = json.loads(text)
    except ValueError:
        return None
    rows = data if isinstance(data, list) else [data]
    return _kind_columns(list(rows[0])), isinstance(data, list)


def _layout_text(layout: tuple) -> str:
    extra, is_list = layout
    what = f"columns {', '.join(extra)} besides the result keys" if extra else "no columns besides the result keys"
    return what + (" (a JSON list of rows)" if is_list else "")


def _is_results_csv(text: str) -> bool:
    header = next(csv.reader(io.StringIO(text)), [])
    return {"top1", "robust_top1", "loss"} <= set(header)


def _is_results_json(text: str) -> bool:
    try:
        data = json.loads(text)
    except ValueError:
        return False
    rows = data if isinstance(data, list) else [data]
    return bool(rows) and all(isinstance(r, dict) and "top1" in r and "robust_top1" in r for r in rows)


def write_results(path: str, rows: Sequence[Mapping[str, Any]], warnings: Optional[Sequence[Sequence[str]]] = None,
                  as_list: bool = False) -> None:
    """Write rows atomically to ``path`` (local, gs://, memory://): ``.json`` -> JSON, else CSV.

    The CSV has exactly the rows' keys (the original's schema; warnings are never CSV columns;
    a NaN stays ``nan`` as the original wrote it); the JSON is strict (NaN -> ``null``).
    """
    warnings = warnings if warnings is not None else [[] for _ in rows]
    if str(path).lower().endswith(".json"):
        text = results_json(rows, warnings, as_list=as_list) + "\n"
    else:
        buf = io.StringIO()
        fields = list(rows[0].keys()) if rows else list(RESULT_KEYS)
        writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow(r)
        text = buf.getvalue()
    folder = storage.dirname(path)
    if folder:
        storage.makedirs(folder)
    storage.remove_stale_temp_of(path)  # what a killed earlier write of this file left behind
    storage.atomic_write_text(path, text)
    _logger.info("results written to %s", path)
