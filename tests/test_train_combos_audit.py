"""train.py flag combinations and config values that crashed, were silently ignored, or rewrote a finished run's
files (audit of flag combinations): each is now one ``error:`` line and exit code 2 before anything is written, or
does what the flags say."""
from __future__ import annotations

import os

import pytest

from src.errors import run_cli
from tests.conftest import TINY_TRAIN, run_train

pytestmark = pytest.mark.usefixtures("single_cpu_thread")

SMOKE = ["--epochs", "1", "--max-train-steps", "1", "--train-num-samples", "100", "--val-num-samples", "50"]


def _cli(argv, capsys):
    import train

    capsys.readouterr()
    rc = run_cli(train.main, list(argv))
    return rc, capsys.readouterr().err


def _one_error(rc, err, words):
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def _files(folder):
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}


# ----------------------------------------------------------------------------------------------
# options that act only together with another one: silently ignored before, now one error naming both

IGNORED = [
    (["--amp-dtype", "bfloat16"], ["--amp-dtype bfloat16", "without --amp"]),
    (["--eval-attack-steps", "5"], ["--eval-attack-steps 5", "without --adv-training"]),
    (["--eval-attack-eps", "8"], ["--eval-attack-eps 8", "without --adv-training"]),
    (["--attack", "targeted_pgd"], ["--attack targeted_pgd", "without --adv-training"]),
    (["--attack-mode", "train"], ["--attack-mode train", "without --adv-training"]),
    (["--adv-training", "trades", "--adv-clean-logits", "skip"], ["--adv-clean-logits skip", "--adv-training pgd"]),
    (["--adv-training", "pgd", "--zero-eps-epochs", "2"], ["--zero-eps-epochs 2", "--eps-schedule linear or sine"]),
    (["--bce-target-thresh", "0.2"], ["--bce-target-thresh 0.2", "without --bce-loss"]),
    (["--clip-mode", "agc"], ["--clip-mode agc", "without --clip-grad"]),
    (["--reinit-patch-embedding"], ["--reinit-patch-embedding", "without --finetune"]),
    (["--no-resume-opt"], ["--no-resume-opt", "without --resume"]),
    (["--mixup-off-epoch", "3"], ["--mixup-off-epoch 3", "--mixup, --cutmix or --cutmix-minmax"]),
    (["--combine-data-dir", "/data/ddpm"], ["--combine-data-dir /data/ddpm", "without --combine-dataset"]),
    (["--combined-dataset-ratio", "0.3"], ["--combined-dataset-ratio 0.3", "without --combine-dataset"]),
    (["--monitor-every", "2"], ["--monitor-every 2", "without --monitor-attack-steps"]),
    (["--monitor-examples", "64"], ["--monitor-examples 64", "without --monitor-attack-steps"]),
    (["--monitor-warn-gap", "5"], ["--monitor-warn-gap 5", "without --monitor-attack-steps"]),
    (["--resplit"], ["--resplit", "--aug-splits >= 2 and --reprob > 0"]),
    (["--initial-checkpoint", "a.pth", "--finetune", "b.pth"], ["--initial-checkpoint and --finetune exclude"]),
    (["--aug-splits", "2", "--jsd-loss", "--bce-loss"], ["--jsd-loss and --bce-loss exclude"]),
    (["--drop-connect", "0.1", "--drop-path", "0.2"], ["--drop-connect 0.1 and --drop-path 0.2", "deprecated name"]),
]


@pytest.mark.parametrize("argv, words", IGNORED, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_an_option_that_would_be_ignored_is_one_error(argv, words, tmp_path, capsys):
    rc, err = _cli(TINY_TRAIN + SMOKE + ["--output", str(tmp_path), "--experiment", "e", *argv], capsys)
    _one_error(rc, err, ["error: train.py: ", *words])
    assert not (tmp_path / "e").exists()


def test_every_rule_is_tested_and_its_off_value_is_the_default():
    from src.arg_parser.train import REQUIRES, build_parser

    defaults = {a.dest: a.default for a in build_parser().arguments}
    for need in REQUIRES:
        assert defaults[need.dest] == need.off, need.dest
        assert all(p in defaults for p in need.partners), need.dest
    tested = {words[0].split()[0] for _, words in IGNORED}
    assert {"--" + need.dest.replace("_", "-") for need in REQUIRES} <= tested


def test_the_same_values_from_a_config_file(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("amp_dtype: bfloat16\n")
    rc, err = _cli(TINY_TRAIN + SMOKE + ["-c", str(cfg), "--output", str(tmp_path)], capsys)
    _one_error(rc, err, ["--amp-dtype bfloat16 has no effect without --amp"])
    cfg.write_text("adv_training: null\neval_attack_steps: 20\n")
    rc, err = _cli(TINY_TRAIN + SMOKE + ["-c", str(cfg), "--output", str(tmp_path)], capsys)
    _one_error(rc, err, ["--eval-attack-steps 20", "without --adv-training"])


def test_a_config_value_whose_partner_the_command_line_switches_off_is_an_override():
    """``-c adversarial.yaml --adv-training ''`` (the README's clean baseline) leaves the config's attack settings
    unused on purpose; the same values given on the command line without their partner are an error."""
    import tempfile

    from src.arg_parser import parse_args
    from src.errors import UsageError

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write("adv_training: pgd\neval_attack_steps: 20\nattack_mode: train\namp: false\n")
    try:
        args, _ = parse_args(["-c", f.name, "--dataset", "digits", "--adv-training", ""])
        assert args.adv_training == "" and args.eval_attack_steps == 20
        with pytest.raises(UsageError, match="--eval-attack-steps 5 has no effect"):
            parse_args(["-c", f.name, "--dataset", "digits", "--adv-training", "", "--eval-attack-steps", "5"])
    finally:
        os.unlink(f.name)


def test_the_options_with_what_they_need_still_parse():
    from src.arg_parser import parse_args

    args, _ = parse_args(["--dataset", "digits", "--amp", "--amp-dtype", "bfloat16", "--adv-training", "pgd",
                          "--attack", "targeted_pgd", "--eval-attack-steps", "5", "--eval-attack-eps", "8",
                          "--attack-mode", "train", "--adv-clean-logits", "skip", "--eps-schedule", "linear",
                          "--zero-eps-epochs", "2", "--bce-loss", "--bce-target-thresh", "0.2", "--clip-grad", "1",
                          "--clip-mode", "agc", "--cutmix", "1", "--mixup-off-epoch", "3", "--monitor-attack-steps",
                          "5", "--monitor-every", "2", "--aug-splits", "2", "--reprob", "0.25", "--resplit"])
    assert (args.amp_dtype, args.zero_eps_epochs, args.clip_mode, args.mixup_off_epoch) == ("bfloat16", 2, "agc", 3)


# ----------------------------------------------------------------------------------------------
# what the data or the model show


def test_epoch_repeats_on_a_map_style_dataset_is_one_error(tmp_path, capsys):
    """timm hands --epoch-repeats to its streaming readers only: on digits, torch/ or folders it did nothing."""
    rc, err = _cli(TINY_TRAIN + SMOKE + ["--epoch-repeats", "3", "--output", str(tmp_path), "--experiment", "e"],
                   capsys)
    _one_error(rc, err, ["--epoch-repeats 3", "streamed datasets", "'digits'"])
    assert not (tmp_path / "e").exists()


def test_split_bn_on_a_model_without_batchnorm_is_one_error(tmp_path, capsys):
    """--split-bn crashed with an ImportError (timm moved convert_splitbn_model to timm.layers); on a model
    without BatchNorm it would change nothing."""
    rc, err = _cli(TINY_TRAIN + SMOKE + ["--aug-splits", "2", "--split-bn", "--output", str(tmp_path),
                                         "--experiment", "e"], capsys)
    _one_error(rc, err, ["--split-bn", "test_vit", "no BatchNorm2d"])
    assert not (tmp_path / "e").exists()


def test_split_bn_trains_a_batchnorm_model(tmp_path):
    import torch
    from timm.layers import SplitBatchNorm2d

    import tests.tiny_models  # noqa: F401  (registers tiny_cnn_test)

    argv = [a if a != "test_vit" else "tiny_cnn_test" for a in TINY_TRAIN]
    res = run_train(argv + SMOKE + ["--aug-splits", "2", "--split-bn", "--output", str(tmp_path), "--experiment", "e"])
    state = torch.load(os.path.join(res["output_dir"], "last.pth.tar"), weights_only=True)["model"]
    assert any(".aux_bn.0." in k for k in state)
    assert SplitBatchNorm2d.__module__.startswith("timm.layers")
    # the checkpoint evaluates and fine-tunes on the plain model: its main BatchNorms load, the auxiliary ones are
    # left out (validate.py refused it: "75 unexpected keys (e.g. conv1.1.aux_bn.0.weight ...)")
    from src.checkpoint import finetune_from_checkpoint, load_model_weights
    from src.model_factory import create_model

    ckpt = os.path.join(res["output_dir"], "last.pth.tar")
    plain = create_model("tiny_cnn_test", num_classes=10)
    load_model_weights(plain, ckpt)
    main_bn = {k: v for k, v in state.items() if ".aux_bn." not in k}
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in main_bn.items())
    tuned = create_model("tiny_cnn_test", num_classes=10)
    finetune_from_checkpoint(tuned, ckpt, num_classes=4)
    assert all(torch.equal(tuned.state_dict()[k], v) for k, v in main_bn.items()
               if tuned.state_dict()[k].shape == v.shape)


def test_bce_loss_is_bce_also_without_smoothing():
    """--bce-loss --smoothing 0 silently trained with cross-entropy (timm's order of choices)."""
    from timm.loss import BinaryCrossEntropy

    from src.arg_parser import parse_args
    from src.setup_task import create_natural_criterion

    for smoothing in ("0", "0.1"):
        args, _ = parse_args(["--dataset", "digits", "--bce-loss", "--smoothing", smoothing, "--bce-target-thresh",
                              "0.2"])
        crit = create_natural_criterion(args)
        assert isinstance(crit, BinaryCrossEntropy) and crit.smoothing == float(smoothing)
        assert crit.target_threshold == 0.2


# ----------------------------------------------------------------------------------------------
# files already written


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    res = run_train(TINY_TRAIN + SMOKE + ["--output", str(out), "--experiment", "done"])
    return str(out), res["output_dir"]


def test_resume_auto_of_a_finished_run_writes_nothing(finished_run, capsys):
    """Before: a no-op --resume auto rewrote the finished run's args.yaml with this command's arguments (here
    --model-ema and --epochs 1 of a run whose record then no longer described it) and added a resume_history
    entry for a resume that trained nothing."""
    out, run_dir = finished_run
    before = _files(run_dir)
    for extra in ([], ["--model-ema", "--smoothing", "0.1"]):
        rc, err = _cli(TINY_TRAIN + SMOKE + ["--output", out, "--experiment", "done", "--resume", "auto", *extra],
                       capsys)
        assert rc == 0 and "Traceback" not in err, err
        assert _files(run_dir) == before


def test_a_refused_combination_leaves_the_run_folder_alone(finished_run, capsys):
    out, run_dir = finished_run
    before = _files(run_dir)
    rc, err = _cli(TINY_TRAIN + SMOKE + ["--output", out, "--experiment", "done", "--epochs", "2", "--resume",
                                         os.path.join(run_dir, "last.pth.tar"), "--amp-dtype", "bfloat16"], capsys)
    _one_error(rc, err, ["--amp-dtype bfloat16"])
    rc, err = _cli(TINY_TRAIN + SMOKE + ["--output", out, "--experiment", "done", "--epochs", "2", "--resume",
                                         os.path.join(run_dir, "last.pth.tar"), "--epoch-repeats", "2"], capsys)
    _one_error(rc, err, ["--epoch-repeats 2"])
    assert _files(run_dir) == before


# ----------------------------------------------------------------------------------------------
# the schedule's length


def test_lr_cycles_count_in_the_schedule_length(tmp_path, capsys):
    """cosine with --lr-cycle-limit 3 --lr-cycle-mul 2 trains 1 + 2 + 4 epochs for --epochs 1 (timm's rule, kept):
    the --start-epoch check and --help now count the cycles; a cycle count whose length overflows float64 was an
    OverflowError traceback from timm's scheduler after the model and data were built."""
    from src.arg_parser import parse_args
    from src.arg_parser.train import total_epochs

    cycles = ["--epochs", "1", "--cooldown-epochs", "0", "--lr-cycle-limit", "3", "--lr-cycle-mul", "2"]
    assert total_epochs(parse_args(["--dataset", "digits", *cycles])[0]) == 7
    rc, err = _cli(TINY_TRAIN + cycles + ["--start-epoch", "7", "--output", str(tmp_path)], capsys)
    _one_error(rc, err, ["--start-epoch", "below the 7 epochs", "--lr-cycle-limit"])
    rc, err = _cli(TINY_TRAIN + ["--lr-cycle-limit", "100000", "--lr-cycle-mul", "2", "--output", str(tmp_path)],
                   capsys)
    _one_error(rc, err, ["more than 10000000 epochs", "--lr-cycle-limit"])
    assert os.listdir(tmp_path) == []
