"""tfds/ datasets end to end: train.py (one and two processes), --combine-dataset, --aug-splits, validate.py.

The TFDS dataset is ``datasets/cifar_ddpm`` built (once per module) from the embedded digits images
written as fake DDPM manual files: 1797 images, ``train[:1500]`` for training, ``train[1500:]`` held out.
"""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import timm  # noqa: F401  (torch / torchvision / timm before tensorflow, or the process segfaults)
import torch
import torchvision  # noqa: F401

pytest.importorskip("tensorflow", reason="needs tensorflow (pip install -r requirements-tfds.txt)")
pytest.importorskip("tensorflow_datasets", reason="needs tensorflow-datasets (requirements-tfds.txt)")

import validate as validate_cli  # noqa: E402
from src import data as D  # noqa: E402
from src.arg_parser import parse_args  # noqa: E402
from src.errors import run_cli  # noqa: E402
from tests.conftest import ROOT, TINY_TRAIN, run_train  # noqa: E402
from tests.tfds_fixtures import build_with_python  # noqa: E402

pytestmark = [pytest.mark.tfds, pytest.mark.usefixtures("single_cpu_thread")]
TFDS_TRAIN = ["tfds/cifar_ddpm" if a == "digits" else a for a in TINY_TRAIN]
SPLITS = ["--train-split", "train[:1500]", "--val-split", "train[1500:]"]


@pytest.fixture(scope="module")
def ddpm_dir(tmp_path_factory):
    """tfds/cifar_ddpm built from the digits (gray) images; returns (data dir, images, labels)."""
    root = tmp_path_factory.mktemp("ddpm")
    images = np.concatenate([D.DigitsDataset("train").images, D.DigitsDataset("validation").images])
    labels = np.concatenate([D.DigitsDataset("train").targets, D.DigitsDataset("validation").targets])
    folder = root / "manual" / "cifar10_ddpm_serialized"
    folder.mkdir(parents=True)
    images.tofile(str(folder / "cifar_ddpm_improvedddpm_sorted_images.bin"))
    np.save(str(folder / "cifar_ddpm_improvedddpm_sorted_labels.npy"), labels)
    build_with_python("cifar_ddpm", str(root / "data"), str(root / "manual"))
    return str(root / "data"), images, labels


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _global_steps(output_dir):
    return torch.load(os.path.join(output_dir, "last.pth.tar"), map_location="cpu", weights_only=True)[
        "step_count_global"]


def test_one_epoch_on_tfds_trains_and_evaluates(ddpm_dir, tmp_path):
    data, _, _ = ddpm_dir
    res = run_train([data] + TFDS_TRAIN + SPLITS + ["--epochs", "1", "--output", str(tmp_path), "--experiment", "one"])
    row = _rows(os.path.join(res["output_dir"], "summary.csv"))[0]
    assert 0 <= float(row["eval_top1"]) <= 100 and float(row["eval_loss"]) > 0
    assert float(row["train_top1"]) > 10  # a few dozen steps on digits already beat chance
    assert _global_steps(res["output_dir"]) == 1500 // 50


def test_two_processes_shard_the_tfds_data(ddpm_dir, tmp_path):
    data, _, _ = ddpm_dir
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", data,
           *TFDS_TRAIN, *SPLITS, "--epochs", "1", "--output", str(tmp_path), "--experiment", "ddp"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    output_dir = os.path.join(str(tmp_path), "ddp")
    # each process reads its half of the 1500 training images: 15 steps of 50, not 30
    assert _global_steps(output_dir) == 1500 // (2 * 50)
    row = _rows(os.path.join(output_dir, "summary.csv"))[0]
    assert 0 <= float(row["eval_top1"]) <= 100 and float(row["eval_loss"]) > 0


def _loaders(ddpm_dir, *extra):
    data, _, _ = ddpm_dir
    args, _ = parse_args(list(extra))
    cfg = {"input_size": (3, 32, 32), "crop_pct": 1.0, "interpolation": "bilinear"}
    return D.create_train_loaders(args, cfg, world_size=1, rank=0, num_classes=10)


def test_combine_dataset_gives_the_requested_share_of_every_batch(ddpm_dir, tmp_path):
    """digits (main) + colour-noise tfds/cifar_ddpm at ratio 0.25: 30 + 10 of every batch of 40."""
    data = str(tmp_path / "noise")
    rng = np.random.RandomState(0)
    folder = tmp_path / "manual" / "cifar10_ddpm_serialized"
    folder.mkdir(parents=True)
    rng.randint(0, 256, size=(200, 32, 32, 3), dtype=np.uint8).tofile(
        str(folder / "cifar_ddpm_improvedddpm_sorted_images.bin"))
    np.save(str(folder / "cifar_ddpm_improvedddpm_sorted_labels.npy"), rng.randint(0, 10, 200))
    build_with_python("cifar_ddpm", data, str(tmp_path / "manual"))
    train_loader, _ = _loaders(ddpm_dir, "--dataset", "digits", "--combine-dataset", "tfds/cifar_ddpm",
                               "--combine-data-dir", data, "--combined-dataset-ratio", "0.25", "-b", "40",
                               "--no-aug", "--workers", "0")
    assert len(train_loader) == min(1500 // 30, 200 // 10)  # the epoch ends with the shorter loader
    D.set_loader_epoch(train_loader, 0)
    positions = []
    for x, y in train_loader:
        colour = (x[:, 0] - x[:, 1]).abs().flatten(1).amax(1) > 0  # digits are gray, the noise is not
        assert x.shape == (40, 3, 32, 32) and int(colour.sum()) == 10
        positions.append(colour.nonzero().flatten().tolist())
    assert len(positions) == 20 and positions[0] != positions[1]  # shuffled within the batch
    res = run_train(TINY_TRAIN + ["--combine-dataset", "tfds/cifar_ddpm", "--combine-data-dir", data,
                                  "--combined-dataset-ratio", "0.25", "-b", "40", "--epochs", "1",
                                  "--output", str(tmp_path), "--experiment", "mix"])
    assert _global_steps(res["output_dir"]) == 20


def test_aug_splits_on_tfds_data_collate_split_major(ddpm_dir):
    data, _, _ = ddpm_dir
    train_loader, _ = _loaders(ddpm_dir, data, "--dataset", "tfds/cifar_ddpm", "--train-split", "train[:100]",
                               "--val-split", "train[100:120]",
                               "--aug-splits", "3", "-b", "20", "--workers", "0", "--scale", "1", "1",
                               "--ratio", "1", "1", "--hflip", "0", "--color-jitter", "0.4")
    assert isinstance(train_loader.dataset, D.IterableAugSplitsDataset)
    assert len(train_loader) == 5
    x, y = next(iter(train_loader))
    assert x.shape == (60, 3, 32, 32) and torch.equal(y[:20], y[20:40]) and torch.equal(y[:20], y[40:])
    clean, aug = x[:20], x[20:40]
    assert (clean[:, 0] == clean[:, 1]).all()  # clean views of gray digits stay gray; jittered ones need not
    assert not torch.equal(clean, aug)


def _validate(argv, capsys):
    rc = run_cli(validate_cli.main, list(argv))
    out = capsys.readouterr()
    assert rc == 0, out.err[-2000:]
    return json.loads(out.out.split("--result\n", 1)[1])


def test_validate_on_tfds_matches_the_same_images_as_a_folder(ddpm_dir, tmp_path, capsys):
    from PIL import Image

    data, _, labels = ddpm_dir
    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=10, img_size=32)
    ckpt = str(tmp_path / "model.pth")
    torch.save(model.state_dict(), ckpt)
    import tensorflow_datasets as tfds

    held_out = tfds.builder("cifar_ddpm", data_dir=data).as_dataset(split="train[1500:]", shuffle_files=False)
    for i, ex in enumerate(tfds.as_numpy(held_out)):  # the split's images (TFDS stores them shuffled)
        folder = tmp_path / "folder" / str(int(ex["label"]))
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(ex["image"]).save(str(folder / f"{i}.png"))
    assert i + 1 == len(labels) - 1500
    common = ["-m", "test_vit", "--num-classes", "10", "--input-size", "3", "32", "32", "--crop-pct", "1.0",
              "--checkpoint", ckpt, "--no-normalize", "-b", "64", "-j", "0", "--log-freq", "0", "--attack", "pgd",
              "--attack-eps", "8", "--attack-steps", "2"]
    via_tfds = _validate([data, "--dataset", "tfds/cifar_ddpm", "--split", "train[1500:]"] + common, capsys)
    via_folder = _validate([str(tmp_path / "folder"), "--split", "."] + common, capsys)
    assert via_tfds["top1"] == via_folder["top1"] and via_tfds["top5"] == via_folder["top5"]
    assert via_tfds["loss"] == pytest.approx(via_folder["loss"], rel=1e-5)
    # PGD's random start depends on the order the examples come in; the budget is the same
    assert abs(via_tfds["robust_top1"] - via_folder["robust_top1"]) <= 5
