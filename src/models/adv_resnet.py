"""GELU ResNet-50 with ghost batch norm, to load the adversarially trained ResNet-50 of
"Are Transformers More Robust Than CNNs?" (Bai et al., 2021; checkpoint ``advres50_gelu.pth``).

That network is a torchvision-layout ResNet-50 whose every normalization layer is ``EightBN``:
eight non-affine ghost batch norms (only the one named by ``bn_type`` runs, ``bn0`` by default)
followed by a learned per-channel affine map (a depthwise 1x1 convolution with bias). Module
and parameter names here match that checkpoint (``bn1.bn0.proxy_bn.running_mean``,
``bn1.aff.bnconv.weight``, ``layer1.0.downsample.1...``, ``fc``).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from timm.data import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.layers import create_classifier
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from ._helpers import check_pretrained_available, replace_classifier

__all__ = ["AdvResNet", "EightBN", "GhostBN2D_Old", "Affine", "set_eval_use_different_stats"]


class Affine(nn.Module):
    """Per-channel scale and shift, stored as a depthwise ``k x k`` convolution with bias."""

    def __init__(self, width: int, k: int = 1) -> None:
        super().__init__()
        self.bnconv = nn.Conv2d(width, width, k, padding=(k - 1) // 2, groups=width, bias=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.bnconv.weight)
        nn.init.zeros_(self.bnconv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bnconv(x)


class GhostBN2D_Old(nn.Module):  # noqa: N801 - name of the checkpoint's class, kept for recognisability
    """Ghost batch norm: statistics over groups of ``ratio`` samples folded into the channels.

    In training a batch ``(N, C, H, W)`` is viewed as ``(N / ratio, ratio * C, H, W)`` and
    normalized by a non-affine ``BatchNorm2d`` over ``ratio * C`` channels, so each channel's
    statistics come from a virtual batch of ``N / ratio`` samples. In evaluation the running
    statistics of the first virtual slot (or their mean with ``sync_stats``) are used with a
    regular batch norm; ``eval_use_different_stats`` keeps the training-style path in eval.
    """

    def __init__(self, num_features: int, virtual2actual_batch_size_ratio: int = 2, affine: bool = False,
                 sync_stats: bool = False, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.virtual2actual_batch_size_ratio = virtual2actual_batch_size_ratio
        self.num_features = num_features
        self.affine = affine
        self.sync_stats = sync_stats
        self.proxy_bn = nn.BatchNorm2d(num_features * virtual2actual_batch_size_ratio, eps=eps, momentum=momentum,
                                       affine=False)
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.eval_use_different_stats = False

    def actual_running_stats(self) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Per-channel running mean/var seen by evaluation (first virtual slot, or the mean)."""
        if not self.proxy_bn.track_running_stats:
            return None, None
        ratio = self.virtual2actual_batch_size_ratio
        stats = []
        for var in (self.proxy_bn.running_mean, self.proxy_bn.running_var):
            var = var.reshape(ratio, self.num_features)
            stats.append(var.mean(dim=0) if self.sync_stats else var[0])
        return stats[0], stats[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_batch_stats = self.training or not self.proxy_bn.track_running_stats
        if use_batch_stats or self.eval_use_different_stats:
            n, c, h, w = x.shape
            ratio = self.virtual2actual_batch_size_ratio
            if n % ratio != 0:
                raise RuntimeError(f"ghost batch norm needs a batch size divisible by {ratio}, got {n}")
            out = self.proxy_bn(x.reshape(n // ratio, ratio * c, h, w)).reshape(n, c, h, w)
            if self.affine:
                out = out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
            return out
        mean, var = self.actual_running_stats()
        return F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.proxy_bn.eps)


class EightBN(nn.Module):
    """Eight alternative ghost batch norms ``bn0``..``bn7`` (one active) plus a shared ``Affine``.

    The source model trained with several normalization branches (e.g. clean vs adversarial);
    only ``bn_type`` (default ``'bn0'``) runs.
    """
    num_branches = 8

    def __init__(self, num_features: int, virtual2actual_batch_size_ratio: int = 2, affine: bool = False,
                 sync_stats: bool = False) -> None:
        super().__init__()
        for i in range(self.num_branches):
            self.add_module(f"bn{i}", GhostBN2D_Old(num_features, virtual2actual_batch_size_ratio, affine, sync_stats))
        self.bn_type = "bn0"
        self.aff = Affine(num_features, k=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.aff(getattr(self, self.bn_type)(x))


def set_eval_use_different_stats(model: nn.Module, value: bool = False) -> None:
    """Switch every ghost batch norm of ``model`` to (or back from) batch statistics in eval."""
    for m in model.modules():
        if isinstance(m, GhostBN2D_Old):
            m.eval_use_different_stats = value


class Bottleneck(nn.Module):
    """torchvision ResNet-v1.5 bottleneck (stride on the 3x3 conv) with GELU."""
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 norm_layer: Any = EightBN) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = norm_layer(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = norm_layer(planes * self.expansion)
        self.gelu = nn.GELU()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.gelu(self.bn1(self.conv1(x)))
        out = self.gelu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.gelu(out + identity)


class AdvResNet(nn.Module):
    """torchvision-layout bottleneck ResNet with GELU and a configurable norm layer."""

    def __init__(
            self,
            layers: Sequence[int] = (3, 4, 6, 3),
            num_classes: int = 1000,
            in_chans: int = 3,
            drop_rate: float = 0.0,
            global_pool: str = "avg",
            norm_layer: Any = EightBN,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(64)
        self.gelu = nn.GELU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = 64
        self.feature_info = [dict(num_chs=64, reduction=2, module="gelu")]
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if i == 0 else 2
            downsample = None
            if stride != 1 or inplanes != planes * Bottleneck.expansion:
                downsample = nn.Sequential(
                    nn.Conv2d(inplanes, planes * Bottleneck.expansion, kernel_size=1, stride=stride, bias=False),
                    norm_layer(planes * Bottleneck.expansion),
                )
            stage = [Bottleneck(inplanes, planes, stride, downsample, norm_layer)]
            inplanes = planes * Bottleneck.expansion
            stage += [Bottleneck(inplanes, planes, norm_layer=norm_layer) for _ in range(1, blocks)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            self.feature_info.append(dict(num_chs=inplanes, reduction=4 * 2 ** i, module=f"layer{i + 1}"))
        self.num_features = self.head_hidden_size = inplanes
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():
            if isinstance(m, Affine):
                m.reset_parameters()

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        replace_classifier(self, "fc", num_classes, global_pool)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.gelu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate > 0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_adv_resnet(variant: str, pretrained: bool = False, **kwargs: Any) -> AdvResNet:
    check_pretrained_available(variant, pretrained, kwargs)
    return build_model_with_cfg(AdvResNet, variant, pretrained, **kwargs)


def _cfg(url: str = "", **kwargs: Any) -> Dict[str, Any]:
    return {
        "url": url,
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bilinear",
        "mean": IMAGENET_INCEPTION_MEAN, "std": IMAGENET_INCEPTION_STD,
        "first_conv": "conv1", "classifier": "fc",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "resnet50_gelu_adv": _cfg(),
})


@register_model
def resnet50_gelu_adv(pretrained: bool = False, **kwargs: Any) -> AdvResNet:
    """GELU ResNet-50 with EightBN norms (loads Bai et al.'s ``advres50_gelu.pth``)."""
    return _create_adv_resnet("resnet50_gelu_adv", pretrained, **dict(dict(layers=(3, 4, 6, 3)), **kwargs))
