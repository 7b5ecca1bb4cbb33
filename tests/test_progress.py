"""Progress of long work: log lines without a TTY (AutoAttack per attack, evaluations, chunks), a bar
on a TTY, and nothing from the other processes of a distributed job."""
from __future__ import annotations

import io
import logging

import pytest
import torch

from src import progress as progress_mod
from src.bits.device import DeviceEnv
from src.engine import evaluate_loop

pytestmark = pytest.mark.usefixtures("single_cpu_thread")


@pytest.fixture
def log_lines():
    """The robust_vits logger's INFO lines of the test, as a list."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("robust_vits")
    old = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield lambda: stream.getvalue().splitlines()
    logger.removeHandler(handler)
    logger.setLevel(old)


@pytest.fixture
def no_tty(monkeypatch):
    monkeypatch.setattr(progress_mod, "stderr_is_tty", lambda: False)
    monkeypatch.delenv("RANK", raising=False)


def _model_and_points(n=6):
    """A linear classifier on 8x8 images: AutoAttack's 5 x 100 APGD iterations take milliseconds."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10)).eval()
    x = torch.rand(n, 3, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)  # every point starts correctly classified: the attack has work to do
    return model, x, y


def test_autoattack_logs_each_attack_without_a_tty(log_lines, no_tty):
    from src.autoattack import run_autoattack

    model, x, y = _model_and_points()
    result = run_autoattack(model, x, y, version="apgd-ce", norm="linf", eps=8 / 255, seed=0)
    lines = [ln for ln in log_lines() if ln.startswith("AutoAttack apgd-ce on 6 images")]
    assert any("6/6 correctly classified" in ln and "APGD-CE" in ln for ln in lines), lines
    left = int(result.robust.sum())
    done = [ln for ln in lines if "APGD-CE done in" in ln]
    assert len(done) == 1 and f"{left}/6 left robust" in done[0] and "[1/1]" in done[0], lines
    assert ("img/s" in done[0] or "s/img" in done[0]) and "ETA" in done[0]


def test_autoattack_restarts_report_progress(log_lines, no_tty, monkeypatch):
    """Each APGD restart is a run of the attack: with lines due at once, every one is reported."""
    from src.autoattack import run_autoattack

    monkeypatch.setattr(progress_mod, "LOG_SECONDS", 0.0)
    model, x, y = _model_and_points()
    # a tiny eps leaves points robust, so all five restarts run
    run_autoattack(model, x, y, version="apgd-ce", norm="linf", eps=0.01 / 255, seed=0)
    runs = [ln for ln in log_lines() if "APGD-CE run " in ln]
    assert [ln.split("APGD-CE run ")[1].split(" ")[0] for ln in runs] == [f"{i}/5" for i in range(1, 6)]
    assert all("batch ETA" in ln for ln in runs)


def test_only_rank_zero_reports(log_lines, no_tty, monkeypatch):
    from src.autoattack import run_autoattack

    monkeypatch.setenv("RANK", "1")
    model, x, y = _model_and_points()
    run_autoattack(model, x, y, version="apgd-ce", norm="linf", eps=8 / 255, seed=0)
    # a fake second process of a two-process job: its evaluation loop reports nothing either
    import src.bits.device as device

    monkeypatch.setattr(device, "reduce_sums", lambda env, values: values)
    rank1 = DeviceEnv(torch.device("cpu"), world_size=2, global_rank=1)
    evaluate_loop(model, [(x, y), (x, y)], rank1, log_freq=1)
    assert log_lines() == []
    monkeypatch.setenv("RANK", "0")
    rank0 = DeviceEnv(torch.device("cpu"), world_size=2, global_rank=0)
    evaluate_loop(model, [(x, y), (x, y)], rank0, log_freq=1)
    lines = log_lines()
    assert len(lines) == 2 and lines[-1].startswith("validate [2/2]")


def test_evaluation_lines_show_rate_eta_and_accuracy(log_lines, no_tty):
    model, x, y = _model_and_points()
    evaluate_loop(model, [(x, y)] * 4, DeviceEnv(torch.device("cpu")), log_freq=2, desc="eval")
    lines = log_lines()
    assert [ln.split(",")[0] for ln in lines] == ["eval [2/4]", "eval [4/4]"]
    assert all("img/s" in ln and "ETA" in ln and "acc@1 100.00" in ln for ln in lines)
    assert lines[-1].split("ETA ")[1].startswith("0:00:00")


def test_a_tty_gets_a_bar_and_no_log_lines(log_lines, monkeypatch, capsys):
    monkeypatch.setattr(progress_mod, "stderr_is_tty", lambda: True)
    model, x, y = _model_and_points()
    evaluate_loop(model, [(x, y)] * 3, DeviceEnv(torch.device("cpu")), log_freq=1, desc="bar-eval")
    err = capsys.readouterr().err
    assert "bar-eval" in err and "img/s" in err and "3/3" in err
    assert log_lines() == []
    monkeypatch.setenv("RANK", "1")
    with progress_mod.Progress(3, "rank-one", primary=None) as p:
        p.update(1, images=4)
    assert "rank-one" not in capsys.readouterr().err


def test_chunk_progress_reports_every_chunk(log_lines, no_tty):
    chunks = [(0, 10), (10, 20), (20, 25)]
    seen = list(progress_mod.track_ranges(chunks, "chunks", primary=True))
    assert seen == chunks
    lines = log_lines()
    assert [ln.split(",")[0] for ln in lines] == ["chunks [1/3]", "chunks [2/3]", "chunks [3/3]"]
    assert all("ETA" in ln for ln in lines)
    assert not list(progress_mod.track_ranges([], "empty", primary=True)) and len(log_lines()) == 3


def test_format_eta():
    assert progress_mod.format_eta(3725) == "1:02:05"
    assert progress_mod.format_eta(float("nan")) == "?"


def test_train_cli_prints_the_result_on_the_primary_only(monkeypatch, capsys):
    import train
    import src.trainer

    result = {"eval": {"top1": 1.0, "robust_top1": 2.0, "loss": 3.0}, "seconds": 1.0, "output_dir": "o",
              "primary": False}
    monkeypatch.setattr(src.trainer, "run_training", lambda args, text: result)
    assert train.main(["--dataset", "digits"]) == 0
    assert "final eval" not in capsys.readouterr().out
    result["primary"] = True
    assert train.main(["--dataset", "digits"]) == 0
    assert "final eval: top1 1.00" in capsys.readouterr().out
