"""Several processes, one run: `accelerate launch --num_processes N` (or `torchrun`) sets RANK / WORLD_SIZE.

Every process loads and quantizes the model (the same deterministic result); evaluation windows are split by
rank and the per-window results gathered and combined in window order, so N processes report exactly the
perplexity one process does. Only rank 0 writes files. Objects travel over a gloo process group, which works
on CPU and beside CUDA alike.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> List[int]:
        """The window indices this process evaluates (round robin)."""
        return list(range(self.rank, n, self.world))

    def gather(self, obj: Any) -> List[Any]:
        """Every process's `obj`, in rank order, on every process."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every process."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def ranks_from_env() -> Ranks:
    """The launcher's ranks; joins (or reuses) the process group. One process: no group at all."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
