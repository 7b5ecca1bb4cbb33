"""What validate.py (and attack_effectiveness.py) evaluate: the model with its data config and
normalization mode, the evaluation data and loader, and the attack of one step count.

Normalization modes (original-behaviour §0.2): ``loader`` (default, the original's: the loader
normalizes, so attacks run in normalized space with [0, 1] clipping -- semantically wrong, and
said so loudly), ``raw`` (``--no-normalize``: the model sees [0, 1] pixels) and ``model``
(``--normalize-model``: [0, 1] pixels, normalization inside the model with model_factory's
precedence: ``--mean/--std``, else the checkpoint's recorded mean/std, else the model's defaults).
A checkpoint that records its normalization (``--normalize-model`` training runs) is always
evaluated with that normalization inside the model, whatever the mode: its network was trained
that way.
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
           "eval_batches", "build_eval_attack"]


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


def _build_network(args: argparse.Namespace, checkpoint: str):
    """The network with its weights and ``--patch-size`` applied; returns ``(model, LoadedCheckpoint | None)``."""
    from src.model_factory import create_model, load_checkpoint, set_patch_size

    model = create_model(args.model, pretrained=args.pretrained or not checkpoint,
                         scriptable=args.torchscript or None, num_classes=args.num_classes, global_pool=args.gp,
                         in_chans=args.input_size[0] if args.input_size else None,
                         img_size=args.img_size or (args.input_size[-1] if args.input_size else None))
    loaded = None
    if checkpoint:
        loaded = load_checkpoint(model, checkpoint, use_ema=args.use_ema, trust=args.trust_checkpoint)
        _logger.info("loaded %s weights from %s", loaded.state_key, checkpoint)
    set_patch_size(model, args.patch_size)
    return model, loaded


def _normalize_in_model(args: argparse.Namespace, model: nn.Module, data_config: Dict[str, Any], loaded: Any
                        ) -> Tuple[nn.Module, str, Tuple[float, ...], Tuple[float, ...], List[str]]:
    """The normalization mode and mean/std (model_factory's precedence); returns the wrapped model.

    Normalization goes inside the model with ``--normalize-model`` and whenever the checkpoint
    records one (its network was trained behind it); else the loader normalizes, or nothing does
    (``--no-normalize``).
    """
    from src.model_factory import resolve_normalization, wrap_normalization

    recorded = loaded.normalization if loaded is not None else None
    defaults = (data_config["mean"], data_config["std"])
    if not (args.normalize_model or recorded is not None):
        if args.no_normalize:
            _logger.info("raw [0, 1] inputs (--no-normalize)")
        else:
            _logger.info("the loader normalizes inputs with mean %s std %s", *defaults)
        return model, "raw" if args.no_normalize else "loader", tuple(defaults[0]), tuple(defaults[1]), []
    mean, std, source = resolve_normalization(args.mean, args.std, recorded, defaults)
    notes = []
    if recorded is not None and (args.mean or args.std):
        rec_mean, rec_std, _ = resolve_normalization(None, None, recorded, defaults)
        if (mean, std) != (rec_mean, rec_std):
            notes.append(f"--mean/--std {mean}/{std} differ from the normalization the checkpoint was trained "
                         f"with ({rec_mean}/{rec_std}): the model sees inputs it was not trained on")
    if recorded is not None and not args.normalize_model:
        _logger.info("the checkpoint was trained with normalization inside the model: evaluating it the same way "
                     "(--normalize-model implied)")
    _logger.info("normalizing inside the model with mean %s std %s (%s); inputs are [0, 1] pixels", mean, std,
                 source)
    return wrap_normalization(model, mean, std), "model", mean, std, notes


def create_eval_model(args: argparse.Namespace, dev_env: DeviceEnv, checkpoint: Optional[str] = None) -> EvalModel:
    """Build the model ``validate.py`` evaluates, in eval mode on ``dev_env``'s device.

    model_factory: timm model (``pretrained`` forced without a checkpoint) -> checkpoint weights
    (weights-only unless ``--trust-checkpoint``) -> ``--patch-size`` (no-op when equal); then data
    config -> ``--test-pool`` -> normalization -> ``--valid-labels`` -> device, channels-last,
    TorchScript. Parameters are frozen (``requires_grad=False``): attacks only need input gradients.
    """
    from timm.data import resolve_data_config

    from src.model_factory import three

    checkpoint = args.checkpoint if checkpoint is None else checkpoint
    model, loaded = _build_network(args, checkpoint)
    data_config = resolve_data_config(vars(args), model=model, use_test_size=True, verbose=False)
    for key in ("mean", "std"):
        data_config[key] = three(data_config[key])
    if args.test_pool:
        from timm.layers import apply_test_time_pool

        model, test_time_pool = apply_test_time_pool(model, data_config, use_test_size=True)
        if test_time_pool:
            data_config["crop_pct"] = 1.0
    model, mode, mean, std, notes = _normalize_in_model(args, model, data_config, loaded)
    if args.valid_labels:
        model = ValidLabels(model, _read_valid_labels(args.valid_labels))
    num_classes = _num_outputs(model)
    param_count = sum(p.numel() for p in model.parameters())
    model.requires_grad_(False)
    model = dev_env.to_model_device(model)
    model.eval()
    if args.torchscript:
        try:
            model = torch.jit.script(model)
        except Exception as e:  # noqa: BLE001 - scripting failures are many kinds of error
            raise UsageError(f"--torchscript: cannot script {args.model} ({first_line(e)})") from None
    return EvalModel(model=model, data_config=data_config, normalization=mode, mean=tuple(mean), std=tuple(std),
                     num_classes=num_classes, param_count=param_count,
                     trained_inputs=loaded.trained_inputs if loaded is not None else None, notes=notes)


def _read_valid_labels(path: str) -> List[int]:
    if not storage.exists(path):
        raise UsageError(f"--valid-labels file {path} does not exist")
    try:
        labels = [int(line) for line in storage.read_text(path).split() if line.strip()]
    except ValueError:
        raise UsageError(f"--valid-labels file {path} must hold one integer class index per line") from None
    if not labels:
        raise UsageError(f"--valid-labels file {path} is empty")
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
    if ds_classes is not None and ds_classes > em.num_classes:
        raise UsageError(f"the dataset has {ds_classes} classes but the model predicts {em.num_classes}; pass "
                         f"--num-classes {ds_classes} (with a checkpoint trained for them)")
    loader = data.create_loader(dataset, args.batch_size, is_training=False, world_size=dev_env.world_size,
                             rank=dev_env.global_rank, workers=args.workers, pin_memory=args.pin_mem, seed=args.seed)
    if args.use_mp_loader and dev_env.type == "xla":
        import torch_xla.distributed.parallel_loader as pl  # type: ignore

        loader = pl.MpDeviceLoader(loader, dev_env.device)
    return loader


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
                           seed=args.seed, batch_size=args.batch_size)
    except ValueError as e:
        raise UsageError(f"--attack {args.attack}: {e}") from None
