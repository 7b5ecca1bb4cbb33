"""benchmark.py times one tiny model in each mode and writes its results as CSV and JSON."""
from __future__ import annotations

import csv
import json

import pytest

import benchmark as bench_cli
from src.errors import run_cli

pytestmark = pytest.mark.usefixtures("single_cpu_thread")

TINY = ["-m", "test_vit", "--img-size", "32", "-b", "2", "--num-warm-iter", "1", "--num-bench-iter", "2"]
COLUMNS = {"inference": ["inference"], "train": ["train"], "both": ["inference", "train"],
           "adv-train": ["adv_train"], "all": ["inference", "train", "adv_train"]}


@pytest.mark.parametrize("mode", list(COLUMNS))
def test_each_mode_times_a_tiny_model(mode, tmp_path, capsys):
    out = tmp_path / "bench.csv"
    assert run_cli(bench_cli.main, TINY + ["--bench", mode, "--results-file", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(printed.split("--result", 1)[1])
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and rows[0]["model"] == "test_vit" == result["model"]
    for key in COLUMNS[mode]:
        assert float(rows[0][f"{key}_samples_per_sec"]) > 0 and result[f"{key}_step_time_ms"] > 0
    assert ("attack_steps" in result) == (mode in ("adv-train", "all"))


def test_precision_channels_last_compile_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = TINY + ["--bench", "adv-train", "--precision", "bfloat16", "--channels-last", "--torch-compile", "eager",
                   "--attack-steps", "1", "--results-file", str(out)]
    assert run_cli(bench_cli.main, argv) == 0
    row, = json.loads(out.read_text())
    assert (row["precision"], row["channels_last"], row["compile"], row["attack_steps"]) == ("bfloat16", True,
                                                                                            "eager", 1)


@pytest.mark.parametrize("argv, needle", [
    (["-m", "no_such_model_xyz"], "unknown model"),
    (["--bench", "profile"], "--bench: must be one of inference"),
    (["-b", "0"], "--batch-size"),
    (TINY + ["--device", "tpu"], "--device: must be a torch device such as cpu, cuda or cuda:1, got 'tpu'"),
    (TINY + ["--device", "xla"], "--device: must be cpu, cuda[:N], mps or xpu"),
    (["-m", "test_vit", "-b", "2", "--input-size", "3", "100000", "100000"], "one batch of 2 such images takes 223"),
    (TINY + ["--gp", "nopool"], "model 'test_vit' cannot be built with --gp 'nopool'"),
    (TINY + ["--fold-bn"], "--fold-bn: must be used with --bench inference only"),
    (TINY + ["--torch-compile", "no_such_backend"], "--torch-compile: must be a torch.compile backend"),
    # the model asserts on an input it cannot take: was an AssertionError traceback
    (["-m", "test_vit", "-b", "2", "--num-warm-iter", "0", "--num-bench-iter", "1", "--bench", "inference",
      "--input-size", "3", "32", "33"], "test_vit: Input width (33) should be divisible by patch size (16)"),
])
def test_bad_input_exit_2(argv, needle, capsys):
    assert run_cli(bench_cli.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == err[-1] and needle in errors[0] and "Traceback" not in "".join(err)


def test_results_file_that_is_not_a_benchmark_result_is_refused_before_timing(tmp_path, capsys):
    """A folder used to end in a traceback after the timing; another tool's CSV/JSON (a training
    summary.csv, validate results) was silently overwritten. Now: one error line, nothing touched."""
    folder = tmp_path / "folder.csv"
    folder.mkdir()
    summary = tmp_path / "summary.csv"
    summary.write_text("epoch,train_loss,eval_top1\n0,2.3,10.0\n")
    other_json = tmp_path / "results.json"
    other_json.write_text('{"top1": 10.0, "robust_top1": 5.0}\n')
    for path, message in ((folder, "is a folder"), (summary, "exists and is not a benchmark.py results CSV"),
                          (other_json, "exists and is not a benchmark.py results JSON")):
        before = path.read_text() if path.is_file() else None
        assert run_cli(bench_cli.main, TINY + ["--bench", "inference", "--results-file", str(path)]) == 2
        captured = capsys.readouterr()
        assert captured.err.strip().splitlines() == [f"error: --results-file {path} {message}" + (
            "; give a file name ending in .csv or .json" if path == folder else
            "; it is not replaced: choose another file name")]
        assert "--result" not in captured.out  # refused before any model was timed
        assert (path.read_text() if path.is_file() else None) == before
    # an earlier benchmark result is replaced, and a new folder is created
    for out in (tmp_path / "bench.csv", tmp_path / "new" / "bench.json"):
        for _ in range(2):
            assert run_cli(bench_cli.main, TINY + ["--bench", "inference", "--results-file", str(out)]) == 0
        assert "test_vit" in out.read_text()


def _model_list_cases(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    binary = tmp_path / "models.bin"
    binary.write_bytes(b"\x80\x02}q\x00.")
    return [(empty, "names no models; write one timm model name per line"),  # fell back to -m resnet50
            (binary, "is not a text file of model names (not UTF-8 text)"),  # UnicodeDecodeError traceback
            (tmp_path, "is a folder; give the text file of model names")]  # said 'does not exist'


def test_a_model_list_that_names_no_models_is_one_error_line(tmp_path, capsys):
    for path, message in _model_list_cases(tmp_path):
        out = tmp_path / "bench.csv"
        assert run_cli(bench_cli.main, ["--model-list", str(path), "--results-file", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: --model-list {path} {message}"], err
        assert not out.exists()


def test_bulk_run_where_every_model_fails_is_an_error_and_writes_nothing(tmp_path, capsys):
    """Every model failing used to exit 0 with an empty results file, which the next run then refused to replace
    ('not a benchmark.py results CSV')."""
    models = tmp_path / "models.txt"
    models.write_text("test_vit\ntest_resnet\n")
    out = tmp_path / "bench.csv"
    argv = ["--model-list", str(models), "-b", "2", "--num-warm-iter", "0", "--num-bench-iter", "1", "--bench",
            "inference", "--input-size", "1", "32", "32", "--results-file", str(out)]  # 3-channel models: both fail
    assert run_cli(bench_cli.main, argv) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.strip().splitlines() if line.startswith("error:")]
    assert errors == ["error: all 2 models failed (see the warnings above); nothing was timed or written"]
    assert captured.err.count("failed:") == 2 and "--result" not in captured.out and not out.exists()


def test_fold_bn_folds_the_inference_model(tmp_path, capsys):
    # --fold-bn was accepted and silently ignored: the row now says how many BatchNorm layers were folded
    argv = ["-m", "resnet18", "--img-size", "32", "-b", "2", "--num-warm-iter", "0", "--num-bench-iter", "1",
            "--bench", "inference", "--fold-bn"]
    assert run_cli(bench_cli.main, argv) == 0
    result = json.loads(capsys.readouterr().out.split("--result", 1)[1])
    assert result["folded_batchnorms"] == 20 and result["inference_samples_per_sec"] > 0
    assert run_cli(bench_cli.main, argv[:-1]) == 0
    assert "folded_batchnorms" not in json.loads(capsys.readouterr().out.split("--result", 1)[1])
