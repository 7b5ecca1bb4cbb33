"""Reading, checking, fine-tuning from and exporting checkpoints: the one place that does it.

Formats understood (original-behaviour §0.4):

* training checkpoints: a dict with ``model`` (state dict of the *unwrapped* network),
  ``model_ema`` (or None), ``optimizer``, ``epoch``, ``arch``, ``hparams``, ... and, for runs with
  ``--normalize-model``, ``normalization: {'mean': [...], 'std': [...]}`` (added by this project so
  evaluation can rebuild the normalization layer; the state-dict layout is unchanged);
* timm-style dicts with ``state_dict`` / ``state_dict_ema``;
* released checkpoints: a bare state dict (``{model}-{dataset}[-eps-{eps}].pth.tar``), and its
  ``.safetensors`` copy whose metadata may carry mean/std;
* RobustBench-style state dicts of a normalization wrapper (``normalize.mean``, ``normalize.std``,
  ``model.*``) and DDP / ``torch.compile`` prefixes (``module.``, ``_orig_mod.``).

Files are read with ``torch.load(weights_only=True)``: a file that needs arbitrary unpickling
(which can run code) is refused with ``UntrustedCheckpointError`` unless the caller passes
``trust=True`` (the CLIs' ``--trust-checkpoint``). Every problem raises ``CheckpointError`` with a
single line that names the file and says what to do, so the CLIs can print it and exit 2.
All I/O goes through ``src.storage``: local paths, ``gs://`` and ``memory://`` behave the same.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import pickle
import re
import struct
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import storage
from .errors import CheckpointError, FinetuneArgumentError, UntrustedCheckpointError
from .sanity import check_finite_state_dict
from .utils import unwrap_model

_logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "UntrustedCheckpointError",
    "FinetuneArgumentError",
    "LoadReport",
    "load_checkpoint_file",
    "extract_state_dict",
    "checkpoint_normalization",
    "normalization_entry",
    "load_model_weights",
    "finetune_from_checkpoint",
    "compare_state_dicts",
    "mismatch_message",
    "resolve_checkpoint",
    "CLASSIFIER_KEYS",
    "EMA_KEYS",
]

Normalization = Tuple[Tuple[float, ...], Tuple[float, ...]]
PathOrCheckpoint = Union[str, os.PathLike, Mapping[str, Any]]

# Classifier parameters dropped by fine-tuning when their shape differs (DeiT's list); the
# model's own classifier (its ``pretrained_cfg['classifier']``, e.g. ``linear``) is added to it.
CLASSIFIER_KEYS = ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias", "fc.weight", "fc.bias")

# Where a training checkpoint keeps the weights, in order of preference.
EMA_KEYS = ("model_ema", "state_dict_ema")
_MODEL_KEYS = ("model", "state_dict")


@dataclass
class LoadReport:
    """What a load did: where the weights came from and which keys did not line up."""
    source: str
    state_key: str
    missing_keys: List[str] = field(default_factory=list)
    unexpected_keys: List[str] = field(default_factory=list)
    normalization: Optional[Normalization] = None


# --------------------------------------------------------------------------------------------
# reading files


def _describe(path_or_ckpt: Any) -> str:
    return str(path_or_ckpt) if isinstance(path_or_ckpt, (str, os.PathLike)) else "<in-memory checkpoint>"


def _numpy_safe_globals() -> list:
    """numpy scalars and dtypes: plain data that older checkpoints carry in ``metrics``/``hparams``.

    They cannot run code (an object-dtype scalar would still go through the restricted
    unpickler), so they are allowed without ``trust``; numpy arrays are not.
    """
    try:
        import numpy as np
        from numpy._core.multiarray import scalar  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x or no numpy
        try:
            import numpy as np
            from numpy.core.multiarray import scalar
        except ImportError:
            return []
    dtypes = {type(np.dtype(c)) for c in "?bhilqBHILQefdgFDG"}
    return [scalar, np.dtype, *sorted(dtypes, key=lambda t: t.__name__)]


def _global_name(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def _is_safetensors(path: str, head: bytes, size: int) -> bool:
    """By extension, or by content: an 8-byte little-endian header length followed by JSON."""
    if str(path).endswith(".safetensors"):
        return True
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return 0 < header_len <= size - 8 and head[8:9] == b"{"


def _load_safetensors(path: str, data: bytes) -> Dict[str, Any]:
    from safetensors.torch import load as st_load

    try:
        (header_len,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + header_len])
        state_dict = st_load(data)
    except Exception as e:  # noqa: BLE001 - any decoding failure means a damaged file
        raise CheckpointError(f"cannot read checkpoint {path}: the safetensors file is truncated or corrupt "
                              f"({type(e).__name__}: {_first_line(e)})") from None
    metadata = dict(header.get("__metadata__") or {})
    out: Dict[str, Any] = {"state_dict": state_dict, "safetensors_metadata": metadata}
    if "mean" in metadata and "std" in metadata:
        try:
            out["normalization"] = {"mean": json.loads(metadata["mean"]), "std": json.loads(metadata["std"])}
        except ValueError:
            raise CheckpointError(f"checkpoint {path}: its mean/std metadata is not JSON "
                                  f"({metadata['mean']!r}, {metadata['std']!r})") from None
    return out


def _first_line(e: BaseException) -> str:
    """First sentence of an exception message, without terminal escapes (for one-line errors)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()
    first = text[0] if text else ""
    return first.split(". ")[0][:200]


def _open_checkpoint(path: str) -> Tuple[int, bytes, Any, Any]:
    """``(size, first 16 bytes, opener, read_all)`` of a checkpoint file; read errors are ``CheckpointError``."""
    try:
        if storage.is_local(path):
            # Local files are read through a file handle: a multi-GB training checkpoint is not
            # held twice in memory. Remote files are fetched once (no small random-access reads).
            local = path[len("file://"):] if path.startswith("file://") else path
            if os.path.exists(local) and not os.path.isdir(local) and not os.path.isfile(local):
                # a FIFO, socket or device would block or stream forever
                raise CheckpointError(f"checkpoint {path} is not a regular file (a pipe, socket or device)")
            size = os.path.getsize(local)
            with open(local, "rb") as f:
                head = f.read(16)
            return size, head, lambda: open(local, "rb"), lambda: storage.read_bytes(local)
        data = storage.read_bytes(path)
        return len(data), data[:16], lambda: io.BytesIO(data), lambda: data
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} not found") from None
    except IsADirectoryError:
        raise CheckpointError(f"checkpoint {path} is a directory, not a checkpoint file") from None
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or _first_line(e)}") from None


def load_checkpoint_file(path: Union[str, os.PathLike], trust: bool = False) -> Any:
    """Read a checkpoint (``.pth.tar``/``.pth``/``.safetensors``; local, ``gs://``, ``memory://``).

    ``torch.load`` runs with ``weights_only=True`` (plus numpy scalars): tensors, containers and
    plain values only. A file that needs more (pickled classes or functions, which can execute
    code while loading) raises ``UntrustedCheckpointError``; ``trust=True`` loads it anyway.
    A ``.safetensors`` file gives ``{'state_dict': ..., 'safetensors_metadata': {...}}`` plus
    ``normalization`` when the metadata carries mean/std.
    """
    path = str(path)
    size, head, opener, read_all = _open_checkpoint(path)
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); it was probably not written completely")
    if _is_safetensors(path, head, size):
        return _load_safetensors(path, read_all())
    other = _other_format(path, head, opener)
    if other:
        raise CheckpointError(f"checkpoint {path} {other}")

    corrupt = f"cannot read checkpoint {path}: the file is truncated or corrupt"
    if trust:
        try:
            with opener() as f:
                return torch.load(f, map_location="cpu", weights_only=False)
        except (ImportError, AttributeError) as e:  # the code the pickle names is not here, or the names are junk
            with opener() as f:
                names = _unsafe_globals(f, set())
            missing = [n for n in names or () if not _available_global(n)]
            if missing:
                raise CheckpointError(_missing_code(path, missing)) from None
            raise CheckpointError(f"{corrupt} ({type(e).__name__}: {_first_line(e)})") from None
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{corrupt} ({type(e).__name__}: {_first_line(e)})") from None

    allowed = _numpy_safe_globals()
    try:
        with opener() as f, torch.serialization.safe_globals(allowed):
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        with opener() as f:
            unsafe = _unsafe_globals(f, {_global_name(g) for g in allowed})
        intact = unsafe is not None  # the archive's pickle was read to its end: its names are whole
        if unsafe is None:  # legacy (non-zip) file: the error names the first offending global
            unsafe = re.findall(r"GLOBAL ([\w.]+)", str(e))
        # A name that cannot exist in an already imported module is a damaged file, not a payload --
        # unless the archive is intact: then the saving code defined it (a script's __main__ class).
        absent = [n for n in unsafe if not _plausible_global(n)]
        unsafe = [n for n in unsafe if _plausible_global(n)]
        if intact and absent and not unsafe:
            raise CheckpointError(_missing_code(path, absent)) from None
        if unsafe:
            shown = ", ".join(unsafe[:5]) + (", ..." if len(unsafe) > 5 else "")
            raise UntrustedCheckpointError(
                f"checkpoint {path} needs arbitrary code to load ({shown}); pass --trust-checkpoint "
                f"(trust=True) only if you trust its source") from None
        raise CheckpointError(f"{corrupt} (damaged pickle data)") from None
    except Exception as e:  # noqa: BLE001 - zip/stream errors of damaged files
        raise CheckpointError(f"{corrupt} ({type(e).__name__}: {_first_line(e)})") from None


def _other_format(path: str, head: bytes, opener: Any) -> Optional[str]:
    """What a file that is not a checkpoint is, from its first bytes (None: maybe a checkpoint).

    Such files used to be reported as "truncated or corrupt", which sends the user hunting for a
    damaged download when the file is intact and merely of another kind. A zip archive that cannot be
    listed is left to ``torch.load`` (a truncated checkpoint)."""
    if head[:2] == b"\x1f\x8b":
        return "is gzip-compressed: decompress it first (gunzip) and pass the .pth/.pth.tar inside"
    if head[:4] != b"PK\x03\x04":
        return None
    import zipfile

    try:
        with opener() as f, zipfile.ZipFile(f) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return None
    if any(n.endswith("/constants.pkl") or "/code/__torch__/" in n for n in names):
        return ("is a TorchScript archive (torch.jit.save), not a checkpoint: load it with torch.jit.load and save "
                "its state_dict() instead")
    if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "") if names else "nothing"
        return f"is a zip archive but not a PyTorch checkpoint (no data.pkl; it holds {shown})"
    return None


def _missing_code(path: str, names: Sequence[str]) -> str:
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    return (f"checkpoint {path} pickles {shown}, which is not available here (code of whatever saved it: a class "
            f"of its script's __main__, or a module that is not installed); load it where that code exists and save "
            f"the model's state_dict() instead")


def _available_global(name: str) -> bool:
    """Whether ``name`` (``module.attr[.attr]``) can be imported here; imports its module if needed
    (only called once the user trusts the file)."""
    import importlib

    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        return _has_attrs(obj, parts[i:])
    return False


def _has_attrs(obj: Any, attrs: Sequence[str]) -> bool:
    """``obj.a.b...`` exists for the attribute path ``attrs``."""
    for attr in attrs:
        if not hasattr(obj, attr):
            return False
        obj = getattr(obj, attr)
    return True


def _plausible_global(name: str) -> bool:
    """False only when ``name`` certainly does not exist (its module is loaded, the attribute is not).

    Nothing is imported: names of modules that are not loaded yet count as plausible, so a real
    payload is always reported as untrusted rather than as damage.
    """
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        module = sys.modules.get(".".join(parts[:i]))
        if module is None:
            continue
        return _has_attrs(module, parts[i:])
    return True


def _unsafe_globals(f: Any, allowed: set) -> Optional[List[str]]:
    """Globals the file's pickle references beyond the weights-only allowlist (None: unknown)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(f)
    except Exception:  # noqa: BLE001 - legacy (non-zip) format or a damaged archive
        return None
    return [n for n in names if n not in allowed]


# --------------------------------------------------------------------------------------------
# state dicts and metadata


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _to_normalization(mean: Any, std: Any) -> Normalization:
    """Recorded mean/std as float tuples; anything that cannot normalize RGB images is a CheckpointError."""
    def as_tuple(v: Any) -> Tuple[float, ...]:
        if isinstance(v, torch.Tensor):
            return tuple(float(x) for x in v.flatten().tolist())
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return (float(v),)
        return tuple(float(x) for x in v)
    try:
        m, sd = as_tuple(mean), as_tuple(std)
    except (TypeError, ValueError):
        raise CheckpointError(f"the checkpoint's normalization metadata is not numbers: mean {mean!r}, "
                              f"std {std!r}") from None
    if len(m) not in (1, 3) or len(sd) not in (1, 3) or not all(math.isfinite(x) for x in m + sd) \
            or any(x <= 0 for x in sd):
        raise CheckpointError(f"the checkpoint's normalization metadata is invalid (mean {list(m)}, std {list(sd)}): "
                              "1 or 3 finite values each and std > 0 are needed (a damaged or hand-edited file)")
    return m, sd


def _strip_wrappers(state_dict: Mapping[str, torch.Tensor]) -> Tuple["OrderedDict[str, torch.Tensor]", Dict[str, Any]]:
    """Remove DDP / compile / normalization-wrapper prefixes; return the mean/std found on the way."""
    sd = OrderedDict(state_dict)
    meta: Dict[str, Any] = {}
    for _ in range(8):  # wrappers nest a few levels at most
        keys = list(sd)
        if any(k.startswith(("module.", "_orig_mod.")) for k in keys):
            sd = OrderedDict((k.split(".", 1)[1] if k.startswith(("module.", "_orig_mod.")) else k, v)
                             for k, v in sd.items())
            continue
        if "normalize.mean" in sd and "normalize.std" in sd and \
                all(k.startswith("model.") for k in keys if not k.startswith("normalize.")):
            meta["normalization"] = _to_normalization(sd["normalize.mean"], sd["normalize.std"])
            sd = OrderedDict((k[len("model."):], v) for k, v in sd.items() if not k.startswith("normalize."))
            continue
        if keys and all(k.startswith("model.") for k in keys):
            sd = OrderedDict((k[len("model."):], v) for k, v in sd.items())
            continue
        break
    return sd, meta


def extract_state_dict(ckpt: Any, use_ema: bool = False,
                       source: str = "<in-memory checkpoint>") -> Tuple["OrderedDict[str, torch.Tensor]", Dict[str, Any]]:
    """The network's state dict inside any supported checkpoint, plus metadata.

    Training checkpoints give ``model`` (or ``model_ema`` / ``state_dict_ema`` when ``use_ema``
    and present and not None, like timm's loader), ``state_dict``; anything else must be a bare
    state dict. Wrapper prefixes are removed. Metadata: ``state_key`` (where the weights came
    from: ``model``, ``model_ema``, ``state_dict``, ... or ``bare``) and ``normalization``
    (``(mean, std)``) when the checkpoint records one.
    """
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"checkpoint {source} holds a {type(ckpt).__name__}, not a state dict or a "
                              f"training checkpoint")
    state_key = "bare"
    weights: Any = ckpt
    candidates = (EMA_KEYS if use_ema else ()) + _MODEL_KEYS
    for key in candidates:
        value = ckpt.get(key)
        if isinstance(value, Mapping):
            state_key, weights = key, value
            break
        if value is not None and not isinstance(value, torch.Tensor):  # None: no EMA; a tensor: a bare state dict
            raise CheckpointError(f"checkpoint {source}: its '{key}' entry is a {type(value).__name__}, not a "
                                  f"state dict; the file is damaged or was not written as a checkpoint")
    if not _is_state_dict(weights):
        raise CheckpointError(f"checkpoint {source} {_not_weights(weights, state_key, ckpt)}")
    sd, meta = _strip_wrappers(weights)
    meta["state_key"] = state_key
    norm = checkpoint_normalization(ckpt)
    if norm is not None:
        meta["normalization"] = norm
    return sd, meta


def _not_weights(weights: Mapping[str, Any], state_key: str, ckpt: Mapping[str, Any]) -> str:
    """Why ``weights`` (the ``state_key`` entry, or the whole file when ``bare``) is no state dict."""
    if state_key != "bare" and not weights:
        return f"contains no model weights: its '{state_key}' entry is empty"
    tensors = [k for k, v in weights.items() if isinstance(k, str) and isinstance(v, torch.Tensor)]
    junk = [f"{k!r} ({type(v).__name__})" if not isinstance(k, str) else f"{k} ({type(v).__name__})"
            for k, v in weights.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if tensors and state_key != "bare":  # loading only the tensors would hide the damage
        return (f"is damaged: its '{state_key}' entry holds {len(tensors)} tensors and {len(junk)} other entries "
                f"({_first_names(junk, 3)})")
    if tensors:
        return (f"is not a state dict: it mixes {len(tensors)} tensors with {len(junk)} other entries "
                f"({_first_names(junk, 3)}); weights are read from a bare state dict or a 'model' / 'state_dict' "
                f"entry")
    keys = ", ".join(sorted(map(str, ckpt))[:8])
    return f"contains no model weights (top-level keys: {keys})"


def checkpoint_normalization(ckpt: Any) -> Optional[Normalization]:
    """``(mean, std)`` recorded in a checkpoint, or None.

    Looks at the ``normalization`` entry that ``--normalize-model`` training runs (and the
    safetensors export) write, then at ``normalize.mean`` / ``normalize.std`` buffers of a
    RobustBench-style wrapped state dict.
    """
    if not isinstance(ckpt, Mapping):
        return None
    entry = ckpt.get("normalization")
    if isinstance(entry, Mapping) and entry.get("mean") is not None and entry.get("std") is not None:
        return _to_normalization(entry["mean"], entry["std"])
    for key in ("bare",) + _MODEL_KEYS + EMA_KEYS:
        weights = ckpt if key == "bare" else ckpt.get(key)
        if not isinstance(weights, Mapping):
            continue
        for prefix in ("", "module.", "module.module.", "_orig_mod."):
            mean, std = weights.get(prefix + "normalize.mean"), weights.get(prefix + "normalize.std")
            if isinstance(mean, torch.Tensor) and isinstance(std, torch.Tensor):
                return _to_normalization(mean, std)
    return None


def normalization_entry(model: nn.Module) -> Optional[Dict[str, List[float]]]:
    """``{'mean': [...], 'std': [...]}`` for a normalization-wrapped model (None otherwise).

    Training checkpoint writers store it under the ``normalization`` key, next to the unwrapped
    weights, so ``checkpoint_normalization`` can give it back to evaluation.
    """
    from .utils import model_normalization

    norm = model_normalization(model)
    if norm is None:
        return None
    return {"mean": list(norm[0]), "std": list(norm[1])}


# --------------------------------------------------------------------------------------------
# loading into models


def _arch_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def compare_state_dicts(model_sd: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor]
             ) -> Tuple[List[str], List[str], List[str]]:
    """Missing keys, unexpected keys and shape mismatches (``'key: checkpoint (..) vs model (..)'``)."""
    missing = [k for k in model_sd if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in model_sd]
    shapes = [f"{k} shape {_shape(sd[k])} in checkpoint vs {_shape(v)} in model"
              for k, v in model_sd.items() if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    return missing, unexpected, shapes


SPLIT_BN_KEY = ".aux_bn."


def drop_split_bn(sd: "OrderedDict[str, torch.Tensor]", model_sd: Mapping[str, torch.Tensor],
                  source: str) -> "OrderedDict[str, torch.Tensor]":
    """A ``--split-bn`` run's checkpoint holds, next to every BatchNorm's own tensors (what the clean split and
    evaluation use), the auxiliary BatchNorms of its augmentation splits (``<bn>.aux_bn.<i>.*``). A model built
    without split BatchNorm (evaluation, fine-tuning, export) takes the main ones; the auxiliary ones are left out."""
    if any(SPLIT_BN_KEY in k for k in model_sd):
        return sd
    aux = [k for k in sd if SPLIT_BN_KEY in k]
    if aux:
        _logger.info("%s: leaving out the %d tensors of its --split-bn auxiliary BatchNorms (the model has none; "
                     "the main BatchNorms are loaded)", source, len(aux))
        sd = OrderedDict((k, v) for k, v in sd.items() if SPLIT_BN_KEY not in k)
    return sd


def mismatch_message(source: str, arch: str, missing: Sequence[str], unexpected: Sequence[str],
                      shapes: Sequence[str]) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[0]})")
    return (f"checkpoint {source} does not match model {arch}: {'; '.join(parts)}; check the model name, "
            f"--num-classes and model options (--finetune starts from a checkpoint with another head)")


def resolve_checkpoint(path_or_ckpt: PathOrCheckpoint, trust: bool) -> Tuple[Any, str]:
    if isinstance(path_or_ckpt, (str, os.PathLike)):
        return load_checkpoint_file(path_or_ckpt, trust=trust), str(path_or_ckpt)
    return path_or_ckpt, _describe(path_or_ckpt)


def load_model_weights(model: nn.Module, path_or_ckpt: PathOrCheckpoint, use_ema: bool = False,
                       strict: bool = True, trust: bool = False, source: Optional[str] = None) -> LoadReport:
    """Load checkpoint weights into ``model`` (plain, normalization-wrapped, DDP or EMA-wrapped).

    The weights go into ``unwrap_model(model)``, the module checkpoints store. A checkpoint for
    another architecture or class count raises ``CheckpointError`` naming the first differences.
    With ``strict=False`` missing / unexpected keys are allowed (and reported), shape
    mismatches are not. The normalization layer is left alone: the recorded mean/std come back
    in ``LoadReport.normalization`` for the caller to use. ``source`` names an in-memory
    checkpoint in messages (its path, when the caller read the file itself).
    """
    ckpt, described = resolve_checkpoint(path_or_ckpt, trust)
    source = source or described
    sd, meta = extract_state_dict(ckpt, use_ema=use_ema, source=source)
    net = unwrap_model(model)
    sd = drop_split_bn(sd, net.state_dict(), source)
    missing, unexpected, shapes = compare_state_dicts(net.state_dict(), sd)
    if shapes or (strict and (missing or unexpected)):
        raise CheckpointError(mismatch_message(source, _arch_name(net), missing, unexpected, shapes))
    check_finite_state_dict(sd, source)  # NaN/inf weights evaluate to ~chance accuracy without a word
    net.load_state_dict(sd, strict=strict)
    return LoadReport(source=source, state_key=meta["state_key"], missing_keys=missing,
                      unexpected_keys=unexpected, normalization=meta.get("normalization"))


def _interpolate_pos_embed(net: nn.Module, sd: "OrderedDict[str, torch.Tensor]") -> None:
    """Resize a checkpoint's absolute position embedding to the model's token grid (DeiT recipe).

    Prefix (class / distillation) tokens are kept; the square grid of patch tokens is resized
    bicubically (align_corners=False). Models without a ``pos_embed`` tensor (XCiT computes its
    encoding) are left alone.
    """
    from timm.layers import resample_abs_pos_embed

    own = getattr(net, "pos_embed", None)
    if "pos_embed" not in sd or not isinstance(own, torch.Tensor):
        return
    old = sd["pos_embed"]
    if tuple(old.shape) == tuple(own.shape):
        return
    patch_embed = getattr(net, "patch_embed", None)
    num_patches = int(getattr(patch_embed, "num_patches", own.shape[-2]))
    num_extra = own.shape[-2] - num_patches
    grid = getattr(patch_embed, "grid_size", None)
    new_size = list(grid) if grid is not None else [int(math.sqrt(num_patches))] * 2
    old_grid = int(math.sqrt(old.shape[-2] - num_extra))
    if old_grid * old_grid != old.shape[-2] - num_extra:
        raise CheckpointError(f"cannot interpolate pos_embed of shape {_shape(old)}: its patch tokens do not "
                              f"form a square grid")
    sd["pos_embed"] = resample_abs_pos_embed(old, new_size=new_size, old_size=[old_grid, old_grid],
                                             num_prefix_tokens=num_extra, interpolation="bicubic",
                                             antialias=False, align_corners=False)
    _logger.info("interpolated pos_embed from %dx%d to %dx%d patches", old_grid, old_grid, *new_size)


def _classifier_keys(net: nn.Module) -> set:
    """DeiT's classifier parameter names plus the model's own (its ``pretrained_cfg['classifier']``)."""
    keys = set(CLASSIFIER_KEYS)
    classifier = (getattr(net, "pretrained_cfg", None) or {}).get("classifier")
    for name in ([classifier] if isinstance(classifier, str) else list(classifier or ())):
        keys.update({f"{name}.weight", f"{name}.bias"})
    return keys


def finetune_from_checkpoint(model: nn.Module, path_or_ckpt: PathOrCheckpoint, num_classes: Optional[int],
                             global_pool: Optional[str] = None, finetuning_patch_size: Optional[int] = None,
                             reinit_patch_embedding: bool = False, trust: bool = False,
                             use_ema: bool = False) -> LoadReport:
    """Start a fine-tuning run from a checkpoint of another task (``--finetune``, DeiT recipe).

    1. ``finetuning_patch_size``: when the model's patch size differs, ``adapt_model_patches`` is
       applied first (the original declared this flag but ignored it; the configs set it).
    2. ``model.reset_classifier(num_classes[, global_pool])`` gives a fresh head; classifier
       weights whose shape differs from it are dropped from the checkpoint.
    3. An absolute ``pos_embed`` is interpolated to the model's grid.
    4. ``reinit_patch_embedding`` keeps the model's fresh ``patch_embed.*`` weights (the original
       declared the flag and ignored it; by default they are loaded, i.e. "keep").
    5. Everything else is loaded non-strictly; one line always says how many tensors loaded and
       names the first ones newly initialised and ignored. Other shape mismatches, a checkpoint
       that covers less than ``FINETUNE_MIN_BACKBONE_FRACTION`` (half) of the model's non-classifier
       tensors (another architecture: the run would silently train from scratch) and NaN/inf
       weights raise ``CheckpointError``.
    """
    if num_classes is None:
        raise FinetuneArgumentError("fine-tuning needs the number of classes of the new task: pass --num-classes")
    ckpt, source = resolve_checkpoint(path_or_ckpt, trust)
    sd, meta = extract_state_dict(ckpt, use_ema=use_ema, source=source)
    net = unwrap_model(model)

    if finetuning_patch_size is not None:
        from .model_factory import set_patch_size

        set_patch_size(net, finetuning_patch_size, flag="--finetuning-patch-size", error=FinetuneArgumentError)

    if hasattr(net, "reset_classifier"):
        if global_pool is None:
            net.reset_classifier(num_classes)
        else:
            net.reset_classifier(num_classes, global_pool=global_pool)
    else:
        _logger.warning("%s has no reset_classifier(); its classifier is kept as built", _arch_name(net))

    model_sd = net.state_dict()
    sd = drop_split_bn(sd, model_sd, source)
    for key in sorted(_classifier_keys(net)):
        if key in sd and key in model_sd and tuple(sd[key].shape) != tuple(model_sd[key].shape):
            _logger.info("removing %s of shape %s from the checkpoint (model has %s)", key, _shape(sd[key]),
                         _shape(model_sd[key]))
            del sd[key]
    _interpolate_pos_embed(net, sd)
    if reinit_patch_embedding:
        dropped = [k for k in sd if k.startswith("patch_embed.")]
        for key in dropped:
            del sd[key]
        _logger.info("--reinit-patch-embedding: keeping the new patch embedding (%d tensors not loaded)", len(dropped))

    missing, unexpected, shapes = compare_state_dicts(model_sd, sd)
    if shapes:
        raise CheckpointError(mismatch_message(source, _arch_name(net), missing, unexpected, shapes))
    _check_backbone_loaded(net, model_sd, sd, source, missing, unexpected, reinit_patch_embedding)
    check_finite_state_dict(sd, source)
    net.load_state_dict(sd, strict=False)
    _report_finetune_load(source, meta["state_key"], len(sd) - len(unexpected), len(model_sd), missing, unexpected)
    return LoadReport(source=source, state_key=meta["state_key"], missing_keys=missing,
                      unexpected_keys=unexpected, normalization=meta.get("normalization"))


# At least this share of the model's backbone tensors (every tensor but the classifier's, the
# BatchNorm step counters and, with --reinit-patch-embedding, the patch embedding) must come from
# the --finetune checkpoint; below it the checkpoint is for another architecture and "fine-tuning"
# would silently train from scratch.
FINETUNE_MIN_BACKBONE_FRACTION = 0.5


def _first_names(names: Sequence[str], n: int = 5) -> str:
    if not names:
        return "none"
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def _check_backbone_loaded(net: nn.Module, model_sd: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor],
                           source: str, missing: Sequence[str], unexpected: Sequence[str],
                           reinit_patch_embedding: bool) -> None:
    """Refuse a fine-tuning checkpoint that covers less than half of the model's backbone tensors."""
    skip = _classifier_keys(net)
    backbone = [k for k in model_sd if k not in skip and not k.endswith("num_batches_tracked")
                and not (reinit_patch_embedding and k.startswith("patch_embed."))]
    if not backbone:
        return
    loaded = sum(1 for k in backbone if k in sd)
    if loaded >= FINETUNE_MIN_BACKBONE_FRACTION * len(backbone):
        return
    raise CheckpointError(
        f"--finetune checkpoint {source} loads only {loaded} of the {len(backbone)} backbone tensors of "
        f"{_arch_name(net)} (at least {FINETUNE_MIN_BACKBONE_FRACTION:.0%} must load); it was probably trained "
        f"with another architecture: model keys not in it: {_first_names(list(missing), 3)}; checkpoint keys the "
        f"model lacks: {_first_names(list(unexpected), 3)}; check --model")


def _report_finetune_load(source: str, state_key: str, loaded: int, total: int, missing: Sequence[str],
                          unexpected: Sequence[str]) -> None:
    """One visible line (the CLIs' logger) saying what the fine-tuning run starts from."""
    logging.getLogger("robust_vits").info(
        "fine-tuning from %s (%s): loaded %d of the model's %d tensors; newly initialised (%d): %s; ignored from "
        "the checkpoint (%d): %s", source, state_key, loaded, total, len(missing), _first_names(list(missing)),
        len(unexpected), _first_names(list(unexpected)))
