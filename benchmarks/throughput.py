#!/usr/bin/env python3
"""Adversarial training throughput: images/s and the fraction of the device's matmul peak reached.

Issue 16 item 3, meant for a GPU: XCiT-S12 at 224 px under bfloat16 autocast, PGD-1 and PGD-2 in
the efficient mode, next to the clean step. Each variant is train.py's own epoch loop
(``src.engine.train_one_epoch``: the device's autocast, channels-last, the grad scaler under
float16, the non-finite guard) over ``--steps-per-call`` copies of one batch held on the device,
so the figures are what train.py reaches without its data pipeline. Reported per variant:

* seconds per optimizer step (median over interleaved rounds) and images per second;
* FLOPs per step, counted with ``torch.utils.flop_counter``'s formulas on one step (the matmuls
  and convolutions of every forward and backward, the attack's included; elementwise work is not
  counted, so this is a lower bound of the work done), and the achieved TFLOP/s;
* that rate as a fraction of (a) the measured peak, a large matmul in the same precision timed on
  the same device, and (b) the datasheet's dense peak where the device is in :data:`DATASHEET_TFLOPS`.

On a GPU (the issue's run):

    python benchmarks/throughput.py --device cuda --model xcit_small_12_p16_224 --img-size 224 \\
        --batch-size 128 --precision bf16 --steps 1 2

Quick CPU check (the tests run this):

    python benchmarks/throughput.py --device cpu --model test_vit --img-size 32 --batch-size 4 \\
        --precision fp32 --steps 1 --steps-per-call 1 --rounds 1 --reps 1 --warmup 0 --peak-size 256
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn

import bench_common as bc
from adv_step_cost import attack_cfg
from src.attacks import AdvTrainingLoss
from src.bits.device import DeviceEnv
from src.engine import EpochHooks, StepOptions, TrainParts, train_one_epoch
from src.setup_task import CleanTrainingLoss

# Dense (no sparsity) tensor-core peaks in TFLOP/s from the vendors' datasheets, SXM parts; a name
# not listed gets no datasheet fraction (the measured peak is always reported).
DATASHEET_TFLOPS = {
    "bf16": {"H200": 989.4, "H100 80GB HBM3": 989.4, "H100 SXM": 989.4, "A100": 312.0},
    "fp16": {"H200": 989.4, "H100 80GB HBM3": 989.4, "H100 SXM": 989.4, "A100": 312.0},
}
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def datasheet_peak(device: torch.device, precision: str) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in DATASHEET_TFLOPS.get(precision, {}).items():
        if key in name:
            return tflops
    return None


def measured_peak_tflops(device: torch.device, precision: str, size: int, reps: int = 5) -> float:
    """The rate of a size^3 matmul in the step's precision on this device (best of ``reps``)."""
    dtype = PRECISIONS[precision] or torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        bc.device_sync(device)
        t = time.perf_counter()
        a @ b
        bc.device_sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * size ** 3 / best / 1e12


def make_env(device: torch.device, precision: str, channels_last: bool) -> DeviceEnv:
    dtype = PRECISIONS[precision]
    if dtype is torch.float16 and device.type != "cuda":
        raise SystemExit("error: --precision fp16 needs a CUDA device (train.py refuses float16 on the CPU)")
    return DeviceEnv(device, amp=dtype is not None, amp_dtype=dtype or torch.bfloat16, channels_last=channels_last)


def epoch_call(env: DeviceEnv, model: nn.Module, loss_fn: nn.Module, x, y, steps: int) -> Callable[[], None]:
    """``steps`` optimizer steps of train.py's epoch loop on one device batch."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    parts = TrainParts(model, opt, loss_fn, grad_scaler=env.create_grad_scaler())
    loader = [(x, y)] * steps

    def run() -> None:
        train_one_epoch(10, parts, loader, env, StepOptions(), EpochHooks(log_interval=0))
    return run


def count_flops(fn: Callable[[], None]) -> int:
    """Matmul and convolution FLOPs of ``fn`` by torch's formulas (``flop_counter.flop_registry``).

    A dispatch mode of its own: ``FlopCounterMode``'s module tracker hooks break
    ``torch.autograd.grad`` on a leaf input, which every attack step is.
    """
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class Counter(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                Counter.total += int(formula(*args, **kwargs, out_val=out))
            return out

    with Counter():
        fn()
    return Counter.total


def main(argv=None) -> int:
    p = bc.cli_parser(__doc__, __file__)
    p.add_argument("--model", default="xcit_small_12_p16_224", help=f"timm name or preset {sorted(bc.MODEL_PRESETS)}")
    p.add_argument("--img-size", type=bc.COUNT, default=224)
    p.add_argument("--batch-size", type=bc.COUNT, default=128)
    p.add_argument("--num-classes", type=bc.COUNT, default=1000)
    p.add_argument("--steps", type=bc.ATTACK_STEPS, nargs="+", default=[1, 2], help="PGD steps k (efficient mode)")
    p.add_argument("--precision", default="bf16", choices=sorted(PRECISIONS),
                   help="bf16 / fp16: train.py's --amp --amp-dtype bfloat16 / float16 (fp16 with its grad scaler)")
    p.add_argument("--no-channels-last", action="store_true", help="without train.py's --channels-last")
    p.add_argument("--steps-per-call", type=bc.COUNT, default=5, help="optimizer steps per timed call")
    p.add_argument("--peak-size", type=bc.COUNT, default=8192, help="matmul size of the measured peak")
    bc.add_common_args(p, rounds=3, reps=1, warmup=1, clock=False)
    ns = p.parse_args(argv)
    logging.getLogger("robust_vits").setLevel(logging.WARNING)  # the epoch loop's info lines
    torch.set_num_threads(ns.threads)
    device = bc.resolve_device(ns.device)
    env = make_env(device, ns.precision, not ns.no_channels_last)
    torch.manual_seed(0)
    model = env.to_model_device(bc.create_model(ns.model, num_classes=ns.num_classes, img_size=ns.img_size))
    x = torch.rand(ns.batch_size, 3, ns.img_size, ns.img_size)
    y = torch.randint(0, ns.num_classes, (ns.batch_size,))
    x, y = env.to_device(x, y)
    ce = nn.CrossEntropyLoss()
    losses = {"clean": CleanTrainingLoss(ce)}
    losses.update({f"PGD-{k} efficient": AdvTrainingLoss(attack_cfg(k), ce, clean_logits="skip") for k in ns.steps})
    calls = {n: epoch_call(env, model, fn, x, y, ns.steps_per_call) for n, fn in losses.items()}
    flops = {n: count_flops(epoch_call(env, model, fn, x, y, 1)) for n, fn in losses.items()}
    timings = bc.interleaved(calls, ns.rounds, ns.reps, ns.warmup, device)
    peak = measured_peak_tflops(device, ns.precision, ns.peak_size)
    sheet = datasheet_peak(device, ns.precision)
    rows = []
    for n in calls:
        s = bc.median(timings.wall[n]) / ns.steps_per_call
        tflops = flops[n] / s / 1e12
        rows.append(dict(variant=n, seconds_per_step=s, images_per_s=ns.batch_size / s, flops_per_step=flops[n],
                         tflops=tflops, fraction_of_measured_peak=tflops / peak,
                         fraction_of_datasheet_peak=(tflops / sheet) if sheet else None))
    bc.print_table(f"{ns.model} {ns.img_size}px batch {ns.batch_size}, {ns.precision}"
                   f"{'' if ns.no_channels_last else ' channels-last'}, {device}; measured matmul peak "
                   f"{peak:.1f} TFLOP/s, datasheet {sheet if sheet else 'n/a'}",
                   ["variant", "s/step", "images/s", "GFLOP/step", "TFLOP/s", "of measured peak", "of datasheet"],
                   [[r["variant"], r["seconds_per_step"], r["images_per_s"], r["flops_per_step"] / 1e9, r["tflops"],
                     r["fraction_of_measured_peak"],
                     "n/a" if r["fraction_of_datasheet_peak"] is None else r["fraction_of_datasheet_peak"]]
                    for r in rows])
    payload = {"benchmark": "throughput", "command": bc.command_line(), "machine": bc.machine_info(device),
               "options": vars(ns), "measured_peak_tflops": peak, "datasheet_peak_tflops": sheet, "rows": rows,
               "wall_s": timings.wall}
    bc.write_json(ns.json, f"throughput-{ns.model}-{ns.precision}-{device.type}.json", payload)
    return 0


if __name__ == "__main__":
    sys.exit(bc.run_cli(main))
