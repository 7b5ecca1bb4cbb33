#!/usr/bin/env python3
"""Peak memory of a training step: clean, PGD-k faithful and efficient, TRADES-k.

The faithful mode (``--adv-clean-logits train``) keeps the clean forward's graph alive until
backward, so its peak activation memory should be about twice the efficient mode's (``skip``).

A peak resident set size cannot be reset inside a process, so every variant runs in a fresh
child process (this script with ``--child``): it builds the model, optimizer and batch, records
its resident set size (the baseline), runs ``--iters`` steps and reports the peak (``ru_maxrss``)
and, on CUDA, ``torch.cuda.max_memory_allocated`` above the allocated baseline. The table gives the
peak, the step's own memory (peak minus baseline) and that as a multiple of the clean step's.

    python benchmarks/memory.py --model resnet18 --steps 2 --batch-size 64
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Dict, List

import torch
import torch.nn as nn

import bench_common as bc
from adv_step_cost import attack_cfg, loss_step
from src.attacks import AdvTrainingLoss, TRADESLoss
from src.setup_task import CleanTrainingLoss

MiB = 2 ** 20


def child(ns: argparse.Namespace) -> Dict:
    """Run one variant and measure it (in the child process)."""
    torch.set_num_threads(ns.threads)
    device = bc.resolve_device(ns.device)
    torch.manual_seed(0)
    model = bc.create_model(ns.model, img_size=ns.img_size).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    x = torch.rand(ns.batch_size, 3, ns.img_size, ns.img_size, device=device)
    y = torch.randint(0, 10, (ns.batch_size,), device=device)
    ce = nn.CrossEntropyLoss()
    kind, k = ns.child.split(":")
    k = int(k)
    if kind == "clean":
        loss_fn: nn.Module = CleanTrainingLoss(ce)
    elif kind == "trades":
        loss_fn = TRADESLoss(attack_cfg(k), ce, 6.0)
    else:
        loss_fn = AdvTrainingLoss(attack_cfg(k), ce, clean_logits=kind)
    step = loss_step(model, loss_fn, opt, x, y)
    base_rss = bc.current_rss_bytes()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base_cuda = torch.cuda.memory_allocated(device)
    for _ in range(ns.iters):
        step()
    out = {"baseline_rss_mib": base_rss / MiB, "peak_rss_mib": bc.peak_rss_bytes() / MiB}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        out["cuda_baseline_mib"] = base_cuda / MiB
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / MiB
    return out


def variants(steps: List[int], trades_steps: List[int]) -> Dict[str, str]:
    out = {"clean": "clean:0"}
    for k in steps:
        out[f"pgd-{k} faithful"] = f"train:{k}"
        out[f"pgd-{k} efficient"] = f"skip:{k}"
    for k in trades_steps:
        out[f"trades-{k}"] = f"trades:{k}"
    return out


def main(argv=None) -> int:
    p = bc.cli_parser(__doc__, __file__)
    p.add_argument("--model", default="resnet18", help=f"timm name or preset {sorted(bc.MODEL_PRESETS)}")
    p.add_argument("--img-size", type=bc.COUNT, default=32)
    p.add_argument("--batch-size", type=bc.COUNT, default=64)
    p.add_argument("--steps", type=bc.ATTACK_STEPS, nargs="+", default=[2], help="PGD steps k")
    p.add_argument("--trades-steps", type=bc.ATTACK_STEPS, nargs="*", default=[10])
    p.add_argument("--iters", type=bc.COUNT, default=3, help="steps per child")
    p.add_argument("--threads", type=bc.COUNT, default=2)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--json", default=None, metavar="PATH")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.child:
        print(json.dumps(child(ns)))
        return 0
    torch.set_num_threads(ns.threads)  # the children's setting, so that the machine facts say it
    passthrough = ["--model", ns.model, "--img-size", str(ns.img_size), "--batch-size", str(ns.batch_size),
                   "--iters", str(ns.iters), "--threads", str(ns.threads)]
    if ns.device:
        passthrough += ["--device", ns.device]
    results = {}
    for name, spec in variants(ns.steps, ns.trades_steps).items():
        proc = subprocess.run([sys.executable, __file__, "--child", spec] + passthrough, capture_output=True,
                              text=True)
        if proc.returncode == 2:  # bad input (an unknown model, a size it cannot take): the child's one error line
            errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
            if errors:
                raise bc.UsageError(errors[-1][len("error: "):])
        if proc.returncode != 0:
            raise SystemExit(f"error: the {name} child failed:\n{proc.stderr.strip()[-2000:]}")
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    clean = results["clean"]
    clean_step = clean["peak_rss_mib"] - clean["baseline_rss_mib"]
    rows = []
    for name, r in results.items():
        r["step_rss_mib"] = r["peak_rss_mib"] - r["baseline_rss_mib"]
        r["step_rss_x_clean"] = r["step_rss_mib"] / clean_step if clean_step > 0 else float("nan")
        if "cuda_peak_mib" in r:
            r["cuda_step_mib"] = r["cuda_peak_mib"] - r["cuda_baseline_mib"]
            r["cuda_step_x_clean"] = r["cuda_step_mib"] / (clean["cuda_peak_mib"] - clean["cuda_baseline_mib"])
        rows.append([name, r["peak_rss_mib"], r["step_rss_mib"], r["step_rss_x_clean"],
                     r.get("cuda_step_mib", "-"), r.get("cuda_step_x_clean", "-")])
    device = bc.resolve_device(ns.device)
    bc.print_table(f"peak memory per training step, {ns.model} {ns.img_size}px batch {ns.batch_size} ({device})",
                   ["variant", "peak RSS MiB", "step RSS MiB", "x clean", "CUDA step MiB", "x clean"], rows)
    payload = {"benchmark": "memory", "command": bc.command_line(), "machine": bc.machine_info(device),
               "options": vars(ns), "results": results}
    bc.write_json(ns.json, f"memory-{ns.model}.json", payload)
    return 0


if __name__ == "__main__":
    sys.exit(bc.run_cli(main))
