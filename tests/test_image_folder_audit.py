"""Image folders whose labels timm's reader would get silently wrong, tried through the CLIs and the reader.

timm's folder reader numbers the folders in which it *found* .png / .jpg / .jpeg images: a class folder that
is empty or holds only other formats disappears and every later class index shifts. Around it: hidden folders,
images in a folder and in its subfolder, folders of the same name in a nested layout, symlinked class folders,
class names that sort as equal, a class map with blank or repeated lines, split folders spelt in another case,
TFDS slices on a folder, broken image links, and RobustBench's ImageNet images.
"""
from __future__ import annotations

import os
import shutil
import unicodedata

import numpy as np
import pytest
import torch
from PIL import Image

import train as train_cli
import validate as validate_cli
from src.data import create_dataset
from src.errors import UsageError
from src.image_folder import ImageReadError, load_rgb_image, read_image_folder
from tests.test_silent_errors import (MODEL, TRAIN, assert_clean_error, cli, tree, world,  # noqa: F401 - fixture
                                      write_split)

pytestmark = pytest.mark.usefixtures("single_cpu_thread")


def _png(path, value: int = 0, mode: str = "RGB", fmt=None) -> None:
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).convert(mode).save(str(path), format=fmt)


def _labels(ds) -> dict:
    """{relative file: label} of an image-folder dataset."""
    return {os.path.relpath(f, ds.folder): t for f, t in ds.reader.samples}


def _validate(root, world, capsys, *extra):
    return cli(validate_cli.main, [root, "--dataset", "", "--checkpoint", world / "ok.pth.tar"] + MODEL
               + list(extra), capsys)


# ----------------------------------------------------------------------------------------------
# class folders that yield no image


@pytest.mark.parametrize("content,described", [
    ({}, "(empty)"),
    ({"a.webp": "WEBP", "b.webp": "WEBP", "c.webp": "WEBP"}, "(3 .webp files)"),
    ({"a.bmp": "BMP", "b.tif": "TIFF", "notes.txt": None}, "(1 .bmp file, 1 .tif file, 1 other file)"),
])
def test_class_folder_without_readable_images_is_an_error(world, tmp_path, capsys, content, described):
    """validate.py: the folder was dropped and the error said '9 class folders' beside 10 folders; now it names
    the folder and what it holds, and --class-map (indices by name) accepts it with the right labels."""
    root = tmp_path / "root"
    write_split(root, "validation", 1, source="validation")
    shutil.rmtree(root / "validation" / "3")
    os.makedirs(root / "validation" / "3")
    for name, fmt in content.items():
        if fmt:
            _png(root / "validation" / "3" / name, fmt=fmt)
        else:
            (root / "validation" / "3" / name).write_text("x")
    before = tree(root)
    rc, _, err = _validate(root, world, capsys)
    assert_clean_error(rc, err, str(root / "validation"), f"'3' {described}", "only .png, .jpg, .jpeg are read",
                       "--class-map")
    cmap = tmp_path / "classes.txt"
    cmap.write_text("".join(f"{c}\n" for c in range(10)))
    ds = create_dataset("", str(root), "validation", is_training=False, class_map=str(cmap))
    assert _labels(ds) == {f"{c}/0.png": c for c in range(10) if c != 3}  # 4..9 keep their indices
    rc, _, err = _validate(root, world, capsys, "--class-map", cmap)
    assert rc == 0, err
    assert tree(root) == before


def test_train_refuses_an_empty_class_folder_in_both_splits(world, tmp_path, capsys):
    """Both splits lacking the images of class 3 agreed with each other, so training ran with classes 4..9 at
    indices 3..8 (and --num-classes 10), silently."""
    root = tmp_path / "root"
    write_split(root, "train", 2)
    write_split(root, "validation", 1, source="validation")
    for split in ("train", "validation"):
        shutil.rmtree(root / split / "3")
        os.makedirs(root / split / "3")
    out = tmp_path / "out"
    rc, _, err = cli(train_cli.main, [root] + TRAIN + ["--epochs", "1", "--output", out], capsys)
    assert_clean_error(rc, err, str(root / "train"), "'3' (empty)")
    assert not out.exists() or not any(out.iterdir())


def test_several_empty_class_folders_are_listed_with_a_count(tmp_path):
    for c in range(12):
        os.makedirs(tmp_path / f"c{c}")
    _png(tmp_path / "c0" / "0.png")
    with pytest.raises(UsageError, match=r"class folders 'c1' \(empty\); .*'c5' \(empty\); \.\.\. \(6 more\) yield "
                                         r"no image"):
        create_dataset("", str(tmp_path), "validation", is_training=False)


def test_class_folder_that_cannot_be_listed(tmp_path, monkeypatch):
    """os.walk skips a folder it may not list (no read permission) without a word: a vanished class. Simulated
    with a patched os.scandir, as the tests may run as root, which may list every folder."""
    for c in "abc":
        _png(tmp_path / c / "0.png")
    real = os.scandir
    locked = str(tmp_path / "b")

    def scandir(path="."):
        if os.fspath(path).rstrip("/") == locked:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(UsageError, match=r"'b' \(cannot be listed: Permission denied\)"):
        create_dataset("", str(tmp_path), "validation", is_training=False)


def test_whole_split_in_an_unread_format(tmp_path):
    for c in "ab":
        _png(tmp_path / c / "0.webp", fmt="WEBP")
    with pytest.raises(UsageError, match=r"holds no image \(2 \.webp files; only \.png, \.jpg, \.jpeg are read\)"):
        create_dataset("", str(tmp_path), "validation", is_training=False)


def test_unread_images_beside_read_ones_warn_once(tmp_path, caplog):
    """A class half .jpg, half .webp trains on half its images: one warning line says so."""
    _png(tmp_path / "a" / "0.png")
    _png(tmp_path / "a" / "1.webp", fmt="WEBP")
    _png(tmp_path / "a" / "2.WEBP", fmt="WEBP")
    _png(tmp_path / "b" / "0.jpg")
    with caplog.at_level("WARNING", logger="robust_vits"):
        ds = create_dataset("", str(tmp_path), "validation", is_training=False)
    assert _labels(ds) == {"a/0.png": 0, "b/0.jpg": 1}
    warnings = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(warnings) == 1 and "2 .webp files in 'a'" in warnings[0], warnings


def test_reader_matches_timm_and_walks_the_split_once(tmp_path, monkeypatch):
    """Same samples, order and class indices as timm's ReaderImageFolder, from one os.walk over the split."""
    from timm.data.readers.reader_image_folder import ReaderImageFolder

    for rel in ("x/b10/1.png", "x/b10/0.JPG", "x/b2/z.jpeg", "x/b2/y.webp", "y/A/3.png", "y/c/q.bmp", "y/c/r.png"):
        _png(tmp_path / rel, fmt="WEBP" if rel.endswith("webp") else "BMP" if rel.endswith("bmp") else None)
    walks = []
    real_walk = os.walk

    def walk(top, *a, **k):
        walks.append(os.fspath(top))
        return real_walk(top, *a, **k)

    monkeypatch.setattr(os, "walk", walk)
    ours = read_image_folder(str(tmp_path))
    assert walks == [str(tmp_path)]
    monkeypatch.setattr(os, "walk", real_walk)
    theirs = ReaderImageFolder(str(tmp_path))
    assert ours.samples == theirs.samples and ours.class_to_idx == theirs.class_to_idx
    assert {os.path.relpath(k, str(tmp_path)): v for k, v in ours.unread.items()} == {"x/b2": {".webp": 1},
                                                                                      "y/c": {".bmp": 1}}


# ----------------------------------------------------------------------------------------------
# hidden folders


def test_hidden_folders_are_no_classes(world, tmp_path, capsys):
    """An empty .ipynb_checkpoints in train/ made validate.py report a 'missing' class; one in the evaluation
    split turned off the comparison with the training split."""
    root = tmp_path / "root"
    write_split(root, "train", 1)
    write_split(root, "validation", 1, source="validation")
    os.makedirs(root / "train" / ".ipynb_checkpoints")
    rc, _, err = _validate(root, world, capsys)
    assert rc == 0, err
    os.makedirs(root / "validation" / ".ipynb_checkpoints")
    shutil.rmtree(root / "validation" / "3")
    rc, _, err = _validate(root, world, capsys)
    assert_clean_error(rc, err, "missing '3'")


def test_images_in_a_hidden_folder_are_an_error(tmp_path):
    _png(tmp_path / "a" / "0.png")
    _png(tmp_path / ".thumbnails" / "0.png")
    with pytest.raises(UsageError, match=r"hidden folder '\.thumbnails'"):
        create_dataset("", str(tmp_path), "validation", is_training=False)


# ----------------------------------------------------------------------------------------------
# nested layouts, symbolic links, names that sort as equal


@pytest.mark.parametrize("rels,needle", [
    (("n01/images/0.png", "n02/images/0.png"), "'n01/images', 'n02/images' are all read as class 'images'"),
    (("Train/cat/0.png", "Train/dog/0.png", "Val/cat/0.png", "Val/dog/0.png"), "has Train/, Val/"),
    (("imagenet/train/cat/0.png", "imagenet/val/cat/0.png"), "read as class 'cat'"),  # DIR one level too high
    (("a/0.png", "a/rejected/0.png", "b/0.png"), "'a' holds images and so does its subfolder 'a/rejected'"),
])
def test_nested_layouts_that_merge_or_invent_classes(tmp_path, rels, needle):
    for rel in rels:
        _png(tmp_path / rel)
    with pytest.raises(UsageError, match=None) as e:
        create_dataset("", str(tmp_path), "validation", is_training=False)
    assert needle in str(e.value)


def test_unambiguous_nested_layout_still_works(tmp_path):
    for rel in ("animals/cat/0.png", "animals/dog/0.png", "vehicles/car/0.png"):
        _png(tmp_path / rel)
    ds = create_dataset("", str(tmp_path), "validation", is_training=False)
    assert ds.reader.class_to_idx == {"car": 0, "cat": 1, "dog": 2}


def test_symbolic_links(tmp_path):
    """A link to a folder outside is a class like any other; a second name for a class folder is an error; a
    link loop is stopped and reported, not walked forever."""
    outside = tmp_path / "elsewhere" / "b"
    _png(outside / "0.png")
    root = tmp_path / "root"
    _png(root / "a" / "0.png")
    os.symlink(outside, root / "b")
    ds = create_dataset("", str(root), "validation", is_training=False)
    assert _labels(ds) == {"a/0.png": 0, "b/0.png": 1}
    os.symlink(root / "a", root / "c")
    with pytest.raises(UsageError, match=r"'a', 'c' are the same folder"):
        create_dataset("", str(root), "validation", is_training=False)
    os.remove(root / "c")
    os.symlink("..", root / "a" / "loop")
    with pytest.raises(UsageError, match=r"'a' holds images and so does its subfolder"):
        create_dataset("", str(root), "validation", is_training=False)


@pytest.mark.parametrize("names", [("Cat", "cat", "dog"), ("a1", "a01")])
def test_class_names_that_sort_as_equal(world, tmp_path, names, capsys):
    """timm sorts names ignoring case and leading zeros; the tie is broken by set order, which changes with
    PYTHONHASHSEED, so the two classes could swap indices between train.py and validate.py."""
    for n in names:
        _png(tmp_path / n / "0.png")
    with pytest.raises(UsageError, match="'{}', '{}' sort as equal".format(*sorted(names)[:2])):
        create_dataset("", str(tmp_path), "validation", is_training=False)
    cmap = tmp_path.parent / f"{tmp_path.name}.txt"
    cmap.write_text("\n".join(names) + "\n")
    ds = create_dataset("", str(tmp_path), "validation", is_training=False, class_map=str(cmap))
    assert _labels(ds) == {f"{n}/0.png": i for i, n in enumerate(names)}


def test_unicode_class_names(tmp_path):
    """Names beyond ASCII work; the same name in NFC and NFD (folders copied from macOS) is explained."""
    for split in ("train", "validation"):
        for n in ("café", "naïve", "日本"):
            _png(tmp_path / split / n / "0.png")
    ds = create_dataset("", str(tmp_path), "validation", is_training=False)
    assert sorted(ds.reader.class_to_idx) == sorted(["café", "naïve", "日本"])
    os.rename(tmp_path / "validation" / "café", tmp_path / "validation" / unicodedata.normalize("NFD", "café"))
    with pytest.raises(UsageError, match="Unicode code points"):
        create_dataset("", str(tmp_path), "validation", is_training=False)


# ----------------------------------------------------------------------------------------------
# class maps


@pytest.mark.parametrize("text,needle", [
    ("a\n\nb\nc\n", "line 2 is blank"),        # b, c would move to 2, 3
    ("a\nb\nc\na\n", "'a' is on lines 1 and 4"),  # index 0 unused, a's images labelled 3
])
def test_class_map_blank_or_repeated_lines(tmp_path, text, needle):
    for c in "abc":
        _png(tmp_path / "data" / c / "0.png")
    cmap = tmp_path / "classes.txt"
    cmap.write_text(text)
    with pytest.raises(UsageError, match=needle):
        create_dataset("", str(tmp_path / "data"), "validation", is_training=False, class_map=str(cmap))


def test_class_map_bom_crlf_and_trailing_blank_lines(tmp_path):
    for c in "abc":
        _png(tmp_path / "data" / c / "0.png")
    cmap = tmp_path / "classes.txt"
    cmap.write_bytes("\ufeffc\r\nb\r\na\r\n\r\n\n".encode("utf-8"))
    ds = create_dataset("", str(tmp_path / "data"), "validation", is_training=False, class_map=str(cmap))
    assert _labels(ds) == {"c/0.png": 0, "b/0.png": 1, "a/0.png": 2}


def test_pickled_class_map_with_non_integer_indices(tmp_path):
    import pickle

    _png(tmp_path / "data" / "a" / "0.png")
    cmap = tmp_path / "classes.pkl"
    cmap.write_bytes(pickle.dumps({"a": "0"}))
    with pytest.raises(UsageError, match="non-negative integer indices"):
        create_dataset("", str(tmp_path / "data"), "validation", is_training=False, class_map=str(cmap))


# ----------------------------------------------------------------------------------------------
# split names


def test_tfds_slice_on_an_image_folder_is_an_error(world, capsys):
    """validate.py --split 'validation[:2]' evaluated the whole folder."""
    rc, _, err = _validate(world / "good", world, capsys, "--split", "validation[:2]")
    assert_clean_error(rc, err, "slices work for tfds/ datasets only", "--num-examples")


def test_split_folder_in_another_case(world, tmp_path, capsys):
    """DIR with Train/ and Val/ was read as one split whose classes mixed both folders' images."""
    root = tmp_path / "root"
    write_split(root, "Train", 1)
    write_split(root, "Val", 1, source="validation")
    rc, _, err = _validate(root, world, capsys)
    assert_clean_error(rc, err, "has Train/, Val/", "matched exactly")
    rc, _, err = _validate(root, world, capsys, "--split", "Val")
    assert rc == 0, err


# ----------------------------------------------------------------------------------------------
# files that cannot be opened


@pytest.mark.parametrize("workers", ["0", "1"])
def test_broken_image_link_is_one_error_naming_the_file(world, tmp_path, capsys, workers):
    root = tmp_path / "root"
    shutil.copytree(world / "good", root)
    bad = root / "validation" / "7" / "9.png"
    os.symlink(tmp_path / "gone.png", bad)
    rc, _, err = cli(validate_cli.main, [root, "--dataset", "", "--checkpoint", world / "ok.pth.tar"]
                     + MODEL[:MODEL.index("-j")] + ["-j", workers] + MODEL[MODEL.index("-j") + 2:], capsys)
    assert_clean_error(rc, err, str(bad), "No such file")


@pytest.mark.parametrize("mode", ["RGBA", "P", "LA", "1", "L", "CMYK"])
def test_image_modes_decode_to_8bit_rgb(tmp_path, mode):
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    Image.fromarray(np.full((4, 4, 3), 255, np.uint8)).convert(mode).save(path)
    img = load_rgb_image(str(path), str(path))
    assert img.mode == "RGB" and np.asarray(img).min() >= 250


def test_robustbench_imagenet_unreadable_image_names_the_file(tmp_path):
    """A damaged ImageNet file read in a loader worker gave 'Caught UsageError in DataLoader worker process 0.'"""
    from torchvision import transforms

    from src.robustbench_data import ImageNetSubset, load_chunk

    ids = tmp_path / "ids.txt"
    ids.write_text("n1/a.JPEG\nn2/b.JPEG\n")
    cmap = tmp_path / "map.json"
    cmap.write_text('{"n1": 0, "n2": 1}')
    _png(tmp_path / "data" / "val" / "n1" / "a.JPEG", fmt="JPEG")
    os.makedirs(tmp_path / "data" / "val" / "n2")
    (tmp_path / "data" / "val" / "n2" / "b.JPEG").write_bytes(b"")
    ds = ImageNetSubset(str(tmp_path / "data"), transforms.ToTensor(), 2, ids_file=str(ids),
                        class_map_file=str(cmap))
    assert torch.is_tensor(ds[0][0])
    for workers in (0, 1):
        with pytest.raises(ImageReadError) as e:
            load_chunk(ds, 0, 2, workers)
        assert str(e.value).startswith("cannot read image") and "b.JPEG" in str(e.value), str(e.value)
