#!/usr/bin/env python3
"""Is ``torch.compile`` worth a flag? Eager against compiled, side by side, with matching results.

For each model: the same weights eager and ``torch.compile``-d (default mode), timed interleaved on
one batch, for a clean training step and a PGD-k efficient adversarial step (``AdvTrainingLoss``
with ``clean_logits='skip'``: eval-mode input-gradient steps, then a train-mode step), optionally
under train.py's ``--amp --amp-dtype bfloat16 --channels-last``. The compile time (first calls,
every graph the step needs) is reported apart, and so is the agreement: the largest difference of
the loss and of the updated weights after one identical step from identical weights, and whether
PGD crafted through the compiled model moves the same pixels the same way.

    python benchmarks/compile_check.py --models resnet18 xcit_nano_12_p4_32 --batch-size 32 --rounds 3
"""
from __future__ import annotations

import argparse
import copy
import time
from typing import Any, Dict, List

import torch
import torch.nn as nn

import bench_common as bc
from adv_step_cost import attack_cfg, loss_step
from src.attacks import AdvTrainingLoss
from src.setup_task import CleanTrainingLoss
from src.bits.device import DeviceEnv


def _step_fns(model: nn.Module, dev_env: DeviceEnv, k: int, x, y) -> Dict[str, Any]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    ce = nn.CrossEntropyLoss()
    clean = loss_step(model, CleanTrainingLoss(ce), opt, x, y)
    adv = loss_step(model, AdvTrainingLoss(attack_cfg(k), ce, clean_logits="skip"), opt, x, y)

    def under(fn):
        def run():
            with dev_env.autocast():
                fn()
        return run

    return {"clean": under(clean), f"pgd-{k}": under(adv)}


def _agreement(eager: nn.Module, compiled_of, dev_env: DeviceEnv, k: int, x, y) -> Dict[str, float]:
    """One identical PGD-k step from identical weights, eager vs compiled: loss and weight differences,
    and the fraction of pixels whose perturbation has the same sign."""
    a = copy.deepcopy(eager)
    b = copy.deepcopy(eager)
    cb = compiled_of(b)
    ce = nn.CrossEntropyLoss()
    out = {}
    losses, deltas = [], []
    for model, net in ((a, a), (cb, b)):
        loss_fn = AdvTrainingLoss(attack_cfg(k), ce, clean_logits="skip")
        opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
        torch.manual_seed(5)
        with dev_env.autocast():
            loss, _, _ = loss_fn(model, x, y, 10)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        model.eval()
        torch.manual_seed(6)
        with dev_env.autocast():
            deltas.append((loss_fn.attack(model, x, y, 10) - x).sign())
    out["loss_abs_diff"] = abs(losses[0] - losses[1])
    out["loss_eager"] = losses[0]
    out["weight_max_abs_diff"] = max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters()))
    out["pgd_same_sign_fraction"] = float((deltas[0] == deltas[1]).float().mean())
    return out


def bench_model(ns: argparse.Namespace, name: str, device: torch.device) -> Dict[str, Any]:
    dev_env = DeviceEnv(device, amp=ns.bf16, amp_dtype=torch.bfloat16, channels_last=ns.bf16)
    torch.manual_seed(0)
    base = dev_env.to_model_device(bc.create_model(name, img_size=ns.img_size))
    x = dev_env.to_device(torch.rand(ns.batch_size, 3, ns.img_size, ns.img_size))
    y = torch.randint(0, 10, (ns.batch_size,), device=device)
    eager = copy.deepcopy(base)
    net = copy.deepcopy(base)
    compiled = torch.compile(net, backend=ns.backend)

    fns_e = _step_fns(eager, dev_env, ns.k, x, y)
    fns_c = _step_fns(compiled, dev_env, ns.k, x, y)
    compile_s = {}
    for key, fn in fns_c.items():  # the first calls compile every graph the step needs
        t = time.perf_counter()
        fn()
        fn()
        compile_s[key] = time.perf_counter() - t
    fns = {}
    for key in fns_e:
        fns[f"{key} eager"] = fns_e[key]
        fns[f"{key} compiled"] = fns_c[key]
    timings = bc.interleaved(fns, ns.rounds, ns.reps, ns.warmup, device)
    samples = timings.cpu if ns.clock == "cpu" else timings.wall
    rows = []
    for key in fns_e:
        e, c = bc.median(samples[f"{key} eager"]), bc.median(samples[f"{key} compiled"])
        spread = bc.ratio_spread(samples[f"{key} eager"], samples[f"{key} compiled"])
        rows.append(dict(step=key, eager_s=e, compiled_s=c, speedup=e / c, spread=spread,
                         compile_s=compile_s[key]))
    agree = _agreement(base, lambda m: torch.compile(m, backend=ns.backend), dev_env, ns.k, x, y)
    return {"model": name, "rows": rows, "agreement": agree, "wall_s": timings.wall, "cpu_s": timings.cpu}


def main(argv=None) -> int:
    p = bc.cli_parser(__doc__, __file__)
    p.add_argument("--models", nargs="+", default=["resnet18"], help=f"timm names or presets {sorted(bc.MODEL_PRESETS)}")
    p.add_argument("--img-size", type=bc.COUNT, default=32)
    p.add_argument("--batch-size", type=bc.COUNT, default=32)
    p.add_argument("--k", type=bc.ATTACK_STEPS, default=2, help="PGD steps of the adversarial step")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: a quick smoke run)")
    p.add_argument("--bf16", action="store_true", help="train.py's --amp --amp-dtype bfloat16 --channels-last")
    bc.add_common_args(p, rounds=3, reps=2, warmup=1)
    ns = p.parse_args(argv)
    bc.check_compile_backend("--backend", ns.backend)
    torch.set_num_threads(ns.threads)
    device = bc.resolve_device(ns.device)
    results: List[Dict[str, Any]] = [bench_model(ns, m, device) for m in ns.models]
    for r in results:
        bc.print_table(f"{r['model']} {ns.img_size}px batch {ns.batch_size}{' bf16+channels-last' if ns.bf16 else ''}, "
                       f"{torch.get_num_threads()} threads, {ns.clock} clock (speed-up = eager / compiled)",
                       ["step", "eager s", "compiled s", "speed-up", "min..max over rounds", "compile s"],
                       [[row["step"], row["eager_s"], row["compiled_s"], row["speedup"],
                         "..".join(f"{v:.3f}" for v in row["spread"]), row["compile_s"]]
                        for row in r["rows"]])
        a = r["agreement"]
        print(f"agreement after one PGD-{ns.k} step: |loss diff| {a['loss_abs_diff']:.2e} (loss {a['loss_eager']:.4f}), "
              f"max |weight diff| {a['weight_max_abs_diff']:.2e}, PGD perturbation same sign "
              f"{100 * a['pgd_same_sign_fraction']:.2f} %")
    payload = {"benchmark": "compile_check", "command": bc.command_line(), "machine": bc.machine_info(device),
               "args": vars(ns), "results": results}
    bc.write_json(ns.json, f"compile_check-{'-'.join(ns.models)}{'-bf16' if ns.bf16 else ''}.json", payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(bc.run_cli(main))
