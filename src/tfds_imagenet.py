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
import logging
import lzma
import os
import re
import tarfile
import zlib
from typing import Callable, Collection, Dict, Iterable, Iterator, List, Optional, Set, Tuple

from src.errors import SourceDataError, first_line

_logger = logging.getLogger("robust_vits")

ARCHIVE_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)

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


def validation_file_name(number: int) -> str:
    """The file name of ImageNet validation image ``number`` (1-based)."""
    return f"ILSVRC2012_val_{number:08d}.JPEG"


def validation_wnid(file_name: str, labels: List[str]) -> str:
    m = _VAL_NAME.search(file_name)
    if m is None or not 1 <= int(m.group(1)) <= len(labels):
        raise SourceDataError(f"{file_name} is not an ImageNet validation file name (ILSVRC2012_val_XXXXXXXX.JPEG)")
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


def read_members(archive: Iterable[Tuple[str, io.IOBase]], source: str,
                 wanted: Callable[[str], bool] = lambda name: True) -> Iterator[Tuple[str, bytes]]:
    """(name, bytes) of every file of ``archive`` whose name is ``wanted`` (the others are not read); a damaged,
    truncated or empty archive is a one-line ``SourceDataError`` naming ``source`` (TFDS's reader raised
    tarfile's errors with a traceback mid-build)."""
    members = iter(archive)
    while True:
        try:
            entry = next(members, None)
            if entry is None:
                return
            if not wanted(entry[0]):
                continue
            name, payload = entry[0], entry[1].read()
        except ARCHIVE_ERRORS as e:
            raise SourceDataError(f"cannot read {source}: {first_line(e)} (a damaged or truncated tar archive?)") \
                from None
        yield name, payload


def check_image(payload: bytes, where: str) -> None:
    """A one-line ``SourceDataError`` when ``payload`` is not an image PIL recognizes (its header only: cheap),
    instead of storing it and failing when the dataset is read; also one larger than PIL decodes (a decompression
    bomb), which the image-folder reader refuses too (``load_rgb_image``)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(payload)):
            pass
    except Image.DecompressionBombError as e:
        raise SourceDataError(f"{where} is too large to decode: {first_line(e)}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise SourceDataError(f"{where} is not an image PIL can read") from None


def checked_examples(examples: Iterable[Example], source: str, what: str) -> Iterator[Example]:
    """``examples`` as they come, refused in one line (``SourceDataError``) when two share a key (a file name an
    archive holds twice: TFDS stopped only after the whole split, with an AssertionError traceback) or when there
    are none (TFDS's 'No examples were yielded' traceback)."""
    seen: Set[str] = set()
    for key, example in examples:
        if key in seen:
            raise SourceDataError(f"{key} is in {source} twice; each of the {what} must be there once (a merged "
                                  "or damaged archive?)")
        seen.add(key)
        yield key, example
    if not seen:
        raise SourceDataError(f"{source} holds none of the {what}")


def warn_missing(found: Collection[str], expected: Collection[str], source: str, what: str) -> None:
    """A warning when ``source`` lacked some of the ``expected`` files or classes: the split is built, but is
    partial, and the readers cannot tell (a full ImageNet archive lacks none)."""
    missing = sorted(set(expected) - set(found))
    if missing:
        _logger.warning("%s held %d of the %d %s (first missing: %s); the split is built without the others",
                        source, len(set(expected)) - len(missing), len(set(expected)), what, missing[0])


def iter_train_archive(archive: Iterable[Tuple[str, io.IOBase]], keep: Optional[Set[str]] = None,
                       fix_image: Callable = lambda name, img: img, source: str = TRAIN_ARCHIVE,
                       what: str = "training images", classes_what: str = "classes") -> Iterator[Example]:
    """(key, example) of every training image whose class is in ``keep`` (all when None).

    Class archives outside ``keep`` are skipped without being read. Damaged archives, files that are not
    images, a file name twice and no image at all are ``SourceDataError`` naming them; classes of ``keep``
    without images are a warning.
    """
    def wnid_of(fname: str) -> str:
        return os.path.basename(fname)[:-len(".tar")]

    def examples() -> Iterator[Example]:
        found = set()
        for fname, payload in read_members(archive, source, lambda f: keep is None or wnid_of(f) in keep):
            wnid = wnid_of(fname)
            inner_source = f"{os.path.basename(fname)} in {source}"
            try:
                inner = tarfile.open(fileobj=io.BytesIO(payload), mode="r:")
            except ARCHIVE_ERRORS as e:
                raise SourceDataError(f"cannot read {inner_source}: {first_line(e)} (a damaged tar archive?)") \
                    from None
            with inner:
                for image_name, image in read_members(((m.name, inner.extractfile(m)) for m in inner if m.isfile()),
                                                      inner_source):
                    image_name = os.path.basename(image_name)
                    check_image(image, f"{image_name} in {inner_source}")
                    found.add(wnid)
                    yield image_name, {"file_name": image_name, "image": fix_image(image_name, io.BytesIO(image)),
                                       "label": wnid}
        if keep is not None and found:
            warn_missing(found, keep, source, classes_what)

    return checked_examples(examples(), source, what)


def iter_val_archive(archive: Iterable[Tuple[str, io.IOBase]], wnid_of: Callable[[str], Optional[str]],
                     source: str = VAL_ARCHIVE, what: str = "validation images",
                     expected: Collection[str] = ()) -> Iterator[Example]:
    """(key, example) of every validation image for which ``wnid_of(file_name)`` is not None; damaged archives,
    kept files that are not images, a file name twice and no image at all are ``SourceDataError`` naming them;
    ``expected`` file names the archive lacks are a warning."""
    def examples() -> Iterator[Example]:
        found = []
        for fname, payload in read_members(archive, source, lambda f: wnid_of(os.path.basename(f)) is not None):
            image_name = os.path.basename(fname)
            check_image(payload, f"{image_name} in {source}")
            found.append(image_name)
            yield image_name, {"file_name": image_name, "image": io.BytesIO(payload), "label": wnid_of(image_name)}
        if found:
            warn_missing(found, expected, source, what)

    return checked_examples(examples(), source, what)
