"""robustbench_image_net: RobustBench's 5000-image ImageNet evaluation subset as a TFDS dataset.

The images are the ImageNet validation files listed in ``data/robustbench_imagenet_5000_ids.txt``
(``<wnid>/<file name>``; the wnid gives the 1000-class label). One split, ``validation``; the
original's one-image ``train`` placeholder and its (always empty) ``test`` split are not produced.
Build: ``python datasets/build.py datasets/robustbench_image_net --manual_dir IMAGENET_TARS --data_dir OUT``
(only ``ILSVRC2012_img_val.tar`` is needed).
"""
from __future__ import annotations

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import tensorflow_datasets as tfds  # noqa: E402
from tensorflow_datasets.datasets.imagenet2012 import imagenet2012_dataset_builder  # noqa: E402

from src import tfds_imagenet as common  # noqa: E402


class Builder(imagenet2012_dataset_builder.Builder):
    """The 5000 RobustBench ImageNet validation images with their ImageNet labels."""

    VERSION = tfds.core.Version("5.1.0")
    SUPPORTED_VERSIONS = []
    RELEASE_NOTES = {"5.1.0": "validation split only (no one-image train placeholder, no empty test split)."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = "manual_dir must contain ILSVRC2012_img_val.tar (https://image-net.org)."

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(names=common.imagenet_label_names()),
                "file_name": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"),
            homepage="https://robustbench.github.io/",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        archives = common.manual_archives(dl_manager.manual_dir)
        if "validation" not in archives:
            raise FileNotFoundError(f"{common.VAL_ARCHIVE} is not in the manual dir {dl_manager.manual_dir}")
        ids = common.read_robustbench_ids()
        return {"validation": common.iter_val_archive(dl_manager.iter_archive(archives["validation"]), ids.get,
                                                      source=archives["validation"], what="RobustBench images",
                                                      expected=ids)}
