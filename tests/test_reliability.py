"""Crash safety of training: SIGKILL at random moments and inside atomic writes, then ``--resume``;
non-finite losses; ``--deterministic`` runs.

The runs use a 160-image folder made from the embedded digits (10 steps of 12 images per epoch),
so a whole fault-injection sequence of six processes costs little more than their start-up.
Kills inside a write use the test-only hook of ``src.storage`` (``ROBUST_VITS_TEST_KILL_BEFORE_RENAME``):
the process SIGKILLs itself after the temporary file is complete and before the rename.
"""
from __future__ import annotations

import csv
import fnmatch
import hashlib
import io
import logging
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from src import storage
from src.bits.summary import SUMMARY_COLUMNS
from tests.conftest import ROOT, TINY_TRAIN, run_train

EPOCHS = 2
STEPS_PER_EPOCH = 10
CRASH_EPOCHS = 6  # room for five kills, each of which may let the run cross an epoch end


def with_flags(argv, **flags):
    """``argv`` with the values of ``--flag`` replaced (``flag_name='v'``) or appended."""
    out = list(argv)
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        alias = {"--batch-size": "-b", "--validation-batch-size": "-vb"}.get(flag)
        for f in (flag, alias):
            if f in out:
                out[out.index(f) + 1] = str(value)
                break
        else:
            out += [flag, str(value)]
    return out


def make_digits_folder(root, per_class_train: int = 12, per_class_val: int = 4) -> str:
    """An image-folder dataset (``train/<class>/*.png``, ``validation/<class>/*.png``) from digits."""
    from PIL import Image

    from src.data import DigitsDataset

    for split, per_class in (("train", per_class_train), ("validation", per_class_val)):
        ds = DigitsDataset(split)
        seen = {c: 0 for c in range(10)}
        for img, label in zip(ds.images, ds.targets):
            label = int(label)
            if seen[label] >= per_class:
                continue
            folder = os.path.join(str(root), split, str(label))
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(img).save(os.path.join(folder, f"{seen[label]:03d}.png"))
            seen[label] += 1
    return str(root)


pytestmark = pytest.mark.usefixtures("single_cpu_thread")


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    return make_digits_folder(tmp_path_factory.mktemp("digits_folder"))


def folder_args(data_dir: str, out, experiment: str, **flags):
    """TINY_TRAIN on the image folder: 10 steps of 12 images per epoch, 40 validation images."""
    flags = {"epochs": EPOCHS, **flags}
    argv = with_flags(TINY_TRAIN, dataset="", batch_size=12, validation_batch_size=40, output=out,
                      experiment=experiment, **flags)
    return [data_dir] + argv


def load_ckpt(path):
    with storage.open_file(path, "rb") as f:
        return torch.load(f, map_location="cpu", weights_only=True)


def summary_rows(folder):
    path = os.path.join(folder, "summary.csv")
    if not os.path.exists(path):
        return []
    text = open(path).read()
    assert text.splitlines()[0].split(",") == SUMMARY_COLUMNS
    return list(csv.DictReader(io.StringIO(text)))


def file_hashes(folder):
    return {n: hashlib.sha256(open(os.path.join(folder, n), "rb").read()).hexdigest()
            for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n))}


def assert_consistent(folder):
    """What a reader may rely on at any instant: a whole summary and loadable checkpoints."""
    rows = summary_rows(folder)
    assert [int(r["epoch"]) for r in rows] == list(range(len(rows)))  # no duplicated or missing epoch
    for name in os.listdir(folder):
        if name.endswith(".pth.tar") and not storage.is_temp_name(name):
            ck = load_ckpt(os.path.join(folder, name))
            assert {"model", "epoch", "step_count_global"} <= set(ck), name
            if name == "last.pth.tar" or name.startswith("recovery-"):  # what resuming reads: the full state
                assert ck.get("optimizer") is not None, name
    return rows


# ----------------------------------------------------------------------------------------------
# Fault injection
# ----------------------------------------------------------------------------------------------

def _launch(argv, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop(storage.FAULT_ENV, None)
    env.update(env_extra or {})
    return subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)


def _run_killed_after(argv, step_lines: int, delay: float):
    """Start a run, SIGKILL it ``delay`` seconds after its ``step_lines``-th training log line."""
    proc = _launch(argv)
    log, seen = [], 0
    for line in proc.stdout:
        log.append(line)
        if " train epoch " in line and "/" in line:
            seen += 1
            if seen == step_lines:
                time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
                break
    log.append(proc.stdout.read())
    return proc.wait(), "".join(log)


def _run_with_write_fault(argv, pattern: str):
    proc = _launch(argv, {storage.FAULT_ENV: pattern})
    log = proc.stdout.read()
    return proc.wait(), log


@pytest.mark.slow  # integration lane (make test-slow): over 10 s on 2 cores
def test_sigkill_at_random_moments_then_resume(digits_folder, tmp_path):
    out = tmp_path / "runs"
    folder = str(out / "crash")
    argv = folder_args(digits_folder, out, "crash", epochs=CRASH_EPOCHS, recovery_interval=7, log_interval=1)
    resume = argv + ["--resume", "auto"]
    rng = random.Random(20240611)
    # A random kill comes a random number of step log lines (plus up to about one step) after the
    # start; a write kill at the first matching write. Each advances the run by at most about one
    # epoch, so all five happen before the run is complete.
    plan = [("random", rng.randint(2, 9), rng.uniform(0.0, 0.03)),
            ("write", "recovery-*.pth.tar"),
            ("write", "last.pth.tar"),
            ("random", rng.randint(1, 9), rng.uniform(0.0, 0.03)),
            ("write", "summary.csv")]
    history = []
    for i, step in enumerate(plan):
        before = file_hashes(folder) if os.path.isdir(folder) else {}
        if step[0] == "random":
            rc, log = _run_killed_after(argv if i == 0 else resume, step[1], step[2])
        else:
            rc, log = _run_with_write_fault(resume, step[1])
        history.append((step, [ln for ln in log.splitlines() if "resumed from" in ln or "train epoch" in ln][-3:]))
        assert rc == -signal.SIGKILL, f"kill {i} ({step}) did not happen: rc {rc}\n{history}\n{log[-3000:]}"
        if any(n == "last.pth.tar" or n.startswith("recovery-") for n in before):
            assert "resumed from" in log, log[-3000:]
        assert_consistent(folder)
        if step[0] == "write":
            # the killed write left its complete temporary file; the target is still the old one
            target = step[1]
            temps = [n for n in os.listdir(folder) if storage.is_temp_name(n) and n not in before]
            assert len(temps) == 1, temps
            name = temps[0][1:temps[0].rindex(".tmp-")]
            assert fnmatch.fnmatch(name, target)
            assert file_hashes(folder).get(name) == before.get(name), name

    proc = _launch(resume)
    log = proc.stdout.read()
    assert proc.wait() == 0, log[-3000:]
    rows = assert_consistent(folder)
    assert [int(r["epoch"]) for r in rows] == list(range(CRASH_EPOCHS))
    names = os.listdir(folder)
    assert not [n for n in names if storage.is_temp_name(n)]  # stale temporary files were cleaned
    assert not [n for n in names if n.startswith("recovery-")]
    last = load_ckpt(os.path.join(folder, "last.pth.tar"))
    assert last["epoch"] == CRASH_EPOCHS - 1 and last["epoch_done"] is True
    assert last["step_count_global"] == CRASH_EPOCHS * STEPS_PER_EPOCH
    for e, _ in last["checkpoint_history"]:
        assert f"checkpoint-{e}.pth.tar" in names
    assert {n for n in names if n.startswith("checkpoint-")} == \
        {f"checkpoint-{e}.pth.tar" for e, _ in last["checkpoint_history"]}
    assert load_ckpt(os.path.join(folder, "best.pth.tar"))["epoch"] == last["best"][0]

    # The uninterrupted run trains the same epochs and steps. This configuration draws no random
    # numbers per step (no augmentation, no dropout; the sampler's order depends on the epoch
    # only), so even mid-epoch resumes reproduce it bit for bit. (Resuming from an epoch boundary
    # is bitwise identical in every configuration: tests/test_train.py.)
    ref = run_train(with_flags(argv, log_interval=1000, experiment="reference"))
    ref_last = load_ckpt(os.path.join(ref["output_dir"], "last.pth.tar"))
    assert ref_last["step_count_global"] == last["step_count_global"]
    ref_rows = summary_rows(ref["output_dir"])
    assert [r["epoch"] for r in ref_rows] == [r["epoch"] for r in rows]
    for k, v in ref_last["model"].items():
        assert torch.equal(v, last["model"][k]), k
    assert ref_rows == rows


def test_stale_files_of_a_lost_epoch_are_reconciled(tmp_path):
    """Files a killed run wrote for an epoch that is trained again never outlive the resume."""
    from src.bits.checkpoint_manager import CheckpointManager

    d = str(tmp_path)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    m = CheckpointManager(d, "lin", {}, max_history=2)
    m.save_epoch(model, opt, 0, 1, 1, {"top1": 50.0})
    good_best = open(os.path.join(d, "best.pth.tar"), "rb").read()
    # a lost epoch 1 wrote checkpoint-1 and best, a temporary last, and a recovery file of step 9
    m.save_epoch(model, opt, 1, 1, 2, {"top1": 60.0})
    ck0 = load_ckpt(os.path.join(d, "checkpoint-0.pth.tar"))
    open(os.path.join(d, ".last.pth.tar.tmp-0123abcd"), "wb").write(b"partial")
    m.save_recovery(model, opt, 2, 1, 9, {})
    resumed = CheckpointManager(d, "lin", {}, max_history=2)
    resumed.restore_history(ck0)  # resume from the epoch-0 state (history: epoch 0 only)
    resumed.prepare_folder(start_epoch=1, resume_step=1)
    names = set(os.listdir(d))
    assert "checkpoint-1.pth.tar" not in names and ".last.pth.tar.tmp-0123abcd" not in names
    assert "recovery-9.pth.tar" not in names
    assert load_ckpt(os.path.join(d, "best.pth.tar"))["epoch"] == 0
    assert open(os.path.join(d, "best.pth.tar"), "rb").read() == good_best


def test_write_fault_hook_is_inert_without_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(storage.FAULT_ENV, raising=False)
    p = str(tmp_path / "x.txt")
    storage.atomic_write_text(p, "a")
    storage.atomic_write_text(p, "b")
    assert open(p).read() == "b" and os.listdir(tmp_path) == ["x.txt"]
    storage.atomic_write_text("memory://reliability/x.txt", "c")
    assert storage.read_text("memory://reliability/x.txt") == "c"
    assert storage.listdir("memory://reliability") == ["x.txt"]


# ----------------------------------------------------------------------------------------------
# Non-finite losses
# ----------------------------------------------------------------------------------------------

class _NanAt(torch.nn.Module):
    """Wraps the training loss: NaN at the given (epoch, step-of-epoch) pairs; records what the
    experiment folder held when epoch ``snapshot_epoch`` began."""

    def __init__(self, inner, nan_at, folder, snapshot_epoch, nan_inputs=False):
        super().__init__()
        self.inner, self.nan_at, self.folder, self.snapshot_epoch = inner, set(nan_at), folder, snapshot_epoch
        self.nan_inputs = nan_inputs  # NaN images instead of a NaN loss: the forward pass sees them
        self.epoch, self.step, self.snapshot = -1, 0, None

    def forward(self, model, x, y, epoch):
        self.step = self.step + 1 if epoch == self.epoch else 0
        self.epoch = epoch
        if epoch == self.snapshot_epoch and self.step == 0:
            self.snapshot = file_hashes(self.folder)
        if self.nan_inputs and (epoch, self.step) in self.nan_at:
            x = x * float("nan")
        loss, clean_logits, adv_logits = self.inner(model, x, y, epoch)
        if not self.nan_inputs and (epoch, self.step) in self.nan_at:
            loss = loss * float("nan")
        return loss, clean_logits, adv_logits


@pytest.fixture
def nan_loss(monkeypatch):
    import src.setup_task as T

    made = []
    real = T.create_train_loss

    def install(nan_at, folder, snapshot_epoch=1, nan_inputs=False):
        def create(args, dev_env, num_classes):
            made.append(_NanAt(real(args, dev_env, num_classes), nan_at, folder, snapshot_epoch, nan_inputs))
            return made[-1]

        monkeypatch.setattr(T, "create_train_loss", create)
        return made

    return install


@pytest.fixture
def robust_vits_log():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("robust_vits")
    logger.addHandler(handler)
    yield stream
    logger.removeHandler(handler)


def test_nan_loss_stops_with_epoch_and_step_and_keeps_last_checkpoint(digits_folder, tmp_path, nan_loss,
                                                                       capsys):
    import train
    from src.errors import run_cli

    folder = str(tmp_path / "nan")
    made = nan_loss({(1, 3)}, folder)
    argv = folder_args(digits_folder, tmp_path, "nan", recovery_interval=2)
    assert run_cli(train.main, argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert "non-finite" in lines[0] and "epoch 1, step 3" in lines[0] and "--skip-nonfinite" in lines[0]
    # the files of the last good state are untouched (the recovery file of step 12 came before the NaN)
    after = file_hashes(folder)
    for name in ("last.pth.tar", "summary.csv", "args.yaml", "checkpoint-0.pth.tar", "best.pth.tar"):
        assert after[name] == made[0].snapshot[name], name
    assert [int(r["epoch"]) for r in summary_rows(folder)] == [0]
    last = load_ckpt(os.path.join(folder, "last.pth.tar"))
    assert last["epoch"] == 0 and last["epoch_done"]
    assert sorted(n for n in after if n.startswith("recovery-")) == ["recovery-12.pth.tar"]
    for name in ("last.pth.tar", "recovery-12.pth.tar"):
        ck = load_ckpt(os.path.join(folder, name))
        assert all(torch.isfinite(v).all() for v in ck["model"].values()), name


def test_skip_nonfinite_skips_and_counts_steps(digits_folder, tmp_path, nan_loss, robust_vits_log):
    folder = str(tmp_path / "skip")
    nan_loss({(1, 3), (1, 4)}, folder)
    argv = folder_args(digits_folder, tmp_path, "skip") + ["--skip-nonfinite"]
    res = run_train(argv)
    assert [int(r["epoch"]) for r in summary_rows(folder)] == [0, 1]
    assert "epoch 1: skipped 2 optimizer steps" in robust_vits_log.getvalue()
    last = load_ckpt(os.path.join(folder, "last.pth.tar"))
    assert last["step_count_global"] == EPOCHS * STEPS_PER_EPOCH - 2  # skipped steps do not update
    assert all(torch.isfinite(v).all() for v in last["model"].values())
    assert res["train"]["loss"] == res["train"]["loss"]  # the epoch's mean loss excludes the NaNs


def test_skip_nonfinite_leaves_no_trace_of_a_nan_batch_in_batchnorm_statistics(digits_folder, tmp_path, nan_loss,
                                                                               robust_vits_log):
    """A NaN batch under --skip-nonfinite: its train-mode forward has already put NaN into BatchNorm's
    running statistics; the skipped step puts them back, so the run goes on with finite ones."""
    import tests.tiny_models  # noqa: F401  (registers tiny_cnn_test: a model with BatchNorm)

    folder = str(tmp_path / "bn")
    nan_loss({(1, 3)}, folder, nan_inputs=True)
    run_train(folder_args(digits_folder, tmp_path, "bn", model="tiny_cnn_test") + ["--skip-nonfinite"])
    assert [int(r["epoch"]) for r in summary_rows(folder)] == [0, 1]
    assert "epoch 1: skipped 1 optimizer steps" in robust_vits_log.getvalue()
    for name in (n for n in os.listdir(folder) if n.endswith(".pth.tar")):
        ck = load_ckpt(os.path.join(folder, name))
        assert any("running_mean" in k for k in ck["model"])
        assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point()), name


def test_nan_batchnorm_statistics_never_reach_a_checkpoint(digits_folder, tmp_path, nan_loss, capsys, monkeypatch):
    """Where a dropped step cannot be undone (the grad scaler of float16 AMP drops it itself, after the
    forward updated BatchNorm's statistics), NaN statistics stop the run instead of being saved."""
    import tests.tiny_models  # noqa: F401
    import train
    from src.bits.device import DeviceEnv
    from src.errors import run_cli

    monkeypatch.setattr(DeviceEnv, "create_grad_scaler", lambda self: torch.amp.GradScaler("cpu"))
    folder = str(tmp_path / "bn")
    made = nan_loss({(1, 3)}, folder, nan_inputs=True)
    assert run_cli(train.main, folder_args(digits_folder, tmp_path, "bn", model="tiny_cnn_test")) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert "non-finite" in lines[0] and "epoch 1" in lines[0] and "running_" in lines[0], lines[0]
    after = file_hashes(folder)
    for name in ("last.pth.tar", "summary.csv", "checkpoint-0.pth.tar", "best.pth.tar"):
        assert after[name] == made[0].snapshot[name], name
    for name in (n for n in after if n.endswith(".pth.tar")):
        ck = load_ckpt(os.path.join(folder, name))
        assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point()), name


def test_diverging_run_writes_no_checkpoint(digits_folder, tmp_path, capsys):
    """An absurd step size makes the weights or the loss inf/NaN: stop before writing weights."""
    import train
    from src.errors import run_cli

    argv = folder_args(digits_folder, tmp_path, "huge", epochs=1, lr="1e38", opt="sgd")
    assert run_cli(train.main, argv) == 2
    err = capsys.readouterr().err
    assert "non-finite" in err and "epoch 0" in err and "Traceback" not in err
    folder = str(tmp_path / "huge")
    assert not [n for n in os.listdir(folder) if n.endswith(".pth.tar")]


# ----------------------------------------------------------------------------------------------
# Determinism
# ----------------------------------------------------------------------------------------------

def test_deterministic_runs_are_identical(digits_folder, tmp_path):
    argv = folder_args(digits_folder, tmp_path, "a") + ["--deterministic"]
    ra = run_train(argv)
    assert not torch.are_deterministic_algorithms_enabled()  # restored after the run
    rb = run_train(with_flags(argv, experiment="b"))
    sa = open(os.path.join(ra["output_dir"], "summary.csv"), "rb").read()
    sb = open(os.path.join(rb["output_dir"], "summary.csv"), "rb").read()
    assert sa == sb
    a = load_ckpt(os.path.join(ra["output_dir"], "last.pth.tar"))
    b = load_ckpt(os.path.join(rb["output_dir"], "last.pth.tar"))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa_, sb_ in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for k in sa_:
            assert torch.equal(torch.as_tensor(sa_[k]), torch.as_tensor(sb_[k])), k


def test_resume_auto_reads_steps_without_loading_tensors(tmp_path, monkeypatch):
    """--resume auto compares checkpoints by their step without reading every tensor of each file."""
    import torch

    from src.bits import checkpoint_manager as cm

    big = {"model": {"w": torch.zeros(1000)}}
    torch.save({**big, "step_count_global": 7, "epoch": 0}, tmp_path / "last.pth.tar")
    torch.save({**big, "step_count_global": 9, "epoch": 1}, tmp_path / "recovery-9.pth.tar")
    (tmp_path / "recovery-3.pth.tar").write_bytes(b"garbage")
    seen = []
    real_load = torch.load

    def spy(*a, **kw):
        seen.append(kw.get("mmap", False))
        return real_load(*a, **kw)

    monkeypatch.setattr(torch, "load", spy)
    assert cm.find_resume_checkpoint(str(tmp_path)) == str(tmp_path / "recovery-9.pth.tar")
    # the two readable local files were memory-mapped (tensors not read); the garbage one was skipped
    assert seen.count(True) >= 2
