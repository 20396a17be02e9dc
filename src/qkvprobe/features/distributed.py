"""Rank/world information and work splitting for runs launched by ``torchrun`` (one machine or many).

Single machine, N processes (``gloo`` on CPU, ``nccl`` on GPUs — chosen from the device)::

    torchrun --nproc-per-node 4 -m qkvprobe extract --model timm:vit_small_patch16_224.dino \\
        --data imagefolder:/data/imagenet --split train --device cuda --out features/in1k-train

Several machines (same command on every node, a shared filesystem for ``--out``)::

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-id qkv1 \\
        --rdzv-endpoint node0.example:29400 -m qkvprobe extract ... --out /shared/features/in1k-train

Every rank extracts a disjoint set of fixed sample ranges (shards of at most 1024 samples) and writes them;
rank 0 marks the store complete once every shard is on disk. The store is bitwise the same for any number of
processes (same device type and batch size). A killed run is resumed by running the same command again (any
number of processes): only the missing shards are computed. A store with fewer shards than processes leaves
some processes idle. Streamed datasets (``wds:`` tars, ``hfds:`` Parquet files) are split by part instead: each
rank takes whole tars (round-robin over those with missing shards), so no tar is read by two ranks; a dataset
with fewer parts than processes leaves some idle.

Keeping a GPU fed: ``--num-workers N`` decodes and preprocesses in N worker processes per rank (start with
4-8 per GPU; 0 = in the main process, fine on CPU); batches are copied from pinned memory on CUDA; and
``--gpu-decode`` decodes JPEGs of ``imagefolder:`` datasets on the GPU with nvJPEG
(``torchvision.io.decode_jpeg(..., device="cuda")``) and preprocesses them there — use it when the workers
cannot keep up (many large JPEGs, few CPU cores). Its pixels may differ slightly from CPU decoding, so it gets
its own store key.

Evaluation at scale: ``FeatureStore.iter_chunks(token, position, shards=shard_for_rank(range(store.num_shards)))``
streams one shard at a time (memory bounded by one shard), and a hyperparameter sweep can be split with
``shard_for_rank(grid)`` and merged with :func:`all_gather_objects`.

Inside :func:`alone` a process acts as a single one while the group stays up: :func:`dist_info` reports rank 0 of
1, :func:`all_gather_objects` and :func:`broadcast_object` return the process's own object and :func:`barrier`
returns at once. ``qkvprobe run`` evaluates whole units of work per rank that way (a standard C sweep inside a
unit then runs its whole grid alone, as in a single process, instead of waiting for ranks busy elsewhere). Code
that needs a collective goes through these helpers, never ``torch.distributed`` directly, so that it works there.
"""

from __future__ import annotations

import atexit
import datetime
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

#: Extraction ranks can finish far apart (slow storage, uneven shards): don't let the final barrier time out.
BARRIER_TIMEOUT = datetime.timedelta(hours=24)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size`` (global), ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


#: Depth of :func:`alone` blocks in this process (collectives act locally while > 0).
_ALONE = [0]


@contextmanager
def alone() -> Iterator[None]:
    """Within the block this process acts as a single one (module doc); the process group stays up."""
    _ALONE[0] += 1
    try:
        yield
    finally:
        _ALONE[0] -= 1


def _grouped() -> bool:
    """An initialised process group that the collectives use (not inside :func:`alone`)."""
    import torch.distributed as dist

    return _ALONE[0] == 0 and dist.is_available() and dist.is_initialized()


def world_info() -> DistInfo:
    """This process's place in the whole group (rank/world as :func:`dist_info` outside :func:`alone`)."""
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)
    return DistInfo(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), local_rank)


def dist_info() -> DistInfo:
    """Rank/world from an initialised process group, else from torchrun's env vars, else a single process
    (a single process, too, inside :func:`alone`)."""
    if _ALONE[0]:
        return DistInfo()
    return world_info()


def init_distributed(device: str = "cpu") -> DistInfo:
    """Join the process group torchrun described (``nccl`` for CUDA devices, ``gloo`` otherwise); no-op alone."""
    import torch.distributed as dist

    info = world_info()
    if info.distributed and not dist.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        if backend == "nccl":
            import torch

            # NCCL collectives (barrier, object gathers) run on the current device: one GPU per process.
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend, timeout=BARRIER_TIMEOUT)
        # Leave the group at exit even when the caller does not: a live gloo group torn down by interpreter
        # shutdown aborted a rank now and then ("terminate called without an active exception", exit -6)
        # when the other rank had already exited.
        atexit.register(_leave_group)
        info = world_info()
    return dist_info()


def _leave_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def local_device(device: str) -> str:
    """``"cuda"`` → ``"cuda:<LOCAL_RANK>"`` so each process on a node gets its own GPU; else unchanged."""
    if device == "cuda" and world_info().distributed:
        return f"cuda:{world_info().local_rank}"
    return device


def shard_for_rank(items: Sequence[T], rank: int | None = None, world_size: int | None = None) -> list[T]:
    """Round-robin share of ``items`` for ``rank``: items ``rank, rank+N, …`` (disjoint, no padding)."""
    if rank is None or world_size is None:
        info = dist_info()
        rank = info.rank if rank is None else rank
        world_size = info.world_size if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of size {world_size}")
    return list(items)[rank::world_size]


def barrier() -> None:
    """Wait for every rank (no-op without a process group, or inside :func:`alone`)."""
    import torch.distributed as dist

    if _grouped():
        dist.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` alone) — e.g. to merge a ``C`` sweep spread over ranks."""
    import torch.distributed as dist

    if not _grouped():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``obj`` alone)."""
    import torch.distributed as dist

    if not _grouped():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
