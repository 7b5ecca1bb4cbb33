"""Shared helpers of the benchmark scripts: interleaved timing, machine facts, tables and JSON.

Every figure the scripts report is a *ratio* of two timings taken in the same process, with the
variants interleaved round by round (the order reversed every other round) and medians taken
after warm-up, so that load from other processes on a shared machine hits every variant alike.
The absolute seconds are printed too, but only the ratios are meant to be compared across runs.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
PEER_DIR = Path(__file__).resolve().parent / ".peer"
RESULTS_DIR = Path(__file__).resolve().parent / "results"

from src.arg_parser.analysis import check_compile_backend, check_device  # noqa: E402,F401 - needs ROOT on sys.path
from src.arg_parser.common import CliParser, check_batch_fits  # noqa: E402
from src.arg_parser.values import nonneg_float, nonneg_int, positive_float, positive_int  # noqa: E402,F401
from src.errors import UsageError, first_line, run_cli  # noqa: E402,F401 - run_cli: the scripts' entry point

# Models that are not a plain registered name: a registered constructor plus keyword overrides.
# xcit_nano_12_p4_32 is the project's p4 / 32 px XCiT (stride surgery on the p16 stem) at XCiT-nano
# width (dim 128, 4 heads, no token norm), small enough to benchmark on 2 CPU threads.
MODEL_PRESETS: Dict[str, tuple] = {
    "xcit_nano_12_p4_32": ("xcit_small_12_p4_32", dict(embed_dim=128, num_heads=4, tokens_norm=False)),
}


def create_model(name: str, num_classes: int = 10, img_size: Optional[int] = None) -> torch.nn.Module:
    """The model train.py / validate.py would build (``src.model_factory.create_model``: timm plus the
    project's models; ``img_size`` only where the model takes it), or a :data:`MODEL_PRESETS` entry."""
    import src.models  # noqa: F401 - registers the project's models
    from src.model_factory import create_model as factory_create

    if name in MODEL_PRESETS:
        import timm

        base, kwargs = MODEL_PRESETS[name]
        model = timm.create_model(base, num_classes=num_classes, img_size=img_size or 32, **kwargs)
    else:
        model = factory_create(name, num_classes=num_classes, img_size=img_size)
    if img_size is not None:
        check_input_fits(model, name, img_size)
    return model


def check_input_fits(model: torch.nn.Module, name: str, img_size: int) -> None:
    """One eval-mode forward of a single ``img_size`` image: a size the model cannot take (a ViT's size not a
    multiple of its patch, a ResNet input too small for its strides) is one error line before anything is
    timed, not a traceback from inside the first timed step. The global RNG and the train mode are kept."""
    was_training = model.training
    x = torch.rand(1, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    except (AssertionError, RuntimeError, ValueError) as e:
        raise UsageError(f"model {name} cannot take {img_size}x{img_size} px inputs: {first_line(e)[:200].rstrip('.')}; "
                         "choose another image size") from None
    finally:
        model.train(was_training)


def device_sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timings:
    """Seconds per round per variant: ``wall`` (perf_counter) and ``cpu`` (this process's CPU time).

    On a loaded machine the wall time includes the time other processes held the cores; the CPU
    time does not (with one thread it is close to the work done; with several it also counts the
    threads' spin-waits), so both are kept and the tables show both ratios.
    """

    def __init__(self, names: Sequence[str]):
        self.wall: Dict[str, List[List[float]]] = {n: [] for n in names}
        self.cpu: Dict[str, List[List[float]]] = {n: [] for n in names}


def interleaved(fns: Dict[str, Callable[[], Any]], rounds: int, reps: int, warmup: int,
                device: torch.device = torch.device("cpu")) -> Timings:
    """Time each callable ``reps`` times per round, variants interleaved.

    ``warmup`` untimed calls of every variant come first. Odd rounds run the variants in reverse
    order so that a slow drift of the machine's load does not favour the variants listed first.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    names = list(fns)
    out = Timings(names)
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            wall, cpu = [], []
            for _ in range(reps):
                device_sync(device)
                t, c = time.perf_counter(), time.process_time()
                fns[name]()
                device_sync(device)
                wall.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
            out.wall[name].append(wall)
            out.cpu[name].append(cpu)
    return out


def median(rounds: Sequence[Sequence[float]]) -> float:
    """Median over every timed call of every round."""
    return statistics.median([t for r in rounds for t in r])


def ratio_spread(num: Sequence[Sequence[float]], den: Sequence[Sequence[float]]) -> List[float]:
    """Min and max over rounds of the per-round median ratio: how much the ratio moved with the load."""
    per_round = [statistics.median(a) / statistics.median(b) for a, b in zip(num, den)]
    return [min(per_round), max(per_round)]


def _lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return platform.processor() or "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(module: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - not installed (or installed with --target): reported as None
        return None


def _native_bf16() -> bool:
    from src.bits.device import cpu_has_native_bf16

    return cpu_has_native_bf16()


def machine_info(device: torch.device) -> Dict[str, Any]:
    """What a reader needs to judge the numbers: CPU, threads, load, versions, date, commit."""
    info: Dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _lscpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # AVX2 / AVX512 / ... as torch dispatches
        "cpu_native_bf16": _native_bf16(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1_5_15": [round(v, 2) for v in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": _version("timm"),
        "pyautoattack": _version("pyautoattack"),
        "git_commit": _git_commit(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def command_line() -> str:
    rel = os.path.relpath(sys.argv[0], ROOT) if os.path.isabs(sys.argv[0]) else sys.argv[0]
    return " ".join(["python", rel] + sys.argv[1:])


def print_table(title: str, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A plain fixed-width table on stdout (floats with 3 significant decimals)."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
        return str(v)

    rows = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))


def write_json(path: Optional[str], default_name: str, payload: Dict[str, Any]) -> Path:
    """Write the results (with the command and machine facts) and say where."""
    out = Path(path) if path else RESULTS_DIR / default_name
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(out)
    print(f"\nresults written to {out}")
    return out


def current_rss_bytes() -> int:
    """Resident set size now, from /proc (Linux), else the peak as the best available figure."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


# value rules of the scripts' numeric flags (src.arg_parser.values: the same rules and messages as the CLIs)
COUNT = positive_int()  # sizes, rounds, repetitions, threads
STEPS = nonneg_int()  # warm-up calls, end-to-end steps, workers (0: none)
ATTACK_STEPS = positive_int()  # PGD / TRADES steps k: a benchmark of an adversarial step needs at least one


class BenchParser(CliParser):
    """A benchmark script's parser: also checks, before anything is measured, that ``--json`` names a file
    whose folder can be written (not a folder, not after minutes of timing), and that one batch of the
    images it will build (``--batch-size`` at ``--img-size`` / ``--input-size``, 32 px where the script has
    no size flag; one ``--disk-size`` JPEG) fits in the memory available (was an allocator traceback)."""

    def parse_args(self, *args: Any, **kwargs: Any) -> Any:
        ns = super().parse_args(*args, **kwargs)
        try:
            if getattr(ns, "json", None):
                from src.storage import check_output_file

                check_output_file(ns.json, "--json")
            self._check_memory(ns)
        except UsageError as e:
            raise UsageError(f"{self.prog}: {e}") from None
        return ns

    @staticmethod
    def _check_memory(ns: argparse.Namespace) -> None:
        batch = getattr(ns, "batch_size", None)
        if batch:
            flag = next((f for f in ("img_size", "input_size") if isinstance(getattr(ns, f, None), int)), None)
            side = getattr(ns, flag) if flag else 32
            what = f"--batch-size {batch} with --{flag.replace('_', '-')} {side}" if flag else \
                f"--batch-size {batch} (3x32x32 px images)"
            check_batch_fits(what, (3, side, side), batch, advice="use a smaller size or --batch-size")
        disk = getattr(ns, "disk_size", None)
        if disk:
            check_batch_fits(f"--disk-size {disk}", (disk, disk, 3), 1, bytes_per_value=1,
                             advice="use a smaller --disk-size")


def cli_parser(doc: str, script: str) -> CliParser:
    """The parser of the benchmark script ``script`` (its ``__file__``): bad values are one ``error:`` line
    and exit 2 (with :func:`src.errors.run_cli`), refused before anything is measured or written."""
    return BenchParser(prog=f"benchmarks/{Path(script).name}", description=doc.strip().splitlines()[0])


def add_common_args(p, rounds: int = 3, reps: int = 2, warmup: int = 1, device: bool = True,
                    clock: bool = True) -> None:
    """Options every timing script shares (``--device`` only where the script can use an accelerator)."""
    p.add_argument("--rounds", type=COUNT, default=rounds, help="interleaved rounds")
    p.add_argument("--reps", type=COUNT, default=reps, help="timed calls per variant per round")
    p.add_argument("--warmup", type=STEPS, default=warmup, help="untimed calls per variant first")
    p.add_argument("--threads", type=COUNT, default=2, help="torch CPU threads")
    if device:
        p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    if clock:
        p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                       help="what the ratios use: wall time, or this process's CPU time (steadier on a loaded "
                            "machine with --threads 1)")
    p.add_argument("--json", default=None, metavar="PATH", help="where to write the JSON results")


def resolve_device(name: Optional[str]) -> torch.device:
    if name:
        check_device(name)
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
