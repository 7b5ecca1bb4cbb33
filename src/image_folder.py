"""Image-folder datasets that never give silently wrong data.

timm's image-folder dataset is convenient and lenient in four ways that each produce plausible but
wrong numbers; this module keeps timm's reader (same file order, same natural-sort class indices)
and removes the leniency:

* **Split folders.** timm looks for ``<root>/<split>`` (and its synonyms: ``val``, ``valid``,
  ``validation``, ``eval``, ``evaluation``; ``train``, ``training``) and, when there is none, reads
  ``<root>`` itself. A root with ``train/`` but no ``validation/`` then evaluates on the training
  images. Here the fallback to the root only happens when the root has no split folder at all
  (it then *is* the split, e.g. ``validate.py /data/imagenet/val``); otherwise it is an error.
* **Class indices.** Indices are the sorted class-folder names, so a split that lacks one class
  folder shifts every label after it. An evaluation split is checked against the training split
  next to it (or the ``--class-map``), and errors name the missing / extra classes.
* **Unreadable images.** timm replaces an image it cannot decode by its neighbour with a warning;
  here it is an error that names the file.
* **16-bit images.** PIL's ``convert('RGB')`` clips 16-bit grayscale PNG pixels (0..65535) at 255,
  so nearly every such image becomes white; here they are scaled to 8 bits (``v / 257``). Other
  high-bit-depth modes (32-bit integer or float) are refused with a clear error.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
from PIL import Image
from timm.data import ImageDataset

from src.errors import UsageError

_logger = logging.getLogger("robust_vits")

__all__ = ["TRAIN_SPLIT_NAMES", "EVAL_SPLIT_NAMES", "ImageReadError", "StrictImageDataset", "resolve_split_folder",
           "load_rgb_image", "create_folder_dataset", "folder_class_to_idx", "check_same_classes",
           "check_train_eval_folders", "check_folder_class_count"]

TRAIN_SPLIT_NAMES = ("train", "training")
EVAL_SPLIT_NAMES = ("val", "valid", "validation", "eval", "evaluation")
SPLIT_FOLDER_NAMES = TRAIN_SPLIT_NAMES + EVAL_SPLIT_NAMES + ("test",)
_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class ImageReadError(UsageError):
    """An image file cannot be decoded or converted: the error names the file.

    A DataLoader worker re-raises it in the main process as ``ImageReadError("Caught ImageReadError
    in DataLoader worker process 0.\\nOriginal Traceback ...")``; the constructor recovers the
    original one-line message from that text so the CLI still prints one clear line.
    """

    def __init__(self, message: str):
        if message.startswith("Caught ") and "Original Traceback" in message:
            last = [line for line in message.strip().splitlines() if line.strip()][-1]
            message = last.split(": ", 1)[1] if ": " in last else last
        super().__init__(message)


def load_rgb_image(file: Any, name: str) -> Image.Image:
    """Decode ``file`` (a path or an open binary file) into an 8-bit RGB image, or raise ``ImageReadError``.

    The pixels are decoded here (``Image.load``), so a truncated or corrupt file fails on this file
    and not later in a transform. 16-bit grayscale is scaled to 8 bits; 32-bit modes are refused.
    """
    try:
        img = Image.open(file)
        img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ImageReadError(f"cannot read image {name}: {text} (the file is corrupt, truncated or not an image; "
                             f"replace or delete it)") from None
    if img.mode in _HIGH_BIT_MODES or (img.mode == "I" and img.format == "PNG"):
        # a PNG holds at most 16 bits per sample; "I" is how older Pillow versions open 16-bit grayscale
        arr = np.asarray(img).astype(np.float64)
        img = Image.fromarray(np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8), mode="L")
    elif img.mode in ("I", "F"):
        raise ImageReadError(f"image {name} has {'32-bit integer' if img.mode == 'I' else 'floating-point'} pixels "
                             f"(PIL mode {img.mode}) whose range is unknown; convert it to an 8- or 16-bit image")
    return img.convert("RGB")


class StrictImageDataset(ImageDataset):
    """timm's ``ImageDataset`` over a folder reader, with :func:`load_rgb_image` and no silent retries."""

    def __getitem__(self, index: int):
        file, target = self.reader[index][:2]
        name = self.reader.filename(index, absolute=True)
        if hasattr(file, "read"):
            with file:
                img = load_rgb_image(file, name)
        else:
            img = load_rgb_image(file, name)
        if self.transform is not None:
            img = self.transform(img)
        if target is None:
            target = -1
        elif self.target_transform is not None:
            target = self.target_transform(target)
        return img, target


def resolve_split_folder(root: str, split: str) -> str:
    """The folder holding ``split`` under ``root``, by timm's rule, without a silent fallback.

    ``<root>/<split>`` (``[...]`` slicing suffixes ignored), else a synonym of the split; else the
    root itself, but only when the root has no split folder (train, training, val, valid,
    validation, eval, evaluation, test) at all: then the root is taken to be the split itself.
    """
    name = split.split("[")[0]
    synonyms = TRAIN_SPLIT_NAMES if name in TRAIN_SPLIT_NAMES else EVAL_SPLIT_NAMES if name in EVAL_SPLIT_NAMES else ()
    for candidate in (name,) + tuple(s for s in synonyms if s != name):
        if candidate and os.path.isdir(os.path.join(root, candidate)):
            return os.path.join(root, candidate)
    present = [d for d in SPLIT_FOLDER_NAMES if os.path.isdir(os.path.join(root, d))]
    if present:
        raise UsageError(f"image folder {root} has no '{name}' split folder (it has {', '.join(d + '/' for d in present)}"
                         f"); reading the root instead would mix in the other split's images: add {name}/ with one "
                         f"folder per class, or name an existing split (--val-split / --split)")
    return root


def folder_class_to_idx(dataset: Any) -> Optional[Dict[str, int]]:
    """The class-name -> index map of an image-folder dataset (through wrappers), or None for other data."""
    inner = getattr(dataset, "dataset", dataset)
    if not isinstance(inner, StrictImageDataset):
        return None
    return dict(inner.reader.class_to_idx)


def _class_list(names: List[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def check_same_classes(expected: Mapping[str, int], got: Mapping[str, int], expected_what: str, got_what: str) -> None:
    """Raise ``UsageError`` when two class-name -> index maps differ, naming missing and extra classes."""
    if dict(expected) == dict(got):
        return
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    parts = []
    if missing:
        parts.append(f"missing {_class_list(missing)}")
    if extra:
        parts.append(f"extra {_class_list(extra)}")
    if not parts:
        moved = sorted(k for k in expected if expected[k] != got[k])
        parts.append(f"the same names with other indices ({_class_list(moved)})")
    raise UsageError(f"the class folders of {got_what} differ from {expected_what}: {'; '.join(parts)}; the labels "
                     f"would not match (class indices are the sorted folder names): make the class folders the same, "
                     f"or pass --class-map FILE (one class name per line, in the model's order)")


def _apply_class_map(reader: Any, class_map: str, folder: str) -> None:
    """Re-index a reader's samples by ``class_map``; class folders the map does not name are an error."""
    from timm.data.readers.class_map import load_class_map

    try:
        mapping = load_class_map(class_map, folder)
    except (AssertionError, ValueError, OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read --class-map {class_map}: {str(e).strip() or type(e).__name__}") from None
    extra = sorted(set(reader.class_to_idx) - set(mapping))
    if extra:
        raise UsageError(f"{folder} has class folders that --class-map {class_map} does not name: "
                         f"{_class_list(extra)}; their images would be dropped silently: fix the class map or "
                         f"remove those folders")
    names = {i: c for c, i in reader.class_to_idx.items()}
    reader.samples = [(f, mapping[names[t]]) for f, t in reader.samples]
    reader.class_to_idx = dict(mapping)
    unused = len(set(mapping) - set(names.values()))
    if unused:
        _logger.info("%s holds %d of the %d classes of --class-map %s", folder, len(mapping) - unused, len(mapping),
                     class_map)


def _sibling_train_classes(root: str, folder: str) -> Optional[Tuple[str, List[str]]]:
    """The class folders of the training split next to an evaluation split folder, if there is one."""
    for name in TRAIN_SPLIT_NAMES:
        train = os.path.join(root, name)
        if os.path.isdir(train) and os.path.abspath(train) != os.path.abspath(folder):
            return train, sorted(d for d in os.listdir(train) if os.path.isdir(os.path.join(train, d)))
    return None


def _check_against_training_split(root: str, folder: str, class_to_idx: Mapping[str, int]) -> None:
    """An evaluation split must have the class folders of the training split next to it.

    Compared by name only when the evaluation split uses the standard layout (one level of class
    folders); nested layouts are left alone.
    """
    sibling = _sibling_train_classes(root, folder)
    if sibling is None:
        return
    own = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    if sorted(class_to_idx) != own:
        return
    from timm.utils.misc import natural_key

    train_path, train_names = sibling
    expected = {c: i for i, c in enumerate(sorted(train_names, key=natural_key))}
    check_same_classes(expected, class_to_idx, f"the training split {train_path}", f"the evaluation split {folder}")


def _check_no_loose_images(reader: Any, folder: str) -> None:
    """Images directly in the split folder get the class '' (index 0, shifting every class folder by one); a
    folder of images without class folders becomes a one-class problem that trains to 100 %. Usually DIR points
    one level too deep (at a class folder, or at a split of unlabelled images)."""
    if "" not in reader.class_to_idx:
        return
    loose = sum(1 for _, label in reader.samples if label == reader.class_to_idx[""])
    others = len(reader.class_to_idx) - 1
    raise UsageError(f"image folder {folder} holds {loose} image{'s' if loose != 1 else ''} directly, "
                     f"{'beside its ' + str(others) + ' class folders' if others else 'not in class folders'}: "
                     "each image must be in the folder of its class (<split>/<class>/<image>), as the labels are "
                     "the class folders; move or delete the loose images, or point DIR at the folder that holds "
                     "the split folders")


def create_folder_dataset(root: str, split: str, is_training: bool,
                          class_map: Optional[str] = None) -> StrictImageDataset:
    """An image-folder split as a :class:`StrictImageDataset`, with the split and class checks."""
    from timm.data.readers.reader_image_folder import ReaderImageFolder

    folder = resolve_split_folder(root, split)
    try:
        reader = ReaderImageFolder(folder)
    except (RuntimeError, OSError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot load dataset 'image folder' split '{split}' from {root}: {msg}") from None
    _check_no_loose_images(reader, folder)
    if class_map:
        _apply_class_map(reader, class_map, folder)
    elif not is_training and folder != root:
        _check_against_training_split(root, folder, reader.class_to_idx)
    ds = StrictImageDataset(folder, reader=reader)
    ds.folder = folder
    return ds


def check_train_eval_folders(train_ds: Any, eval_ds: Any, train_split: str, val_split: str) -> None:
    """train.py: the evaluation split must be another folder than the training split, with the same classes.

    The same folder is accepted only when the user asked for it (``--val-split`` equal to
    ``--train-split``), with a warning.
    """
    train_inner, eval_inner = getattr(train_ds, "dataset", train_ds), getattr(eval_ds, "dataset", eval_ds)
    if not (isinstance(train_inner, StrictImageDataset) and isinstance(eval_inner, StrictImageDataset)):
        return
    same = os.path.abspath(train_inner.folder) == os.path.abspath(eval_inner.folder)
    if same and train_split != val_split:
        raise UsageError(f"the training split '{train_split}' and the validation split '{val_split}' are the same "
                         f"folder {train_inner.folder}: every evaluation would be on the training images; give DIR "
                         f"with train/ and validation/ subfolders, or pass --val-split {train_split} to evaluate on "
                         f"the training images on purpose")
    if same:
        _logger.warning("--val-split %s: evaluating on the training images (%s)", val_split, eval_inner.folder)
    check_same_classes(train_inner.reader.class_to_idx, eval_inner.reader.class_to_idx,
                       f"the training split {train_inner.folder}", f"the validation split {eval_inner.folder}")


def check_folder_class_count(dataset: Any, num_outputs: int, class_map: Optional[str] = None) -> None:
    """Evaluation without ``--class-map``: an image folder must have as many classes as the model predicts.

    With fewer folders the labels are the indices among the folders present, not the model's
    class indices, so every label after a missing class is shifted.
    """
    classes = folder_class_to_idx(dataset)
    if class_map or classes is None or len(classes) >= num_outputs:
        return
    raise UsageError(f"the image folder {getattr(getattr(dataset, 'dataset', dataset), 'folder', '')} has "
                     f"{len(classes)} class folders but the model predicts {num_outputs} classes: labels are the "
                     f"indices of the sorted folder names, so a missing class shifts every label after it; add the "
                     f"missing class folders or pass --class-map FILE (the model's class names, one per line)")
