"""``--fold-bn``: fold eval-mode BatchNorm into the convolution before it, for the evaluation CLIs.

In eval mode a BatchNorm is a fixed per-channel affine map, ``y = (x - mean) / sqrt(var + eps) * gamma + beta``;
after a bias-free or biased convolution it can be absorbed into that convolution's weight and bias, and the
network computes the same function with one pass fewer over every activation map, forward and (for an
attack's input gradient) backward. The evaluation CLIs never train the model, so the folding is done once, in
place: the convolution gets the folded weight and bias, the BatchNorm becomes ``nn.Identity`` (timm's
``BatchNormAct2d`` keeps its dropout and activation).

Which convolution feeds which BatchNorm is read from a ``torch.fx`` trace of the model (used only to find the
pairs: the model that runs is the original module tree). A pair is folded only when the convolution is a plain
``nn.Conv2d`` whose output goes nowhere but into the BatchNorm, each module is called once, and the BatchNorm
uses running statistics. A probe forward before and after decides: if the outputs differ by more than float32
rounding, the model is restored and the run goes on unfolded, with a warning.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import nn

_logger = logging.getLogger("robust_vits")

__all__ = ["FoldReport", "fold_batchnorm", "find_conv_bn_pairs", "fold_for_evaluation"]

# relative to the largest logit: folding changes only the order of float32 roundings
PROBE_RTOL = 1e-4


@dataclass
class FoldReport:
    folded: int
    batchnorms: int
    reason: str = ""


class _AfterFold(nn.Module):
    """What is left of timm's BatchNormAct2d once its normalization lives in the convolution: dropout, activation."""

    def __init__(self, drop: nn.Module, act: nn.Module):
        super().__init__()
        self.drop = drop
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


def _is_batchnorm2d(m: nn.Module) -> bool:
    return isinstance(m, nn.BatchNorm2d)


def _is_bn_act(m: nn.Module) -> bool:
    return _is_batchnorm2d(m) and type(m) is not nn.BatchNorm2d and hasattr(m, "act") and hasattr(m, "drop")


def _foldable_bn(m: nn.Module) -> bool:
    if not (type(m) in (nn.BatchNorm2d, nn.SyncBatchNorm) or (_is_bn_act(m) and type(m).__name__ == "BatchNormAct2d")):
        return False
    return bool(m.track_running_stats) and m.running_mean is not None and m.running_var is not None


class _PairTracer(torch.fx.Tracer):
    """Every BatchNorm2d (subclasses included) is a leaf, so a BatchNormAct2d shows as one call."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return _is_batchnorm2d(m) or super().is_leaf_module(m, qualname)


def find_conv_bn_pairs(model: nn.Module) -> List[Tuple[str, str]]:
    """Qualified names ``(conv, bn)`` of the foldable pairs; raises what ``torch.fx`` raises when it cannot trace."""
    graph = _PairTracer().trace(model)
    calls: dict = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or calls[node.target] != 1 or len(node.args) != 1 or node.kwargs:
            continue
        bn = model.get_submodule(node.target)
        src = node.args[0]
        if not (_foldable_bn(bn) and isinstance(src, torch.fx.Node) and src.op == "call_module"):
            continue
        conv = model.get_submodule(src.target)
        if type(conv) is not nn.Conv2d or calls[src.target] != 1 or len(src.users) != 1:
            continue
        if conv.out_channels != bn.num_features:
            continue
        pairs.append((src.target, node.target))
    return pairs


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


@torch.no_grad()
def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    dtype = conv.weight.dtype
    wide = torch.float64 if conv.weight.device.type in ("cpu", "cuda") else torch.float32
    var, mean = bn.running_var.to(wide), bn.running_mean.to(wide)
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(wide)
    bias = conv.bias.to(wide) if conv.bias is not None else torch.zeros_like(mean)
    shift = (bias - mean) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(wide)
    weight = conv.weight.to(wide) * scale.reshape(-1, *([1] * (conv.weight.dim() - 1)))
    return weight.to(dtype), shift.to(dtype)


def fold_batchnorm(model: nn.Module, probe: Optional[torch.Tensor] = None) -> FoldReport:
    """Fold every foldable eval-mode BatchNorm of ``model`` (in eval mode) into its convolution, in place.

    ``probe`` (a small input batch) is run before and after; a difference beyond float32 rounding undoes the
    folding. Returns what was done; never raises for a model it cannot fold (the report says why).
    """
    batchnorms = sum(1 for m in model.modules() if _is_batchnorm2d(m))
    if batchnorms == 0:
        return FoldReport(0, 0, "the model has no BatchNorm2d")
    try:
        pairs = find_conv_bn_pairs(model)
    except Exception as e:  # noqa: BLE001 - torch.fx raises many kinds of error on untraceable code
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return FoldReport(0, batchnorms, f"torch.fx cannot trace the model ({type(e).__name__}: {text[:120]})")
    if not pairs:
        return FoldReport(0, batchnorms, "no BatchNorm directly follows a plain convolution")
    was_training = model.training
    model.eval()
    before = _probe(model, probe)
    undo: List[Any] = []
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        weight, bias = _folded(conv, bn)
        undo.append((conv_name, conv.weight, conv.bias, bn_name, bn))
        conv.weight = nn.Parameter(weight, requires_grad=conv.weight.requires_grad)
        conv.bias = nn.Parameter(bias, requires_grad=conv.weight.requires_grad)
        _set_submodule(model, bn_name, _AfterFold(bn.drop, bn.act) if _is_bn_act(bn) else nn.Identity())
    if before is not None:
        after = _probe(model, probe)
        err = (after - before).abs().max().item()
        scale = before.abs().max().item() + 1.0
        if not err <= PROBE_RTOL * scale:
            _restore(model, undo)
            model.train(was_training)
            return FoldReport(0, batchnorms, f"the folded model's output differs from the original by {err:.3g} "
                                             f"on a probe batch (restored, not folded)")
    model.train(was_training)
    return FoldReport(len(pairs), batchnorms)


def _probe(model: nn.Module, probe: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if probe is None:
        return None
    with torch.no_grad():
        return model(probe).float()


def _restore(model: nn.Module, undo: Sequence[Any]) -> None:
    for conv_name, weight, bias, bn_name, bn in undo:
        conv = model.get_submodule(conv_name)
        conv.weight = weight
        conv.bias = bias
        _set_submodule(model, bn_name, bn)


def fold_for_evaluation(model: nn.Module, input_size: Sequence[int]) -> FoldReport:
    """``--fold-bn`` of the evaluation CLIs: fold in place, checked on a seeded probe batch of ``input_size``
    (C, H, W) images, and say in one log line what was done (a warning when nothing could be)."""
    probe = torch.rand(2, *[int(v) for v in input_size], generator=torch.Generator().manual_seed(0))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    report = fold_batchnorm(model, probe.to(device))
    if report.folded:
        _logger.info("--fold-bn: %d of the model's %d BatchNorm layers folded into their convolutions",
                     report.folded, report.batchnorms)
    else:
        _logger.warning("--fold-bn: nothing folded: %s", report.reason)
    return report
