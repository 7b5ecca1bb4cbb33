"""ResNet variants of the paper, built from timm's ``ResNet``.

* ``resnet{18,50,152}_gelu``: GELU everywhere (stem and blocks). The paper's ImageNet CNN
  baseline is the GELU ResNet-50, following "Are Transformers More Robust Than CNNs?".
* ``resnet50_32``: ResNet-50 with a CIFAR stem (3x3 stride-1 first convolution, no max-pool),
  so a 32x32 image keeps a 4x4 map before pooling.
* ``resnext152_32x8d``: a SiLU ResNeXt, added to compare with arXiv:2006.14536. Its stage depths
  are the original's ``[3, 4, 36, 3]`` (kept for checkpoint compatibility; the canonical
  ResNeXt-152 uses ``[3, 8, 36, 3]``).

No weights are published for these variants; ``pretrained=True`` raises instead of silently
returning a random network.
"""
from __future__ import annotations

from typing import Any, Dict

from torch import nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._registry import register_model_deprecations
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from ._helpers import check_pretrained_available

__all__ = ["ResNet"]


def _build_cifar_stem_resnet(**kwargs: Any) -> ResNet:
    """timm ResNet whose stem is a fresh 3x3 stride-1 convolution and no max-pool.

    Building the network and then swapping the stem (as the original did) keeps timm's ResNet
    untouched; the swap happens inside ``build_model_with_cfg`` so feature extraction and weight
    loading see the final architecture.
    """
    model = ResNet(**kwargs)
    dd = {k: kwargs[k] for k in ("device", "dtype") if kwargs.get(k) is not None}
    model.conv1 = nn.Conv2d(kwargs.get("in_chans", 3), 64, kernel_size=3, stride=1, padding=1, bias=False, **dd)
    model.maxpool = nn.Identity()
    # The stem no longer downsamples (it was /4): keep the feature metadata truthful.
    model.feature_info = [dict(info, reduction=max(1, info["reduction"] // 4)) for info in model.feature_info]
    return model


def _create_resnet(variant: str, pretrained: bool = False, cifar_stem: bool = False, **kwargs: Any) -> ResNet:
    check_pretrained_available(variant, pretrained, kwargs)
    model_cls = _build_cifar_stem_resnet if cifar_stem else ResNet
    return build_model_with_cfg(model_cls, variant, pretrained, **kwargs)


def _cfg(url: str = "", **kwargs: Any) -> Dict[str, Any]:
    return {
        "url": url,
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "conv1", "classifier": "fc",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "resnet18_gelu": _cfg(),
    "resnet50_gelu": _cfg(interpolation="bicubic", crop_pct=0.95),
    # The original built this under timm's `resnet152` name and so used that model's config.
    "resnet152_gelu": _cfg(interpolation="bicubic", crop_pct=0.95),
    "resnet50_32": _cfg(input_size=(3, 32, 32), pool_size=(4, 4), crop_pct=1.0, interpolation="bicubic"),
    "resnext152_32x8d": _cfg(input_size=(3, 380, 380), pool_size=(12, 12)),
})


@register_model
def resnet18_gelu(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-18 with GELU activations."""
    model_args = dict(block=BasicBlock, layers=(2, 2, 2, 2), act_layer="gelu")
    return _create_resnet("resnet18_gelu", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet50_gelu(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-50 with GELU activations (the paper's ImageNet CNN)."""
    model_args = dict(block=Bottleneck, layers=(3, 4, 6, 3), act_layer="gelu")
    return _create_resnet("resnet50_gelu", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet152_gelu(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-152 with GELU activations."""
    model_args = dict(block=Bottleneck, layers=(3, 8, 36, 3), act_layer="gelu")
    return _create_resnet("resnet152_gelu", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet50_32(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-50 (ReLU) with a CIFAR stem for 32x32 inputs."""
    model_args = dict(block=Bottleneck, layers=(3, 4, 6, 3))
    return _create_resnet("resnet50_32", pretrained, cifar_stem=True, **dict(model_args, **kwargs))


@register_model
def resnext152_32x8d(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNeXt 32x8d with SiLU and the original's stage depths [3, 4, 36, 3], 380x380 inputs."""
    model_args = dict(block=Bottleneck, layers=(3, 4, 36, 3), cardinality=32, base_width=8, act_layer="silu")
    return _create_resnet("resnext152_32x8d", pretrained, **dict(model_args, **kwargs))


# Names misspelled in the original README; they resolve (with a warning) to the intended models.
register_model_deprecations(__name__, {
    "resnet_50_32": "resnet50_32",
    "resnet_50_gelu": "resnet50_gelu",
})
