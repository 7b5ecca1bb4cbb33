"""What validate.py (and attack_effectiveness.py) evaluate: the model with its data config and
normalization mode, the evaluation data and loader, and the attack of one step count.

Normalization modes (original-behaviour §0.2): ``loader`` (the original's default: the loader
normalizes, so attacks run in normalized space with [0, 1] clipping -- semantically wrong, and
said so loudly), ``raw`` (``--no-normalize``: the model sees [0, 1] pixels) and ``model``
(``--normalize-model``: [0, 1] pixels, normalization inside the model with model_factory's
precedence: ``--mean/--std``, else the checkpoint's recorded mean/std, else the model's defaults).
A checkpoint that records how its network was trained (``src.eval_config``: every checkpoint
train.py and prepare_checkpoint.py write) is evaluated that way unless a flag says otherwise, and a
flag that contradicts the record is named in a warning.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from src import storage
from src.bits.device import DeviceEnv
from src.errors import UsageError, first_line
from src.honesty import PGD_ATTACKS

_logger = logging.getLogger("robust_vits")

__all__ = ["ValidLabels", "EvalModel", "create_eval_model", "create_eval_dataset", "create_eval_loader",
           "eval_batches", "build_eval_attack", "EVAL_SETTING_KEYS", "eval_settings"]

# validate.py's data, model, normalization and attack-budget flags that change the numbers: what the resumable
# studies (attack_effectiveness.py, attack_convergence.py) record, so a restart with other settings is refused
EVAL_SETTING_KEYS = ("model", "dataset", "split", "class_map", "valid_labels", "img_size", "input_size", "crop_pct",
                     "mean", "std", "interpolation", "gp", "test_pool", "patch_size", "num_classes", "no_normalize",
                     "normalize_model", "use_ema", "attack_eps", "attack_lr", "attack_norm", "attack_boundaries",
                     "amp", "amp_dtype")
# ... and those recorded only when set (files written before they were recorded lack them: a run at their
# default still matches those files)
_SET_ONLY_KEYS = ("data", "use_test_size")


def eval_settings(args: argparse.Namespace) -> Dict[str, Any]:
    """The values of :data:`EVAL_SETTING_KEYS` (None when absent), plus the data dir (absolute when local)
    and ``--use-test-size`` when they are set."""
    out = {k: getattr(args, k, None) for k in EVAL_SETTING_KEYS}
    for key in _SET_ONLY_KEYS:
        value = getattr(args, key, None)
        if value:
            out[key] = value
    if out.get("data"):
        import os

        data = str(out["data"])
        out["data"] = os.path.abspath(os.path.expanduser(data)) if storage.is_local(data) else data.rstrip("/")
    return out


class ValidLabels(nn.Module):
    """Restrict the model's logits to a subset of classes (``--valid-labels``).

    Inside the model, so clean accuracy, the attack's loss and robust accuracy all use the same
    restricted classifier (the original masked the clean logits only).
    """

    def __init__(self, model: nn.Module, valid: Sequence[int]):
        super().__init__()
        self.model = model
        self.register_buffer("valid", torch.as_tensor(list(valid), dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).index_select(-1, self.valid)


@dataclass
class EvalModel:
    """The model to evaluate and what was decided while building it."""
    model: nn.Module
    data_config: Dict[str, Any]
    normalization: str  # 'loader' | 'raw' | 'model'
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    num_classes: int
    param_count: float
    trained_inputs: Optional[str] = None  # 'raw' | 'normalized' | None (unknown), from the checkpoint
    notes: List[str] = field(default_factory=list)  # extra honesty warnings found while building
    model_name: str = ""  # the model evaluated (the flag's or the checkpoint's record)
    weights: str = ""  # which weights of the checkpoint were loaded ('model', 'model_ema', ...; '' for none)


def _build_network(args: argparse.Namespace, checkpoint: str):
    """The network with its weights and patch size; returns ``(model, LoadedCheckpoint | None, EvalSettings)``.

    The checkpoint is read first: what it records (model, classes, patch size, input size, ...)
    builds the network unless a given flag says otherwise (``src.eval_config``).
    """
    from src.checkpoint import load_checkpoint_file
    from src.eval_config import read_record, resolve_settings
    from src.model_factory import create_model, load_checkpoint, set_patch_size

    ckpt = load_checkpoint_file(checkpoint, trust=args.trust_checkpoint) if checkpoint else None
    record = read_record(ckpt, model_hint=args.model, path=checkpoint) if ckpt is not None else None
    settings = resolve_settings(args, record)
    size = settings.data_overrides.get("input_size")
    model = create_model(settings.model, pretrained=args.pretrained or not checkpoint,
                         scriptable=args.torchscript or None, num_classes=settings.num_classes, global_pool=args.gp,
                         in_chans=size[0] if size and size[0] != 3 else None, img_size=settings.img_size)
    loaded = None
    if checkpoint:
        loaded = load_checkpoint(model, checkpoint, use_ema=args.use_ema, trust=args.trust_checkpoint, ckpt=ckpt)
        _logger.info("loaded %s weights from %s", loaded.state_key, checkpoint)
    set_patch_size(model, settings.patch_size)
    return model, loaded, settings


_MODE_TEXT = {"model": "normalization inside the model", "raw": "raw [0, 1] inputs",
              "loader": "normalization in the loader"}
_MODE_FLAG = {"model": "--normalize-model", "raw": "--no-normalize"}


def _normalize_in_model(args: argparse.Namespace, model: nn.Module, data_config: Dict[str, Any], record: Any
                        ) -> Tuple[nn.Module, str, Tuple[float, ...], Tuple[float, ...], str, List[str]]:
    """The normalization mode and mean/std; returns ``(model, mode, mean, std, source, notes)``.

    Mode: ``--normalize-model`` / ``--no-normalize``, else what the checkpoint records, else the
    original's default (the loader normalizes). Mean/std (model_factory's precedence, per value):
    ``--mean/--std``, else the checkpoint's recorded values for that mode, else the model's.
    A flag that contradicts the record gives one warning naming both.
    """
    from src.model_factory import RecordedNormalization, resolve_normalization, wrap_normalization

    rec_mode = record.normalization if record is not None else None
    flag_mode = "model" if args.normalize_model else "raw" if args.no_normalize else None
    notes: List[str] = []
    if flag_mode and rec_mode and flag_mode != rec_mode:
        rec_values = f", mean {list(record.mean)} std {list(record.std)}" if record.mean and record.std else ""
        notes.append(f"{_MODE_FLAG[flag_mode]} overrides the checkpoint's record ({_MODE_TEXT[rec_mode]}{rec_values}; "
                     f"{record.source}): the network sees inputs it was not trained on")
    mode = flag_mode or rec_mode or "loader"
    defaults = (data_config["mean"], data_config["std"])
    if mode == "raw":
        if args.mean or args.std:
            notes.append("--mean/--std have no effect: the inputs are raw [0, 1] pixels (add --normalize-model to "
                         "normalize inside the model)")
        return model, "raw", tuple(defaults[0]), tuple(defaults[1]), _source(record, flag_mode), notes
    recorded = RecordedNormalization(record.mean, record.std, record.source) \
        if rec_mode == mode and record.mean and record.std else None
    mean, std, source = resolve_normalization(args.mean, args.std, recorded, defaults)
    if recorded is not None and (args.mean or args.std) and (mean, std) != (recorded.mean, recorded.std):
        notes.append(f"--mean/--std {list(mean)}/{list(std)} override the checkpoint's recorded normalization "
                     f"{list(recorded.mean)}/{list(recorded.std)} ({record.source}): the network sees inputs it was "
                     f"not trained on")
    if mode == "model":
        model = wrap_normalization(model, mean, std)
    return model, mode, mean, std, source, notes


def _source(record: Any, flag_mode: Optional[str]) -> str:
    if flag_mode is not None:
        return "the flags"
    return record.source if record is not None else "the flags and the model's defaults"


def create_eval_model(args: argparse.Namespace, dev_env: DeviceEnv, checkpoint: Optional[str] = None) -> EvalModel:
    """Build the model ``validate.py`` evaluates, in eval mode on ``dev_env``'s device.

    The checkpoint's record (``src.eval_config``) and the flags -> timm model (``pretrained`` forced
    without a checkpoint) -> weights (weights-only unless ``--trust-checkpoint``) -> patch size
    (no-op when equal); then data config (never timm's ``test_*`` fields unless
    ``--use-test-size``) -> ``--test-pool`` -> normalization -> ``--valid-labels`` -> device,
    channels-last, TorchScript. Parameters are frozen (``requires_grad=False``): attacks only need
    input gradients. One log line says what was resolved.
    """
    from timm.data import resolve_data_config

    from src.eval_config import describe
    from src.model_factory import patch_size_of, three

    checkpoint = args.checkpoint if checkpoint is None else checkpoint
    model, loaded, settings = _build_network(args, checkpoint)
    data_config = resolve_data_config(settings.data_overrides, model=model,
                                      use_test_size=bool(getattr(args, "use_test_size", False)), verbose=False)
    for key in ("mean", "std"):
        data_config[key] = three(data_config[key])
    if args.test_pool:
        from timm.layers import apply_test_time_pool

        model, test_time_pool = apply_test_time_pool(model, data_config, use_test_size=True)
        if test_time_pool:
            data_config["crop_pct"] = 1.0
    patch_size = patch_size_of(model)
    model, mode, mean, std, source, notes = _normalize_in_model(args, model, data_config, settings.record)
    notes = settings.notes + notes
    for note in notes[len(settings.notes):]:
        _logger.warning(note)
    if args.valid_labels:
        labels, outputs = _read_valid_labels(args.valid_labels), _num_outputs(model)
        past = [i for i in labels if not 0 <= i < outputs]
        if past:
            raise UsageError(f"--valid-labels file {args.valid_labels}: index {past[0]} is not one of the model's "
                             f"{outputs} classes (0..{outputs - 1})")
        model = ValidLabels(model, labels)
    num_classes = _num_outputs(model)
    _logger.info(describe(settings.model, num_classes, patch_size, data_config, mode, mean, std, source))
    param_count = sum(p.numel() for p in model.parameters())
    model.requires_grad_(False)
    if getattr(args, "fold_bn", False):
        from src.bn_fold import fold_for_evaluation

        fold_for_evaluation(model, data_config["input_size"])
    model = dev_env.to_model_device(model)
    model.eval()
    if args.torchscript:
        try:
            model = torch.jit.script(model)
        except Exception as e:  # noqa: BLE001 - scripting failures are many kinds of error
            raise UsageError(f"--torchscript: cannot script {settings.model} ({first_line(e)})") from None
    from src.sanity import probe_model_outputs

    probed = probe_model_outputs(model, data_config["input_size"], num_classes, dev_env.device, dev_env.autocast())
    for note in probed:  # outputs that are not logits: an error; randomized or probability outputs: notes
        _logger.warning(note)
    notes = notes + probed
    rec_mode = settings.record.normalization if settings.record is not None else None
    trained = {"raw": "raw", "model": "normalized", "loader": "normalized"}.get(rec_mode or "")
    if trained is None and loaded is not None:
        trained = loaded.trained_inputs
    return EvalModel(model=model, data_config=data_config, normalization=mode, mean=tuple(mean), std=tuple(std),
                     num_classes=num_classes, param_count=param_count, trained_inputs=trained, notes=notes,
                     model_name=settings.model, weights=loaded.state_key if loaded is not None else "")


def _read_valid_labels(path: str) -> List[int]:
    if not storage.exists(path):
        raise UsageError(f"--valid-labels file {path} does not exist")
    try:
        labels = [int(line) for line in storage.read_text(path).split() if line.strip()]
    except ValueError:
        raise UsageError(f"--valid-labels file {path} must hold one integer class index per line") from None
    if not labels:
        raise UsageError(f"--valid-labels file {path} is empty")
    repeated = sorted({i for i in labels if labels.count(i) > 1})
    if repeated:  # the dataset's label i is the i-th listed class: a repeat shifts every label after it
        raise UsageError(f"--valid-labels file {path} lists class {repeated[0]} more than once; list each model "
                         f"class once (the dataset's label i is the i-th listed class)")
    return labels


def _num_outputs(model: nn.Module) -> int:
    from src.utils import unwrap_model

    if isinstance(model, ValidLabels):
        return int(model.valid.numel())
    net = unwrap_model(model)
    n = getattr(net, "num_classes", None)
    if isinstance(n, int) and n > 0:
        return n
    raise UsageError(f"cannot tell how many classes {type(net).__name__} predicts; pass --num-classes")


def create_eval_dataset(args: argparse.Namespace):
    """The evaluation split through ``src.data.create_dataset`` (``--class-map``, downloads, image-folder checks)."""
    from src import data

    if args.data and str(args.dataset).lower() == "digits":
        # the embedded set reads no folder: a DIR here is a typo or a value meant for the flag before it
        # (``--attack-eps 2 4`` on a one-value flag leaves '4' as DIR)
        raise UsageError(f"--dataset {args.dataset} is embedded and takes no data dir, got DIR '{args.data}' (is it a "
                         f"value meant for the flag before it? that flag takes one value)")
    return data.create_dataset(args.dataset, args.data, args.split, is_training=False, batch_size=args.batch_size,
                               class_map=args.class_map or None, download=args.dataset_download)


def create_eval_loader(args: argparse.Namespace, em: EvalModel, dev_env: DeviceEnv, dataset: Any = None):
    """Eval transform (+ Normalize in 'loader' mode) and a loader over this process's shard."""
    from torchvision import transforms

    from src import data

    if dataset is None:
        dataset = create_eval_dataset(args)
    transform = data.build_eval_transform(em.data_config)
    if em.normalization == "loader":
        transform = transforms.Compose(list(transform.transforms) + [transforms.Normalize(em.mean, em.std)])
    data.set_transform(dataset, transform)
    data.check_three_channels(dataset, em.data_config["input_size"][0])
    ds_classes = data.dataset_num_classes(dataset)
    from src.image_folder import check_folder_class_count

    check_folder_class_count(dataset, em.num_classes, args.class_map)  # a missing class folder shifts labels
    if ds_classes is not None and ds_classes > em.num_classes and getattr(args, "valid_labels", None):
        raise UsageError(f"the dataset has {ds_classes} classes but --valid-labels {args.valid_labels} keeps "
                         f"{em.num_classes} of the model's outputs: the dataset's label i must be the i-th listed "
                         f"class, so list one model class per dataset class")
    if ds_classes is not None and ds_classes > em.num_classes:
        raise UsageError(f"the dataset has {ds_classes} classes but the model predicts {em.num_classes}; pass "
                         f"--num-classes {ds_classes} (with a checkpoint trained for them)")
    loader = data.create_loader(dataset, args.batch_size, is_training=False, world_size=dev_env.world_size,
                             rank=dev_env.global_rank, workers=args.workers, pin_memory=args.pin_mem, seed=args.seed)
    return dev_env.wrap_loader(loader, args.use_mp_loader)


def eval_batches(args: argparse.Namespace, loader: Any, dev_env: DeviceEnv) -> Optional[int]:
    """Batches per process for ``--num-examples`` (None: all): ``min(len, N // (batch x processes))``."""
    if args.num_examples is None:
        return None
    per_step = args.batch_size * dev_env.world_size
    n = args.num_examples // per_step
    if n == 0:
        raise UsageError(f"--num-examples {args.num_examples} is less than one full batch ({args.batch_size} x "
                         f"{dev_env.world_size} process(es)); lower --batch-size")
    return min(len(loader), n) if hasattr(loader, "__len__") else n


def build_eval_attack(args: argparse.Namespace, steps: int, num_classes: int, dev_env: DeviceEnv):
    """The evaluation attack for one step count (None without ``--attack``).

    PGD / targeted PGD: ``make_attack`` with the NLL-sum criterion, eps and ``--attack-lr`` in /255
    units, default step 1.5 * eps / steps. APGD-CE / AutoAttack: the pyautoattack adapter, seeded
    with ``--seed`` (reproducible; the original seeded it from the clock) and run per batch.
    """
    if not args.attack:
        return None
    dev_env.warn_unsuited_attack(args.attack)  # XLA: AutoAttack/APGD compile for a very long time
    from src.attacks import make_attack, resolve_attack_cfg

    ns = argparse.Namespace(attack=args.attack, attack_eps=args.attack_eps, attack_lr=args.attack_lr,
                            attack_steps=steps, attack_norm=args.attack_norm,
                            attack_boundaries=tuple(args.attack_boundaries))
    cfg = resolve_attack_cfg(ns, eval=False)  # keeps targeted_pgd targeted (eval=True would drop it)
    try:
        if args.attack in PGD_ATTACKS:
            return make_attack(cfg.name, cfg.eps, cfg.step_size, cfg.steps, cfg.norm, cfg.boundaries,
                               criterion=nn.NLLLoss(reduction="sum"), dev_env=dev_env, num_classes=num_classes)
        return make_attack(cfg.name, cfg.eps, cfg.step_size, cfg.steps, cfg.norm, cfg.boundaries,
                           criterion=nn.NLLLoss(reduction="sum"), device=dev_env.device, verbose=args.verbose,
                           seed=args.seed, batch_size=args.batch_size, num_classes=num_classes)
    except ValueError as e:
        raise UsageError(f"--attack {args.attack}: {e}") from None
