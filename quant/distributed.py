"""Data-parallel e2e optimisation under ``torchrun`` (``torch.nn.parallel.DistributedDataParallel``).

``torchrun --nproc-per-node N -m quant.run ...`` starts N processes; :func:`setup` joins them (NCCL on GPUs, each
process on ``cuda:LOCAL_RANK``; gloo on the CPU). Every rank draws the same global batch indices from the seeded
sampler and takes its contiguous shard (:meth:`Dist.shard`), runs the FP teacher on it, and scales its loss by
``n_rank * N / B`` so that DDP's gradient average equals the gradient of the single-process loss (a mean over the
``B`` images of the global batch, plus the refinement L2 once)::

    (1/N) sum_r grad(n_r N / B * (mse_r + kl_r + l2 * |dW|^2)) = grad(sum_r n_r / B (mse_r + kl_r) + l2 * |dW|^2)

Data preparation (data-free synthesis, the calibration cache) runs on rank 0 while the others wait on a gloo
group with a long timeout (:meth:`Dist.main_first`); a :class:`~lowbit.errors.UserError` there reaches every rank.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from lowbit.errors import UserError

PREP_TIMEOUT = datetime.timedelta(days=2)  # rank 0 may synthesize / decode for hours while the others wait


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    group: Any = None  # gloo group for coordination (object broadcasts, long barriers)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, idx: Tensor) -> Tensor:
        """This rank's contiguous part of a global batch of indices (sizes differ by at most one)."""
        return torch.tensor_split(idx, self.world)[self.rank] if self.enabled else idx

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        if not self.enabled:
            return model
        import inspect

        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [device.index] if device.type == "cuda" else None
        # buffers (quantizer flags) are equal on every rank: sync them once at construction, not every forward
        quiet = "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
        return DDP(model, device_ids=ids, **({"forward_sync_buffers": False} if quiet else {"broadcast_buffers": False}))

    def all_sum(self, value: Tensor) -> Tensor:
        if not self.enabled:
            return value
        import torch.distributed as dist
        value = value.detach().clone()
        dist.all_reduce(value)
        return value

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist
            dist.barrier(group=self.group)

    def main_first(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0 while the other ranks wait; then return its result on rank 0 and None elsewhere.
        A :class:`UserError` (or any failure) on rank 0 is raised on every rank."""
        if not self.enabled:
            return fn()
        import torch.distributed as dist
        status, out = [None], None
        if self.is_main:
            try:
                out = fn()
            except UserError as e:
                status[0] = ("user", str(e))
            except BaseException as e:  # noqa: BLE001 - tell the others before dying
                status[0] = ("fail", f"rank 0 failed: {type(e).__name__}: {e}")
                dist.broadcast_object_list(status, src=0, group=self.group)
                raise
        dist.broadcast_object_list(status, src=0, group=self.group)
        if status[0] is not None:
            kind, msg = status[0]
            if kind == "user":
                raise UserError(msg)
            raise RuntimeError(msg)
        return out

    def close(self) -> None:
        if self.enabled:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()


_OWNED = [False]  # whether setup() created the default process group (then shutdown() destroys it)


def shutdown() -> None:
    """Leave the process group :func:`setup` created (end of ``quant.run``); one made by the caller stays."""
    import torch.distributed as dist
    if _OWNED[0] and dist.is_initialized():
        dist.destroy_process_group()
    _OWNED[0] = False


def world_from_env() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def setup(device: torch.device) -> "tuple[Dist, torch.device]":
    """Join the ``torchrun`` process group when ``WORLD_SIZE > 1`` (or use the one the caller initialised);
    returns the :class:`Dist` and this rank's device (``cuda:LOCAL_RANK`` for ``--device cuda``)."""
    world = world_from_env()
    if world <= 1:
        return Dist(), device
    import torch.distributed as dist
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    if dist.is_initialized():
        if device.type == "cuda":
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        return Dist(dist.get_rank(), dist.get_world_size(), local,
                    dist.new_group(backend="gloo", timeout=PREP_TIMEOUT)), device
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise UserError(f"torchrun process {local} on this node but only {torch.cuda.device_count()} CUDA "
                            f"device(s); use --nproc-per-node <= {torch.cuda.device_count()}")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    _OWNED[0] = True
    group = dist.new_group(backend="gloo", timeout=PREP_TIMEOUT)
    return Dist(rank, world, local, group), device


def check_args(method: str, device_arg: str, batch_size: int, world: Optional[int] = None) -> None:
    """Refuse what the data-parallel run does not support, before any process group exists."""
    world = world_from_env() if world is None else world
    if world <= 1:
        return
    if method != "e2e":
        raise UserError(f"--method {method} runs in one process; data-parallel (torchrun) is for --method e2e: "
                        f"run it with plain python -m quant.run")
    if device_arg.startswith("cuda:"):
        raise UserError(f"--device {device_arg}: under torchrun each process uses cuda:LOCAL_RANK; pass --device cuda")
    if batch_size < world:
        raise UserError(f"--batch-size {batch_size} is the global batch; it must be >= the {world} torchrun "
                        f"processes")
