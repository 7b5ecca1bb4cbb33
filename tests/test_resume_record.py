"""Resume tells the truth: changed settings in one warning line and in args.yaml's resume_history."""
from __future__ import annotations

import logging
import os

import pytest
import yaml

from src.resume_record import changed_hparams, describe_changes, set_record, write_args_yaml
from tests.conftest import TINY_TRAIN, run_train

pytestmark = pytest.mark.usefixtures("single_cpu_thread")


@pytest.fixture
def warnings_log():
    records = []

    class Grab(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                records.append(record.getMessage())

    logger, handler = logging.getLogger("robust_vits"), Grab()
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def test_changed_settings_are_one_warning_and_recorded(tmp_path, warnings_log):
    base = TINY_TRAIN + ["--output", str(tmp_path), "--experiment", "r", "--max-train-steps", "2"]
    d = run_train(base + ["--epochs", "1"])["output_dir"]
    last = os.path.join(d, "last.pth.tar")
    warnings_log.clear()
    run_train(base + ["--epochs", "2", "--lr", "5e-4", "--workers", "1", "--log-interval", "7", "--resume", last])
    changed = [w for w in warnings_log if "changed setting" in w]
    assert len(changed) == 1, warnings_log
    assert "epochs 1 -> 2" in changed[0] and "lr 0.001 -> 0.0005" in changed[0] and "2 changed settings" in changed[0]
    listed = changed[0].split("settings: ")[1].split(" (recorded")[0]
    assert listed == "epochs 1 -> 2, lr 0.001 -> 0.0005"  # not workers, log_interval, resume
    doc = yaml.safe_load(open(os.path.join(d, "args.yaml")))
    assert doc["lr"] == 0.0005 and doc["epochs"] == 2  # the arguments now in use
    (entry,) = doc["resume_history"]
    assert entry["checkpoint"] == last and entry["epoch"] == 1 and entry["time"]
    assert entry["changed"] == {"epochs": {"old": 1, "new": 2}, "lr": {"old": 0.001, "new": 0.0005}}
    # resuming again with the same settings: no warning, one more (empty) history entry
    warnings_log.clear()
    run_train(base + ["--epochs", "3", "--lr", "5e-4", "--resume", last])
    assert [w for w in warnings_log if "changed setting" in w] == ["resuming %s with 1 changed setting: epochs 2 -> 3 "
                                                                   "(recorded in args.yaml resume_history)" % last]
    doc = yaml.safe_load(open(os.path.join(d, "args.yaml")))
    assert [e["changed"] for e in doc["resume_history"]] == [
        {"epochs": {"old": 1, "new": 2}, "lr": {"old": 0.001, "new": 0.0005}}, {"epochs": {"old": 2, "new": 3}}]


def test_changed_hparams_ignores_run_plumbing_and_unknown_keys():
    old = {"lr": 0.1, "input_size": (3, 32, 32), "output": "a", "workers": 4, "attack_eps": 4.0}
    new = {"lr": 0.1, "input_size": [3, 32, 32], "output": "b", "workers": 8, "attack_eps": 8.0, "new_flag": 1}
    changes = changed_hparams(old, new)
    assert changes == {"attack_eps": (4.0, 8.0)}
    assert describe_changes(changes) == "attack_eps 4.0 -> 8.0"
    assert describe_changes({"sched": ("cosine", "step")}) == "sched 'cosine' -> 'step'"
    assert changed_hparams(None, new) == {}


def test_args_yaml_stays_valid_with_record_keys(tmp_path):
    path = str(tmp_path / "args.yaml")
    write_args_yaml(path, "lr: 0.1\nepochs: 3\n")
    set_record(path, "wandb_run", "offline:abc")
    set_record(path, "wandb_run", "offline:def")  # a resumed run's new W&B run replaces the key
    write_args_yaml(path, "lr: 0.2\nepochs: 4\n", {"time": "t", "checkpoint": "c", "epoch": 3, "changed": {}})
    text = open(path).read()
    assert text.count("wandb_run:") == 1
    assert yaml.safe_load(text) == {"lr": 0.2, "epochs": 4, "wandb_run": "offline:def", "resume_history": [
        {"time": "t", "checkpoint": "c", "epoch": 3, "changed": {}}]}
    with pytest.raises(ValueError):
        set_record(path, "lr", 1)
