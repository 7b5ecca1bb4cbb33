#!/usr/bin/env python3
"""validate.py against plain evaluation: PGD-10 against a plain loop, AutoAttack against pyautoattack.

Setup (untimed): train.py makes the checkpoints on the embedded digits data, one clean epoch of
``--pgd-model`` and, for AutoAttack, the small adversarially trained ``--aa-model`` of the tests
(a clean epoch, then a PGD-1 epoch at 8/255), so that some examples survive every attack.

Timed, interleaved in this process (whole invocations, model building and loading included):

* ``validate.py --attack pgd --attack-steps 10`` on the 297 validation images against
  :func:`plain_loop.evaluate` on the same images held in memory (same model, eps, step size);
* ``validate.py --attack autoattack`` on the first ``--aa-examples`` validation images against a
  direct ``pyautoattack.AutoAttack(...).run_standard_evaluation`` call on the same model and
  examples with the same seed; their robust accuracies are compared as validate.py reports them
  (4 decimals) and must be identical in every run.

A robust example costs AutoAttack about 10^4 forward passes, so keep ``--aa-examples`` small on a CPU.

    python benchmarks/eval_overhead.py --pgd-model resnet18 --pgd-steps 10 --aa-model test_vit --aa-examples 4
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

import torch

import bench_common as bc
import plain_loop

COMMON = ["--dataset", "digits", "--num-classes", "10", "--input-size", "3", "32", "32", "--crop-pct", "1.0",
          "--interpolation", "bicubic"]


def make_checkpoint(model: str, out: str, adversarial: bool) -> str:
    """One train.py run; returns its last checkpoint."""
    import train as train_cli

    argv = COMMON + ["--model", model, "-b", "50", "-vb", "99", "--opt", "adamw", "--lr", "1e-3",
                     "--weight-decay", "0.05", "--sched", "cosine", "--warmup-epochs", "0", "--cooldown-epochs", "0",
                     "--smoothing", "0", "--no-aug", "--workers", "0", "--log-interval", "1000", "--seed", "1",
                     "--output", out, "--experiment", model]
    if adversarial:
        argv += ["--adv-training", "pgd", "--attack-eps", "8", "--attack-steps", "1", "--eps-schedule", "linear",
                 "--eps-schedule-period", "1", "--zero-eps-epochs", "1", "--epochs", "2", "--adv-clean-logits",
                 "skip"]
    else:
        argv += ["--epochs", "1"]
    with contextlib.redirect_stdout(io.StringIO()):
        rc = train_cli.main(argv)
    if rc != 0:
        raise SystemExit(f"error: train.py exited with {rc} while making the {model} checkpoint")
    return str(Path(out) / model / "last.pth.tar")


def untrained_checkpoint(model: str, out: str) -> str:
    """A checkpoint of the randomly initialised model (quick runs: few examples survive AutoAttack)."""
    torch.manual_seed(0)
    path = str(Path(out) / f"{model}-untrained.pth.tar")
    torch.save({"model": bc.create_model(model, num_classes=10, img_size=32).state_dict()}, path)
    return path


def validate_result(argv: List[str]) -> Dict:
    """validate.py in-process; its --result JSON."""
    import validate as validate_cli

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = validate_cli.main(argv)
    if rc != 0:
        raise SystemExit(f"error: validate.py exited with {rc}")
    res = json.loads(buf.getvalue().split("--result\n", 1)[1])
    return res[0] if isinstance(res, list) else res


def load_model(name: str, ckpt: str) -> torch.nn.Module:
    model = bc.create_model(name, num_classes=10, img_size=32)
    model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True)["model"])
    return model.eval()


def bench_pgd(ns: argparse.Namespace, ckpt: str) -> Dict:
    argv = COMMON + ["-m", ns.pgd_model, "-j", "0", "--log-freq", "0", "--checkpoint", ckpt, "--no-normalize",
                     "-b", "99", "--attack", "pgd", "--attack-eps", "8", "--attack-steps", str(ns.pgd_steps),
                     "--seed", "0"]
    got: Dict[str, List[float]] = {"validate.py": [], "plain loop": []}

    def cli() -> None:
        got["validate.py"].append(validate_result(argv)["robust_top1"])

    def plain() -> None:
        torch.manual_seed(0)
        model = load_model(ns.pgd_model, ckpt)
        x, y = plain_loop.digits_tensors("validation")
        got["plain loop"].append(plain_loop.evaluate(model, x, y, 99, 8 / 255, ns.pgd_steps)["robust_top1"])

    fns = {"validate.py": cli, "plain loop": plain}
    if ns.fold_bn:
        got["validate.py --fold-bn"] = []
        fns["validate.py --fold-bn"] = lambda: got["validate.py --fold-bn"].append(
            validate_result(argv + ["--fold-bn"])["robust_top1"])
    t = bc.interleaved(fns, ns.rounds, 1, ns.warmup)
    res = summarize(f"PGD-{ns.pgd_steps} evaluation, {ns.pgd_model}, 297 images", t, ns.clock,
                    {k: got[k] for k in ("validate.py", "plain loop")}, "validate.py", "plain loop", 297)
    if ns.fold_bn:
        # speed-up of --fold-bn: validate.py's time without it over its time with it
        fold = summarize(f"PGD-{ns.pgd_steps} evaluation, {ns.pgd_model}, 297 images, --fold-bn", t, ns.clock,
                         {k: got[k] for k in ("validate.py --fold-bn", "plain loop")}, "validate.py --fold-bn",
                         "plain loop", 297)
        samples = t.cpu if ns.clock == "cpu" else t.wall
        fold["speedup_over_unfolded"] = bc.median(samples["validate.py"]) / bc.median(samples["validate.py --fold-bn"])
        fold["speedup_spread"] = bc.ratio_spread(samples["validate.py"], samples["validate.py --fold-bn"])
        fold["robust_top1_unfolded"] = got["validate.py"]
        return [res, fold]
    return [res]


def bench_autoattack(ns: argparse.Namespace, ckpt: str) -> Dict:
    from pyautoattack import AutoAttack

    n = ns.aa_examples
    argv = COMMON + ["-m", ns.aa_model, "-j", "0", "--log-freq", "0", "--checkpoint", ckpt, "--no-normalize",
                     "-b", str(n), "--num-examples", str(n), "--attack", "autoattack", "--attack-eps", "8",
                     "--seed", "0"]
    got: Dict[str, List[float]] = {"validate.py": [], "pyautoattack": []}

    def cli() -> None:
        got["validate.py"].append(validate_result(argv)["robust_top1"])

    def direct() -> None:
        model = load_model(ns.aa_model, ckpt)
        x, y = plain_loop.digits_tensors("validation")
        x, y = x[:n], y[:n]
        adversary = AutoAttack(model, norm="Linf", eps=8 / 255, version="standard", seed=0, device="cpu")
        x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=n)
        with torch.no_grad():
            got["pyautoattack"].append(100.0 * float((model(x_adv).argmax(1) == y).float().mean()))

    t = bc.interleaved({"validate.py": cli, "pyautoattack": direct}, ns.rounds, 1, ns.warmup)
    return summarize(f"AutoAttack standard, {ns.aa_model}, {n} images", t, ns.clock, got, "validate.py",
                     "pyautoattack", n)


def summarize(title: str, t: "bc.Timings", clock: str, got: Dict[str, List[float]], a: str, b: str,
              n: int) -> Dict:
    samples, other = (t.cpu, t.wall) if clock == "cpu" else (t.wall, t.cpu)
    ta, tb = bc.median(samples[a]), bc.median(samples[b])
    return {"title": title, "images": n, "cli": a, "reference": b, "cli_s": ta, "reference_s": tb,
            "ratio": ta / tb, "ratio_other_clock": bc.median(other[a]) / bc.median(other[b]),
            "ratio_spread": bc.ratio_spread(samples[a], samples[b]), "cli_img_per_s": n / ta,
            "reference_img_per_s": n / tb, "robust_top1": got, "wall_s": t.wall, "cpu_s": t.cpu}


def main(argv=None) -> int:
    p = bc.cli_parser(__doc__, __file__)
    p.add_argument("--pgd-model", default="resnet18")
    p.add_argument("--pgd-steps", type=bc.ATTACK_STEPS, default=10)
    p.add_argument("--aa-model", default="test_vit")
    p.add_argument("--aa-examples", type=bc.COUNT, default=4, help="first N validation images for AutoAttack")
    p.add_argument("--aa-untrained", action="store_true",
                   help="attack the randomly initialised --aa-model (quick check of the plumbing, not a timing)")
    p.add_argument("--fold-bn", action="store_true",
                   help="also time validate.py --fold-bn in the PGD part (its speed-up over validate.py without it)")
    p.add_argument("--skip", nargs="*", default=[], choices=["pgd", "autoattack"], help="parts not to run")
    bc.add_common_args(p, rounds=3, reps=1, warmup=1, device=False)
    ns = p.parse_args(argv)
    torch.set_num_threads(ns.threads)
    logging.getLogger("robust_vits").addHandler(logging.NullHandler())  # keep the CLIs' INFO lines quiet
    tmp = tempfile.mkdtemp(prefix="bench-eval-")
    results = []
    try:
        if "pgd" not in ns.skip:
            results += bench_pgd(ns, make_checkpoint(ns.pgd_model, tmp, adversarial=False))
        if "autoattack" not in ns.skip:
            ckpt = untrained_checkpoint(ns.aa_model, tmp) if ns.aa_untrained else \
                make_checkpoint(ns.aa_model, tmp, adversarial=True)
            results.append(bench_autoattack(ns, ckpt))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for r in results:
        # validate.py reports 4 decimals: identical means identical as reported, in every run
        same = len({round(v, 4) for v in r["robust_top1"][r["cli"]] + r["robust_top1"][r["reference"]]}) == 1
        r["identical_robust_accuracy"] = same
        if "speedup_over_unfolded" in r:
            print(f"--fold-bn: {r['speedup_over_unfolded']:.3f}x faster than validate.py without it (rounds "
                  f"{'..'.join(f'{v:.3f}' for v in r['speedup_spread'])}); robust top1 "
                  f"{r['robust_top1'][r['cli']][-1]:.2f} folded / {r['robust_top1_unfolded'][-1]:.2f} unfolded")
        rows.append([r["title"], r["cli_s"], r["reference_s"], r["ratio"], r["ratio_other_clock"],
                     "..".join(f"{v:.3f}" for v in r["ratio_spread"]),
                     f"{r['robust_top1'][r['cli']][-1]:.2f} / {r['robust_top1'][r['reference']][-1]:.2f}"
                     + (" (identical in every run)" if same else "")])
    bc.print_table(f"validate.py vs reference, {torch.get_num_threads()} threads, {ns.clock} clock",
                   ["evaluation", "validate.py s", "reference s", "ratio", "other clock", "min..max over rounds",
                    "robust top1 cli / reference"], rows)
    payload = {"benchmark": "eval_overhead", "command": bc.command_line(),
               "machine": bc.machine_info(torch.device("cpu")), "options": vars(ns), "results": results}
    bc.write_json(ns.json, f"eval_overhead-{ns.pgd_model}-{ns.aa_model}.json", payload)
    return 0


if __name__ == "__main__":
    sys.exit(bc.run_cli(main))
