"""Tiny sources for the TFDS builders of ``datasets/``: fake manual files the tests write themselves.

* ``write_ddpm_manual``: the serialized DDPM files (raw uint8 HWC images + a labels .npy).
* ``write_imagenet_archives``: an ImageNet manual-dir layout (``ILSVRC2012_img_train.tar`` holding one
  ``<wnid>.tar`` per class, ``ILSVRC2012_img_val.tar`` holding flat validation JPEGs).
* ``build_with_python`` / ``build_with_cli``: the two documented ways to build a builder.
* ``build_ordered_images``: a throw-away TFDS dataset of given images stored in the given order.
"""
from __future__ import annotations

import importlib
import io
import os
import subprocess
import sys
import tarfile
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASETS = os.path.join(ROOT, "datasets")


def write_ddpm_manual(manual_dir: str, n: int, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    rng = np.random.RandomState(seed)
    images = rng.randint(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    labels = rng.randint(0, 10, size=n).astype(np.int64)
    folder = os.path.join(manual_dir, "cifar10_ddpm_serialized")
    os.makedirs(folder, exist_ok=True)
    images.tofile(os.path.join(folder, "cifar_ddpm_improvedddpm_sorted_images.bin"))
    np.save(os.path.join(folder, "cifar_ddpm_improvedddpm_sorted_labels.npy"), labels)
    return images, labels


def _jpeg(rng: np.random.RandomState, size: Tuple[int, int] = (40, 48)) -> bytes:
    # smooth images (a colour per 8x8 block) so JPEG keeps them close to the source
    blocks = rng.randint(0, 256, size=(size[0] // 8, size[1] // 8, 3), dtype=np.uint8)
    arr = np.kron(blocks, np.ones((8, 8, 1), dtype=np.uint8))
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def write_imagenet_archives(manual_dir: str, train: Dict[str, int], val_files: Sequence[str],
                            seed: int = 0) -> None:
    """``train``: wnid -> number of images; ``val_files``: ILSVRC2012_val_XXXXXXXX.JPEG names."""
    rng = np.random.RandomState(seed)
    os.makedirs(manual_dir, exist_ok=True)
    with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_train.tar"), "w") as outer:
        for wnid, count in train.items():
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                for i in range(count):
                    _add(inner, f"{wnid}_{i}.JPEG", _jpeg(rng))
            _add(outer, f"{wnid}.tar", buf.getvalue())
    with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_val.tar"), "w") as tar:
        for name in val_files:
            _add(tar, name, _jpeg(rng))


def builder_module(name: str):
    """Import ``datasets/<name>/<name>_dataset_builder.py`` the way ``tfds build`` does."""
    if DATASETS not in sys.path:
        sys.path.insert(0, DATASETS)
    return importlib.import_module(f"{name}.{name}_dataset_builder")


def build_with_python(name: str, data_dir: str, manual_dir: str, config=None):
    import tensorflow_datasets as tfds

    kwargs = {"config": config} if config is not None else {}
    builder = builder_module(name).Builder(data_dir=data_dir, **kwargs)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return builder


def build_with_cli(folders: Sequence[str], data_dir: str, manual_dir: str, extra: Sequence[str] = ()
                   ) -> subprocess.CompletedProcess:
    cmd = [sys.executable, os.path.join(DATASETS, "build.py"), *folders, "--data_dir", data_dir,
           "--manual_dir", manual_dir] + list(extra)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def read_split(builder, split: str) -> List[dict]:
    import tensorflow_datasets as tfds

    return list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))


_ORDERED_BUILDERS: Dict[str, type] = {}


def build_ordered_images(name: str, data_dir: str, examples: Sequence[Tuple[np.ndarray, int]],
                         split: str = "validation", num_classes: int = 10):
    """Build ``tfds/<name>`` (one ``split`` of uint8 HWC ``image`` + ``label``) from ``examples`` and store
    them in this order (``disable_shuffling``: TFDS otherwise orders examples by a hash of their keys)."""
    import tensorflow_datasets as tfds

    if name not in _ORDERED_BUILDERS:
        def _info(self):
            return self.dataset_info_from_configs(
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=self.EXAMPLES[0][0].shape),
                    "label": tfds.features.ClassLabel(num_classes=self.NUM_CLASSES)}),
                supervised_keys=("image", "label"), disable_shuffling=True)

        def _split_generators(self, dl_manager):
            return {self.SPLIT: self._generate_examples()}

        def _generate_examples(self):
            for i, (image, label) in enumerate(self.EXAMPLES):
                yield i, {"image": image, "label": int(label)}

        cls_name = "".join(part.title() for part in name.split("_"))
        _ORDERED_BUILDERS[name] = type(cls_name, (tfds.core.GeneratorBasedBuilder,), {
            "VERSION": tfds.core.Version("1.0.0"), "_info": _info, "_split_generators": _split_generators,
            "_generate_examples": _generate_examples, "__module__": __name__})
    cls = _ORDERED_BUILDERS[name]
    cls.EXAMPLES, cls.SPLIT, cls.NUM_CLASSES = list(examples), split, num_classes
    builder = cls(data_dir=data_dir)
    builder.download_and_prepare()
    return builder
