"""robust-vits models, registered in timm's model registry when this package is imported.

``import src.models`` once, then build any of them with ``timm.create_model(name, ...)``:

* XCiT (``xcit.py``): ``xcit_medium_12_p16_224``, ``xcit_large_12_p16_224``,
  ``xcit_large_12_h8_p16_224`` and the 32x32 models ``xcit_small_12_p8_32``,
  ``xcit_{small,medium,large}_12_p4_32``, ``xcit_small_12_p2_32``.
* ResNets (``resnets.py``): ``resnet18_gelu``, ``resnet50_gelu``, ``resnet152_gelu``,
  ``resnet50_32``, ``resnext152_32x8d``.
* ``cait_s12_224``, ``poolformer_m12`` (``misc.py``).
* Wide ResNets (``wide_resnet.py``): ``wide_resnet{28_10,34_10,34_20,70_16,106_16}``.
* ``preact_resnet_18`` (``preact_resnet.py``), ``resnet50_gelu_adv`` (``adv_resnet.py``).

The README's misspelled names ``resnet_50_32``, ``resnet_50_gelu`` and ``xcit_large_12_4_32``
resolve (with a deprecation warning) to ``resnet50_32``, ``resnet50_gelu`` and
``xcit_large_12_p4_32``.
"""
from . import adv_resnet, misc, preact_resnet, resnets, wide_resnet, xcit

# Every name this package registers, in the order of the specification (original-behaviour §3).
MODEL_NAMES = (
    "cait_s12_224",
    "xcit_medium_12_p16_224",
    "xcit_large_12_p16_224",
    "xcit_large_12_h8_p16_224",
    "xcit_small_12_p8_32",
    "xcit_small_12_p4_32",
    "xcit_medium_12_p4_32",
    "xcit_large_12_p4_32",
    "xcit_small_12_p2_32",
    "resnet18_gelu",
    "resnet50_gelu",
    "resnet152_gelu",
    "resnet50_32",
    "resnext152_32x8d",
    "poolformer_m12",
    "wide_resnet28_10",
    "wide_resnet34_10",
    "wide_resnet34_20",
    "wide_resnet70_16",
    "wide_resnet106_16",
    "preact_resnet_18",
    "resnet50_gelu_adv",
)

# README spellings -> registered names.
MODEL_ALIASES = {
    "resnet_50_32": "resnet50_32",
    "resnet_50_gelu": "resnet50_gelu",
    "xcit_large_12_4_32": "xcit_large_12_p4_32",
}

__all__ = ["MODEL_NAMES", "MODEL_ALIASES", "adv_resnet", "misc", "preact_resnet", "resnets", "wide_resnet", "xcit"]
