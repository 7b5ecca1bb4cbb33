"""Datasets, the light-recipe transforms and the data loaders.

Training inputs always stay in [0, 1] (the original's ``--no-normalize`` was always on):
normalization, when wanted, lives inside the model (``--normalize-model``), so attacks see pixels.

Datasets: timm's ``create_dataset`` (``torch/...``, ``hfds/...``, ``tfds/...``, image folders) plus
``digits``, an embedded set (scikit-learn's 1797 bundled 8x8 digits, rendered as 32x32 RGB) that
needs no data dir and no network, with a fixed deterministic train/validation split.
"""
from __future__ import annotations

import math
import os
import random
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms

from src.errors import UsageError

DIGITS_NUM_VAL = 297  # 1797 = 1500 train + 297 validation
DIGITS_SPLIT_SEED = 0


# ----------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------

def _render_digits() -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as uint8 (N, 32, 32, 3) images (bicubic upscaling) and int labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = []
    for im in d.images:  # values 0..16
        small = Image.fromarray(np.clip(im * 16.0, 0, 255).astype(np.uint8), mode="L")
        big = small.resize((32, 32), Image.BICUBIC).convert("RGB")
        imgs.append(np.asarray(big))
    return np.stack(imgs), d.target.astype(np.int64)


class DigitsDataset(Dataset):
    """The embedded demo dataset: 1500 training and 297 validation images, 10 classes, 32x32 RGB."""

    _cache: Optional[Tuple[np.ndarray, np.ndarray]] = None
    num_classes = 10

    def __init__(self, split: str = "train", transform=None):
        if DigitsDataset._cache is None:
            DigitsDataset._cache = _render_digits()
        images, labels = DigitsDataset._cache
        order = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(len(labels))
        if split in ("train", "training"):
            idx = order[DIGITS_NUM_VAL:]
        elif split in ("validation", "val", "test"):
            idx = order[:DIGITS_NUM_VAL]
        else:
            raise UsageError(f"dataset 'digits' has splits train and validation (or test), not '{split}'")
        self.images = images[idx]
        self.targets = labels[idx]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.images[i])
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[i])


_DATASET_PREFIXES = ("torch/", "tfds/", "hfds/", "hfids/", "wds/")


def needs_data_dir(name: Optional[str]) -> bool:
    """Whether a dataset name needs a local root (``digits`` is embedded; tfds/hfds/wds find their data)."""
    name = (name or "").lower()
    return name != "digits" and not name.startswith(_DATASET_PREFIXES[1:])


def check_dataset_name(name: Optional[str]) -> None:
    """Reject an unknown dataset name before anything asks for its data dir or builds a model."""
    name = name or ""
    if name and name.lower() != "digits" and not name.lower().startswith(_DATASET_PREFIXES):
        raise UsageError(f"unknown dataset '{name}': use digits, torch/<name>, tfds/<name>, hfds/<name> "
                         "or '' for an image folder")


def create_dataset(name: str, root: Optional[str], split: str, is_training: bool,
                   batch_size: int = 1, repeats: float = 0, seed: int = 42):
    """timm's dataset factory plus ``digits``; bad names and missing folders become ``UsageError``."""
    name = name or ""
    check_dataset_name(name)
    if name.lower() == "digits":
        return DigitsDataset(split)
    if name.lower().startswith("tfds/"):
        # TensorFlow must be imported after torch / torchvision / timm, or the process segfaults
        import timm  # noqa: F401
        import torchvision  # noqa: F401
    needs_root = needs_data_dir(name)
    if needs_root and not root:
        raise UsageError(f"dataset '{name or 'image folder'}' needs a data dir (positional DIR or data_dir "
                         "in the config); the embedded demo dataset is --dataset digits")
    if needs_root and "://" not in str(root) and not os.path.isdir(root):
        raise UsageError(f"data dir {root} does not exist")
    from timm.data import create_dataset as timm_create_dataset

    try:
        return timm_create_dataset(name, root=root, split=split, is_training=is_training,
                                   batch_size=batch_size, repeats=repeats, seed=seed, download=False)
    except (RuntimeError, FileNotFoundError, AssertionError, ValueError, KeyError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot load dataset '{name or 'image folder'}' split '{split}' from {root}: {msg}") \
            from None


def dataset_num_classes(dataset) -> Optional[int]:
    for attr in ("num_classes",):
        v = getattr(dataset, attr, None)
        if isinstance(v, int):
            return v
    reader = getattr(dataset, "reader", None)
    if reader is not None:
        ctoi = getattr(reader, "class_to_idx", None)
        if ctoi:
            return len(ctoi)
    classes = getattr(dataset, "classes", None)
    if classes:
        return len(classes)
    return None


def set_transform(dataset, transform) -> None:
    """Set the sample transform on a timm / torchvision / digits dataset."""
    dataset.transform = transform


# ----------------------------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------------------------

def _size_hw(input_size: Sequence[int]) -> Tuple[int, int]:
    return int(input_size[-2]), int(input_size[-1])


def build_train_transform(args, data_config: Dict[str, Any], separate: bool = False):
    """The train chain of original-behaviour.md §4.2 ending in ``ToTensor`` (images in [0, 1]).

    With ``separate`` returns (primary, secondary, final) for augmentation splits.
    """
    from timm.data.transforms import RandomResizedCropAndInterpolation, str_to_pil_interp

    size = _size_hw(data_config["input_size"])
    if args.no_aug:
        interp = args.train_interpolation if args.train_interpolation not in (None, "", "random") else "bilinear"
        tfl = [transforms.Resize(size, interpolation=str_to_pil_interp(interp)), transforms.CenterCrop(size),
               transforms.ToTensor()]
        return transforms.Compose(tfl)
    primary: List[Any] = []
    if args.rand_crop:
        primary.append(transforms.RandomCrop(size, padding=args.pad or None))
    else:
        if args.pad and args.pad > 0:
            primary.append(transforms.Pad(args.pad))
        primary.append(RandomResizedCropAndInterpolation(
            size, scale=tuple(args.scale), ratio=tuple(args.ratio), interpolation=args.train_interpolation))
    if args.hflip > 0:
        primary.append(transforms.RandomHorizontalFlip(p=args.hflip))
    if args.vflip > 0:
        primary.append(transforms.RandomVerticalFlip(p=args.vflip))

    secondary: List[Any] = []
    if args.aa:
        from timm.data.auto_augment import (augment_and_mix_transform, auto_augment_transform,
                                            rand_augment_transform)

        mean = data_config.get("mean") or (0.485, 0.456, 0.406)
        aa_params = dict(translate_const=int(min(size) * 0.45),
                         img_mean=tuple(min(255, round(255 * m)) for m in mean))
        if args.train_interpolation and args.train_interpolation != "random":
            aa_params["interpolation"] = str_to_pil_interp(args.train_interpolation)
        try:
            if args.aa.startswith("rand"):
                secondary.append(rand_augment_transform(args.aa, aa_params))
            elif args.aa.startswith("augmix"):
                aa_params["translate_pct"] = 0.3
                secondary.append(augment_and_mix_transform(args.aa, aa_params))
            else:
                secondary.append(auto_augment_transform(args.aa, aa_params))
        except (AssertionError, KeyError, ValueError) as e:
            raise UsageError(f"invalid --aa policy '{args.aa}': {e}") from None
    elif args.color_jitter is not None:
        cj = float(args.color_jitter)
        secondary.append(transforms.ColorJitter(cj, cj, cj))
    if args.rand_rotation and args.rand_rotation > 0:
        secondary.append(transforms.RandomRotation(args.rand_rotation))
    final = [transforms.ToTensor()]
    if separate:
        return transforms.Compose(primary), transforms.Compose(secondary), transforms.Compose(final)
    return transforms.Compose(primary + secondary + final)


def build_eval_transform(data_config: Dict[str, Any]):
    """Resize(floor(size / crop_pct)) + CenterCrop(size) + ToTensor (original-behaviour.md §4.3)."""
    from timm.data.transforms import str_to_pil_interp

    size = _size_hw(data_config["input_size"])
    crop_pct = data_config.get("crop_pct") or 1.0
    interp = data_config.get("interpolation") or "bilinear"
    if size[0] == size[1]:
        scale = math.floor(size[0] / crop_pct)
    else:
        scale = tuple(math.floor(s / crop_pct) for s in size)
    return transforms.Compose([
        transforms.Resize(scale, interpolation=str_to_pil_interp(interp)),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
    ])


class AugSplitsDataset(Dataset):
    """AugMix-style views: the clean (primary) view plus ``num_splits - 1`` augmented views."""

    def __init__(self, dataset, transforms3, num_splits: int):
        self.dataset = dataset
        self.primary, self.secondary, self.final = transforms3
        self.num_splits = num_splits
        set_transform(dataset, None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        img, target = self.dataset[i]
        base = self.primary(img)
        views = [self.final(base)] + [self.final(self.secondary(base)) for _ in range(self.num_splits - 1)]
        return tuple(views), target


class NotNormalizedRandomErasing:
    """Random erasing for images in [0, 1] (timm's RandomErasing assumes normalized inputs).

    Per image with probability ``p``: up to 10 attempts to place a rectangle of area in
    [0.02, 1/3] of the image (divided by the count) and log-uniform aspect ratio in [0.3, 1/0.3];
    fill 'pixel' = per-pixel normal(0.5, 0.25) truncated to [0, 1], 'rand' = one such value per
    channel, 'const' = zeros. ``num_splits > 1`` leaves the first (clean) split untouched.
    """

    def __init__(self, probability: float = 0.5, mode: str = "pixel", max_count: int = 1,
                 num_splits: int = 0, min_area: float = 0.02, max_area: float = 1 / 3,
                 min_aspect: float = 0.3):
        if mode not in ("pixel", "rand", "const"):
            raise UsageError(f"--remode must be pixel, rand or const, got '{mode}'")
        self.probability = probability
        self.mode = mode
        self.max_count = max(1, int(max_count))
        self.num_splits = num_splits
        self.min_area, self.max_area = min_area, max_area
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))

    def _fill(self, shape, dtype, device) -> torch.Tensor:
        if self.mode == "const":
            return torch.zeros(shape, dtype=dtype, device=device)
        fill_shape = shape if self.mode == "pixel" else (shape[0], 1, 1)
        t = torch.empty(fill_shape, dtype=torch.float32, device=device)
        torch.nn.init.trunc_normal_(t, mean=0.5, std=0.25, a=0.0, b=1.0)
        return t.to(dtype).expand(shape)

    def _erase(self, img: torch.Tensor) -> None:
        if random.random() > self.probability:
            return
        chan, h_img, w_img = img.shape
        area = h_img * w_img
        count = 1 if self.max_count == 1 else random.randint(1, self.max_count)
        for _ in range(count):
            for _attempt in range(10):
                target = random.uniform(self.min_area, self.max_area) * area / count
                aspect = math.exp(random.uniform(*self.log_aspect))
                h = int(round(math.sqrt(target * aspect)))
                w = int(round(math.sqrt(target / aspect)))
                if w < w_img and h < h_img:
                    top = random.randint(0, h_img - h)
                    left = random.randint(0, w_img - w)
                    img[:, top:top + h, left:left + w] = self._fill((chan, h, w), img.dtype, img.device)
                    break

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.dim() == 3:
            self._erase(batch)
            return batch
        start = batch.shape[0] // self.num_splits if self.num_splits > 1 else 0
        for i in range(start, batch.shape[0]):
            self._erase(batch[i])
        return batch


# ----------------------------------------------------------------------------------------------
# Samplers and loaders
# ----------------------------------------------------------------------------------------------

class ShardSampler(Sampler):
    """Per-process shard of a (shuffled) epoch order that does not depend on the world size.

    The epoch permutation is drawn from ``seed + epoch``; process ``rank`` takes every
    ``world_size``-th index. With batch size b per process, the union of step i over all processes
    is the same set of samples a single process sees with batch b * world_size, so metrics reduced
    over processes equal the single-process ones. Training drops the tail (``drop_last``);
    evaluation keeps every example exactly once (no padding with duplicates, unlike the original,
    so distributed accuracies are exact). ``set_start`` skips already-seen samples of the epoch
    (mid-epoch resume from a recovery checkpoint).
    """

    def __init__(self, length: int, world_size: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = True, batch_size: int = 1):
        self.length, self.world_size, self.rank = length, world_size, rank
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.batch_size = batch_size
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_start(self, start_samples: int) -> None:
        self.start = start_samples

    def _indices(self) -> List[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        if self.drop_last:
            usable = (self.length // (self.world_size * self.batch_size)) * self.world_size * self.batch_size
            order = order[:usable]
        return order[self.rank::self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start:])

    def __len__(self) -> int:
        return max(0, len(self._indices()) - self.start)


def _collate(batch):
    imgs, targets = zip(*batch)
    if isinstance(imgs[0], (tuple, list)):  # augmentation splits: concatenate the views split-major
        n = len(imgs[0])
        x = torch.cat([torch.stack([im[k] for im in imgs]) for k in range(n)])
        y = torch.as_tensor(targets).repeat(n)
        return x, y
    return torch.stack(imgs), torch.as_tensor(targets)


def _worker_init(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    seed = info.seed % (2 ** 32)
    random.seed(seed)
    np.random.seed(seed % (2 ** 32 - 1))


def create_loader(dataset, batch_size: int, is_training: bool, world_size: int = 1, rank: int = 0,
                  workers: int = 0, pin_memory: bool = False, seed: int = 0,
                  persistent_workers: bool = False) -> DataLoader:
    """A DataLoader over a map-style dataset with a ``ShardSampler`` (or an iterable dataset as is)."""
    iterable = isinstance(dataset, torch.utils.data.IterableDataset)
    sampler = None
    if not iterable:
        sampler = ShardSampler(len(dataset), world_size, rank, shuffle=is_training, seed=seed,
                               drop_last=is_training, batch_size=batch_size)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=pin_memory, drop_last=is_training, collate_fn=_collate,
                      worker_init_fn=_worker_init if workers > 0 else None,
                      persistent_workers=persistent_workers and workers > 0)


class CombinedLoaders:
    """Zip two training loaders, concatenate each pair of batches and shuffle within the batch.

    The epoch ends with the shorter loader (original-behaviour.md §4.4).
    """

    def __init__(self, loader_a: DataLoader, loader_b: DataLoader, seed: int = 0):
        self.loader_a, self.loader_b = loader_a, loader_b
        self.seed = seed
        self.epoch = 0

    @property
    def sampler(self):
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for ld in (self.loader_a, self.loader_b):
            if hasattr(ld.sampler, "set_epoch"):
                ld.sampler.set_epoch(epoch)

    def set_start(self, start_batches_a: int) -> None:
        for ld in (self.loader_a, self.loader_b):
            if hasattr(ld.sampler, "set_start"):
                ld.sampler.set_start(start_batches_a * ld.batch_size)

    def __len__(self) -> int:
        return min(len(self.loader_a), len(self.loader_b))

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.seed + 7919 * self.epoch)
        for (xa, ya), (xb, yb) in zip(self.loader_a, self.loader_b):
            x = torch.cat([xa, xb])
            y = torch.cat([ya, yb])
            perm = torch.randperm(len(y), generator=g)
            yield x[perm], y[perm]


def check_three_channels(dataset, expected_channels: int = 3) -> None:
    """Fail early with a clear message when the dataset's images do not have the model's channels."""
    if isinstance(dataset, torch.utils.data.IterableDataset) or len(dataset) == 0:
        return
    sample = dataset[0][0]
    if isinstance(sample, (tuple, list)):
        sample = sample[0]
    if torch.is_tensor(sample) and sample.dim() == 3 and sample.shape[0] != expected_channels:
        raise UsageError(f"dataset images have {sample.shape[0]} channel(s) but the model expects "
                         f"{expected_channels}; this tool trains on 3-channel (RGB) image datasets")
