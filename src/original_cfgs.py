"""The evaluation data configs the original's timm gave the plain timm models the paper evaluates.

The original pinned timm at commit ``dff3373`` of the ``bits_and_tpu`` branch (early 2022, the
0.5/0.6 era). Its model ``default_cfgs`` had no ``test_input_size`` / ``test_crop_pct`` and some
of its values differ from the pretrained tags timm 1.0.31 resolves today: ``convnext_tiny`` now
resolves to the ``in12k_ft_in1k`` tag (crop 0.95, test size 288 at crop 1.0) where the original
used 224 px at crop 0.875. A released checkpoint of the original is a bare state dict that says
nothing about its preprocessing, so evaluation of such a file uses this table (unless flags or
the file's own record say otherwise).

Sources (values, not code): timm's ``convnext.py`` ``_cfg`` of the 0.5/0.6 releases (224 px, crop
0.875, bicubic, ImageNet mean/std); timm's ``resnet.py`` ``resnet50`` cfg of the same releases
(the ResNet-strikes-back A1 weights: 224 px, crop 0.95, bicubic), which the original's
``resnet50_gelu`` inherited (original-behaviour.md §3.1); timm's ``xcit.py`` ``_cfg`` (224 px, crop
1.0, bicubic; unchanged in 1.0.31). The robust-vits models (``src.models``) carry the original's
cfgs themselves and need no entry.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

__all__ = ["ORIGINAL_DATA_CONFIGS", "original_data_config"]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _cfg(crop_pct: float, interpolation: str = "bicubic", size: int = 224) -> Dict[str, Any]:
    return {"input_size": (3, size, size), "crop_pct": crop_pct, "interpolation": interpolation,
            "mean": _IMAGENET_MEAN, "std": _IMAGENET_STD}


# model name -> data config of the original's timm (input_size, crop_pct, interpolation, mean, std)
ORIGINAL_DATA_CONFIGS: Dict[str, Dict[str, Any]] = {
    "convnext_tiny": _cfg(0.875),           # ImageNet eps 4 / eps 8 releases
    "resnet50": _cfg(0.95),                 # Oxford Flowers / Caltech101 releases (evaluated at 224)
    "xcit_small_12_p16_224": _cfg(1.0),     # ImageNet, Flowers, Caltech101 releases
    "xcit_nano_12_p16_224": _cfg(1.0),      # the paper's ablations
}


def original_data_config(model_name: Optional[str]) -> Optional[Dict[str, Any]]:
    """The original's data config of ``model_name`` (a copy), or None when the table has no entry."""
    if not model_name:
        return None
    cfg = ORIGINAL_DATA_CONFIGS.get(model_name.split(".")[0])
    return dict(cfg) if cfg is not None else None
