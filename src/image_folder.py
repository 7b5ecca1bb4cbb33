"""Image-folder datasets that never give silently wrong data.

timm's image-folder dataset is convenient and lenient in several ways that each produce plausible but
wrong numbers; this module keeps timm's reader (same file order, same natural-sort class indices)
and removes the leniency:

* **Split folders.** timm looks for ``<root>/<split>`` (and its synonyms: ``val``, ``valid``,
  ``validation``, ``eval``, ``evaluation``; ``train``, ``training``) and, when there is none, reads
  ``<root>`` itself. A root with ``train/`` but no ``validation/`` then evaluates on the training
  images. Here the fallback to the root only happens when the root has no split folder at all
  (it then *is* the split, e.g. ``validate.py /data/imagenet/val``); otherwise it is an error.
* **Class indices.** Indices are the sorted names of the folders in which timm *found* an image
  (.png, .jpg, .jpeg), so a split that lacks one class folder, or has one that is empty or holds
  only other formats (.webp, .bmp, ...), shifts every label after it. Every non-hidden folder of a
  standard split must yield an image (unless ``--class-map`` gives the indices by name); images in
  other formats beside read ones are a warning. Layouts whose labels timm gets wrong are refused:
  images in hidden folders, in a folder and in its subfolder, folders of one name in a nested
  layout (merged into one class), two names for one folder, names that sort as equal. An
  evaluation split is checked against the training split next to it (or the ``--class-map``), and
  errors name the missing / extra classes. All from the one walk timm does.
* **Unreadable images.** timm replaces an image it cannot decode by its neighbour with a warning;
  here it is an error that names the file.
* **16-bit images.** PIL's ``convert('RGB')`` clips 16-bit grayscale PNG pixels (0..65535) at 255,
  so nearly every such image becomes white; here they are scaled to 8 bits (``v / 257``). Other
  high-bit-depth modes (32-bit integer or float) are refused with a clear error.
"""
from __future__ import annotations

import logging
import os
import pickle
import unicodedata
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
from PIL import Image
from timm.data import ImageDataset

from src.errors import UsageError

_logger = logging.getLogger("robust_vits")

__all__ = ["TRAIN_SPLIT_NAMES", "EVAL_SPLIT_NAMES", "OTHER_IMAGE_EXTENSIONS", "ImageReadError", "StrictImageDataset",
           "resolve_split_folder", "load_rgb_image", "read_image_folder", "load_class_map_file",
           "create_folder_dataset", "folder_class_to_idx", "check_same_classes", "check_train_eval_folders", "check_folder_class_count"]

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
        name = self.reader.filename(index, absolute=True)
        try:  # a broken symbolic link, a file without read permission or deleted since the folder was listed
            file, target = self.reader[index][:2]
        except OSError as e:
            raise ImageReadError(f"cannot open image {name}: {e.strerror or type(e).__name__} (fix or delete the "
                                 f"file)") from None
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
    variants = sorted(d for d in _class_folders(root) if d.lower() in SPLIT_FOLDER_NAMES and d not in present)
    if variants:  # Train/ and Val/: DIR would be read as the split, with the images of both
        wanted = ", ".join(n + "/" for n in dict.fromkeys((name,) + synonyms) if n)
        raise UsageError(f"image folder {root} has {', '.join(d + '/' for d in variants)}: split folder names are "
                         f"matched exactly ({wanted}), and reading {root} itself would mix the splits: rename the "
                         f"folder or pass its exact name (--split / --train-split / --val-split)")
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
    elif missing and extra and {unicodedata.normalize("NFC", n) for n in missing} == \
            {unicodedata.normalize("NFC", n) for n in extra}:
        parts.append("the names look the same but are written with other Unicode code points (NFC / NFD "
                     "normalization, e.g. folders copied from macOS): rename them the same way")
    raise UsageError(f"the class folders of {got_what} differ from {expected_what}: {'; '.join(parts)}; the labels "
                     f"would not match (class indices are the sorted folder names): make the class folders the same, "
                     f"or pass --class-map FILE (one class name per line, in the model's order)")


def load_class_map_file(class_map: str, folder: str = "") -> Dict[str, int]:
    """A ``--class-map`` file as a name -> index map, read like timm reads it (``.txt``: the line number is the
    index; ``.pkl``: a dict), refusing what would give wrong indices silently: a name on two lines (the first
    index never used), a blank line between names (every later index shifted by one), indices that are not
    non-negative integers."""
    from timm.data.readers.class_map import load_class_map

    if class_map.lower().endswith(".txt") and os.path.isfile(class_map):
        try:
            with open(class_map, encoding="utf-8-sig") as f:  # -sig: a BOM would become part of the first name
                names = [line.strip() for line in f]
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read --class-map {class_map}: {str(e).strip() or type(e).__name__}") from None
        while names and not names[-1]:
            names.pop()
        blank = [i + 1 for i, n in enumerate(names) if not n]
        if blank:
            raise UsageError(f"--class-map {class_map}: line {blank[0]} is blank; the line number is the class "
                             f"index, so every later class would move by one: delete the blank line(s)")
        seen: Dict[str, int] = {}
        for i, n in enumerate(names):
            if n in seen:
                raise UsageError(f"--class-map {class_map}: class '{n}' is on lines {seen[n] + 1} and {i + 1}; "
                                 f"each class name must be on one line only (its line number is its index)")
            seen[n] = i
        return seen
    try:
        mapping = load_class_map(class_map, folder)
    except (AssertionError, ValueError, OSError, UnicodeDecodeError, EOFError, pickle.UnpicklingError) as e:
        raise UsageError(f"cannot read --class-map {class_map}: {str(e).strip() or type(e).__name__}") from None
    bad = [k for k, v in mapping.items() if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, int)
           or v < 0]
    if bad:
        raise UsageError(f"--class-map {class_map} must map class names to non-negative integer indices; entry "
                         f"{bad[0]!r}: {mapping[bad[0]]!r}")
    return dict(mapping)


def _apply_class_map(reader: Any, class_map: str, folder: str) -> None:
    """Re-index a reader's samples by ``class_map``; class folders the map does not name are an error."""
    mapping = load_class_map_file(class_map, folder)
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


def _class_folders(folder: str) -> List[str]:
    """The non-hidden folders in ``folder``, sorted (hidden ones such as .ipynb_checkpoints are no classes)."""
    try:
        with os.scandir(folder) as entries:
            return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())
    except OSError as e:
        raise UsageError(f"cannot list the folder {folder}: {e.strerror or type(e).__name__}") from None


def _sibling_train_classes(root: str, folder: str) -> Optional[Tuple[str, List[str]]]:
    """The class folders of the training split next to an evaluation split folder, if there is one."""
    for name in TRAIN_SPLIT_NAMES:
        train = os.path.join(root, name)
        if os.path.isdir(train) and os.path.abspath(train) != os.path.abspath(folder):
            return train, _class_folders(train)
    return None


def _check_against_training_split(root: str, folder: str, class_to_idx: Mapping[str, int]) -> None:
    """An evaluation split must have the class folders of the training split next to it.

    Compared by name only when the evaluation split uses the standard layout (one level of class
    folders); nested layouts are left alone.
    """
    sibling = _sibling_train_classes(root, folder)
    if sibling is None:
        return
    own = _class_folders(folder)
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


# Image formats PIL decodes that timm's folder reader skips (it reads .png, .jpg, .jpeg). The one walk over
# the split counts them per folder, so that a class folder holding only them is an error and a class holding
# them beside read images a warning, at no second walk over the dataset.
OTHER_IMAGE_EXTENSIONS = (".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif", ".jpe", ".jp2", ".j2k", ".ppm",
                          ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".heic", ".heif", ".avif")


def _read_extensions() -> List[str]:
    from timm.data.readers.img_extensions import get_img_extensions

    return list(get_img_extensions())


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _describe_counts(counts: Mapping[str, int]) -> str:
    """'3 .webp files, 1 .bmp file' for a {extension: count} map, most frequent first."""
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return ", ".join(_plural(n, ext + " file") for ext, n in ordered)


def _is_hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split(os.sep))


def read_image_folder(root: str) -> Any:
    """timm's ``ReaderImageFolder`` over ``root`` (same samples, file order and natural-sort class indices), read
    in one walk that also counts, per folder, the image files of formats timm does not read (``reader.unread``)."""
    from timm.data.readers.reader_image_folder import ReaderImageFolder, find_images_and_targets
    from timm.utils.misc import natural_key

    read = set(_read_extensions())
    found, all_idx = find_images_and_targets(root, types=read | set(OTHER_IMAGE_EXTENSIONS))
    names = {i: c for c, i in all_idx.items()}
    samples: List[Tuple[str, str]] = []
    unread: Dict[str, Dict[str, int]] = {}
    for path, target in found:
        ext = os.path.splitext(path)[1].lower()
        if ext in read:
            samples.append((path, names[target]))
        else:
            counts = unread.setdefault(os.path.dirname(path), {})
            counts[ext] = counts.get(ext, 0) + 1
    # timm's rule for the class index: the sorted (natural_key) names of the folders holding read images
    class_to_idx = {c: i for i, c in enumerate(sorted({label for _, label in samples}, key=natural_key))}
    reader = ReaderImageFolder.__new__(ReaderImageFolder)  # its __init__ would walk the folder again
    super(ReaderImageFolder, reader).__init__()
    reader.root = root
    reader.samples = [(path, class_to_idx[label]) for path, label in samples]
    reader.class_to_idx = class_to_idx
    reader.unread = unread
    return reader


def _describe_folder(path: str) -> str:
    """What a folder that yields no image holds: 'empty', '3 .webp files', 'cannot be listed: ...'."""
    counts: Dict[str, int] = {}
    errors: List[OSError] = []
    for dirpath, dirs, files in os.walk(path, onerror=errors.append, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for f in files:
            if f.startswith("."):
                continue
            ext = os.path.splitext(f)[1].lower()
            key = ext if ext in OTHER_IMAGE_EXTENSIONS or ext in _read_extensions() else "other"
            counts[key] = counts.get(key, 0) + 1
    if errors:
        return f"cannot be listed: {errors[0].strerror or type(errors[0]).__name__}"
    if not counts:
        return "empty"
    other = counts.pop("other", 0)
    parts = [_describe_counts(counts)] if counts else []
    if other:
        parts.append(f"{_plural(other, 'other file')}")
    return ", ".join(parts)


def _unread_note() -> str:
    return f"only {', '.join(_read_extensions())} are read"


def _check_layout(reader: Any, folder: str, class_map: Optional[str]) -> None:
    """The class folders of a split must give each image the label its folder says, in one fixed order.

    timm labels an image by the name of the folder it is in and numbers the names that hold images. Refused
    here, from the set of folders holding images (no second walk): images in a hidden folder (a class
    '.ipynb_checkpoints'); a folder with images whose subfolder has images too (the subfolder becomes
    another class); two folders of the same name (their images merged into one class: DIR one level too
    high, or a Tiny-ImageNet style ``<class>/images/``); two names for one folder (a symlinked class);
    class names that sort equally (``Cat``/``cat``, ``a1``/``a01``: their order, so their indices, would change
    from run to run); and, in the standard layout (class folders directly in the split folder), a class
    folder that yields no image (empty or only formats timm skips), which shifts every later index.
    """
    from timm.utils.misc import natural_key

    parents = {os.path.dirname(path) for path, _ in reader.samples}
    rel = {p: os.path.relpath(p, folder) for p in parents}
    hidden = sorted(r for r in rel.values() if _is_hidden(r))
    if hidden:
        raise UsageError(f"image folder {folder} has images in hidden folder{'s' if len(hidden) > 1 else ''} "
                         f"{_class_list(hidden)}: they would be read as a class of that name; move the images "
                         f"into class folders or delete {'those folders' if len(hidden) > 1 else 'the folder'}")
    rel_set = set(rel.values())
    for r in sorted(rel_set):
        parts = r.split(os.sep)
        for k in range(1, len(parts)):
            outer = os.sep.join(parts[:k])
            if outer in rel_set:
                raise UsageError(f"image folder {folder}: '{outer}' holds images and so does its subfolder '{r}'; "
                                 f"an image's class is the folder it is in, so those would be another class "
                                 f"'{parts[-1]}': move the subfolder's images up into '{outer}' or out of the split")
    by_name: Dict[str, List[str]] = {}
    for r in rel_set:
        by_name.setdefault(os.path.basename(r), []).append(r)
    merged = {name: sorted(rs) for name, rs in by_name.items() if len(rs) > 1}
    if merged:
        name, rs = sorted(merged.items())[0]
        raise UsageError(f"image folder {folder}: the folders {_class_list(rs, 3)} are all read as class '{name}' "
                         f"(an image's class is the name of the folder it is in), so their images would be merged "
                         f"into one class; the layout is <split>/<class>/<image>: point DIR at the folder that "
                         f"holds the split folders (or at one split), with one folder per class")
    by_real: Dict[str, List[str]] = {}
    for p, r in rel.items():
        by_real.setdefault(os.path.realpath(p), []).append(r)
    aliases = sorted(sorted(rs) for rs in by_real.values() if len(rs) > 1)
    if aliases:
        raise UsageError(f"image folder {folder}: the class folders {_class_list(aliases[0], 3)} are the same "
                         f"folder (a symbolic link), so the same images would be in two classes: remove the link "
                         f"or make a real copy if that is intended")
    if not class_map:
        by_key: Dict[str, List[str]] = {}
        for c in reader.class_to_idx:
            by_key.setdefault(repr(natural_key(c)), []).append(c)
        ties = sorted(sorted(cs) for cs in by_key.values() if len(cs) > 1)
        if ties:
            raise UsageError(f"image folder {folder}: the class folders {_class_list(ties[0], 3)} sort as equal "
                             f"(class indices are the folder names sorted without case and leading zeros), so "
                             f"their indices could change from run to run: rename one, or pass --class-map FILE "
                             f"(the class names, one per line, in the model's order)")
    _check_class_folders_have_images(reader, folder, rel_set, class_map)


def _check_class_folders_have_images(reader: Any, folder: str, rel_set: set, class_map: Optional[str]) -> None:
    """Standard layout: every non-hidden folder in the split folder is a class and must yield an image (with
    ``--class-map`` the indices are by name, so an empty folder is harmless). Images in formats timm skips,
    beside read images of their class, get one warning."""
    standard = all(os.sep not in r for r in rel_set)
    unread = {os.path.relpath(p, folder): c for p, c in getattr(reader, "unread", {}).items()}
    unread = {r: c for r, c in unread.items() if not _is_hidden(r)}
    if standard and not class_map:
        no_images = [d for d in _class_folders(folder) if d not in rel_set]
        if no_images:
            from timm.utils.misc import natural_key

            no_images.sort(key=natural_key)
            described = "; ".join(f"'{d}' ({_describe_folder(os.path.join(folder, d))})" for d in no_images[:5])
            more = f"; ... ({len(no_images) - 5} more)" if len(no_images) > 5 else ""
            raise UsageError(f"image folder {folder}: class folder{'s' if len(no_images) > 1 else ''} {described}"
                             f"{more} yield{'' if len(no_images) > 1 else 's'} no image ({_unread_note()}), so "
                             f"every class after {'them' if len(no_images) > 1 else 'it'} would get another index: "
                             f"add images, convert the images to .png or .jpg, delete the folder, or pass "
                             f"--class-map FILE (the class names, one per line: indices by name)")
    if unread:
        total: Dict[str, int] = {}
        for counts in unread.values():
            for ext, n in counts.items():
                total[ext] = total.get(ext, 0) + n
        where = ", ".join(f"'{r}'" for r in sorted(unread)[:3]) + (", ..." if len(unread) > 3 else "")
        _logger.warning("image folder %s: skipping %s in %s (%s): convert them to .png or .jpg to use them",
                        folder, _describe_counts(total), where, _unread_note())


def _check_no_split_slice(split: str) -> None:
    """TFDS slices (``validation[:1000]``) do not apply to an image folder: it would be read whole."""
    if "[" in split:
        raise UsageError(f"split '{split}': slices work for tfds/ datasets only; an image folder split is read "
                         f"whole: pass --split/--train-split/--val-split {split.split('[')[0]} (validate.py: "
                         f"--num-examples N evaluates the first N images)")


def create_folder_dataset(root: str, split: str, is_training: bool,
                          class_map: Optional[str] = None) -> StrictImageDataset:
    """An image-folder split as a :class:`StrictImageDataset`, with the split, layout and class checks."""
    _check_no_split_slice(split)
    folder = resolve_split_folder(root, split)
    try:
        reader = read_image_folder(folder)
    except (RuntimeError, OSError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot load dataset 'image folder' split '{split}' from {root}: {msg}") from None
    if not reader.samples:
        raise UsageError(f"image folder {folder} holds no image ({_describe_folder(folder)}; {_unread_note()}): "
                         f"the layout is <split>/<class>/<image>")
    _check_no_loose_images(reader, folder)
    _check_layout(reader, folder, class_map)
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
