"""src.model_factory: the one way train, validate, validate_robustbench and attack_effectiveness
build a model (options checked explicitly, patch-size no-op, one normalization precedence)."""
from __future__ import annotations

import pytest
import timm
import torch
from timm.models import register_model
from torch import nn

import src.models  # noqa: F401 - registers the project's models
from src import model_factory as mf
from src.checkpoint import finetune_from_checkpoint
from src.errors import FinetuneArgumentError, UsageError
from src.utils import get_normalizer


class _BuggyNet(nn.Module):
    """A model whose constructor has a bug that raises TypeError (not an unsupported option)."""

    def __init__(self, num_classes: int = 10, img_size: int = 32, **_):
        super().__init__()
        self.fc = nn.Linear(4, num_classes)
        len(None)  # the bug: TypeError inside model code


if not timm.is_model("buggy_net_test"):
    @register_model
    def buggy_net_test(pretrained: bool = False, **kwargs) -> nn.Module:
        return _BuggyNet(**kwargs)


def test_options_are_checked_against_the_model_class():
    assert mf.accepted_options("resnet18", {"img_size": 32, "drop_rate": 0.1}) == {"img_size": False,
                                                                                   "drop_rate": True}
    assert mf.accepted_options("xcit_nano_12_p16_224", {"img_size": 32}) == {"img_size": True}
    # a model that does not take img_size keeps its own size; one that takes it is built for it
    assert isinstance(mf.create_model("resnet18", num_classes=3, img_size=32), nn.Module)
    vit = mf.create_model("vit_tiny_patch16_224", num_classes=3, img_size=32)
    assert vit.patch_embed.img_size == (32, 32)
    with pytest.raises(UsageError, match=r"does not accept --drop-block \(drop_block_rate\)"):
        mf.create_model("vit_tiny_patch16_224", drop_block_rate=0.1)
    with pytest.raises(UsageError, match="unknown model 'resnet_typo'"):
        mf.create_model("resnet_typo")


def test_type_error_inside_model_code_is_not_swallowed():
    # before: any TypeError became "does not accept these options" (or a silent retry without img_size)
    with pytest.raises(TypeError, match="NoneType"):
        mf.create_model("buggy_net_test", num_classes=3, img_size=32)


@pytest.mark.parametrize("name, options, flag", [
    ("resnet18", {"global_pool": "bogus"}, "--gp 'bogus'"),
    ("xcit_nano_12_p16_224", {"global_pool": "max"}, "--gp 'max'"),
    ("xcit_nano_12_p16_224", {"img_size": 40}, "--img-size 40"),
])
def test_value_the_model_refuses_is_a_usage_error(name, options, flag):
    """timm's constructors check values with assert / ValueError: before, a traceback (AssertionError: Invalid pool
    type); the model builds without the options, so the error names the flags and keeps the model's reason."""
    with pytest.raises(UsageError, match=f"model '{name}' cannot be built with .*{flag}: ") as e:
        mf.create_model(name, num_classes=10, **options)
    assert "\n" not in str(e.value)
    assert isinstance(mf.create_model("xcit_nano_12_p16_224", num_classes=10, global_pool="avg", img_size=48),
                      nn.Module)


def test_matching_patch_size_is_a_no_op_everywhere():
    torch.manual_seed(0)
    net = mf.create_model("xcit_nano_12_p16_224", num_classes=10, img_size=32)
    strides = [tuple(m.stride) for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert mf.patch_size_of(net) == 16
    assert mf.set_patch_size(net, 16) is False and mf.set_patch_size(net, None) is False
    assert [tuple(m.stride) for m in net.modules() if isinstance(m, nn.Conv2d)] == strides
    # fine-tuning at the model's own patch size loads the weights untouched
    finetune_from_checkpoint(net, {"model": net.state_dict()}, num_classes=10, finetuning_patch_size=16)
    assert mf.patch_size_of(net) == 16
    assert mf.set_patch_size(net, 4) is True and mf.patch_size_of(net) == 4
    with pytest.raises(UsageError, match="--patch-size 6"):
        mf.set_patch_size(net, 6)
    resnet = mf.create_model("resnet18", num_classes=3)
    with pytest.raises(UsageError, match="--patch-size applies to XCiT-style models"):
        mf.set_patch_size(resnet, 16)
    with pytest.raises(FinetuneArgumentError, match="--finetuning-patch-size applies to XCiT-style"):
        mf.set_patch_size(resnet, 16, flag="--finetuning-patch-size", error=FinetuneArgumentError)


def test_normalization_precedence_flags_then_checkpoint_then_model():
    defaults = ((0.4, 0.4, 0.4), (0.2, 0.2, 0.2))
    rec = mf.RecordedNormalization((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "stored in the checkpoint")
    assert mf.resolve_normalization(None, None, None, defaults) == (defaults[0], defaults[1], "the model's defaults")
    assert mf.resolve_normalization(None, None, rec, defaults) == (rec.mean, rec.std, "stored in the checkpoint")
    assert mf.resolve_normalization([0.1], [0.3], rec, defaults) == ((0.1,) * 3, (0.3,) * 3, "from --mean/--std")
    # decided per value: --mean alone keeps the checkpoint's std, and else the model's
    mean, std, source = mf.resolve_normalization([0.1], None, rec, defaults)
    assert (mean, std) == ((0.1,) * 3, rec.std) and source == "mean from --mean/--std, std stored in the checkpoint"
    assert mf.resolve_normalization([0.1], None, None, defaults)[1] == defaults[1]
    # an original-style checkpoint only says "normalize_model" in its hparams: values from the model
    partial = mf.RecordedNormalization(None, None, "from the checkpoint's training arguments (hparams)")
    assert mf.resolve_normalization(None, None, partial, defaults)[:2] == defaults


def test_load_checkpoint_reports_recorded_normalization(tmp_path):
    net = mf.create_model("resnet18", num_classes=3)
    path = str(tmp_path / "n.pth.tar")
    torch.save({"model": net.state_dict(), "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3},
                "hparams": {"no_normalize": True, "normalize_model": True}}, path)
    loaded = mf.load_checkpoint(mf.create_model("resnet18", num_classes=3), path)
    assert loaded.normalization.mean == (0.5,) * 3 and loaded.trained_inputs == "normalized"
    torch.save({"model": net.state_dict(), "hparams": {"no_normalize": True, "normalize_model": True,
                                                      "mean": [0.3], "std": None}}, path)
    rec = mf.load_checkpoint(mf.create_model("resnet18", num_classes=3), path).normalization
    assert rec.mean == (0.3,) * 3 and rec.std is None and "hparams" in rec.source
    wrapped = mf.wrap_normalization(net, *mf.resolve_normalization(None, None, rec, ((0, 0, 0), (1, 1, 1)))[:2])
    assert get_normalizer(wrapped).mean.flatten().tolist() == pytest.approx([0.3] * 3)


class _ItemNet(nn.Module):
    """A constructor that reads tensor values (``.item()``), as some models do for their drop-path rates:
    impossible on the meta device whatever the value, so the meta check must not call it a refusal."""

    def __init__(self, num_classes=10, drop_path_rate=0.0, **kwargs):
        super().__init__()
        self.rates = [x.item() for x in torch.linspace(0, drop_path_rate, 3)] if drop_path_rate else []
        self.fc = nn.Linear(4, num_classes)


def item_net_test(pretrained=False, **kwargs):
    return _ItemNet(**kwargs)


def test_a_model_the_meta_device_cannot_build_with_options_is_still_built():
    import timm
    from timm.models import register_model

    if not timm.list_models("item_net_test"):
        register_model(item_net_test)
    net = mf.create_model("item_net_test", num_classes=3, drop_path_rate=0.1)
    assert net.rates == pytest.approx([0.0, 0.05, 0.1]) and net.fc.out_features == 3
