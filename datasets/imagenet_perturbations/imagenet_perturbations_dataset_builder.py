"""imagenet_perturbations: adversarial perturbations of the RobustBench ImageNet subset, as images.

Each stored image is ``(x - x_adv + eps) / (2 eps)`` (clean minus adversarial, mapped to [0, 1]),
for classifying perturbations with ImageNet models. Needs ``robustbench_image_net`` built into the
same ``--data_dir``; robust configs need their checkpoints in ``--manual_dir``, the ``_nonrobust``
ones download timm's pretrained weights. Build one config with
``python datasets/build.py datasets/imagenet_perturbations --config resnet50 --manual_dir CKPTS --data_dir OUT``.
"""
from __future__ import annotations

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from src import tfds_adversarial as adv  # noqa: E402  (imports torch before tensorflow)
import tensorflow_datasets as tfds  # noqa: E402

_HALF = (0.5, 0.5, 0.5)


def _config(name: str, model: str, steps: int, **kw) -> adv.AdversarialConfig:
    return adv.AdversarialConfig(name=name, model=model, steps=steps, **kw)


class Builder(tfds.core.GeneratorBasedBuilder):
    """PGD (Linf, eps 4/255, step 1.5 eps / steps) perturbations; ``validation`` split only."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release; the resnet50 and resnet50_fgsm configs use the EightBN ResNet-50."}
    BUILDER_CONFIG_CLASS = adv.AdversarialConfig
    BUILDER_CONFIGS = [
        _config("resnet50_fgsm", "resnet50_gelu_adv", 1, checkpoint=adv.ROBUST_RESNET50, mean=_HALF, std=_HALF,
                crop_pct=0.875, interpolation="bilinear"),
        _config("xcit_small_12_p16_224_fgsm", "xcit_small_12_p16_224", 1, checkpoint=adv.ROBUST_XCIT_S12,
                crop_pct=1.0, interpolation="bicubic"),
        _config("resnet50", "resnet50_gelu_adv", 100, checkpoint=adv.ROBUST_RESNET50, mean=_HALF, std=_HALF,
                crop_pct=0.875, interpolation="bilinear"),
        _config("resnet50_nonrobust", "resnet50", 100, pretrained=True, mean=adv.IMAGENET_MEAN,
                std=adv.IMAGENET_STD),
        _config("xcit_small_12_p16_224", "xcit_small_12_p16_224", 100, checkpoint=adv.ROBUST_XCIT_S12,
                crop_pct=1.0, interpolation="bicubic"),
        _config("xcit_small_12_p16_224_nonrobust", "xcit_small_12_p16_224", 100, pretrained=True,
                mean=adv.IMAGENET_MEAN, std=adv.IMAGENET_STD),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
    manual_dir must contain the checkpoint of a robust config: {adv.ROBUST_RESNET50} (resnet50*) or
    {adv.ROBUST_XCIT_S12} (xcit_small_12_p16_224*); data_dir must contain the built robustbench_image_net.
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(features=adv.image_label_features(self.builder_config.num_classes),
                                              supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        return {"validation": self._generate_examples(dl_manager.manual_dir)}

    def _generate_examples(self, manual_dir):
        return adv.generate(self.builder_config, str(self.data_dir_root), manual_dir, perturbations=True)
