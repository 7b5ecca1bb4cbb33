"""Tests of src/utils.py: normalization wrapper, unwrapping, XCiT patch adaptation.

The patch-adaptation tests include the original's four (original-behaviour §8 tests 5-8), with
the decided fix for patch 2 (a true patch 2: the last stem convolution keeps stride 2).
"""
from __future__ import annotations

import pytest
import timm
import torch
from timm.models.xcit import _create_xcit
from timm.utils import ModelEmaV3
from torch import nn

import src.models  # noqa: F401 - registers the project's models
from src.utils import (ImageNormalizer, adapt_model_patches, get_normalizer, is_normalized_model,
                       model_normalization, normalize_model, unwrap_model)

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2471, 0.2435, 0.2616)


def _stem_strides(model: nn.Module) -> list:
    return [tuple(model.patch_embed.proj[i][0].stride) for i in (0, 2, 4, 6)]


pytestmark = pytest.mark.usefixtures("single_cpu_thread")


@pytest.fixture
def xcit_s12_p16_meta() -> nn.Module:
    """Full-size XCiT-S12 p16 (as in the original tests), on the meta device: shapes only, instant."""
    with torch.device("meta"):
        return _create_xcit("xcit_small_12_p16_224")


def _tiny_xcit_p16() -> nn.Module:
    return timm.create_model("xcit_small_12_p16_224", depth=1, embed_dim=64, num_heads=4, num_classes=10,
                             img_size=32).eval()


# ---------------------------------------------------------------------------- normalization

def test_image_normalizer_buffers_and_output() -> None:
    norm = ImageNormalizer(MEAN, STD)
    assert norm.mean.shape == (1, 3, 1, 1) and norm.std.shape == (1, 3, 1, 1)
    assert {name for name, _ in norm.named_buffers()} == {"mean", "std"}
    assert list(norm.parameters()) == []
    x = torch.rand(2, 3, 4, 4)
    expected = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(norm(x), expected)


def test_image_normalizer_rejects_bad_statistics() -> None:
    with pytest.raises(ValueError):
        ImageNormalizer(MEAN, (0.2, 0.0, 0.3))
    with pytest.raises(ValueError):
        ImageNormalizer(MEAN, (0.2, 0.3))


def test_normalize_model_layout_and_forward() -> None:
    net = nn.Conv2d(3, 2, 1)
    wrapped = normalize_model(net, MEAN, STD)
    assert isinstance(wrapped, nn.Sequential)
    assert [name for name, _ in wrapped.named_children()] == ["normalize", "model"]
    assert set(wrapped.state_dict()) == {"normalize.mean", "normalize.std", "model.weight", "model.bias"}
    assert is_normalized_model(wrapped) and not is_normalized_model(net)
    x = torch.rand(1, 3, 5, 5)
    torch.testing.assert_close(wrapped(x), net(wrapped.normalize(x)))
    mean, std = model_normalization(wrapped)
    assert mean == pytest.approx(MEAN) and std == pytest.approx(STD)
    assert model_normalization(net) is None


class _DDPLike(nn.Module):
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def test_unwrap_model_strips_every_wrapper() -> None:
    net = nn.Linear(3, 3)
    wrapped = normalize_model(net, MEAN, STD)
    assert unwrap_model(net) is net
    assert unwrap_model(wrapped) is net
    assert unwrap_model(_DDPLike(wrapped)) is net
    assert unwrap_model(ModelEmaV3(wrapped)).weight.shape == net.weight.shape
    assert get_normalizer(_DDPLike(wrapped)) is wrapped.normalize
    assert get_normalizer(_DDPLike(net)) is None


# ---------------------------------------------------------------------------- patch adaptation

def test_adapt_model_patches_exception(xcit_s12_p16_meta: nn.Module) -> None:
    """Original test 5: 16 / 6 is not an integer."""
    with pytest.raises(AssertionError):
        adapt_model_patches(xcit_s12_p16_meta, 6)


def test_adapt_model_patches_same_size_is_rejected(xcit_s12_p16_meta: nn.Module) -> None:
    """A ratio of 1 is odd: rejected like the original."""
    with pytest.raises(AssertionError):
        adapt_model_patches(xcit_s12_p16_meta, 16)


def test_adapt_model_patches_2(xcit_s12_p16_meta: nn.Module) -> None:
    """Original test 6, with the fix: the fourth stem conv keeps stride 2, so patch 2 is real."""
    model = adapt_model_patches(xcit_s12_p16_meta, 2)
    assert model.patch_embed.patch_size == 2
    assert _stem_strides(model) == [(1, 1), (1, 1), (1, 1), (2, 2)]


def test_adapt_model_patches_4(xcit_s12_p16_meta: nn.Module) -> None:
    """Original test 7."""
    model = adapt_model_patches(xcit_s12_p16_meta, 4)
    assert model.patch_embed.patch_size == 4
    assert _stem_strides(model) == [(1, 1), (1, 1), (2, 2), (2, 2)]


def test_adapt_model_patches_8(xcit_s12_p16_meta: nn.Module) -> None:
    """Original test 8."""
    model = adapt_model_patches(xcit_s12_p16_meta, 8)
    assert model.patch_embed.patch_size == 8
    assert _stem_strides(model) == [(1, 1), (2, 2), (2, 2), (2, 2)]


@pytest.mark.parametrize("patch, grid", [(8, 4), (4, 8), (2, 16)])
def test_adapted_xcit_token_grid(patch: int, grid: int) -> None:
    model = adapt_model_patches(_tiny_xcit_p16(), patch)
    x = torch.rand(2, 3, 32, 32)
    tokens, (hp, wp) = model.patch_embed(x)
    assert (hp, wp) == (grid, grid)
    assert tokens.shape == (2, grid * grid, 64)
    assert model.patch_embed.num_patches == grid * grid
    assert model.forward_features(x).shape == (2, 1 + grid * grid, 64)  # class token + patch tokens
    assert model(x).shape == (2, 10)


def test_adapt_model_patches_keeps_weights_and_accepts_wrappers() -> None:
    model = _tiny_xcit_p16()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = normalize_model(model, MEAN, STD)
    assert adapt_model_patches(wrapped, 4) is wrapped
    assert model.patch_embed.patch_size == 4
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_adapt_model_patches_twice_goes_further() -> None:
    """p16 -> p8 -> p4 ends where p16 -> p4 does (stride-2 convs are found, not indexed blindly)."""
    model = adapt_model_patches(adapt_model_patches(_tiny_xcit_p16(), 8), 4)
    assert _stem_strides(model) == [(1, 1), (1, 1), (2, 2), (2, 2)]


def test_adapt_model_patches_rejects_non_xcit() -> None:
    with pytest.raises(AssertionError):
        adapt_model_patches(nn.Linear(2, 2), 4)
