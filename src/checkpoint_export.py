"""Exporting checkpoints as releases: bare state dicts (``.pth.tar``) and ``.safetensors``, named as
the original's releases (``{model}-{dataset}[-eps-{eps}]``), each carrying its evaluation record.

Split from ``src/checkpoint.py`` (reading and checking checkpoints), which this module builds on.
"""
from __future__ import annotations

import json
import logging
import math
import os
import struct
from collections import OrderedDict
from typing import Any, Dict, Mapping, Optional, Union

import torch
from torch import nn

from . import storage
from .checkpoint import (EMA_KEYS, Normalization, PathOrCheckpoint, compare_state_dicts, drop_split_bn,
                         extract_state_dict, mismatch_message, resolve_checkpoint)
from .errors import CheckpointError
from .sanity import check_finite_state_dict

_logger = logging.getLogger("robust_vits")

__all__ = ["released_checkpoint_name", "save_released_checkpoint", "save_safetensors_checkpoint",
           "export_released_checkpoint"]

# --------------------------------------------------------------------------------------------
# released checkpoints (export)


def _format_eps(eps: Union[int, float, str]) -> str:
    value = float(eps)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"eps must be a non-negative number, got {eps}")
    return f"{value:g}"


def released_checkpoint_name(model_name: str, dataset: str, eps: Optional[Union[int, float, str]] = None) -> str:
    """``{model}-{dataset}[-eps-{eps}]`` (no extension): the original's release naming."""
    for what, value in (("model", model_name), ("dataset", dataset)):
        if not value or "/" in value or "\\" in value or value.startswith("."):
            raise ValueError(f"{what} name {value!r} cannot be used in a file name (no '/', not empty)")
    name = f"{model_name}-{dataset}"
    if eps is not None:
        name += f"-eps-{_format_eps(eps)}"
    return name


def _plain_state_dict(state_dict: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    # Own, contiguous CPU copies: no views into a larger training checkpoint, no shared storage
    # (safetensors refuses shared tensors).
    return OrderedDict((k, v.detach().to("cpu").contiguous().clone()) for k, v in state_dict.items())


def save_released_checkpoint(state_dict: Mapping[str, torch.Tensor], path: str,
                             record: Optional[Mapping[str, Any]] = None) -> None:
    """Write the released format: the bare unwrapped state dict, atomically; ``record`` (what
    evaluating it needs) rides in the state dict's ``_metadata``, which loaders ignore."""
    sd = _plain_state_dict(state_dict)
    if record is not None:
        from .eval_config import attach_to_state_dict

        attach_to_state_dict(sd, record)
    storage.torch_save(sd, path)


def save_safetensors_checkpoint(state_dict: Mapping[str, torch.Tensor], path: str,
                                normalization: Optional[Normalization] = None,
                                metadata: Optional[Mapping[str, Any]] = None) -> None:
    """Write ``state_dict`` as safetensors; mean/std and other facts go in its string metadata."""
    from safetensors.torch import save as st_save

    md = {str(k): str(v) for k, v in (metadata or {}).items() if v is not None}
    md["format"] = "pt"
    if normalization is not None:
        md["mean"] = json.dumps(list(normalization[0]))
        md["std"] = json.dumps(list(normalization[1]))
    storage.atomic_write_bytes(path, st_save(dict(_plain_state_dict(state_dict)), metadata=md))


def _architecture(model_name: str, state_dict: Mapping[str, torch.Tensor], source: str, verify: bool,
                  img_size: Optional[int] = None) -> nn.Module:
    """The network ``model_name`` as the weights describe it (class count from the classifier), built on
    the meta device (no memory, no compute); with ``verify`` the weights must fit it exactly, so a
    checkpoint is never released under the wrong architecture name."""
    import timm

    from . import models  # noqa: F401 - registers the project's models

    if not timm.is_model(model_name):
        raise ValueError(f"unknown model '{model_name}' (not in timm's registry, nor a robust-vits model)")
    kwargs: Dict[str, Any] = {}
    if img_size is not None:  # models with position embeddings are built for their input size
        from .model_factory import accepted_options

        if accepted_options(model_name, {"img_size": img_size})["img_size"]:
            kwargs["img_size"] = img_size
    with torch.device("meta"):
        net = timm.create_model(model_name, **kwargs)
        classifier = (getattr(net, "pretrained_cfg", None) or {}).get("classifier")
        classifier = classifier[0] if isinstance(classifier, (tuple, list)) else classifier
        if classifier and f"{classifier}.weight" in state_dict:
            net = timm.create_model(model_name, num_classes=int(state_dict[f"{classifier}.weight"].shape[0]), **kwargs)
    if verify:
        missing, unexpected, shapes = compare_state_dicts(net.state_dict(), state_dict)
        if missing or unexpected or shapes:
            raise CheckpointError(mismatch_message(source, model_name, missing, unexpected, shapes))
    return net


# class counts of the datasets a release is commonly named after (the name goes into the file name and the
# .safetensors metadata, which RobustBench-style users read as "trained on"); spelled without '-' / '_'
DATASET_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet": 1000, "imagenet1k": 1000, "ilsvrc2012": 1000,
                   "svhn": 10, "mnist": 10, "stl10": 10, "oxfordflowers102": 102, "flowers102": 102,
                   "oxfordiiitpet": 37, "tinyimagenet": 200}


def _check_dataset_name(dataset: str, record: Mapping[str, Any]) -> None:
    """A release named after a known dataset must have that dataset's class count (a 10-class model exported
    as ``-imagenet`` would be described as an ImageNet model by its file name and metadata)."""
    from .errors import UsageError

    key = dataset.lower().replace("-", "").replace("_", "")
    expected, classes = DATASET_CLASSES.get(key), record.get("num_classes")
    if expected is not None and isinstance(classes, int) and classes != expected:
        raise UsageError(f"--dataset {dataset} has {expected} classes, but the model has {classes}: name the "
                         f"dataset it was trained on (the name goes into the file name and the metadata)")


def _is_our_release(safetensors_path: str) -> bool:
    """True for a ``.safetensors`` file this exporter wrote (its header metadata holds ``arch`` and
    ``eval_config``); reads only the header."""
    try:
        with storage.open_file(safetensors_path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if not 0 < length <= 1 << 26:
                return False
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error, UnicodeDecodeError):
        return False
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(meta, dict) and {"arch", "eval_config"} <= set(meta)


def _check_replaceable(paths: Mapping[str, str]) -> None:
    """Existing targets are replaced only when they are an earlier export of this tool (its ``.safetensors``
    twin says so): a file of the same name that is anything else (a training checkpoint, a download) is kept."""
    from .errors import UsageError

    existing = [p for p in paths.values() if storage.exists(p)]
    if not existing:
        return
    if not _is_our_release(paths["safetensors"]):
        raise UsageError(f"--output-dir: {existing[0]} exists and is not a release prepare_checkpoint.py wrote; it "
                         f"is not replaced: choose another --output-dir, or move it away")
    _logger.warning("replacing the earlier export %s", " and ".join(existing))


def _check_record_fits(record: Mapping[str, Any], net: nn.Module, source: str, verify: bool, recorded: Any,
                       overrides: Mapping[str, Any]) -> None:
    """The record must describe these weights: a release whose record contradicts them fails (or, for a patch
    size, evaluates wrongly without a word) in every evaluation CLI later, far from the flag that caused it.

    The class count is checked against the network built from the weights (``verify``: it fits them exactly);
    the patch size must be one the network's stem can take (``set_patch_size``'s rules)."""
    from .errors import UsageError
    from .model_factory import patch_size_of, set_patch_size

    classes = getattr(net, "num_classes", None)
    if verify and isinstance(classes, int) and record.get("num_classes") not in (None, classes):
        where = "--num-classes" if overrides.get("num_classes") is not None else \
            (recorded.source if recorded is not None else "the record")
        raise UsageError(f"checkpoint {source} has a {classes}-class classifier, but {where} says "
                         f"{record['num_classes']} classes: pass --num-classes {classes} (or leave it out)")
    patch = record.get("patch_size")
    if patch is not None and patch != patch_size_of(net):
        set_patch_size(net, patch, flag="--patch-size", error=UsageError)  # refuses models without such a stem


def export_released_checkpoint(checkpoint: PathOrCheckpoint, model_name: str, dataset: str, output_dir: str,
                               eps: Optional[Union[int, float, str]] = None, use_ema: bool = False,
                               trust: bool = False, verify: bool = True,
                               eval_overrides: Optional[Mapping[str, Any]] = None) -> Dict[str, str]:
    """Turn a training checkpoint (or a downloaded original release) into self-describing released files;
    returns ``{'pth': path, 'safetensors': path}``.

    ``{output_dir}/{model}-{dataset}[-eps-{eps}].pth.tar`` holds the bare unwrapped state dict (the
    original's release format, loadable by timm and RobustBench-style code) whose ``_metadata``
    carries the evaluation record (``src.eval_config``); the ``.safetensors`` twin carries the same
    tensors, the record as JSON and arch, dataset, eps, which weights, mean/std. The record comes
    from the checkpoint (``eval_config``, or the original's ``hparams``), with ``eval_overrides``
    (prepare_checkpoint's flags) on top; what cannot be inferred is asked for (``UsageError``).
    """
    from .eval_config import complete_record, read_record
    from .models import MODEL_ALIASES

    model_name = MODEL_ALIASES.get(model_name, model_name)  # README spellings -> registered names
    stem = storage.join(output_dir, released_checkpoint_name(model_name, dataset, eps))  # bad names fail first
    paths = {"pth": stem + ".pth.tar", "safetensors": stem + ".safetensors"}
    # both targets before reading anything: never the input itself, never one file written and the other not
    source_path = [str(checkpoint)] if isinstance(checkpoint, (str, os.PathLike)) else []
    for path in paths.values():
        storage.check_output_file(path, "--output-dir", inputs=source_path, create=False)
    _check_replaceable(paths)
    ckpt, source = resolve_checkpoint(checkpoint, trust)
    state_dict, meta = extract_state_dict(ckpt, use_ema=use_ema, source=source)
    if use_ema and meta["state_key"] not in EMA_KEYS:
        raise CheckpointError(f"checkpoint {source} has no EMA weights (model_ema is missing or None); "
                              f"export without --use-ema")
    check_finite_state_dict(state_dict, source)
    state_dict = drop_split_bn(state_dict, {}, source)  # a released model has plain BatchNorms
    recorded = read_record(ckpt, model_hint=model_name, path=source)
    size = (eval_overrides or {}).get("input_size") or (recorded.input_size if recorded is not None else None)
    net = _architecture(model_name, state_dict, source, verify, img_size=size[-1] if size else None)
    arch = ckpt.get("arch") if isinstance(ckpt, Mapping) else None
    if isinstance(arch, str) and arch != model_name:
        _logger.warning("checkpoint %s was trained as '%s' and is exported as '%s'", source, arch, model_name)
    record = complete_record(recorded, model_name, net, eval_overrides)
    _check_record_fits(record, net, source, verify, recorded, eval_overrides or {})
    _check_dataset_name(dataset, record)
    _logger.info("evaluation record: %s", json.dumps(record))

    storage.check_output_folder(output_dir, "--output-dir")  # everything checked: create it now

    save_released_checkpoint(state_dict, paths["pth"], record=record)
    metadata = {"arch": model_name, "dataset": dataset, "eps": None if eps is None else _format_eps(eps),
                "weights": meta["state_key"], "eval_config": json.dumps(record)}
    normalization = (record["mean"], record["std"]) if record["normalization"] == "model" else None
    save_safetensors_checkpoint(state_dict, paths["safetensors"], normalization=normalization, metadata=metadata)
    return paths
