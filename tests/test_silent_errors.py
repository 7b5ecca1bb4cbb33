"""No silently wrong results (issue 11, classes 3 and 7), tried through the real CLIs.

Each class of silent failure gets several inputs, each of which must end with exit code 2, exactly
one ``error: ...`` line on stderr, no traceback and every file that existed before byte-identical;
and the legitimate variants next to them must still work:

* image folders: a missing split folder (no fallback to the training images), class folders that
  differ between splits or from ``--class-map`` (shifted labels), corrupt / truncated / empty
  images (no silent replacement by a neighbour), 16-bit PNGs (scaled, not white);
* weights: NaN / inf tensors are refused by validate.py, train.py (``--initial-checkpoint``,
  ``--finetune``), attack_effectiveness.py and prepare_checkpoint.py;
* ``--finetune`` with another architecture's checkpoint (less than half of the backbone loads);
* inputs: NaN pixels are an error, pixels outside the attack's box a warning naming the range;
* formats: the results JSON is strict (``null``, never ``NaN``), and a killed write's temporary
  file is removed by the next run of every result writer.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import zlib

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import attack_effectiveness as ae_cli
import src.models  # noqa: F401 - registers the project's models
import train as train_cli
import validate as validate_cli
from src import storage
from src.bits.device import initialize_device
from src.data import DigitsDataset
from src.engine import evaluate_loop
from src.errors import CheckpointError, run_cli
from src.image_folder import ImageReadError, load_rgb_image
from src.sanity import NonFiniteInputError, check_finite_state_dict
from tests.conftest import TINY_TRAIN
from tests.tiny_models import TinyCNN  # noqa: F401 - registers tiny_cnn_test
from util_scripts import prepare_checkpoint

pytestmark = pytest.mark.usefixtures("single_cpu_thread")

MODEL = ["-m", "test_vit", "--num-classes", "10", "--input-size", "3", "32", "32", "--crop-pct", "1.0",
         "--interpolation", "bicubic", "-j", "0", "--log-freq", "0", "-b", "10"]
# TINY_TRAIN on an image folder (positional DIR, --dataset ''), batches of 10
TRAIN = [a for a in TINY_TRAIN if a != "digits"]
TRAIN[TRAIN.index("--dataset") + 1:TRAIN.index("--dataset") + 1] = [""]
TRAIN[TRAIN.index("-b") + 1] = "10"
TRAIN[TRAIN.index("-vb") + 1] = "10"


# ----------------------------------------------------------------------------------------------
# helpers


def write_split(root, split: str, per_class: int, classes=range(10), source: str = "train") -> None:
    """``<root>/<split>/<class>/<i>.png`` from the embedded digits (8-bit RGB PNGs)."""
    ds = DigitsDataset(source)
    count: dict = {}
    for img, label in zip(ds.images, ds.targets):
        label = int(label)
        if label not in classes or count.get(label, 0) >= per_class:
            continue
        folder = os.path.join(str(root), split, str(label)) if split else os.path.join(str(root), str(label))
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(img).save(os.path.join(folder, f"{count.get(label, 0)}.png"))
        count[label] = count.get(label, 0) + 1


def png16(path, gray: np.ndarray) -> None:
    """A 16-bit grayscale PNG written byte by byte (bit depth 16, colour type 0)."""
    h, w = gray.shape
    raw = b"".join(b"\x00" + gray[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 0, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def tree(root) -> dict:
    """Every file under ``root`` with the hash of its bytes."""
    out = {}
    for dirpath, _dirs, files in os.walk(str(root)):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, str(root))] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def cli(main, argv, capsys):
    rc = run_cli(main, [str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def assert_clean_error(rc: int, err: str, *needles: str) -> str:
    """Exit code 2, one ``error:`` line, no traceback; the line names every needle."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Data folders, checkpoints and an existing results file; tests copy what they damage."""
    base = tmp_path_factory.mktemp("silent")
    good = base / "good"
    write_split(good, "train", 2)
    write_split(good, "validation", 2, source="validation")
    torch.manual_seed(0)
    net = timm.create_model("test_vit", num_classes=10, img_size=32)
    sd = net.state_dict()
    torch.save({"model": sd}, base / "ok.pth.tar")
    nan = {k: v.clone() for k, v in sd.items()}
    nan["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    torch.save({"model": nan, "epoch": 0}, base / "nan.pth.tar")
    inf = {k: v.clone() for k, v in sd.items()}
    inf["head.bias"][3] = float("inf")
    torch.save(inf, base / "inf_bare.pth")
    torch.save({"model": sd, "model_ema": nan}, base / "nan_ema.pth.tar")
    cnn = timm.create_model("tiny_cnn_test", num_classes=10)
    torch.save({"model": cnn.state_dict()}, base / "cnn.pth.tar")
    (base / "results.json").write_text('{"top1": 1.0, "robust_top1": null}\n')  # an earlier validate.py results file
    return base


@pytest.fixture
def snapshot(world):
    """Hashes of every file of the world before the test; the test compares after an error."""
    return tree(world)


def variant(world, tmp_path, name="data"):
    """A private copy of the good data folder to damage."""
    dst = tmp_path / name
    shutil.copytree(world / "good", dst)
    return dst


# ----------------------------------------------------------------------------------------------
# image folders: split folders


@pytest.mark.parametrize("layout,split", [
    (("train",), "validation"),           # the example of the issue
    (("train",), "val"),                  # a synonym of the missing split
    (("train", "test"), "validation"),    # another split folder exists
    (("training", "validation"), "test"),  # a split name that is not there
])
def test_validate_missing_split_folder_is_an_error(world, tmp_path, capsys, snapshot, layout, split):
    root = tmp_path / "root"
    for name in layout:
        write_split(root, name, 1)
    before = tree(root)
    rc, _, err = cli(validate_cli.main, [root, "--dataset", "", "--split", split, "--checkpoint",
                                        world / "ok.pth.tar", "--results-file", world / "results.json"] + MODEL,
                     capsys)
    assert_clean_error(rc, err, str(root), f"no '{split.split('[')[0]}' split folder")
    assert tree(root) == before and tree(world) == snapshot


def test_train_without_validation_folder_or_same_folder_is_an_error(world, tmp_path, capsys):
    only_train = tmp_path / "only_train"
    write_split(only_train, "train", 2)
    flat = tmp_path / "flat"  # class folders directly: train and validation would be the same images
    write_split(flat, "", 2)
    out = tmp_path / "out"
    for root, needles in ((only_train, ("no 'validation' split folder",)),
                          (flat, ("same", "folder", "--val-split train"))):
        rc, _, err = cli(train_cli.main, [root] + TRAIN + ["--epochs", "1", "--output", out], capsys)
        assert_clean_error(rc, err, *needles)
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("with_classes", [False, True])
def test_images_directly_in_a_split_folder_are_an_error(world, tmp_path, capsys, snapshot, with_classes):
    """Loose images got the class '' (index 0): alone, a one-class problem that trains to 100 % (DIR one level
    too deep); beside class folders, every class index shifted by one. Both train.py and validate.py refuse."""
    root = tmp_path / "root"
    for split in ("train", "validation"):
        if with_classes:
            write_split(root, split, 1)
        os.makedirs(root / split, exist_ok=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / split / "loose.png")
    before = tree(root)
    out = tmp_path / "out"
    rc, _, err = cli(train_cli.main, [root] + TRAIN + ["--epochs", "1", "--output", out], capsys)
    assert_clean_error(rc, err, str(root / "train"), "1 image directly", "class folder")
    rc, _, err = cli(validate_cli.main, [root, "--dataset", "", "--split", "validation", "--checkpoint",
                                        world / "ok.pth.tar"] + MODEL, capsys)
    assert_clean_error(rc, err, str(root / "validation"), "1 image directly")
    assert tree(root) == before and tree(world) == snapshot
    assert not out.exists() or not any(out.iterdir())


def test_split_folder_legitimate_variants(world, tmp_path, capsys):
    ok = world / "ok.pth.tar"
    for argv in ([world / "good", "--split", "validation"],      # the split folder under DIR
                 [world / "good", "--split", "val"],             # a synonym
                 [world / "good" / "validation"]):               # DIR is the split itself
        rc, out, err = cli(validate_cli.main, argv + ["--dataset", "", "--checkpoint", ok] + MODEL, capsys)
        assert rc == 0, err
        assert json.loads(out.split("--result\n", 1)[1])["top1"] >= 0
    flat = tmp_path / "flat"
    write_split(flat, "", 1)
    rc, _, err = cli(train_cli.main, [flat] + TRAIN + ["--epochs", "1", "--val-split", "train", "--output",
                                                        tmp_path / "out"], capsys)
    assert rc == 0, err
    assert "evaluating on the training images" in err


# ----------------------------------------------------------------------------------------------
# image folders: class indices


def test_validate_class_folders_differ_from_training_split(world, tmp_path, capsys, snapshot):
    ok = world / "ok.pth.tar"
    missing = variant(world, tmp_path, "missing")
    shutil.rmtree(missing / "validation" / "3")
    extra = variant(world, tmp_path, "extra")
    shutil.copytree(extra / "validation" / "3", extra / "validation" / "3b")
    renamed = variant(world, tmp_path, "renamed")
    os.rename(renamed / "validation" / "9", renamed / "validation" / "nine")
    for root, needles in ((missing, ("missing '3'",)), (extra, ("extra '3b'",)),
                          (renamed, ("missing '9'", "extra 'nine'"))):
        rc, _, err = cli(validate_cli.main, [root, "--dataset", "", "--checkpoint", ok] + MODEL, capsys)
        assert_clean_error(rc, err, "validation", *needles)
    assert tree(world) == snapshot


def test_validate_fewer_class_folders_than_model_outputs(world, tmp_path, capsys):
    flat = tmp_path / "flat"
    write_split(flat, "", 1, classes=[c for c in range(10) if c != 4])
    rc, _, err = cli(validate_cli.main, [flat, "--dataset", "", "--checkpoint", world / "ok.pth.tar"] + MODEL,
                     capsys)
    assert_clean_error(rc, err, "9 class folders", "predicts 10", "--class-map")


def test_train_validation_split_missing_a_class(world, tmp_path, capsys):
    root = variant(world, tmp_path)
    shutil.rmtree(root / "validation" / "0")
    rc, _, err = cli(train_cli.main, [root] + TRAIN + ["--epochs", "1", "--output", tmp_path / "out"], capsys)
    assert_clean_error(rc, err, "missing '0'")


def test_class_map_gives_the_right_labels_and_refuses_unknown_folders(world, tmp_path, capsys):
    from src.data import create_dataset

    cmap = tmp_path / "classes.txt"
    cmap.write_text("".join(f"{c}\n" for c in range(10)))
    flat = tmp_path / "flat"
    write_split(flat, "", 1, classes=[c for c in range(10) if c != 4])
    ds = create_dataset("", str(flat), "validation", is_training=False, class_map=str(cmap))
    labels = {os.path.basename(os.path.dirname(ds.filename(i, absolute=True))): ds.reader[i][1] for i in range(len(ds))}
    assert labels == {str(c): c for c in range(10) if c != 4}  # 5..9 keep their indices despite the gap
    rc, out, err = cli(validate_cli.main, [flat, "--dataset", "", "--class-map", cmap, "--checkpoint",
                                           world / "ok.pth.tar"] + MODEL, capsys)
    assert rc == 0, err
    os.makedirs(flat / "cat")
    shutil.copy(flat / "0" / "0.png", flat / "cat" / "0.png")
    rc, _, err = cli(validate_cli.main, [flat, "--dataset", "", "--class-map", cmap, "--checkpoint",
                                         world / "ok.pth.tar"] + MODEL, capsys)
    assert_clean_error(rc, err, "'cat'", "class-map")


# ----------------------------------------------------------------------------------------------
# image folders: unreadable and 16-bit images


def _corrupt(kind: str, path) -> None:
    data = open(path, "rb").read()
    if kind == "garbage":
        open(path, "wb").write(os.urandom(300))
    elif kind == "truncated":
        open(path, "wb").write(data[:len(data) // 2])
    elif kind == "empty":
        open(path, "wb").close()
    elif kind == "text":
        open(path, "wb").write(b"this is not an image\n")


@pytest.mark.parametrize("kind,workers", [("garbage", 0), ("truncated", 0), ("empty", 0), ("text", 1)])
def test_corrupt_image_is_an_error_naming_the_file(world, tmp_path, capsys, kind, workers):
    root = variant(world, tmp_path)
    bad = root / "validation" / "7" / "1.png"
    _corrupt(kind, bad)
    before = tree(root)
    argv = [root, "--dataset", "", "--checkpoint", world / "ok.pth.tar"] + MODEL
    argv[argv.index("-j") + 1] = str(workers)
    rc, _, err = cli(validate_cli.main, argv, capsys)
    assert_clean_error(rc, err, "cannot read image", str(bad))
    assert tree(root) == before


def test_corrupt_training_image_stops_train(world, tmp_path, capsys):
    root = variant(world, tmp_path)
    _corrupt("truncated", root / "train" / "2" / "0.png")
    rc, _, err = cli(train_cli.main, [root] + TRAIN + ["--epochs", "1", "--output", tmp_path / "out"], capsys)
    assert_clean_error(rc, err, "cannot read image", os.path.join("train", "2", "0.png"))


def test_16bit_png_is_scaled_not_white(tmp_path):
    ramp = (np.arange(32 * 32, dtype=np.float64).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    for value in (0, 257 * 117, 65535):
        png16(tmp_path / f"v{value}.png", np.full((8, 8), value, np.uint16))
        img = load_rgb_image(str(tmp_path / f"v{value}.png"), "v.png")
        assert img.mode == "RGB" and set(np.asarray(img).ravel().tolist()) == {round(value / 257)}
    png16(tmp_path / "ramp.png", ramp)
    arr = np.asarray(load_rgb_image(str(tmp_path / "ramp.png"), "ramp.png"))[..., 0]
    assert np.abs(arr.astype(float) - ramp / 257.0).max() <= 0.5 + 1e-9
    assert Image.open(tmp_path / "ramp.png").mode.startswith("I")  # what PIL's convert('RGB') clips to white
    for mode, data in (("F", np.full((4, 4), 0.5, np.float32)), ("I", np.full((4, 4), 70000, np.int32))):
        Image.fromarray(data, mode=mode).save(tmp_path / f"{mode}.tiff")
        with pytest.raises(ImageReadError, match=f"{mode}.tiff"):
            load_rgb_image(str(tmp_path / f"{mode}.tiff"), str(tmp_path / f"{mode}.tiff"))


def test_16bit_folder_evaluates_like_its_8bit_twin(world, tmp_path, capsys):
    """The same digits as 8-bit RGB and as 16-bit grayscale PNGs (v * 257) give the same result."""
    eight, sixteen = tmp_path / "eight", tmp_path / "sixteen"
    write_split(eight, "", 1)
    for dirpath, _dirs, files in os.walk(eight):
        for f in files:
            gray = np.asarray(Image.open(os.path.join(dirpath, f)))[..., 0].astype(np.uint16) * 257
            dst = sixteen / os.path.relpath(dirpath, eight)
            os.makedirs(dst, exist_ok=True)
            png16(dst / f, gray)
    results = []
    for root in (eight, sixteen):
        rc, out, err = cli(validate_cli.main, [root, "--dataset", "", "--checkpoint", world / "ok.pth.tar",
                                               "--no-normalize"] + MODEL, capsys)
        assert rc == 0, err
        results.append(json.loads(out.split("--result\n", 1)[1]))
    assert results[0]["top1"] == results[1]["top1"] and results[0]["loss"] == results[1]["loss"]


# ----------------------------------------------------------------------------------------------
# NaN / inf weights


@pytest.mark.parametrize("name,extra,tensor", [
    ("nan.pth.tar", [], "blocks.0.attn.qkv.weight"),
    ("inf_bare.pth", [], "head.bias"),
    ("nan_ema.pth.tar", ["--use-ema"], "blocks.0.attn.qkv.weight"),
])
def test_validate_refuses_non_finite_weights(world, capsys, snapshot, name, extra, tensor):
    rc, out, err = cli(validate_cli.main, ["--dataset", "digits", "--checkpoint", world / name,
                                           "--results-file", world / "results.json", "--num-examples", "10"]
                       + MODEL + extra, capsys)
    assert_clean_error(rc, err, "non-finite", f"'{tensor}'", str(world / name))
    assert "--result" not in out and tree(world) == snapshot


def test_non_finite_weights_refused_by_train_sweep_and_export(world, tmp_path, capsys, snapshot):
    out = tmp_path / "out"
    for flag in ("--initial-checkpoint", "--finetune"):
        rc, _, err = cli(train_cli.main, TRAIN[TRAIN.index("--model"):] + ["--dataset", "digits", flag,
                                                                           world / "nan.pth.tar", "--epochs", "1",
                                                                           "--output", out], capsys)
        assert_clean_error(rc, err, "non-finite", "blocks.0.attn.qkv.weight")
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    shutil.copy(world / "nan.pth.tar", sweep / "checkpoint-0.pth.tar")
    rc, _, err = cli(ae_cli.main, ["--dataset", "digits", "--no-normalize", "--num-examples", "10", "--attack-eps",
                                   "8", "--checkpoints-dir", sweep, "--epochs-to-try", "0", "--seeds", "0",
                                   "--steps-to-try", "1"] + MODEL, capsys)
    assert "non-finite" in err and "Traceback" not in err and rc == 2
    export_dir = tmp_path / "released"
    rc = prepare_checkpoint.main(["--checkpoint", str(world / "inf_bare.pth"), "--model", "test_vit", "--dataset",
                                  "digits", "--output-dir", str(export_dir)])
    assert_clean_error(rc, capsys.readouterr().err, "non-finite", "head.bias")
    assert not export_dir.exists() and tree(world) == snapshot


def test_check_finite_state_dict_skips_integer_buffers():
    sd = {"bn.num_batches_tracked": torch.tensor(3), "w": torch.ones(2, dtype=torch.bfloat16)}
    check_finite_state_dict(sd, "x")
    sd["w"][1] = float("-inf")
    with pytest.raises(CheckpointError, match="'w'"):
        check_finite_state_dict(sd, "x")


# ----------------------------------------------------------------------------------------------
# --finetune from another architecture


def _partial_vit(world, tmp_path, keep_fraction: float):
    sd = torch.load(world / "ok.pth.tar", weights_only=True)["model"]
    keys = [k for k in sd if not k.startswith("head.")]
    drop = set(keys[int(len(keys) * keep_fraction):])
    path = tmp_path / f"partial{keep_fraction}.pth"
    torch.save({k: v for k, v in sd.items() if k not in drop}, path)
    return path


def test_finetune_from_another_architecture_is_an_error(world, tmp_path, capsys):
    out = tmp_path / "out"
    base = TRAIN[TRAIN.index("--model"):] + ["--dataset", "digits", "--epochs", "1", "--output", out]
    for ckpt, needles in ((world / "cnn.pth.tar", ("loads only 0 of the",)),
                          (_partial_vit(world, tmp_path, 0.3), ("loads only",)),
                          (_partial_vit(world, tmp_path, 0.0), ("loads only 0",))):
        rc, _, err = cli(train_cli.main, base + ["--finetune", ckpt], capsys)
        assert_clean_error(rc, err, str(ckpt), "backbone tensors", "--model", *needles)
    assert not out.exists() or not any(out.iterdir())


def test_finetune_reports_what_it_loaded(world, tmp_path, capsys):
    root = tmp_path / "five"
    write_split(root, "train", 2, classes=range(5))
    write_split(root, "validation", 1, classes=range(5), source="validation")
    argv = [root] + [a if a != "10" else "5" for a in TRAIN] + ["--epochs", "1", "--output", tmp_path / "out"]
    rc, _, err = cli(train_cli.main, argv + ["--finetune", world / "ok.pth.tar"], capsys)
    assert rc == 0, err
    line = next(x for x in err.splitlines() if "fine-tuning from" in x)
    assert "loaded 78 of the model's 80 tensors" in line  # every tensor but the 5-class head
    assert "newly initialised (2): head.weight, head.bias" in line and "ignored from the checkpoint (0)" in line
    rc, _, err = cli(train_cli.main, argv + ["--finetune", _partial_vit(world, tmp_path, 0.8)], capsys)
    assert rc == 0, err
    line = next(x for x in err.splitlines() if "fine-tuning from" in x)
    assert "newly initialised (" in line and "newly initialised (0)" not in line and "blocks." in line


# ----------------------------------------------------------------------------------------------
# inputs outside the attack's box, NaN pixels


class _Batches:
    def __init__(self, *xs):
        self.xs = xs

    def __len__(self):
        return len(self.xs)

    def __iter__(self):
        return iter((x, torch.zeros(x.shape[0], dtype=torch.long)) for x in self.xs)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nan_pixels_are_an_error(capsys, value):
    net = timm.create_model("test_vit", num_classes=10, img_size=32).eval()
    x = torch.rand(4, 3, 32, 32)
    x[1, 2, 3, 4] = value
    dev = initialize_device(force_cpu=True)

    def main(_argv):
        evaluate_loop(net, _Batches(x), dev)
        return 0

    rc, _, err = cli(main, [], capsys)
    assert_clean_error(rc, err, "NaN/inf pixel", "first evaluation batch")
    with pytest.raises(NonFiniteInputError, match="1 NaN/inf pixel value"):
        evaluate_loop(net, _Batches(x), dev, attack=lambda m, xb, yb: xb)


def test_pixels_outside_the_attack_box_warn_with_the_range(world, capsys):
    base = ["--dataset", "digits", "--checkpoint", world / "ok.pth.tar", "--num-examples", "10", "--attack", "pgd",
            "--attack-eps", "2", "--attack-steps", "1"] + MODEL
    rc, _, err = cli(validate_cli.main, base, capsys)  # the loader normalizes with mean/std 0.5: [-1, 1]
    assert rc == 0, err
    warning = next(x for x in err.splitlines() if "the attack keeps inputs in [0, 1]" in x)
    assert "[-1, 1]" in warning
    rc, _, err = cli(validate_cli.main, base + ["--no-normalize", "--attack-boundaries", "0.25", "0.75"], capsys)
    assert rc == 0 and "the attack keeps inputs in [0.25, 0.75]" in err
    rc, _, err = cli(validate_cli.main, base + ["--no-normalize"], capsys)
    assert rc == 0 and "the attack keeps inputs" not in err


# ----------------------------------------------------------------------------------------------
# formats: strict JSON, stale temporary files


def _strict(text: str):
    def refuse(token):
        raise ValueError(f"bare {token} in JSON")
    return json.loads(text, parse_constant=refuse)


def test_results_json_is_strict_and_stale_temp_files_are_removed(world, tmp_path, capsys):
    results = tmp_path / "res" / "r.json"
    results.parent.mkdir()
    stale = results.parent / ".r.json.tmp-0123abcd"
    stale.write_text("half a file")
    foreign = results.parent / ".other.csv.tmp-89abcdef"  # another writer's: not ours to delete
    foreign.write_text("x")
    rc, out, err = cli(validate_cli.main, ["--dataset", "digits", "--checkpoint", world / "ok.pth.tar",
                                           "--num-examples", "10", "--results-file", results] + MODEL, capsys)
    assert rc == 0, err
    doc = _strict(results.read_text())
    assert doc["robust_top1"] is None and doc["adv_loss"] is None and isinstance(doc["top1"], float)
    assert _strict(out.split("--result\n", 1)[1])["robust_top1"] is None
    assert not stale.exists() and foreign.exists()


def test_effectiveness_csv_folder_stale_temp_removed(world, tmp_path, capsys):
    from src.effectiveness import DEFAULT_OUTPUT_NAME, SETTINGS_SUFFIX

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    shutil.copy(world / "ok.pth.tar", sweep / "checkpoint-0.pth.tar")
    stale = [sweep / f".{DEFAULT_OUTPUT_NAME}.tmp-00c0ffee", sweep / f".{DEFAULT_OUTPUT_NAME}{SETTINGS_SUFFIX}.tmp-0badf00d"]
    for path in stale:
        path.write_text("half a file")
    rc, _, err = cli(ae_cli.main, ["--dataset", "digits", "--no-normalize", "--num-examples", "10", "--attack-eps",
                                   "8", "--checkpoints-dir", sweep, "--epochs-to-try", "0", "--seeds", "0",
                                   "--steps-to-try", "1"] + MODEL, capsys)
    assert rc == 0, err
    assert (sweep / DEFAULT_OUTPUT_NAME).exists() and not [p for p in stale if p.exists()], os.listdir(sweep)


def test_remove_stale_temp_of_only_touches_that_file(tmp_path):
    (tmp_path / "report.json").write_text("{}")
    mine = tmp_path / ".report.json.tmp-1234abcd"
    other = tmp_path / ".report.json.bak.tmp-1234abcd"
    for p in (mine, other):
        p.write_text("x")
    assert storage.remove_stale_temp_of(str(tmp_path / "report.json")) == [str(mine)]
    assert other.exists() and (tmp_path / "report.json").exists()


def test_convergence_csv_and_state_stale_temp_removed(world, tmp_path, capsys):
    import attack_convergence as ac_cli
    from src.convergence import STATE_SUFFIX
    from src.eval_state import state_file_name

    out = tmp_path / "conv.csv"
    state_dir = tmp_path / f"conv.csv{STATE_SUFFIX}"
    state_dir.mkdir()
    stale = [tmp_path / ".conv.csv.tmp-0000beef", state_dir / f".{state_file_name(0, 1)}.tmp-0000beef"]
    for path in stale:
        path.write_text("half a file")
    rc, _, err = cli(ac_cli.main, ["--dataset", "digits", "--checkpoint", world / "ok.pth.tar", "--no-normalize",
                                   "--attack-eps", "8", "--n-points", "2", "--runs", "1", "--steps-to-try", "1",
                                   "--output-file", out] + MODEL[:-2] + ["-b", "2"], capsys)
    assert rc == 0, err
    assert out.exists() and not [p for p in stale if p.exists()]
