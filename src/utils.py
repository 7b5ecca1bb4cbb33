"""Small model helpers shared by the training, evaluation and export code.

* ``ImageNormalizer`` / ``normalize_model``: attacks and evaluated models take images in [0, 1];
  when a model was trained on normalized inputs, the normalization is moved *inside* the model
  (RobustBench style) so that the attack's [0, 1] box and epsilon stay in pixel space.
* ``adapt_model_patches``: turns an XCiT built with the 16-pixel convolutional stem into a
  smaller-patch model by removing strides of the stem convolutions. The weights are untouched,
  so ImageNet p16 weights load directly into e.g. a CIFAR p4 model.
* ``unwrap_model``: the plain network under DDP / EMA / ``torch.compile`` / normalization
  wrappers, i.e. the module whose state dict is stored in checkpoints.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = [
    "ImageNormalizer",
    "normalize_model",
    "is_normalized_model",
    "get_normalizer",
    "model_normalization",
    "adapt_model_patches",
    "unwrap_model",
]


class ImageNormalizer(nn.Module):
    """``(x - mean) / std`` as a module, so normalization is part of the differentiable model.

    ``mean`` and ``std`` are buffers shaped ``(1, 3, 1, 1)``: they move with ``.to(device)``, are
    not trained, and appear in the wrapper's state dict as ``normalize.mean`` / ``normalize.std``
    (the layout RobustBench uses).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t = torch.as_tensor(tuple(float(m) for m in mean), dtype=torch.float32)
        std_t = torch.as_tensor(tuple(float(s) for s in std), dtype=torch.float32)
        if mean_t.ndim != 1 or std_t.shape != mean_t.shape:
            raise ValueError(f"mean and std must be flat sequences of the same length, got {mean} and {std}")
        if bool((std_t <= 0).any()):
            raise ValueError(f"std must be positive, got {tuple(std)}")
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1))
        self.register_buffer("std", std_t.view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={tuple(self.mean.flatten().tolist())}, std={tuple(self.std.flatten().tolist())}"


def normalize_model(model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> nn.Sequential:
    """Wrap ``model`` as ``Sequential(normalize=ImageNormalizer(mean, std), model=model)``.

    The child names are the original's: checkpoints store ``unwrap_model(wrapper)`` (the inner
    network), and RobustBench-style state dicts use the ``normalize.* / model.*`` keys.
    """
    return nn.Sequential(OrderedDict([("normalize", ImageNormalizer(mean, std)), ("model", model)]))


def is_normalized_model(model: nn.Module) -> bool:
    """True for the ``Sequential(normalize=..., model=...)`` wrapper built by ``normalize_model``."""
    return isinstance(model, nn.Sequential) and isinstance(getattr(model, "normalize", None), ImageNormalizer) \
        and hasattr(model, "model")


def get_normalizer(model: nn.Module) -> Optional[ImageNormalizer]:
    """The ``ImageNormalizer`` of a (possibly DDP/EMA-wrapped) normalized model, else None."""
    seen = 0
    while seen < 16:  # wrappers never nest deeper than a handful of levels
        if is_normalized_model(model):
            return model.normalize
        inner = _inner_module(model)
        if inner is None:
            return None
        model = inner
        seen += 1
    return None


def model_normalization(model: nn.Module) -> Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]]:
    """``(mean, std)`` of the normalization layer inside ``model`` (None without one).

    Checkpoint writers store this next to the (unwrapped) weights so that evaluation can rebuild the
    same wrapper without the user repeating ``--mean/--std``.
    """
    norm = get_normalizer(model)
    if norm is None:
        return None
    # float32 buffers: 7 significant digits give back the values the user typed (0.24, not 0.23999999...)
    def as_floats(t: torch.Tensor) -> Tuple[float, ...]:
        return tuple(float(f"{v:.7g}") for v in t.flatten().tolist())
    return as_floats(norm.mean), as_floats(norm.std)


def _inner_module(model: Any) -> Optional[nn.Module]:
    # DDP / DataParallel / timm ModelEma(V2/V3) keep the network in `.module`; timm's old ModelEma in
    # `.ema`; torch.compile in `._orig_mod`; the normalization wrapper in `.model`.
    for name in ("module", "_orig_mod", "model"):
        inner = getattr(model, name, None)
        if isinstance(inner, nn.Module):
            return inner
    ema = getattr(model, "ema", None)
    if isinstance(ema, nn.Module) and not isinstance(model, nn.Module):  # timm's legacy ModelEma
        return ema
    return None


def unwrap_model(model: Any) -> nn.Module:
    """The plain network under DDP, EMA, ``torch.compile`` and ``normalize_model`` wrappers.

    Like timm's ``unwrap_model`` at the original's commit, attributes named ``module`` *or*
    ``model`` are followed recursively; this is exactly the module whose state dict checkpoints
    store (no ``module.`` / ``model.`` / ``normalize.`` prefixes).
    """
    for _ in range(16):
        inner = _inner_module(model)
        if inner is None:
            return model
        model = inner
    return model


def _stem_convs(proj: nn.Module) -> list:
    """Convolutions of an XCiT ``ConvPatchEmbed.proj`` in forward order.

    ``proj`` is ``Sequential(conv3x3, GELU, conv3x3, GELU, ...)`` where each ``conv3x3`` is itself
    ``Sequential(Conv2d, BatchNorm2d)``; ``proj[i][0]`` is the convolution of layer ``i``.
    """
    convs = []
    for layer in proj.children():
        if isinstance(layer, nn.Conv2d):
            convs.append(layer)
        elif isinstance(layer, nn.Sequential) and len(layer) and isinstance(layer[0], nn.Conv2d):
            convs.append(layer[0])
    return convs


def adapt_model_patches(model: nn.Module, new_patch_size: int) -> nn.Module:
    """Make an XCiT with a convolutional stem use ``new_patch_size`` pixels per token.

    The stem of a p16 XCiT is four stride-2 3x3 convolutions (16 = 2**4). Setting the stride of the
    first ``log2(patch_size / new_patch_size)`` of them to 1 gives the smaller patch without
    changing any weight shape, so ImageNet p16 weights still load (the paper's CIFAR models are
    ImageNet p16 models adapted to p4 on 32x32 inputs, i.e. 8x8 tokens). XCiT's Fourier positional
    encoding is computed from the runtime token grid, so nothing needs interpolating.

    Faithful to the original: the ratio must be an integer and even (a p16 model rejects 6 and
    16 with an ``AssertionError``). Fixed: patch 2 now gives a true patch 2 (the original removed
    every stride and got patch 1), and ``num_patches`` / feature reductions are kept in sync.
    Works on wrapped models (DDP, EMA, normalization); returns ``model`` itself.
    """
    net = unwrap_model(model)
    patch_embed = getattr(net, "patch_embed", None)
    assert patch_embed is not None and hasattr(patch_embed, "proj"), \
        f"adapt_model_patches needs an XCiT-style model with a convolutional patch embedding, got {type(net).__name__}"
    current = patch_embed.patch_size
    current = current[0] if isinstance(current, (tuple, list)) else int(current)
    to_divide = current / new_patch_size
    assert int(to_divide) == to_divide, \
        f"the new patch size ({new_patch_size}) should divide the current patch size ({current})"
    to_divide = int(to_divide)
    assert to_divide % 2 == 0, \
        f"the ratio between the current ({current}) and the new ({new_patch_size}) patch size should be even"
    steps = math.log2(to_divide)
    assert steps == int(steps), \
        f"the ratio between the current ({current}) and the new ({new_patch_size}) patch size must be a power of 2"
    strided = [conv for conv in _stem_convs(patch_embed.proj) if tuple(conv.stride) == (2, 2)]
    assert len(strided) >= int(steps), \
        f"patch size {new_patch_size} needs {int(steps)} stride-2 stem convolutions, the model has {len(strided)}"
    for conv in strided[:int(steps)]:
        conv.stride = (1, 1)

    patch_embed.patch_size = new_patch_size
    img_size = getattr(patch_embed, "img_size", None)
    if img_size is not None:
        h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        patch_embed.num_patches = (h // new_patch_size) * (w // new_patch_size)
        if hasattr(patch_embed, "grid_size"):
            patch_embed.grid_size = (h // new_patch_size, w // new_patch_size)
    for info in getattr(net, "feature_info", None) or []:
        if isinstance(info, dict) and "reduction" in info:
            info["reduction"] = new_patch_size
    return model
