"""Every flag value has a rule, checked in one place for the command line and YAML alike.

The table is the parser itself: every train.py argument is enumerated (``CliParser.arguments``) and
fed a value of the wrong type and one out of range, on the command line and in a YAML config,
through ``run_cli(train.main, argv)``: each must end in exit code 2 with one ``error:`` line in the
one message format and no traceback. A new numeric flag without a rule fails
``test_every_train_flag_has_a_rule``. The other CLIs' parsers are checked for the same format and
for help texts that show each default once.
"""
from __future__ import annotations

import argparse
import glob
import logging
import os
import re

import pytest
import yaml

import train
from src.arg_parser import build_parser, parse_args
from src.arg_parser.values import Rule
from src.errors import UsageError, run_cli
from tests.conftest import ROOT

# train.py arguments whose value is free text, checked where it is used (named in their own error lines)
FREE_TEXT = {
    "config": "the YAML file itself (tests below)",
    "dataset": "checked by src.data.check_dataset_name",
    "train_split": "a split name of the dataset", "val_split": "a split name of the dataset",
    "combine_dataset": "checked like --dataset",
    "model": "checked against timm's registry (unknown model error with suggestions)",
    "gp": "a pool type the model itself validates",
    "run_notes": "W&B notes",
}
ORIGINAL_CONFIGS = sorted(glob.glob("/work/shared/data/original-configs/configs/*.yaml"))


@pytest.fixture(autouse=True)
def no_training(monkeypatch):
    """A value that wrongly passed the checks must fail the test here, not start a 300-epoch run."""
    import src.trainer

    def refuse(args, args_text):
        raise AssertionError("the arguments were accepted and training would start")

    monkeypatch.setattr(src.trainer, "run_training", refuse)


def _arguments():
    return [a for a in build_parser().arguments if a.dest != "help"]


def _flag(action):
    return [s for s in action.option_strings if s.startswith("--")][0] if action.option_strings else None


def _one_error(rc, err):
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and err.strip().splitlines()[-1] == lines[0], err
    return lines[0]


def _effective(args):
    return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items() if k != "config"}


def _cli(argv, capsys):
    capsys.readouterr()
    rc = run_cli(train.main, argv)
    return _one_error(rc, capsys.readouterr().err)


def test_every_train_flag_has_a_rule():
    """Numbers and names have a Rule; switches are switches; only FREE_TEXT is free text."""
    for a in _arguments():
        if a.nargs == 0:
            continue
        if a.dest in FREE_TEXT:
            assert a.type in (None, str), a.dest
            continue
        assert isinstance(a.type, Rule), f"{a.dest} has no value rule (src/arg_parser/values.py)"
        assert len(a.type.bad_examples()) >= 1, a.dest
    assert set(FREE_TEXT) <= {a.dest for a in _arguments()}


def _cli_cases():
    for a in _arguments():
        if isinstance(a.type, Rule):
            n = a.nargs if isinstance(a.nargs, int) else 1
            for bad in a.type.bad_examples():
                yield pytest.param(_flag(a), [bad] * n, id=f"{a.dest}={bad}")


@pytest.mark.parametrize("flag, values", list(_cli_cases()))
def test_bad_command_line_value(flag, values, capsys):
    line = _cli(["--dataset", "digits", *([flag] if flag else []), *values], capsys)
    assert line.startswith("error: train.py: argument ") and ": must be " in line
    assert (flag or "DIR") in line
    assert f"got '{values[0]}'" in line or "got [" in line


def _native(text):
    return yaml.safe_load(text) if text not in ("nan", "inf") else float(text)


def _yaml_cases():
    for a in _arguments():
        if a.dest == "config":
            continue
        listy = a.nargs not in (None, "?", 0)
        if a.nargs == 0:
            bad = [3, "yes please"]
        elif a.dest in FREE_TEXT:
            bad = [[1, 2]]
        else:
            scalars = [_native(b) for b in a.type.bad_examples()]
            bad = ([[s] * (a.nargs if isinstance(a.nargs, int) else 1) for s in scalars] + [scalars[0]]) if listy \
                else scalars + [[1, 2]]
        for value in bad:
            yield pytest.param(a.dest, value, id=f"{a.dest}={value!r}")


@pytest.mark.parametrize("key, value", list(_yaml_cases()))
def test_bad_yaml_value(key, value, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"dataset": "digits", key: value}))
    line = _cli(["-c", str(cfg)], capsys)
    assert line.startswith(f"error: train.py: config file {cfg}, key '{key}': must be "), line


@pytest.mark.parametrize("text, words", [
    ("epochs: 1.5\n", ["key 'epochs'", "an integer >= 1", "got 1.5"]),
    ("epochs: true\n", ["key 'epochs'", "got true"]),
    ("lr: [0.1, 0.2]\n", ["key 'lr'", "a single value", "got [0.1, 0.2]"]),
    ("model: null\n", ["key 'model'", "got null"]),
    ("mean: 0.5\n", ["key 'mean'", "a list of 1 or 3 values", "got 0.5"]),
    ("lr: 0.1\nepochs: 2\nlr: 0.2\n", ["key 'lr' appears twice", "line 3"]),
    ("lr: 0.1\nweight-decay: 0.1\nweight_decay: 0.2\n", ["appears twice"]),
    ("config: other.yaml\n", ["key 'config'", "cannot include another config"]),
    ("attack_boundaries: [1, 0]\n", ["key 'attack_boundaries'", "low < high"]),
    ("input_size: [3, 32]\n", ["key 'input_size'", "a list of 3 values"]),
    ("aa: rand-q9\n", ["key 'aa'", "auto-augment policy"]),
    ("no_normalize: false\n", ["--no-normalize", "never normalizes"]),
    ("- epochs\n", ["must be a mapping"]),
    ("lr: " + "[" * 20000 + "]" * 20000 + "\n", ["nests lists or mappings too deeply"]),  # was a RecursionError
])
def test_bad_config_files(text, words, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    line = _cli(["--dataset", "digits", "-c", str(cfg)], capsys)
    for w in words:
        assert w in line, (w, line)


def test_config_that_is_a_directory_or_not_utf8(tmp_path, capsys):
    assert "is a directory" in _cli(["-c", str(tmp_path)], capsys)
    cfg = tmp_path / "latin1.yaml"
    cfg.write_bytes("model: r\xe9snet\n".encode("latin-1"))
    assert "is not UTF-8 text" in _cli(["-c", str(cfg)], capsys)


@pytest.mark.parametrize("argv, words", [
    (["--start-epoch", "310"], ["--start-epoch", "below the 310 epochs"]),
    (["--start-epoch", "300", "--sched", "step"], ["below the 300 epochs"]),
    (["--img-size", "64", "--input-size", "3", "32", "32"], ["--img-size", "equal to H and W"]),
    (["--crop-pct", "0"], ["--crop-pct", "(0, 1]"]),
    (["--aa", "original-typo"], ["--aa", "auto-augment policy"]),
    (["--aa", "rand-m9-typo"], ["--aa", "auto-augment policy"]),
    (["--decay-milestones", "30", "60", "45"], ["--decay-milestones", "increasing order"]),
    (["--scale", "1.0", "0.5"], ["--scale", "low <= high"]),
    (["--aug-splits", "1"], ["--aug-splits", "0 or >= 2"]),
    (["--adv-training", "trades", "--attack", "targeted_pgd"], ["--attack", "pgd with --adv-training trades"]),
])
def test_checks_across_values(argv, words, capsys):
    line = _cli(["--dataset", "digits", *argv], capsys)
    assert line.startswith("error: train.py: argument ") and ": must be " in line
    for w in words:
        assert w in line, (w, line)


def test_legitimate_values_still_parse():
    args, _ = parse_args(["--dataset", "digits", "--start-epoch", "309", "--img-size", "32", "--input-size", "3", "32",
                          "32", "--aa", "None", "--scale", "0.5", "0.5", "--attack-eps", "0", "--crop-pct", "1",
                          "--threat-model", "L2", "--opt", "lookahead_adamw", "--aa", "rand-m9-mstd0.5-inc1"])
    assert (args.start_epoch, args.attack_norm, args.aa, args.crop_pct) == (309, "l2", "rand-m9-mstd0.5-inc1", 1.0)
    args, _ = parse_args(["--aa", "none"])
    assert args.aa is None


@pytest.mark.parametrize("name", ["..", ".", "../other-run", "/tmp/elsewhere", "group/run", "run\\x"])
def test_experiment_is_one_folder_inside_output(name, tmp_path, capsys):
    """'..' or a path would put the run outside --output, or into an existing folder (another run's
    checkpoints and summary.csv) and overwrite it: refused before anything is written."""
    line = _cli(["--dataset", "digits", "--output", str(tmp_path / "runs" / "new"), "--experiment", name], capsys)
    assert "argument --experiment: must be one folder name inside --output" in line
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"dataset": "digits", "experiment": name}))
    assert f"key 'experiment': must be one folder name" in _cli(["-c", str(cfg)], capsys)
    assert not (tmp_path / "runs").exists()
    args, _ = parse_args(["--experiment", "xcit-s12_lr5e-4.v2"])
    assert args.experiment == "xcit-s12_lr5e-4.v2"


@pytest.mark.parametrize("spec", [":", ":Loss", ".relative:Loss", "mod:", "a..b:Loss", "mod:1Loss", "PGD"])
def test_malformed_adv_training_spec_is_one_error(spec, tmp_path, capsys):
    """An empty or relative module name crashed importlib with a traceback (ValueError / TypeError)."""
    line = _cli(["--dataset", "digits", "--adv-training", spec], capsys)
    assert "argument --adv-training: must be pgd, trades, module.path:ClassName or path/to/file.py:ClassName" in line
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"dataset": "digits", "adv_training": spec}))
    assert "key 'adv_training': must be pgd, trades" in _cli(["-c", str(cfg)], capsys)
    for good in ["", "pgd", "trades", "tests.plugin_losses:FGSMLoss", "plugins/loss.py:MyLoss"]:
        assert parse_args(["--adv-training", good])[0].adv_training == good
    cfg.write_text("adv_training: null\n")
    assert parse_args(["-c", str(cfg)])[0].adv_training is None


def _unbounded_float_flags():
    from src.arg_parser.values import Num

    return [_flag(a) for a in _arguments() if isinstance(a.type, Num) and a.type.kind is float and a.type.hi is None]


@pytest.mark.parametrize("flag", _unbounded_float_flags())
def test_float_beyond_float32_is_refused(flag, tmp_path, capsys):
    """1e300 is finite for Python but inf in a float32 tensor: it crashed the attack ('from is out of bounds')
    or the optimizer step ('cannot be converted to type float without overflow') mid-run."""
    action = next(a for a in _arguments() if _flag(a) == flag)
    n = action.nargs if isinstance(action.nargs, int) else 1
    line = _cli(["--dataset", "digits", flag, *["1e300"] * n], capsys)
    assert f"argument {flag}" in line and "(float32), got '1e300'" in line
    cfg = tmp_path / "c.yaml"
    value = [1e300] * n if action.nargs not in (None, "?") else 1e300
    cfg.write_text(yaml.safe_dump({"dataset": "digits", action.dest: value}))
    assert "(float32), got " in _cli(["-c", str(cfg)], capsys)
    assert parse_args(["--attack-eps", "3e38", "--lr", "-0", "--weight-decay", "1e38"])[0].attack_eps == 3e38


@pytest.mark.parametrize("flag", [f for f in (_flag(a) for a in _arguments() if isinstance(a.type, Rule)
                                                and getattr(a.type, "kind", None) is int and a.type.hi is None) if f])
def test_integer_beyond_int64_is_refused(flag, tmp_path, capsys):
    """Python ints are unbounded: --seed 10**23 crashed torch.manual_seed ('Overflow when unpacking long long')."""
    action = next(a for a in _arguments() if _flag(a) == flag)
    n = action.nargs if isinstance(action.nargs, int) else 1
    big = str(10 ** 23)
    assert "(int64), got '" in _cli(["--dataset", "digits", flag, *[big] * n], capsys)
    cfg = tmp_path / "c.yaml"
    value = [10 ** 23] * n if action.nargs not in (None, "?") else 10 ** 23
    cfg.write_text(yaml.safe_dump({"dataset": "digits", action.dest: value}))
    assert "(int64), got " in _cli(["-c", str(cfg)], capsys)


def test_seed_fits_every_generator(capsys):
    """Per-epoch seeds are derived from --seed; it is kept to 32 bits so derived seeds fit torch and numpy."""
    assert "argument --seed: must be an integer in [0, 4294967295], got '4294967296'" in \
        _cli(["--dataset", "digits", "--seed", str(2 ** 32)], capsys)
    assert "got '100000000000000000000000'" in _cli(["--dataset", "digits", "--seed", str(10 ** 23)], capsys)
    assert parse_args(["--seed", str(2 ** 32 - 1)])[0].seed == 2 ** 32 - 1


# ----------------------------------------------------------------------------------------------
# safety flags are command line only; records in args.yaml are accepted


@pytest.mark.parametrize("key", ["trust_checkpoint", "trust-checkpoint", "skip_nonfinite"])
def test_safety_flags_only_on_the_command_line(key, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"dataset: digits\n{key}: true\n")
    line = _cli(["-c", str(cfg)], capsys)
    assert f"key '{key}'" in line and "on the command line" in line
    cfg.write_text(f"dataset: digits\n{key}: false\n")  # the safe value (args.yaml records it) is fine
    args, _ = parse_args(["-c", str(cfg), "--trust-checkpoint"])
    assert args.trust_checkpoint is True


def test_every_parser_marks_its_safety_flags():
    from src.arg_parser import build_effectiveness_parser, build_robustbench_parser, build_validate_parser
    from src.arg_parser.analysis import build_convergence_parser
    from src.arg_parser.export import build_export_parser

    for p in (build_parser(), build_validate_parser(), build_effectiveness_parser(), build_robustbench_parser(),
              build_convergence_parser(), build_export_parser()):
        safety = {a.dest for a in p.arguments if "trust" in a.dest or "skip" in a.dest or "no_verify" in a.dest}
        assert safety and safety <= set(p.command_line_only), (p.prog, safety)


def test_args_yaml_of_a_run_loads_again(tmp_path, caplog):
    args, text = parse_args(["--dataset", "digits", "--epochs", "3", "--lr", "0.05", "-c", ""])
    path = tmp_path / "args.yaml"
    path.write_text(text + "wandb_run: offline:abc123\nresume_history:\n- {epoch: 2, changed: [lr]}\n")
    with caplog.at_level(logging.INFO, logger="robust_vits"):
        again, _ = parse_args(["-c", str(path)])
    assert _effective(again) == _effective(args)
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == 1 and "wandb_run" in infos[0] and "resume_history" in infos[0] and "config" in infos[0]
    # without train.py's header, 'config' is a nested config, not a record
    path.write_text("\n".join(text.splitlines()[1:]) + "\n")
    with pytest.raises(UsageError, match="cannot include another config"):
        parse_args(["-c", str(path)])


# ----------------------------------------------------------------------------------------------
# the original's config files


# our configs/ twin differs from the original's file only in these keys, each on purpose
INTENDED = {
    "output": "the original wrote to its authors' bucket gs://robust-vits/",
    "experiment": "the original's W&B project names; ours name runs by date, model and size",
    "local_rank": "0 in the original's files (written by its launcher); set by torchrun here",
    "finetune": "the authors' gs:// checkpoint; pass --finetune CHECKPOINT",
    "num_classes": "Caltech101 in TFDS has 102 labels (the original's file said 101, its README 102)",
    "keep_patch_embedding": "no effect: loading the patch embedding is the default",
    "decay_epochs": "null in the original's file; unused by the cosine schedule",
    "finetuning_patch_size": "4 in the original's from-scratch CIFAR-10 file; no effect without --finetune",
    "attack_eps": "0.0314 (rounded) in the non-adversarial Caltech101 twin; unused without adv_training",
    "attack_lr": "0.0094 in the original's non-adversarial Caltech101 file; unused without adv_training",
}
DIFFERING = {
    "resnet-adv-training": {"output", "experiment", "local_rank"},
    "xcit-adv-finetuning-hi-res": {"output", "experiment", "local_rank", "finetune", "num_classes",
                                   "keep_patch_embedding"},
    "xcit-adv-finetuning": {"output", "experiment", "local_rank", "finetune", "decay_epochs"},
    "xcit-adv-training-cifar10": {"output", "experiment", "local_rank", "finetuning_patch_size",
                                  "keep_patch_embedding"},
    "xcit-finetuning-hi-res": {"output", "experiment", "local_rank", "finetune", "num_classes",
                               "keep_patch_embedding", "attack_eps", "attack_lr"},
    "xcit-finetuning": {"output", "experiment", "local_rank", "finetune"},
    "xcit-nano-adv-finetuning": {"output", "experiment", "local_rank"},
    "xcit-nano-adv-training": {"output", "experiment", "local_rank"},
    "xcit-nano": {"output", "experiment", "local_rank"},
    "xcit-adv-training": {"output", "experiment", "local_rank"},
    "xcit": {"output", "local_rank"},
}


@pytest.mark.skipif(not ORIGINAL_CONFIGS, reason="the shared original configs are not on this machine")
@pytest.mark.parametrize("path", ORIGINAL_CONFIGS, ids=os.path.basename)
def test_original_config_matches_our_twin(path, caplog):
    name = os.path.basename(path)[:-5]
    with caplog.at_level(logging.INFO, logger="robust_vits"):
        original, _ = parse_args(["-c", path, "/data"])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "bn_tf no longer does anything" in warnings[0]
    ours, _ = parse_args(["-c", os.path.join(ROOT, "configs", f"{name}.yaml"), "/data"])
    a, b = _effective(original), _effective(ours)
    differing = {k for k in a if a[k] != b[k]}
    assert differing == DIFFERING[name], {k: (a[k], b[k]) for k in differing ^ DIFFERING[name]}
    assert differing <= set(INTENDED)


def test_original_configs_are_all_compared():
    if ORIGINAL_CONFIGS:
        assert {os.path.basename(p)[:-5] for p in ORIGINAL_CONFIGS} == set(DIFFERING)


# ----------------------------------------------------------------------------------------------
# every CLI: one message format, each default shown once, no switch that is already on


def _all_parsers():
    from src.arg_parser import build_effectiveness_parser, build_robustbench_parser, build_validate_parser
    from src.arg_parser.analysis import build_benchmark_parser, build_convergence_parser, build_plots_parser
    from src.arg_parser.export import build_export_parser

    return [build_parser(), build_validate_parser(), build_effectiveness_parser(), build_robustbench_parser(),
            build_convergence_parser(), build_plots_parser(["a", "b"]), build_benchmark_parser(),
            build_export_parser()]


@pytest.mark.parametrize("parser", _all_parsers(), ids=lambda p: p.prog)
def test_help_shows_each_default_once(parser):
    assert not issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter)
    text = parser.format_help()
    for a in parser.arguments:
        if a.help in (None, argparse.SUPPRESS):
            continue
        assert len(re.findall(r"\bdefault\b", a.help)) <= 1, (a.option_strings, a.help)
        if a.nargs == 0:  # a switch shown in --help must change something: not already on by default
            assert a.default != a.const, (parser.prog, a.option_strings, a.default)
    for block in text.split("\n  -")[1:]:
        assert block.count("(default:") <= 1, block


@pytest.mark.parametrize("parser", _all_parsers(), ids=lambda p: p.prog)
def test_every_cli_uses_the_message_format(parser):
    numeric = [a for a in parser.arguments if isinstance(a.type, Rule) and a.option_strings]
    assert numeric or parser.prog == "python -m src.plots"
    for a in numeric:
        bad = a.type.bad_examples()[-1]
        n = a.nargs if isinstance(a.nargs, int) else 1
        with pytest.raises(UsageError) as e:
            parser.parse_args([a.option_strings[-1], *([bad] * n)])
        assert str(e.value).startswith(f"{parser.prog}: argument ") and ": must be " in str(e.value), str(e.value)


@pytest.mark.parametrize("cli,argv", [
    ("train", ["--seed"]), ("validate", ["--seed"]), ("validate_robustbench", ["--seed"]),
    ("attack_convergence", ["--seed"]), ("attack_effectiveness", ["--seeds", "0"]),
])
def test_a_seed_beyond_the_seed_range_is_refused(cli, argv, capsys):
    """A seed above 2**32 - 1 passed the rule and crashed in torch.manual_seed ('Overflow when
    unpacking long long') after the model and data were loaded."""
    import importlib

    from src.arg_parser.values import SEED
    from src.errors import run_cli

    main = importlib.import_module(cli).main
    assert SEED.parse(str(2 ** 32 - 1)) == 2 ** 32 - 1
    for huge in (str(2 ** 32), "99999999999999999999999"):
        assert run_cli(main, argv + [huge]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {cli}.py: argument --seed") and \
            f"must be an integer in [0, 4294967295], got '{huge}'" in err[0]
