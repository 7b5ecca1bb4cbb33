#!/usr/bin/env python3
"""Run a script on the XLA devices of a TPU VM: ``python launch_xla.py --num-devices 8 train.py [args...]``.

Works for train.py, validate.py, attack_effectiveness.py and attack_convergence.py (any script with an ``_mp_entry``).
torch_xla 2.x starts one replica per device itself (processes, or threads on TPU v2/v3 and on
PJRT's CPU backend) and accepts only "one device" or "every device": ``--num-devices 1`` runs in
this process; a larger count uses every device of the VM and each replica checks that there are
exactly that many. ``PJRT_DEVICE`` defaults to TPU; ``PJRT_DEVICE=CPU`` runs the same code on
one CPU device (the test lane; collectives between CPU devices hang in torch_xla 2.9). Needs
requirements-tpu.txt.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from types import ModuleType
from typing import List, Optional, Sequence


def _error(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are the project's one line (``error: ...``, exit 2), without the usage block."""

    def error(self, message: str):  # noqa: D401 - argparse API
        print(f"error: launch_xla.py: {message}", file=sys.stderr)
        sys.exit(2)


def load_script(path: str) -> ModuleType:
    """Import ``path`` as a module (its ``if __name__ == '__main__'`` block does not run)."""
    folder = os.path.dirname(os.path.abspath(path))
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location("_launched_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_replica(index: int, script: str, argv: List[str], num_devices: int) -> None:
    """What every replica runs: check the device count, import the script, call its ``_mp_entry``.

    A top-level function, so torch_xla can pickle it into the processes it spawns (the script
    module itself is not importable by name there).
    """
    from torch_xla import runtime as xr

    if xr.world_size() != num_devices:
        print(f"error: --num-devices {num_devices}, but this machine has {xr.world_size()} XLA devices; torch_xla "
              f"2.x runs on one device or on all of them: pass --num-devices 1 or {xr.world_size()}",
              file=sys.stderr)
        sys.exit(2)
    sys.argv = [script] + list(argv)
    load_script(script)._mp_entry(index)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = _Parser(prog="launch_xla.py", description=__doc__.splitlines()[0])
    p.add_argument("--num-devices", type=int, default=1,
                   help="XLA devices (replicas) to use, 1 or more; 8 on a TPU v3-8 VM (default: 1)")
    p.add_argument("script", help="train.py, validate.py, attack_effectiveness.py, attack_convergence.py (must define _mp_entry)")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments forwarded to the script")
    try:
        ns = p.parse_args(argv)
    except SystemExit as e:  # --help (0) or a parse error already printed (2)
        return e.code if isinstance(e.code, int) else 0
    if ns.num_devices < 1:
        return _error(f"--num-devices must be at least 1, got {ns.num_devices}")
    if os.path.isdir(ns.script):
        return _error(f"script {ns.script} is a folder; pass a script file such as train.py")
    if not os.path.isfile(ns.script):
        return _error(f"script {ns.script} does not exist")
    try:
        import torch_xla.distributed.xla_multiprocessing as xmp
    except ImportError as e:
        return _error(f"torch_xla cannot be imported ({e}); run launch_xla.py with the venv of "
                      "requirements-tpu.txt (see the README, 'TPU VMs')")
    try:
        script = load_script(ns.script)
    except Exception as e:  # noqa: BLE001 - the user's script: a syntax error, a failing import, unreadable
        first = (str(e).strip().splitlines() or [""])[0]
        return _error(f"cannot import {ns.script} ({type(e).__name__}: {first})")
    if not hasattr(script, "_mp_entry"):
        return _error(f"{ns.script} has no _mp_entry function; launch_xla.py runs train.py, validate.py, "
                      "attack_effectiveness.py and attack_convergence.py")
    os.environ.setdefault("PJRT_DEVICE", "TPU")
    if os.environ["PJRT_DEVICE"].upper() == "CPU":
        if ns.num_devices > 1:
            return _error("PJRT_DEVICE=CPU runs one device: torch_xla 2.9's collectives hang between CPU devices "
                          "(pytorch/xla issue #9089); use --num-devices 1, or torchrun for multi-process CPU runs")
        os.environ["CPU_NUM_DEVICES"] = "1"
    # nprocs: torch_xla 2.x accepts only 1 (this process, one device) or None (every visible device)
    try:
        xmp.spawn(run_replica, args=(ns.script, ns.script_args, ns.num_devices),
                  nprocs=1 if ns.num_devices == 1 else None)
    except SystemExit as e:  # a replica's exit status, passed on as ours
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
