"""Pre-activation ResNet-18 for 32x32 inputs (RobustBench / Rice et al. style).

Parameter names follow the RobustBench implementation (``conv1``, ``layer{1..4}.{i}.{bn1,conv1,
bn2,conv2,shortcut.0}``, optional ``bn``, classifier ``linear``) so its checkpoints load as is.

Differences from the original (decided fixes): the factory honours ``num_classes``, ``drop_rate``
and ``drop_path_rate`` (the original dropped every keyword argument); the default class count
stays 10, as the original always built; ``reset_classifier`` replaces ``linear`` (the original set
an unused ``head``); pooling is global-adaptive, equal to the original ``avg_pool2d(4)`` on 32x32
inputs.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, create_classifier
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from ._helpers import check_pretrained_available, replace_classifier

__all__ = ["PreActResNet"]


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 with an identity or 1x1-convolution shortcut.

    The shortcut convolution sees the raw input by default; ``out_shortcut=True`` feeds it the
    activated input instead (the variant some RobustBench checkpoints were trained with).
    """
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, out_shortcut: bool = False,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.out_shortcut = out_shortcut
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, self.expansion * planes, kernel_size=1, stride=stride, bias=False))
        else:
            self.shortcut = None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        if self.shortcut is None:
            shortcut = x
        else:
            shortcut = self.shortcut(out if self.out_shortcut else x)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return self.drop_path(out) + shortcut


class PreActResNet(nn.Module):
    """Pre-activation ResNet with a 3x3 stride-1 stem (no max-pool), widths 64-512.

    ``bn_before_fc`` adds the final BN-ReLU of the Rice et al. variant; ``drop_rate`` is dropout
    before the classifier; ``drop_path_rate`` is stochastic depth over the blocks.
    """

    def __init__(
            self,
            num_blocks: Sequence[int] = (2, 2, 2, 2),
            num_classes: int = 10,
            in_chans: int = 3,
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            global_pool: str = "avg",
            bn_before_fc: bool = False,
            out_shortcut: bool = False,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.bn_before_fc = bn_before_fc
        total = sum(num_blocks)
        dprs = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]

        self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
        in_planes, idx = 64, 0
        self.feature_info = []
        for stage, (planes, blocks, stride) in enumerate(zip((64, 128, 256, 512), num_blocks, (1, 2, 2, 2))):
            layers = []
            for i in range(blocks):
                layers.append(PreActBlock(in_planes, planes, stride if i == 0 else 1, out_shortcut, dprs[idx]))
                in_planes = planes * PreActBlock.expansion
                idx += 1
            self.add_module(f"layer{stage + 1}", nn.Sequential(*layers))
            self.feature_info.append(dict(num_chs=in_planes, reduction=2 ** stage, module=f"layer{stage + 1}"))
        self.num_features = self.head_hidden_size = in_planes
        self.bn = nn.BatchNorm2d(in_planes) if bn_before_fc else None
        self.global_pool, self.linear = create_classifier(self.num_features, num_classes, pool_type=global_pool)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.linear

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace ``linear`` (the layer the forward uses) for ``num_classes`` outputs."""
        replace_classifier(self, "linear", num_classes, global_pool)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        if self.bn is not None:
            x = F.relu(self.bn(x))
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate > 0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.linear(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_preact_resnet(variant: str, pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    check_pretrained_available(variant, pretrained, kwargs)
    return build_model_with_cfg(PreActResNet, variant, pretrained,
                                feature_cfg=dict(out_indices=(0, 1, 2, 3)), **kwargs)


def _cfg(url: str = "", **kwargs: Any) -> Dict[str, Any]:
    # Input config kept from the original (224, crop 0.875, bilinear); the network is meant for
    # 32x32 inputs and configs pass the input size explicitly. 10 classes: what it always built.
    return {
        "url": url,
        "num_classes": 10, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": 0.875, "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "conv1", "classifier": "linear",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "preact_resnet_18": _cfg(),
})


@register_model
def preact_resnet_18(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    """PreAct ResNet-18 (blocks [2, 2, 2, 2])."""
    return _create_preact_resnet("preact_resnet_18", pretrained, **dict(dict(num_blocks=(2, 2, 2, 2)), **kwargs))
