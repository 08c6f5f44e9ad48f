"""Training on several processes (torchrun, accelerate launch): accelerate's DDP around the student, each rank's
share of a micro-batch, and the sums over ranks that keep N processes' steps equal to one process's.

train.batch_size is the global micro-batch: rank r of N takes rows [r*b/N, (r+1)*b/N) of every micro-batch, so
the optimizer steps do not depend on N. Each rank's loss is a mean over its own trained positions; scaled by
N * n_rank / n_all before DDP averages the gradients, it is the mean over all of the micro-batch's positions.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager, Sequence, TypeVar

import torch

from distill.errors import DistillError
from distill.runtime import process_rank

T = TypeVar("T")


class LossThroughWrapper(torch.nn.Module):
    """The student (and the hidden-state projections) as one module whose forward runs a loss closure.

    DDP reduces gradients only after a forward through its wrapper; running the chunked loss as the wrapper's
    forward keeps that loss as it is (the head is used outside the HF forward, never as [batch, seq, vocab]).
    """

    def __init__(self, student: torch.nn.Module, matcher: torch.nn.Module | None = None):
        super().__init__()
        self.student = student
        self.matcher = matcher

    def forward(self, loss: Callable[[], T]) -> T:  # type: ignore[override]
        return loss()


class Ranks:
    """This process's place among the training processes, and the collectives the loop needs."""

    def __init__(self, device: torch.device):
        self.rank, self.world = process_rank()
        self.accelerator = None
        if self.world > 1:
            from accelerate import Accelerator  # only a multi-process run needs the process group

            self.accelerator = Accelerator(cpu=device.type == "cpu")
            distributed = self.accelerator.distributed_type.value
            if distributed not in ("MULTI_CPU", "MULTI_GPU"):
                raise DistillError(f"accelerate: distributed type {distributed} is not supported yet; distill "
                                   "trains with DDP (accelerate launch --multi_gpu, or torchrun)")

    @property
    def main(self) -> bool:
        """Whether this process writes the run's files (checkpoints, metrics, the student)."""
        return self.rank == 0

    def check_batch(self, batch_size: int) -> None:
        """Refuse a micro-batch that does not split evenly across the processes (every rank refuses alike)."""
        if batch_size % self.world:
            raise DistillError(f"train.batch_size: {batch_size} rows do not split across {self.world} processes; "
                               f"use a multiple of {self.world} (it is the global micro-batch)")

    def share(self, indices: Sequence[int]) -> list[int]:
        """This rank's rows of a global micro-batch."""
        per = len(indices) // self.world
        return list(indices[self.rank * per:(self.rank + 1) * per])

    def wrap(self, module: LossThroughWrapper) -> torch.nn.Module:
        """The module gradients flow through: DDP (via accelerate) on several processes, itself alone."""
        return module if self.accelerator is None else self.accelerator.prepare_model(module)

    def syncing(self, wrapped: torch.nn.Module, last_micro_batch: bool) -> ContextManager:
        """No gradient all-reduce until the step's last micro-batch (its backward reduces the accumulated sum)."""
        if self.accelerator is None or last_micro_batch:
            return nullcontext()
        return self.accelerator.no_sync(wrapped)

    def sums(self, values: Sequence[float]) -> list[float]:
        """Each value summed over the ranks (float64, so token counts stay exact)."""
        if self.accelerator is None:
            return [float(v) for v in values]
        total = torch.tensor(list(values), dtype=torch.float64, device=self.accelerator.device)
        return self.accelerator.reduce(total, "sum").tolist()

    def wait(self) -> None:
        """Every rank waits here for the others (after rank 0 writes what they read next)."""
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()
