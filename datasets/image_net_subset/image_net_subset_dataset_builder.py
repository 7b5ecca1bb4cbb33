"""image_net_subset: the 100-class ImageNet subset of the paper's ablations (ImageNet-100 style).

The classes are the 100 WordNet ids in ``synsets.txt`` (sorted; line order is the label index).
Build: ``python datasets/build.py datasets/image_net_subset --manual_dir IMAGENET_TARS --data_dir OUT``.
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
    """ImageNet 2012 ``train`` and ``validation`` restricted to the 100 synsets of ``synsets.txt``."""

    VERSION = tfds.core.Version("5.1.0")
    SUPPORTED_VERSIONS = []
    RELEASE_NOTES = {"5.1.0": "100 sorted synsets (the original's label order depended on Python's hash seed)."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(names=common.read_subset_synsets()),
                "file_name": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"),
            homepage="https://image-net.org/",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        archives = common.manual_archives(dl_manager.manual_dir)
        keep = set(common.read_subset_synsets())
        splits = {}
        if "train" in archives:
            splits["train"] = common.iter_train_archive(
                dl_manager.iter_archive(archives["train"]), keep, self._fix_image, source=archives["train"],
                what=f"training images of image_net_subset's {len(keep)} classes",
                classes_what="classes of image_net_subset (synsets.txt)")
        if "validation" in archives:
            labels = common.validation_labels()

            def wnid_of(file_name: str):
                wnid = common.validation_wnid(file_name, labels)
                return wnid if wnid in keep else None

            expected = [common.validation_file_name(n) for n, wnid in enumerate(labels, 1) if wnid in keep]
            splits["validation"] = common.iter_val_archive(
                dl_manager.iter_archive(archives["validation"]), wnid_of, source=archives["validation"],
                what=f"validation images of image_net_subset's {len(keep)} classes", expected=expected)
        return splits
