"""Datasets, the light-recipe transforms and the data loaders.

Training inputs always stay in [0, 1] (the original's ``--no-normalize`` was always on):
normalization, when wanted, lives inside the model (``--normalize-model``), so attacks see pixels.

Datasets: timm's ``create_dataset`` (``torch/...``, ``hfds/...``, ``tfds/...``, image folders) plus
``digits``, an embedded set (scikit-learn's 1797 bundled 8x8 digits, rendered as 32x32 RGB) that
needs no data dir and no network, with a fixed deterministic train/validation split.
"""
from __future__ import annotations

import logging
import math
import os
import random
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms

from src.errors import UsageError

_logger = logging.getLogger("robust_vits")
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

        self._tensors: Optional[torch.Tensor] = None
        self._tensors_for: Any = None

    def __len__(self) -> int:
        return len(self.targets)

    def _as_tensors(self) -> Optional[torch.Tensor]:
        """All images as one float tensor when the transform is ``ToTensor`` at the native size
        (``--no-aug`` or an evaluation chain at 32 px): the PIL round trip is then skipped."""
        if self._tensors_for is not self.transform:
            self._tensors_for = self.transform
            self._tensors = None
            if is_native_to_tensor(self.transform, self.images.shape[1:3]):
                self._tensors = torch.from_numpy(self.images).permute(0, 3, 1, 2).float().div(255)
        return self._tensors

    def __getitem__(self, i: int):
        tensors = self._as_tensors()
        if tensors is not None:
            return tensors[i], int(self.targets[i])
        img = Image.fromarray(self.images[i])
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[i])


def is_native_to_tensor(transform, hw: Sequence[int]) -> bool:
    """Whether ``transform`` maps an RGB PIL image of size ``hw`` to exactly ``ToTensor()`` of it:
    a ``Compose`` of ``Resize`` / ``CenterCrop`` to the image's own size, ending in ``ToTensor``."""
    steps = list(transform.transforms) if isinstance(transform, transforms.Compose) else [transform]
    if not steps or type(steps[-1]) is not transforms.ToTensor:
        return False
    h, w = int(hw[0]), int(hw[1])
    for t in steps[:-1]:
        if type(t) is transforms.CenterCrop:
            if tuple(t.size) != (h, w):
                return False
        elif type(t) is transforms.Resize:
            size = [t.size] if isinstance(t.size, int) else list(t.size)
            same = size == [h, w] or (len(size) == 1 and size[0] == min(h, w))
            if not same or t.max_size is not None:
                return False
        else:
            return False
    return True


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
                   batch_size: int = 1, repeats: float = 0, seed: int = 42, class_map: Optional[str] = None,
                   download: bool = False):
    """timm's dataset factory plus ``digits``; bad names and missing folders become ``UsageError``.

    Image folders (``name == ''``) are read by ``src.image_folder``: no silent fallback from a
    missing split folder to the root, class folders checked against the training split (or
    ``class_map``), unreadable images are errors naming the file, 16-bit PNGs scaled to 8 bits.
    """
    name = name or ""
    check_dataset_name(name)
    if name.lower() == "digits":
        if class_map:
            raise UsageError("--class-map does not apply to the embedded digits dataset")
        return DigitsDataset(split)
    data_errors: Tuple[type, ...] = (RuntimeError, OSError, AssertionError, ValueError, KeyError)
    if name.lower().startswith("tfds/"):
        # TensorFlow must be imported after torch / torchvision / timm, or the process segfaults
        from src.tfds_data import import_tfds

        import_tfds()
        import tensorflow as tf

        data_errors += (tf.errors.OpError,)  # TensorFlow's file system: a gs:// data dir it cannot reach
    needs_root = needs_data_dir(name)
    if needs_root and not root:
        raise UsageError(f"dataset '{name or 'image folder'}' needs a data dir (positional DIR or data_dir "
                         "in the config); the embedded demo dataset is --dataset digits")
    if needs_root and "://" not in str(root) and not os.path.isdir(root):
        if os.path.exists(root):
            raise UsageError(f"data dir {root} is a file, not a folder: DIR is the folder that holds the dataset")
        raise UsageError(f"data dir {root} does not exist")
    if class_map and "://" not in str(class_map) and not os.path.isfile(class_map):
        if os.path.exists(class_map):
            raise UsageError(f"--class-map {class_map} is a folder, not a file of class names (one per line)")
        raise UsageError(f"--class-map file {class_map} does not exist")
    if not name:
        from src.image_folder import create_folder_dataset

        return create_folder_dataset(str(root), split, is_training, class_map=class_map)
    from timm.data import create_dataset as timm_create_dataset

    try:
        ds = timm_create_dataset(name, root=root, split=split, is_training=is_training, class_map=class_map,
                                 batch_size=batch_size, repeats=repeats, seed=seed, download=download)
    except data_errors as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if download and isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
            # urllib's URLError / socket errors from torchvision's download (offline machine, proxy)
            raise UsageError(f"cannot download dataset '{name}' into {root} (--dataset-download): {msg}; check "
                             "the network connection, or download it elsewhere and copy it into the data dir") \
                from None
        if name.lower().startswith("tfds/"):  # which builds / splits the data dir has
            from src.tfds_data import describe_data_dir, explain_error

            msg = explain_error(name, root, split, e) or f"{msg} (data dir: {describe_data_dir(root)})"
            raise UsageError(f"cannot load dataset '{name}' split '{split}': {msg}") from None
        raise UsageError(f"cannot load dataset '{name or 'image folder'}' split '{split}' from {root}: {msg}") \
            from None
    if name.lower().startswith("tfds/"):
        from src.tfds_data import check_label_names, check_split, check_trainable

        builder = getattr(getattr(ds, "reader", None), "builder", None)
        if builder is not None:  # an empty slice opens and fails with a traceback at the first batch
            check_split(builder, name, split, root)
            check_label_names(builder, name, root)
        if is_training:
            check_trainable(ds, name)
    return ds


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
        # timm's no-aug path (the original's): the data config's interpolation (bicubic for XCiT), not
        # the training one; 'random' means bilinear there
        interp = data_config.get("interpolation") or "bilinear"
        interp = "bilinear" if interp == "random" else interp
        resize_crop = [transforms.Resize(size, interpolation=str_to_pil_interp(interp)), transforms.CenterCrop(size)]
        if separate:  # --aug-splits with --no-aug (the original's tiny-imagenet-wd sweep): identical views
            return transforms.Compose(resize_crop), transforms.Compose([]), transforms.Compose([transforms.ToTensor()])
        return transforms.Compose(resize_crop + [transforms.ToTensor()])
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


class SplitViews:
    """The views of one image for ``--aug-splits``: the clean (primary) view plus ``num_splits - 1``
    augmented ones, from timm's separated (primary, secondary, final) transforms."""

    def __init__(self, transforms3, num_splits: int):
        self.primary, self.secondary, self.final = transforms3
        self.num_splits = num_splits

    def __call__(self, img) -> tuple:
        base = self.primary(img)
        return tuple([self.final(base)] + [self.final(self.secondary(base)) for _ in range(self.num_splits - 1)])


class AugSplitsDataset(Dataset):
    """AugMix-style views: the clean (primary) view plus ``num_splits - 1`` augmented views."""

    def __init__(self, dataset, transforms3, num_splits: int):
        self.dataset = dataset
        self.views = SplitViews(transforms3, num_splits)
        set_transform(dataset, None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        img, target = self.dataset[i]
        return self.views(img), target


class IterableAugSplitsDataset(torch.utils.data.IterableDataset):
    """``AugSplitsDataset`` for iterable (tfds/wds) datasets: each sample becomes a tuple of views.

    The original's ``IterableAugMixDataset`` yielded the views as separate samples, so a batch
    interleaved clean and augmented views and the JSD loss / split BN (which expect the first
    1/k of the batch clean) saw mixed splits; here the views are collated split-major exactly as for
    map-style datasets (batch = k x ``--batch-size`` images).
    """

    def __init__(self, dataset, transforms3, num_splits: int):
        self.dataset = dataset
        self.views = SplitViews(transforms3, num_splits)
        set_transform(dataset, None)

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def set_loader_cfg(self, num_workers: Optional[int] = None) -> None:
        if hasattr(self.dataset, "set_loader_cfg"):
            self.dataset.set_loader_cfg(num_workers=num_workers)

    def __iter__(self):
        for img, target in self.dataset:
            yield self.views(img), target


def aug_splits_dataset(dataset, transforms3, num_splits: int):
    """The augmentation-splits wrapper that fits the dataset (map-style or iterable)."""
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return IterableAugSplitsDataset(dataset, transforms3, num_splits)
    return AugSplitsDataset(dataset, transforms3, num_splits)


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
    (mid-epoch resume from a recovery checkpoint). With ``sample_seeds`` it yields ``(index, key)``
    pairs for :class:`SampleSeeded`: the key ``(seed, epoch, index)`` names the sample's random numbers.
    """

    def __init__(self, length: int, world_size: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = True, batch_size: int = 1, sample_seeds: bool = False):
        self.length, self.world_size, self.rank = length, world_size, rank
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.sample_seeds = sample_seeds
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

    def __iter__(self) -> Iterator[Any]:
        order = self._indices()[self.start:]
        if self.sample_seeds:
            return iter([(i, (self.seed, self.epoch, i)) for i in order])
        return iter(order)

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


class SampleSeeded(Dataset):
    """Draws each sample's random augmentations from a seed of its own (``ShardSampler(sample_seeds=True)``).

    Used by training loaders with ``--workers`` > 0, whose workers otherwise draw from per-worker
    generators: then a sample's crop and flip depend on which worker loaded it and on what that worker
    loaded before, so a run resumed mid-epoch (the skipped batches are never loaded) sees other
    augmentations than the interrupted run would have. Seeded per sample from (``--seed``, epoch,
    index), the augmentations are the same whatever the worker count, process count or resume point.
    Only ever read inside loader workers: it re-seeds that process's Python, NumPy and torch generators.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed_key = key
        seed = sample_seed(*seed_key)
        random.seed(seed)
        np.random.seed(seed >> 32)
        torch.default_generator.manual_seed(seed)  # the CPU generator (torch.manual_seed costs ~0.5 ms)
        return self.dataset[index]


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 64-bit seed for one sample of one epoch: the three integers mixed (SplitMix64), so neighbouring
    samples, epochs and ``--seed`` values get unrelated random numbers."""
    return _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ (epoch & _MASK64)) ^ (index & _MASK64))


def loader_dataset(loader: DataLoader) -> Any:
    """The dataset a loader reads, without the per-sample seeding wrapper ``create_loader`` may add."""
    dataset = loader.dataset
    return dataset.dataset if isinstance(dataset, SampleSeeded) else dataset


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
    if iterable and hasattr(dataset, "set_loader_cfg"):
        dataset.set_loader_cfg(num_workers=workers)  # timm's tfds reader shards by process x worker
    if iterable and workers == 0 and world_size > 1:
        shard_tfds_in_main_process(dataset, world_size, rank)
    if not iterable:
        # training workers draw augmentations per sample (SampleSeeded); the main process (--workers 0)
        # draws from the global generators, which recovery points keep
        sample_seeds = is_training and workers > 0
        sampler = ShardSampler(len(dataset), world_size, rank, shuffle=is_training, seed=seed,
                               drop_last=is_training, batch_size=batch_size, sample_seeds=sample_seeds)
        if sample_seeds:
            dataset = SampleSeeded(dataset)
    # A training loader draws its workers' base seed from its own generator (re-seeded every epoch by
    # set_loader_epoch), not from the global one: starting to iterate then draws no number that the
    # training steps would otherwise draw, so a mid-epoch resume can put the global generators back
    # to where the recovery checkpoint left them (src.cli.rng_state).
    generator = torch.Generator().manual_seed(seed + rank) if is_training else None
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        pin_memory=pin_memory, drop_last=is_training, collate_fn=_collate,
                        worker_init_fn=_worker_init if workers > 0 else None,
                        persistent_workers=persistent_workers and workers > 0, generator=generator)
    loader.epoch_seed_base = seed + rank
    return loader


def shard_tfds_in_main_process(dataset, world_size: int, rank: int) -> None:
    """Give this process its even sub-split of a tfds dataset read without loader workers.

    timm's tfds reader picks per-process sub-splits only inside loader workers; read in the main
    process (``--workers 0``) on several processes it asks TFDS to shard by files, which fails for
    datasets with fewer files than processes. Each process then reads ``tfds.even_splits(split)[rank]``.
    """
    inner = getattr(dataset, "dataset", dataset)  # through IterableAugSplitsDataset
    reader = getattr(inner, "reader", None)
    if reader is None or not hasattr(reader, "subsplit") or not hasattr(reader, "builder"):
        return
    import tensorflow_datasets as tfds

    reader.subsplit = tfds.even_splits(reader.split, world_size)[rank]


class CombinedLoaders:
    """Zip two training loaders, concatenate each pair of batches and shuffle within the batch.

    The epoch ends with the shorter loader (original-behaviour.md §4.4).
    """

    def __init__(self, loader_a: DataLoader, loader_b: DataLoader, seed: int = 0):
        self.loader_a, self.loader_b = loader_a, loader_b
        self.seed = seed
        self.epoch = 0
        self.start = 0  # batches of the epoch a mid-epoch resume already did

    @property
    def sampler(self):
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.start = 0
        for ld in (self.loader_a, self.loader_b):
            set_loader_epoch(ld, epoch)

    def set_start(self, start_batches_a: int) -> None:
        self.start = start_batches_a
        for ld in (self.loader_a, self.loader_b):
            if hasattr(ld.sampler, "set_start"):
                ld.sampler.set_start(start_batches_a * ld.batch_size)

    def __len__(self) -> int:
        return min(len(self.loader_a), len(self.loader_b))

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.seed + 7919 * self.epoch)
        # a mid-epoch resume skips the batches already done: their within-batch shuffles are drawn (and
        # dropped) too, so batch i gets the same order as in an uninterrupted epoch
        size = self.loader_a.batch_size + self.loader_b.batch_size
        for _ in range(self.start):
            torch.randperm(size, generator=g)
        for (xa, ya), (xb, yb) in zip(self.loader_a, self.loader_b):
            x = torch.cat([xa, xb])
            y = torch.cat([ya, yb])
            perm = torch.randperm(len(y), generator=g)
            yield x[perm], y[perm]


def set_loader_epoch(loader, epoch: int, start_batches: int = 0) -> None:
    """Start ``epoch`` of a training loader: reshuffle, and skip ``start_batches`` (mid-epoch resume).

    Map-style data reshuffles through its ``ShardSampler``; tfds/wds data through the dataset's
    ``set_epoch`` (timm's readers seed their file and buffer shuffles with it). An iterable
    dataset cannot seek, so a mid-epoch resume on one replays the epoch's data from its start.
    """
    if isinstance(loader, CombinedLoaders):
        loader.set_epoch(epoch)
        loader.set_start(start_batches)
        return
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    generator, base = getattr(loader, "generator", None), getattr(loader, "epoch_seed_base", None)
    if generator is not None and base is not None:
        generator.manual_seed(base + 10007 * (epoch + 1))  # the workers' seeds of this epoch
    if hasattr(sampler, "set_start"):
        sampler.set_start(start_batches * loader.batch_size)
    dataset = getattr(loader, "dataset", None)
    if isinstance(dataset, torch.utils.data.IterableDataset):
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        if start_batches:
            _logger.warning("iterable (tfds/wds) data cannot resume mid-epoch: epoch %d reads its data from the "
                            "start again after the %d batches already done", epoch, start_batches)


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


# ----------------------------------------------------------------------------------------------
# The training run's loaders
# ----------------------------------------------------------------------------------------------

def check_class_count(dataset, what: str, num_classes: Optional[int]) -> None:
    """A training dataset (the main one or ``--combine-dataset``'s) with more classes than the model has
    outputs: one line, not an out-of-range label in the loss at the first batch."""
    ds_classes = dataset_num_classes(getattr(dataset, "dataset", None) if isinstance(
        dataset, (AugSplitsDataset, IterableAugSplitsDataset)) else dataset)
    if ds_classes is not None and num_classes is not None and ds_classes > num_classes:
        raise UsageError(f"{what} has {ds_classes} classes but the model has {num_classes} outputs; "
                         f"pass --num-classes {ds_classes}")


@dataclass
class TrainDatasets:
    """train.py's datasets before any transform: read (folders, files, splits checked) before the model is built."""

    train: Any
    eval: Any
    combine: Any = None
    main_bs: int = 0
    comb_bs: int = 0


def create_train_datasets(args) -> TrainDatasets:
    """The training, evaluation and (``--combine-dataset``) combined datasets, without transforms: what needs no
    model, so that a wrong data dir, split or class map is one error line before a model is built."""
    comb_bs = int(args.batch_size * args.combined_dataset_ratio) if args.combine_dataset else 0
    main_bs = args.batch_size - comb_bs
    if args.combine_dataset and (comb_bs < 1 or main_bs < 1):
        raise UsageError(f"--combined-dataset-ratio {args.combined_dataset_ratio} with --batch-size "
                         f"{args.batch_size} leaves a loader with no images per batch")

    def train_ds(name: str, root: Optional[str], batch_size: int):
        return create_dataset(name, root, args.train_split, is_training=True, batch_size=batch_size,
                              repeats=args.epoch_repeats, seed=args.seed)

    train = train_ds(args.dataset, args.data_dir, main_bs)
    eval_bs = args.validation_batch_size or args.batch_size
    eval_ds = create_dataset(args.dataset, args.data_dir, args.val_split, is_training=False, batch_size=eval_bs)
    if not args.dataset:  # image folders: not the training images, the same class indices
        from src.image_folder import check_train_eval_folders

        check_train_eval_folders(train, eval_ds, args.train_split, args.val_split)
    combine = train_ds(args.combine_dataset, args.combine_data_dir or args.data_dir, comb_bs) \
        if args.combine_dataset else None
    if args.epoch_repeats and not any(isinstance(ds, torch.utils.data.IterableDataset) for ds in (train, combine)):
        # timm hands repeats to its streaming readers (tfds/, wds/) only: a map-style epoch is the dataset once
        names = " and ".join([f"'{args.dataset or 'image folder'}'"]
                             + ([f"'{args.combine_dataset}'"] if args.combine_dataset else []))
        raise UsageError(f"--epoch-repeats {args.epoch_repeats:g} applies to streamed datasets (tfds/, wds/) only; "
                         f"{names} would silently ignore it: drop --epoch-repeats")
    return TrainDatasets(train=train, eval=eval_ds, combine=combine, main_bs=main_bs, comb_bs=comb_bs)


def create_train_loaders(args, data_config: Dict[str, Any], world_size: int, rank: int,
                         num_classes: Optional[int], datasets: Optional[TrainDatasets] = None) -> Tuple[Any, DataLoader]:
    """train.py's training loader (plain or ``--combine-dataset`` mixed) and evaluation loader, over
    ``datasets`` (``create_train_datasets(args)`` when not given) with the transforms of ``data_config``.

    With ``--combine-dataset`` each batch takes ``int(batch * ratio)`` images from the second
    dataset and the rest from the first (original-behaviour.md §4.4); each dataset gets its own
    loader batch as the tfds readers' batch hint, so their epochs round to whole batches.
    """
    datasets = datasets if datasets is not None else create_train_datasets(args)
    transform = build_train_transform(args, data_config, separate=bool(args.aug_splits))

    def with_train_transform(ds):
        if args.aug_splits:
            return aug_splits_dataset(ds, transform, args.aug_splits)
        set_transform(ds, transform)
        return ds

    main_bs, comb_bs = datasets.main_bs, datasets.comb_bs
    train_ds = with_train_transform(datasets.train)
    eval_bs = args.validation_batch_size or args.batch_size
    eval_ds = datasets.eval
    set_transform(eval_ds, build_eval_transform(data_config))
    check_three_channels(eval_ds, data_config["input_size"][0])
    check_class_count(train_ds, "dataset", num_classes)
    common = dict(world_size=world_size, rank=rank, pin_memory=args.pin_mem, seed=args.seed,
                  persistent_workers=args.use_multi_epochs_loader)
    train_loader = create_loader(train_ds, main_bs, True, workers=args.workers, **common)
    if args.combine_dataset:
        comb_ds = with_train_transform(datasets.combine)
        check_class_count(comb_ds, f"--combine-dataset {args.combine_dataset}", num_classes)
        comb_loader = create_loader(comb_ds, comb_bs, True, workers=args.workers, **{**common, "seed": args.seed + 1})
        train_loader = CombinedLoaders(train_loader, comb_loader, seed=args.seed)
    # the original capped the eval loader's workers at 2 for tfds/wds data
    eval_workers = min(args.workers, 2) if str(args.dataset).startswith(("tfds/", "wds/")) else args.workers
    eval_loader = create_loader(eval_ds, eval_bs, False, workers=eval_workers, **common)
    if len(train_loader) == 0:
        raise UsageError(f"the training set has fewer examples than one batch ({args.batch_size} per process "
                         f"x {world_size}); lower --batch-size")
    return train_loader, eval_loader
