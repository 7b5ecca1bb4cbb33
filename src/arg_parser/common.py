"""What every parser shares: the parser class (errors are one line and exit code 2), boolean
flags, value types, the ``--mean/--std`` check and YAML configs (keys become flag defaults)."""
from __future__ import annotations

import argparse
import difflib
from typing import Any, Dict, Optional, Sequence

import yaml

from src.errors import UsageError

__all__ = ["CliParser", "bool_flag", "norm_name", "check_mean_std", "load_yaml_config"]


class CliParser(argparse.ArgumentParser):
    """argparse that raises ``UsageError`` (one line, exit 2) instead of printing usage."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UsageError(f"{self.prog}: {message}")


def bool_flag(group, *names: str, help: str, default: bool = False) -> None:
    group.add_argument(*names, action="store_true", default=default, help=help)


def norm_name(value: str) -> str:
    """A threat model as the attacks name it: 'Linf' / 'LINF' / 'linf' -> 'linf', 'L2' -> 'l2', so
    ``--attack-norm`` and its alias ``--threat-model`` take RobustBench's spelling too."""
    return str(value).lower()


def check_mean_std(mean: Optional[Sequence[float]], std: Optional[Sequence[float]]) -> None:
    """``--mean``/``--std``: 1 or 3 values, std > 0 (shared by every CLI)."""
    for name, v in (("mean", mean), ("std", std)):
        if v is not None and len(v) not in (1, 3):
            raise UsageError(f"--{name} needs 1 or 3 values (one per RGB channel), got {len(v)}")
    if std is not None and any(s <= 0 for s in std):
        raise UsageError(f"--std values must be > 0, got {list(std)}")


def load_yaml_config(path: str, parser: argparse.ArgumentParser) -> Dict[str, Any]:
    """Read a YAML config and check every key against ``parser``'s flags."""
    from src import storage

    if not storage.exists(path):
        raise UsageError(f"config file {path} does not exist")
    try:
        cfg = yaml.safe_load(storage.read_text(path))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise UsageError(f"config file {path} is not valid YAML{where}: "
                         f"{getattr(e, 'problem', None) or e}") from None
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise UsageError(f"config file {path} must be a mapping of flag names to values")
    dests = set(vars(parser.parse_known_args([])[0]))  # every flag's destination, with its default
    for key in cfg:
        norm = str(key).replace("-", "_")
        if norm not in dests:
            close = difflib.get_close_matches(norm, sorted(dests), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}' (--{close[0].replace('_', '-')})?" if close else ""
            raise UsageError(f"config file {path}: unknown key '{key}'{hint}")
    return {str(k).replace("-", "_"): v for k, v in cfg.items()}
