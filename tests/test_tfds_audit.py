"""Bad input in the TFDS lane (tfds/ datasets and the builders of datasets/): one error line, no traceback, no
silently wrong dataset, no damage to a build already there."""
import importlib.util
import io
import os
import tarfile

import numpy as np
import pytest
import timm  # noqa: F401  (torch / torchvision / timm before tensorflow, or the process segfaults)
import torch
import torchvision  # noqa: F401

pytest.importorskip("tensorflow", reason="needs tensorflow (pip install -r requirements-tfds.txt)")
tfds = pytest.importorskip("tensorflow_datasets", reason="needs tensorflow-datasets (requirements-tfds.txt)")

from src.errors import UsageError, run_cli  # noqa: E402
from tests.tfds_fixtures import DATASETS, build_with_python, write_ddpm_manual, write_imagenet_archives  # noqa: E402

pytestmark = [pytest.mark.tfds, pytest.mark.usefixtures("single_cpu_thread")]
N = 16


@pytest.fixture(scope="module")
def ddpm(tmp_path_factory):
    """tfds/cifar_ddpm of 16 noise images, and a 10-class test_vit checkpoint."""
    root = tmp_path_factory.mktemp("audit")
    write_ddpm_manual(str(root / "manual"), N)
    build_with_python("cifar_ddpm", str(root / "data"), str(root / "manual"))
    torch.manual_seed(0)
    ckpt = str(root / "m.pth")
    torch.save(timm.create_model("test_vit", num_classes=10, img_size=32).state_dict(), ckpt)
    return {"root": root, "data": str(root / "data"), "manual": str(root / "manual"), "ckpt": ckpt}


def _error_lines(err):
    assert "Traceback" not in err, err[-3000:]
    return [ln for ln in err.strip().splitlines() if ln.startswith("error: ")]


# ----------------------------------------------------------------------------------------------
# empty slices: TFDS accepts them when the dataset is opened and raises at the first batch


@pytest.mark.parametrize("split", ["train[5:5]", f"train[{N}:]", "train[:0%]"])
def test_empty_tfds_slice_in_validate_is_one_line(ddpm, tmp_path, capsys, split):
    """validate.py on an empty slice ended in TFDS's 'ValueError: Instruction [] corresponds to no data!'."""
    import validate

    argv = [ddpm["data"], "--dataset", "tfds/cifar_ddpm", "--split", split, "-m", "test_vit", "--num-classes", "10",
            "--input-size", "3", "32", "32", "--checkpoint", ddpm["ckpt"], "-j", "0", "--log-freq", "0",
            "--results-file", str(tmp_path / "r.csv")]
    assert run_cli(validate.main, argv) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and f"split '{split}' selects no examples of tfds/cifar_ddpm" in lines[0], lines
    assert f"train ({N} examples)" in lines[0] and not (tmp_path / "r.csv").exists()


@pytest.mark.parametrize("is_training", [True, False])
def test_empty_tfds_slice_is_refused_when_the_dataset_is_created(ddpm, is_training):
    """The layer every CLI goes through (train.py's --train-split / --val-split, validate.py, attack_effectiveness)."""
    from src.data import create_dataset

    with pytest.raises(UsageError, match=r"split 'train\[3:3\]' selects no examples"):
        create_dataset("tfds/cifar_ddpm", ddpm["data"], "train[3:3]", is_training=is_training, batch_size=4)
    assert len(create_dataset("tfds/cifar_ddpm", ddpm["data"], "train[3:4]", is_training=False)) == 1


# ----------------------------------------------------------------------------------------------
# datasets/build.py, in process


def _build_cli():
    spec = importlib.util.spec_from_file_location("tfds_build_cli", os.path.join(DATASETS, "build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(argv, capsys):
    """Run datasets/build.py's main in this process; (exit code, stderr)."""
    from tensorflow_datasets.scripts.cli import build, cli_utils

    cli = _build_cli()
    args = cli_utils.make_flags_parser(build.Args, description="build")(["build.py"] + list(argv))
    try:
        cli.main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def _ddpm_manual(root, labels=None, images=None, labels_bytes=None):
    folder = os.path.join(str(root), "cifar10_ddpm_serialized")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.RandomState(1)
    labels = rng.randint(0, 10, 6) if labels is None else labels
    images = rng.randint(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8) if images is None else images
    images.tofile(os.path.join(folder, "cifar_ddpm_improvedddpm_sorted_images.bin"))
    path = os.path.join(folder, "cifar_ddpm_improvedddpm_sorted_labels.npy")
    np.save(path, labels)
    if labels_bytes is not None:
        with open(path, "wb") as f:
            f.write(labels_bytes)
    return str(root)


@pytest.mark.parametrize("labels, labels_bytes, message", [
    (np.array([0, 3, -1, 2]), None, "has 1 label(s) outside 0-9 (first: -1 at index 2)"),  # was stored as -1
    (np.array([0, 10, 11, 2]), None, "has 2 label(s) outside 0-9 (first: 10 at index 1)"),  # was a traceback
    (np.array([0.5, 3.7, 1.0]), None, "holds float64 values; the labels must be integers"),  # was truncated
    (np.array([1, 2]), b"\x93NUMPY\x01\x00v\x00{'descr'", "as a .npy array (EOF: reading array header"),
    (np.array([1, 2]), b"label,0\n", "as a .npy array ("),
    (np.array([], np.int64), None, "holds no labels (an empty array)"),  # was TFDS's AssertionError traceback
])
def test_cifar_ddpm_bad_labels_are_one_line_and_build_nothing(tmp_path, capsys, labels, labels_bytes, message):
    manual = _ddpm_manual(tmp_path / "manual", labels=labels, labels_bytes=labels_bytes)
    data = tmp_path / "data"
    code, err = _build([os.path.join(DATASETS, "cifar_ddpm"), "--manual_dir", manual, "--data_dir", str(data)],
                       capsys)
    lines = _error_lines(err)
    assert code == 2 and len(lines) == 1 and message in lines[0], err[-2000:]
    assert lines[0].startswith("error: cifar_ddpm: ") and "cifar_ddpm_improvedddpm_sorted_labels.npy" in lines[0]
    assert not (data / "cifar_ddpm" / "1.0.0").exists()


def test_cifar_ddpm_size_mismatch_is_one_line_in_the_cli(tmp_path, capsys):
    manual = _ddpm_manual(tmp_path / "manual", labels=np.arange(4),
                          images=np.zeros((3, 32, 32, 3), np.uint8))
    code, err = _build([os.path.join(DATASETS, "cifar_ddpm"), "--manual_dir", manual, "--data_dir",
                        str(tmp_path / "data")], capsys)
    lines = _error_lines(err)
    assert code == 2 and len(lines) == 1 and "has 9216 bytes but" in lines[0] and "lists 4 images" in lines[0]


RB = ["ILSVRC2012_val_00015253.JPEG", "ILSVRC2012_val_00020685.JPEG"]  # two RobustBench ids


def _add(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def _damage(manual, how):
    val = os.path.join(manual, "ILSVRC2012_img_val.tar")
    train = os.path.join(manual, "ILSVRC2012_img_train.tar")
    if how == "truncated":
        with open(val, "r+b") as f:
            f.truncate(700)  # inside the first image
    elif how == "empty":
        open(val, "wb").close()
    elif how == "not an image":
        with tarfile.open(val, "w") as tar:
            _add(tar, RB[0], b"<html>403 Forbidden</html>")
    elif how == "stray file":  # image_net_subset labels validation files by their number
        with tarfile.open(val, "a") as tar:
            _add(tar, "README.txt", b"notes")
    elif how == "class archive not a tar":
        with tarfile.open(train, "w") as tar:
            _add(tar, "n01484850.tar", b"not a tar at all" * 64)
    elif how == "file twice":  # e.g. two archives concatenated
        with tarfile.open(val, "a") as tar:
            _add(tar, RB[0], _jpeg_bytes())
    elif how == "class archive twice":
        with tarfile.open(train) as tar:
            inner = tar.extractfile("n01484850.tar").read()
        with tarfile.open(train, "a") as tar:
            _add(tar, "n01484850.tar", inner)
    elif how == "none kept":  # validation images of other classes only
        with tarfile.open(val, "w") as tar:
            _add(tar, OTHER_VAL, _jpeg_bytes())
    elif how == "no class kept":  # class archives of other classes only
        with tarfile.open(train, "w") as tar:
            _add(tar, "n01440764.tar", b"")
    elif how == "huge image":  # only the PNG header: 20000 x 10000 pixels, more than PIL decodes
        with tarfile.open(val, "w") as tar:
            _add(tar, RB[0], _png_header(20000, 10000))
    return train if how.startswith(("class archive", "no class")) else val


OTHER_VAL = "ILSVRC2012_val_00000001.JPEG"  # class n01751748: neither a RobustBench image nor a subset class


def _jpeg_bytes():
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _png_header(width, height):
    """A PNG signature and IHDR chunk (8-bit RGB) and an empty IEND: what PIL reads to open a PNG."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) \
        + chunk(b"IEND", b"")


@pytest.mark.parametrize("builder, how, message", [
    ("robustbench_image_net", "truncated", "cannot read {archive}: unexpected end of data"),
    ("robustbench_image_net", "empty", "cannot read {archive}: "),
    ("robustbench_image_net", "not an image", f"{RB[0]} in {{archive}} is not an image PIL can read"),
    ("image_net_subset", "stray file", "README.txt is not an ImageNet validation file name"),
    ("image_net_subset", "class archive not a tar", "cannot read n01484850.tar in {archive}: "),
    # TFDS stopped at the end of the split with 'AssertionError: ... Two examples share the same hashed key!'
    ("robustbench_image_net", "file twice", f"{RB[0]} is in {{archive}} twice; each of the RobustBench images must "
                                           "be there once"),
    ("image_net_subset", "class archive twice", "n01484850_0.JPEG is in {archive} twice; each of the training "
                                                "images of image_net_subset's 100 classes must be there once"),
    # TFDS stopped with 'AssertionError: Failed to finalize writing of split ...: No examples were yielded.'
    ("robustbench_image_net", "none kept", "{archive} holds none of the RobustBench images"),
    ("image_net_subset", "none kept", "{archive} holds none of the validation images of image_net_subset's 100"),
    ("image_net_subset", "no class kept", "{archive} holds none of the training images of image_net_subset's 100"),
    # PIL's DecompressionBombError traceback
    ("robustbench_image_net", "huge image", f"{RB[0]} in {{archive}} is too large to decode: Image size (200000000 "
                                            "pixels) exceeds limit"),
])
def test_damaged_imagenet_archives_are_one_line(tmp_path, capsys, builder, how, message):
    """A damaged archive ended in tarfile's traceback mid-build; a file that is not an image was stored and
    failed only when the dataset was read."""
    manual = str(tmp_path / "manual")
    write_imagenet_archives(manual, {"n01484850": 2}, RB)
    archive = _damage(manual, how)
    data = tmp_path / "data"
    code, err = _build([os.path.join(DATASETS, builder), "--manual_dir", manual, "--data_dir", str(data)], capsys)
    lines = _error_lines(err)
    assert code == 2 and len(lines) == 1 and message.format(archive=archive) in lines[0], err[-2000:]
    assert not (data / builder / "5.1.0").exists()


@pytest.fixture
def robust_vits_warnings():
    """The warnings of the project's logger, whether or not an earlier test made it stop propagating."""
    import logging

    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("robust_vits")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def test_partial_imagenet_archives_build_with_a_warning(tmp_path, capsys, robust_vits_warnings):
    """Archives lacking some of the RobustBench images or of the subset's classes built a smaller dataset without
    a word (validate.py then reports accuracy over it as if it were the benchmark)."""
    manual = str(tmp_path / "manual")
    write_imagenet_archives(manual, {"n01484850": 2, "n07860988": 1, "n01440764": 1},
                            RB + ["ILSVRC2012_val_00004059.JPEG"])  # the last: RobustBench's, of a subset class
    data = tmp_path / "data"
    for builder in ("robustbench_image_net", "image_net_subset"):
        assert _build([os.path.join(DATASETS, builder), "--manual_dir", manual, "--data_dir", str(data)],
                      capsys)[0] == 0
    warnings = [r.getMessage() for r in robust_vits_warnings]
    val, train = os.path.join(manual, "ILSVRC2012_img_val.tar"), os.path.join(manual, "ILSVRC2012_img_train.tar")
    assert warnings == [
        f"{val} held 3 of the 5000 RobustBench images (first missing: ILSVRC2012_val_00000011.JPEG); the split is "
        "built without the others",
        f"{train} held 2 of the 100 classes of image_net_subset (synsets.txt) (first missing: n01532829); the split "
        "is built without the others",
        f"{val} held 1 of the 5000 validation images of image_net_subset's 100 classes (first missing: "
        "ILSVRC2012_val_00000004.JPEG); the split is built without the others"], warnings
    splits = {b: {s: v.num_examples for s, v in tfds.builder(b, data_dir=str(data)).info.splits.items()}
              for b in ("robustbench_image_net", "image_net_subset")}
    assert splits == {"robustbench_image_net": {"validation": 3}, "image_net_subset": {"train": 3, "validation": 1}}


# ----------------------------------------------------------------------------------------------
# --overwrite: TFDS deleted the existing build before generating the new one


def _read_labels(data):
    builder = tfds.builder("cifar_ddpm", data_dir=str(data))
    return sorted(int(ex["label"]) for ex in tfds.as_numpy(builder.as_dataset(split="train", shuffle_files=False)))


def test_failed_overwrite_keeps_the_previous_build(tmp_path, capsys):
    data = tmp_path / "data"
    good = _ddpm_manual(tmp_path / "good", labels=np.array([1, 2, 3]))
    assert _build([os.path.join(DATASETS, "cifar_ddpm"), "--manual_dir", good, "--data_dir", str(data)],
                  capsys)[0] == 0
    version = data / "cifar_ddpm" / "1.0.0"
    before = {p.name: p.read_bytes() for p in version.iterdir()}
    bad = _ddpm_manual(tmp_path / "bad", labels=np.array([1, 12]))
    code, err = _build([os.path.join(DATASETS, "cifar_ddpm"), "--manual_dir", bad, "--data_dir", str(data),
                        "--overwrite"], capsys)
    assert code == 2 and "outside 0-9" in _error_lines(err)[0]
    assert "the previous build is back in place" in err
    assert {p.name: p.read_bytes() for p in version.iterdir()} == before  # the first build, untouched
    assert sorted(os.listdir(data / "cifar_ddpm")) == ["1.0.0"] and _read_labels(data) == [1, 2, 3]
    # a completed --overwrite build replaces it, and leaves nothing else behind
    other = _ddpm_manual(tmp_path / "other", labels=np.array([7, 8]))
    assert _build([os.path.join(DATASETS, "cifar_ddpm"), "--manual_dir", other, "--data_dir", str(data),
                   "--overwrite"], capsys)[0] == 0
    assert sorted(os.listdir(data / "cifar_ddpm")) == ["1.0.0"] and _read_labels(data) == [7, 8]


def test_overwrite_refuses_to_clobber_a_build_left_aside_by_an_interrupted_one(tmp_path, capsys):
    data = tmp_path / "data"
    good = _ddpm_manual(tmp_path / "good", labels=np.array([4, 5]))
    assert _build([os.path.join(DATASETS, "cifar_ddpm"), "--manual_dir", good, "--data_dir", str(data)],
                  capsys)[0] == 0
    aside = data / "cifar_ddpm" / "1.0.0.replaced-by-overwrite"
    aside.mkdir()
    (aside / "dataset_info.json").write_text("{}")
    code, err = _build([os.path.join(DATASETS, "cifar_ddpm"), "--manual_dir", good, "--data_dir", str(data),
                        "--overwrite"], capsys)
    lines = _error_lines(err)
    assert code == 2 and len(lines) == 1 and f"{aside} holds the build an interrupted --overwrite" in lines[0]
    assert (aside / "dataset_info.json").read_text() == "{}" and _read_labels(data) == [4, 5]
    # the folder left aside is not a build: "built there" lists 1.0.0 only
    from src import tfds_data

    assert tfds_data.built_versions("cifar_ddpm", str(data)) == ["1.0.0"]
    assert tfds_data.missing_build_message("tfds/cifar_ddpm:2.0.0", str(data)).endswith("(built there: 1.0.0)")


def test_a_build_a_killed_overwrite_left_aside_is_named_by_the_readers_and_not_built_over(tmp_path, capsys):
    """SIGKILL during `build.py --overwrite` leaves the previous build in <version>.replaced-by-overwrite and no
    <version>: the readers said 'not built' and a plain rebuild made a new build next to it, the old one forgotten."""
    from src.data import create_dataset

    data = tmp_path / "data"
    good = _ddpm_manual(tmp_path / "good", labels=np.array([4, 5]))
    assert _build([os.path.join(DATASETS, "cifar_ddpm"), "--manual_dir", good, "--data_dir", str(data)],
                  capsys)[0] == 0
    version = data / "cifar_ddpm" / "1.0.0"
    aside = data / "cifar_ddpm" / "1.0.0.replaced-by-overwrite"
    version.rename(aside)  # where the killed run stopped: the new build was still in TFDS's temporary folder
    with pytest.raises(UsageError) as e:
        create_dataset("tfds/cifar_ddpm", str(data), "train", is_training=False)
    assert str(e.value) == ("cannot load dataset 'tfds/cifar_ddpm' split 'train': tfds/cifar_ddpm: the build 1.0.0 in "
                            f"{data} was moved aside to 1.0.0.replaced-by-overwrite by a --overwrite build that was "
                            "killed; move it back to 1.0.0 (or delete it and build again)")
    for extra in ([], ["--overwrite"]):
        code, err = _build([os.path.join(DATASETS, "cifar_ddpm"), "--manual_dir", good, "--data_dir", str(data)]
                           + extra, capsys)
        lines = _error_lines(err)
        assert code == 2 and len(lines) == 1 and f"{aside} holds the build an interrupted --overwrite" in lines[0]
        assert sorted(os.listdir(data / "cifar_ddpm")) == ["1.0.0.replaced-by-overwrite"]
    aside.rename(version)
    assert len(create_dataset("tfds/cifar_ddpm", str(data), "train", is_training=False)) == 2


# ----------------------------------------------------------------------------------------------
# --combine-dataset: its class count was never checked against the model's outputs


def test_combine_dataset_with_more_classes_than_the_model_is_one_line(ddpm, tmp_path):
    """A 2-class image folder trained with tfds/cifar_ddpm (10 classes) mixed in and --num-classes 2: the
    second dataset's labels 2-9 reached the loss (IndexError at the first batch, a device assert on CUDA)."""
    from PIL import Image

    from src import data as D
    from src.arg_parser import parse_args

    for split in ("train", "validation"):
        for label in ("a", "b"):
            folder = tmp_path / "folder" / split / label
            folder.mkdir(parents=True)
            for i in range(4):
                Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(str(folder / f"{i}.png"))
    args, _ = parse_args([str(tmp_path / "folder"), "--combine-dataset", "tfds/cifar_ddpm", "--combine-data-dir",
                          ddpm["data"], "--combined-dataset-ratio", "0.5", "-b", "4", "--no-aug", "--workers", "0"])
    cfg = {"input_size": (3, 32, 32), "crop_pct": 1.0, "interpolation": "bilinear"}
    with pytest.raises(UsageError, match=r"^--combine-dataset tfds/cifar_ddpm has 10 classes but the model has 2 "
                                         r"outputs; pass --num-classes 10$"):
        D.create_train_loaders(args, cfg, world_size=1, rank=0, num_classes=2)
    train_loader, _ = D.create_train_loaders(args, cfg, world_size=1, rank=0, num_classes=10)
    assert len(train_loader) == 4


def test_ctrl_c_during_a_build_is_one_line_and_keeps_the_previous_build(tmp_path, capsys, monkeypatch):
    """Ctrl-C in datasets/build.py ended in absl's KeyboardInterrupt traceback; now 'interrupted: ...', exit 130,
    and an --overwrite build that was stopped puts the previous build back."""
    from tensorflow_datasets.scripts.cli import build

    data = tmp_path / "data"
    good = _ddpm_manual(tmp_path / "good", labels=np.array([1, 2, 3]))
    assert _build([os.path.join(DATASETS, "cifar_ddpm"), "--manual_dir", good, "--data_dir", str(data)],
                  capsys)[0] == 0

    def stopped(*_a, **_k):  # after the builder was made (and the old build moved aside), during the build
        raise KeyboardInterrupt
    monkeypatch.setattr(build, "_download_and_prepare", stopped)
    code, err = _build([os.path.join(DATASETS, "cifar_ddpm"), "--manual_dir", good, "--data_dir", str(data),
                        "--overwrite"], capsys)
    assert code == 130 and "Traceback" not in err
    assert "interrupted: stopped by Ctrl-C (SIGINT)" in err.splitlines()
    assert "the previous build is back in place" in err
    assert sorted(os.listdir(data / "cifar_ddpm")) == ["1.0.0"] and _read_labels(data) == [1, 2, 3]


def test_a_build_with_another_label_order_is_read_with_a_warning(tmp_path, capsys, robust_vits_warnings):
    """The original's image_net_subset (version 5.1.0 too) ordered its synsets by Python's string hashing; read here,
    its label i silently meant another class than line i of synsets.txt (a checkpoint trained on one build scored
    against the wrong labels on the other)."""
    from src.data import create_dataset
    from src.tfds_imagenet import read_subset_synsets

    manual, data = str(tmp_path / "manual"), tmp_path / "data"
    write_imagenet_archives(manual, {"n01484850": 1, "n07860988": 1}, ["ILSVRC2012_val_00004059.JPEG"])
    assert _build([os.path.join(DATASETS, "image_net_subset"), "--manual_dir", manual, "--data_dir", str(data)],
                  capsys)[0] == 0
    robust_vits_warnings.clear()  # the build's own (2 of the 100 classes)
    create_dataset("tfds/image_net_subset", str(data), "train", is_training=False)
    assert robust_vits_warnings == []  # this builder's own build
    synsets = read_subset_synsets()
    names = data / "image_net_subset" / "5.1.0" / "label.labels.txt"
    assert names.read_text().split() == synsets
    names.write_text("\n".join(synsets[1:] + synsets[:1]) + "\n")  # the same classes, another order
    create_dataset("tfds/image_net_subset", str(data), "train", is_training=False)
    assert [r.getMessage() for r in robust_vits_warnings] == [
        f"tfds/image_net_subset in {data} was not built by datasets/image_net_subset (but by an older or the original "
        f"builder?): it stores the same classes in another order (label 0 is {synsets[1]} there, {synsets[0]} here), "
        "so a model trained on one of the two builds is scored against the wrong labels on the other; rebuild it "
        "with python datasets/build.py datasets/image_net_subset --overwrite"]
