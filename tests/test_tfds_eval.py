"""Evaluating on tfds/ data: attack_effectiveness.py gives the numbers of the same images read as a folder;
missing datasets, versions and splits are one error line.
"""
from __future__ import annotations

import csv
import os

import pytest
import timm  # noqa: F401  (torch / torchvision / timm before tensorflow, or the process segfaults)
import torch
import torchvision  # noqa: F401

pytest.importorskip("tensorflow", reason="needs tensorflow (pip install -r requirements-tfds.txt)")
tfds = pytest.importorskip("tensorflow_datasets", reason="needs tensorflow-datasets (requirements-tfds.txt)")

from tests.tfds_fixtures import build_ordered_images  # noqa: E402

pytestmark = [pytest.mark.tfds, pytest.mark.usefixtures("single_cpu_thread")]


# ----------------------------------------------------------------------------------------------
# attack_effectiveness.py: a tfds dataset vs the same images as an image folder


@pytest.fixture(scope="module")
def digits_both_ways(tmp_path_factory):
    """4 validation digits per class as tfds/ordered_digits and as <folder>/validation/<class>/<i>.png (PNG:
    lossless both ways), in the same order, and two briefly trained test_vit checkpoints (epochs 0 and 1).

    TFDS stores the images in generation order (label-major), so the folder, read class folder by class
    folder, lists them in the same order: PGD's random start meets every image in the same position and the
    numbers must agree exactly."""
    from PIL import Image

    from src.data import DigitsDataset

    root = tmp_path_factory.mktemp("digits_both")
    ds = DigitsDataset("validation")
    examples = []
    for label in range(10):
        picked = [img for img, y in zip(ds.images, ds.targets) if int(y) == label][:4]
        for i, img in enumerate(picked):
            path = root / "folder" / "validation" / str(label) / f"{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(str(path))
            examples.append((img, label))
    data = str(root / "tfds")
    build_ordered_images("ordered_digits", data, examples)
    ckpts = root / "run"
    ckpts.mkdir()
    train = DigitsDataset("train")
    x = torch.from_numpy(train.images[:400]).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(train.targets[:400])
    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=10, img_size=32)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for step in range(60):  # a few steps of clean training: epoch 0 after 20, epoch 1 after 60
        i = torch.arange(step * 40, step * 40 + 40) % len(y)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i]), y[i]).backward()
        opt.step()
        if step + 1 in (20, 60):
            torch.save(model.state_dict(), str(ckpts / f"checkpoint-{0 if step + 1 == 20 else 1}.pth.tar"))
    return {"folder": str(root / "folder"), "data": data, "ckpts": str(ckpts), "n": len(examples)}


EFFECTIVENESS = ["-m", "test_vit", "--num-classes", "10", "--input-size", "3", "32", "32", "--crop-pct", "1.0",
                 "--no-normalize", "-b", "16", "-j", "0", "--log-freq", "0", "--attack-eps", "8",
                 "--epochs-to-try", "0", "1", "--seeds", "0", "--steps-to-try", "1", "3"]


def _sweep(argv, capsys):
    import attack_effectiveness
    from src.errors import run_cli

    rc = run_cli(attack_effectiveness.main, list(argv))
    err = capsys.readouterr().err
    assert rc == 0, err[-3000:]


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_attack_effectiveness_on_tfds_equals_the_image_folder(digits_both_ways, tmp_path, capsys):
    d = digits_both_ways
    via_tfds, via_folder = str(tmp_path / "tfds.csv"), str(tmp_path / "folder.csv")
    _sweep([d["data"], "--dataset", "tfds/ordered_digits", "--split", "validation", "--checkpoints-dir", d["ckpts"],
            "--output-file", via_tfds] + EFFECTIVENESS, capsys)
    _sweep([d["folder"], "--split", "validation", "--checkpoints-dir", d["ckpts"], "--output-file", via_folder]
           + EFFECTIVENESS, capsys)
    rows_tfds, rows_folder = _rows(via_tfds), _rows(via_folder)
    assert len(rows_tfds) == len(rows_folder) == 4  # 2 epochs x 1 seed x 2 step counts
    for a, b in zip(rows_tfds, rows_folder):
        assert (a["epoch"], a["attack_steps"]) == (b["epoch"], b["attack_steps"])
        for key in ("top1", "top5", "robust_top1", "robust_top5"):
            assert float(a[key]) == float(b[key]), key
        for key in ("loss", "adv_loss"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-5, abs=1e-6), key
    assert {r["epoch"] for r in rows_tfds} == {"0", "1"}
    assert all(float(r["top1"]) > 30 for r in rows_tfds)  # trained a little: well above chance
    assert any(float(r["robust_top1"]) < float(r["top1"]) for r in rows_tfds)  # the attack did something


# ----------------------------------------------------------------------------------------------
# missing datasets, versions and splits: one line


@pytest.mark.parametrize("data, extra, message", [
    ("{data}", ["--dataset", "tfds/ordered_digits:2.0.0"],
     "tfds/ordered_digits:2.0.0 is not in {data} (built there: 1.0.0)"),
    ("{empty}", ["--dataset", "tfds/ordered_digits"],
     "tfds/ordered_digits is not built in {empty}; build it with `tfds build`"),
    ("{data}", ["--dataset", "tfds/ordered_digits", "--split", "test"],
     "Unknown split 'test'. Should be one of ['validation']. (tfds/ordered_digits in {data} has the splits: "
     "validation (40 examples))"),
    ("{data}", ["--dataset", "tfds/ordered_digits", "--split", "validation[40:50]"],
     "Requested slice [40:50] incompatible with 40 examples."),
])
def test_missing_tfds_dataset_version_or_split_is_one_line(digits_both_ways, tmp_path, capsys, data, extra,
                                                          message):
    import validate
    from src.errors import run_cli

    where = {"data": digits_both_ways["data"], "empty": str(tmp_path)}
    argv = [data.format(**where)] + extra + [
        "-m", "test_vit", "--num-classes", "10", "--input-size", "3", "32", "32", "-j", "0", "--log-freq", "0",
        "--checkpoint", os.path.join(digits_both_ways["ckpts"], "checkpoint-0.pth.tar")]
    assert run_cli(validate.main, argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and message.format(**where) in lines[0], err
    assert "Traceback" not in err


def test_training_on_an_ordered_tfds_dataset_is_one_line(digits_both_ways, tmp_path, capsys):
    """TFDS refuses shuffled-file reads of a dataset built with disable_shuffling (training asks for them)."""
    import train
    from src.errors import run_cli
    from tests.conftest import TINY_TRAIN

    argv = [digits_both_ways["data"]] + list(TINY_TRAIN) + [
        "--train-split", "validation[:32]", "--val-split", "validation[32:]", "--epochs", "1",
        "--output", str(tmp_path), "--experiment", "ordered"]
    argv[argv.index("--dataset") + 1] = "tfds/ordered_digits"
    argv[argv.index("-b") + 1] = "16"
    assert run_cli(train.main, argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "tfds/ordered_digits is stored in a fixed order" in lines[0], err
    assert "Traceback" not in err
