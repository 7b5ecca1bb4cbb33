"""Config system: YAML keys become defaults, the CLI overrides them, typos are errors."""
import subprocess
import sys

import pytest
import yaml

from src.arg_parser import parse_args
from src.errors import UsageError
from tests.conftest import ROOT


def _cfg(tmp_path, text, name="cfg.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_original_defaults():
    args, _ = parse_args(["foo"])
    assert args.data_dir == "foo"
    assert args.lr == 0.1 and args.color_jitter == 0.4  # the repo's changed defaults
    assert args.model == "resnet50" and args.batch_size == 256 and args.epochs == 300
    assert args.attack_eps == 4 and args.attack_steps == 10 and args.attack == "pgd"
    assert args.eps_schedule == "constant" and args.eps_schedule_period == 10
    assert list(args.attack_boundaries) == [0, 1] and args.trades_beta == 6.0
    assert args.no_normalize is True and args.normalize_model is False
    assert args.cooldown_epochs == 10 and args.warmup_lr == 1e-4 and args.min_lr == 1e-5
    assert args.seed == 42 and args.eval_metric == "top1" and args.checkpoint_hist == 10
    assert args.attack_mode == "eval" and args.adv_clean_logits == "train"


def test_yaml_becomes_defaults_and_cli_overrides(tmp_path):
    cfg = _cfg(tmp_path, "model: resnet18\nlr: 0.5\nbatch_size: 32\ndata_dir: /data/x\naa: None\n")
    args, text = parse_args(["-c", cfg])
    assert args.model == "resnet18" and args.lr == 0.5 and args.batch_size == 32
    assert args.data_dir == "/data/x"
    assert args.aa is None  # 'None' string treated as no auto-augment, like the original
    args, text = parse_args(["-c", cfg, "--lr", "0.01", "/other", "--model", "vit_tiny_patch16_224"])
    assert args.lr == 0.01 and args.model == "vit_tiny_patch16_224" and args.data_dir == "/other"
    assert args.batch_size == 32  # still from YAML
    dumped = yaml.safe_load(text)
    assert dumped["lr"] == 0.01 and dumped["batch_size"] == 32 and dumped["config"] == cfg


def test_lr_null_in_yaml(tmp_path):
    args, _ = parse_args(["-c", _cfg(tmp_path, "lr: null\nlr_base: 2.0e-4\nlr_base_size: 512\n")])
    assert args.lr is None and args.lr_base == 2e-4 and args.lr_base_size == 512


def test_unknown_yaml_key_names_closest_flag(tmp_path):
    with pytest.raises(UsageError) as e:
        parse_args(["-c", _cfg(tmp_path, "weight_decy: 0.5\n")])
    msg = str(e.value)
    assert "weight_decy" in msg and "weight_decay" in msg


def test_dashed_yaml_keys_are_accepted(tmp_path):
    args, _ = parse_args(["-c", _cfg(tmp_path, "weight-decay: 0.3\n")])
    assert args.weight_decay == 0.3


def test_malformed_yaml(tmp_path):
    with pytest.raises(UsageError, match="not valid YAML"):
        parse_args(["-c", _cfg(tmp_path, "lr: [0.1\nmodel: x\n")])


def test_missing_config_file(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        parse_args(["-c", str(tmp_path / "nope.yaml")])


@pytest.mark.parametrize("argv,match", [
    (["--attack-eps", "-1"], "attack-eps"),
    (["--attack-steps", "-2"], "attack-steps"),
    (["--mean", "0.5", "0.5"], "--mean: must be 1 or 3 values"),
    (["--attack", "fgsm"], "--attack: must be one of pgd, targeted_pgd"),
    (["--eval-metric", "robust_top1"], "needs --adv-training"),
    (["--tta", "2"], "--tta"),
])
def test_bad_values(argv, match):
    with pytest.raises(UsageError, match=match):
        parse_args(["foo"] + argv)


def test_legacy_local_rank_flag_accepted():
    args, _ = parse_args(["foo", "--local-rank", "1"])
    assert args.local_rank == 1
    args, _ = parse_args(["foo", "--local_rank=0"])
    assert args.local_rank == 0


def test_cli_unknown_key_one_line_exit_2(tmp_path):
    cfg = _cfg(tmp_path, "epoch: 3\n")
    out = subprocess.run([sys.executable, "train.py", "-c", cfg], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "unknown key 'epoch'" in out.stderr
    assert "Traceback" not in out.stderr


def test_help_runs():
    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "--adv-training" in out.stdout and "--config" in out.stdout


# ----------------------------------------------------------------------------------------------
# The evaluation CLIs: one parser class, the original's names, the other tools' spelling as aliases


def test_eval_flag_aliases_are_accepted_everywhere():
    from src.arg_parser import (build_robustbench_parser, parse_effectiveness_args, parse_robustbench_args,
                                parse_validate_args)

    for parse in (parse_validate_args, lambda a: parse_effectiveness_args(a + ["--checkpoints-dir", "d"])):
        original = parse(["--attack-eps", "8", "--attack-norm", "l2", "--num-examples", "64"])
        alias = parse(["--eps", "8", "--threat-model", "L2", "--n-examples", "64"])
        assert (alias.attack_eps, alias.attack_norm, alias.num_examples) == (8, "l2", 64)
        assert (original.attack_eps, original.attack_norm, original.num_examples) == (8, "l2", 64)
    rb = parse_robustbench_args(["--model", "m", "--attack-eps", "4", "--attack-norm", "l2", "--num-examples", "10"])
    assert (rb.eps, rb.n_examples) == (4, 10)
    from src.robustbench import check_args

    check_args(rb)  # the threat model in RobustBench's spelling
    assert rb.threat_model == "L2"
    assert build_robustbench_parser().parse_args([]).eps == 8  # the original's default
    train, _ = parse_args(["--eps", "8", "--threat-model", "Linf"])
    assert train.attack_eps == 8 and train.attack_norm == "linf"
    with pytest.raises(UsageError, match="must be one of linf, l2, got 'L1'"):
        parse_validate_args(["--threat-model", "L1"])


def test_effectiveness_parser_hides_and_refuses_the_flags_it_sets():
    from src.arg_parser import build_effectiveness_parser, parse_effectiveness_args

    text = build_effectiveness_parser().format_help()
    assert "--steps-to-try" in text and "--no-ema" in text and "--results-file" not in text
    args = parse_effectiveness_args(["--checkpoints-dir", "d"])
    assert args.use_ema is True and args.attack == "pgd" and args.checkpoint is None
    assert parse_effectiveness_args(["--checkpoints-dir", "d", "--no-ema"]).use_ema is False
    with pytest.raises(UsageError, match="sets --attack-steps itself"):
        parse_effectiveness_args(["--checkpoints-dir", "d", "--attack-steps", "3"])
