"""--eval-attack-steps and the online attack-strength monitor (--monitor-attack-steps K): the summary
column, the warning on a deliberately weak training attack, and no effect on the training numbers."""
from __future__ import annotations

import argparse
import csv
import logging
import math
import os

import pytest

from src.attack_monitor import MONITOR_COLUMN, relative_gap_pct
from src.bits.summary import SUMMARY_COLUMNS
from src.errors import UsageError
from tests.conftest import TINY_TRAIN, run_train

pytestmark = pytest.mark.usefixtures("single_cpu_thread")

ADV = TINY_TRAIN + ["--epochs", "1", "--max-train-steps", "3", "--val-num-samples", "100", "--adv-training", "pgd",
                    "--attack-eps", "8"]


@pytest.fixture
def log_records():
    records = []

    class Grab(logging.Handler):
        def emit(self, record):
            records.append((record.levelno, record.getMessage()))

    logger, handler = logging.getLogger("robust_vits"), Grab()
    old = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(old)


def _summary(d):
    with open(os.path.join(d, "summary.csv")) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def clean_weights(tmp_path_factory):
    """A clean-trained classifier: adversarial examples move its loss a lot (an untrained one's hardly)."""
    out = tmp_path_factory.mktemp("clean")
    res = run_train(TINY_TRAIN + ["--epochs", "2", "--output", str(out), "--experiment", "c"])
    return os.path.join(res["output_dir"], "last.pth.tar")


def test_weak_training_attack_is_flagged_and_written_to_the_summary(tmp_path, log_records, clean_weights):
    # one step of 0.05/255 at eps 16/255 hardly moves from the random start: far weaker than PGD-10
    # (measured: gap 43 % at eps 16, 25 % at eps 8; a matched attack: 0-1 %)
    res = run_train(ADV + ["--output", str(tmp_path), "--experiment", "weak", "--attack-eps", "16",
                           "--attack-steps", "1", "--attack-lr", "0.05", "--monitor-attack-steps", "10", "--monitor-examples", "64",
                           "--initial-checkpoint", clean_weights])
    with open(os.path.join(res["output_dir"], "summary.csv")) as f:
        assert f.readline().strip().split(",") == SUMMARY_COLUMNS + [MONITOR_COLUMN]
    gap = float(_summary(res["output_dir"])[0][MONITOR_COLUMN])
    assert gap > 20
    warnings = [m for lvl, m in log_records if lvl == logging.WARNING and "far weaker than PGD-10" in m]
    assert len(warnings) == 1 and f"{gap:.1f}%" in warnings[0] and "PGD-1, step 0.05/255" in warnings[0]
    assert os.path.exists(os.path.join(res["output_dir"], "summary.png"))  # the extra column does not stop it
    assert not any("could not draw" in m for _, m in log_records)


def test_matched_attack_has_no_gap_and_the_monitor_changes_no_training_number(tmp_path, log_records):
    common = ADV + ["--output", str(tmp_path), "--attack-steps", "3"]
    on = run_train(common + ["--experiment", "on", "--monitor-attack-steps", "3", "--monitor-examples", "64"])
    off = run_train(common + ["--experiment", "off"])
    row_on, row_off = _summary(on["output_dir"])[0], _summary(off["output_dir"])[0]
    assert abs(float(row_on[MONITOR_COLUMN])) < 20  # the same attack as PGD-3: only the random starts differ
    assert not any(lvl == logging.WARNING and "far weaker" in m for lvl, m in log_records)
    assert {k: row_on[k] for k in SUMMARY_COLUMNS} == row_off  # and no extra column without the monitor


def test_eval_attack_steps_sets_the_per_epoch_attack():
    from src.arg_parser import parse_args
    from src.setup_task import create_eval_attack

    args, _ = parse_args(["--dataset", "digits", "--adv-training", "pgd", "--attack-eps", "6",
                          "--attack-steps", "2"])
    assert create_eval_attack(args, None, 10).keywords["steps"] == 2  # the original: the training steps
    args.eval_attack_steps = 12
    attack = create_eval_attack(args, None, 10)
    assert attack.keywords["steps"] == 12
    assert attack.keywords["step_size"] == pytest.approx(1.5 * 6 / 255 / 12)


def test_monitor_needs_adversarial_training_and_positive_settings(tmp_path):
    with pytest.raises(UsageError, match="needs --adv-training"):
        run_train(TINY_TRAIN + ["--output", str(tmp_path), "--epochs", "1", "--monitor-attack-steps", "5"])
    with pytest.raises(UsageError, match="argument --monitor-every: must be an integer >= 1"):
        run_train(ADV + ["--output", str(tmp_path), "--monitor-attack-steps", "5", "--monitor-every", "0"])
    assert not os.listdir(tmp_path)


def test_relative_gap_and_schedule():
    from src.attack_monitor import AttackMonitor

    assert relative_gap_pct(2.0, 1.5) == pytest.approx(25.0)
    assert relative_gap_pct(2.0, 2.5) == pytest.approx(-25.0)  # signed: a stronger training attack is negative
    assert math.isnan(relative_gap_pct(0.0, 1.0))
    mon = AttackMonitor(loader=None, train_attack=None, ref_steps=5, eps_at=lambda e: 0.0, norm="linf",
                        boundaries=(0, 1), num_classes=10, every=3, warn_gap=20, num_epochs=5, seed=0, train_desc="")
    assert [e for e in range(5) if mon.due(e)] == [2, 4]  # every 3rd epoch and the last
    assert math.isnan(mon.measure(None, 0, argparse.Namespace(primary=True))[MONITOR_COLUMN])  # eps 0: no gap
