"""Training on several processes (torchrun, accelerate launch): accelerate's DDP, or PyTorch's FSDP2, around the
student; each rank's share of a micro-batch; and the sums over ranks that keep N processes' steps equal to one's.

train.batch_size is the global micro-batch: rank r of N takes rows [r*b/N, (r+1)*b/N) of every micro-batch, so
the optimizer steps do not depend on N. Each rank's loss is a mean over its own trained positions; scaled by
N * n_rank / n_all before DDP (or FSDP's reduce-scatter) averages the gradients, it is the mean over all of the
micro-batch's positions.

With FSDP (train.parallel: fsdp) every decoder block of the student (with LoRA its frozen base weights too) and of
the teacher is sharded across the ranks and gathered only for its own forward and backward; checkpoints hold the
full tensors (gathered when saved, sharded again when loaded), in the same files as one process writes, so a run
resumes on any number of processes.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable, ContextManager, Iterator, Optional, Sequence, TypeVar

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from distill.errors import DistillError
from distill.runtime import barrier, gather_from_ranks, process_rank

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

    def __init__(self, device: torch.device, parallel: str = "ddp"):
        self.rank, self.world = process_rank()
        self.device = device
        self.fsdp = parallel == "fsdp" and self.world > 1
        self.accelerator = None
        if self.world > 1:
            from accelerate import Accelerator  # only a multi-process run needs the process group

            self.accelerator = Accelerator(cpu=device.type == "cpu")
            distributed = self.accelerator.distributed_type.value
            if distributed not in ("MULTI_CPU", "MULTI_GPU"):
                raise DistillError(f"accelerate: distributed type {distributed} is not supported; launch with "
                                   "torchrun or accelerate launch --multi_gpu, and set train.parallel: fsdp for FSDP")

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

    def wrap(self, module: LossThroughWrapper, blocks: Sequence[torch.nn.Module]) -> torch.nn.Module:
        """The module gradients flow through: itself alone; DDP (via accelerate); or with FSDP, each of `blocks`
        (the student's decoder blocks) a sharded unit and the rest (embeddings, head, projections) the root's."""
        if self.accelerator is None:
            return module
        if not self.fsdp:
            return self.accelerator.prepare_model(module)
        from torch.distributed.fsdp import fully_shard

        mesh = self._mesh()
        for block in blocks:
            fully_shard(block, mesh=mesh)
        return fully_shard(module, mesh=mesh)

    def shard_frozen(self, blocks: Sequence[torch.nn.Module]) -> None:
        """With FSDP, shard a frozen model's decoder blocks too (the teacher: gathered block by block, no grads)."""
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard

            mesh = self._mesh()
            for block in blocks:
                # Each block is a root of its own, which FSDP would by default keep gathered after its forward (for
                # the backward a frozen model never has): the whole teacher on every rank after its first forward.
                fully_shard(block, mesh=mesh, reshard_after_forward=True)

    def _mesh(self):
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(self.device.type, (self.world,))

    def syncing(self, wrapped: torch.nn.Module, last_micro_batch: bool) -> ContextManager:
        """No gradient reduction until the step's last micro-batch (its backward reduces the accumulated sum)."""
        if self.accelerator is None or last_micro_batch:
            return nullcontext()
        if self.fsdp:
            return _fsdp_no_sync(wrapped)
        return self.accelerator.no_sync(wrapped)

    def full_state(self, state: dict) -> dict:
        """A state dict with every sharded tensor gathered whole on the CPU (every rank must call it, in step)."""
        return {key: _full(value) for key, value in state.items()}

    def kept_copy(self, module: torch.nn.Module) -> Optional[dict[str, torch.Tensor]]:
        """A CPU copy of the module's whole weights (train.keep_best's best step); every rank must call it in step
        under FSDP, which gathers them, and only rank 0, the one that writes them, keeps the copy there."""
        state = module.state_dict()
        if not self.fsdp:
            return {key: value.detach().to("cpu", copy=True) for key, value in state.items()}
        whole = {key: _full(value) if isinstance(value, DTensor) else value.detach().to("cpu", copy=True)
                 for key, value in state.items()}
        return whole if self.main else None

    def rank0s(self, value: T) -> T:
        """Rank 0's value on every rank (held-out metrics: keep_best and patience then decide alike everywhere,
        which FSDP's gathers need)."""
        return value if self.world == 1 else gather_from_ranks(value)[0]

    def full_optimizer_state(self, state: dict) -> dict:
        """optimizer.state_dict() with its sharded moments gathered whole (every rank must call it, in step)."""
        return {**state, "state": {i: self.full_state(moments) for i, moments in state["state"].items()}}

    def sharded_optimizer_state(self, full: dict, optimizer: torch.optim.Optimizer) -> dict:
        """A saved (whole) optimizer state, each moment sharded like the parameter it belongs to."""
        if not self.fsdp:
            return full
        params = [p for group in optimizer.param_groups for p in group["params"]]
        state = {}
        for index, moments in full["state"].items():
            param = params[int(index)]
            state[index] = {key: _like(value, param) for key, value in moments.items()}
        return {**full, "state": state}

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean of every rank's `values` (detached; ranks may hold different counts)."""
        if self.accelerator is None:
            return values.detach().mean()
        both = torch.stack([values.detach().sum(), torch.tensor(values.numel(), dtype=values.dtype,
                                                                device=values.device)]).to(torch.float64)
        total, count = self.accelerator.reduce(both.to(self.accelerator.device), "sum").tolist()
        return torch.tensor(total / count, dtype=values.dtype, device=values.device)

    def sums(self, values: Sequence[float]) -> list[float]:
        """Each value summed over the ranks (float64, so token counts stay exact)."""
        if self.accelerator is None:
            return [float(v) for v in values]
        total = torch.tensor(list(values), dtype=torch.float64, device=self.accelerator.device)
        return self.accelerator.reduce(total, "sum").tolist()

    def unsharded(self, wrapped: torch.nn.Module, run: Callable[[], T]) -> T:
        """Run a no-gradient pass over the student (held-out evaluation, on-policy sampling): with FSDP through the
        root, which gathers the shards it needs; else directly."""
        if not self.fsdp:
            return run()
        with torch.no_grad():
            return wrapped(run)

    def grad_norm(self, norm: torch.Tensor) -> float:
        """clip_grad_norm_'s total norm as a number (with FSDP a DTensor over the shards' norms)."""
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)

    def wait(self) -> None:
        """Every rank waits here for the others (after rank 0 writes what they read next)."""
        barrier()


@contextmanager
def _fsdp_no_sync(wrapped: torch.nn.Module) -> Iterator[None]:
    wrapped.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        wrapped.set_requires_gradient_sync(True)


def _full(value):
    return value.full_tensor().cpu() if isinstance(value, DTensor) else value


def _like(value, param: torch.Tensor):
    """A whole tensor of a parameter's shape, sharded as that parameter is; anything else as it is."""
    if isinstance(param, DTensor) and isinstance(value, torch.Tensor) and value.shape == param.shape:
        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
    return value
