"""Data-parallel training across processes: ``torchrun --nproc_per_node N -m retr train ...``.

torchrun starts N copies of ``retr train`` and tells each its place through the environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). Every rank builds
the same model from the same seed and walks the same per-epoch permutation; at each step it
takes a disjoint slice of the global batch (``train.batch_size`` stays the *global* batch, so a
config means the same thing on one process or many). Gradients are averaged by
DistributedDataParallel (gloo on CPU, nccl on GPU), and each rank's loss is weighted by its
share of the step's target positions, so a step follows the gradient of the global mean loss,
as single-process training does. Rank 0 alone evaluates, logs and writes the run directory; the
other ranks wait for its decisions (best score, early stopping, time budget) in a broadcast.

With ``WORLD_SIZE`` unset or 1 nothing here does anything and training is the single-process
loop, bit for bit.

Rendezvous is torchrun's (``env://``) unless ``RETR_DIST_INIT`` names another torch init method,
e.g. ``file:///shared/fs/rdzv`` to meet through a file on a shared filesystem instead of a TCP
store (processes are then started by any launcher that sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from retr.errors import ConfigError


def is_main_process() -> bool:
    """True outside torchrun and on rank 0: the process that may print and write files."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass(frozen=True)
class Context:
    """This process's place among the training processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, indices: np.ndarray) -> tuple[np.ndarray, bool]:
        """(rows this rank runs, whether they count) for one global batch.

        The ranks' parts are disjoint and strided, so their sizes differ by at most one. A rank
        left without rows (a last batch smaller than the world) runs the batch's first row with
        weight zero, because every rank must join every gradient reduction.
        """
        if not self.enabled:
            return indices, True
        part = indices[self.rank::self.world_size]
        return (part, True) if len(part) else (indices[:1], False)


def setup(device: str) -> tuple[Context, torch.device]:
    """Join the process group torchrun describes (if any) and pick this rank's device.

    ``device`` is ``train.device``; under torchrun a CUDA device becomes ``cuda:LOCAL_RANK``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context(), torch.device(device)
    ctx = Context(rank=int(os.environ.get("RANK", "0")), world_size=world,
                  local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    cuda = torch.device(device).type == "cuda"
    if cuda:
        if torch.cuda.device_count() <= ctx.local_rank:
            raise ConfigError(f"train.device = {device!r} with {world} processes needs a GPU "
                              f"per process on this machine; found {torch.cuda.device_count()}")
        torch.cuda.set_device(ctx.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo",
                                init_method=os.environ.get("RETR_DIST_INIT", "env://"),
                                rank=ctx.rank, world_size=world)
    return ctx, torch.device(f"cuda:{ctx.local_rank}") if cuda else torch.device("cpu")


def cleanup(ctx: Context) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, ctx: Context, device: torch.device) -> torch.nn.Module:
    """The module to call in training: DistributedDataParallel around ``model``, or ``model``."""
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, output_device=device.index if ids
                                   else None)


def global_mean(local_mean: torch.Tensor, n_local: int, model: torch.nn.Module, ctx: Context
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(what this rank backpropagates, the global mean loss) for a mean over target positions.

    The global mean is Σ_r n_r·mean_r / Σ_r n_r; DDP averages gradients over the ranks, so
    rank r backpropagates n_r·mean_r·W / Σ n. Every parameter is also touched times zero: DDP
    finishes its gradient reduction only when each parameter got a gradient on every rank,
    including a rank without targets and a parameter the step did not use (a random router).
    """
    local_sum = local_mean * n_local if n_local else local_mean.new_zeros(())
    stats = torch.stack([local_sum.detach().to(torch.float64).reshape(()),
                         torch.tensor(float(n_local), dtype=torch.float64,
                                      device=local_sum.device)])
    dist.all_reduce(stats)
    n_global = float(stats[1])
    keep_all = sum((p.sum() for p in model.parameters() if p.requires_grad),
                   local_sum.new_zeros(())) * 0.0
    scale = ctx.world_size / n_global if n_global else 0.0
    return local_sum * scale + keep_all, (stats[0] / stats[1]).to(local_mean.dtype)


def share_from_main(values: list[float], ctx: Context, device: torch.device) -> list[float]:
    """Rank 0's ``values`` on every rank; the other ranks wait here while rank 0 evaluates."""
    if not ctx.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return [float(v) for v in t.tolist()]


def gather_rng_states(ctx: Context, device: torch.device) -> torch.Tensor:
    """[world, S] CPU RNG states of every rank (row r = rank r), for an exact resume."""
    state = torch.get_rng_state()
    if not ctx.enabled:
        return state[None]
    local = state.to(device)
    rows = [torch.empty_like(local) for _ in range(ctx.world_size)]
    dist.all_gather(rows, local)
    return torch.stack([r.cpu() for r in rows])


def seed_rank(seed: int, ctx: Context) -> None:
    """Give ranks other than 0 their own dropout stream (rank 0 keeps the single-process one)."""
    if ctx.enabled and ctx.rank > 0:
        torch.manual_seed(seed * 1_000_003 + 7_919 * ctx.rank)
