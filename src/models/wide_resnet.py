"""Pre-activation Wide ResNets (WRN-d-k) as used by TRADES and RobustBench.

The module and parameter names are those of the RobustBench / TRADES implementation
(``conv1``, ``block{1,2,3}.layer.{i}.{bn1,conv1,bn2,conv2,convShortcut}``, ``bn1``, ``fc``), so
their CIFAR checkpoints load without renaming.

Differences from the original (decided fixes): ``reset_classifier`` replaces ``fc`` (the original
created an unused ``head``, so fine-tuning to a new class count kept the old head); pooling is
global-adaptive, which equals the original ``avg_pool2d(8)`` on the 32x32 inputs these networks
are made for and no longer crashes on other sizes; optional stochastic depth (``drop_path_rate``,
default 0 = the original network).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, create_classifier
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from ._helpers import check_pretrained_available, replace_classifier

__all__ = ["WideResNet"]


class BasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 plus shortcut.

    When the width changes, the shortcut is a 1x1 convolution applied to the *activated* input,
    as in the TRADES code.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(
            in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        shortcut = x if self.equal_in_out else self.convShortcut(act)
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        return shortcut + self.drop_path(out)


class NetworkBlock(nn.Module):
    """A stage of ``num_layers`` blocks; only the first one changes width and stride."""

    def __init__(self, num_layers: int, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0,
                 drop_path_rates: Optional[list] = None) -> None:
        super().__init__()
        dprs = drop_path_rates or [0.0] * num_layers
        self.layer = nn.Sequential(*[
            BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate, dprs[i])
            for i in range(num_layers)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor``: a 16-channel 3x3 stem, three stages of widths 16k/32k/64k
    with strides 1/2/2, final BN-ReLU, global average pooling and a linear classifier ``fc``.

    ``sub_block1`` adds the unused extra first stage of the TRADES WRN-34-10 so its checkpoints
    load strictly.
    """

    def __init__(
            self,
            depth: int = 28,
            widen_factor: int = 10,
            num_classes: int = 10,
            in_chans: int = 3,
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            global_pool: str = "avg",
            sub_block1: bool = False,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4 (n >= 1), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        dprs = [drop_path_rate * i / max(3 * n - 1, 1) for i in range(3 * n)]
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.num_features = self.head_hidden_size = widths[3]

        self.conv1 = nn.Conv2d(in_chans, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1, drop_rate, dprs[:n])
        if sub_block1:
            self.sub_block1 = NetworkBlock(n, widths[0], widths[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2, drop_rate, dprs[n:2 * n])
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2, drop_rate, dprs[2 * n:])
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        self.feature_info = [
            dict(num_chs=widths[1], reduction=1, module="block1"),
            dict(num_chs=widths[2], reduction=2, module="block2"),
            dict(num_chs=widths[3], reduction=4, module="block3"),
        ]

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace ``fc`` (the layer the forward uses) for ``num_classes`` outputs."""
        replace_classifier(self, "fc", num_classes, global_pool)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.block1(x)
        x = self.block2(x)
        x = self.block3(x)
        return self.relu(self.bn1(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_wide_resnet(variant: str, pretrained: bool = False, **kwargs: Any) -> WideResNet:
    check_pretrained_available(variant, pretrained, kwargs)
    return build_model_with_cfg(WideResNet, variant, pretrained,
                                feature_cfg=dict(out_indices=(0, 1, 2)), **kwargs)


def _cfg(url: str = "", **kwargs: Any) -> Dict[str, Any]:
    # The original's config (224, crop 0.875, bilinear) is kept although the networks are meant
    # for 32x32 inputs: configs and scripts always pass the input size explicitly.
    return {
        "url": url,
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": 0.875, "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "conv1", "classifier": "fc",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "wide_resnet28_10": _cfg(),
    "wide_resnet34_10": _cfg(),
    "wide_resnet34_20": _cfg(),
    "wide_resnet70_16": _cfg(),
    "wide_resnet106_16": _cfg(),
})


@register_model
def wide_resnet28_10(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-28-10."""
    return _create_wide_resnet("wide_resnet28_10", pretrained, **dict(dict(depth=28, widen_factor=10), **kwargs))


@register_model
def wide_resnet34_10(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-34-10 (the TRADES / Madry CIFAR baseline)."""
    return _create_wide_resnet("wide_resnet34_10", pretrained, **dict(dict(depth=34, widen_factor=10), **kwargs))


@register_model
def wide_resnet34_20(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-34-20."""
    return _create_wide_resnet("wide_resnet34_20", pretrained, **dict(dict(depth=34, widen_factor=20), **kwargs))


@register_model
def wide_resnet70_16(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-70-16 (Gowal et al. / Rebuffi et al. CIFAR models)."""
    return _create_wide_resnet("wide_resnet70_16", pretrained, **dict(dict(depth=70, widen_factor=16), **kwargs))


@register_model
def wide_resnet106_16(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-106-16."""
    return _create_wide_resnet("wide_resnet106_16", pretrained, **dict(dict(depth=106, widen_factor=16), **kwargs))
