#!/usr/bin/env python3
"""The headline ratios of the committed benchmark results, as the README's Speed table.

Reads the JSON files in ``benchmarks/results/`` (written by the benchmark scripts, see RESULTS.md)
and prints one row per headline figure, each naming its file and the clock it was taken with. With
``--write-readme`` it replaces the table between the README's ``<!-- readme-numbers:speed -->``
markers, so the README quotes exactly what the scripts measured.

    python benchmarks/summarize.py                  # print the table
    python benchmarks/summarize.py --write-readme   # and write it into README.md
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
FAST = "ours efficient, --amp --amp-dtype bfloat16 --channels-last"
CL = "ours efficient, --channels-last"

# The files the headline rows come from (the commands that make them are in RESULTS.md).
TRAIN_FAITHFUL = "train_overhead-resnet18-pgd2-train.json"
TRAIN_EFFICIENT = "train_overhead-resnet18-pgd2-skip.json"
EVAL = "eval_overhead-resnet18-test_vit.json"
PEER = "peer_torchattacks-resnet18.json"
STEP_COST = ("adv_step_cost-resnet18.json", "adv_step_cost-xcit_nano_12_p4_32.json")
COMPILE = "compile_check-resnet18-xcit_nano_12_p4_32.json"
FOLD_BN = ("eval_overhead-fold_bn-resnet18.json", "eval_overhead-fold_bn-resnet50.json")


class ResultsError(Exception):
    """A results folder or file the table cannot be made from (one line, exit 2)."""


def _load(name: str, results: Path) -> Optional[dict]:
    path = results / name
    if not path.is_file():
        return None
    try:
        payload = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ResultsError(f"{path} is not a readable JSON benchmark result ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or not payload:  # {} was taken as "no file": its row silently left out
        raise ResultsError(f"{path} is not a benchmark result (its JSON is not an object with results)")
    return payload


def _clock(payload: dict) -> str:
    opts = payload.get("options") or payload.get("args") or {}
    clock = opts.get("clock")
    if clock is None:  # train_overhead reports both clocks: the steadier one for its thread count
        clock = "cpu" if opts.get("threads", 1) == 1 else "wall"
    return f"{opts.get('threads', '?')} thread{'s' if opts.get('threads') != 1 else ''}, {clock} time"


def _train_row(payload: dict) -> float:
    clock = "cpu" if (payload["options"].get("threads", 1) == 1) else "wall"
    return next(r["ratio"] for r in payload["rows"] if r["part"] == "training epoch" and r["clock"] == clock)


def rows(results: Path = RESULTS) -> List[List[str]]:
    out: List[List[str]] = []
    faithful, efficient = _load(TRAIN_FAITHFUL, results), _load(TRAIN_EFFICIENT, results)
    if faithful and efficient:
        out.append(["`train.py` PGD-2 epoch vs a plain PyTorch loop doing the same work (faithful / efficient "
                    "`--adv-clean-logits skip`)", f"{_train_row(faithful):.3f}x / {_train_row(efficient):.3f}x",
                    _clock(efficient)])
    ev = _load(EVAL, results)
    if ev:
        for r in ev["results"]:
            values = [v for vs in r["robust_top1"].values() for v in vs]
            # validate.py's report rounds to 4 decimals; one example is 100 / images points
            same = "same robust accuracy" if max(values) - min(values) < 0.01 else "robust accuracy " + " vs ".join(
                f"{vs[0]:.2f} %" for vs in r["robust_top1"].values())
            what = ("`validate.py` PGD-10 evaluation vs a plain loop" if r["reference"] == "plain loop"
                    else f"AutoAttack through `validate.py` vs a direct pyautoattack call ({r['images']} images)")
            out.append([f"{what} ({same})", f"{r['ratio']:.3f}x", _clock(ev)])
    folds = []
    for name in FOLD_BN:
        fb = _load(name, results)
        r = next((r for r in fb["results"] if "speedup_over_unfolded" in r), None) if fb else None
        if r is not None:
            model = fb["options"]["pgd_model"]
            same = len({round(v, 4) for v in r["robust_top1"][r["cli"]] + r["robust_top1_unfolded"]}) == 1
            folds.append((model, r["speedup_over_unfolded"], same, _clock(fb)))
    if folds:
        same = "same robust accuracy" if all(f[2] for f in folds) else "robust accuracy differs, see RESULTS.md"
        out.append([f"speed-up of `validate.py --fold-bn` PGD-10 over `validate.py` ({same}): "
                    + " / ".join(f[0] for f in folds), " / ".join(f"{f[1]:.2f}x" for f in folds), folds[0][3]])
    peer = _load(PEER, results)
    if peer:
        ks = [r["k"] for r in peer["results"]]
        speed = {}
        for r in peer["results"]:
            for row in r["rows"]:
                speed.setdefault(row["variant"], []).append(row["peer_over_this"])
        label = " / ".join(f"PGD-{k}" for k in ks)
        out.append([f"speed-up of our {label} step (efficient, float32) over the same step on torchattacks' PGD",
                    " / ".join(f"{v:.2f}x" for v in speed["ours efficient"]), _clock(peer)])
        for variant, flags in ((CL, "`--channels-last` (float32)"),
                               (FAST, "`--amp --amp-dtype bfloat16 --channels-last`")):
            if variant in speed:
                out.append([f"speed-up of our {label} step with {flags} over the torchattacks step (float32; "
                            "same attack strength, see RESULTS.md)", " / ".join(f"{v:.2f}x" for v in speed[variant]),
                            _clock(peer)])
    floors = []
    for name in STEP_COST:
        sc = _load(name, results)
        if sc:
            res = sc["results"][0]
            eff = [r for r in res["rows"] if r.get("mode") == "skip"]
            floors.append((res["model"], eff, _clock(sc)))
    if floors:
        ks = " / ".join(str(r["k"]) for r in floors[0][1])
        out.append([f"PGD-{ks} step (efficient) vs its analytic floor: " + "; ".join(m for m, _, _ in floors),
                    "; ".join(" / ".join(f"{r['x_analytic_floor']:.2f}x" for r in eff) for _, eff, _ in floors),
                    floors[0][2]])
    comp = _load(COMPILE, results)
    if comp:
        parts = []
        for r in comp["results"]:
            parts.append(f"{r['model']} " + " / ".join(f"{row['speedup']:.2f}x" for row in r["rows"]))
        out.append(["`torch.compile` vs eager, clean / PGD-2 step (train.py has no `--torchcompile` flag: not faster here; "
                    "`benchmark.py --torch-compile` times it)",
                    "; ".join(parts), _clock(comp)])
    return out


HEADLINE_FILES = (TRAIN_FAITHFUL, TRAIN_EFFICIENT, EVAL, PEER) + STEP_COST + (COMPILE,) + FOLD_BN


def table(results: Path = RESULTS) -> str:
    """The Markdown table; ``ResultsError`` when the folder holds none of the headline files or one of
    them lacks what its row needs (a file of another benchmark or version under a headline name)."""
    if not results.is_dir():
        raise ResultsError(f"--results {results} is not a folder")
    try:
        body = rows(results)
    except (KeyError, TypeError, IndexError, StopIteration, AttributeError) as e:
        raise ResultsError(f"a results file in {results} lacks a field the table needs ({type(e).__name__}: {e}); "
                           "re-run the benchmark that writes it (RESULTS.md)") from None
    if not body:
        raise ResultsError(f"--results {results} holds none of the benchmark results the table is made from "
                           f"({', '.join(HEADLINE_FILES)})")
    lines = ["| what | ratio | measured with |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in body]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(RESULTS), help="folder of the benchmark JSON files")
    p.add_argument("--write-readme", action="store_true", help="write the table into README.md")
    p.add_argument("--readme", default=str(ROOT / "README.md"))
    ns = p.parse_args(argv)
    try:
        text = table(Path(ns.results))
    except ResultsError as e:
        print(f"error: summarize.py: {e}", file=sys.stderr)
        return 2
    missing = [n for n in HEADLINE_FILES if not (Path(ns.results) / n).is_file()]
    if missing:
        print(f"warning: summarize.py: no {', '.join(missing)} in {ns.results}: their rows are left out",
              file=sys.stderr)
    print(text)
    if ns.write_readme:
        sys.path.insert(0, str(ROOT))
        from util_scripts.readme_numbers import replace_block

        readme = Path(ns.readme)
        try:
            new = replace_block(readme.read_text(), "speed", text)
        except (OSError, ValueError) as e:
            print(f"error: summarize.py: {e}", file=sys.stderr)
            return 2
        from src.storage import atomic_write_text  # a kill mid-write never leaves half a README

        atomic_write_text(str(readme), new)
        print(f"written into {readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
