"""The one way to build a model: train.py, validate.py, validate_robustbench.py and
attack_effectiveness.py all come through here, so they cannot disagree.

* :func:`create_model` -- timm's registry (our ``src.models`` registered on import) with keyword
  overrides (classes, pooling, drop rates, image size, ...). Which keywords a model accepts is
  checked explicitly against its class (built once on the ``meta`` device, which costs no memory),
  so a ``TypeError`` raised inside model code is a bug that keeps its traceback instead of being
  mistaken for "this model does not take that option".
* :func:`set_patch_size` -- XCiT stem surgery (``src.utils.adapt_model_patches``) behind one guard:
  a size equal to the model's own is a no-op everywhere.
* :func:`load_checkpoint` -- weights (through ``src.checkpoint``) plus what the checkpoint says
  about the inputs its network was trained on (its normalization, raw or normalized inputs).
* :func:`resolve_normalization` -- the one precedence order for the mean/std of a normalization
  layer inside the model: explicit ``--mean/--std`` > what the checkpoint recorded > the model's
  defaults, decided per value (``--mean`` alone keeps the recorded or default std).
"""
from __future__ import annotations

import difflib
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Type

import torch
from torch import nn

from src.errors import ExpectedError, UsageError, first_line

_logger = logging.getLogger("robust_vits")

__all__ = [
    "OPTION_FLAGS",
    "Normalization",
    "RecordedNormalization",
    "LoadedCheckpoint",
    "check_model_name",
    "accepted_options",
    "create_model",
    "patch_size_of",
    "set_patch_size",
    "load_checkpoint",
    "three",
    "resolve_normalization",
    "wrap_normalization",
]

Normalization = Tuple[Tuple[float, ...], Tuple[float, ...]]

# model keyword -> the CLI flag that sets it (named in errors)
OPTION_FLAGS: Dict[str, str] = {
    "num_classes": "--num-classes", "global_pool": "--gp", "in_chans": "--input-size", "img_size": "--img-size",
    "drop_rate": "--drop", "drop_path_rate": "--drop-path", "drop_block_rate": "--drop-block",
    "bn_momentum": "--bn-momentum", "bn_eps": "--bn-eps",
}
# keywords a model silently goes without when it does not take them: the data config still
# resizes the inputs, only models with position embeddings need the size at construction
_OPTIONAL = ("img_size",)


def check_model_name(name: str) -> None:
    """Raise ``UsageError`` (with similar names) unless ``name`` is in timm's registry or ours."""
    import timm

    import src.models  # noqa: F401  (registers the project's models)

    if not timm.is_model(name):
        close = similar_model_names(str(name), timm.list_models())
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise UsageError(f"unknown model '{name}'{hint}")


def _squash(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


def similar_model_names(name: str, known: Sequence[str], n: int = 5) -> List[str]:
    """Registered names a user probably meant by ``name``, best first.

    Underscores, dashes and case are ignored (``resnet_18`` and ``ResNet-18`` find ``resnet18``),
    then difflib's ratio ranks the rest, so a typo finds its neighbours instead of every model
    sharing the first word."""
    by_squashed: Dict[str, List[str]] = {}
    for k in known:
        by_squashed.setdefault(_squash(k), []).append(k)
    target = _squash(name)
    out = list(by_squashed.get(target, []))
    for s in difflib.get_close_matches(target, list(by_squashed), n=n, cutoff=0.6):
        out.extend(k for k in by_squashed[s] if k not in out)
    return out[:n]


def accepted_options(name: str, options: Mapping[str, Any]) -> Dict[str, bool]:
    """For each keyword of ``options``: does model ``name`` accept it?

    The model is built without the options on the ``meta`` device (no memory, no weights) and its
    class's ``__init__`` signature is read: a named parameter or ``**kwargs`` accepts.
    """
    import timm

    with torch.device("meta"):
        probe = timm.create_model(name, pretrained=False)
    params = inspect.signature(type(probe).__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return {k: True for k in options}
    return {k: k in params for k in options}


def create_model(name: str, *, pretrained: bool = False, scriptable: Optional[bool] = None,
                 **options: Any) -> nn.Module:
    """``timm.create_model(name, pretrained, **options)`` with the options the model accepts.

    ``None`` options are dropped (timm's convention: the model's default). An option the model
    does not accept is a ``UsageError`` naming its flag, except ``img_size``, which is left out
    (the model then keeps its own size). Failing to get pretrained weights is a ``UsageError``.
    """
    import timm

    check_model_name(name)
    options = {k: v for k, v in options.items() if v is not None}
    if options:
        accepted = accepted_options(name, options)
        refused = [k for k, ok in accepted.items() if not ok and k not in _OPTIONAL]
        if refused:
            flags = ", ".join(f"{OPTION_FLAGS.get(k, k)} ({k})" for k in refused)
            raise UsageError(f"model '{name}' does not accept {flags}; drop the option or pick another model")
        options = {k: v for k, v in options.items() if accepted[k]}
        _check_options_build(name, options)
    try:
        return timm.create_model(name, pretrained=pretrained, scriptable=scriptable, **options)
    except (RuntimeError, OSError, ValueError) as e:
        if not pretrained or isinstance(e, ExpectedError):
            raise
        raise UsageError(f"cannot load pretrained weights for '{name}' ({first_line(e)[:160]}); pass --checkpoint, "
                         "or check the network connection") from None


def _check_options_build(name: str, options: Mapping[str, Any]) -> None:
    """Build ``name`` with ``options`` on the ``meta`` device (no memory, no weights).

    It was already built without them (``accepted_options``), so a failure here is the options' fault: a pool
    type the model does not have (``--gp``), an image size its patch size does not divide (``--img-size``),
    ... The model's own check (often an ``assert``) becomes a ``UsageError`` naming the flags and values.
    """
    import timm

    try:
        with torch.device("meta"):
            timm.create_model(name, pretrained=False, **options)
    except ExpectedError:
        raise
    except NotImplementedError:  # an operation the meta device lacks, not a refusal: the real build decides
        return
    except Exception as e:  # noqa: BLE001 - the model's constructor refused one of the user's values
        if "meta" in str(e).lower():  # e.g. .item() of a meta tensor: the same, not the user's value
            return
        given = ", ".join(f"{OPTION_FLAGS.get(k, k)} {_show_option(v)}" for k, v in options.items())
        raise UsageError(f"model '{name}' cannot be built with {given}: {first_line(e)[:200]}") from None


def _show_option(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return " ".join(str(v) for v in value)
    return repr(value) if isinstance(value, str) else str(value)


def _patch_embed(model: nn.Module) -> Optional[nn.Module]:
    from src.utils import unwrap_model

    pe = getattr(unwrap_model(model), "patch_embed", None)
    return pe if isinstance(getattr(pe, "proj", None), nn.Sequential) else None


def patch_size_of(model: nn.Module) -> Optional[int]:
    """Patch size of an XCiT-style convolutional patch stem (None for other models)."""
    pe = _patch_embed(model)
    p = getattr(pe, "patch_size", None) if pe is not None else None
    if p is None:
        return None
    return int(p[0] if isinstance(p, (tuple, list)) else p)


def set_patch_size(model: nn.Module, patch_size: Optional[int], *, flag: str = "--patch-size",
                   error: Type[ExpectedError] = UsageError) -> bool:
    """Adapt an XCiT stem to ``patch_size`` pixels; returns whether the model changed.

    ``None`` and the model's own size are no-ops. A model without a convolutional patch stem, or a
    size the stem cannot reach (``adapt_model_patches``'s rules), raises ``error`` naming ``flag``.
    """
    if patch_size is None:
        return False
    current = patch_size_of(model)
    if current is None:
        raise error(f"{flag} applies to XCiT-style models with a convolutional patch embedding; "
                    f"{type(_unwrapped(model)).__name__} has none (got {flag} {patch_size})")
    if current == patch_size:
        return False
    from src.utils import adapt_model_patches

    try:
        adapt_model_patches(model, patch_size)
    except AssertionError as e:
        raise error(f"{flag} {patch_size}: {e}") from None
    _logger.info("adapted the XCiT stem from patch size %d to %d", current, patch_size)
    return True


def _unwrapped(model: nn.Module) -> nn.Module:
    from src.utils import unwrap_model

    return unwrap_model(model)


# ----------------------------------------------------------------------------------------------
# checkpoints


@dataclass
class RecordedNormalization:
    """What a checkpoint says about the normalization its network was trained behind.

    ``mean`` / ``std`` may be None when only the training arguments say "normalize inside the
    model" without values (the model's defaults were used then).
    """
    mean: Optional[Tuple[float, ...]]
    std: Optional[Tuple[float, ...]]
    source: str


@dataclass
class LoadedCheckpoint:
    """Where the weights came from and what the checkpoint records about its inputs."""
    path: str
    state_key: str
    normalization: Optional[RecordedNormalization] = None
    trained_inputs: Optional[str] = None  # 'raw' | 'normalized' | None (unknown)


def _trained_inputs(hparams: Any) -> Optional[str]:
    """What the checkpoint's *network* was trained on: 'raw' [0, 1] or 'normalized' inputs."""
    if not isinstance(hparams, Mapping) or "no_normalize" not in hparams:
        return None
    if hparams.get("normalize_model"):
        return "normalized"  # the wrapper normalized before the network
    return "raw" if hparams.get("no_normalize") else "normalized"


def _recorded_normalization(stored: Optional[Normalization], hparams: Any) -> Optional[RecordedNormalization]:
    if stored is not None:
        return RecordedNormalization(three(stored[0]), three(stored[1]), "stored in the checkpoint")
    if isinstance(hparams, Mapping) and hparams.get("normalize_model"):
        # an original-style checkpoint of a --normalize-model run: mean/std are in its training args
        mean, std = hparams.get("mean"), hparams.get("std")
        return RecordedNormalization(three(mean) if mean else None, three(std) if std else None,
                                     "from the checkpoint's training arguments (hparams)")
    return None


def load_checkpoint(model: nn.Module, checkpoint: str, *, use_ema: bool = False, trust: bool = False,
                    ckpt: Any = None) -> LoadedCheckpoint:
    """Load ``checkpoint``'s weights into ``model`` (strict) and read what it records.

    Weights-only unless ``trust`` (``--trust-checkpoint``); every problem is a
    ``CheckpointError``. ``use_ema`` prefers EMA weights and warns when there are none. ``ckpt`` is
    the already read file (``src.checkpoint.load_checkpoint_file``), so it is not read twice.
    """
    from src.checkpoint import load_checkpoint_file, load_model_weights

    if ckpt is None:
        ckpt = load_checkpoint_file(checkpoint, trust=trust)
    report = load_model_weights(model, ckpt, use_ema=use_ema, strict=True, source=str(checkpoint))
    if use_ema and report.state_key not in ("model_ema", "state_dict_ema"):
        _logger.warning("--use-ema: checkpoint %s has no EMA weights; evaluating its model weights", checkpoint)
    hparams = ckpt.get("hparams") if isinstance(ckpt, Mapping) else None
    return LoadedCheckpoint(path=str(checkpoint), state_key=report.state_key,
                            normalization=_recorded_normalization(report.normalization, hparams),
                            trained_inputs=_trained_inputs(hparams))


# ----------------------------------------------------------------------------------------------
# normalization


def three(values: Sequence[float]) -> Tuple[float, ...]:
    """One value per RGB channel (a single value is repeated)."""
    v = tuple(float(x) for x in values)
    return v * 3 if len(v) == 1 else v


def resolve_normalization(mean: Optional[Sequence[float]], std: Optional[Sequence[float]],
                          recorded: Optional[RecordedNormalization], defaults: Normalization
                          ) -> Tuple[Tuple[float, ...], Tuple[float, ...], str]:
    """``(mean, std, source)``: each of mean and std from the flag, else the checkpoint, else the model.

    ``source`` says where the values came from, for the logs and reports.
    """
    def pick(flag: Optional[Sequence[float]], rec: Optional[Tuple[float, ...]], default: Sequence[float]
             ) -> Tuple[Tuple[float, ...], str]:
        if flag:
            return three(flag), "flag"
        if rec:
            return three(rec), "checkpoint"
        return three(default), "model"

    rec_mean = recorded.mean if recorded is not None else None
    rec_std = recorded.std if recorded is not None else None
    m, m_src = pick(mean, rec_mean, defaults[0])
    s, s_src = pick(std, rec_std, defaults[1])
    names = {"flag": "from --mean/--std", "checkpoint": recorded.source if recorded is not None else "",
             "model": "the model's defaults"}
    source = names[m_src] if m_src == s_src else f"mean {names[m_src]}, std {names[s_src]}"
    return m, s, source


def wrap_normalization(model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> nn.Module:
    """``normalize_model`` (inputs in [0, 1], ``(x - mean) / std`` as the model's first layer)."""
    from src.utils import normalize_model

    return normalize_model(model, mean, std)

