"""Bad input in the TFDS lane (tfds/ datasets and the builders of datasets/): one error line, no traceback, no
silently wrong dataset, no damage to a build already there."""
import pytest
import timm  # noqa: F401  (torch / torchvision / timm before tensorflow, or the process segfaults)
import torch
import torchvision  # noqa: F401

pytest.importorskip("tensorflow", reason="needs tensorflow (pip install -r requirements-tfds.txt)")
tfds = pytest.importorskip("tensorflow_datasets", reason="needs tensorflow-datasets (requirements-tfds.txt)")

from src.errors import UsageError, run_cli  # noqa: E402
from tests.tfds_fixtures import build_with_python, write_ddpm_manual  # noqa: E402

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
