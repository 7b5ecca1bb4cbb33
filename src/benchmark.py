"""Speed of timm models: the engine behind ``benchmark.py`` (original-behaviour.md §1.7).

timm's benchmark script, as the original shipped it (inference / train / both, ``--precision``,
channels-last, TorchScript, bulk mode over a model list or wildcard, a smaller batch after an
out-of-memory error), over current timm and with the project's models registered, plus:

* ``--bench adv-train``: one PGD-k adversarial training step (``--attack-steps`` k, eps
  ``--attack-eps`` /255, step 1.5 * eps / k) with :class:`src.attacks.AdvTrainingLoss`, the loss
  train.py uses; ``--bench all`` runs inference, train and adv-train;
* ``--torch-compile [BACKEND]``: ``torch.compile`` the model first (warm-up iterations absorb the
  compilation);
* results as CSV or JSON (``--results-file``, by extension), besides the printed ``--result`` JSON.

Random inputs in [0, 1] and random labels; like timm, the time of a step is the mean over
``--num-bench-iter`` timed steps after ``--num-warm-iter`` untimed ones (the device synchronized
before and after). Numbers on a CPU say little about accelerators.
The profile modes of timm's script (deepspeed / fvcore) are not offered.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import time
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Sequence

import torch
import torch.nn as nn

from src import storage
from src.arg_parser.analysis import BENCHES, PRECISIONS  # noqa: F401 (re-exported)
from src.arg_parser.analysis import build_benchmark_parser as build_parser  # noqa: F401 (re-exported)
from src.arg_parser.analysis import parse_benchmark_args as parse_args  # noqa: F401 (re-exported)
from src.errors import ExpectedError, UsageError

_logger = logging.getLogger("robust_vits")

__all__ = ["BENCHES", "PRECISIONS", "build_parser", "parse_args", "model_names", "benchmark_model",
           "write_results", "run"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "amp": torch.float32}


def model_names(args: argparse.Namespace) -> List[str]:
    """The models to time: --model-list, a wildcard, or one name."""
    import timm

    import src.models  # noqa: F401  (registers the project's models)

    if args.model_list:
        names = _read_model_list(args.model_list)
    elif any(c in args.model for c in "*?["):
        names = timm.list_models(args.model)
    else:
        names = [args.model]
    unknown = [n for n in names if not timm.is_model(n)]
    if unknown or not names:
        raise UsageError(f"unknown model(s): {', '.join(unknown[:5])}" if unknown else
                         f"no timm model matches '{args.model}'")
    return names


def _read_model_list(path: str) -> List[str]:
    """The names in a ``--model-list`` file (whitespace-separated); a file that names none is an error, never
    a silent fall-back to ``--model``."""
    if storage.isdir(path):
        raise UsageError(f"--model-list {path} is a folder; give the text file of model names")
    if not storage.exists(path):
        raise UsageError(f"--model-list file {path} does not exist")
    try:
        text = storage.read_text(path)
    except OSError as e:
        raise UsageError(f"--model-list {path} cannot be read ({e.strerror or type(e).__name__})") from None
    except UnicodeDecodeError:
        raise UsageError(f"--model-list {path} is not a text file of model names (not UTF-8 text)") from None
    names = text.split()
    if not names:
        raise UsageError(f"--model-list {path} names no models; write one timm model name per line")
    return names


def _benches(bench: str) -> List[str]:
    return {"both": ["inference", "train"], "all": ["inference", "train", "adv-train"]}.get(bench, [bench])


def _build(args: argparse.Namespace, name: str, device: torch.device):
    from timm.data import resolve_data_config

    from src.model_factory import create_model

    # the project's factory: an option the model refuses (--gp, --drop-path) is one error line naming the flag
    model = create_model(name, pretrained=False, num_classes=args.num_classes, global_pool=args.gp,
                         drop_rate=args.drop, drop_path_rate=args.drop_path)
    cfg = resolve_data_config(vars(args), model=model, use_test_size=not args.use_train_size, verbose=False)
    folded = None
    if args.fold_bn:  # in float32, before the precision and layout changes
        from src.bn_fold import fold_for_evaluation

        folded = fold_for_evaluation(model, cfg["input_size"]).folded
    model = model.to(device=device, dtype=_DTYPES[args.precision])
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.torchscript:
        model = torch.jit.script(model)
    elif args.torch_compile:
        model = torch.compile(model, backend=args.torch_compile)
    return model, tuple(cfg["input_size"]), int(getattr(model, "num_classes", 0) or 1000), folded


def _timed(step: Callable[[], None], warm: int, iters: int, device: torch.device) -> float:
    """Mean seconds per step after ``warm`` untimed steps (device synchronized)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warm):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    sync()
    return (time.perf_counter() - t0) / iters


def _step_fn(bench: str, args: argparse.Namespace, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             autocast: Callable[[], Any]) -> Callable[[], None]:
    from timm.optim import create_optimizer_v2

    if bench == "inference":
        model.eval()

        def infer() -> None:
            with torch.no_grad(), autocast():
                model(x)
        return infer
    from src.attacks import AdvTrainingLoss, AttackCfg
    from src.setup_task import CleanTrainingLoss

    criterion = nn.CrossEntropyLoss(label_smoothing=args.smoothing)
    if bench == "adv-train":
        eps = args.attack_eps / 255
        cfg = AttackCfg(name="pgd", eps=eps, eps_schedule="constant", eps_schedule_period=0, zero_eps_epochs=0,
                        step_size=1.5 * eps / args.attack_steps, steps=args.attack_steps, norm="linf",
                        boundaries=(0.0, 1.0))
        loss_fn: nn.Module = AdvTrainingLoss(cfg, criterion)
    else:
        loss_fn = CleanTrainingLoss(criterion)
    opt = create_optimizer_v2(model, args.opt, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum)

    def train() -> None:
        model.train()
        with autocast():
            loss, _, _ = loss_fn(model, x, y, 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return train


def benchmark_model(args: argparse.Namespace, name: str, device: torch.device) -> "OrderedDict[str, Any]":
    """One result row: model, parameters, input, and samples/s + ms/step for each bench."""
    model, input_size, num_classes, folded = _build(args, name, device)
    dtype = _DTYPES[args.precision]
    b = args.batch_size
    x = torch.rand((b,) + input_size, device=device, dtype=dtype)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (b,), device=device)
    amp_dtype = torch.bfloat16 if args.amp_dtype == "bfloat16" else torch.float16

    def autocast():
        if args.precision != "amp":
            return torch.autocast(device.type, enabled=False)
        return torch.autocast(device.type, dtype=amp_dtype)

    row: "OrderedDict[str, Any]" = OrderedDict(
        model=name, param_count=round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        img_size=input_size[-1], batch_size=b, precision=args.precision, channels_last=args.channels_last,
        compile=args.torch_compile or ("torchscript" if args.torchscript else ""), device=device.type)
    if args.fold_bn:
        row["folded_batchnorms"] = folded
    for bench in _benches(args.bench):
        seconds = _timed(_step_fn(bench, args, model, x, y, autocast), args.num_warm_iter, args.num_bench_iter, device)
        key = bench.replace("-", "_")
        row[f"{key}_samples_per_sec"] = round(b / seconds, 2)
        row[f"{key}_step_time_ms"] = round(seconds * 1000, 3)
        if bench == "adv-train":
            row["attack_steps"] = args.attack_steps
    return row


def _with_retry(args: argparse.Namespace, name: str, device: torch.device) -> "OrderedDict[str, Any]":
    """timm's behaviour: after an out-of-memory error, retry with a smaller batch."""
    batch = args.batch_size
    while True:
        try:
            return benchmark_model(argparse.Namespace(**{**vars(args), "batch_size": batch}), name, device)
        except RuntimeError as e:
            if "out of memory" not in str(e).lower() or batch <= 1:
                raise
            batch = max(1, batch // 2 if batch > 8 else batch - 1)
            _logger.warning("%s: out of memory, retrying with batch size %d", name, batch)
            if device.type == "cuda":
                torch.cuda.empty_cache()


def write_results(path: str, rows: Sequence[Dict[str, Any]]) -> None:
    """``.json``: a JSON list; anything else: CSV with the union of the rows' columns."""
    if path.endswith(".json"):
        storage.atomic_write_text(path, json.dumps(list(rows), indent=2) + "\n")
        return
    columns = list(OrderedDict((k, None) for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    storage.atomic_write_text(path, buf.getvalue())


def _is_benchmark_results(text: str, is_json: bool) -> bool:
    """An earlier results file of benchmark.py (the only kind it replaces)."""
    if is_json:
        try:
            rows = json.loads(text)
        except ValueError:
            return False
        return isinstance(rows, list) and bool(rows) and all(
            isinstance(r, dict) and "model" in r and any(k.endswith("_samples_per_sec") for k in r) for r in rows)
    header = next(csv.reader(io.StringIO(text)), [])
    return "model" in header and any(c.endswith("_samples_per_sec") for c in header)


def _throughput(row: Dict[str, Any]) -> float:
    return max((v for k, v in row.items() if k.endswith("_samples_per_sec")), default=0.0)


def run(args: argparse.Namespace) -> int:
    """The CLI: time every model, print ``--result`` + JSON, write the results file."""
    from src.cli import setup_logging

    setup_logging(True)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    names = model_names(args)
    path = args.results_file or ("./benchmark.csv" if len(names) > 1 else "")
    if path:  # before the timing, not after: a folder, or another tool's file, is never replaced
        from src.results import check_results_target

        storage.check_output_location(path, "--results-file")
        check_results_target(path, tool="benchmark.py", is_ours=_is_benchmark_results)
    rows = []
    for name in names:
        _logger.info("benchmarking %s (%s, batch %d, %s)", name, args.bench, args.batch_size, args.precision)
        try:
            rows.append(_with_retry(args, name, device))
        # AssertionError: timm's models assert on inputs they cannot take (a ViT's size not a multiple of its patch)
        except (RuntimeError, TypeError, ValueError, AssertionError, ExpectedError) as e:
            if len(names) == 1 and isinstance(e, ExpectedError):
                raise
            if len(names) == 1:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise UsageError(f"{name}: {first}") from None
            _logger.warning("%s failed: %s", name, str(e).splitlines()[0] if str(e) else type(e).__name__)
    if not rows:  # an empty results file would only hide the failures (and block the next run's file)
        raise UsageError(f"all {len(names)} models failed (see the warnings above); nothing was timed or written")
    rows.sort(key=_throughput, reverse=True)
    if path:
        write_results(path, rows)
    print("--result")
    print(json.dumps(rows[0] if len(names) == 1 else rows, indent=2))
    return 0
