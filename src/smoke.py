"""Smoke-test caps of train.py: try a recipe on real data in a minute.

``--max-train-steps N`` ends every epoch after N steps (:class:`CappedLoader`: the loader's length
is N, so the LR schedule, the summary and the checkpoints count N steps per epoch);
``--train-num-samples N`` / ``--val-num-samples N`` replace the training / validation set by a
fixed random subset of N images (:func:`fixed_subset`: the same for every epoch, resume, seed and
process count, so two recipes tried this way see the same images). The caps change nothing else:
evaluation, summary, checkpoints and resume work as in a full run.
"""
from __future__ import annotations

import argparse
import logging
from typing import Any, Optional, Tuple

import torch

from src.errors import UsageError

_logger = logging.getLogger("robust_vits")

SUBSET_SEED = 0  # the subset depends on the dataset and N only, never on --seed

__all__ = ["SUBSET_SEED", "CappedLoader", "fixed_subset", "loader_over", "apply_sample_caps"]


class CappedLoader:
    """At most ``max_steps`` batches per epoch of ``loader``, counted from the epoch's start.

    ``start`` is the number of batches a mid-epoch resume already did (the inner loader skips
    them); the epoch then has ``max_steps - start`` batches left.
    """

    def __init__(self, loader: Any, max_steps: int):
        self.loader, self.max_steps, self.start = loader, int(max_steps), 0

    def __getattr__(self, name: str) -> Any:  # sampler, dataset, batch_size, ... of the inner loader
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return max(0, min(len(self.loader), self.max_steps - self.start))

    def __iter__(self):
        left = len(self)
        if left <= 0:
            return
        for i, batch in enumerate(self.loader):
            yield batch
            if i + 1 >= left:
                return


def fixed_subset(dataset: Any, n: int, what: str, flag: Optional[str] = None) -> Any:
    """A fixed random subset of ``n`` examples of a map-style dataset (in dataset order); ``flag``
    names the option in messages (default ``--<what>-num-samples``)."""
    flag = flag or f"--{what}-num-samples"
    if isinstance(dataset, torch.utils.data.IterableDataset):
        hint = ": cap the training with --max-train-steps instead" if what == "train" else ""
        raise UsageError(f"{flag} needs a dataset with random access; this {what} set is read as a stream "
                         f"(tfds/wds){hint}")
    size = len(dataset)
    if n >= size:
        _logger.info("%s %d: the %s set has only %d images, all used", flag, n, what, size)
        return dataset
    g = torch.Generator().manual_seed(SUBSET_SEED)
    idx = torch.randperm(size, generator=g)[:n].sort().values.tolist()
    return torch.utils.data.Subset(dataset, idx)


def loader_over(loader: Any, dataset: Any, is_training: bool) -> Any:
    """The same loader (batch size, sharding, workers, seed) over another dataset."""
    from src.data import create_loader

    sampler = loader.sampler
    return create_loader(dataset, loader.batch_size, is_training, world_size=getattr(sampler, "world_size", 1),
                         rank=getattr(sampler, "rank", 0), workers=loader.num_workers, pin_memory=loader.pin_memory,
                         seed=getattr(sampler, "seed", 0), persistent_workers=loader.persistent_workers)


def apply_sample_caps(args: argparse.Namespace, train_loader: Any, eval_loader: Any) -> Tuple[Any, Any]:
    """The loaders with ``--train-num-samples`` / ``--val-num-samples`` / ``--max-train-steps`` applied.

    With ``--combine-dataset`` the sample cap applies to the main training set; the combined one
    is still read whole (its loader ends the epoch only if it is the shorter one).
    """
    from src.data import CombinedLoaders, loader_dataset

    n_train: Optional[int] = getattr(args, "train_num_samples", None)
    if n_train:
        inner = train_loader.loader_a if isinstance(train_loader, CombinedLoaders) else train_loader
        capped = loader_over(inner, fixed_subset(loader_dataset(inner), n_train, "train"), True)
        if len(capped) == 0:
            raise UsageError(f"--train-num-samples {n_train} is fewer than one batch ({inner.batch_size} per "
                             f"process x {getattr(inner.sampler, 'world_size', 1)} processes); raise it or lower "
                             f"--batch-size")
        train_loader = CombinedLoaders(capped, train_loader.loader_b, seed=train_loader.seed) \
            if isinstance(train_loader, CombinedLoaders) else capped
    n_val: Optional[int] = getattr(args, "val_num_samples", None)
    if n_val:
        eval_loader = loader_over(eval_loader, fixed_subset(loader_dataset(eval_loader), n_val, "val"), False)
    if getattr(args, "max_train_steps", None):
        train_loader = CappedLoader(train_loader, args.max_train_steps)
    if n_train or n_val or getattr(args, "max_train_steps", None):
        _logger.warning("smoke-test caps: %d training steps per epoch%s%s: the numbers are not the recipe's",
                        len(train_loader), f", {n_train} training images" if n_train else "",
                        f", {len(eval_loader.dataset)} validation images" if n_val else "")
    return train_loader, eval_loader
