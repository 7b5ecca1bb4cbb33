"""Every flag of every CLI is read by the code that runs, or refused: none is accepted and silently ignored.

(benchmark.py's ``--fold-bn`` was: parsed, documented in --help, and never looked at.) A flag counts as used
when its ``dest`` is read outside ``src/arg_parser/`` (``args.<dest>`` or ``"<dest>"``), or when timm's
``scheduler_kwargs`` reads it (train.py hands the schedule flags to timm), or when it is one of the few
flags kept for the original's command lines whose parser refuses or documents them (listed below).
The search is over all of the project's code, so a dest two CLIs share (``fold_bn``) counts as used by both
when one reads it; each CLI's own tests check what its flags do.
"""
from __future__ import annotations

import argparse
import glob
import os
import re

import pytest

from tests.conftest import ROOT

# accepted for the original's command lines; the parser refuses them or documents that they change nothing
REFUSED_OR_DOCUMENTED = {"tta", "tf_preprocessing", "keep_patch_embedding"}


def _parsers():
    from src.arg_parser import analysis, evaluate, export
    from src.arg_parser.train import build_parser
    from src.plots import KINDS

    return {"train.py": build_parser(), "validate.py": evaluate.build_validate_parser(),
            "attack_effectiveness.py": evaluate.build_effectiveness_parser(),
            "validate_robustbench.py": evaluate.build_robustbench_parser(),
            "attack_convergence.py": analysis.build_convergence_parser(),
            "benchmark.py": analysis.build_benchmark_parser(), "src.plots": analysis.build_plots_parser(KINDS),
            "export": export.build_export_parser()}


def _code_outside_the_parsers() -> str:
    files = [f for f in glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True)
             if not any(part in f for part in ("/.venv", "/tests/", "/arg_parser/", "/benchmarks/", "/.tfds-cli/"))]
    return "\n".join(open(f, encoding="utf-8").read() for f in files)


def _read_by_timm_scheduler_kwargs(parser) -> set:
    from timm.scheduler import scheduler_kwargs

    class Recorder(argparse.Namespace):
        def __getattribute__(self, name):
            if not name.startswith("_"):
                seen.add(name)
            return super().__getattribute__(name)

    seen: set = set()
    scheduler_kwargs(Recorder(**vars(parser.parse_args([]))))
    return seen


def test_every_flag_is_used_or_refused():
    code = _code_outside_the_parsers()
    parsers = _parsers()
    timm_reads = _read_by_timm_scheduler_kwargs(parsers["train.py"])
    unused = []
    for cli, parser in parsers.items():
        for action in parser._actions:
            dest = action.dest
            if dest == "help" or dest in REFUSED_OR_DOCUMENTED or (cli == "train.py" and dest in timm_reads):
                continue
            if not re.search(r"(\.%s\b|[\"']%s[\"'])" % (re.escape(dest), re.escape(dest)), code):
                unused.append(f"{cli} {'/'.join(action.option_strings) or dest}")
    assert not unused, f"flags parsed but never read: {unused}"


@pytest.mark.parametrize("dest", sorted(REFUSED_OR_DOCUMENTED))
def test_the_kept_flags_are_refused_or_documented(dest):
    text = "".join(open(os.path.join(ROOT, "src", "arg_parser", f)).read() for f in ("train.py", "evaluate.py"))
    assert re.search(r"args\.%s\b" % dest, text), f"{dest} is neither refused nor checked by its parser"
