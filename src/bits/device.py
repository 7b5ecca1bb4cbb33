"""Device environment: CPU, CUDA (and, through a seam, XLA) behind one small object.

This is what timm's unmerged ``timm.bits`` provided to the original: the device, the distributed
rank / world size, a primary-process flag, autocast, DDP wrapping and metric reduction. The
distributed setup comes from torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``), or
from ``--local-rank`` as passed by the older ``python -m torch.distributed.launch``.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Optional, Sequence

import torch
import torch.distributed as dist

from src.errors import UsageError

_logger = logging.getLogger("robust_vits")


@dataclass
class DeviceEnv:
    """Where tensors live and how processes talk to each other."""

    device: torch.device
    world_size: int = 1
    global_rank: int = 0
    local_rank: int = 0
    amp: bool = False
    amp_dtype: torch.dtype = torch.bfloat16
    channels_last: bool = False
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def type(self) -> str:
        return self.device.type

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def primary(self) -> bool:
        return self.global_rank == 0

    @property
    def local_primary(self) -> bool:
        return self.local_rank == 0

    def autocast(self):
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def create_grad_scaler(self) -> Optional["torch.amp.GradScaler"]:
        """A grad scaler only where it is needed: float16 autocast on CUDA."""
        if self.amp and self.amp_dtype == torch.float16 and self.device.type == "cuda":
            return torch.amp.GradScaler("cuda")
        return None

    def to_device(self, *tensors: torch.Tensor):
        mf = torch.channels_last if self.channels_last else None
        out = []
        for t in tensors:
            if t is None:
                out.append(None)
                continue
            if mf is not None and t.dim() == 4 and t.is_floating_point():
                out.append(t.to(self.device, non_blocking=True, memory_format=mf))
            else:
                out.append(t.to(self.device, non_blocking=True))
        return out[0] if len(out) == 1 else tuple(out)

    def to_model_device(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def wrap_distributed(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        if self.device.type == "cuda":
            return DDP(model, device_ids=[self.device.index])
        return DDP(model)

    def mark_step(self) -> None:
        """Graph cut on XLA; nothing to do on CPU and CUDA."""

    def reduce_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """Average gradients over processes before clipping and stepping; DDP already did it
        during ``backward`` on CPU and CUDA (XLA has no DDP and does it here)."""

    def distribute_bn(self, model: torch.nn.Module, reduce: bool) -> None:
        """BatchNorm running statistics across processes: averaged (``reduce``) or rank 0's."""
        if self.distributed:
            from timm.utils import distribute_bn

            distribute_bn(model, self.world_size, reduce)

    def wrap_loader(self, loader: Iterable, mp_loader: bool = False) -> Iterable:
        """``--use-mp-loader`` wraps loaders on XLA; CPU and CUDA loaders are used as they are."""
        return loader

    def warn_unsuited_attack(self, name: str) -> None:
        """Warn when an attack is known to be impractical on this device (AutoAttack on XLA)."""

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place all-reduce (sum or mean) across processes; identity when not distributed."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            if op == "mean":
                tensor /= self.world_size
        return tensor

    def all_gather_object(self, obj: Any) -> list:
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else default


def resolve_amp_dtype(amp_dtype: Optional[str], cuda: bool) -> torch.dtype:
    """``--amp-dtype``: ``auto`` is float16 on CUDA (with a grad scaler: the original's ``--amp``) and
    bfloat16 on the CPU (and XLA, which has its own environment)."""
    if amp_dtype in (None, "", "auto"):
        amp_dtype = "float16" if cuda else "bfloat16"
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(amp_dtype)
    if dtype is None:
        raise UsageError(f"--amp-dtype must be auto, bfloat16 or float16, got {amp_dtype}")
    return dtype


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX, as oneDNN sees it).

    Without it, bfloat16 autocast on the CPU is emulated: measured 37x slower than float32 for a
    resnet18 PGD-2 training step on an AVX2 EPYC (benchmarks/RESULTS.md)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX")


def initialize_device(force_cpu: bool = False, amp: bool = False, amp_dtype: str = "auto",
                      channels_last: bool = False, local_rank: Optional[int] = None,
                      xla: Optional[bool] = None) -> DeviceEnv:
    """Pick the device (XLA when asked for, else CUDA when present, else CPU) and set up distribution.

    ``xla=None`` uses XLA when ``PJRT_DEVICE`` is set (launch_xla.py sets it) and ``--force-cpu`` is
    not given; the XLA environment lives in ``src.bits.device_xla``, which says clearly when
    torch_xla is missing.
    """
    if xla is None:
        xla = bool(os.environ.get("PJRT_DEVICE")) and not force_cpu
    if xla:
        from src.bits.device_xla import initialize_xla_device

        return initialize_xla_device(amp=amp, amp_dtype=amp_dtype, channels_last=channels_last)

    world_size = _env_int("WORLD_SIZE", 1)
    global_rank = _env_int("RANK", 0)
    if local_rank is None:
        local_rank = _env_int("LOCAL_RANK", 0)
    use_cuda = torch.cuda.is_available() and not force_cpu
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dtype = resolve_amp_dtype(amp_dtype, use_cuda)
    if amp and dtype == torch.float16 and not use_cuda:
        raise UsageError("--amp-dtype float16 needs a CUDA device; use bfloat16 on the CPU")
    if amp and not use_cuda and global_rank == 0 and not cpu_has_native_bf16():
        _logger.warning("--amp: this CPU has no native bfloat16 instructions (%s); bfloat16 autocast is "
                        "emulated and runs many times slower than float32 here: drop --amp on this machine",
                        torch.backends.cpu.get_cpu_capability())
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=backend, world_size=world_size, rank=global_rank)
    env = DeviceEnv(device=device, world_size=world_size, global_rank=global_rank, local_rank=local_rank,
                    amp=amp, amp_dtype=dtype, channels_last=channels_last)
    if env.distributed:
        _logger.info("distributed: process %d of %d on %s (%s)", global_rank, world_size, device,
                     dist.get_backend())
    return env


def shutdown(dev_env: DeviceEnv) -> None:
    if dev_env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def tree_to_cpu(obj: Any) -> Any:
    """A copy of ``obj`` (nested dicts / lists / tuples) with every tensor on the CPU.

    Checkpoints hold CPU tensors whatever device trained them, so a file written on XLA or CUDA
    loads anywhere, also where torch_xla is not installed (``xm.save`` semantics). CPU tensors are
    not copied.
    """
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return type(obj)((k, tree_to_cpu(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(tree_to_cpu(v) for v in obj)
    return obj


def reduce_sums(dev_env: DeviceEnv, values: Sequence[float], device: Optional[torch.device] = None) -> list:
    """Sum a list of numbers across processes (one collective), returned as Python floats."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64,
                     device=device or (dev_env.device if dev_env.type != "cpu" else torch.device("cpu")))
    dev_env.all_reduce_(t, "sum")
    return [float(v) for v in t.tolist()]
