#!/usr/bin/env python3
"""Run a script on every core of a TPU VM: ``python launch_xla.py --num-devices 8 train.py [args...]``.

Imports the script as a module, sets ``sys.argv`` to the forwarded arguments and spawns its
``_mp_entry`` on each device with torch_xla (requirements-tpu.txt, in its own venv).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-devices", type=int, default=1, help="processes to spawn (TPU cores)")
    p.add_argument("script", help="train.py, validate.py, ... (must define _mp_entry)")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments forwarded to the script")
    ns = p.parse_args(argv)
    if not os.path.isfile(ns.script):
        print(f"error: script {ns.script} does not exist", file=sys.stderr)
        return 2
    try:
        import torch_xla.distributed.xla_multiprocessing as xmp
    except ImportError:
        print("error: torch_xla is not installed; use the TPU venv (requirements-tpu.txt)", file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location("_launched", ns.script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "_mp_entry"):
        print(f"error: {ns.script} has no _mp_entry function", file=sys.stderr)
        return 2
    sys.argv = [ns.script] + ns.script_args
    os.environ.setdefault("PJRT_DEVICE", "TPU")
    xmp.spawn(module._mp_entry, args=(), nprocs=ns.num_devices if ns.num_devices > 1 else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
