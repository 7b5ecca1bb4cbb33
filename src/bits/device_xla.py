"""XLA device environment (PJRT runtime: TPU VMs, and PJRT's CPU backend in the test lane).

What the original got from timm's unmerged ``timm.bits`` on TPU, rebuilt over torch_xla 2.x:
the device and replica ordinals from ``torch_xla.runtime``, a graph cut per training step and
per PGD step (``mark_step``), the gradient all-reduce before the optimizer step (no DDP on XLA),
metric sums kept on the device and all-reduced once, bfloat16 autocast, ``MpDeviceLoader`` for
``--use-mp-loader``, and checkpoints written by the primary replica with tensors moved to the CPU
(the checkpoint manager does that for every backend, see ``src.bits.device.tree_to_cpu``).

Replicas must build identical graphs around every collective, so nothing here branches on the
ordinal inside a graph (broadcasts multiply by a 1/0 mask that is data), and object collectives
(``broadcast_object``, ``all_gather_object``, ``barrier``) are tensor all-reduces too.

Collectives on PJRT's CPU backend with more than one device do not work in torch_xla 2.9 (each
replica thread compiles its own executable, XLA gives the two all-reduces different op ids and
its rendezvous aborts the process; torch_xla issue #9089). launch_xla.py therefore refuses
``--num-devices`` > 1 with ``PJRT_DEVICE=CPU``; the CPU lane tests one device.

Input gradients through an eval-mode BatchNorm fail in torch_xla 2.9 ("The size of mean should be
compatible with feature count, but the size of offset factor is 0"), which breaks every attack
crafted in eval mode, the default ``--attack-mode``. The original crafted in train mode on XLA;
here :func:`install_eval_batch_norm` computes eval-mode batch norm on XLA tensors with plain
tensor ops instead (the same formula), so both modes work on every backend.

torch_xla is imported lazily (it lives in its own venv, requirements-tpu.txt); the main test
suite exercises this module with a fake torch_xla (tests/test_device_xla.py).
"""
from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass, field
from typing import Any, Iterable, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from src.bits.device import DeviceEnv
from src.errors import UsageError

_logger = logging.getLogger("robust_vits")

SLOW_ATTACKS_ON_XLA = ("apgd-ce", "autoattack")


@dataclass
class XlaDeviceEnv(DeviceEnv):
    """A :class:`DeviceEnv` on an XLA device; one instance per replica (process or thread)."""

    hardware: str = "TPU"
    modules: Any = field(default=None, repr=False)  # namespace with xm, pl, torch_xla

    @property
    def xm(self):
        return self.modules.xm

    def mark_step(self) -> None:
        """Cut the lazy graph and launch it (asynchronously)."""
        self.modules.sync()

    def to_model_device(self, model: nn.Module) -> nn.Module:
        """Move to the device; replicas start from the primary's parameters (as DDP guarantees
        elsewhere): replicas sharing one process also share its random generator, so identical
        seeds do not guarantee identical initial weights."""
        model = super().to_model_device(model)
        self.broadcast_tensors_(list(model.parameters()) + list(model.buffers()))
        return model

    def broadcast_tensors_(self, tensors: List[torch.Tensor]) -> None:
        """Overwrite ``tensors`` in place with the primary's values.

        Every replica multiplies by a 1/0 mask that is data, not a constant, so all replicas build
        the same graph (``xm.broadcast_master_param`` branches on the ordinal).
        """
        if not self.distributed or not tensors:
            return
        # shape [1], not a 0-d tensor: torch_xla turns 0-d values 0 and 1 into graph constants
        mask = torch.full((1,), 1.0 if self.primary else 0.0).to(self.device).reshape(())
        with torch.no_grad():
            for t in tensors:
                t.mul_(mask.to(t.dtype))
        self.xm.all_reduce(self.xm.REDUCE_SUM, tensors)
        self.mark_step()

    def wrap_distributed(self, model: nn.Module) -> nn.Module:
        """No DDP on XLA: :meth:`reduce_gradients` averages the gradients instead."""
        return model

    def reduce_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """Average the gradients over the replicas (what ``xm.optimizer_step`` does before
        stepping), before clipping and the finiteness check see them."""
        if self.distributed:
            self.xm.reduce_gradients(optimizer)
            self.mark_step()

    def all_reduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.distributed:
            scale = 1.0 / self.world_size if op == "mean" else 1.0
            self.xm.all_reduce(self.xm.REDUCE_SUM, [tensor], scale=scale)
            self.mark_step()
        return tensor

    def barrier(self) -> None:
        if self.distributed:
            self.all_reduce_(torch.zeros(1, device=self.device)).cpu()

    def _gather_pickles(self, obj: Any) -> List[bytes]:
        """Every replica's pickled ``obj``, in ordinal order: each replica fills its own row of a
        zero table, and two sum all-reduces (row lengths, then the rows) give everyone the table."""
        payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(torch.int32)
        sizes = torch.zeros(self.world_size, dtype=torch.int32)
        sizes[self.global_rank] = payload.numel()
        sizes = self.all_reduce_(sizes.to(self.device)).cpu()
        table = torch.zeros(self.world_size, int(sizes.max()), dtype=torch.int32)
        table[self.global_rank, :payload.numel()] = payload
        table = self.all_reduce_(table.to(self.device)).cpu()
        return [table[r, :int(sizes[r])].to(torch.uint8).numpy().tobytes() for r in range(self.world_size)]

    def all_gather_object(self, obj: Any) -> List[Any]:
        """Every replica's ``obj`` (picklable), in ordinal order."""
        if not self.distributed:
            return [obj]
        return [pickle.loads(b) for b in self._gather_pickles(obj)]

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Replica ``src``'s ``obj`` on every replica."""
        if not self.distributed:
            return obj
        return pickle.loads(self._gather_pickles(obj if self.global_rank == src else None)[src])

    def distribute_bn(self, model: nn.Module, reduce: bool) -> None:
        """BatchNorm running statistics: averaged over replicas (``reduce``) or the primary's."""
        if not self.distributed:
            return
        stats = [b for n, b in model.named_buffers() if "running_mean" in n or "running_var" in n]
        if not stats:
            return
        if reduce:
            self.xm.all_reduce(self.xm.REDUCE_SUM, stats, scale=1.0 / self.world_size)
            self.mark_step()
        else:
            self.broadcast_tensors_(stats)

    def wrap_loader(self, loader: Iterable, mp_loader: bool = False) -> Iterable:
        """``--use-mp-loader``: torch_xla's ``MpDeviceLoader`` moves batches to the device in a
        background thread, overlapping the host-to-device copy with the step."""
        if not mp_loader:
            return loader
        return self.modules.MpDeviceLoader(loader, self.device)

    def warn_unsuited_attack(self, name: str) -> None:
        if name in SLOW_ATTACKS_ON_XLA:
            _logger.warning("--attack %s on XLA: AutoAttack/APGD change their graph every iteration, so XLA "
                            "recompiles constantly and the evaluation can take unreasonably long (the original "
                            "README advises against it); evaluate with these attacks on a CPU or GPU instead",
                            name)


def eval_batch_norm(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                    weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """Eval-mode batch norm, ``(x - mean) / sqrt(var + eps) * weight + bias`` over dim 1, in ops
    whose input gradient torch_xla can compute."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = scale * weight
    out = (x - running_mean.view(shape)) * scale.view(shape)
    return out + bias.view(shape) if bias is not None else out


def install_eval_batch_norm() -> None:
    """Route eval-mode ``F.batch_norm`` calls on XLA tensors through :func:`eval_batch_norm`.

    Patches ``torch.nn.functional.batch_norm`` (every BatchNorm module and timm's BatchNormAct
    call it through the module attribute) in the process that runs on XLA; other calls go to
    the original function unchanged. Idempotent.
    """
    original = F.batch_norm
    if getattr(original, "_xla_eval_patch", False):
        return

    def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                   eps=1e-5):
        if training or running_mean is None or running_var is None or input.device.type != "xla":
            return original(input, running_mean, running_var, weight, bias, training, momentum, eps)
        return eval_batch_norm(input, running_mean, running_var, weight, bias, eps)

    batch_norm._xla_eval_patch = True
    F.batch_norm = batch_norm


@dataclass
class _Modules:
    xm: Any
    torch_xla: Any
    MpDeviceLoader: Any

    def sync(self) -> None:
        sync = getattr(self.torch_xla, "sync", None)
        if sync is not None:
            sync()
        else:  # torch_xla < 2.6
            self.xm.mark_step()


def import_torch_xla() -> _Modules:
    """The torch_xla modules this layer uses; a clear error where torch_xla is not installed."""
    try:
        import torch_xla
        import torch_xla.core.xla_model as xm
        from torch_xla.distributed.parallel_loader import MpDeviceLoader
    except ImportError as e:
        raise UsageError(f"XLA requested (PJRT_DEVICE is set) but torch_xla cannot be imported ({e}); install "
                         "requirements-tpu.txt in a separate venv (see the README, 'TPU VMs'), or unset "
                         "PJRT_DEVICE to run on the CPU/GPU") from None
    return _Modules(xm=xm, torch_xla=torch_xla, MpDeviceLoader=MpDeviceLoader)


def initialize_xla_device(amp: bool = False, amp_dtype: str = "auto",
                          channels_last: bool = False) -> XlaDeviceEnv:
    """The XLA environment of this replica (call it inside the function ``xmp.spawn`` runs)."""
    if amp and amp_dtype not in ("bfloat16", "auto", "", None):
        raise UsageError(f"--amp-dtype {amp_dtype} is not available on XLA; use bfloat16")
    mods = import_torch_xla()
    from torch_xla import runtime as xr

    install_eval_batch_norm()
    device = mods.torch_xla.device()
    env = XlaDeviceEnv(device=device, world_size=int(xr.world_size()), global_rank=int(xr.global_ordinal()),
                       local_rank=int(xr.local_ordinal()), amp=amp, amp_dtype=torch.bfloat16,
                       channels_last=channels_last, hardware=str(xr.device_type() or "TPU"), modules=mods)
    if env.primary:
        _logger.info("XLA (%s): replica %d of %d on %s", env.hardware, env.global_rank, env.world_size, device)
    return env
