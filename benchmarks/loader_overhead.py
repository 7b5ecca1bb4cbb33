#!/usr/bin/env python3
"""Is train.py's data pipeline on the critical path for a real (JPEG image-folder) dataset?

Setup (untimed): an image folder of ``--images`` JPEG files of ``--disk-size`` px (smooth random
pictures, 10 classes) in the ImageNet layout, read by train.py's own code: ``src.data.create_dataset``
(the strict image-folder reader) with the paper's training transform (``src.data.build_train_transform``:
RandomResizedCrop to ``--input-size`` with random interpolation, horizontal flip, color jitter 0.4,
ToTensor) and ``src.data.create_loader``.

Timed, interleaved in one process:

* ``loader batch``: one batch decoded and augmented in the main process (``--workers 0``): the work a
  loader worker has to finish per training step;
* ``step``: the training step on one batch held in memory (PGD-k, efficient mode: ``AdvTrainingLoss``,
  backward, SGD);
* end to end: ``--e2e-steps`` training steps fed by the loader with ``--e2e-workers`` worker processes
  (prefetching 2 batches each, train.py's default), counted from the second batch of an epoch, against
  the same number of steps on a batch held in memory. This is the time the pipeline adds when it runs
  next to the step: with fewer cores than threads + workers the workers take CPU from the step, which a
  GPU machine does not see. The epoch's first batch (workers starting, nothing prefetched yet) is
  reported on its own: a cost per epoch, not per step.

The loader is off the critical path when one worker finishes a batch faster than a step takes
(``loader / step < 1``; ``ceil(loader / step)`` workers keep up in any case).

    python benchmarks/loader_overhead.py --model resnet18 --input-size 224 --batch-size 32 --attack-steps 2
"""
from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import time
from types import SimpleNamespace
from typing import Callable, Dict, List

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

import bench_common as bc
from adv_step_cost import attack_cfg, loss_step
from src.attacks import AdvTrainingLoss

PAPER_TRAIN_AUG = SimpleNamespace(no_aug=False, rand_crop=False, pad=0, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                                  train_interpolation="random", hflip=0.5, vflip=0.0, aa=None, color_jitter=0.4,
                                  rand_rotation=0)


def make_folder(root: str, n: int, size: int, classes: int = 10, seed: int = 0) -> str:
    """``root/train/<class>/<i>.jpg``: smooth random pictures (bicubic upsampling of 8x8 noise, plus grain)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = os.path.join(root, "train", f"c{i % classes}")
        os.makedirs(folder, exist_ok=True)
        small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        img = np.asarray(small.resize((size, size), Image.BICUBIC), dtype=np.int16)
        img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(folder, f"{i}.jpg"), quality=90)
    return root


def folder_loader(root: str, input_size: int, batch_size: int, workers: int):
    from src.data import build_train_transform, create_dataset, create_loader, set_transform

    ds = create_dataset("", root, "train", is_training=True, batch_size=batch_size)
    set_transform(ds, build_train_transform(PAPER_TRAIN_AUG, {"input_size": (3, input_size, input_size)}))
    return create_loader(ds, batch_size, is_training=True, workers=workers)


def cycling(loader) -> Callable[[], tuple]:
    it = [iter(loader)]

    def run():
        try:
            return next(it[0])
        except StopIteration:
            it[0] = iter(loader)
            return next(it[0])
    return run


def end_to_end(step_on: Callable[[torch.Tensor, torch.Tensor], None], loader, x, y, steps: int,
               rounds: int) -> Dict[str, List[float]]:
    """Wall seconds of ``steps`` loader-fed steps and of ``steps`` in-memory steps, per round (alternating)."""
    out: Dict[str, List[float]] = {"loader-fed": [], "in memory": [], "first batch": []}
    for r in range(rounds):
        for name in (("loader-fed", "in memory") if r % 2 == 0 else ("in memory", "loader-fed")):
            if name == "loader-fed":
                t0 = time.perf_counter()
                it = iter(loader)  # a new epoch: the workers start and prefetch, as at every epoch start
                xb, yb = next(it)
                out["first batch"].append(time.perf_counter() - t0)
                step_on(xb, yb)  # untimed: from here on the workers work ahead of the step
                t0 = time.perf_counter()
                for _ in range(steps):
                    xb, yb = next(it)
                    step_on(xb, yb)
                out[name].append(time.perf_counter() - t0)
                del it
            else:
                t0 = time.perf_counter()
                for _ in range(steps):
                    step_on(x, y)
                out[name].append(time.perf_counter() - t0)
    return out


def main(argv=None) -> int:
    p = bc.cli_parser(__doc__, __file__)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--input-size", type=bc.COUNT, default=224)
    p.add_argument("--disk-size", type=bc.COUNT, default=320, help="side of the JPEG files on disk (px)")
    p.add_argument("--images", type=bc.COUNT, default=256)
    p.add_argument("--batch-size", type=bc.COUNT, default=32)
    p.add_argument("--attack-steps", type=bc.ATTACK_STEPS, default=2)
    p.add_argument("--e2e-steps", type=bc.STEPS, default=4, help="steps per end-to-end round (0: skip that part)")
    p.add_argument("--e2e-workers", type=bc.STEPS, default=1)
    bc.add_common_args(p, rounds=3, reps=2, warmup=1, device=False)
    ns = p.parse_args(argv)
    if ns.images < ns.batch_size * max(1, ns.e2e_steps):
        raise SystemExit(f"error: --images must be at least --batch-size x --e2e-steps "
                         f"({ns.batch_size * max(1, ns.e2e_steps)})")
    torch.set_num_threads(ns.threads)
    tmp = tempfile.mkdtemp(prefix="bench-loader-")
    try:
        make_folder(tmp, ns.images, ns.disk_size)
        torch.manual_seed(0)
        model = bc.create_model(ns.model, num_classes=10, img_size=ns.input_size)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        loss = AdvTrainingLoss(attack_cfg(ns.attack_steps), nn.CrossEntropyLoss(), clean_logits="skip")
        x, y = cycling(folder_loader(tmp, ns.input_size, ns.batch_size, 0))()
        step_name = f"step (PGD-{ns.attack_steps} efficient, batch in memory)"
        fns = {"loader batch (decode + augment, main process)": cycling(folder_loader(tmp, ns.input_size,
                                                                                     ns.batch_size, 0)),
               step_name: loss_step(model, loss, opt, x, y)}
        t = bc.interleaved(fns, ns.rounds, ns.reps, ns.warmup)
        samples = t.cpu if ns.clock == "cpu" else t.wall
        load_s = bc.median(samples["loader batch (decode + augment, main process)"])
        step_s = bc.median(samples[step_name])
        rows = [["loader batch (decode + augment, main process)", 1000 * load_s, load_s / step_s],
                [step_name, 1000 * step_s, 1.0]]
        bc.print_table(f"{ns.model} at {ns.input_size} px, batch {ns.batch_size}, {ns.images} JPEGs of "
                       f"{ns.disk_size} px, {torch.get_num_threads()} threads, {ns.clock} clock",
                       ["part", "ms per batch", "x step"], rows)
        print(f"one loader worker needs {load_s / step_s:.3f} of a step per batch: "
              f"{math.ceil(load_s / step_s)} worker(s) keep up")
        e2e = None
        if ns.e2e_steps > 0:
            def step_on(xb, yb):
                loss_step(model, loss, opt, xb, yb)()

            step_on(x, y)
            e2e = end_to_end(step_on, folder_loader(tmp, ns.input_size, ns.batch_size, ns.e2e_workers), x, y,
                             ns.e2e_steps, ns.rounds)
            fed, mem = np.median(e2e["loader-fed"]), np.median(e2e["in memory"])
            per_round = [a / b for a, b in zip(e2e["loader-fed"], e2e["in memory"])]
            print(f"end to end, {ns.e2e_steps} steps after the first, {ns.e2e_workers} worker(s), "
                  f"{torch.get_num_threads()} threads on {os.cpu_count()} cores: loader-fed {fed:.2f} s, in memory "
                  f"{mem:.2f} s, ratio {fed / mem:.3f} (rounds {min(per_round):.3f}..{max(per_round):.3f}); an "
                  f"epoch's first batch (workers starting, nothing prefetched) took "
                  f"{np.median(e2e['first batch']):.2f} s")
        payload = {"benchmark": "loader_overhead", "command": bc.command_line(),
                   "machine": bc.machine_info(torch.device("cpu")), "options": vars(ns),
                   "loader_batch_s": load_s, "step_s": step_s, "loader_over_step": load_s / step_s,
                   "workers_to_keep_up": math.ceil(load_s / step_s), "end_to_end_s": e2e,
                   "wall_s": t.wall, "cpu_s": t.cpu}
        bc.write_json(ns.json, f"loader_overhead-{ns.model}-{ns.input_size}.json", payload)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(bc.run_cli(main))
