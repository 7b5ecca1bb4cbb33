"""Toy models and data for tests/test_validate_robustbench.py (not a test module itself).

``rb_toy`` classifies an image by the mean of its red channel: class k is centred on red value
``centre[k]`` (a quadratic score). An image whose red mean lies farther than eps from every decision
boundary is provably robust to any Linf perturbation of radius eps (the mean moves by at most eps),
one closer is broken by AutoAttack's first attack: the expected clean and robust results of every
example are known in closed form.

Run as a script it registers the models and runs ``validate_robustbench.main`` (subprocess and
torchrun tests): ``python tests/robustbench_toy.py <validate_robustbench args>``.
"""
from __future__ import annotations

import os
import sys
from typing import Dict, Sequence

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SCALE = 200.0


class RedMeanClassifier(nn.Module):
    """logits_k = -SCALE * (r - centre_k)^2 with r = mean red value, as one Linear layer on (r, r^2)."""

    def __init__(self, num_classes: int = 4, **_: object):
        super().__init__()
        self.num_classes = num_classes
        self.fc = nn.Linear(2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = x[:, 0].mean(dim=(1, 2))
        return self.fc(torch.stack([r, r * r], dim=1))


def toy_state_dict(centres: Dict[int, float], num_classes: int) -> Dict[str, torch.Tensor]:
    """Weights putting class k at red value centres[k]; classes not listed never win."""
    w = torch.zeros(num_classes, 2)
    b = torch.full((num_classes,), -1e4)
    for k, c in centres.items():
        w[k] = torch.tensor([2 * SCALE * c, -SCALE])
        b[k] = -SCALE * c * c
    return {"fc.weight": w, "fc.bias": b}


def predict(red: float, centres: Dict[int, float]) -> int:
    return min(centres, key=lambda k: (red - centres[k]) ** 2)


def margin(red: float, centres: Dict[int, float]) -> float:
    """Distance of red value ``red`` to the nearest decision boundary."""
    cs = sorted(centres.values())
    bounds = [(a + b) / 2 for a, b in zip(cs, cs[1:])]
    return min(abs(red - t) for t in bounds) if bounds else float("inf")


def _register() -> None:
    import timm
    from timm.models import register_model

    if timm.is_model("rb_toy"):
        return

    def _make(input_size, crop_pct):
        def factory(pretrained: bool = False, num_classes: int = 4, **kwargs):
            m = RedMeanClassifier(num_classes=num_classes)
            m.pretrained_cfg = m.default_cfg = {
                "input_size": input_size, "crop_pct": crop_pct, "interpolation": "bicubic",
                "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "num_classes": num_classes,
                "architecture": "rb_toy"}
            return m
        return factory

    f32 = _make((3, 32, 32), 1.0)
    f32.__name__ = "rb_toy"
    register_model(f32)
    f16 = _make((3, 16, 16), 0.875)
    f16.__name__ = "rb_toy_16"
    register_model(f16)


_register()


def main(argv: Sequence[str]) -> int:
    torch.set_num_threads(1)
    import validate_robustbench

    return validate_robustbench.main(list(argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
