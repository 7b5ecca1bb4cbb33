"""What the ImageNet-derived TFDS builders share: the manual archives, labels and the shipped id lists.

``datasets/image_net_subset`` and ``datasets/robustbench_image_net`` read the ImageNet manual
archives (``ILSVRC2012_img_train.tar`` with one ``<wnid>.tar`` per class, ``ILSVRC2012_img_val.tar``
with flat ``ILSVRC2012_val_XXXXXXXX.JPEG`` files) and keep a subset. Unlike TFDS's Imagenet2012,
validation labels are looked up by the file's number (line N of TFDS's ``validation_labels.txt``),
not by position in the archive, so they are right for any archive holding part of the images.
Data files are read relative to the repository, never the working directory.
"""
from __future__ import annotations

import io
import os
import re
import tarfile
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Set, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROBUSTBENCH_IDS = os.path.join(ROOT, "data", "robustbench_imagenet_5000_ids.txt")
SUBSET_SYNSETS = os.path.join(ROOT, "datasets", "image_net_subset", "synsets.txt")
TRAIN_ARCHIVE = "ILSVRC2012_img_train.tar"
VAL_ARCHIVE = "ILSVRC2012_img_val.tar"
_VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG$")

Example = Tuple[str, Dict[str, object]]


def imagenet_label_names() -> List[str]:
    """The 1000 WordNet ids in TFDS's (standard, sorted) label order."""
    import tensorflow_datasets as tfds

    path = tfds.core.tfds_path("datasets/imagenet2012/labels.txt")
    return path.read_text().split()


def validation_labels() -> List[str]:
    """wnid of validation image N (1-based) at index N - 1."""
    import tensorflow_datasets as tfds

    return tfds.core.tfds_path("datasets/imagenet2012/validation_labels.txt").read_text().split()


def validation_wnid(file_name: str, labels: List[str]) -> str:
    m = _VAL_NAME.search(file_name)
    if m is None or not 1 <= int(m.group(1)) <= len(labels):
        raise ValueError(f"{file_name} is not an ImageNet validation file name (ILSVRC2012_val_XXXXXXXX.JPEG)")
    return labels[int(m.group(1)) - 1]


def read_subset_synsets(path: str = SUBSET_SYNSETS) -> List[str]:
    """The 100 synsets of image_net_subset, sorted (their position is the label index)."""
    with open(path) as f:
        names = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    if len(set(names)) != len(names) or names != sorted(names):
        raise ValueError(f"{path} must list unique, sorted WordNet ids")
    return names


def read_robustbench_ids(path: str = ROBUSTBENCH_IDS) -> Dict[str, str]:
    """RobustBench's 5000 ImageNet validation images: file name -> wnid (from ``<wnid>/<file>`` lines)."""
    with open(path) as f:
        pairs = [line.strip().split("/") for line in f if line.strip()]
    return {file_name: wnid for wnid, file_name in pairs}


def manual_archives(manual_dir: str) -> Dict[str, str]:
    """The split -> archive path of the ImageNet archives present in ``manual_dir`` (gs:// works)."""
    import tensorflow as tf

    found = {}
    for split, name in (("train", TRAIN_ARCHIVE), ("validation", VAL_ARCHIVE)):
        path = os.path.join(str(manual_dir), name)
        if tf.io.gfile.exists(path):
            found[split] = path
    if not found:
        raise FileNotFoundError(f"neither {TRAIN_ARCHIVE} nor {VAL_ARCHIVE} is in the manual dir {manual_dir}; "
                                "download them from https://image-net.org and pass --manual_dir")
    return found


def iter_train_archive(archive: Iterable[Tuple[str, io.IOBase]], keep: Optional[Set[str]] = None,
                       fix_image: Callable = lambda name, img: img) -> Iterator[Example]:
    """(key, example) of every training image whose class is in ``keep`` (all when None).

    Class archives outside ``keep`` are skipped without being read.
    """
    for fname, fobj in archive:
        wnid = os.path.basename(fname)[:-len(".tar")]
        if keep is not None and wnid not in keep:
            continue
        with tarfile.open(fileobj=io.BytesIO(fobj.read()), mode="r:") as inner:
            for member in inner:
                if not member.isfile():
                    continue
                image_name = os.path.basename(member.name)
                image = fix_image(image_name, io.BytesIO(inner.extractfile(member).read()))
                yield image_name, {"file_name": image_name, "image": image, "label": wnid}


def iter_val_archive(archive: Iterable[Tuple[str, io.IOBase]],
                     wnid_of: Callable[[str], Optional[str]]) -> Iterator[Example]:
    """(key, example) of every validation image for which ``wnid_of(file_name)`` is not None."""
    for fname, fobj in archive:
        image_name = os.path.basename(fname)
        wnid = wnid_of(image_name)
        if wnid is not None:
            yield image_name, {"file_name": image_name, "image": fobj, "label": wnid}
