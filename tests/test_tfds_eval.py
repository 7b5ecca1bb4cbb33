"""Evaluating on tfds/ data: validate_robustbench.py and attack_effectiveness.py give the numbers of the same
images read as a folder; gs:// data dirs reach TFDS unchanged in every CLI; missing datasets, versions and
splits are one error line.
"""
from __future__ import annotations

import csv
import io
import json
import os
import sys
import tarfile

import numpy as np
import pytest
import timm  # noqa: F401  (torch / torchvision / timm before tensorflow, or the process segfaults)
import torch
import torchvision  # noqa: F401

pytest.importorskip("tensorflow", reason="needs tensorflow (pip install -r requirements-tfds.txt)")
tfds = pytest.importorskip("tensorflow_datasets", reason="needs tensorflow-datasets (requirements-tfds.txt)")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import robustbench_toy as toy  # noqa: E402  (registers rb_toy_16 in timm)

import validate_robustbench  # noqa: E402
from src import robustbench  # noqa: E402
from tests.tfds_fixtures import build_ordered_images, build_with_python  # noqa: E402

pytestmark = [pytest.mark.tfds, pytest.mark.usefixtures("single_cpu_thread")]

EPS = 8
N_RB = 5


# ----------------------------------------------------------------------------------------------
# validate_robustbench.py: tfds/robustbench_image_net vs the same images as <data-dir>/val/<wnid>/<file>


def _jpeg(red_byte: int) -> bytes:
    """A 24x20 image whose red channel is ``red_byte`` inside a 3-pixel red border: resizing and cropping
    change its mean red value (what the toy model classifies), so the preprocessing shows in the results."""
    from PIL import Image

    a = np.zeros((20, 24, 3), np.uint8)
    a[..., 0], a[..., 1], a[..., 2] = red_byte, 90, 160
    for border in (np.s_[:3, :], np.s_[-3:, :], np.s_[:, :3], np.s_[:, -3:]):
        a[border + (0,)] = 255
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _red_mean(payload: bytes) -> float:
    from PIL import Image

    tf, _ = robustbench.imagenet_transform({"input_size": (3, 16, 16), "crop_pct": 0.875,
                                            "interpolation": "bicubic"}, None)
    return float(tf(Image.open(io.BytesIO(payload)).convert("RGB"))[0].mean())


@pytest.fixture(scope="module")
def rb_images(tmp_path_factory):
    """The first 5 RobustBench ids as JPEGs in a folder (val/<wnid>/<file>) and in a fake ILSVRC2012_img_val.tar,
    built into tfds/robustbench_image_net. By design (mean red after preprocessing vs the toy model's class
    centres): examples 0 and 3 misclassified, 1 robust at eps 8/255, 2 and 4 correct but broken."""
    root = tmp_path_factory.mktemp("rb_tfds")
    ids = robustbench.load_imagenet_ids()[:N_RB]
    class_map = robustbench.load_imagenet_class_map()
    labels = [class_map[i.split("/")[0]] for i in ids]
    centres = {}
    for lab in labels:
        centres.setdefault(lab, 0.1 + 0.2 * len(centres))
    means = {r: _red_mean(_jpeg(r)) for r in range(256)}
    # target mean red: misclassified / robust (0.1 from a boundary) / broken (0.01 from one, on the right side)
    targets = [centres[labels[0]] + 0.3, centres[labels[1]], centres[labels[2]] + 0.09,
               centres[labels[3]] - 0.2, centres[labels[4]] - 0.09]
    payloads = [_jpeg(min(means, key=lambda r: abs(means[r] - t))) for t in targets]
    expected_clean, expected_robust = [], []
    for payload, lab in zip(payloads, labels):
        m = _red_mean(payload)
        clean = toy.predict(m, centres) == lab
        margin = toy.margin(m, centres)
        assert margin > 0.06 or margin < 0.02  # far from eps 8/255 = 0.031 either way
        expected_clean.append(int(clean))
        expected_robust.append(int(clean and margin > EPS / 255))
    assert expected_clean == [0, 1, 1, 0, 1] and expected_robust == [0, 1, 0, 0, 0]
    folder = root / "folder"
    manual = root / "manual"
    manual.mkdir()
    with tarfile.open(str(manual / "ILSVRC2012_img_val.tar"), "w") as tar:
        for entry, payload in list(zip(ids, payloads)) + [("n01440764/ILSVRC2012_val_00000001.JPEG", _jpeg(0))]:
            path = folder / "val" / entry
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(payload)
            info = tarfile.TarInfo(entry.split("/")[1])
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    data = str(root / "tfds")
    build_with_python("robustbench_image_net", data, str(manual))
    ckpt = root / "toy1000.pth"
    torch.save(toy.toy_state_dict(centres, 1000), ckpt)
    return {"folder": str(folder), "data": data, "ckpt": str(ckpt), "ids": ids,
            "clean": "".join(map(str, expected_clean)), "robust": "".join(map(str, expected_robust))}


def _rb_args(rb, out, *data):
    return ["--model", "rb_toy_16", "--checkpoint", rb["ckpt"], *data, "--n-examples", str(N_RB), "--batch-size", "8",
            "--eps", str(EPS), "--workers", "0", "--output", str(out)]


def _report(path):
    with open(path) as f:
        return json.load(f)


def test_robustbench_on_tfds_equals_the_image_folder(rb_images, tmp_path):
    via_folder = tmp_path / "folder.json"
    via_tfds = tmp_path / "tfds.json"
    assert validate_robustbench.main(_rb_args(rb_images, via_folder, "--dataset", "imagenet",
                                              "--data-dir", rb_images["folder"])) == 0
    assert validate_robustbench.main(_rb_args(rb_images, via_tfds, "--dataset", "tfds/robustbench_image_net:5.1.0",
                                              "--data-dir", rb_images["data"])) == 0
    folder, tfd = _report(via_folder), _report(via_tfds)
    for report in (folder, tfd):
        assert report["per_example"]["clean_correct"] == rb_images["clean"]
        assert report["per_example"]["robust_correct"] == rb_images["robust"]
        assert report["dataset"] == "imagenet" and report["n_examples"] == N_RB  # RobustBench's model_info field
    for key in ("clean_acc", "autoattack_acc", "clean_accuracy", "robust_accuracy", "preprocessing", "eps"):
        assert folder[key] == tfd[key], key
    assert tfd["examples"]["examples_sha256"] == folder["examples"]["examples_sha256"]  # same ids, same order
    assert tfd["examples"]["tfds"] == {"dataset": "tfds/robustbench_image_net:5.1.0", "split": "validation",
                                       "data_dir": rb_images["data"]}
    assert tfd["model"]["num_classes"] == 1000  # ImageNet's default class count


def test_robustbench_tfds_examples_are_the_folder_tensors(rb_images):
    """Same tensors and labels, example by example, in the list's order (TFDS stores them shuffled)."""
    tf, _ = robustbench.imagenet_transform({"input_size": (3, 16, 16), "crop_pct": 0.875,
                                            "interpolation": "bicubic"}, None)
    folder = robustbench.load_examples("imagenet", rb_images["folder"], N_RB, tf)
    tfd = robustbench.load_examples("tfds/robustbench_image_net", rb_images["data"], N_RB, tf, split="validation")
    assert tfd.labels() == folder.labels()
    for i in range(N_RB):
        assert torch.equal(tfd[i][0], folder[i][0])


@pytest.mark.parametrize("extra, message", [
    (["--n-examples", "6"], "1 of the 6 RobustBench ImageNet images are not in split 'validation' of "
                            "tfds/robustbench_image_net"),
    (["--split", "validation[:2]"], "3 of the 5 RobustBench ImageNet images are not in split 'validation[:2]'"),
    (["--split", "train"], "Unknown split 'train'"),
    (["--dataset", "tfds/robustbench_image_net:9.0.0"], "is not in {data} (built there: 5.1.0)"),
    (["--dataset", "tfds/image_net_subset"], "tfds/image_net_subset is not built in {data}"),
])
def test_robustbench_tfds_bad_input_is_one_line(rb_images, tmp_path, capsys, extra, message):
    args = _rb_args(rb_images, tmp_path / "r.json", "--dataset", "tfds/robustbench_image_net",
                    "--data-dir", rb_images["data"]) + extra
    assert validate_robustbench.main(args) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and message.format(data=rb_images["data"]) in lines[0], err
    assert "Traceback" not in err and not (tmp_path / "r.json").exists()


def test_robustbench_unreachable_gs_data_dir_is_one_line(rb_images, tmp_path, capsys, monkeypatch):
    """What tfds.builder raises for a gs:// data dir it cannot reach (no network or no credentials here):
    TensorFlow's FailedPreconditionError, an OpError and not an OSError."""
    import tensorflow as tf

    def unreachable(name, *, data_dir=None, **kwargs):
        raise tf.errors.FailedPreconditionError(None, None, "Error executing an HTTP request: libcurl code 6 "
                                                "meaning 'Could not resolve hostname'\n\t when reading metadata of "
                                                f"{data_dir}/{name}/.config/metadata.json")

    monkeypatch.setattr(tfds, "builder", unreachable)
    args = _rb_args(rb_images, tmp_path / "r.json", "--dataset", "tfds/robustbench_image_net", "--data-dir", GS)
    assert validate_robustbench.main(args) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and f"cannot open tfds/robustbench_image_net in {GS}" in lines[0], err
    assert "Could not resolve hostname" in lines[0] and "Traceback" not in err


def test_robustbench_damaged_tfds_records_are_one_line(rb_images, tmp_path, capsys):
    import glob
    import shutil

    data = str(tmp_path / "tfds")
    shutil.copytree(rb_images["data"], data)
    for record in glob.glob(os.path.join(data, "robustbench_image_net", "*", "*.tfrecord*")):
        with open(record, "r+b") as f:  # cut the file inside its first record
            f.truncate(40)
    args = _rb_args(rb_images, tmp_path / "r.json", "--dataset", "tfds/robustbench_image_net", "--data-dir", data)
    assert validate_robustbench.main(args) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "cannot read split 'validation' of tfds/robustbench_image_net" in lines[0], err
    assert "Traceback" not in err and not (tmp_path / "r.json").exists()


def test_robustbench_split_is_for_tfds_only(rb_images, tmp_path, capsys):
    args = _rb_args(rb_images, tmp_path / "r.json", "--dataset", "imagenet", "--data-dir", rb_images["folder"],
                    "--split", "validation")
    assert validate_robustbench.main(args) == 2
    assert "--split applies to tfds/ datasets" in capsys.readouterr().err


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
# gs:// data dirs reach TFDS unchanged


GS = "gs://robust-vits-no-such-bucket/tfds"


@pytest.fixture(scope="module")
def ddpm_data(tmp_path_factory):
    """tfds/cifar_ddpm from 64 noise images (a shuffled dataset to train on)."""
    from tests.tfds_fixtures import write_ddpm_manual

    root = tmp_path_factory.mktemp("ddpm_gs")
    write_ddpm_manual(str(root / "manual"), 64)
    build_with_python("cifar_ddpm", str(root / "data"), str(root / "manual"))
    return str(root / "data")


@pytest.fixture
def gs_data_dir(monkeypatch, digits_both_ways, rb_images, ddpm_data):
    """TFDS's builder entry point, recording the data dir it is given and serving ``GS`` from the local builds.

    No network here: any other use of the gs:// path (made absolute, checked with os.path, listed) fails the
    run, so a finished run also shows that only TFDS saw it."""
    real = tfds.builder
    seen = []
    local = {"robustbench_image_net": rb_images["data"], "cifar_ddpm": ddpm_data,
             "ordered_digits": digits_both_ways["data"]}

    def builder(name, *, data_dir=None, **kwargs):
        seen.append((name, data_dir))
        if data_dir == GS:
            data_dir = local[name.split(":")[0].split("/")[0]]
        return real(name, data_dir=data_dir, **kwargs)

    monkeypatch.setattr(tfds, "builder", builder)
    return seen


def test_gs_data_dir_reaches_tfds_in_train_validate_and_effectiveness(gs_data_dir, digits_both_ways, tmp_path,
                                                                       capsys):
    import validate
    from src.errors import run_cli
    from tests.conftest import TINY_TRAIN, run_train

    argv = [GS] + list(TINY_TRAIN) + ["--train-split", "train[:48]", "--val-split", "train[48:]",
                                      "--epochs", "1", "--output", str(tmp_path), "--experiment", "gs"]
    argv[argv.index("--dataset") + 1] = "tfds/cifar_ddpm"
    argv[argv.index("-b") + 1] = "16"
    argv[argv.index("-vb") + 1] = "8"
    res = run_train(argv)
    assert os.path.exists(os.path.join(res["output_dir"], "last.pth.tar"))
    assert gs_data_dir and all(d == GS for _, d in gs_data_dir)
    assert {n for n, _ in gs_data_dir} == {"cifar_ddpm"}
    gs_data_dir.clear()

    common = ["-m", "test_vit", "--num-classes", "10", "--input-size", "3", "32", "32", "--crop-pct", "1.0",
              "--no-normalize", "-b", "16", "-j", "0", "--log-freq", "0"]
    rc = run_cli(validate.main, [GS, "--dataset", "tfds/ordered_digits:1.0.0", "--split", "validation[:24]",
                                 "--checkpoint", os.path.join(digits_both_ways["ckpts"], "checkpoint-1.pth.tar"),
                                 "--results-file", str(tmp_path / "v.csv")] + common)
    assert rc == 0, capsys.readouterr().err[-2000:]
    assert gs_data_dir and all(d == GS for _, d in gs_data_dir)
    gs_data_dir.clear()

    _sweep([GS, "--dataset", "tfds/ordered_digits", "--split", "validation", "--checkpoints-dir",
            digits_both_ways["ckpts"], "--output-file", str(tmp_path / "e.csv")] + EFFECTIVENESS, capsys)
    assert len(_rows(str(tmp_path / "e.csv"))) == 4
    assert gs_data_dir and all(d == GS for _, d in gs_data_dir)


def test_gs_data_dir_reaches_tfds_in_validate_robustbench(gs_data_dir, rb_images, tmp_path):
    out = tmp_path / "rb.json"
    assert validate_robustbench.main(_rb_args(rb_images, out, "--dataset", "tfds/robustbench_image_net",
                                              "--data-dir", GS) + ["--n-examples", "1"]) == 0
    report = _report(out)
    assert report["n_examples"] == 1 and report["per_example"]["clean_correct"] == rb_images["clean"][:1]
    assert report["examples"]["tfds"]["data_dir"] == GS and GS in report["examples"]["source"]
    assert gs_data_dir and all(d == GS for _, d in gs_data_dir)


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


def test_unreachable_gs_data_dir_is_one_line_in_validate(digits_both_ways, tmp_path, capsys, monkeypatch):
    """What tfds.builder raises for a gs:// data dir it cannot reach (no network or no credentials): TensorFlow's
    FailedPreconditionError, an OpError and not an OSError (a registered dataset wraps it, a built one does not)."""
    import tensorflow as tf

    import validate
    from src.errors import run_cli

    def unreachable(name, *, data_dir=None, **kwargs):
        raise tf.errors.FailedPreconditionError(None, None, "Error executing an HTTP request: libcurl code 6 "
                                                "meaning 'Could not resolve hostname'\n\t when reading metadata of "
                                                f"{data_dir}/{name}/.config/metadata.json")

    monkeypatch.setattr(tfds, "builder", unreachable)
    argv = [GS, "--dataset", "tfds/ordered_digits", "-m", "test_vit", "--num-classes", "10", "--input-size", "3",
            "32", "32", "-j", "0", "--log-freq", "0",
            "--checkpoint", os.path.join(digits_both_ways["ckpts"], "checkpoint-0.pth.tar")]
    assert run_cli(validate.main, argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "cannot load dataset 'tfds/ordered_digits'" in lines[0], err
    assert "Could not resolve hostname" in lines[0] and "Traceback" not in err


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


# ----------------------------------------------------------------------------------------------
# TensorFlow: imported only for tfds/ data, and after torch / torchvision / timm

IMPORT_PROBE = """
import sys
WATCH = ("torch", "torchvision", "timm", "tensorflow")
done = []  # the watched packages, in the order their import finished


class Probe:
    def find_spec(self, name, path=None, target=None):
        if name not in WATCH:
            return None
        for finder in sys.meta_path:
            spec = None if finder is self else finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        real = spec.loader.exec_module

        def exec_module(module):
            real(module)
            done.append(name)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, Probe())
import validate
from src.errors import run_cli

data, common = sys.argv[1], sys.argv[2:]
assert run_cli(validate.main, ["--dataset", "digits"] + common) == 0
assert "tensorflow" not in sys.modules and "tensorflow" not in done, done
assert run_cli(validate.main, [data, "--dataset", "tfds/ordered_digits", "--split", "validation"] + common) == 0
assert "tensorflow" in done and max(done.index(m) for m in WATCH[:3]) < done.index("tensorflow"), done
"""


def test_tensorflow_only_for_tfds_data_and_after_torch(digits_both_ways, tmp_path):
    import subprocess

    from tests.conftest import ROOT

    common = ["-m", "test_vit", "--num-classes", "10", "--input-size", "3", "32", "32", "--crop-pct", "1.0", "-j",
              "0", "--log-freq", "0", "--checkpoint", os.path.join(digits_both_ways["ckpts"], "checkpoint-1.pth.tar"),
              "--results-file", str(tmp_path / "r.csv")]
    out = subprocess.run([sys.executable, "-c", IMPORT_PROBE, digits_both_ways["data"], *common], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]


def test_robustbench_tfds_undecodable_image_names_the_example_also_from_a_worker(rb_images):
    """A stored image PIL cannot decode is one line naming the example, also when a loader worker reads it
    (a UsageError from a worker printed 'Caught UsageError in DataLoader worker process 0.')."""
    from src.image_folder import ImageReadError

    tf, _ = robustbench.imagenet_transform({"input_size": (3, 16, 16), "crop_pct": 0.875,
                                            "interpolation": "bicubic"}, None)
    tfd = robustbench.load_examples("tfds/robustbench_image_net", rb_images["data"], N_RB, tf, split="validation")
    tfd._images[1] = b"not an image"
    with pytest.raises(ImageReadError, match=f"cannot read image {tfd.ids[1]} from"):
        tfd[1]
    loader = torch.utils.data.DataLoader(tfd, batch_size=2, num_workers=1)
    with pytest.raises(ImageReadError) as err:
        list(loader)
    assert str(err.value).startswith(f"cannot read image {tfd.ids[1]} from") and "\n" not in str(err.value)
