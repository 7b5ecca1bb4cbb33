"""Where the CLIs write: a bad output path gets one ``error:`` line and exit code 2 before any work,
and never replaces an input or another tool's file, never leaves half an output behind.

Found by an audit of every writer (train.py, validate.py, validate_robustbench.py, the analyses,
src.plots, prepare_checkpoint.py, benchmark.py, notebooks/make_notebooks.py); the checks live in
``src.storage`` (``check_output_file`` / ``check_output_folder``), ``src.results.check_results_target``
and the ``OUTPUT_PATH`` rule of ``src.arg_parser.values``.
"""
from __future__ import annotations

import csv
import hashlib
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import yaml

from tests.conftest import ROOT

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import robustbench_toy as toy  # noqa: E402  (registers rb_toy in timm)

from src.errors import run_cli  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_cpu_thread")


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _one_error(rc, err, *words) -> str:
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and err.strip().splitlines()[-1] == lines[0], err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------------------------
# validate_robustbench.py --output


@pytest.fixture(scope="module")
def rb_world(tmp_path_factory):
    """A two-example CIFAR test batch and the toy RobustBench model (tests/robustbench_toy.py)."""
    from tests.test_validate_robustbench import CENTRES, CIFAR_EXAMPLES, _write_cifar

    root = tmp_path_factory.mktemp("rb_out")
    _write_cifar(str(root), CIFAR_EXAMPLES)
    torch.save(toy.toy_state_dict(CENTRES, 4), root / "toy.pth")
    return root


def _rb(rb_world, output, capsys, checkpoint=None):
    import validate_robustbench

    argv = ["--model", "rb_toy", "--checkpoint", str(checkpoint or rb_world / "toy.pth"), "--dataset", "cifar10",
            "--data-dir", str(rb_world), "--num-classes", "4", "--n-examples", "2", "--batch-size", "2", "--eps", "8",
            "--workers", "0", "--output", str(output)]
    capsys.readouterr()
    rc = run_cli(validate_robustbench.main, argv)
    return rc, capsys.readouterr().err


def test_robustbench_report_never_replaces_the_checkpoint(rb_world, tmp_path, capsys):
    """--output CKPT used to write the JSON report over the evaluated checkpoint (exit 0)."""
    ckpt = tmp_path / "model.pth"
    ckpt.write_bytes((rb_world / "toy.pth").read_bytes())
    before = _digest(ckpt)
    rc, err = _rb(rb_world, ckpt, capsys, checkpoint=ckpt)
    _one_error(rc, err, "--output", "would replace the input")
    assert _digest(ckpt) == before
    assert "AutoAttack [" not in err  # refused before any attack


def test_robustbench_report_never_replaces_another_file(rb_world, tmp_path, capsys):
    """Any existing file that is not an earlier report was silently overwritten."""
    other = tmp_path / "results.json"
    other.write_text('{"top1": 50.0, "robust_top1": 10.0}\n')  # validate.py's results, say
    rc, err = _rb(rb_world, other, capsys)
    _one_error(rc, err, f"--output {other} exists and is not a validate_robustbench.py results report")
    assert other.read_text() == '{"top1": 50.0, "robust_top1": 10.0}\n'
    assert not (tmp_path / "results.state").exists()


def test_robustbench_report_that_is_a_folder_fails_before_the_attacks(rb_world, tmp_path, capsys):
    """--output FOLDER ran the whole evaluation, then ended in an IsADirectoryError traceback."""
    folder = tmp_path / "reports"
    folder.mkdir()
    rc, err = _rb(rb_world, folder, capsys)
    _one_error(rc, err, f"--output {folder} is a folder")
    assert "AutoAttack [" not in err and os.listdir(folder) == []


def test_robustbench_earlier_report_is_replaced(rb_world, tmp_path, capsys):
    out = tmp_path / "r.json"
    for _ in range(2):  # the second run finds the first's report (and state) and writes it again
        rc, err = _rb(rb_world, out, capsys)
        assert rc == 0, err
    assert "autoattack_acc" in out.read_text()


# ----------------------------------------------------------------------------------------------
# prepare_checkpoint.py --output-dir


@pytest.fixture(scope="module")
def bare_weights(tmp_path_factory):
    import timm

    path = tmp_path_factory.mktemp("export") / "weights.pth"
    torch.save(timm.create_model("test_vit", num_classes=10, img_size=32).state_dict(), path)
    return path


def _export(source, out_dir, capsys):
    spec = importlib.util.spec_from_file_location("prepare_checkpoint",
                                                  os.path.join(ROOT, "util_scripts", "prepare_checkpoint.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    capsys.readouterr()
    rc = module.main(["--checkpoint", str(source), "--model", "test_vit", "--dataset", "digits", "--output-dir",
                      str(out_dir), "--input-size", "3", "32", "32", "--crop-pct", "1.0", "--interpolation", "bicubic",
                      "--normalization", "raw"])
    return rc, capsys.readouterr().err


def test_export_never_writes_over_its_own_input(bare_weights, tmp_path, capsys):
    """Converting released/<model>-<dataset>.pth.tar into released/ replaced the downloaded file itself."""
    src = tmp_path / "test_vit-digits.pth.tar"
    src.write_bytes(bare_weights.read_bytes())
    rc, err = _export(src, tmp_path, capsys)
    _one_error(rc, err, "--output-dir", "would replace the input", str(src))
    assert _digest(src) == _digest(bare_weights)
    assert sorted(os.listdir(tmp_path)) == ["test_vit-digits.pth.tar"]


def test_export_checks_both_files_before_writing_either(bare_weights, tmp_path, capsys):
    """A folder named like the .safetensors twin: the .pth.tar was written, then a traceback-like
    'Is a directory: .<name>.tmp-...' line; a half export."""
    (tmp_path / "test_vit-digits.safetensors").mkdir()
    rc, err = _export(bare_weights, tmp_path, capsys)
    _one_error(rc, err, "test_vit-digits.safetensors is a folder")
    assert ".tmp-" not in err
    assert sorted(os.listdir(tmp_path)) == ["test_vit-digits.safetensors"]


def test_export_output_dir_that_is_a_file(bare_weights, tmp_path, capsys):
    blocker = tmp_path / "released"
    blocker.write_text("a file\n")
    rc, err = _export(bare_weights, blocker / "sub", capsys)
    _one_error(rc, err, "--output-dir", f"{blocker} is a file, not a folder")
    assert "Errno" not in err


def test_robustbench_unknown_protocol_is_one_error_line(rb_world, capsys):
    """gs:// without gcsfs (or a mistyped scheme) ended in fsspec's traceback from the state folder."""
    rc, err = _rb(rb_world, "robust-vits-no-such-protocol://bucket/r.json", capsys)
    _one_error(rc, err, "--output robust-vits-no-such-protocol://bucket/r.json", "cannot be reached")


# ----------------------------------------------------------------------------------------------
# attack_effectiveness.py / attack_convergence.py --output-file

NO_SUCH_PROTOCOL = "robust-vits-no-such-protocol://bucket/out.csv"
TINY_EVAL = ["--dataset", "digits", "-m", "test_vit", "--num-classes", "10", "--input-size", "3", "32", "32",
             "--crop-pct", "1.0", "--interpolation", "bicubic", "-j", "0", "--no-normalize", "--attack-eps", "8"]


@pytest.fixture
def refuse_work(monkeypatch):
    """A bad output path must be refused before the model or the data are built."""
    import src.convergence
    import src.effectiveness

    def refuse(*_a, **_k):
        raise AssertionError("the output path was accepted and the work started")

    monkeypatch.setattr(src.effectiveness, "create_eval_dataset", refuse)
    monkeypatch.setattr(src.convergence, "build_model_and_data", refuse)


@pytest.mark.parametrize("target, words", [
    (lambda d: d / "a_file" / "ae.csv", ["--output-file", "a_file is a file, not a folder"]),  # was a traceback
    (lambda d: NO_SUCH_PROTOCOL, ["--output-file", "cannot be reached"]),  # was fsspec's traceback
], ids=["under-a-file", "unknown-protocol"])
def test_effectiveness_output_file_checked_before_work(tmp_path, capsys, refuse_work, target, words):
    import attack_effectiveness

    (tmp_path / "a_file").write_text("x")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoint-0.pth.tar").write_bytes(b"never read: the output is refused first")
    argv = TINY_EVAL + ["--checkpoints-dir", str(run_dir), "--epochs-to-try", "0", "--seeds", "0", "--steps-to-try",
                        "1", "--output-file", str(target(tmp_path))]
    capsys.readouterr()
    _one_error(run_cli(attack_effectiveness.main, argv), capsys.readouterr().err, *words)


@pytest.mark.parametrize("target, words", [
    (lambda d: d / "a_file" / "c.csv", ["--output-file", "a_file is a file, not a folder"]),  # was a traceback
    (lambda d: NO_SUCH_PROTOCOL, ["--output-file", "cannot be reached"]),  # was fsspec's traceback
    (lambda d: d / "folder", ["--output-file", "folder is a folder, not a file"]),
    (lambda d: d / "weights.pth", ["--output-file", "would replace the input"]),  # was written over at the end
], ids=["under-a-file", "unknown-protocol", "a-folder", "the-checkpoint"])
def test_convergence_output_file_checked_before_work(tmp_path, capsys, refuse_work, target, words):
    import attack_convergence

    (tmp_path / "a_file").write_text("x")
    (tmp_path / "folder").mkdir()
    ckpt = tmp_path / "weights.pth"
    ckpt.write_bytes(b"never read: the output is refused first")
    (tmp_path / "weights.pth.state").mkdir()  # as if an earlier study had written there
    argv = TINY_EVAL + ["--checkpoint", str(ckpt), "--n-points", "4", "-b", "4", "--runs", "1", "--steps-to-try", "0",
                        "1", "--output-file", str(target(tmp_path))]
    capsys.readouterr()
    _one_error(run_cli(attack_convergence.main, argv), capsys.readouterr().err, *words)
    assert ckpt.read_bytes() == b"never read: the output is refused first"


# ----------------------------------------------------------------------------------------------
# python -m src.plots --out


def _summary_csv(path):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "eval_top1"])
        w.writerows([[0, 10.0], [1, 20.0], [2, 30.0]])
    return str(path)


def test_plots_out_that_is_a_file(tmp_path, capsys):
    """--out FILE ended in a FileExistsError traceback."""
    from src import plots

    data = _summary_csv(tmp_path / "s.csv")
    blocker = tmp_path / "figs"
    blocker.write_text("x")
    rc = run_cli(plots.main, ["learning-curves", data, "--out", str(blocker), "--metric", "eval_top1"])
    _one_error(rc, capsys.readouterr().err, "--out", "is a file, not a folder")


def test_plots_check_every_figure_before_writing(tmp_path, capsys):
    """A folder named like one figure: the PNG was written, then an IsADirectoryError traceback."""
    from src import plots

    data = _summary_csv(tmp_path / "s.csv")
    out = tmp_path / "figs"
    (out / "learning-curves.pdf").mkdir(parents=True)
    rc = run_cli(plots.main, ["learning-curves", data, "--out", str(out), "--metric", "eval_top1"])
    _one_error(rc, capsys.readouterr().err, "learning-curves.pdf is a folder")
    assert os.listdir(out) == ["learning-curves.pdf"]


def test_plots_never_draw_over_an_input(tmp_path, capsys):
    from src import plots

    data = _summary_csv(tmp_path / "learning-curves.png")  # a CSV under a figure's name
    before = _digest(data)
    rc = run_cli(plots.main, ["learning-curves", data, "--out", str(tmp_path), "--metric", "eval_top1"])
    _one_error(rc, capsys.readouterr().err, "would replace the input")
    assert _digest(data) == before


def test_plots_killed_mid_write_keep_the_earlier_figure(tmp_path):
    """Figures are written atomically: a kill leaves the earlier figure whole (it was overwritten in place)."""
    data = _summary_csv(tmp_path / "s.csv")
    out = tmp_path / "figs"
    out.mkdir()
    (out / "learning-curves.png").write_bytes(b"the earlier figure")
    env = dict(os.environ, ROBUST_VITS_TEST_KILL_BEFORE_RENAME="learning-curves.png", MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, "-m", "src.plots", "learning-curves", data, "--out", str(out), "--metric",
                           "eval_top1"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert (out / "learning-curves.png").read_bytes() == b"the earlier figure"


# ----------------------------------------------------------------------------------------------
# notebooks/make_notebooks.py --out


def test_make_notebooks_bad_out_is_one_error_line(tmp_path):
    """--out FILE or a folder under a file ended in a traceback (open() of each notebook)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "notebooks", "make_notebooks.py"), "--out",
                           str(blocker / "nb")], capture_output=True, text=True)
    _one_error(proc.returncode, proc.stderr, "--out", "is a file, not a folder")


def test_make_notebooks_creates_a_new_folder(tmp_path):
    spec = importlib.util.spec_from_file_location("make_notebooks", os.path.join(ROOT, "notebooks", "make_notebooks.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    written = module.write_all(str(tmp_path / "new" / "nb"))
    assert written and all(os.path.isfile(p) for p in written)
    assert not [n for n in os.listdir(tmp_path / "new" / "nb") if n.startswith(".")]  # no temporary files left


# ----------------------------------------------------------------------------------------------
# ~ and $VARIABLES in output paths


def test_tilde_and_variables_in_output_paths_are_expanded(tmp_path, monkeypatch):
    """``output: ~/runs`` in a config (no shell to expand it) created a folder literally named '~'
    in the working directory; ``$VAR`` the same."""
    from src.arg_parser import parse_args

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RUNS", str(tmp_path / "runs"))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"dataset": "digits", "output": "~/out"}))
    assert parse_args(["-c", str(cfg)])[0].output == str(tmp_path / "home" / "out")
    assert parse_args(["--dataset", "digits", "--output", "$RUNS/a"])[0].output == str(tmp_path / "runs" / "a")
    assert parse_args(["--dataset", "digits", "--output", "${RUNS}/b"])[0].output == str(tmp_path / "runs" / "b")
    assert parse_args(["--dataset", "digits", "--output", "gs://bucket/~x"])[0].output == "gs://bucket/~x"


@pytest.mark.parametrize("cli, argv, work", [
    ("train", ["--dataset", "digits", "--output", "$ROBUST_VITS_UNSET_OUT/runs"], "src.trainer.run_training"),
    ("validate", ["--model", "test_vit", "--results-file", "$ROBUST_VITS_UNSET_OUT/r.csv"], "src.validation.run"),
    ("attack_convergence", ["--model", "test_vit", "--output-file", "${ROBUST_VITS_UNSET_OUT}/c.csv"],
     "src.convergence.run"),
    ("benchmark", ["--model", "test_vit", "--results-file", "$ROBUST_VITS_UNSET_OUT/b.csv"], "src.benchmark.run"),
    ("validate_robustbench", ["--model", "rb_toy", "--output", "$ROBUST_VITS_UNSET_OUT/r.json"], "src.robustbench.run"),
])
def test_unset_variable_in_an_output_path_is_refused(cli, argv, work, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("ROBUST_VITS_UNSET_OUT", raising=False)
    monkeypatch.chdir(tmp_path)
    module_name, func = work.rsplit(".", 1)

    def refuse(*_a, **_k):
        raise AssertionError(f"{cli}: the output path was accepted and the work would start")

    monkeypatch.setattr(importlib.import_module(module_name), func, refuse)
    module = importlib.import_module(cli)
    rc = run_cli(module.main, argv)
    line = _one_error(rc, capsys.readouterr().err, "$VARIABLES are set", "ROBUST_VITS_UNSET_OUT")
    assert line.startswith(f"error: {cli}.py: argument --"), line
    assert os.listdir(tmp_path) == []  # no folder named '$ROBUST_VITS_UNSET_OUT'


# ----------------------------------------------------------------------------------------------
# datasets/build.py --data_dir


@pytest.mark.tfds
def test_tfds_build_data_dir_under_a_file_is_one_error_line(tmp_path):
    """--data_dir under a file ended in TFDS's NotADirectoryError traceback (after loading the builder)."""
    pytest.importorskip("tensorflow_datasets", reason="needs tensorflow-datasets (requirements-tfds.txt)")
    (tmp_path / "manual").mkdir()
    (tmp_path / "manual" / "f").write_text("x")
    (tmp_path / "a_file").write_text("x")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "datasets", "build.py"),
                           os.path.join(ROOT, "datasets", "cifar_ddpm"), "--manual_dir", str(tmp_path / "manual"),
                           "--data_dir", str(tmp_path / "a_file" / "tfds")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    _one_error(proc.returncode, proc.stderr, "--data_dir", "a_file is a file, not a folder")


def test_tilde_and_variables_in_input_paths_are_expanded(tmp_path, monkeypatch):
    """Four of the original's configs say ``data_dir: ~/torch_data``: without a shell to expand it, the data dir
    '~/torch_data' did not exist; checkpoints and label files given in a config the same."""
    from src.arg_parser import parse_args
    from src.arg_parser.evaluate import parse_validate_args

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CKPTS", str(tmp_path / "ck"))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"dataset": "torch/cifar10", "data_dir": "~/torch_data",
                                   "initial_checkpoint": "$CKPTS/a.pth", "resume": "", "finetune": None,
                                   "combine_dataset": "tfds/cifar_ddpm", "combine_data_dir": "~/ddpm"}))
    args = parse_args(["-c", str(cfg)])[0]
    assert args.data_dir == str(tmp_path / "home" / "torch_data")
    assert args.initial_checkpoint == str(tmp_path / "ck" / "a.pth")
    assert args.combine_data_dir == str(tmp_path / "home" / "ddpm")
    assert args.resume == "" and args.finetune is None
    v = parse_validate_args(["~/data", "--checkpoint", "${CKPTS}/b.pth", "--class-map", "~/m.txt"])
    assert (v.data, v.checkpoint, v.class_map) == (str(tmp_path / "home" / "data"), str(tmp_path / "ck" / "b.pth"),
                                                   str(tmp_path / "home" / "m.txt"))
