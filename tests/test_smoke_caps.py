"""Smoke-test caps of train.py (--max-train-steps, --train-num-samples, --val-num-samples): an epoch
ends after N steps, the subsets are fixed, and evaluation, summary, checkpoints and resume stay right."""
from __future__ import annotations

import csv
import io
import logging
import os

import pytest
import torch

from src import storage
from src.errors import UsageError
from src.smoke import CappedLoader, fixed_subset
from tests.conftest import TINY_TRAIN, run_train

pytestmark = pytest.mark.usefixtures("single_cpu_thread")


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _rows(path):
    return list(csv.DictReader(io.StringIO(storage.read_text(path))))


@pytest.fixture
def eval_sizes():
    """The image counts of every per-epoch evaluation, from its log line."""
    lines = []

    class Grab(logging.Handler):
        def emit(self, record):
            msg = record.getMessage()
            if msg.startswith("eval: loss"):
                lines.append(int(msg.split("(")[1].split(" images")[0]))

    logger, handler = logging.getLogger("robust_vits"), Grab()
    old = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(old)


def test_step_and_sample_caps_keep_summary_checkpoints_and_resume_right(tmp_path, eval_sizes):
    argv = TINY_TRAIN + ["--output", str(tmp_path), "--experiment", "smoke", "--max-train-steps", "2",
                         "--train-num-samples", "400", "--val-num-samples", "120"]
    res = run_train(argv + ["--epochs", "2"])
    d = res["output_dir"]
    last = _load(os.path.join(d, "last.pth.tar"))
    assert last["step_count"] == 2 and last["step_count_global"] == 4  # 2 steps in each of 2 epochs
    assert [int(r["epoch"]) for r in _rows(os.path.join(d, "summary.csv"))] == [0, 1]
    assert eval_sizes == [120, 120]  # the validation subset, every epoch
    assert {"best.pth.tar", "checkpoint-0.pth.tar", "checkpoint-1.pth.tar"} <= set(os.listdir(d))
    # resuming continues with the same caps: one more epoch of 2 steps
    res = run_train(argv + ["--epochs", "3", "--resume", os.path.join(d, "last.pth.tar")])
    assert res["output_dir"] == d
    last = _load(os.path.join(d, "last.pth.tar"))
    assert last["epoch"] == 2 and last["step_count_global"] == 6
    assert [int(r["epoch"]) for r in _rows(os.path.join(d, "summary.csv"))] == [0, 1, 2]


def test_train_sample_cap_sets_the_epoch_length(tmp_path):
    res = run_train(TINY_TRAIN + ["--output", str(tmp_path), "--experiment", "n", "--epochs", "1",
                                  "--train-num-samples", "300"])  # batch 50: 6 steps
    assert _load(os.path.join(res["output_dir"], "last.pth.tar"))["step_count_global"] == 6


def test_fixed_subset_is_the_same_every_time_and_independent_of_the_seed():
    from src.data import DigitsDataset

    ds = DigitsDataset("train")
    a, b = fixed_subset(ds, 100, "train"), fixed_subset(ds, 100, "train")
    assert a.indices == b.indices and len(set(a.indices)) == 100 and a.indices == sorted(a.indices)
    labels = {int(ds[i][1]) for i in a.indices}
    assert len(labels) == 10  # a random subset, not the first rows of a class-sorted set
    torch.manual_seed(123)
    assert fixed_subset(ds, 100, "train").indices == a.indices
    assert fixed_subset(ds, 10 ** 6, "train") is ds  # larger than the set: all of it


def test_capped_loader_counts_from_the_epoch_start():
    batches = [(torch.full((2,), i), torch.zeros(2)) for i in range(10)]
    capped = CappedLoader(batches, 4)
    assert len(capped) == 4 and [int(x[0]) for x, _ in capped] == [0, 1, 2, 3]
    capped.start = 3  # a mid-epoch resume did 3 batches: one left (the inner loader skips the done ones)
    assert len(capped) == 1 and len(list(capped)) == 1
    capped.start = 4
    assert len(capped) == 0 and list(capped) == []
    assert len(CappedLoader(batches[:2], 4)) == 2


def test_bad_caps_are_one_clear_error(tmp_path):
    base = TINY_TRAIN + ["--output", str(tmp_path), "--epochs", "1"]
    with pytest.raises(UsageError, match="argument --max-train-steps: must be an integer >= 1"):
        run_train(base + ["--max-train-steps", "0"])
    with pytest.raises(UsageError, match="fewer than one batch"):
        run_train(base + ["--train-num-samples", "10"])
    assert not os.listdir(tmp_path)  # refused before the first write

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter([])

    with pytest.raises(UsageError, match="--train-num-samples needs.*--max-train-steps instead"):
        fixed_subset(Stream(), 5, "train")
