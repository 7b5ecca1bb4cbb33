"""Signals, the experiment-folder lock and resume ownership (issue: reliability II).

- Ctrl-C / SIGTERM during training save a recovery checkpoint, say how to resume, exit 130 / 143;
- one run at a time owns an experiment folder (``.lock``; stale locks of dead processes are taken over);
- a resume from another run's checkpoint never rewinds or prunes an existing folder.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from src.errors import Interrupted, run_cli
from tests.conftest import ROOT, TINY_TRAIN
from tests.test_reliability import file_hashes, make_digits_folder, summary_rows, with_flags

pytestmark = pytest.mark.usefixtures("single_cpu_thread")


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    return make_digits_folder(tmp_path_factory.mktemp("digits"))


def base_argv(data_dir, out, experiment, epochs=1):
    argv = with_flags([a for a in TINY_TRAIN], dataset="", epochs=epochs, batch_size=12, log_interval=1)
    return [data_dir] + argv + ["--output", str(out), "--experiment", experiment]


def train_cli(argv, capsys):
    import train

    rc = run_cli(train.main, list(argv))
    return rc, capsys.readouterr().err


@pytest.mark.slow  # the integration lane (make test-slow): keeps the main suite within its budget
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_recovery_and_exits_nonzero(digits_dir, tmp_path, sig):
    argv = base_argv(digits_dir, tmp_path, "run", epochs=3)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    log = []
    for line in proc.stdout:
        log.append(line)
        if " train epoch 0 [2/" in line:
            proc.send_signal(sig)
            break
    log.append(proc.stdout.read())
    rc = proc.wait(timeout=300)
    text = "".join(log)
    assert rc == 128 + sig, text[-3000:]
    assert "Traceback" not in text
    final = [line for line in text.splitlines() if line.startswith("interrupted: ")]
    assert final and signal.Signals(sig).name in final[-1] and "--resume" in final[-1], text[-2000:]
    assert "final eval" not in text
    folder = os.path.join(tmp_path, "run")
    recovery = [n for n in os.listdir(folder) if n.startswith("recovery-")]
    assert recovery and recovery[0] in final[-1]
    # the saved point resumes and the run completes all its epochs
    rc = subprocess.run([sys.executable, "train.py", *argv, "--resume", "auto"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
    assert rc.returncode == 0, rc.stderr[-3000:]
    assert [int(r["epoch"]) for r in summary_rows(folder)] == [0, 1, 2]
    assert not os.path.exists(os.path.join(folder, ".lock"))


def test_interrupted_and_ctrl_c_exit_codes(capsys):
    def ctrl_c(_argv):
        raise KeyboardInterrupt

    def term(_argv):
        raise Interrupted("terminated (SIGTERM)", signal.SIGTERM)

    assert run_cli(ctrl_c, []) == 130
    assert run_cli(term, []) == 143
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("interrupted: ") == 2


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_of_a_live_run_refuses_and_a_stale_one_is_taken_over(digits_dir, tmp_path, capsys):
    import json
    import socket

    argv = base_argv(digits_dir, tmp_path, "run")
    assert train_cli(argv, capsys)[0] == 0
    folder = os.path.join(tmp_path, "run")
    lock = os.path.join(folder, ".lock")
    assert not os.path.exists(lock)  # released at the end of the run
    holder = {"pid": os.getppid(), "host": socket.gethostname(), "started": "earlier"}
    with open(lock, "w") as f:
        json.dump(holder, f)
    before = file_hashes(folder)
    for extra in (["--resume", "auto"], ["--resume", os.path.join(folder, "last.pth.tar")]):
        rc, err = train_cli(with_flags(argv, epochs=2) + extra, capsys)
        assert rc == 2 and "in use" in err and f"process {os.getppid()}" in err and "Traceback" not in err
        assert file_hashes(folder) == before
    with open(lock, "w") as f:
        json.dump({**holder, "pid": _dead_pid()}, f)
    rc, err = train_cli(with_flags(argv, epochs=2) + ["--resume", "auto"], capsys)
    assert rc == 0, err
    assert [int(r["epoch"]) for r in summary_rows(folder)] == [0, 1]
    assert not os.path.exists(lock)


def test_resume_from_another_run_never_touches_an_existing_folder(digits_dir, tmp_path, capsys):
    a, b = base_argv(digits_dir, tmp_path, "a"), base_argv(digits_dir, tmp_path, "b")
    assert train_cli(a, capsys)[0] == 0 and train_cli(b, capsys)[0] == 0
    before = file_hashes(os.path.join(tmp_path, "a"))
    resume_b = os.path.join(tmp_path, "b", "last.pth.tar")
    rc, err = train_cli(with_flags(a, epochs=2) + ["--resume", resume_b], capsys)
    assert rc == 0, err
    assert file_hashes(os.path.join(tmp_path, "a")) == before
    rows = summary_rows(os.path.join(tmp_path, "a-1"))
    assert [int(r["epoch"]) for r in rows] == [1]  # continued B's run (epoch 1) in a new folder


def test_best_checkpoint_is_a_link_not_a_copy(digits_dir, tmp_path, capsys):
    """best.pth.tar holds the same bytes as the top checkpoint: a hard link on local disks."""
    assert train_cli(base_argv(digits_dir, tmp_path, "run"), capsys)[0] == 0
    folder = os.path.join(tmp_path, "run")
    assert os.path.samefile(os.path.join(folder, "best.pth.tar"), os.path.join(folder, "checkpoint-0.pth.tar"))


def test_loss_plugin_by_file_path(tmp_path):
    """--adv-training path/to/file.py:Class loads a loss from a file; failures name what was searched."""
    import shutil

    from src.errors import UsageError
    from src.setup_task import load_loss_class

    plugin = tmp_path / "my_losses.py"
    shutil.copy(os.path.join(ROOT, "tests", "plugin_losses.py"), plugin)
    cls = load_loss_class(f"{plugin}:FGSMLoss")
    assert cls.__name__ == "FGSMLoss" and cls.__module__.endswith("my_losses")
    with pytest.raises(UsageError, match="no such file"):
        load_loss_class(f"{tmp_path}/missing.py:FGSMLoss")
    with pytest.raises(UsageError, match="searched the Python path"):
        load_loss_class("no_such_pkg.losses:FGSMLoss")
    bad = tmp_path / "broken.py"
    bad.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(UsageError, match="importing .*broken.py failed: RuntimeError: boom"):
        load_loss_class(f"{bad}:FGSMLoss")
