#!/usr/bin/env python3
"""Our PGD-k adversarial training step against the same step built on torchattacks' PGD.

Variants, interleaved in one process on one model and batch:

* ``ours efficient``: :class:`src.attacks.AdvTrainingLoss` with ``clean_logits='skip'`` (train.py
  ``--adv-clean-logits skip``), then backward and SGD;
* ``ours faithful``: the same with ``clean_logits='train'`` (the original's extra clean forward);
* ``torchattacks``: ``torchattacks.PGD`` (eval-mode attack, its default) crafts the examples, then
  a train-mode forward, cross-entropy, backward and SGD;
* with ``--channels-last``: ``ours efficient`` with train.py's ``--channels-last`` (float32);
* with ``--bf16``: ``ours efficient`` with train.py's ``--amp --amp-dtype bfloat16 --channels-last``
  (the project's ``DeviceEnv``: a channels-last copy of the model and batch, the loss under its
  autocast; the attack's loss and projection stay float32), the fast path the peer lacks.

Also reported: the mean cross-entropy of each attack's examples on the eval-mode model, so that a
faster variant is not faster because it attacks less.

torchattacks is not a dependency of the project (its ``requests`` pin conflicts with ours); install
it for the benchmark only, into ``benchmarks/.peer`` (git-ignored):

    pip install --no-deps --target benchmarks/.peer torchattacks==3.5.1
    python benchmarks/peer_torchattacks.py --model resnet18 --steps 1 2 --batch-size 64
"""
from __future__ import annotations

import argparse
import copy
import sys
from typing import Callable, Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

import bench_common as bc
from adv_step_cost import attack_cfg, loss_step
from src.attacks import AdvTrainingLoss
from src.bits.device import DeviceEnv

EPS = 8 / 255
FAST = "ours efficient, --amp --amp-dtype bfloat16 --channels-last"
CL = "ours efficient, --channels-last"


def import_torchattacks():
    """torchattacks from benchmarks/.peer (appended to sys.path: it must not shadow installed packages)."""
    if str(bc.PEER_DIR) not in sys.path:
        sys.path.append(str(bc.PEER_DIR))
    try:
        import torchattacks
    except ImportError:
        raise SystemExit(f"error: torchattacks is not installed; run: pip install --no-deps --target "
                         f"{bc.PEER_DIR} torchattacks==3.5.1") from None
    return torchattacks


def peer_step(model: nn.Module, atk, opt: torch.optim.Optimizer, x, y) -> Callable[[], None]:
    def run() -> None:
        model.train()
        x_adv = atk(x, y)
        loss = F.cross_entropy(model(x_adv), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return run


def autocast_step(step: Callable[[], None], dev_env) -> Callable[[], None]:
    def run() -> None:
        with dev_env.autocast():
            step()
    return run


def attack_strength(model: nn.Module, attacks: Dict[str, Callable], x, y) -> Dict[str, float]:
    """Mean cross-entropy of each attack's examples on the eval-mode model (clean for reference)."""
    model.eval()
    out = {}
    with torch.no_grad():
        out["clean"] = float(F.cross_entropy(model(x), y))
    for name, attack in attacks.items():
        torch.manual_seed(1)
        x_adv = attack(x, y)
        model.eval()
        with torch.no_grad():
            out[name] = float(F.cross_entropy(model(x_adv), y))
    return out


def bench_steps(ns: argparse.Namespace, k: int, device: torch.device, torchattacks) -> Dict:
    torch.manual_seed(0)
    model = bc.create_model(ns.model, img_size=ns.img_size).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    x = torch.rand(ns.batch_size, 3, ns.img_size, ns.img_size, device=device)
    y = torch.randint(0, 10, (ns.batch_size,), device=device)
    ce = nn.CrossEntropyLoss()
    ours = AdvTrainingLoss(attack_cfg(k), ce, clean_logits="skip")
    atk = torchattacks.PGD(model, eps=EPS, alpha=1.5 * EPS / k, steps=k, random_start=True)
    fns = {"ours efficient": loss_step(model, ours, opt, x, y),
           "ours faithful": loss_step(model, AdvTrainingLoss(attack_cfg(k), ce, clean_logits="train"), opt, x, y),
           "torchattacks": peer_step(model, atk, opt, x, y)}
    fast_paths = {}  # variant name -> (DeviceEnv, model copy): train.py's fast-path flags
    if ns.channels_last:
        fast_paths[CL] = DeviceEnv(device, channels_last=True)
    if ns.bf16:
        fast_paths[FAST] = DeviceEnv(device, amp=True, amp_dtype=torch.bfloat16, channels_last=True)
    for name, env in list(fast_paths.items()):
        net = env.to_model_device(copy.deepcopy(model))
        net_opt = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.9)
        fns[name] = autocast_step(loss_step(net, ours, net_opt, env.to_device(x), y), env)
        fast_paths[name] = (env, net)
    timings = bc.interleaved(fns, ns.rounds, ns.reps, ns.warmup, device)
    samples, other = (timings.cpu, timings.wall) if ns.clock == "cpu" else (timings.wall, timings.cpu)
    peer = bc.median(samples["torchattacks"])
    rows = [dict(variant=n, seconds=bc.median(samples[n]), peer_over_this=peer / bc.median(samples[n]),
                 peer_over_this_other_clock=bc.median(other["torchattacks"]) / bc.median(other[n]),
                 spread=[1 / v for v in bc.ratio_spread(samples[n], samples["torchattacks"])][::-1])
            for n in fns]

    def ours_attack(xx, yy):
        model.eval()
        return ours.attack(model, xx, yy, 10)

    def fast_attack(env, net):
        def run(xx, yy):
            net.load_state_dict(model.state_dict())  # the same weights, crafted on the fast path
            net.eval()
            with env.autocast():
                return ours.attack(net, env.to_device(xx), yy, 10).contiguous()
        return run

    attacks = {"ours": ours_attack, "torchattacks": atk}
    attacks.update({name: fast_attack(env, net) for name, (env, net) in fast_paths.items()})
    strength = attack_strength(model, attacks, x, y)
    return {"k": k, "rows": rows, "attack_mean_ce": strength, "wall_s": timings.wall, "cpu_s": timings.cpu}


def main(argv=None) -> int:
    p = bc.cli_parser(__doc__, __file__)
    p.add_argument("--model", default="resnet18", help=f"timm name or preset {sorted(bc.MODEL_PRESETS)}")
    p.add_argument("--img-size", type=bc.COUNT, default=32)
    p.add_argument("--batch-size", type=bc.COUNT, default=64)
    p.add_argument("--steps", type=bc.ATTACK_STEPS, nargs="+", default=[1, 2], help="PGD steps k")
    p.add_argument("--channels-last", action="store_true", help="add the variant with train.py's --channels-last")
    p.add_argument("--bf16", action="store_true", help="add the variant with train.py's --amp --amp-dtype bfloat16 --channels-last")
    bc.add_common_args(p, rounds=3, reps=3, warmup=1)
    ns = p.parse_args(argv)
    torch.set_num_threads(ns.threads)
    device = bc.resolve_device(ns.device)
    torchattacks = import_torchattacks()
    results = [bench_steps(ns, k, device, torchattacks) for k in ns.steps]
    for r in results:
        bc.print_table(f"PGD-{r['k']} training step, {ns.model} {ns.img_size}px batch {ns.batch_size}, "
                       f"{torch.get_num_threads()} threads, {ns.clock} clock (speed-up = torchattacks time / time)",
                       ["variant", "s/step", "speed-up vs torchattacks", "other clock", "min..max over rounds"],
                       [[row["variant"], row["seconds"], row["peer_over_this"], row["peer_over_this_other_clock"],
                         "..".join(f"{v:.3f}" for v in row["spread"])] for row in r["rows"]])
        print("mean CE of the crafted examples: " + ", ".join(f"{k} {v:.4f}" for k, v in r["attack_mean_ce"].items()))
    machine = dict(bc.machine_info(device), torchattacks=torchattacks.__version__)
    payload = {"benchmark": "peer_torchattacks", "command": bc.command_line(), "machine": machine,
               "options": vars(ns), "results": results}
    bc.write_json(ns.json, f"peer_torchattacks-{ns.model}.json", payload)
    return 0


if __name__ == "__main__":
    sys.exit(bc.run_cli(main))
