"""Adversarial examples and perturbations of a built TFDS dataset, for the imagenet_advex and
imagenet_perturbations builders.

Both builders attack the RobustBench ImageNet subset (``tfds/robustbench_image_net``, built into the
same data dir) with this project's PGD (``src.attacks.make_attack``) against a model made through
timm's registry (this project's models included) and stored in the images' [0, 1] pixel space:
normalization, when a model needs it, is a layer inside the model, so eps is always in pixels and
what is stored is always an image (the original stored normalized tensors for its ResNet configs).

Checkpoints named in a config are looked up in the build's manual dir unless they are absolute
paths or URLs (``gs://...`` works through fsspec).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
from typing import Dict, Iterator, Optional, Tuple

if "tensorflow" in sys.modules and "torch" not in sys.modules:
    # TensorFlow is already loaded: TFDS's own ``tfds build`` imports it before the builder module. Loading
    # triton's libtriton after it segfaults, and importing torchvision / timm loads triton; eager PyTorch does
    # not need it (torch treats a blocked import as "triton not installed"), so keep it out of this process.
    sys.modules.setdefault("triton", None)

import numpy as np
import timm  # noqa: F401  (torch / torchvision / timm before tensorflow, or the process segfaults)
import torch
import torch.nn as nn
import torchvision  # noqa: F401
import tensorflow_datasets as tfds  # noqa: E402

_logger = logging.getLogger("robust_vits")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ROBUST_RESNET50 = "advres50_gelu.pth"  # Bai et al.'s adversarially trained GELU ResNet-50 (EightBN)
ROBUST_XCIT_S12 = "xcit_small_12_p16_224-imagenet-eps-4.pth.tar"  # the paper's XCiT-S12, eps 4/255


@dataclasses.dataclass(eq=False)
class AdversarialConfig(tfds.core.BuilderConfig):
    """What to attack and how. ``eps`` is in [0, 1] pixel units; step size is 1.5 * eps / steps.

    ``mean``/``std`` wrap the model in a normalization layer (a checkpoint written with
    ``--normalize-model`` brings its own and wins); ``crop_pct``/``interpolation`` of None take the
    model's default data config.
    """

    model: str = ""
    checkpoint: str = ""
    pretrained: bool = False
    eps: float = 4 / 255
    steps: int = 1
    mean: Optional[Tuple[float, float, float]] = None
    std: Optional[Tuple[float, float, float]] = None
    crop_pct: Optional[float] = None
    interpolation: Optional[str] = None
    num_classes: int = 1000
    source: str = "robustbench_image_net"
    source_split: str = "validation"
    batch_size: int = 128
    seed: int = 0


def resolve_checkpoint(checkpoint: str, manual_dir: Optional[str]) -> str:
    """A config's checkpoint as a path: absolute paths and URLs as given, names inside ``manual_dir``."""
    if not checkpoint or "://" in checkpoint or os.path.isabs(checkpoint):
        return checkpoint
    if not manual_dir:
        raise FileNotFoundError(f"checkpoint {checkpoint} is looked up in the manual dir; pass --manual_dir")
    return os.path.join(str(manual_dir), checkpoint)


def build_attacked_model(cfg: AdversarialConfig, manual_dir: Optional[str]) -> Tuple[nn.Module, Dict]:
    """The model in eval mode taking [0, 1] images, and its eval data config."""
    import timm
    from timm.data import resolve_data_config

    import src.models  # noqa: F401  (registers this project's models)
    from src import storage
    from src.checkpoint import load_model_weights
    from src.utils import normalize_model

    model = timm.create_model(cfg.model, pretrained=cfg.pretrained, num_classes=cfg.num_classes)
    data_config = resolve_data_config({}, model=model)
    for key in ("crop_pct", "interpolation"):
        if getattr(cfg, key) is not None:
            data_config[key] = getattr(cfg, key)
    mean_std = (cfg.mean, cfg.std) if cfg.mean is not None else None
    path = resolve_checkpoint(cfg.checkpoint, manual_dir)
    if path:
        if not storage.exists(path):
            raise FileNotFoundError(f"{cfg.name}: checkpoint {path} not found (put {cfg.checkpoint} in the manual dir)")
        report = load_model_weights(model, path)
        mean_std = report.normalization or mean_std
    if mean_std is not None:
        model = normalize_model(model, mean_std[0], mean_std[1])
    return model.eval(), data_config


def attacked_batches(cfg: AdversarialConfig, data_dir: str, manual_dir: Optional[str]
                     ) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(x, x_adv, y) batches of the source split, x and x_adv in [0, 1], in the source's order."""
    from src.data import build_eval_transform, create_dataset, create_loader, set_transform
    from src.attacks import make_attack

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, data_config = build_attacked_model(cfg, manual_dir)
    model = model.to(device)
    dataset = create_dataset(f"tfds/{cfg.source}", str(data_dir), cfg.source_split, is_training=False,
                             batch_size=cfg.batch_size)
    set_transform(dataset, build_eval_transform(data_config))
    loader = create_loader(dataset, cfg.batch_size, is_training=False)
    attack = make_attack("pgd", cfg.eps, 1.5 * cfg.eps / cfg.steps, cfg.steps, "linf", (0, 1),
                         criterion=nn.NLLLoss(reduction="sum"), num_classes=cfg.num_classes)
    torch.manual_seed(cfg.seed)
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        x_adv = attack(model, x, y)
        yield x.cpu(), x_adv.cpu(), y.cpu()


def to_uint8_hwc(batch: torch.Tensor) -> np.ndarray:
    """[0, 1] NCHW floats as NHWC uint8 (rounded to the nearest level)."""
    return (batch.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def perturbation_image(x: torch.Tensor, x_adv: torch.Tensor, eps: float) -> torch.Tensor:
    """``(x - x_adv + eps) / (2 eps)``: the perturbation mapped to [0, 1] (the original's sign)."""
    return (x - x_adv + eps) / (2 * eps)


def generate(cfg: AdversarialConfig, data_dir: str, manual_dir: Optional[str], perturbations: bool
             ) -> Iterator[Tuple[int, Dict]]:
    """The builders' examples: key = running index, ``image`` = adversarial image or perturbation."""
    index = 0
    for x, x_adv, y in attacked_batches(cfg, data_dir, manual_dir):
        images = perturbation_image(x, x_adv, cfg.eps) if perturbations else x_adv
        for img, label in zip(to_uint8_hwc(images), y.tolist()):
            yield index, {"image": img, "label": int(label)}
            index += 1
    _logger.info("%s: attacked %d images", cfg.name, index)


def image_label_features(num_classes: int = 1000) -> tfds.features.FeaturesDict:
    """``image`` (PNG, lossless) and ``label`` with ImageNet's class names when there are 1000 classes."""
    if num_classes == 1000:
        from src.tfds_imagenet import imagenet_label_names

        label = tfds.features.ClassLabel(names=imagenet_label_names())
    else:
        label = tfds.features.ClassLabel(num_classes=num_classes)
    return tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(None, None, 3)), "label": label})
