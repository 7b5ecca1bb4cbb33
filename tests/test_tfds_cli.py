"""``tfds build`` from each builder folder of ``datasets/``, on tiny generated sources, read back.

TFDS's ``tfds`` entry point (tensorflow-datasets 4.9.10) cannot start without apache-beam and
mlcroissant: its ``main`` imports the ``convert_format`` command, whose module subclasses
``beam.DoFn`` when it is imported (tensorflow/datasets#5463), and the ``build_croissant`` command,
which imports mlcroissant. apache-beam 2.77 (the newest) requires protobuf<7, pillow<13 and
pyarrow<26, older than what this environment pins or TensorFlow brings, so it is not installed here.

* ``test_build_command_from_every_builder_folder`` runs TFDS's ``build`` command the way ``tfds build``
  runs it: TensorFlow already imported (the entry point imports it, through ``convert_format``, before
  it loads a builder module), the working directory a builder folder, no dataset argument; all five
  builders, one after the other, in one process.
* ``test_tfds_entry_point`` runs the ``tfds`` executable itself where apache-beam and mlcroissant are
  installed (``make test-tfds-cli`` installs them into ``.tfds-cli``; skipped where that folder is missing).
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import timm  # noqa: F401  (torch / torchvision / timm before tensorflow, or the process segfaults)
import torch
import torchvision  # noqa: F401

pytest.importorskip("tensorflow", reason="needs tensorflow (pip install -r requirements-tfds.txt)")
tfds = pytest.importorskip("tensorflow_datasets", reason="needs tensorflow-datasets (requirements-tfds.txt)")

from src import tfds_imagenet  # noqa: E402
from tests.tfds_fixtures import DATASETS, ROOT, write_ddpm_manual, write_imagenet_archives  # noqa: E402

pytestmark = [pytest.mark.tfds]

RB_IDS = ["ILSVRC2012_val_00015253.JPEG", "ILSVRC2012_val_00020685.JPEG"]  # the first two RobustBench ids
OTHER_VAL = ["ILSVRC2012_val_00000004.JPEG"]  # n04263257, a subset class, not a RobustBench id
TRAIN = {"n01484850": 2, "n01440764": 1}  # one subset class and one outside the subset
# a custom config as JSON (``tfds build --config``): timm's tiny test_resnet, its weights in the manual dir
TINY_CONFIG = json.dumps({"name": "tiny", "model": "test_resnet", "checkpoint": "tiny.pth", "batch_size": 2})

# What ``tfds build`` does, minus the top-level parser that needs apache-beam: TensorFlow first, then TFDS's
# build command, from the builder folder given with each job.
RUNNER = """
import json, os, sys
import tensorflow  # noqa: F401  (the tfds entry point has imported it before it loads a builder module)
import tensorflow_datasets as tfds
from tensorflow_datasets.scripts.cli import build, cli_utils

tfds.core.visibility.set_availables([tfds.core.visibility.DatasetType.TFDS_PUBLIC,
                                     tfds.core.visibility.DatasetType.COMMUNITY_PUBLIC])
parse = cli_utils.make_flags_parser(build.Args, description="tfds build")
for folder, argv in json.loads(sys.argv[1]):
    os.chdir(folder)
    parse(["tfds build"] + argv).execute()
"""


def _sources(root):
    manual = os.path.join(str(root), "manual")
    write_imagenet_archives(manual, TRAIN, RB_IDS + OTHER_VAL)
    images, labels = write_ddpm_manual(manual, 5)
    torch.manual_seed(0)
    torch.save(timm.create_model("test_resnet", num_classes=1000).state_dict(), os.path.join(manual, "tiny.pth"))
    return manual, images, labels


def _read(data, name):
    builder = tfds.builder_from_directory(os.path.join(data, *name.split("/")))
    split = list(builder.info.splits.keys())
    return builder, {s: list(tfds.as_numpy(builder.as_dataset(split=s, shuffle_files=False))) for s in split}


def _check_all_five(data, images, labels):
    _, ddpm = _read(data, "cifar_ddpm/1.0.0")
    assert {ex["image"].tobytes(): int(ex["label"]) for ex in ddpm["train"]} == \
        {img.tobytes(): int(y) for img, y in zip(images, labels)}
    names = tfds_imagenet.imagenet_label_names()
    ids = tfds_imagenet.read_robustbench_ids()
    _, rb = _read(data, "robustbench_image_net/5.1.0")
    assert {ex["file_name"].decode(): int(ex["label"]) for ex in rb["validation"]} == \
        {f: names.index(ids[f]) for f in RB_IDS}
    subset_builder, subset = _read(data, "image_net_subset/5.1.0")
    label = subset_builder.info.features["label"]
    assert [label.int2str(int(ex["label"])) for ex in subset["train"]] == ["n01484850"] * 2
    assert [label.int2str(int(ex["label"])) for ex in subset["validation"]] == ["n04263257"]
    rb_labels = sorted(int(ex["label"]) for ex in rb["validation"])
    for name in ("imagenet_advex", "imagenet_perturbations"):
        builder, adv = _read(data, f"{name}/tiny/1.0.0")
        assert builder.info.config_name == "tiny" and list(adv) == ["validation"]
        assert sorted(int(ex["label"]) for ex in adv["validation"]) == rb_labels
        assert all(ex["image"].dtype == np.uint8 and ex["image"].shape[-1] == 3 for ex in adv["validation"])


def test_build_command_from_every_builder_folder(tmp_path):
    manual, images, labels = _sources(tmp_path)
    data = str(tmp_path / "data")
    common = ["--data_dir", data, "--manual_dir", manual]
    jobs = [(os.path.join(DATASETS, name), common + extra) for name, extra in (
        ("cifar_ddpm", []), ("robustbench_image_net", []), ("image_net_subset", []),
        ("imagenet_advex", ["--config", TINY_CONFIG]), ("imagenet_perturbations", ["--config", TINY_CONFIG]))]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)  # the builder modules find the repository themselves
    out = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(jobs)], cwd=str(tmp_path), env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]  # -11: a segfault (torch loaded triton after TensorFlow)
    _check_all_five(data, images, labels)


TFDS_CLI_DIR = os.path.join(ROOT, ".tfds-cli")  # requirements-tfds-cli.txt, installed there by `make test-tfds-cli`


def _tfds_executable():
    """TFDS's `tfds` executable of this venv, and the PYTHONPATH that gives it apache-beam and mlcroissant
    (None when they are importable anyway); skip reason when neither is there."""
    exe = shutil.which("tfds", path=os.path.dirname(sys.executable))
    if exe is None:
        return None, None, "the tfds executable is not installed"
    if all(importlib.util.find_spec(m) is not None for m in ("apache_beam", "mlcroissant")):
        return exe, None, ""
    if os.path.isdir(os.path.join(TFDS_CLI_DIR, "apache_beam")):
        return exe, TFDS_CLI_DIR, ""
    return exe, None, ("TFDS's `tfds` command needs apache-beam and mlcroissant: `make test-tfds-cli` installs "
                       "them into .tfds-cli (requirements-tfds-cli.txt)")


@pytest.mark.tfds_cli
@pytest.mark.skipif(bool(_tfds_executable()[2]), reason=_tfds_executable()[2] or "-")
def test_tfds_entry_point(tmp_path):
    """The real `tfds build`, from each builder's folder (a separate lane, `make test-tfds-cli`: every
    command starts TensorFlow and torch, about 20 s each here)."""
    exe, pythonpath, _ = _tfds_executable()
    manual, images, labels = _sources(tmp_path)
    data = str(tmp_path / "data")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    for name, extra in (("cifar_ddpm", []), ("robustbench_image_net", []), ("image_net_subset", []),
                        ("imagenet_advex", ["--config", TINY_CONFIG]),
                        ("imagenet_perturbations", ["--config", TINY_CONFIG])):
        out = subprocess.run([exe, "build", "--data_dir", data, "--manual_dir", manual] + extra,
                             cwd=os.path.join(DATASETS, name), capture_output=True, text=True, timeout=600, env=env)
        assert out.returncode == 0, f"{name}: {out.stderr[-3000:]}"
    _check_all_five(data, images, labels)
