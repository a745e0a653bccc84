"""Data-parallel helpers: which slice of the work this process owns under ``torchrun`` / ``accelerate launch``.

Both launchers set ``RANK`` and ``WORLD_SIZE`` (and ``MASTER_ADDR`` / ``MASTER_PORT``); splitting needs nothing
more. A process group (gloo, so it works on CPU) is only set up where ranks must wait for each other -- before
the one merge at the end -- and only when the launcher gave a rendezvous address.

>>> rank_slice(10, batch_size=3, rank=0, world=2), rank_slice(10, batch_size=3, rank=1, world=2)
(range(0, 6), range(6, 10))
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch


def rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` from ``RANK`` / ``WORLD_SIZE`` (``(0, 1)`` when not launched data-parallel)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError as err:
        raise ValueError(f"RANK / WORLD_SIZE must be integers ({err})") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE={world})")
    return rank, world


def rank_slice(n: int, batch_size: int, rank: int, world: int) -> range:
    """The items ``rank`` owns: a contiguous run of whole batches (batches start at multiples of
    ``batch_size``, as in a single-process run, so the parts concatenated in rank order are that run)."""
    n_batches = -(-n // batch_size)
    per = -(-n_batches // world)
    return range(min(n, rank * per * batch_size), min(n, (rank + 1) * per * batch_size))


def barrier(timeout_s: float = 1800.0) -> None:
    """Wait for every rank (gloo). Initialises the default process group from the launcher's environment
    when none exists; a no-op for a single process."""
    rank, world = rank_world()
    if world == 1:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise RuntimeError("data-parallel run without MASTER_ADDR / MASTER_PORT: launch it with torchrun or "
                               "accelerate launch (they set the rendezvous), or set both yourself")
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    if dist.get_backend() == "gloo":
        dist.barrier()
    else:  # e.g. an NCCL group set up by accelerate: a tiny all-reduce on the device it uses
        dist.all_reduce(torch.zeros(1, device=f"cuda:{torch.cuda.current_device()}"
                                    if torch.cuda.is_available() else "cpu"))
