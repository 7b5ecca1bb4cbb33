"""Datasets, the light-recipe transform chain, random erasing on [0, 1] images, the shard sampler."""
import argparse

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from src import data as D
from src.arg_parser import parse_args
from src.errors import UsageError


def _args(*extra):
    args, _ = parse_args(["--dataset", "digits"] + list(extra))
    return args


CFG32 = {"input_size": (3, 32, 32), "crop_pct": 1.0, "interpolation": "bicubic",
         "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


def test_digits_split_is_fixed_and_disjoint():
    tr, va = D.DigitsDataset("train"), D.DigitsDataset("validation")
    assert len(tr) == 1500 and len(va) == 297
    img, y = tr[0]
    assert isinstance(img, Image.Image) and img.size == (32, 32) and img.mode == "RGB" and 0 <= y < 10
    tr2 = D.DigitsDataset("train")
    assert np.array_equal(tr.images, tr2.images) and np.array_equal(tr.targets, tr2.targets)
    train_set = {a.tobytes() for a in tr.images}
    assert not any(a.tobytes() in train_set for a in va.images)
    assert set(np.unique(tr.targets)) == set(range(10))


def test_unknown_split_and_dataset():
    with pytest.raises(UsageError, match="splits"):
        D.DigitsDataset("holdout")
    with pytest.raises(UsageError, match="unknown dataset"):
        D.create_dataset("imagenette", "/tmp", "train", True)
    with pytest.raises(UsageError, match="does not exist"):
        D.create_dataset("", "/nonexistent/dir", "train", True)



def test_data_dir_that_is_a_file_and_class_map_that_is_a_folder(tmp_path):
    """Both were reported as 'does not exist', which sends the user looking for a typo in a path that exists."""
    f = tmp_path / "images.tar"
    f.write_bytes(b"x")
    with pytest.raises(UsageError, match=r"data dir .*images.tar is a file, not a folder"):
        D.create_dataset("", str(f), "train", True)
    with pytest.raises(UsageError, match=r"--class-map .* is a folder, not a file"):
        D.create_dataset("", str(tmp_path), "train", True, class_map=str(tmp_path))


def _names(t):
    return [type(x).__name__ for x in t.transforms]


def test_train_chain_default_ends_in_to_tensor_no_normalize():
    t = D.build_train_transform(_args(), CFG32)
    names = _names(t)
    assert names == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip", "ColorJitter", "ToTensor"]
    x = t(D.DigitsDataset("train")[0][0])
    assert x.shape == (3, 32, 32) and x.min() >= 0 and x.max() <= 1


def test_rand_crop_pad_rotation_edits():
    t = D.build_train_transform(_args("--rand-crop", "--pad", "4", "--rand-rotation", "2", "--color-jitter",
                                      "0.25"), CFG32)
    names = _names(t)
    assert names == ["RandomCrop", "RandomHorizontalFlip", "ColorJitter", "RandomRotation", "ToTensor"]
    assert t.transforms[0].padding == 4
    t = D.build_train_transform(_args("--pad", "3"), CFG32)
    assert _names(t)[:2] == ["Pad", "RandomResizedCropAndInterpolation"]


def test_auto_augment_replaces_color_jitter_and_no_aug():
    t = D.build_train_transform(_args("--aa", "rand-m9-mstd0.5-inc1"), CFG32)
    assert "RandAugment" in _names(t) and "ColorJitter" not in _names(t)
    t = D.build_train_transform(_args("--no-aug", "--rand-crop", "--pad", "4"), CFG32)
    assert _names(t) == ["Resize", "CenterCrop", "ToTensor"]


def test_eval_transform_resize_floor_crop():
    t = D.build_eval_transform({"input_size": (3, 224, 224), "crop_pct": 0.875, "interpolation": "bicubic"})
    assert _names(t) == ["Resize", "CenterCrop", "ToTensor"]
    assert t.transforms[0].size == 256  # floor(224 / 0.875)
    x = t(Image.new("RGB", (300, 400)))
    assert x.shape == (3, 224, 224)


def test_random_erasing_stays_in_unit_range_and_respects_splits():
    torch.manual_seed(0)
    import random
    random.seed(0)
    x = torch.full((8, 3, 32, 32), 0.0)
    e = D.NotNormalizedRandomErasing(1.0, mode="pixel", max_count=2, num_splits=2)
    out = e(x.clone())
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out[:4], x[:4])  # the clean split is untouched
    assert all((out[i] != 0).any() for i in range(4, 8))
    filled = out[4:][out[4:] != 0]
    assert 0.35 < filled.mean().item() < 0.65  # truncated normal centred on 0.5
    c = D.NotNormalizedRandomErasing(1.0, mode="const")(torch.ones(2, 3, 16, 16))
    assert (c == 0).any() and set(c.unique().tolist()) <= {0.0, 1.0}
    r = D.NotNormalizedRandomErasing(1.0, mode="rand")(torch.zeros(1, 3, 16, 16))[0]
    for ch in range(3):
        vals = r[ch][r[ch] != 0].unique()
        assert len(vals) <= 1  # one value per channel


def test_shard_sampler_union_matches_single_process():
    single = D.ShardSampler(103, 1, 0, shuffle=True, seed=3, drop_last=True, batch_size=10)
    single.set_epoch(2)
    s_idx = list(single)
    shards = []
    for r in range(2):
        s = D.ShardSampler(103, 2, r, shuffle=True, seed=3, drop_last=True, batch_size=5)
        s.set_epoch(2)
        shards.append(list(s))
    assert len(s_idx) == 100 and all(len(sh) == 50 for sh in shards)
    for step in range(10):  # step i of both processes together = step i of one process
        union = set(shards[0][step * 5:(step + 1) * 5]) | set(shards[1][step * 5:(step + 1) * 5])
        assert union == set(s_idx[step * 10:(step + 1) * 10])
    ev = [list(D.ShardSampler(103, 2, r, shuffle=False, drop_last=False)) for r in range(2)]
    assert sorted(ev[0] + ev[1]) == list(range(103))  # evaluation: every example exactly once
    s = D.ShardSampler(103, 1, 0, shuffle=True, seed=3, drop_last=True, batch_size=10)
    s.set_epoch(2)
    s.set_start(30)
    assert list(s) == s_idx[30:]


def test_aug_splits_collate_concatenates_views():
    args = _args("--aug-splits", "3", "--aa", "rand-m9-mstd0.5-inc1")
    ds = D.AugSplitsDataset(D.DigitsDataset("train"), D.build_train_transform(args, CFG32, separate=True), 3)
    loader = D.create_loader(ds, 4, True, seed=0)
    x, y = next(iter(loader))
    assert x.shape == (12, 3, 32, 32) and torch.equal(y[:4], y[4:8]) and torch.equal(y[:4], y[8:])


def test_aug_splits_with_no_aug_are_identical_no_aug_views():
    """The original's tiny-imagenet-wd sweep trains xcit.yaml (aug_splits 3) with --no-aug: each image
    then comes as k identical resize + center-crop views (the original yielded it k times)."""
    args = _args("--aug-splits", "3", "--no-aug")
    ds = D.AugSplitsDataset(D.DigitsDataset("train"), D.build_train_transform(args, CFG32, separate=True), 3)
    views, label = ds[5]
    plain = D.build_train_transform(args, CFG32)(D.DigitsDataset("train")[5][0])
    assert len(views) == 3 and all(torch.equal(v, plain) for v in views) and label == D.DigitsDataset("train")[5][1]


def test_combined_loaders_mix_each_batch():
    a = D.create_loader(D.DigitsDataset("train"), 6, True, seed=0)

    class Const(torch.utils.data.Dataset):
        def __len__(self):
            return 40

        def __getitem__(self, i):
            return torch.zeros(3, 32, 32), 99

    b = D.create_loader(Const(), 2, True, seed=0)
    for ld in (a,):
        D.set_transform(ld.dataset, transforms.ToTensor())
    comb = D.CombinedLoaders(a, b, seed=0)
    comb.set_epoch(0)
    assert len(comb) == 20  # the shorter loader
    x, y = next(iter(comb))
    assert x.shape[0] == 8 and (y == 99).sum() == 2


def test_non_rgb_dataset_is_rejected():
    class Gray(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.zeros(1, 8, 8), 0

    with pytest.raises(UsageError, match="channel"):
        D.check_three_channels(Gray())


class _Stream(torch.utils.data.IterableDataset):
    """A stand-in for timm's iterable (tfds) datasets: PIL images, a transform attribute, set_epoch."""

    def __init__(self, n=6):
        self.n, self.transform, self.epochs = n, "set-by-caller", []

    def __len__(self):
        return self.n

    def set_epoch(self, epoch):
        self.epochs.append(epoch)

    def __iter__(self):
        ds = D.DigitsDataset("train")
        for i in range(self.n):
            yield ds[i]


def test_iterable_aug_splits_yield_view_tuples_collated_split_major():
    stream = _Stream()
    t3 = D.build_train_transform(_args("--color-jitter", "0.4", "--aug-splits", "3"), CFG32, separate=True)
    ds = D.aug_splits_dataset(stream, t3, 3)
    assert isinstance(ds, D.IterableAugSplitsDataset) and stream.transform is None and len(ds) == 6
    x, y = next(iter(D.create_loader(ds, batch_size=2, is_training=True)))
    assert x.shape == (6, 3, 32, 32) and y.tolist() == [y[0].item(), y[1].item()] * 3
    D.set_loader_epoch(D.create_loader(ds, batch_size=2, is_training=True), 4)
    assert stream.epochs == [4]  # reaches the reader through the wrapper


def test_set_loader_epoch_reshuffles_and_skips():
    ds = D.DigitsDataset("train")
    loader = D.create_loader(ds, batch_size=10, is_training=True, seed=3)
    D.set_loader_epoch(loader, 0)
    first = list(loader.sampler)
    D.set_loader_epoch(loader, 1, start_batches=2)
    second = list(loader.sampler)
    assert len(second) == len(first) - 20 and second != first[20:]
    D.set_loader_epoch(loader, 0, start_batches=2)
    assert list(loader.sampler) == first[20:]


def test_split_folder_resolution_never_falls_back_to_another_split(tmp_path):
    from src.image_folder import resolve_split_folder

    for d in ("train/a", "val/a"):
        (tmp_path / "std" / d).mkdir(parents=True)
    std = str(tmp_path / "std")
    assert resolve_split_folder(std, "validation") == f"{std}/val"  # timm's synonyms
    assert resolve_split_folder(std, "training") == f"{std}/train"
    assert resolve_split_folder(std, "train[:50%]") == f"{std}/train"
    with pytest.raises(UsageError, match=r"no 'test' split folder \(it has train/, val/\)"):
        resolve_split_folder(std, "test")
    (tmp_path / "flat" / "cat").mkdir(parents=True)  # DIR is the split itself: class folders only
    assert resolve_split_folder(str(tmp_path / "flat"), "validation") == str(tmp_path / "flat")


def test_class_maps_must_match_exactly():
    from src.image_folder import check_same_classes

    check_same_classes({"a": 0, "b": 1}, {"a": 0, "b": 1}, "x", "y")
    with pytest.raises(UsageError, match="missing 'b'; extra 'c'"):
        check_same_classes({"a": 0, "b": 1}, {"a": 0, "c": 1}, "x", "y")
    with pytest.raises(UsageError, match="other indices"):
        check_same_classes({"a": 0, "b": 1}, {"a": 1, "b": 0}, "x", "y")


@pytest.mark.parametrize("root", [None, "/tmp"])
def test_tfds_dataset_without_tensorflow_datasets_is_one_line(monkeypatch, root):
    """TFDS is an optional lane: a tfds/ dataset without it installed names the requirements file."""
    import sys

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # what `import` sees when it is not installed
    with pytest.raises(UsageError, match=r"tfds/ datasets need tensorflow and tensorflow-datasets.*"
                                         r"pip install -r requirements-tfds.txt"):
        D.create_dataset("tfds/cifar10", root, "validation", is_training=False)
