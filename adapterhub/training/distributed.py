"""Multi-process training: set up ``torch.distributed`` from the launcher's environment, average gradients.

When ``accelerate launch`` or ``torchrun`` set ``WORLD_SIZE``, every rank takes its share of each
global batch (:class:`adapterhub.training.loop.Trainer`) and the gradients of the trainable tensors
are averaged with :func:`allreduce_mean` (gloo on CPU, nccl on CUDA); mask selection uses the
averaged gradients, so every rank holds the same adapter. In a single process every function here
is a no-op.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["allreduce_mean", "get_dist", "init_distributed_from_env", "rank_and_world"]


def get_dist() -> Any:
    """``torch.distributed`` when a process group is initialised, else None."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist
    return None


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, number of processes); ``(0, 1)`` without a process group."""
    dist = get_dist()
    return (dist.get_rank(), dist.get_world_size()) if dist is not None else (0, 1)


def allreduce_mean(tensors: Sequence[torch.Tensor]) -> None:
    """Average each tensor over the ranks, in place (nothing happens in a single process)."""
    dist = get_dist()
    if dist is None:
        return
    ws = dist.get_world_size()
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(ws)


def init_distributed_from_env() -> bool:
    """Initialise torch.distributed when launched by ``accelerate launch``/``torchrun``.

    Returns True when more than one process takes part. Uses nccl on CUDA, gloo otherwise.
    """
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    if ws <= 1:
        return False
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True
