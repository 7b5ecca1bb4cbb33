"""What every parser shares: the parser class (errors are one line and exit code 2, every argument
recorded, defaults shown once in ``--help``), boolean flags, the ``--mean/--std`` check and YAML
configs (keys become flag defaults, values pass the flags' own rules: ``values.py``)."""
from __future__ import annotations

import argparse
import difflib
import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

from src.arg_parser.values import Rule, RuleViolation, check_list, convert_value, must
from src.errors import UsageError

__all__ = ["CliParser", "bool_flag", "norm_name", "check_mean_std", "check_parsed_values", "load_yaml_config",
           "ARGS_YAML_HEADER", "RECORD_KEYS"]

_logger = logging.getLogger("robust_vits")

# the first line of every args.yaml train.py writes: such a file's 'config' key records which file that run was
# given (its values are already expanded in the file), so loading it again with -c ignores that key
FOLD_BN_HELP = ("fold eval-mode BatchNorm into the convolution before it (the same function with one pass fewer "
                "per map; checked on a probe batch, skipped with a warning when it does not apply)")
ARGS_YAML_HEADER = "# train.py arguments of this run (train.py -c <this file> repeats them)\n"
# keys train.py appends to args.yaml to record what happened, not to set anything
RECORD_KEYS = {
    "wandb_run": "the W&B run of the training run that wrote this file",
    "resume_history": "the resumes of the training run that wrote this file",
}


class _RecordingGroup:
    """An argument group that records every argument it adds on its parser (``CliParser.arguments``)."""

    def __init__(self, parser: "CliParser", group: Any):
        self.parser, self._group = parser, group

    def add_argument(self, *names: str, **kwargs: Any) -> argparse.Action:
        return self.parser.record(self._group.add_argument(*names, **self.parser.prepare(names, kwargs)))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._group, name)


class CliParser(argparse.ArgumentParser):
    """argparse that raises ``UsageError`` (one line, exit 2) instead of printing usage.

    It records every argument added to it or its groups in ``arguments`` (argparse keeps that list
    private), so checks, configs and tests can enumerate them; ``command_line_only`` maps the dests of
    flags that lower a safety check to why (a config may not set them); ``legacy_keys`` maps config keys
    that no longer do anything to why (dropped with a warning). Help texts get ``(default: X)`` appended
    once, unless they already say what the default is or it is off / unset.
    """

    def __init__(self, *args: Any, overrides: Optional[Mapping[str, Mapping[str, Any]]] = None, **kwargs: Any):
        self.arguments: Optional[List[argparse.Action]] = None  # argparse's own setup is not recorded
        self.overrides = dict(overrides or {})
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.arguments = []
        self.command_line_only: Dict[str, str] = {}
        self.legacy_keys: Dict[str, str] = {}

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UsageError(f"{self.prog}: {message}")

    def record(self, action: argparse.Action) -> argparse.Action:
        if self.arguments is not None:
            self.arguments.append(action)
        return action

    def prepare(self, names: Sequence[str], kwargs: Dict[str, Any]) -> Dict[str, Any]:
        """The keyword arguments of one argument: this parser's ``overrides`` for its dest (a tool built on
        another's flags changes their default or help this way), then the help's default note."""
        longs = [n for n in names if n.startswith("--")]
        dest = kwargs.get("dest") or (longs[0] if longs else names[0]).lstrip("-").replace("-", "_")
        return self.help_with_default({**kwargs, **self.overrides.get(dest, {})})

    @staticmethod
    def help_with_default(kwargs: Dict[str, Any]) -> Dict[str, Any]:
        """``help`` plus ``(default: X)`` when the text does not already speak of the default."""
        text, default = kwargs.get("help"), kwargs.get("default")
        if not text or text is argparse.SUPPRESS or "default" in text or kwargs.get("action") is not None:
            return kwargs
        if default is None or isinstance(default, bool) or default is argparse.SUPPRESS or default in ("", [], ()):
            return kwargs
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return {**kwargs, "help": f"{text} (default: {shown.replace('%', '%%')})"}

    def add_argument(self, *names: str, **kwargs: Any) -> argparse.Action:
        return self.record(super().add_argument(*names, **self.prepare(names, kwargs)))

    def add_argument_group(self, *args: Any, **kwargs: Any) -> Any:
        group = super().add_argument_group(*args, **kwargs)
        return group if self.arguments is None else _RecordingGroup(self, group)

    def dests(self) -> Dict[str, argparse.Action]:
        """Every recorded argument by destination (the key a YAML config uses)."""
        return {a.dest: a for a in self.arguments if a.dest is not argparse.SUPPRESS and a.dest != "help"}

    def check(self, check_fn, args: argparse.Namespace) -> None:
        """The list rules of every flag, then ``check_fn(args)``; errors get this parser's prog prefix,
        like argparse's own, so every message has one format."""
        try:
            check_parsed_values(self, args)
            check_fn(args)
        except UsageError as e:
            text = str(e)
            raise UsageError(text if text.startswith(f"{self.prog}: ") else f"{self.prog}: {text}") from None


def bool_flag(group: Any, *names: str, help: str, default: bool = False, command_line_only: str = "") -> None:
    """A switch that is off unless given. ``command_line_only``: why it lowers a safety check, so a config
    file (which people share) may not set it; it must then be given on the command line."""
    action = group.add_argument(*names, action="store_true", default=default, help=help)
    if command_line_only:
        getattr(group, "parser", group).command_line_only[action.dest] = command_line_only


def norm_name(value: str) -> str:
    """A threat model as the attacks name it: 'Linf' / 'LINF' / 'linf' -> 'linf', 'L2' -> 'l2', so
    ``--attack-norm`` and its alias ``--threat-model`` take RobustBench's spelling too."""
    return str(value).lower()


def check_mean_std(mean: Optional[Sequence[float]], std: Optional[Sequence[float]]) -> None:
    """``--mean``/``--std``: 1 or 3 values, std > 0 (shared by every CLI)."""
    for name, v in (("mean", mean), ("std", std)):
        if v is not None and len(v) not in (1, 3):
            raise must(f"--{name}", "1 or 3 values (one per RGB channel)", list(v))
    if std is not None and any(not s > 0 for s in std):
        raise must("--std", "values > 0", list(std))


def available_memory_bytes() -> Optional[int]:
    """MemAvailable of /proc/meminfo (Linux); None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_input_size(args: argparse.Namespace) -> None:
    """``--img-size`` agrees with ``--input-size``; one float32 batch of that size fits in the memory this
    machine has available (an image side of 100000 px would otherwise be an out-of-memory kill, exit 137,
    after the model was built)."""
    if args.img_size is not None and args.input_size is not None and \
            tuple(args.input_size[1:]) != (args.img_size, args.img_size):
        raise must("--img-size", f"equal to H and W of --input-size {' '.join(map(str, args.input_size))} "
                   "(or give only one of them)", args.img_size)
    size = tuple(args.input_size) if args.input_size is not None else \
        (3, args.img_size, args.img_size) if args.img_size is not None else None
    batch = getattr(args, "batch_size", None)
    if size is None or not batch:
        return
    flag = "--input-size" if args.input_size is not None else "--img-size"
    check_batch_fits(f"{flag} {' '.join(map(str, size if args.input_size is not None else size[1:2]))}", size,
                     int(batch))


def check_batch_fits(what: str, size: Sequence[int], batch: int, bytes_per_value: int = 4,
                     advice: str = "use a smaller size or -b") -> None:
    """One batch of ``batch`` arrays of shape ``size`` fits in the memory this machine has available, or a
    :class:`UsageError` naming ``what`` (the flag and value that set the size): refused before a model is
    built, instead of an allocator traceback or an out-of-memory kill (exit 137) later."""
    available = available_memory_bytes()
    if available is None:
        return
    need = int(batch) * bytes_per_value
    for side in size:
        need *= int(side)
    if need > available:
        kind = {4: "float32", 1: "8-bit pixels"}.get(bytes_per_value, f"{bytes_per_value} bytes per value")
        one = "one such image" if batch == 1 else f"one batch of {batch} such images"
        raise UsageError(f"{what}: {one} takes {need / 2 ** 30:.1f} GiB as {kind}, more "
                         f"than the {available / 2 ** 30:.1f} GiB of memory available here; {advice}")


def flag_name(action: argparse.Action) -> str:
    """How argparse names an argument in its messages: ``-b/--batch-size``, or the metavar of a positional."""
    return "/".join(action.option_strings) or str(action.metavar or action.dest)


def check_parsed_values(parser: CliParser, args: argparse.Namespace) -> None:
    """The list-level rules (value counts, low < high) of every ``nargs`` flag, after parsing."""
    for dest, action in parser.dests().items():
        value = getattr(args, dest, None)
        if isinstance(action.type, Rule) and isinstance(value, (list, tuple)):
            problem = check_list(action.type, value)
            if problem:
                raise must(f"argument {flag_name(action)}", problem, list(value))


# ----------------------------------------------------------------------------------------------
# YAML configs


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            norm = str(key).replace("-", "_")
            if norm in seen:
                raise UsageError(f"key '{key}' appears twice (line {key_node.start_mark.line + 1}); keep one")
            seen.add(norm)
        return super().construct_mapping(node, deep)


def _read_config(path: str) -> Tuple[str, Any]:
    from src import storage

    if not storage.exists(path):
        raise UsageError(f"config file {path} does not exist")
    if storage.isdir(path):
        raise UsageError(f"config file {path} is a directory; -c takes a YAML file")
    try:
        text = storage.read_bytes(path).decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"config file {path} is not UTF-8 text (byte {e.start}); -c takes a YAML file") from None
    except OSError as e:
        raise UsageError(f"config file {path} cannot be read: {e.strerror or e}") from None
    try:
        return text, yaml.load(text, Loader=_UniqueKeyLoader)
    except UsageError as e:
        raise UsageError(f"config file {path}: {e}") from None
    except RecursionError:  # PyYAML's composer recurses once per nesting level
        raise UsageError(f"config file {path} nests lists or mappings too deeply to be a config of flag values; "
                         "-c takes a YAML mapping of flag names to values") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise UsageError(f"config file {path} is not valid YAML{where}: "
                         f"{getattr(e, 'problem', None) or e}") from None


def _unknown_key(path: str, key: Any, dests: Sequence[str]) -> UsageError:
    norm = str(key).replace("-", "_")
    close = difflib.get_close_matches(norm, sorted(dests), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}' (--{close[0].replace('_', '-')})?" if close else ""
    return UsageError(f"config file {path}: unknown key '{key}'{hint}")


def _convert(path: str, key: Any, action: argparse.Action, value: Any, parser: CliParser) -> Any:
    try:
        converted = convert_value(action, value)
    except RuleViolation as e:
        raise UsageError(f"config file {path}, key '{key}': {e}") from None
    why = parser.command_line_only.get(action.dest)
    if why and converted != action.default:
        raise UsageError(f"config file {path}, key '{key}': {why}, so a config file may not set it; give "
                         f"{action.option_strings[-1]} on the command line")
    return converted


def load_yaml_config(path: str, parser: CliParser) -> Dict[str, Any]:
    """Read a YAML config whose keys become ``parser``'s defaults (:func:`_load_config`); errors carry the
    parser's prog prefix like every other message of the command line."""
    try:
        return _load_config(path, parser)
    except UsageError as e:
        raise UsageError(f"{parser.prog}: {e}") from None


def _load_config(path: str, parser: CliParser) -> Dict[str, Any]:
    """Read a YAML config: every key must be a flag of ``parser`` (or a legacy / record key, dropped
    with one log line naming it), every value passes the flag's own rule.

    Refused with one line naming the key: unknown keys, keys given twice, values of the wrong type or
    range, a nested ``config`` key (configs do not include configs; train.py's own args.yaml records
    its config file there and is recognized by its header), and flags that lower a safety check
    (``parser.command_line_only``) set to anything but their default.
    """
    text, cfg = _read_config(path)
    if cfg is None:
        return {}
    if not isinstance(cfg, Mapping):
        raise UsageError(f"config file {path} must be a mapping of flag names to values")
    actions = parser.dests()
    out: Dict[str, Any] = {}
    records: List[str] = []
    legacy: List[str] = []
    for key, value in cfg.items():
        norm = str(key).replace("-", "_")
        if norm == "config":
            if not text.startswith(ARGS_YAML_HEADER):
                raise UsageError(f"config file {path}, key '{key}': a config cannot include another config; merge "
                                 "the two files or pass the other one with -c (an args.yaml of an older train.py: "
                                 "delete its 'config:' line)")
            records.append(str(key))
        elif norm in RECORD_KEYS:
            records.append(str(key))
        elif norm in parser.legacy_keys and norm not in actions:
            legacy.append(norm)
        elif norm not in actions:
            raise _unknown_key(path, key, list(actions))
        else:
            out[norm] = _convert(path, key, actions[norm], value, parser)
    if records:
        _logger.info("config %s: %s only record%s what a past run did; ignored", path, ", ".join(records),
                     "s" if len(records) == 1 else "")
    if legacy:
        _logger.warning("config %s: %s", path, "; ".join(f"{k} no longer does anything ({parser.legacy_keys[k]})"
                                                          for k in legacy) + "; ignored")
    return out
