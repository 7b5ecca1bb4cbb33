"""The benchmark scripts run end to end in their smallest settings (no timing is asserted).

Each script is run as a subprocess the way a user runs it, with a tiny model, one round and no
warm-up; the test checks the exit code, the printed table and the JSON it writes, so the scripts
do not rot as the code they measure changes. The torchattacks comparison needs the peer installed
into benchmarks/.peer (``pip install --no-deps --target benchmarks/.peer torchattacks==3.5.1``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
QUICK = ["--rounds", "1", "--warmup", "0", "--threads", "1"]


def _run(script: str, args, tmp_path) -> dict:
    out = tmp_path / f"{script}.json"
    env = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(BENCH / f"{script}.py")] + list(args) + ["--json", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"results written to {out}" in proc.stdout
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == script
    assert payload["command"].startswith("python ") and f"{script}.py" in payload["command"]
    assert payload["machine"]["torch"] and payload["machine"]["cpu_count"] >= 1
    return payload


@pytest.mark.slow  # the integration lane (make test-slow): keeps the main suite within its budget
def test_adv_step_cost(tmp_path):
    res = _run("adv_step_cost", ["--models", "test_vit", "--steps", "1", "--trades-steps", "1", "--batch-size", "4",
                                 "--reps", "1"] + QUICK, tmp_path)
    rows = {r["variant"]: r for r in res["results"][0]["rows"]}
    assert {"clean", "pgd-1 faithful", "pgd-1 efficient", "trades-1", "prim T: train step"} <= set(rows)
    assert rows["clean"]["x_clean"] == 1.0
    assert rows["pgd-1 efficient"]["analytic_floor"] == pytest.approx(5 / 3)
    assert rows["pgd-1 faithful"]["analytic_floor"] == pytest.approx(2.0)
    assert rows["trades-1"]["analytic_floor"] == pytest.approx(3.0)
    assert all(r["seconds"] > 0 for r in rows.values())


@pytest.mark.slow  # integration lane (make test-slow): over 10 s on 2 cores
def test_train_overhead(tmp_path):
    res = _run("train_overhead", ["--model", "test_vit", "--batch-size", "250", "--attack-steps", "1"] + QUICK,
               tmp_path)
    parts = {(r["part"], r["clock"]): r for r in res["rows"]}
    assert set(parts) == {(p, c) for p in ("training epoch", "per-epoch evaluation", "whole run (main)")
                          for c in ("wall", "cpu")}
    assert all(r["train_py_s"] > 0 and r["plain_s"] > 0 for r in parts.values())
    plain = res["raw"]["plain_metrics"][0]
    assert plain["train"]["count"] == 1500 and plain["eval"]["count"] == 297  # 6 full batches, 3 eval batches


@pytest.mark.slow  # integration lane (make test-slow): over 10 s on 2 cores
def test_eval_overhead_autoattack_matches_direct_pyautoattack(tmp_path):
    res = _run("eval_overhead", ["--pgd-model", "test_vit", "--pgd-steps", "1", "--aa-model", "test_vit",
                                 "--aa-examples", "4", "--aa-untrained"] + QUICK, tmp_path)
    pgd, aa = res["results"]
    assert pgd["images"] == 297 and pgd["cli_s"] > 0 and pgd["reference_s"] > 0
    assert aa["identical_robust_accuracy"] is True
    assert aa["robust_top1"]["validate.py"] == aa["robust_top1"]["pyautoattack"]


@pytest.mark.slow  # integration lane (make test-slow): over 10 s on 2 cores
def test_memory(tmp_path):
    res = _run("memory", ["--model", "test_vit", "--steps", "1", "--trades-steps", "1", "--batch-size", "4",
                          "--iters", "1", "--threads", "1"], tmp_path)
    r = res["results"]
    assert set(r) == {"clean", "pgd-1 faithful", "pgd-1 efficient", "trades-1"}
    assert all(v["peak_rss_mib"] >= v["baseline_rss_mib"] > 0 for v in r.values())


@pytest.mark.slow  # the integration lane (make test-slow): keeps the main suite within its budget
def test_peer_torchattacks(tmp_path):
    if not (BENCH / ".peer" / "torchattacks").is_dir():
        pytest.skip("torchattacks not installed in benchmarks/.peer (pip install --no-deps --target "
                    "benchmarks/.peer torchattacks==3.5.1)")
    res = _run("peer_torchattacks", ["--model", "test_vit", "--steps", "1", "--batch-size", "4", "--reps", "1",
                                     "--bf16", "--channels-last"] + QUICK, tmp_path)
    fast = "ours efficient, --amp --amp-dtype bfloat16 --channels-last"
    rows = {r["variant"]: r for r in res["results"][0]["rows"]}
    cl = "ours efficient, --channels-last"
    assert set(rows) == {"ours efficient", "ours faithful", "torchattacks", fast, cl}
    assert rows["torchattacks"]["peer_over_this"] == 1.0
    ce = res["results"][0]["attack_mean_ce"]
    assert all(ce[v] > ce["clean"] for v in ("ours", "torchattacks", fast, cl))


@pytest.mark.slow  # the integration lane (make test-slow): keeps the main suite within its budget
def test_overhead_breakdown(tmp_path):
    res = _run("overhead_breakdown", ["--model", "test_vit", "--batch-size", "8", "--attack-steps", "1",
                                      "--reps", "1"] + QUICK, tmp_path)
    parts = {r["part"]: r for r in res["rows"]}
    assert {"data: train.py loader", "data: tensor slicing", "finite check", "metric sums", "lr scheduler",
            "step (PGD-1 efficient)", "step, plain loop's code (PGD-1)"} == set(parts)
    assert parts["step (PGD-1 efficient)"]["pct_of_step"] == 100.0


@pytest.mark.slow  # integration lane (make test-slow): over 10 s on 2 cores
def test_compile_check_reports_speed_and_agreement(tmp_path):
    # aot_eager: the AOTAutograd graphs (input gradients included) without inductor's minutes of codegen
    res = _run("compile_check", ["--models", "test_vit", "--batch-size", "4", "--reps", "1", "--backend",
                                 "aot_eager"] + QUICK, tmp_path)
    r = res["results"][0]
    assert {row["step"] for row in r["rows"]} == {"clean", "pgd-2"}
    assert all(row["eager_s"] > 0 and row["compiled_s"] > 0 and row["compile_s"] > 0 for row in r["rows"])
    agree = r["agreement"]
    assert agree["loss_abs_diff"] < 1e-4 and agree["weight_max_abs_diff"] < 1e-5
    assert agree["pgd_same_sign_fraction"] > 0.99


def test_readme_speed_table_is_what_the_committed_results_say(tmp_path):
    """The README quotes benchmarks/summarize.py's table of benchmarks/results/, not typed numbers."""
    sys.path.insert(0, str(BENCH))
    import summarize

    table = summarize.table()
    assert table.count("\n") >= 6 and "train.py" in table and "torchattacks" in table
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- readme-numbers:speed -->")[1].split("<!-- /readme-numbers:speed -->")[0]
    assert block.strip() == table.strip(), "run: python benchmarks/summarize.py --write-readme"
    # --write-readme refuses a README without the markers (nothing is written)
    bare = tmp_path / "README.md"
    bare.write_text("# no markers\n")
    assert summarize.main(["--write-readme", "--readme", str(bare)]) == 2
    assert bare.read_text() == "# no markers\n"


@pytest.mark.slow  # the integration lane (make test-slow): keeps the main suite within its budget
def test_throughput_counts_the_attack_work_and_reports_peak_fractions(tmp_path):
    res = _run("throughput", ["--device", "cpu", "--model", "test_vit", "--img-size", "32", "--batch-size", "4",
                              "--num-classes", "10", "--precision", "fp32", "--steps", "1", "2", "--steps-per-call", "1",
                              "--reps", "1", "--peak-size", "128"] + QUICK, tmp_path)
    rows = {r["variant"]: r for r in res["rows"]}
    assert list(rows) == ["clean", "PGD-1 efficient", "PGD-2 efficient"]
    f0, f1, f2 = (rows[n]["flops_per_step"] for n in rows)
    assert f0 > 0 and f2 - f1 == f1 - f0 > 0  # every PGD iteration adds the same forward + input-gradient work
    assert res["measured_peak_tflops"] > 0 and res["datasheet_peak_tflops"] is None  # no datasheet for a CPU
    for r in rows.values():
        assert r["images_per_s"] == pytest.approx(4 / r["seconds_per_step"])
        assert r["fraction_of_measured_peak"] == pytest.approx(r["tflops"] / res["measured_peak_tflops"])


def test_throughput_flop_count_of_a_matmul_and_an_attack_gradient():
    import torch

    sys.path.insert(0, str(BENCH))
    try:
        from throughput import count_flops
    finally:
        sys.path.remove(str(BENCH))
    a, b = torch.randn(8, 16), torch.randn(16, 32)
    assert count_flops(lambda: a @ b) == 2 * 8 * 16 * 32
    x = torch.randn(8, 16, requires_grad=True)  # a leaf input, as in an attack step
    assert count_flops(lambda: torch.autograd.grad((x @ b).sum(), x)) == 2 * (2 * 8 * 16 * 32)


@pytest.mark.slow  # integration lane (make test-slow): about two minutes of tiny runs
def test_gpu_checks_script_runs_every_step_on_the_cpu(tmp_path):
    if not (BENCH / ".peer" / "torchattacks").is_dir():
        pytest.skip("torchattacks not installed in benchmarks/.peer")
    env = dict(os.environ, OUT=str(tmp_path / "out"), DEVICE="cpu", QUICK="1", PYTHON=sys.executable,
               OMP_NUM_THREADS="1", WANDB_MODE="offline", DEADLINE="3600")
    proc = subprocess.run(["bash", str(BENCH / "gpu_checks.sh")], capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "all GPU checks passed" in proc.stdout and "FAILED" not in proc.stdout
    out = tmp_path / "out"
    for name in ("throughput", "peer_torchattacks", "compile_check"):
        assert json.loads((out / f"{name}.json").read_text())["benchmark"] == name
    assert (out / "runs" / "amp" / "last.pth.tar").is_file() and (out / "runs" / "ddp" / "last.pth.tar").is_file()
    # a failing step is reported by name and fails the script, the other steps still run
    env["PYTHON"] = "false"
    proc = subprocess.run(["bash", str(BENCH / "gpu_checks.sh")], capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode != 0 and "failed: throughput peer train_amp" in proc.stdout
    # past the script's deadline (a lent GPU's command limit) the remaining steps are skipped, named, and fail it
    env.update(PYTHON=sys.executable, DEADLINE="0")
    proc = subprocess.run(["bash", str(BENCH / "gpu_checks.sh")], capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode != 0 and "failed: throughput(skipped) peer(skipped)" in proc.stdout
    assert "=== compile SKIPPED" in proc.stdout


def test_summary_reads_the_variant_names_the_peer_benchmark_writes():
    sys.path.insert(0, str(BENCH))
    try:
        import peer_torchattacks
        import summarize
    finally:
        sys.path.remove(str(BENCH))
    # a renamed variant would otherwise drop its README row without a word
    assert (summarize.FAST, summarize.CL) == (peer_torchattacks.FAST, peer_torchattacks.CL)


@pytest.mark.slow  # the integration lane (make test-slow): keeps the main suite within its budget
def test_loader_overhead_reads_a_jpeg_folder_through_train_py_code(tmp_path):
    res = _run("loader_overhead", ["--model", "test_vit", "--input-size", "32", "--disk-size", "40", "--images",
                                   "16", "--batch-size", "4", "--e2e-steps", "2", "--e2e-workers", "1", "--reps", "1"]
               + QUICK, tmp_path)
    assert res["loader_batch_s"] > 0 and res["step_s"] > 0
    assert res["loader_over_step"] == pytest.approx(res["loader_batch_s"] / res["step_s"])
    assert res["workers_to_keep_up"] >= 1
    e2e = res["end_to_end_s"]
    assert len(e2e["loader-fed"]) == len(e2e["in memory"]) == len(e2e["first batch"]) == 1
    assert not any(n.startswith("bench-loader-") for n in os.listdir(tmp_path))  # its temporary folder is gone


def _bench_module(name: str):
    import importlib

    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.parametrize("script, argv, needle", [
    ("peer_torchattacks", ["--batch-size", "0"], "--batch-size: must be an integer >= 1, got '0'"),
    ("peer_torchattacks", ["--threads", "0"], "--threads: must be an integer >= 1"),
    ("adv_step_cost", ["--steps", "1", "-1"], "--steps: must be an integer >= 1, got '-1'"),
    # zero attack steps: a PGD-0 "adversarial step" is not one (and was a ZeroDivisionError traceback in the
    # attack's step size 1.5 eps / k, or a run timing no attack); every script's attack-step flag
    ("adv_step_cost", ["--steps", "0"], "--steps: must be an integer >= 1, got '0'"),
    ("adv_step_cost", ["--trades-steps", "0"], "--trades-steps: must be an integer >= 1, got '0'"),
    ("compile_check", ["--k", "0"], "--k: must be an integer >= 1, got '0'"),
    ("eval_overhead", ["--pgd-steps", "0"], "--pgd-steps: must be an integer >= 1, got '0'"),
    ("loader_overhead", ["--attack-steps", "0"], "--attack-steps: must be an integer >= 1, got '0'"),
    ("memory", ["--steps", "0"], "--steps: must be an integer >= 1, got '0'"),
    ("memory", ["--trades-steps", "0"], "--trades-steps: must be an integer >= 1, got '0'"),
    ("overhead_breakdown", ["--attack-steps", "0"], "--attack-steps: must be an integer >= 1, got '0'"),
    ("peer_torchattacks", ["--steps", "0"], "--steps: must be an integer >= 1, got '0'"),
    ("throughput", ["--steps", "0"], "--steps: must be an integer >= 1, got '0'"),
    ("train_overhead", ["--attack-steps", "0"], "--attack-steps: must be an integer >= 1, got '0'"),
    ("memory", ["--iters", "x"], "--iters: must be an integer >= 1, got 'x'"),
    ("train_overhead", ["--eps", "nan"], "--eps: must be a finite number >= 0"),
    ("loader_overhead", ["--e2e-workers", "-1"], "--e2e-workers: must be an integer >= 0"),
    ("throughput", ["--device", "tpu"], "--device"),
    ("compile_check", ["--models", "no_such_model"], "unknown model 'no_such_model'"),
    ("peer_torchattacks", ["--json", "."], "--json: . is a folder"),
    # a batch that cannot fit in memory: was the allocator's RuntimeError traceback at the first timed step
    ("adv_step_cost", ["--models", "test_vit", "--batch-size", "100000000"],
     "--batch-size 100000000 with --img-size 32: one batch of 100000000 such images takes 1144.4 GiB as float32"),
    ("peer_torchattacks", ["--batch-size", "2", "--img-size", "1000000"],
     "--batch-size 2 with --img-size 1000000: one batch of 2 such images takes 22351.7 GiB"),
    ("overhead_breakdown", ["--batch-size", "1000000000"], "--batch-size 1000000000 (3x32x32 px images): one batch"),
    ("loader_overhead", ["--input-size", "1000000"], "--batch-size 32 with --input-size 1000000: one batch"),
    ("loader_overhead", ["--disk-size", "1000000"],
     "--disk-size 1000000: one such image takes 2794.0 GiB as 8-bit pixels, more than the"),
    ("throughput", ["--img-size", "10000000"], "use a smaller size or --batch-size"),
    # a size the model cannot take, a torch.compile backend typo: were tracebacks from the first timed step
    ("adv_step_cost", ["--models", "test_vit", "--img-size", "33", "--batch-size", "2", "--steps", "1", "--device",
                       "cpu"], "model test_vit cannot take 33x33 px inputs: Input height (33) should be divisible"),
    ("compile_check", ["--models", "test_resnet", "--backend", "bogus"],
     "argument --backend: must be a torch.compile backend"),
])
def test_bad_benchmark_input_is_one_line_before_anything_is_written(script, argv, needle, tmp_path, capsys):
    mod = _bench_module(script)
    out = tmp_path / "r.json"
    assert mod.bc.run_cli(mod.main, ["--json", str(out), "--rounds", "1", "--warmup", "0"] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and needle in err, err
    assert not out.exists()


def test_memory_passes_on_its_childs_bad_input_error_as_one_line(tmp_path, capsys):
    """The measuring child's error (an unknown model) was exit 1 with two error lines ('the clean child failed:')."""
    mod = _bench_module("memory")
    out = tmp_path / "r.json"
    argv = ["--json", str(out), "--model", "no_such_model", "--steps", "1", "--trades-steps", "--device", "cpu"]
    assert mod.bc.run_cli(mod.main, argv) == 2
    assert capsys.readouterr().err.strip() == "error: unknown model 'no_such_model'"
    assert not out.exists()


def test_summary_refuses_a_folder_without_results_and_a_damaged_file(tmp_path, capsys):
    summarize = _bench_module("summarize")
    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- readme-numbers:speed -->\nold\n<!-- /readme-numbers:speed -->\n")
    before = readme.read_text()
    assert summarize.main(["--results", str(tmp_path / "none"), "--write-readme", "--readme", str(readme)]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert summarize.main(["--results", str(tmp_path), "--write-readme", "--readme", str(readme)]) == 2
    assert "holds none of the benchmark results" in capsys.readouterr().err
    (tmp_path / summarize.PEER).write_text('{"results": [{"k": 1}]}')  # another version's layout
    assert summarize.main(["--results", str(tmp_path), "--write-readme", "--readme", str(readme)]) == 2
    assert "lacks a field the table needs" in capsys.readouterr().err
    (tmp_path / summarize.PEER).write_text("{}")  # was taken for a missing file: its row silently left out
    assert summarize.main(["--results", str(tmp_path), "--write-readme", "--readme", str(readme)]) == 2
    assert "is not a benchmark result (its JSON is not an object with results)" in capsys.readouterr().err
    (tmp_path / summarize.PEER).write_text("{")
    assert summarize.main(["--results", str(tmp_path), "--write-readme", "--readme", str(readme)]) == 2
    assert "is not a readable JSON" in capsys.readouterr().err
    assert readme.read_text() == before  # nothing written on any of these
