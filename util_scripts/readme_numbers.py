#!/usr/bin/env python3
"""Measure the README's demo and validate-example numbers and write them into README.md.

The README quotes what ``make demo`` and the Evaluation section's first ``validate.py`` command
print. Those numbers depend on the CPU (its floating-point kernels change the sums' rounding, so a
few examples near the decision boundary flip), so they are measured here, on the machine that runs
this script, and written between ``<!-- readme-numbers:NAME -->`` / ``<!-- /readme-numbers:NAME -->``
markers together with the machine and the date, instead of being typed in by hand.

Usage: ``.venv/bin/python util_scripts/readme_numbers.py [--readme README.md]`` (a few minutes on a
2-core CPU: it trains the quickstart into a temporary folder and evaluates its best checkpoint).
"""
import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Mapping, NoReturn, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CMD = ["train.py", "-c", "configs/quickstart.yaml"]
VALIDATE_ARGS = ["--dataset", "digits", "-b", "100", "-j", "0", "--attack", "pgd", "--attack-eps", "32",
                 "--attack-steps", "2", "20"]
_FINAL_RE = re.compile(r"final eval: top1 ([0-9.]+)\s+robust_top1 ([0-9.]+)")
_NOT_CONVERGED_RE = re.compile(r"\(([0-9.]+) > ([0-9.]+) points\): the attack has not converged")


def replace_block(text: str, name: str, body: str) -> str:
    """Replace what lies between the ``name`` markers with ``body`` (markers kept).

    Raises ValueError unless the README has exactly one such pair, in order, so a damaged README is
    never rewritten silently."""
    start, end = f"<!-- readme-numbers:{name} -->", f"<!-- /readme-numbers:{name} -->"
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ValueError(f"README needs exactly one '{start}' followed by one '{end}'")
    head, rest = text.split(start)
    _, tail = rest.split(end)
    return f"{head}{start}\n{body.strip()}\n{end}{tail}"


def machine() -> str:
    """CPU model (from /proc/cpuinfo) and the thread count torch uses, for the README's caveat."""
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import torch
    return f"{cpu}, {torch.get_num_threads()} threads"


def _run(args: Sequence[str]) -> Tuple[str, float]:
    """Run a project CLI with this interpreter from the repository root; stdout and seconds."""
    t0 = time.monotonic()
    env = dict(os.environ, WANDB_MODE="offline")
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"error: {' '.join(args)} failed with exit code {proc.returncode}")
    return proc.stdout + proc.stderr, time.monotonic() - t0


def demo_block(top1: float, robust: float, train_s: float, where: str, date: str) -> str:
    return (f"Measured with `util_scripts/readme_numbers.py` on {where}, {date}; the demo ends with\n"
            f"`final eval: top1 {top1:.2f}  robust_top1 {robust:.2f} ...`:\n\n"
            "| run | clean top-1 | PGD-2 robust top-1 (eps 32/255, per-epoch eval) | wall time |\n"
            "|---|---|---|---|\n"
            f"| `configs/quickstart.yaml` (5 epochs, PGD-2 training) | {top1:.2f} % | {robust:.2f} % | "
            f"{train_s:.0f} s for `train.py` |")


def validate_block(rows: Sequence[Mapping], n: int, val_s: float, where: str, date: str) -> str:
    by_steps = {int(r["attack_steps"]): r for r in rows}
    clean, pgd2, pgd20 = by_steps[2]["top1"], by_steps[2]["robust_top1"], by_steps[20]["robust_top1"]
    warning = ""
    for w in (w for r in rows for w in r.get("warnings", [])):
        m = _NOT_CONVERGED_RE.search(w)
        if m:
            warning = (f", with the warning that PGD-2 overstates robustness by {float(m.group(1)):.2f} points "
                       f"(noise {float(m.group(2)):.2f})")
            break
    return (f"Measured on the quickstart's checkpoint (the first command above, {n} validation images, "
            f"{val_s:.0f} s; `util_scripts/readme_numbers.py` on {where}, {date}): clean {clean:.2f} %, "
            f"PGD-2 {pgd2:.2f} %, PGD-20 {pgd20:.2f} %{warning}.")


def measure() -> Dict[str, str]:
    """Train the demo into a temporary folder, evaluate its best checkpoint; the two README blocks."""
    sys.path.insert(0, ROOT)
    from src.data import DIGITS_NUM_VAL
    where, date = machine(), datetime.date.today().isoformat()
    with tempfile.TemporaryDirectory() as tmp:
        out, train_s = _run([*DEMO_CMD, "--output", tmp, "--experiment", "demo"])
        m = _FINAL_RE.search(out)
        if m is None:
            raise SystemExit("error: the demo printed no 'final eval:' line")
        ckpt = os.path.join(tmp, "demo", "best.pth.tar")
        results = os.path.join(tmp, "validate.json")
        _, val_s = _run(["validate.py", *VALIDATE_ARGS, "--checkpoint", ckpt, "--results-file", results])
        with open(results) as f:
            rows: List[Mapping] = json.load(f)
    return {"demo": demo_block(float(m.group(1)), float(m.group(2)), train_s, where, date),
            "validate": validate_block(rows, DIGITS_NUM_VAL, val_s, where, date)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    args = parser.parse_args(argv)
    text = _read_readme(args.readme)  # fail before minutes of training when the README or a marker is wrong
    blocks = measure()
    text = _read_readme(args.readme)  # re-read: the README may have been edited during the measurement
    for name, body in blocks.items():
        text = replace_block(text, name, body)
    _write_atomically(args.readme, text)
    print(f"updated {args.readme}")
    return 0


def _read_readme(path: str) -> str:
    """The README's text, with both marker pairs checked; a problem is one ``error:`` line (SystemExit)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        _usage_error(f"--readme {path} cannot be read ({getattr(e, 'strerror', None) or e})")
    for name in ("demo", "validate"):
        try:
            replace_block(text, name, "")
        except ValueError as e:
            _usage_error(f"--readme {path}: {e}")
    return text


def _usage_error(message: str) -> NoReturn:
    """Bad input: one ``error:`` line and exit code 2, as every tool of the project."""
    sys.stderr.write(f"error: {message}\n")
    raise SystemExit(2)


def _write_atomically(path: str, text: str) -> None:
    """Replace ``path`` in one rename: a kill mid-write leaves the old README whole, never half of it."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".readme-numbers-", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, os.stat(path).st_mode & 0o7777)  # mkstemp's 0600 would make the README private
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


if __name__ == "__main__":
    # run_cli: Ctrl-C / SIGTERM during the minutes of measuring end in one 'interrupted:' line (130 / 143), and
    # the training or validation child is killed with us (subprocess.run kills it on the way out) instead of
    # running on as an orphan
    sys.path.insert(0, ROOT)
    from src.errors import run_cli

    sys.exit(run_cli(main))
