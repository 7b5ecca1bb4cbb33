"""What evaluating a checkpoint needs, written into every checkpoint and read by every evaluation CLI.

A network is only meaningful with the preprocessing it was trained behind: the input size and
center crop, the interpolation, whether its inputs were normalized (inside the model, by the
loader, or not at all) and with which mean/std, and for XCiT models the patch size the stem was
adapted to. The original kept none of this next to the weights, so ``validate.py`` guessed from
the model's defaults (a raw-pixel digits model scored 12 % instead of 89 %). Here:

* training checkpoints carry an ``eval_config`` dict (:func:`training_record`, written by
  ``CheckpointManager``), released ``.pth.tar`` files keep the bare state-dict format and carry the
  same dict in the state dict's ``_metadata`` (which ``torch.save`` keeps and ``load_state_dict``
  ignores), ``.safetensors`` files carry it as JSON in their metadata;
* :func:`read_record` finds it, or reconstructs what it can from the training arguments of an
  original-format checkpoint (``hparams``), or from the original's data config of a plain timm
  model (``src.original_cfgs``) for a bare released state dict;
* :func:`resolve_settings` merges it with the command line: a flag the user gave wins, with one
  warning line naming both values when it contradicts the record; a flag left at its default never
  overrides the record.

The per-epoch evaluation of a training run reseeds with :data:`EVAL_SEED` (+ rank) before it
starts, which is validate.py's default ``--seed``: ``validate.py --checkpoint RUN/best.pth.tar``
with the run's attack reproduces the run's clean and robust accuracy exactly (same examples, same
batches, same random starts).
"""
from __future__ import annotations

import argparse
import json
import logging
import numbers
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

from torch import nn

_logger = logging.getLogger("robust_vits")

__all__ = ["RECORD_KEY", "STATE_DICT_META_KEY", "EVAL_SEED", "DEFAULT_MODEL", "EvalRecord", "EvalSettings",
           "training_record", "read_record", "record_from_hparams", "attach_to_state_dict", "explicit_dests",
           "flag_given", "parse_recording_explicit", "resolve_settings", "describe", "complete_record"]

RECORD_KEY = "eval_config"                         # training checkpoints; safetensors metadata
STATE_DICT_META_KEY = "robust_vits_eval_config"    # in a bare state dict's ``_metadata['']``
EVAL_SEED = 0                                      # validate.py's default --seed
DEFAULT_MODEL = "resnet50"                         # validate.py's --model default (the original's)
_MODES = ("model", "raw", "loader")


@dataclass
class EvalRecord:
    """What a checkpoint says about evaluating it (None: not recorded).

    ``normalization``: ``model`` (a normalization layer with ``mean``/``std`` inside the model, inputs
    in [0, 1]), ``raw`` (the network sees [0, 1] pixels) or ``loader`` (the loader normalized with
    ``mean``/``std``: the original's mode for runs with ``no_normalize: false``).
    """
    model: Optional[str] = None
    num_classes: Optional[int] = None
    patch_size: Optional[int] = None
    input_size: Optional[Tuple[int, int, int]] = None
    crop_pct: Optional[float] = None
    interpolation: Optional[str] = None
    crop_mode: Optional[str] = None
    normalization: Optional[str] = None
    mean: Optional[Tuple[float, ...]] = None
    std: Optional[Tuple[float, ...]] = None
    source: str = field(default="the checkpoint's record", compare=False)

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON-able values (lists, not tuples), without ``source``."""
        d = asdict(self)
        d.pop("source")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "the checkpoint's record") -> "EvalRecord":
        """The record of ``d``; every recorded value must obey the rule of the flag it stands for
        (``src.arg_parser.values``), else ``CheckpointError`` naming ``source``, the key and the value:
        a damaged record must not build a wrong network or preprocessing, nor crash later."""
        values = {key: _checked_entry(key, d.get(key), source) for key in _RECORD_RULES}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**values, source=source)

    def data_config(self) -> Dict[str, Any]:
        """The recorded entries of a timm data config (only those that are known)."""
        out = {"input_size": self.input_size, "crop_pct": self.crop_pct, "interpolation": self.interpolation,
               "crop_mode": self.crop_mode}
        return {k: v for k, v in out.items() if v is not None}


def _nonblank(text: str) -> None:
    if not text.strip():
        raise ValueError("blank")


def _record_rules() -> Dict[str, Any]:
    from src.arg_parser.values import CROP_PCT, INTERPOLATIONS, MEAN, STD, Choice, Text, positive_int

    return {"model": Text(check=_nonblank, what="a model name"),
            "num_classes": positive_int(), "patch_size": positive_int(), "input_size": positive_int(counts=(3,)),
            "crop_pct": CROP_PCT, "interpolation": Choice(names=INTERPOLATIONS),
            "crop_mode": Choice(names=CROP_MODES), "normalization": Choice(names=_MODES), "mean": MEAN, "std": STD}


CROP_MODES = ("center", "squash", "border")  # timm's eval transform
_RECORD_RULES = _record_rules()


def _plain(v: Any) -> Any:
    """NumPy / torch scalars as Python numbers, so a record written with them is read like JSON."""
    if isinstance(v, bool) or isinstance(v, (str, bytes)):
        return v
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return float(v)
    return v


def _checked_entry(key: str, value: Any, source: str) -> Any:
    """One record entry checked by its rule; None (and '' for names) means not recorded."""
    from src.arg_parser.values import RuleViolation, check_list
    from src.errors import CheckpointError

    rule = _RECORD_RULES[key]
    if value is None or (value == "" and key in ("model", "interpolation", "crop_mode", "normalization")):
        return None
    try:
        if rule.counts is None:
            return rule.parse(_plain(value))
        if not isinstance(value, (list, tuple)):
            raise RuleViolation(f"a list of {' or '.join(map(str, rule.counts))} values, each {rule.requirement}",
                                value)
        items = [rule.parse(_plain(v)) for v in value]
        problem = check_list(rule, items)
        if problem:
            raise RuleViolation(problem, list(value))
        return items
    except RuleViolation as e:
        raise CheckpointError(f"{source} is damaged: key '{key}': {e}") from None


# ----------------------------------------------------------------------------------------------
# writing


def training_record(model: nn.Module, arch: str, hparams: Mapping[str, Any],
                    data_config: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The ``eval_config`` of a training checkpoint: what the run's own evaluation used.

    ``data_config`` is the run's resolved timm data config; without it, it is resolved again from
    the training arguments and the network, exactly as ``setup_task.resolve_data_config`` did.
    Training never normalizes in the loader (``--no-normalize`` is always in effect), so the mode is
    ``model`` (a ``--normalize-model`` wrapper, whose mean/std are read from the model) or ``raw``.
    """
    from src.model_factory import patch_size_of
    from src.utils import model_normalization, unwrap_model

    net = unwrap_model(model)
    if data_config is None:
        from timm.data import resolve_data_config

        data_config = resolve_data_config(dict(hparams), model=net, verbose=False)
    norm = model_normalization(model)
    classes = getattr(net, "num_classes", None)
    rec = EvalRecord(model=arch, num_classes=int(classes) if isinstance(classes, int) else hparams.get("num_classes"),
                     patch_size=patch_size_of(net), input_size=tuple(int(v) for v in data_config["input_size"]),
                     crop_pct=float(data_config["crop_pct"]), interpolation=str(data_config["interpolation"]),
                     crop_mode=data_config.get("crop_mode"), normalization="model" if norm is not None else "raw",
                     mean=tuple(norm[0]) if norm is not None else None, std=tuple(norm[1]) if norm is not None else None)
    return rec.to_dict()


def attach_to_state_dict(state_dict: Any, record: Mapping[str, Any]) -> Any:
    """Put ``record`` into a state dict's ``_metadata['']``: still a bare state dict for any loader."""
    meta = getattr(state_dict, "_metadata", None)
    if meta is None:
        from collections import OrderedDict

        meta = OrderedDict()
    root = dict(meta.get("", {}))
    root[STATE_DICT_META_KEY] = dict(record)
    meta[""] = root
    state_dict._metadata = meta
    return state_dict


# ----------------------------------------------------------------------------------------------
# reading


def _state_dict_record(obj: Any) -> Optional[Mapping[str, Any]]:
    meta = getattr(obj, "_metadata", None)
    root = meta.get("") if isinstance(meta, Mapping) else None
    rec = root.get(STATE_DICT_META_KEY) if isinstance(root, Mapping) else None
    return rec if isinstance(rec, Mapping) else None


def record_from_hparams(hparams: Mapping[str, Any], arch: Optional[str] = None) -> EvalRecord:
    """What the training arguments of an original-format checkpoint say (no recorded ``eval_config``).

    The original's training loader never normalized (``no_normalize`` defaulted to true); a run
    with ``normalize_model`` normalized inside the model with ``mean``/``std`` (null: the model's
    defaults); a run with ``no_normalize: false`` normalized in the loader. Patch sizes are not
    taken from ``finetuning_patch_size``: the original ignored that flag.
    """
    size = hparams.get("input_size") or ([3, hparams["img_size"], hparams["img_size"]]
                                         if hparams.get("img_size") else None)
    if hparams.get("normalize_model"):
        mode = "model"
    elif "no_normalize" in hparams and not hparams.get("no_normalize"):
        mode = "loader"
    else:
        mode = "raw"
    mean, std = (hparams.get("mean"), hparams.get("std")) if mode != "raw" else (None, None)
    d = {"model": arch or hparams.get("model"), "num_classes": hparams.get("num_classes"), "input_size": size,
         "crop_pct": hparams.get("crop_pct"), "interpolation": hparams.get("interpolation") or None,
         "normalization": mode, "mean": _three(mean), "std": _three(std)}
    return EvalRecord.from_dict(d, source="the checkpoint's training arguments (hparams)")


def _three(v: Optional[Sequence[float]]) -> Optional[List[float]]:
    if v is None or (isinstance(v, (list, tuple)) and not v):
        return None
    v = list(v) if isinstance(v, (list, tuple)) else [v]  # entries are checked by the record's rules
    return v * 3 if len(v) == 1 else v


def read_record(ckpt: Any, model_hint: Optional[str] = None, path: Optional[str] = None) -> Optional[EvalRecord]:
    """The checkpoint's record, in order: ``eval_config`` (training checkpoints, robust-vits dicts),
    safetensors metadata, a bare state dict's ``_metadata``, the training arguments (``hparams``, or
    ``args`` as timm's classic checkpoints name them),
    then the original's timm data config of ``model_hint`` (bare state dicts of plain timm models).

    A recorded normalization layer (``normalization`` entry, ``normalize.mean``/``std`` buffers)
    completes records that lack one. None when nothing is known. A recorded value its flag's rule
    refuses (a damaged record) raises ``CheckpointError`` naming ``path``.
    """
    from src.errors import CheckpointError

    try:
        return _read_record(ckpt, model_hint)
    except CheckpointError as e:
        if path is None:
            raise
        raise CheckpointError(f"checkpoint {path}: {e}") from None


def _read_record(ckpt: Any, model_hint: Optional[str]) -> Optional[EvalRecord]:
    from src.checkpoint import checkpoint_normalization
    from src.errors import CheckpointError

    if not isinstance(ckpt, Mapping):
        return None
    rec = None
    found = ckpt.get(RECORD_KEY)
    st_meta = ckpt.get("safetensors_metadata")
    if isinstance(found, Mapping):
        rec = EvalRecord.from_dict(found)
    elif isinstance(st_meta, Mapping) and st_meta.get(RECORD_KEY):
        try:
            found = json.loads(st_meta[RECORD_KEY])
        except ValueError:
            found = None
        if not isinstance(found, Mapping):  # damaged like any other record: evaluating without it guesses
            raise CheckpointError(f"the checkpoint's record is damaged: its '{RECORD_KEY}' metadata is not a JSON "
                                  f"object ({str(st_meta[RECORD_KEY])[:60]!r})")
        rec = EvalRecord.from_dict(found)
    if rec is None:
        for obj in (ckpt, ckpt.get("state_dict"), ckpt.get("model")):
            found = _state_dict_record(obj)
            if found is not None:
                rec = EvalRecord.from_dict(found)
                break
    hparams = ckpt.get("hparams", ckpt.get("args"))  # timm.bits: hparams; timm's classic CheckpointSaver: args
    hparams = vars(hparams) if isinstance(hparams, argparse.Namespace) else hparams
    if rec is None and isinstance(hparams, Mapping):
        rec = record_from_hparams(hparams, ckpt.get("arch") if isinstance(ckpt.get("arch"), str) else None)
    arch = ckpt.get("arch")  # timm's train.py saves the model name there, also without training arguments
    if isinstance(arch, str) and arch.strip() and (rec is None or not rec.model):
        rec = rec or EvalRecord(source="the checkpoint's 'arch' entry")
        rec.model = arch.strip()
    norm = checkpoint_normalization(ckpt)
    if norm is not None and (rec is None or rec.mean is None):
        rec = rec or EvalRecord(source="stored in the checkpoint")
        rec.normalization, rec.mean, rec.std = "model", tuple(norm[0]), tuple(norm[1])
    if rec is None or None in (rec.input_size, rec.crop_pct, rec.interpolation):
        rec = _with_original_cfg(rec, (rec.model if rec is not None else None) or model_hint)
    return rec


def _with_original_cfg(rec: Optional[EvalRecord], model_name: Optional[str]) -> Optional[EvalRecord]:
    from src.original_cfgs import original_data_config

    cfg = original_data_config(model_name)
    if cfg is None:
        return rec
    source = f"the original's timm data config of {model_name}"
    if rec is None:
        rec = EvalRecord(model=None, source=source)
    else:
        rec.source = f"{rec.source} + {source}"
    rec.input_size = rec.input_size or tuple(cfg["input_size"])
    rec.crop_pct = rec.crop_pct if rec.crop_pct is not None else cfg["crop_pct"]
    rec.interpolation = rec.interpolation or cfg["interpolation"]
    return rec


# ----------------------------------------------------------------------------------------------
# which flags did the user give


def explicit_dests(parser: argparse.ArgumentParser, argv: Sequence[str]) -> Set[str]:
    """The destinations of the flags present in ``argv`` (a flag at its default value counts).

    argparse only fills in defaults for attributes the namespace lacks, so parsing into a
    namespace pre-filled with a sentinel leaves exactly the given flags changed.
    """
    sentinel = object()
    dests = vars(parser.parse_args([], namespace=argparse.Namespace()))
    probe = argparse.Namespace(**{d: sentinel for d in dests})
    parser.parse_args(list(argv), namespace=probe)
    return {d for d, v in vars(probe).items() if v is not sentinel}


def parse_recording_explicit(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """``parser.parse_args(argv)`` with ``explicit_flags`` set: every evaluation CLI records which flags
    were typed, so a flag given at its default value (``--model resnet50``) still beats a checkpoint's
    record and a flag left out never does."""
    args = parser.parse_args(list(argv))
    args.explicit_flags = explicit_dests(parser, argv)
    return args


_NO_DEFAULT = object()


def flag_given(args: argparse.Namespace, dest: str, default: Any = _NO_DEFAULT) -> bool:
    """Did the user set ``dest``? Exact when the parser recorded ``explicit_flags``; otherwise a value
    other than ``default`` when given, else other than the usual defaults (``None``, ``''``, ``False``,
    and ``resnet50`` for ``model``)."""
    explicit = getattr(args, "explicit_flags", None)
    if explicit is not None:
        return dest in explicit
    value = getattr(args, dest, None)
    if default is not _NO_DEFAULT:
        return value != default
    if dest == "model":
        return value not in (None, "", DEFAULT_MODEL)
    return value not in (None, "", False, [], ())


# ----------------------------------------------------------------------------------------------
# merging with the command line


@dataclass
class EvalSettings:
    """Model and preprocessing after merging the record with the flags."""
    model: str
    num_classes: Optional[int]
    patch_size: Optional[int]
    img_size: Optional[int]                 # for models built for an input size (position embeddings)
    data_overrides: Dict[str, Any]          # keys for timm's resolve_data_config
    record: Optional[EvalRecord]
    notes: List[str] = field(default_factory=list)


def _fmt(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return " ".join(_fmt(x) for x in v)
    return f"{v:g}" if isinstance(v, float) else str(v)


def _conflict(flag: str, given: Any, what: str, recorded: Any, rec: EvalRecord) -> str:
    return (f"{flag} {_fmt(given)} overrides the checkpoint's {what} {_fmt(recorded)} ({rec.source}): the network "
            f"is evaluated differently from how it was trained")


def resolve_settings(args: argparse.Namespace, record: Optional[EvalRecord]) -> EvalSettings:
    """Model name, classes, patch size and data-config entries: given flags > record > defaults."""
    from src.models import MODEL_ALIASES

    rec = record or EvalRecord()
    notes: List[str] = []
    use_test = bool(getattr(args, "use_test_size", False))  # timm's test_* fields replace the recorded size

    def pick(dest: str, flag: str, what: str, recorded: Any, same=lambda a, b: a == b) -> Any:
        value = getattr(args, dest, None)
        if flag_given(args, dest) and value not in (None, ""):
            if recorded is not None and not same(value, recorded):
                notes.append(_conflict(flag, value, what, recorded, rec))
            return value
        return recorded

    model = pick("model", "--model", "model", rec.model,
                 same=lambda a, b: MODEL_ALIASES.get(a, a) == MODEL_ALIASES.get(b, b)) or args.model or DEFAULT_MODEL
    num_classes = pick("num_classes", "--num-classes", "number of classes", rec.num_classes)
    patch_size = pick("patch_size", "--patch-size", "patch size", rec.patch_size)
    rec_size = tuple(rec.input_size) if rec.input_size and not use_test else None
    if flag_given(args, "input_size") and args.input_size:
        input_size = pick("input_size", "--input-size", "input size", rec_size, same=lambda a, b: tuple(a) == b)
        input_size = tuple(input_size)
    elif flag_given(args, "img_size") and args.img_size:
        size = pick("img_size", "--img-size", "input size", rec_size[-1] if rec_size else None)
        input_size = (rec_size[0] if rec_size else 3, size, size)
    else:
        input_size = rec_size
    overrides: Dict[str, Any] = {"input_size": input_size,
                                 "crop_pct": pick("crop_pct", "--crop-pct", "crop_pct",
                                                  None if use_test else rec.crop_pct),
                                 "interpolation": pick("interpolation", "--interpolation", "interpolation",
                                                       rec.interpolation),
                                 "crop_mode": rec.crop_mode, "mean": getattr(args, "mean", None),
                                 "std": getattr(args, "std", None)}
    for note in notes:
        _logger.warning(note)
    return EvalSettings(model=model, num_classes=num_classes, patch_size=patch_size,
                        img_size=input_size[-1] if input_size else None,
                        data_overrides={k: v for k, v in overrides.items() if v is not None}, record=record,
                        notes=notes)


def describe(model: str, num_classes: int, patch_size: Optional[int], data_config: Mapping[str, Any], mode: str,
             mean: Sequence[float], std: Sequence[float], source: str) -> str:
    """The one log line that says what is evaluated and how its inputs are prepared."""
    size = data_config["input_size"]
    inputs = {"raw": "raw [0, 1] inputs",
              "model": f"[0, 1] inputs normalized inside the model (mean {_fmt(mean)}, std {_fmt(std)})",
              "loader": f"inputs normalized by the loader (mean {_fmt(mean)}, std {_fmt(std)})"}[mode]
    patch = f", patch size {patch_size}" if patch_size is not None else ""
    return (f"evaluating {model} ({num_classes} classes{patch}) at {size[-2]}x{size[-1]} px, crop_pct "
            f"{_fmt(float(data_config['crop_pct']))}, {data_config['interpolation']}, {inputs}; settings from {source}")


# ----------------------------------------------------------------------------------------------
# releases: a complete record for prepare_checkpoint.py


def complete_record(record: Optional[EvalRecord], model_name: str, net: nn.Module,
                    overrides: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The record a released checkpoint carries: ``record`` with ``overrides`` (prepare_checkpoint's
    flags) on top; what neither gives is taken from ``net`` where that is safe (class count, the
    stem's patch size) and otherwise asked for in a ``UsageError`` naming the flags.

    ``net`` is the network built from the weights (its ``pretrained_cfg`` gives the mean/std of a
    ``model``/``loader`` normalization recorded without values, as the original's null mean/std did).
    """
    from src.errors import UsageError
    from src.model_factory import patch_size_of

    d = (record or EvalRecord()).to_dict()
    d.update({k: v for k, v in (overrides or {}).items() if v is not None})
    d["model"] = model_name
    if d.get("num_classes") is None:
        d["num_classes"] = getattr(net, "num_classes", None)
    if d.get("patch_size") is None:
        d["patch_size"] = patch_size_of(net)
    if d.get("input_size") is not None and len(d["input_size"]) == 1:
        d["input_size"] = [3, d["input_size"][0], d["input_size"][0]]
    if record is not None and record.normalization is not None:
        # a record made from training arguments: what they leave unset, the run took from the model's cfg
        cfg = getattr(net, "pretrained_cfg", None) or {}
        for key in ("input_size", "crop_pct", "interpolation"):
            if d.get(key) is None and cfg.get(key) is not None:
                d[key] = list(cfg[key]) if isinstance(cfg[key], tuple) else cfg[key]
                _logger.info("%s %s: the model's default (the training arguments leave it unset)", key, d[key])
    missing = [flag for key, flag in (("input_size", "--input-size C H W"), ("crop_pct", "--crop-pct"),
                                      ("interpolation", "--interpolation"),
                                      ("normalization", "--normalization {model,raw,loader}"))
               if d.get(key) is None]
    if missing:
        raise UsageError(f"the checkpoint does not record how to evaluate {model_name} and nothing else tells: pass "
                         f"{', '.join(missing)} (what the run's own evaluation used)")
    if d["normalization"] == "raw":
        d["mean"] = d["std"] = None
    else:
        cfg = getattr(net, "pretrained_cfg", None) or {}
        for key in ("mean", "std"):
            if d.get(key) is None:
                d[key] = _three(cfg.get(key))
                _logger.info("normalization %s: the model's default %s %s", d["normalization"], key, d[key])
            else:
                d[key] = _three(d[key])
    return EvalRecord.from_dict(d).to_dict()
