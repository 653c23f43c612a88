"""Counting across processes: each rank counts a disjoint share of every language's rows.

Counting is a sum over token positions, so shards add up exactly: the int64 counts and token
totals of all ranks are summed with ``all_reduce`` and equal, bit for bit, one process counting
the same rows. Rows go to ranks round-robin (row ``i`` to rank ``i % world``), so the share of a
rank does not depend on how far the others got, and each rank checkpoints and resumes its own
share. Only rank 0 writes the registry and shows progress.

Under ``torchrun`` (or any launcher that sets RANK / WORLD_SIZE / MASTER_ADDR) the process group
is created here: NCCL when the rank has a GPU, gloo on CPU.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator
from datetime import timedelta

import torch

from .errors import NeuronregError


class RankFailed(NeuronregError):
    """Another rank failed. Only rank 0 shows the message; ``silent`` ranks exit quietly."""

    def __init__(self, message: str, silent: bool):
        super().__init__(message)
        self.silent = silent


class Ranks:
    """One process (world 1) or one rank of a process group; the same calls either way."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, group: bool = False, owns: bool = False):
        self.rank, self.world, self.local_rank, self.group = rank, world, local_rank, group
        self.owns = owns  # this object created the process group, so it also ends it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str | None = None) -> Ranks:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        owns = not dist.is_initialized()
        if owns:
            cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
            if cuda:
                torch.cuda.set_device(local)
            dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30))
        return cls(rank, world, local, group=True, owns=owns)

    def device(self, requested: str | None) -> str | None:
        """Each rank of a node takes its own GPU."""
        if self.group and torch.cuda.is_available() and (requested is None or requested == "cuda"):
            return f"cuda:{self.local_rank}"
        return requested

    def shard(self, rows: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        return itertools.islice(iter(rows), self.rank, None, self.world) if self.world > 1 else iter(rows)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise sum over ranks (a CPU tensor in, a CPU tensor out)."""
        if self.world == 1:
            return tensor
        import torch.distributed as dist

        # NCCL reduces GPU tensors only; gloo takes CPU ones.
        on = f"cuda:{self.local_rank}" if dist.get_backend() == "nccl" else "cpu"
        work = tensor.to(on).contiguous()
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        return work.cpu()

    def check(self, error: BaseException | None) -> None:
        """Every rank learns whether any rank failed; the first failure is raised everywhere."""
        if self.world == 1:
            if error is not None:
                raise error
            return
        import torch.distributed as dist

        messages: list = [None] * self.world
        dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}"
                               if not isinstance(error, NeuronregError) else str(error))
        failed = [(rank, m) for rank, m in enumerate(messages) if m is not None]
        if not failed:
            return
        if error is not None and self.is_main:
            raise error
        rank, message = failed[0]
        raise RankFailed(f"rank {rank}: {message}", silent=not self.is_main) from error

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        """End a process group this object created (a gloo group left to the interpreter's exit
        can abort the process while its threads are torn down)."""
        if self.owns:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.owns = False

    def checkpoint_suffix(self) -> str:
        return f".rank{self.rank}-of-{self.world}" if self.world > 1 else ""
