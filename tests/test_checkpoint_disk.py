"""Checkpoints that do not fill the disk: best.pth.tar is a link, the optimizer state lives only where
resuming needs it (last, recovery), and resuming from a weights-only file is a clear error."""
from __future__ import annotations

import os

import pytest
import torch

from src.bits.checkpoint_manager import RESUME_ONLY_KEYS, CheckpointManager, retained_state
from src.errors import CheckpointError
from tests.conftest import TINY_TRAIN, run_train

pytestmark = pytest.mark.usefixtures("single_cpu_thread")


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("disk")
    return run_train(TINY_TRAIN + ["--epochs", "2", "--output", str(out), "--experiment", "d", "--model-ema",
                                   "--model-ema-decay", "0.5", "--max-train-steps", "3", "--recovery-interval",
                                   "100"])


def test_retained_checkpoints_have_no_optimizer_and_best_is_a_link(default_run):
    d = default_run["output_dir"]
    last = _load(os.path.join(d, "last.pth.tar"))
    assert all(last.get(k) is not None for k in ("optimizer", "lr_scheduler")) and last["model_ema"] is not None
    tops = sorted(n for n in os.listdir(d) if n.startswith("checkpoint-"))
    assert tops == ["checkpoint-0.pth.tar", "checkpoint-1.pth.tar"]
    for name in tops + ["best.pth.tar"]:
        ck = _load(os.path.join(d, name))
        assert not set(RESUME_ONLY_KEYS) & set(ck), name
        assert ck["model_ema"] is not None and ck["resumable"] is False
        assert {"arch", "hparams", "metrics", "epoch"} <= set(ck)
    best_epoch = _load(os.path.join(d, "best.pth.tar"))["epoch"]
    assert os.path.samefile(os.path.join(d, "best.pth.tar"), os.path.join(d, f"checkpoint-{best_epoch}.pth.tar"))
    size = os.path.getsize
    assert size(os.path.join(d, "checkpoint-0.pth.tar")) < 0.75 * size(os.path.join(d, "last.pth.tar"))


def test_resuming_from_a_weights_file_needs_no_resume_opt(default_run, tmp_path):
    src = os.path.join(default_run["output_dir"], "checkpoint-0.pth.tar")
    argv = TINY_TRAIN + ["--epochs", "2", "--output", str(tmp_path), "--experiment", "r", "--resume", src,
                         "--max-train-steps", "3"]
    with pytest.raises(CheckpointError, match="no optimizer state.*last.pth.tar.*--no-resume-opt"):
        run_train(argv)
    assert not os.path.exists(tmp_path / "r")  # refused before the first write
    res = run_train(argv + ["--no-resume-opt"])
    assert _load(os.path.join(res["output_dir"], "last.pth.tar"))["epoch"] == 1


def test_full_state_and_weights_only_options(tmp_path):
    full = run_train(TINY_TRAIN + ["--epochs", "1", "--output", str(tmp_path), "--experiment", "f",
                                   "--max-train-steps", "2", "--checkpoint-full-state"])
    ck = _load(os.path.join(full["output_dir"], "checkpoint-0.pth.tar"))
    assert ck["optimizer"] is not None and "resumable" not in ck  # the original's layout
    with pytest.raises(Exception, match="exclude each other"):
        run_train(TINY_TRAIN + ["--epochs", "1", "--output", str(tmp_path), "--checkpoint-full-state",
                                "--checkpoint-weights-only"])


def test_weights_only_keeps_the_weights_the_metric_was_measured_on():
    model, ema = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    m = CheckpointManager("unused", "lin", {}, retain="weights-only")
    st = m._state(model, opt, 0, 1, 1, model_ema=ema, metrics={"top1": 1.0})
    out = retained_state(st, "weights-only")
    assert out["weights_from"] == "model_ema" and out["model_ema"] is None
    assert torch.equal(out["model"]["weight"], ema.state_dict()["weight"])
    assert not set(RESUME_ONLY_KEYS) & set(out) and st["optimizer"] is not None  # the full state is untouched
    plain = retained_state(m._state(model, opt, 0, 1, 1), "weights-only")
    assert plain["weights_from"] == "model" and torch.equal(plain["model"]["weight"], model.weight)


def test_weights_only_run_evaluates_like_its_metric(tmp_path):
    """A weights-only best file of an EMA run holds the EMA weights under 'model'."""
    res = run_train(TINY_TRAIN + ["--epochs", "1", "--output", str(tmp_path), "--experiment", "w",
                                  "--max-train-steps", "2", "--model-ema", "--model-ema-decay", "0.5",
                                  "--checkpoint-weights-only"])
    d = res["output_dir"]
    best, last = _load(os.path.join(d, "best.pth.tar")), _load(os.path.join(d, "last.pth.tar"))
    assert best["weights_from"] == "model_ema" and best["model_ema"] is None
    for k, v in last["model_ema"].items():
        assert torch.equal(best["model"][k], v), k
