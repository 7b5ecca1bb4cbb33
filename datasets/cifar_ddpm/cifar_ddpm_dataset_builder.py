"""cifar_ddpm: the synthetic CIFAR-10-like images of Sehwag et al. 2021 (DDPM samples) as a TFDS dataset.

Mixed into CIFAR-10 training with ``--combine-dataset tfds/cifar_ddpm`` (the paper's CIFAR recipe).
Build: ``python datasets/build.py datasets/cifar_ddpm --manual_dir DIR --data_dir OUT`` (README, TFDS).
"""
from __future__ import annotations

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import numpy as np  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from src.errors import SourceDataError, first_line  # noqa: E402

IMAGE_SHAPE = (32, 32, 3)
IMAGE_BYTES = 32 * 32 * 3
MANUAL_SUBDIR = "cifar10_ddpm_serialized"
IMAGES_FILE = "cifar_ddpm_improvedddpm_sorted_images.bin"
LABELS_FILE = "cifar_ddpm_improvedddpm_sorted_labels.npy"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
READ_CHUNK = 4096  # images per read: the full file has 15.4M images (47 GB)


class Builder(tfds.core.GeneratorBasedBuilder):
    """DDPM-generated CIFAR-10 images (``train`` split only), read from the serialized manual files."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release (same features and keys as the original builder)."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
    manual_dir must contain {MANUAL_SUBDIR}/{IMAGES_FILE} (raw uint8, one 32x32x3 HWC image per 3072
    bytes) and {MANUAL_SUBDIR}/{LABELS_FILE} (one int label per image), the files released by Sehwag et
    al. 2021 ("Robust Learning Meets Generative Models"). gs:// manual dirs work.
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=IMAGE_SHAPE),
                "label": tfds.features.ClassLabel(names=CIFAR10_CLASSES),
            }),
            supervised_keys=("image", "label"),
            homepage="https://github.com/inspire-group/hydra",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        folder = os.path.join(str(dl_manager.manual_dir), MANUAL_SUBDIR)
        return {"train": self._generate_examples(os.path.join(folder, IMAGES_FILE),
                                                 os.path.join(folder, LABELS_FILE))}

    def _generate_examples(self, images_path: str, labels_path: str):
        import tensorflow as tf

        for path in (images_path, labels_path):
            if not tf.io.gfile.exists(path):
                raise FileNotFoundError(f"cifar_ddpm: missing manual file {path}\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        labels = read_labels(labels_path)
        size = tf.io.gfile.stat(images_path).length
        if size != len(labels) * IMAGE_BYTES:
            raise SourceDataError(f"cifar_ddpm: {images_path} has {size} bytes but {LABELS_FILE} lists "
                                  f"{len(labels)} images of {IMAGE_BYTES} bytes each")
        with tf.io.gfile.GFile(images_path, "rb") as f:
            for start in range(0, len(labels), READ_CHUNK):
                n = min(READ_CHUNK, len(labels) - start)
                chunk = np.frombuffer(f.read(n * IMAGE_BYTES), dtype=np.uint8).reshape((n,) + IMAGE_SHAPE)
                for j in range(n):
                    yield start + j, {"image": chunk[j], "label": int(labels[start + j])}


def read_labels(path: str) -> np.ndarray:
    """The labels file as int64, refused in one line (``SourceDataError``) when it is not a non-empty .npy array
    of integers in [0, 10): a damaged file, float labels (truncated before) or a label out of range (stored
    before, -1 included, and failing only in training)."""
    import tensorflow as tf

    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            labels = np.load(f, allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        raise SourceDataError(f"cifar_ddpm: cannot read {path} as a .npy array ({first_line(e)})") from None
    labels = np.asarray(labels).reshape(-1)
    if not len(labels):  # TFDS refused the empty split only at its end, with an AssertionError traceback
        raise SourceDataError(f"cifar_ddpm: {path} holds no labels (an empty array); the dataset needs at least "
                              "one image")
    if not np.issubdtype(labels.dtype, np.integer):
        raise SourceDataError(f"cifar_ddpm: {path} holds {labels.dtype} values; the labels must be integers "
                              f"(0-{len(CIFAR10_CLASSES) - 1})")
    bad = np.flatnonzero((labels < 0) | (labels >= len(CIFAR10_CLASSES)))
    if len(bad):
        raise SourceDataError(f"cifar_ddpm: {path} has {len(bad)} label(s) outside 0-{len(CIFAR10_CLASSES) - 1} "
                              f"(first: {labels[bad[0]]} at index {bad[0]})")
    return labels.astype(np.int64)
