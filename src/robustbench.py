"""RobustBench's evaluation protocol, reimplemented without the ``robustbench`` package.

``robustbench`` cannot be installed next to timm 1.0.31 and pyautoattack (DESIGN.md §2), so
``validate_robustbench.py`` reproduces its ``benchmark()`` here:

* **Data.** CIFAR-10 / CIFAR-100: the test set in torchvision's on-disk format
  (``<data-dir>/cifar-10-batches-py/test_batch``, ``<data-dir>/cifar-100-python/test``), the
  first ``n_examples`` in file order, ``ToTensor`` only. ImageNet: RobustBench's fixed list of
  5000 validation images (``data/robustbench_imagenet_5000_ids.txt``, lines ``<wnid>/<file>``,
  read from ``<data-dir>/val/<wnid>/<file>`` like RobustBench's ``CustomImageFolder``), labels
  from ``data/imagenet_class_to_id_map.json`` (wnid -> class index), the first ``n_examples``
  in list order, preprocessed with ``Resize(floor(size / crop_pct), interpolation) +
  CenterCrop(size) + ToTensor`` from the model's data config (RobustBench's rule for timm
  models).
* **Attack.** AutoAttack ``standard`` (APGD-CE, APGD-T, FAB-T, Square) with the threat model's
  norm and eps, through ``src.autoattack`` (the one pyautoattack adapter). Clean and robust
  accuracy are measured on the same examples.
* **Report.** RobustBench's ``model_info`` fields (``clean_acc`` / ``autoattack_acc`` as percent
  strings with two decimals, ``eps`` as ``"8/255"`` for Linf and a plain number for L2), plus
  per-example results and provenance (id-list hash, seed, package versions, preprocessing,
  AutoAttack's flags, shards, timings).

Beyond RobustBench: the examples are evaluated in fixed chunks whose AutoAttack seed is
``seed + first example index``, recorded per chunk in ``src.eval_state``; the evaluation can be
split over processes (torchrun, or ``--num-shards/--shard-id`` jobs) and resumed after a kill,
and the merged report equals that of one uninterrupted process.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import math
import os
import pickle
import platform
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import storage
from .errors import UsageError

_logger = logging.getLogger("robust_vits")

__all__ = [
    "DATASETS",
    "THREAT_MODELS",
    "DEFAULT_N_EXAMPLES",
    "IMAGENET_IDS_FILE",
    "IMAGENET_CLASS_MAP_FILE",
    "ExampleSet",
    "CifarTestSet",
    "ImageNetSubset",
    "canonical_threat_model",
    "format_eps",
    "format_accuracy",
    "load_imagenet_ids",
    "load_imagenet_class_map",
    "load_examples",
    "imagenet_transform",
    "InModelResize",
    "evaluate_chunk",
    "build_report",
    "run",
]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGENET_IDS_FILE = os.path.join(REPO_ROOT, "data", "robustbench_imagenet_5000_ids.txt")
IMAGENET_CLASS_MAP_FILE = os.path.join(REPO_ROOT, "data", "imagenet_class_to_id_map.json")

DATASETS = ("cifar10", "cifar100", "imagenet")
THREAT_MODELS = ("Linf", "L2")
DEFAULT_N_EXAMPLES = {"cifar10": 10_000, "cifar100": 10_000, "imagenet": 5_000}
DEFAULT_NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}
FIELDS = ("clean", "robust")
AUTOATTACK_VERSION = "standard"

# torchvision's on-disk CIFAR layout: (folder, test file, label key, md5 of the official file)
_CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py", "test_batch", "labels", "CIFAR10"),
    "cifar100": ("cifar-100-python", "test", "fine_labels", "CIFAR100"),
}


# ----------------------------------------------------------------------------------------------
# names and formatting


def canonical_threat_model(name: str) -> str:
    """'linf' / 'Linf' / 'LINF' -> 'Linf'; 'l2' -> 'L2'."""
    for tm in THREAT_MODELS:
        if str(name).lower() == tm.lower():
            return tm
    raise UsageError(f"unknown threat model '{name}': choose Linf or L2")


def format_eps(eps_255: float, threat_model: str) -> str:
    """eps as RobustBench's model_info files write it: ``"8/255"`` (Linf), ``"0.5"`` (L2).

    ``eps_255`` is the CLI value in /255 units (the original's convention for both norms, so an
    L2 radius of 0.5 is passed as 127.5).
    """
    if canonical_threat_model(threat_model) == "Linf":
        return f"{eps_255:g}/255"
    return f"{eps_255 / 255:.6g}"


def format_accuracy(fraction: float) -> str:
    """RobustBench's accuracy strings: percent with two decimals (``0.4760 -> "47.60"``)."""
    return f"{100.0 * fraction:.2f}"


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with storage.open_file(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def _expand(path: str) -> str:
    return os.path.expanduser(str(path)) if storage.is_local(str(path)) else str(path)


# ----------------------------------------------------------------------------------------------
# data


class ExampleSet(torch.utils.data.Dataset):
    """The protocol's ordered example list: ``self[i] -> (image tensor, label)`` for i < n."""

    name: str = ""
    n_examples: int = 0
    source: str = ""
    examples_sha256: str = ""
    data_check: str = ""

    def __len__(self) -> int:
        return self.n_examples

    def labels(self) -> List[int]:
        raise NotImplementedError

    def provenance(self) -> Dict[str, Any]:
        return {"dataset": self.name, "n_examples": self.n_examples, "source": self.source,
                "examples_sha256": self.examples_sha256, "data_check": self.data_check}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """The CIFAR python pickles hold a dict of numpy arrays and lists: allow nothing else."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"),
                ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected object {module}.{name}")


class CifarTestSet(ExampleSet):
    """CIFAR-10/100 test images from torchvision's python-pickle files, ``ToTensor`` only.

    torchvision's ``CIFAR10(download=False)`` refuses any folder whose *training* files are
    missing or differ from the official md5 sums; RobustBench needs only the test file, so it is
    read directly (same format: ``data`` uint8 (N, 3072) in CHW order, ``labels`` /
    ``fine_labels``). Its md5 is compared with the official one and the outcome reported.
    """

    def __init__(self, dataset: str, data_dir: str, n_examples: Optional[int] = None):
        import numpy as np

        folder, filename, label_key, tv_name = _CIFAR_FILES[dataset]
        path = storage.join(_expand(data_dir), folder, filename)
        pretty = "CIFAR-10" if dataset == "cifar10" else "CIFAR-100"
        if not storage.exists(path):
            raise UsageError(f"{pretty} test set not found: looked for {path}; download it with python -c \"import "
                             f"torchvision; torchvision.datasets.{tv_name}('{data_dir}', train=False, download=True)\" "
                             f"or pass --data-dir")
        raw = storage.read_bytes(path)
        try:
            entry = _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="latin1").load()
            data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            labels = [int(v) for v in entry[label_key]]
        except Exception as e:  # noqa: BLE001 - any decoding problem means a bad file
            raise UsageError(f"{path} is not a {pretty} test batch in torchvision's python format "
                             f"({type(e).__name__}: {str(e)[:100]})") from None
        if len(labels) != len(data):
            raise UsageError(f"{path} holds {len(data)} images but {len(labels)} labels")
        available = len(data)
        if n_examples is None:
            n_examples = min(DEFAULT_N_EXAMPLES[dataset], available)
            if n_examples < DEFAULT_N_EXAMPLES[dataset]:
                _logger.warning("%s holds only %d test images (RobustBench uses %d)", path, available,
                                DEFAULT_N_EXAMPLES[dataset])
        elif n_examples > available:
            raise UsageError(f"--n-examples {n_examples} is more than the {available} test images in {path}")
        self._images = data[:n_examples]
        self._labels = labels[:n_examples]
        self.name = dataset
        self.n_examples = int(n_examples)
        self.path = path
        self.source = f"{pretty} test set ({folder}/{filename}), first {n_examples} images in file order"
        self.examples_sha256 = _sha256_text("\n".join(str(i) for i in range(n_examples)))
        import torchvision.datasets as tvd

        official = dict(getattr(tvd, tv_name).test_list)[filename]
        md5 = hashlib.md5(raw).hexdigest()
        self.file_md5 = md5
        self.data_check = "official test file (md5 matches torchvision's)" if md5 == official else \
            f"md5 {md5} differs from the official test file's {official}: not comparable with RobustBench"
        if md5 != official:
            _logger.warning("%s: %s", path, self.data_check)

    def labels(self) -> List[int]:
        return list(self._labels)

    def __getitem__(self, i: int):
        if not 0 <= i < self.n_examples:
            raise IndexError(i)
        x = torch.from_numpy(self._images[i].astype("float32") / 255.0)
        return x, self._labels[i]


def load_imagenet_ids(path: str = IMAGENET_IDS_FILE) -> List[str]:
    """RobustBench's ImageNet subset: ``<wnid>/ILSVRC2012_val_XXXXXXXX.JPEG`` per line, in order."""
    with open(path, "r", encoding="utf-8") as f:
        ids = [line.strip() for line in f if line.strip()]
    return ids


def load_imagenet_class_map(path: str = IMAGENET_CLASS_MAP_FILE) -> Dict[str, int]:
    """wnid (``n01440764``) -> class index (0..999), the standard sorted-wnid order."""
    with open(path, "r", encoding="utf-8") as f:
        return {str(k): int(v) for k, v in json.load(f).items()}


class ImageNetSubset(ExampleSet):
    """The first ``n_examples`` of RobustBench's 5000 ImageNet validation images."""

    def __init__(self, data_dir: str, transform: Callable, n_examples: Optional[int] = None,
                 ids_file: str = IMAGENET_IDS_FILE, class_map_file: str = IMAGENET_CLASS_MAP_FILE):
        ids = load_imagenet_ids(ids_file)
        class_map = load_imagenet_class_map(class_map_file)
        if n_examples is None:
            n_examples = DEFAULT_N_EXAMPLES["imagenet"]
        if n_examples > len(ids):
            raise UsageError(f"--n-examples {n_examples}: RobustBench's ImageNet subset has {len(ids)} images")
        ids = ids[:n_examples]
        root = storage.join(_expand(data_dir), "val")
        if not storage.isdir(root):
            raise UsageError(f"ImageNet validation images not found: looked for {root}/<wnid>/<file> (e.g. "
                             f"{storage.join(root, ids[0] if ids else '')}); RobustBench expects the ILSVRC2012 "
                             f"validation set sorted into one folder per class under <data-dir>/val")
        self._paths, self._labels = [], []
        for entry in ids:
            wnid = entry.split("/", 1)[0]
            if wnid not in class_map:
                raise UsageError(f"{ids_file}: class {wnid} of {entry} is not in {class_map_file}")
            self._paths.append(storage.join(root, *entry.split("/")))
            self._labels.append(class_map[wnid])
        if storage.is_local(root):
            missing = [p for p in self._paths if not os.path.isfile(p)]
            if missing:
                raise UsageError(f"{len(missing)} of the {n_examples} RobustBench ImageNet images are missing under "
                                 f"{root} (first: {missing[0]}); the validation set must be sorted into "
                                 f"<wnid>/ folders")
        self.transform = transform
        self.name = "imagenet"
        self.n_examples = int(n_examples)
        self.root = root
        self.ids = ids
        with open(ids_file, "rb") as f:
            self.ids_file_sha256 = hashlib.sha256(f.read()).hexdigest()
        self.source = (f"RobustBench ImageNet subset (data/{os.path.basename(ids_file)}), first {n_examples} ids "
                       f"in list order, from {root}")
        self.examples_sha256 = _sha256_text("\n".join(ids))
        self.data_check = f"{n_examples} image files present" if storage.is_local(root) else "not checked (remote)"

    def labels(self) -> List[int]:
        return list(self._labels)

    def provenance(self) -> Dict[str, Any]:
        out = super().provenance()
        out["ids_file_sha256"] = self.ids_file_sha256
        return out

    def __getitem__(self, i: int):
        from PIL import Image

        path = self._paths[i]
        try:
            with storage.open_file(path, "rb") as f:
                img = Image.open(f)
                img = img.convert("RGB")
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read ImageNet image {path}: {e}") from None
        return self.transform(img), self._labels[i]


def imagenet_transform(data_config: Dict[str, Any], normalize: Optional[Tuple[Sequence[float], Sequence[float]]]
                       ) -> Tuple[Callable, str]:
    """Resize(floor(size / crop_pct), interpolation) + CenterCrop(size) + ToTensor [+ Normalize]."""
    from torchvision import transforms

    from .data import build_eval_transform

    tf = build_eval_transform(data_config)
    size = data_config["input_size"][-1]
    crop_pct = data_config.get("crop_pct") or 1.0
    interp = data_config.get("interpolation") or "bilinear"
    desc = f"Resize({math.floor(size / crop_pct)}, {interp}) + CenterCrop({size}) + ToTensor"
    if normalize is not None:
        mean, std = (tuple(float(v) for v in normalize[0]), tuple(float(v) for v in normalize[1]))
        tf = transforms.Compose(list(tf.transforms) + [transforms.Normalize(mean, std)])
        desc += f" + Normalize(mean={list(mean)}, std={list(std)})"
    return tf, desc


class InModelResize(nn.Module):
    """``--upsample-in-model``: Resize(floor(size / crop_pct)) + CenterCrop(size) as the model's first
    (differentiable) layer, so attacks perturb the dataset's native pixels (32x32 for CIFAR)."""

    def __init__(self, size: int, crop_pct: float, interpolation: str):
        super().__init__()
        self.size = int(size)
        self.resize_to = int(math.floor(size / (crop_pct or 1.0)))
        self.interpolation = interpolation or "bilinear"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        mode = InterpolationMode(self.interpolation) if self.interpolation in ("nearest", "bilinear", "bicubic") \
            else InterpolationMode.BILINEAR
        x = TF.resize(x, [self.resize_to], interpolation=mode, antialias=True)
        return TF.center_crop(x, [self.size, self.size])

    def extra_repr(self) -> str:
        return f"resize={self.resize_to}, crop={self.size}, interpolation={self.interpolation}"


def load_examples(dataset: str, data_dir: str, n_examples: Optional[int],
                  transform: Optional[Callable] = None) -> ExampleSet:
    """The protocol's examples for ``dataset`` ('cifar10', 'cifar100', 'imagenet')."""
    if dataset in ("cifar10", "cifar100"):
        return CifarTestSet(dataset, data_dir, n_examples)
    if dataset == "imagenet":
        if transform is None:
            raise ValueError("ImageNet examples need a transform")
        return ImageNetSubset(data_dir, transform, n_examples)
    raise UsageError(f"unknown dataset '{dataset}': choose one of {', '.join(DATASETS)}")


def load_chunk(examples: ExampleSet, start: int, end: int, workers: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Images and labels of examples ``start .. end - 1`` as two tensors."""
    subset = torch.utils.data.Subset(examples, range(start, end))
    if workers > 0 and end - start > 1:
        loader = torch.utils.data.DataLoader(subset, batch_size=end - start, shuffle=False, num_workers=workers)
        x, y = next(iter(loader))
        return x, torch.as_tensor(y, dtype=torch.long)
    items = [subset[i] for i in range(len(subset))]
    return torch.stack([it[0] for it in items]), torch.tensor([it[1] for it in items], dtype=torch.long)


# ----------------------------------------------------------------------------------------------
# evaluation of one chunk


def chunk_seed(seed: int, start: int) -> int:
    """AutoAttack's seed for the chunk whose first example is ``start``: a function of the chunk
    only, so sharded and resumed runs draw exactly the random numbers of an uninterrupted run
    (and ``--chunk-size 0`` is AutoAttack(seed=seed) over all examples, like RobustBench)."""
    return int(seed) + int(start)


@torch.no_grad()
def _clean_predictions(model: nn.Module, x: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    preds = []
    for i in range(0, len(x), batch_size):
        preds.append(model(x[i:i + batch_size].to(device)).argmax(dim=-1).cpu())
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def evaluate_chunk(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, threat_model: str, eps: float,
                   seed: int, batch_size: int, device: torch.device) -> Tuple[List[int], List[int], List[str]]:
    """Clean-correct and robust-correct (0/1 per example) under AutoAttack standard, and its flags.

    ``eps`` is in [0, 1] units. An example counts as robust only if it is also clean-correct
    (AutoAttack never attacks misclassified points; the AND guards against a float tie that
    makes the two clean forward passes disagree).
    """
    from .autoattack import run_autoattack

    clean = _clean_predictions(model, x, batch_size, device).eq(y)
    result = run_autoattack(model, x, y, version=AUTOATTACK_VERSION, norm=threat_model, eps=eps, seed=seed,
                            batch_size=batch_size, device=device, log_flags=False)
    robust = result.robust.cpu() & clean
    return [int(v) for v in clean.tolist()], [int(v) for v in robust.tolist()], list(result.flags)


# ----------------------------------------------------------------------------------------------
# provenance and report


def package_versions() -> Dict[str, Optional[str]]:
    from importlib import metadata

    out: Dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "timm", "pyautoattack", "numpy", "pillow"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(repo: str = REPO_ROOT) -> Optional[str]:
    """The checked-out commit of the robust-vits repository, read from ``.git`` (None outside a checkout)."""
    git = os.path.join(repo, ".git")
    try:
        if os.path.isfile(git):  # worktree / submodule: "gitdir: <path>"
            with open(git) as f:
                git = os.path.join(repo, f.read().split(":", 1)[1].strip())
        with open(os.path.join(git, "HEAD")) as f:
            head = f.read().strip()
        if not head.startswith("ref:"):
            return head or None
        ref = head.split(":", 1)[1].strip()
        ref_path = os.path.join(git, *ref.split("/"))
        if os.path.isfile(ref_path):
            with open(ref_path) as f:
                return f.read().strip() or None
        packed = os.path.join(git, "packed-refs")
        if os.path.isfile(packed):
            with open(packed) as f:
                for line in f:
                    parts = line.strip().split(" ")
                    if len(parts) == 2 and parts[1] == ref:
                        return parts[0]
    except (OSError, IndexError):
        return None
    return None


def weights_sha256(model: nn.Module) -> str:
    """sha256 over the evaluated model's state dict (names, dtypes, shapes, bytes): what was
    evaluated, whatever file (or pretrained download) it came from."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool
                     else t.to(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def build_report(*, merged, examples: ExampleSet, fingerprint: Dict[str, Any], args_summary: Dict[str, Any],
                 preprocessing: Dict[str, Any], threat_model: str, eps_255: float, seed: int,
                 chunk_size: int, batch_size: int, wall_seconds: float, state_dir: str,
                 file_infos: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """The JSON report: RobustBench's model_info fields, then per-example results and provenance."""
    n = merged.n_examples
    clean = merged.values["clean"]
    robust = merged.values["robust"]
    n_clean, n_robust = int(sum(clean)), int(sum(robust))
    clean_frac = n_clean / n if n else float("nan")
    robust_frac = n_robust / n if n else float("nan")
    flags: Dict[str, int] = {}
    compute_seconds = 0.0
    for res in merged.chunks.values():
        compute_seconds += float(res.info.get("seconds", 0.0))
        for msg in res.info.get("flags", []):
            flags[msg] = flags.get(msg, 0) + 1
    report: Dict[str, Any] = {
        # RobustBench model_info fields (left None where only the authors can fill them in)
        "link": None,
        "name": None,
        "authors": None,
        "additional_data": None,
        "number_forward_passes": None,
        "dataset": examples.name,
        "venue": None,
        "architecture": args_summary.get("model"),
        "eps": format_eps(eps_255, threat_model),
        "clean_acc": format_accuracy(clean_frac),
        "reported": None,
        "autoattack_acc": format_accuracy(robust_frac),
        "footnote": None,
        # the protocol and the numbers in full precision
        "threat_model": threat_model,
        "n_examples": n,
        "clean_accuracy": clean_frac,
        "robust_accuracy": robust_frac,
        "clean_correct": n_clean,
        "robust_correct": n_robust,
        "per_example": {
            "order": "example index 0..n_examples-1 of 'examples.source'; '1' = correct",
            "clean_correct": "".join(str(int(v)) for v in clean),
            "robust_correct": "".join(str(int(v)) for v in robust),
        },
        "examples": examples.provenance(),
        "preprocessing": preprocessing,
        "autoattack": {
            "version": AUTOATTACK_VERSION,
            "norm": threat_model,
            "eps": eps_255 / 255.0,
            "eps_cli_255": eps_255,
            "seed": seed,
            "chunk_seed": "seed + index of the chunk's first example",
            "chunk_size": chunk_size,
            "batch_size": batch_size,
            "flags": flags,
        },
        "model": args_summary,
        "config_fingerprint": fingerprint,
        "shards": {
            "state_dir": state_dir,
            "n_chunks": len(merged.chunks),
            "n_state_files": len(file_infos),
            "state_files": file_infos,
            "duplicate_chunks_differing": merged.conflicts,
        },
        "timing": {"compute_seconds": round(compute_seconds, 3), "this_run_wall_seconds": round(wall_seconds, 3)},
        "provenance": {
            "packages": package_versions(),
            "robust_vits_commit": git_commit(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "tool": "robust-vits validate_robustbench.py (RobustBench protocol reimplemented; robustbench "
                    "package not used)",
        },
    }
    return report


# ----------------------------------------------------------------------------------------------
# the whole run (validate_robustbench.py)


@dataclass
class EvaluationSetup:
    model: nn.Module
    examples: ExampleSet
    preprocessing: Dict[str, Any]
    fingerprint: Dict[str, Any]
    model_summary: Dict[str, Any]


def _check_args(args: argparse.Namespace) -> None:
    if args.dataset not in DATASETS:
        raise UsageError(f"unknown dataset '{args.dataset}': choose one of {', '.join(DATASETS)}")
    args.threat_model = canonical_threat_model(args.threat_model)
    if not math.isfinite(args.eps) or args.eps < 0:
        raise UsageError(f"--eps must be a finite number >= 0 (in /255 units), got {args.eps}")
    if args.n_examples is not None and args.n_examples < 1:
        raise UsageError(f"--n-examples must be >= 1, got {args.n_examples}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.chunk_size is None:
        args.chunk_size = args.batch_size
    if args.chunk_size < 0:
        raise UsageError(f"--chunk-size must be >= 0 (0 = all examples in one chunk), got {args.chunk_size}")
    if args.poll_seconds <= 0:
        raise UsageError(f"--poll-seconds must be > 0, got {args.poll_seconds}")
    if args.log_wandb and not args.checkpoint:
        raise UsageError("--log-wandb needs --checkpoint (the W&B run is found through the args.yaml next to it)")
    if args.num_shards < 1 or not 0 <= args.shard_id < args.num_shards:
        raise UsageError(f"--shard-id must be in 0..--num-shards-1, got shard {args.shard_id} of {args.num_shards}")
    if args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    if not args.model:
        raise UsageError("--model is required (a timm or robust-vits model name)")
    if args.normalize and args.dataset != "imagenet":
        raise UsageError("--normalize applies to --dataset imagenet only (as in the original); for CIFAR models "
                         "trained on normalized inputs pass --mean/--std to normalize inside the model")
    if args.upsample_in_model and args.dataset == "imagenet":
        raise UsageError("--upsample-in-model is for CIFAR's 32x32 images; ImageNet preprocessing already "
                         "resizes and crops to the model's input size")
    from .arg_parser import check_mean_std

    check_mean_std(args.mean, args.std)
    if args.patch_size is not None and args.patch_size < 1:
        raise UsageError(f"--patch-size must be >= 1, got {args.patch_size}")


def _build_model(args: argparse.Namespace, num_classes: int) -> Tuple[nn.Module, Any, str]:
    """The network through model_factory: pretrained or checkpoint weights, ``--patch-size``
    (a no-op at the model's own size). Returns ``(net, LoadedCheckpoint | None, weights source)``."""
    from .model_factory import create_model, load_checkpoint, set_patch_size

    net = create_model(args.model, pretrained=not args.checkpoint, num_classes=num_classes)
    loaded = None
    weights_source = "timm pretrained weights"
    if args.checkpoint:
        loaded = load_checkpoint(net, args.checkpoint, use_ema=args.use_ema, trust=args.trust_checkpoint)
        weights_source = f"{args.checkpoint} ({loaded.state_key})"
    set_patch_size(net, args.patch_size)
    return net, loaded, weights_source


def _normalization_layer(args: argparse.Namespace, net: nn.Module, recorded: Any, defaults: Any
                         ) -> Tuple[nn.Module, List[str]]:
    """Normalization inside the model when ``--mean/--std`` are given or the checkpoint records one
    (model_factory's precedence: flags > checkpoint > model defaults, per value)."""
    from .model_factory import resolve_normalization, wrap_normalization

    if args.mean is None and args.std is None and recorded is None:
        return net, []
    mean, std, source = resolve_normalization(args.mean, args.std, recorded, defaults)
    if args.mean is None and args.std is None:
        _logger.info("normalizing inside the model with the mean %s / std %s %s (pass --mean/--std to override)",
                     list(mean), list(std), source)
    return wrap_normalization(net, mean, std), [f"ImageNormalizer(mean={list(mean)}, std={list(std)}) {source}"]


def setup_evaluation(args: argparse.Namespace) -> EvaluationSetup:
    """Model (weights, patch size, wrappers) and examples, with the run's fingerprint."""
    from timm.data import resolve_data_config

    from .model_factory import patch_size_of, three

    num_classes = args.num_classes or DEFAULT_NUM_CLASSES[args.dataset]
    net, loaded, weights_source = _build_model(args, num_classes)
    patch_size = patch_size_of(net)
    data_config = resolve_data_config({"crop_pct": args.crop_pct}, model=net)
    mean_default, std_default = three(data_config["mean"]), three(data_config["std"])
    model, in_model = _normalization_layer(args, net, loaded.normalization if loaded else None,
                                           (mean_default, std_default))
    size = int(data_config["input_size"][-1])
    crop_pct = float(data_config.get("crop_pct") or 1.0)
    interp = data_config.get("interpolation") or "bilinear"
    if args.upsample_in_model:
        model = nn.Sequential(InModelResize(size, crop_pct, interp), model)
        in_model.insert(0, f"Resize({math.floor(size / crop_pct)}, {interp}, antialias) + CenterCrop({size})")

    examples, desc = _load_protocol_examples(args, data_config, (mean_default, std_default), in_model)
    if max(examples.labels(), default=0) >= num_classes:
        raise UsageError(f"the {args.dataset} labels go up to {max(examples.labels())} but the model has "
                         f"{num_classes} classes; pass --num-classes")

    model.eval()
    preprocessing = {"loader": desc, "in_model": in_model,
                     "data_config": {"input_size": list(data_config["input_size"]), "crop_pct": crop_pct,
                                     "interpolation": interp}}
    model_summary = {"model": args.model, "num_classes": num_classes, "weights": weights_source,
                     "use_ema": bool(args.use_ema), "patch_size": patch_size,
                     "weights_sha256": weights_sha256(model)}
    fingerprint = _fingerprint(args, examples, model_summary, {"loader": desc, "in_model": in_model})
    return EvaluationSetup(model=model, examples=examples, preprocessing=preprocessing, fingerprint=fingerprint,
                           model_summary=model_summary)


def _load_protocol_examples(args: argparse.Namespace, data_config: Dict[str, Any], defaults: Any,
                            in_model: List[str]) -> Tuple[ExampleSet, str]:
    """The examples and the loader's preprocessing description (ImageNet: resize + crop [+ Normalize])."""
    if args.dataset != "imagenet":
        return load_examples(args.dataset, args.data_dir, args.n_examples, None), "ToTensor"
    transform, desc = imagenet_transform(data_config, defaults if args.normalize else None)
    if args.normalize:
        _logger.warning("--normalize: the loader normalizes with mean %s / std %s, so AutoAttack perturbs "
                        "normalized values (eps and the [0, 1] box no longer mean pixels); the numbers are "
                        "not comparable with RobustBench's", list(defaults[0]), list(defaults[1]))
        if in_model and "ImageNormalizer" in in_model[-1]:
            _logger.warning("the inputs are normalized twice (--normalize and a normalization layer)")
    return load_examples(args.dataset, args.data_dir, args.n_examples, transform), desc


def _fingerprint(args: argparse.Namespace, examples: ExampleSet, model_summary: Dict[str, Any],
                 preprocessing: Dict[str, Any]) -> Dict[str, Any]:
    """Everything the per-example results depend on: resumed or sharded state must match it."""
    return {
        "task": "robustbench",
        "dataset": args.dataset,
        "n_examples": examples.n_examples,
        "examples_sha256": examples.examples_sha256,
        "data_file_md5": getattr(examples, "file_md5", None),
        "model": args.model,
        "num_classes": model_summary["num_classes"],
        "patch_size": model_summary["patch_size"],
        "weights_sha256": model_summary["weights_sha256"],
        "preprocessing": preprocessing,
        "threat_model": args.threat_model,
        "eps_255": float(args.eps),
        "autoattack": AUTOATTACK_VERSION,
        "seed": int(args.seed),
        "chunk_size": int(args.chunk_size),
        "attack_batch_size": int(min(args.batch_size, args.chunk_size or examples.n_examples)),
    }


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text)


def default_output(args: argparse.Namespace) -> str:
    return os.path.join("output", "robustbench",
                        _safe_name(f"{args.model}-{args.dataset}-{args.threat_model}-eps{args.eps:g}") + ".json")


def default_state_dir(output: str) -> str:
    stem = output[:-len(".json")] if output.endswith(".json") else output
    return stem + ".state"


def _shard_identity(args: argparse.Namespace, dev_env) -> Tuple[int, int]:
    if dev_env.distributed:
        if args.num_shards != 1:
            raise UsageError("use either torchrun (one shard per process) or --num-shards/--shard-id, not both")
        return dev_env.global_rank, dev_env.world_size
    return args.shard_id, args.num_shards


def _file_infos(state) -> Dict[str, Dict[str, Any]]:
    out: Dict[str, Dict[str, Any]] = {}
    for path in state.state_files():
        doc = json.loads(storage.read_text(path))
        chunks = doc.get("chunks") or {}
        out[storage.basename(path)] = {
            "chunks": len(chunks),
            "examples": sum(int(c["end"]) - int(s) for s, c in chunks.items()),
            "compute_seconds": round(sum(float((c.get("info") or {}).get("seconds", 0.0)) for c in chunks.values()), 3),
            "runs": doc.get("runs") or [],
        }
    return out


def _write_report(args, state, setup: EvaluationSetup, merged, t0: float) -> Dict[str, Any]:
    report = build_report(merged=merged, examples=setup.examples, fingerprint=setup.fingerprint,
                          args_summary=setup.model_summary, preprocessing=setup.preprocessing,
                          threat_model=args.threat_model, eps_255=float(args.eps), seed=int(args.seed),
                          chunk_size=int(args.chunk_size), batch_size=int(args.batch_size),
                          wall_seconds=time.time() - t0, state_dir=state.state_dir, file_infos=_file_infos(state))
    parent = storage.dirname(args.output)
    if parent:
        storage.makedirs(parent)
    storage.atomic_write_text(args.output, json.dumps(report, indent=2) + "\n")
    _logger.info("clean accuracy %s%%, AutoAttack (%s, eps %s) accuracy %s%% on %d %s examples; report: %s",
                 report["clean_acc"], args.threat_model, report["eps"], report["autoattack_acc"],
                 report["n_examples"], args.dataset, args.output)
    return report


def _log_wandb(args, report: Dict[str, Any]) -> None:
    """``--log-wandb``: log the numbers into the W&B run that trained the checkpoint (its args.yaml)."""
    import yaml

    args_yaml = storage.join(storage.dirname(args.checkpoint), "args.yaml")
    if not storage.exists(args_yaml):
        raise UsageError(f"--log-wandb: no args.yaml next to the checkpoint ({args_yaml}) to find its W&B run")
    try:
        run_ref = (yaml.safe_load(storage.read_text(args_yaml)) or {}).get("wandb_run")
    except yaml.YAMLError:
        run_ref = None
    if not run_ref:
        raise UsageError(f"--log-wandb: {args_yaml} has no wandb_run entry (was the run trained with --log-wandb?)")
    try:
        import wandb
    except ImportError:
        raise UsageError("--log-wandb needs the wandb package (pip install wandb)") from None
    run_ref = str(run_ref)
    if run_ref.startswith("offline:"):
        init = dict(id=run_ref.split(":", 1)[1], resume="allow")
    else:
        parts = run_ref.split("/")  # https://wandb.ai/<entity>/<project>/runs/<id>
        if len(parts) < 7:
            raise UsageError(f"--log-wandb: cannot parse the W&B run URL {run_ref} in {args_yaml}")
        init = dict(entity=parts[3], project=parts[4], id=parts[6], resume="allow")
    if storage.is_local(args.output):
        init["dir"] = os.path.dirname(os.path.abspath(args.output))  # wandb's files next to the report
    run = wandb.init(**init)
    eps = args.eps / 255
    suffix = "" if args.threat_model == "Linf" else f"-{args.threat_model.lower()}"
    run.log({"eval_top1-final": 100 * report["clean_accuracy"],
             f"autoattack-None-{eps}{suffix}-eval_robust_top1_final": 100 * report["robust_accuracy"]})
    run.finish()


def run(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    """Evaluate this process's share of the examples and write the report when all are done.

    Returns the report (when this process wrote it), else None.
    """
    from .bits.device import initialize_device, shutdown
    from .eval_state import EvalState, EvalStateError

    t0 = time.time()
    _check_args(args)
    dev_env = initialize_device(force_cpu=args.force_cpu)
    try:
        shard_id, num_shards = _shard_identity(args, dev_env)
        tag = f"[shard {shard_id}/{num_shards}] " if num_shards > 1 else ""
        torch.manual_seed(args.seed)
        setup = setup_evaluation(args)
        n = setup.examples.n_examples
        args.output = args.output or default_output(args)
        state_dir = args.state_dir or default_state_dir(args.output)
        state = EvalState(state_dir, setup.fingerprint, n, args.chunk_size, FIELDS, shard_id, num_shards)
        if dev_env.distributed:
            digests = dev_env.all_gather_object(state.digest)
            if len(set(digests)) != 1:
                raise UsageError("the torchrun processes disagree on the configuration (model weights, data or "
                                 "flags differ between ranks)")
        done = state.load()
        if dev_env.primary:  # fail now, not after hours of attacks, when the report cannot be written
            try:
                storage.check_writable(storage.dirname(args.output) or ".")
            except OSError as e:
                raise UsageError(f"cannot write the report {args.output}: {e}") from None
        model = setup.model.to(dev_env.device)

        if not args.merge_only:
            pending = state.pending(done)
            mine = len(state.pending({}))
            _logger.info("%s%d examples in %d chunks of %d; this shard: %d chunks, %d already done, %d to do; "
                         "state in %s", tag, n, len(state.chunks), args.chunk_size or n, mine, mine - len(pending),
                         len(pending), state_dir)
            state.begin_run({"device": str(dev_env.device)})
            eps = float(args.eps) / 255.0
            seen_flags: set = set()
            for k, (start, end) in enumerate(pending):
                t_chunk = time.time()
                x, y = load_chunk(setup.examples, start, end, args.workers)
                clean, robust, flags = evaluate_chunk(model, x, y, threat_model=args.threat_model, eps=eps,
                                                      seed=chunk_seed(args.seed, start), batch_size=args.batch_size,
                                                      device=dev_env.device)
                seconds = time.time() - t_chunk
                for msg in flags:
                    if msg not in seen_flags:  # each distinct check once; the report counts the chunks
                        seen_flags.add(msg)
                        _logger.warning("%sAutoAttack check: %s", tag, msg)
                state.record(start, end, {"clean": clean, "robust": robust},
                             {"seconds": round(seconds, 3), "flags": flags, "seed": chunk_seed(args.seed, start),
                              "device": str(dev_env.device)})
                _logger.info("%sevaluated examples [%d, %d) (%d/%d): clean %d/%d, robust %d/%d, %.1f s, %.1f img/s",
                             tag, start, end, k + 1, len(pending), sum(clean), end - start, sum(robust),
                             end - start, seconds, (end - start) / max(seconds, 1e-9))

        if args.merge_only and not dev_env.primary:
            return None  # torchrun --merge-only: rank 0 alone merges
        merged = state.merge()
        if dev_env.distributed and not args.merge_only:
            if not dev_env.primary:
                _logger.info("%sdone; rank 0 writes the report", tag)
                return None
            last = -1
            while not merged.complete:  # the other ranks' chunks: wait for their state files
                if merged.n_done != last:
                    _logger.info("waiting for the other ranks: %d of %d examples done", merged.n_done, n)
                    last = merged.n_done
                time.sleep(args.poll_seconds)
                merged = state.merge()
        if not merged.complete:
            missing = sum(e - s for s, e in merged.missing)
            if args.merge_only:
                raise EvalStateError(f"cannot merge: {missing} of {n} examples ({len(merged.missing)} chunks, first "
                                     f"[{merged.missing[0][0]}, {merged.missing[0][1]})) have no results in "
                                     f"{state_dir}; run the missing shards first")
            _logger.info("%sfinished; %d of %d examples still to be done by other shards; the last shard to finish "
                         "(or --merge-only) writes the report", tag, missing, n)
            return None
        report = _write_report(args, state, setup, merged, t0)
        if args.log_wandb:
            _log_wandb(args, report)
        return report
    finally:
        shutdown(dev_env)
