"""imagenet_advex: adversarial examples of the RobustBench ImageNet subset against robust models.

Needs ``robustbench_image_net`` built into the same ``--data_dir`` and the configs' checkpoints in
``--manual_dir``. Build one config with
``python datasets/build.py datasets/imagenet_advex --config resnet50_fgsm --manual_dir CKPTS --data_dir OUT``.
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


def _resnet(name: str, steps: int) -> adv.AdversarialConfig:
    # Bai et al.'s ResNet-50 expects inputs normalized with mean/std 0.5: a layer inside the model here,
    # so eps is 4/255 in pixels and the stored image is the adversarial image itself.
    return adv.AdversarialConfig(name=name, model="resnet50_gelu_adv", checkpoint=adv.ROBUST_RESNET50, mean=_HALF,
                                 std=_HALF, crop_pct=0.875, interpolation="bilinear", steps=steps)


def _xcit(name: str, steps: int) -> adv.AdversarialConfig:
    return adv.AdversarialConfig(name=name, model="xcit_small_12_p16_224", checkpoint=adv.ROBUST_XCIT_S12,
                                 crop_pct=1.0, interpolation="bicubic", steps=steps)


class Builder(tfds.core.GeneratorBasedBuilder):
    """PGD (Linf, eps 4/255, step 1.5 eps / steps) adversarial images; ``validation`` split only."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release; ResNet configs store images, not normalized tensors."}
    BUILDER_CONFIG_CLASS = adv.AdversarialConfig
    BUILDER_CONFIGS = [_resnet("resnet50_fgsm", 1), _xcit("xcit_small_12_p16_224_fgsm", 1),
                       _resnet("resnet50_pgd10", 10), _xcit("xcit_small_12_p16_224_pgd10", 10)]
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
    manual_dir must contain the checkpoint of the config: {adv.ROBUST_RESNET50} (ResNet configs) or
    {adv.ROBUST_XCIT_S12} (XCiT configs); data_dir must contain the built robustbench_image_net.
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(features=adv.image_label_features(self.builder_config.num_classes),
                                              supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        return {"validation": self._generate_examples(dl_manager.manual_dir)}

    def _generate_examples(self, manual_dir):
        return adv.generate(self.builder_config, str(self.data_dir_root), manual_dir, perturbations=False)
