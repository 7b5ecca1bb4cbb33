"""Other architectures of the paper's ablations, built from timm's own classes.

* ``cait_s12_224``: a 12-layer CaiT-S (timm ships S24/S36) with LayerScale initialised to 1.0,
  matching the XCiT-S12 it is compared with.
* ``poolformer_m12``: a 12-block PoolFormer with the M widths (96, 192, 384, 768); timm ships
  only S12/S24/S36/M36/M48. Built from timm's MetaFormer exactly like its ``poolformer_*``
  models, with PoolFormer's default LayerScale init (1e-5).
"""
from __future__ import annotations

from typing import Any, Dict

from torch import nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import GroupNorm1
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models import cait as _timm_cait
from timm.models import metaformer as _timm_metaformer
from timm.models.cait import Cait
from timm.models.metaformer import MetaFormer

from ._helpers import check_pretrained_available

__all__ = ["Cait", "MetaFormer"]


def _create_cait(variant: str, pretrained: bool = False, **kwargs: Any) -> Cait:
    check_pretrained_available(variant, pretrained, kwargs)
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        Cait, variant, pretrained,
        pretrained_filter_fn=_timm_cait.checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _create_poolformer(variant: str, pretrained: bool = False, **kwargs: Any) -> MetaFormer:
    check_pretrained_available(variant, pretrained, kwargs)
    default_out_indices = tuple(range(len(kwargs.get("depths", (2, 2, 6, 2)))))
    out_indices = kwargs.pop("out_indices", default_out_indices)
    return build_model_with_cfg(
        MetaFormer, variant, pretrained,
        pretrained_filter_fn=_timm_metaformer.checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **kwargs,
    )


def _cait_cfg(url: str = "", **kwargs: Any) -> Dict[str, Any]:
    return {
        "url": url,
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": 1.0, "interpolation": "bicubic", "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head",
        **kwargs,
    }


def _poolformer_cfg(url: str = "", **kwargs: Any) -> Dict[str, Any]:
    return {
        "url": url,
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.95, "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.conv", "classifier": "head.fc",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "cait_s12_224": _cait_cfg(),
    "poolformer_m12": _poolformer_cfg(),
})


@register_model
def cait_s12_224(pretrained: bool = False, **kwargs: Any) -> Cait:
    """CaiT-S12: patch 16, dim 384, 12 layers, 8 heads, LayerScale init 1.0."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=8, init_values=1.0)
    return _create_cait("cait_s12_224", pretrained, **dict(model_args, **kwargs))


@register_model
def poolformer_m12(pretrained: bool = False, **kwargs: Any) -> MetaFormer:
    """PoolFormer-M12: stages (2, 2, 6, 2), widths (96, 192, 384, 768)."""
    model_args = dict(
        depths=(2, 2, 6, 2),
        dims=(96, 192, 384, 768),
        downsample_norm=None,
        mlp_act=nn.GELU,
        mlp_bias=True,
        norm_layers=GroupNorm1,
        layer_scale_init_values=1e-5,
        res_scale_init_values=None,
        use_mlp_head=False,
    )
    return _create_poolformer("poolformer_m12", pretrained, **dict(model_args, **kwargs))
