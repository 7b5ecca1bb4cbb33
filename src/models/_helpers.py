"""Helpers shared by the robust-vits model files."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch.nn as nn
from timm.layers import create_classifier
from timm.models._builder import resolve_pretrained_cfg

__all__ = ["check_pretrained_available", "replace_classifier"]


def replace_classifier(model: nn.Module, attr: str, num_classes: int, global_pool: Optional[str] = None) -> None:
    """``reset_classifier`` for models whose forward uses ``model.<attr>`` after ``model.global_pool``.

    Builds a new pool + linear head for ``num_classes`` on the device of the model's parameters
    (the original's WRN / PreAct versions set an unused ``head`` attribute instead).
    """
    model.num_classes = num_classes
    pool_type = global_pool if global_pool is not None else model.global_pool.pool_type
    device = next(model.parameters()).device
    model.global_pool, head = create_classifier(model.num_features, num_classes, pool_type=pool_type)
    setattr(model, attr, head.to(device))


def check_pretrained_available(variant: str, pretrained: bool, kwargs: Dict[str, Any]) -> None:
    """Fail fast when ``pretrained=True`` is asked of a model that has no weights to download.

    timm would log a warning and silently return a randomly initialised network, which for an
    evaluation means a meaningless number. None of the models defined here ship weights; weights
    come from checkpoints (``--initial-checkpoint``, ``--finetune``, ``validate.py --checkpoint``)
    or an explicit ``pretrained_cfg_overlay=dict(file=...)``, which this check honours.
    """
    if not pretrained:
        return
    cfg = resolve_pretrained_cfg(
        variant,
        pretrained_cfg=kwargs.get("pretrained_cfg"),
        pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay"),
    )
    if cfg.has_weights or getattr(cfg, "state_dict", None) is not None:
        return
    raise ValueError(
        f"no pretrained weights exist for model '{variant}': create it with pretrained=False and load a "
        f"checkpoint (--initial-checkpoint / --finetune / --checkpoint), or pass "
        f"pretrained_cfg_overlay=dict(file='path/to/weights')")
