"""What a flag's value may be, said once: typed rules used as argparse ``type=`` AND applied to YAML values.

Every numeric or enumerated flag of every CLI gets one of these rules, so the command line and a
config file are checked by the same code and fail with the same message::

    error: train.py: argument --epochs: must be an integer >= 1, got '0'
    error: train.py: config file cfg.yaml, key 'epochs': must be an integer >= 1, got 1.5

that is ``<prog>: <where>: must be <requirement>, got <value>``, where ``<where>`` is ``argument
--flag`` (command line, or a check across flags after parsing) or ``config file FILE, key 'k'`` (YAML),
``<requirement>`` is the rule's own phrase and ``<value>`` is what was given (command-line text
quoted, YAML values as YAML writes them: ``true``, ``null``, ``[0.1, 0.2]``).

A rule checks one value; ``counts`` / ``order`` check a whole ``nargs`` list after parsing
(:func:`check_list`), because argparse converts list items one at a time.
"""
from __future__ import annotations

import argparse
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Tuple

from src.errors import UsageError

__all__ = ["RuleViolation", "Rule", "Num", "Text", "Choice", "ExpandedPath", "show", "must", "positive_int", "nonneg_int",
           "int_at_least", "finite_float", "nonneg_float", "positive_float", "fraction", "rate", "check_list",
           "convert_value", "INTERPOLATIONS", "INTERPOLATION", "CROP_PCT", "MEAN", "STD", "SEED", "OUTPUT_PATH", "INPUT_PATH",
           "REQUIRED_OUTPUT_PATH", "REQUIRED_INPUT_PATH"]


FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max: model, optimizer and attack arithmetic
INT64_MAX = 2 ** 63 - 1  # torch.iinfo(torch.int64).max


class RuleViolation(ValueError):
    """A value broke its rule; ``str()`` is ``must be <requirement>, got <value>``."""

    def __init__(self, requirement: str, value: Any):
        super().__init__(f"must be {requirement}, got {show(value)}")
        self.requirement, self.value = requirement, value


def show(value: Any) -> str:
    """A value as the user wrote it: command-line text quoted, YAML scalars in YAML spelling."""
    if isinstance(value, str):
        return repr(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "a mapping"
    return str(value)


def must(where: str, requirement: str, value: Any) -> UsageError:
    """The one message format for checks made after parsing: ``raise must('--scale', 'low <= high', v)``."""
    if where.startswith("-"):
        where = f"argument {where}"
    return UsageError(f"{where}: {RuleViolation(requirement, value)}")


@dataclass(frozen=True)
class Rule:
    """Base of the rules: callable as argparse ``type=`` (command-line text), ``parse`` takes YAML values too.

    ``counts``: allowed list lengths of an ``nargs`` flag (None: any); ``order``: '<' or '<=' between the
    items of a list (boundaries low < high, ranges low <= high); ``nullable``: YAML ``null`` is allowed
    even where the default is not None (``lr: null`` = scale the LR, ``color_jitter: null`` = off).
    """

    counts: Optional[Tuple[int, ...]] = field(default=None, kw_only=True)
    order: str = field(default="", kw_only=True)
    nullable: bool = field(default=False, kw_only=True)

    @property
    def requirement(self) -> str:
        raise NotImplementedError

    def parse(self, value: Any) -> Any:
        raise NotImplementedError

    def bad_examples(self) -> Tuple[str, ...]:
        """Command-line texts this rule refuses (one of the wrong type, one out of range): used by the tests."""
        raise NotImplementedError

    def __call__(self, text: str) -> Any:
        try:
            return self.parse(text)
        except RuleViolation as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    @property
    def __name__(self) -> str:  # argparse names the type in some messages
        return self.requirement


@dataclass(frozen=True)
class Num(Rule):
    """An integer or a finite float inside [lo, hi] (either end open or absent)."""

    kind: type = float
    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False

    @property
    def requirement(self) -> str:
        noun = "an integer" if self.kind is int else "a finite number"
        if self.lo is not None and self.hi is not None:
            return f"{noun} in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{noun} {'>' if self.lo_open else '>='} {self.lo}"
        if self.hi is not None:
            return f"{noun} {'<' if self.hi_open else '<='} {self.hi}"
        return noun

    def parse(self, value: Any) -> Any:
        if isinstance(value, str):
            try:
                number = self.kind(value.strip())
            except ValueError:
                raise RuleViolation(self.requirement, value) from None
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (self.kind is int and not isinstance(value, int)):
            raise RuleViolation(self.requirement, value)
        else:
            number = self.kind(value)
        if not math.isfinite(number) or self._outside(number):
            raise RuleViolation(self.requirement, value)
        if self.kind is int and abs(number) > INT64_MAX:
            # Python ints are unbounded; torch (seeds, sizes, counters) overflows past int64
            raise RuleViolation(f"{self.requirement} of at most {INT64_MAX} in magnitude (int64)", value)
        if self.kind is float and abs(number) > FLOAT32_MAX:
            # finite for Python, inf (or an overflow error) once it reaches a float32 tensor or optimizer step
            raise RuleViolation(f"{self.requirement} of at most {FLOAT32_MAX:.4g} in magnitude (float32)", value)
        return number

    def _outside(self, x: float) -> bool:
        lo, hi = self.lo, self.hi
        return ((lo is not None and (x < lo or (self.lo_open and x == lo)))
                or (hi is not None and (x > hi or (self.hi_open and x == hi))))

    def bad_examples(self) -> Tuple[str, ...]:
        wrong = "1.5" if self.kind is int else "abc"
        if self.lo is not None:
            out = self.lo if self.lo_open else self.lo - 1
        elif self.hi is not None:
            out = self.hi if self.hi_open else self.hi + 1
        else:
            out = float("nan") if self.kind is float else None
        return (wrong,) if out is None else (wrong, str(self.kind(out)) if self.kind is int else str(out))


@dataclass(frozen=True)
class Text(Rule):
    """Free text; ``check`` (optional) raises ValueError/AssertionError/KeyError for values it refuses."""

    check: Optional[Callable[[str], Any]] = None
    what: str = "a text value"
    bad: str = ""

    @property
    def requirement(self) -> str:
        return self.what

    def parse(self, value: Any) -> Any:
        if not isinstance(value, str):
            raise RuleViolation(self.requirement, value)
        if self.check is not None:
            try:
                self.check(value)
            except (ValueError, AssertionError, KeyError, IndexError, TypeError):
                raise RuleViolation(self.requirement, value) from None
        return value

    def bad_examples(self) -> Tuple[str, ...]:
        return (self.bad,) if self.bad else ()


_ENV_VAR = re.compile(r"\$(?:\{([^}]*)\}|(\w+))")


@dataclass(frozen=True)
class ExpandedPath(Rule):
    """A path a CLI reads or writes: ``~`` and ``$VAR`` / ``${VAR}`` are expanded as a shell would, also
    in a config file (``output: ~/runs`` used to create a folder literally named ``~`` in the working
    directory; the original's ``data_dir: ~/torch_data`` was not found); a variable that is not set is
    refused rather than taken as part of a name.

    ``empty_ok=False``: the flag must name a file or folder. An empty value (``--out "$DIR"`` with DIR
    unset) would otherwise mean the working directory, where outputs then land unasked, or "no file"
    for an input that is required."""

    empty_ok: bool = True

    @property
    def requirement(self) -> str:
        return ("a path" if self.empty_ok else "a non-empty path") + " whose $VARIABLES are set in the environment"

    def parse(self, value: Any) -> Any:
        if not isinstance(value, str) or (not self.empty_ok and not value.strip()):
            raise RuleViolation(self.requirement, value)
        names = [a or b for a, b in _ENV_VAR.findall(value)]
        if any(not n or n not in os.environ for n in names):
            raise RuleViolation(self.requirement, value)
        value = os.path.expandvars(value)
        return os.path.expanduser(value) if value.startswith("~") else value

    def bad_examples(self) -> Tuple[str, ...]:
        return ("$ROBUST_VITS_UNSET_VARIABLE/out",) + (() if self.empty_ok else ("",))


@dataclass(frozen=True)
class Choice(Rule):
    """One of a fixed set of names (``normalize`` maps spellings first, e.g. 'Linf' -> 'linf')."""

    names: Tuple[str, ...] = ()
    normalize: Optional[Callable[[str], str]] = None

    @property
    def requirement(self) -> str:
        return "one of " + ", ".join(repr(n) if n == "" else n for n in self.names)

    def parse(self, value: Any) -> Any:
        if not isinstance(value, str):
            raise RuleViolation(self.requirement, value)
        name = self.normalize(value) if self.normalize else value
        if name not in self.names:
            raise RuleViolation(self.requirement, value)
        return name

    def bad_examples(self) -> Tuple[str, ...]:
        return ("no-such-choice",)


def positive_int(**kw) -> Num:
    return Num(kind=int, lo=1, **kw)


def nonneg_int(**kw) -> Num:
    return Num(kind=int, lo=0, **kw)


def int_at_least(n: int, **kw) -> Num:
    return Num(kind=int, lo=n, **kw)


def finite_float(lo: Optional[float] = None, hi: Optional[float] = None, *, lo_open: bool = False,
                 hi_open: bool = False, **kw) -> Num:
    return Num(kind=float, lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open, **kw)


def nonneg_float(**kw) -> Num:
    return finite_float(0, **kw)


def positive_float(**kw) -> Num:
    return finite_float(0, lo_open=True, **kw)


def fraction(**kw) -> Num:
    """A probability or a fraction: [0, 1]."""
    return finite_float(0, 1, **kw)


def rate(**kw) -> Num:
    """A drop / smoothing rate: [0, 1) (1 would drop or smooth everything)."""
    return finite_float(0, 1, hi_open=True, **kw)


def _count_phrase(counts: Sequence[int]) -> str:
    return " or ".join(str(c) for c in counts) + (" value" if counts == (1,) else " values")


def check_list(rule: Rule, values: Sequence[Any]) -> Optional[str]:
    """The list-level requirement a parsed ``nargs`` value breaks (None when it is fine)."""
    if rule.counts is not None and len(values) not in rule.counts:
        return _count_phrase(rule.counts)
    if rule.order:
        pairs = list(zip(values[:-1], values[1:]))
        if any((rule.order == "<" and not a < b) or (rule.order == "<=" and not a <= b) for a, b in pairs):
            if len(values) == 2:
                return f"two values low {rule.order} high"
            return "values in increasing order" + (" without repeats" if rule.order == "<" else "")
    return None


def convert_value(action: argparse.Action, value: Any) -> Any:
    """A YAML value for ``action``, checked and converted exactly like its command-line text would be.

    Raises :class:`RuleViolation`. Booleans must be YAML booleans; ``null`` is allowed where the
    flag's default is None or the rule says so; ``nargs`` flags take a YAML list of the right length.
    """
    rule = action.type if isinstance(action.type, Rule) else None
    if action.nargs == 0:  # store_true / store_false / store_const
        if not isinstance(value, bool):
            raise RuleViolation("true or false", value)
        return value
    if value is None:
        if action.default is None or (rule is not None and rule.nullable):
            return None
        raise RuleViolation(rule.requirement if rule else "a text value", value)
    convert = rule.parse if rule is not None else Text().parse
    if action.nargs in (None, "?"):
        if isinstance(value, (list, tuple, dict)):
            raise RuleViolation("a single value" + (f" ({rule.requirement})" if rule else ""), value)
        return convert(value)
    counts = (action.nargs,) if isinstance(action.nargs, int) else rule.counts if rule and rule.counts else None
    if not isinstance(value, (list, tuple)) or (action.nargs == "+" and not value) or \
            (isinstance(action.nargs, int) and len(value) != action.nargs):
        n = _count_phrase(counts) if counts else "values"
        raise RuleViolation(f"a list of {n}" + (f", each {rule.requirement}" if rule else ""), value)
    items = [convert(v) for v in value]
    problem = check_list(rule, items) if rule is not None else None
    if problem:
        raise RuleViolation(problem, value)
    return items


# rules several CLIs share
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")  # timm's str_to_interp_mode names
INTERPOLATION = Choice(names=("",) + INTERPOLATIONS)
CROP_PCT = finite_float(0, 1, lo_open=True)
MEAN = finite_float(counts=(1, 3))
STD = positive_float(counts=(1, 3))
# a random seed: NumPy's range, so seed + rank / + example index / + epoch terms still fit torch's and TF's seeds
SEED = nonneg_int(hi=2 ** 32 - 1)
# data loader processes per process: each holds its own copy of the dataset object and prefetches batches, so a
# typo like --workers 4000 would fork thousands of processes and exhaust memory before any error
MAX_WORKERS = 128
WORKERS = nonneg_int(hi=MAX_WORKERS)
OUTPUT_PATH = ExpandedPath()  # where a CLI writes
INPUT_PATH = ExpandedPath()  # what a CLI reads (data dirs, checkpoints, label and class files)
# the same for flags that must name something ('' is refused): a required output folder or input file
REQUIRED_OUTPUT_PATH = ExpandedPath(empty_ok=False)
REQUIRED_INPUT_PATH = ExpandedPath(empty_ok=False)
