"""The five TFDS builders of datasets/, built from tiny generated sources and read back."""
import os

import pytest
import timm  # noqa: F401  (torch / torchvision / timm before tensorflow, or the process segfaults)
import torch
import torchvision  # noqa: F401

pytest.importorskip("tensorflow", reason="needs tensorflow (pip install -r requirements-tfds.txt)")
tfds = pytest.importorskip("tensorflow_datasets", reason="needs tensorflow-datasets (requirements-tfds.txt)")

from src import tfds_imagenet  # noqa: E402
from src.tfds_adversarial import AdversarialConfig  # noqa: E402
from tests import tiny_models  # noqa: E402,F401  (registers tiny_cnn_test)
from tests.tfds_fixtures import (build_with_cli, build_with_python, builder_module, read_split,  # noqa: E402
                                 write_ddpm_manual, write_imagenet_archives)

pytestmark = [pytest.mark.tfds, pytest.mark.usefixtures("single_cpu_thread")]

RB_IDS = ["ILSVRC2012_val_00015253.JPEG", "ILSVRC2012_val_00020685.JPEG", "ILSVRC2012_val_00039611.JPEG",
          "ILSVRC2012_val_00004059.JPEG"]  # the first four RobustBench ids (the last is a subset class)
OTHER_VAL = ["ILSVRC2012_val_00000004.JPEG", "ILSVRC2012_val_00000017.JPEG", "ILSVRC2012_val_00000001.JPEG"]
TRAIN = {"n01484850": 3, "n07860988": 2, "n01440764": 2}  # two subset classes and one outside the subset


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One manual dir (fake ImageNet archives + DDPM files) and one data dir where ``datasets/build.py``
    (the documented CLI) builds robustbench_image_net and cifar_ddpm in one run."""
    root = tmp_path_factory.mktemp("tfds")
    manual, data = str(root / "manual"), str(root / "data")
    write_imagenet_archives(manual, TRAIN, RB_IDS + OTHER_VAL)
    ddpm = write_ddpm_manual(manual, 7)
    out = build_with_cli(["datasets/robustbench_image_net", "datasets/cifar_ddpm"], data, manual)
    assert out.returncode == 0, out.stderr[-3000:]
    return manual, data, ddpm


@pytest.fixture(scope="module")
def imagenet(built):
    return built[0], built[1]


def test_cifar_ddpm_cli_build_reads_back_every_image(built):
    _, data, (images, labels) = built
    builder = tfds.builder("cifar_ddpm", data_dir=data)
    assert list(builder.info.splits.keys()) == ["train"]
    assert builder.info.features["image"].shape == (32, 32, 3)
    assert builder.info.features["label"].num_classes == 10
    assert builder.info.supervised_keys is not None
    got = {ex["image"].tobytes(): int(ex["label"]) for ex in read_split(builder, "train")}
    want = {img.tobytes(): int(y) for img, y in zip(images, labels)}
    assert got == want  # raw uint8 pixels survive the (lossless PNG) encoding


def test_cifar_ddpm_size_mismatch_is_refused(tmp_path):
    write_ddpm_manual(str(tmp_path), 3)
    path = os.path.join(str(tmp_path), "cifar10_ddpm_serialized", "cifar_ddpm_improvedddpm_sorted_images.bin")
    with open(path, "ab") as f:
        f.write(b"\0" * 10)
    with pytest.raises(ValueError, match="bytes"):
        build_with_python("cifar_ddpm", str(tmp_path / "tfds"), str(tmp_path))


def test_robustbench_image_net_keeps_the_listed_validation_images(imagenet):
    _, data = imagenet
    builder = tfds.builder("robustbench_image_net", data_dir=data)
    assert list(builder.info.splits.keys()) == ["validation"]  # no train placeholder, no empty test split
    names = tfds_imagenet.imagenet_label_names()
    ids = tfds_imagenet.read_robustbench_ids()
    got = {ex["file_name"].decode(): int(ex["label"]) for ex in read_split(builder, "validation")}
    assert got == {f: names.index(ids[f]) for f in RB_IDS}
    ex = read_split(builder, "validation")[0]
    assert ex["image"].shape == (40, 48, 3) and ex["image"].dtype.name == "uint8"


def test_image_net_subset_filters_and_sorts_classes(imagenet, tmp_path):
    manual, _ = imagenet
    builder = build_with_python("image_net_subset", str(tmp_path), manual)
    label = builder.info.features["label"]
    synsets = tfds_imagenet.read_subset_synsets()
    assert label.names == synsets and len(synsets) == 100
    train = read_split(builder, "train")
    assert sorted(label.int2str(int(ex["label"])) for ex in train) == ["n01484850"] * 3 + ["n07860988"] * 2
    assert all(ex["file_name"].decode().startswith(label.int2str(int(ex["label"]))) for ex in train)
    val = {ex["file_name"].decode(): label.int2str(int(ex["label"])) for ex in read_split(builder, "validation")}
    # labels by file number: val 4 -> n04263257, 17 -> n01914609, 4059 -> n03983396; val 1 is not a subset class
    assert val == {"ILSVRC2012_val_00000004.JPEG": "n04263257", "ILSVRC2012_val_00000017.JPEG": "n01914609",
                   "ILSVRC2012_val_00004059.JPEG": "n03983396"}
    assert set(builder.info.splits.keys()) == {"train", "validation"}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("tiny_cnn_test", num_classes=1000)
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny.pth")
    torch.save(model.state_dict(), path)
    return path, model.eval()


def _tiny_config(name, checkpoint, steps):
    return AdversarialConfig(name=name, model="tiny_cnn_test", checkpoint=os.path.basename(checkpoint), steps=steps,
                             mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), batch_size=3)


@pytest.fixture
def recorded(monkeypatch):
    """Every (x, x_adv, y) batch the builders attack, in generation order."""
    from src import tfds_adversarial as adv

    seen = []
    real = adv.attacked_batches

    def recording(*a, **k):
        for batch in real(*a, **k):
            seen.append(batch)
            yield batch

    monkeypatch.setattr(adv, "attacked_batches", recording)
    return seen


def _match(stored, recorded, key):
    """Pair each stored example with the recorded one it came from (TFDS shuffles the stored order)."""
    x = torch.cat([b[0] for b in recorded]).permute(0, 2, 3, 1)
    x_adv = torch.cat([b[1] for b in recorded]).permute(0, 2, 3, 1)
    y = torch.cat([b[2] for b in recorded])
    target = key(x, x_adv)
    pairs = []
    for ex in stored:
        img = torch.tensor(ex["image"]).float() / 255
        i = int((target - img).abs().flatten(1).max(1).values.argmin())
        pairs.append((img, x[i], x_adv[i], int(y[i]), int(ex["label"]), target[i]))
    assert sorted(int(v) for v in y) == sorted(p[4] for p in pairs) and len(stored) == len(RB_IDS)
    return pairs


def test_imagenet_advex_stores_adversarial_images(imagenet, tiny_checkpoint, recorded):
    _, data = imagenet
    ckpt, _ = tiny_checkpoint
    cfg = _tiny_config("tiny_pgd2", ckpt, steps=2)
    builder = build_with_python("imagenet_advex", data, os.path.dirname(ckpt), config=cfg)
    assert list(builder.info.splits.keys()) == ["validation"]
    assert builder.info.features["label"].num_classes == 1000
    for img, x, x_adv, y, label, _ in _match(read_split(builder, "validation"), recorded, lambda x, xa: xa):
        assert img.shape == (32, 32, 3) and label == y
        assert (img - x_adv).abs().max() <= 0.5 / 255 + 1e-6  # the adversarial image, rounded to uint8
        moved = (x_adv - x).abs().max()
        assert 1.5 / 255 < moved <= cfg.eps + 1e-6  # inside the eps ball, and the attack did move


def test_imagenet_perturbations_decode_to_the_scaled_perturbation(imagenet, tiny_checkpoint, recorded):
    _, data = imagenet
    ckpt, _ = tiny_checkpoint
    cfg = _tiny_config("tiny_fgsm", ckpt, steps=1)
    builder = build_with_python("imagenet_perturbations", data, os.path.dirname(ckpt), config=cfg)
    eps = cfg.eps
    pairs = _match(read_split(builder, "validation"), recorded, lambda x, xa: (x - xa + eps) / (2 * eps))
    for img, x, x_adv, y, label, expected in pairs:
        assert label == y and img.shape == (32, 32, 3)
        assert torch.allclose(expected, (x - x_adv + eps) / (2 * eps))
        assert (img - expected).abs().max() <= 0.5 / 255 + 1e-5  # uint8 rounding
        assert img.min() >= 0 and img.max() <= 1 and (img - 0.5).abs().max() > 0.4  # FGSM reaches +-eps


def test_missing_checkpoint_is_named(imagenet, tmp_path):
    _, data = imagenet
    mod = builder_module("imagenet_advex")
    cfg = [c for c in mod.Builder.BUILDER_CONFIGS if c.name == "resnet50_fgsm"][0]
    with pytest.raises(FileNotFoundError, match="advres50_gelu.pth"):
        build_with_python("imagenet_advex", str(tmp_path), str(tmp_path), config=cfg)


def test_named_configs_use_registered_models():
    import timm

    mod = builder_module("imagenet_perturbations")
    names = [c.name for c in mod.Builder.BUILDER_CONFIGS]
    assert names == ["resnet50_fgsm", "xcit_small_12_p16_224_fgsm", "resnet50", "resnet50_nonrobust",
                     "xcit_small_12_p16_224", "xcit_small_12_p16_224_nonrobust"]
    advex = builder_module("imagenet_advex").Builder.BUILDER_CONFIGS
    assert [c.name for c in advex] == ["resnet50_fgsm", "xcit_small_12_p16_224_fgsm", "resnet50_pgd10",
                                       "xcit_small_12_p16_224_pgd10"]
    for cfg in list(mod.Builder.BUILDER_CONFIGS) + list(advex):  # original-behaviour.md §9 item 20: all build
        assert timm.is_model(cfg.model), cfg.name
        assert cfg.eps == pytest.approx(4 / 255)


@pytest.mark.parametrize("argv,message", [
    (["datasets/no_such_builder"], "datasets/no_such_builder is not a dataset builder"),
    (["no_such_dataset_name"], "no_such_dataset_name is not a dataset builder (Dataset no_such_dataset_name not found"),
    (["datasets/imagenet_advex", "--config", "no_such_config"],
     "--config no_such_config is not a config of imagenet_advex (its configs: resnet50_fgsm, "),
    (["datasets/cifar_ddpm", "--manual_dir", "{tmp}/missing"], "--manual_dir {tmp}/missing is not an existing folder"),
    (["datasets/robustbench_image_net", "--manual_dir", "{tmp}/other"],  # the builder's own missing-file message
     "neither ILSVRC2012_img_train.tar nor ILSVRC2012_img_val.tar is in the manual dir {tmp}/other"),
])
def test_build_cli_bad_input_is_one_error_line(tmp_path, argv, message):
    """datasets/build.py used to end every bad input (unknown builder, config, manual dir) in a traceback."""
    import subprocess
    import sys

    from tests.tfds_fixtures import DATASETS, ROOT

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not an archive")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    out = subprocess.run([sys.executable, os.path.join(DATASETS, "build.py"), *argv, "--data_dir",
                          str(tmp_path / "data")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith("error: " + message.replace("{tmp}", str(tmp_path)))
