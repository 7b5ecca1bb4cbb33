"""The nine W&B grid sweeps of the original (sweeps/) run against this project's train.py.

``wandb sweep sweeps/X.yaml`` runs ``command`` with ``${args}`` replaced by ``--name=value`` for
one grid point: every such command line must parse with train.py's own parser.
"""
from __future__ import annotations

import glob
import itertools
import os

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEPS = sorted(glob.glob(os.path.join(ROOT, "sweeps", "*.yaml")))


def _train_argv(sweep: dict) -> list:
    """The arguments given to train.py by the sweep's command, without W&B's macros."""
    command = [str(c) for c in sweep["command"]]
    start = command.index("${program}") + 1
    return [c for c in command[start:] if not c.startswith("${")]


def test_all_nine_sweeps_are_shipped():
    assert {os.path.basename(p) for p in SWEEPS} == {
        "adv-fine-tuning.yaml", "attack-steps.yaml", "data-augmentation-adv.yaml", "data-augmentation-benign.yaml",
        "eps-warmup-resnet.yaml", "eps-warmup.yaml", "tiny-imagenet-wd.yaml", "weight-decay-adv.yaml",
        "weight-decay-benign.yaml"}


@pytest.mark.parametrize("path", SWEEPS, ids=[os.path.basename(p) for p in SWEEPS])
def test_sweep_grid_points_parse_with_train_py(path, monkeypatch):
    from src.arg_parser import build_parser, parse_args

    monkeypatch.chdir(ROOT)  # the sweeps name configs/... relative to the repository root
    with open(path) as f:
        sweep = yaml.safe_load(f)
    assert sweep["program"] == "train.py" and os.path.exists(os.path.join(ROOT, sweep["program"]))
    assert sweep["method"] == "grid"
    assert sweep["metric"]["name"] in ("eval_robust_top1", "eval_top1")  # summary.csv / W&B keys
    flags = {s for a in build_parser().arguments for s in a.option_strings}
    for name in sweep["parameters"]:
        assert f"--{name}" in flags, f"{os.path.basename(path)}: train.py has no flag --{name}"
    base = _train_argv(sweep)
    for value in [c for c in base if c.endswith(".yaml")]:
        assert os.path.exists(os.path.join(ROOT, value)), f"{path} names a missing config {value}"
    grid = [[(k, v) for v in p["values"]] for k, p in sweep["parameters"].items()]
    points = list(itertools.product(*grid))
    for point in (points[0], points[-1]):  # the corners of the grid
        argv = base + [f"--{k}={v}" for k, v in point]
        args, _ = parse_args(argv)
        for k, v in point:
            got = getattr(args, k.replace("-", "_"))
            if isinstance(got, (int, float)) and not isinstance(got, bool):
                assert got == pytest.approx(float(v)), (k, v, got)
            else:
                assert str(got) == str(v) or got == v, (k, v, got)
