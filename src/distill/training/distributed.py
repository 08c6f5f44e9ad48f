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

With DeepSpeed ZeRO (train.parallel: zero2, zero3; training.zero) accelerate's DeepSpeed engine wraps the student:
it reduces the gradients at the step's last micro-batch, clips them and steps; its partitioned state is gathered
into the same checkpoint files.
"""
from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from typing import Callable, ContextManager, Iterator, Optional, Sequence, TypeVar

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from distill.errors import DistillError
from distill.runtime import barrier, gather_from_ranks, process_rank
from distill.training.zero import ZERO_STAGES, ZeroState, zero_accelerator

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

    def __init__(self, device: torch.device, parallel: str = "ddp", batch_size: int = 1, grad_accum: int = 1,
                 max_grad_norm: Optional[float] = None):
        """`batch_size` (the global micro-batch), `grad_accum` and `max_grad_norm` configure DeepSpeed's engine."""
        self.rank, self.world = process_rank()
        self.device = device
        self.fsdp = parallel == "fsdp" and self.world > 1
        self.zero_stage = ZERO_STAGES.get(parallel) if self.world > 1 else None
        self.zero: Optional[ZeroState] = None  # the engine, once prepare() has built it
        self.accelerator = None
        if self.world > 1:
            from accelerate import Accelerator  # only a multi-process run needs the process group

            if self.zero_stage:
                self.accelerator = zero_accelerator(device, self.zero_stage, max(batch_size // self.world, 1),
                                                    grad_accum, max_grad_norm)
            else:
                self.accelerator = Accelerator(cpu=device.type == "cpu")
            distributed = self.accelerator.distributed_type.value
            if distributed not in (("DEEPSPEED",) if self.zero_stage else ("MULTI_CPU", "MULTI_GPU")):
                raise DistillError(f"accelerate: distributed type {distributed} is not supported with train.parallel: "
                                   f"{parallel}; launch with torchrun or accelerate launch --multi_gpu, and choose "
                                   "FSDP or DeepSpeed ZeRO with train.parallel: fsdp, zero2 or zero3")

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

    @property
    def sharded(self) -> bool:
        """Whether the student's weights are sharded across the ranks (FSDP, ZeRO-3): gathered to be saved."""
        return self.fsdp or self.zero_stage == 3

    def wrap(self, module: LossThroughWrapper, blocks: Sequence[torch.nn.Module]) -> torch.nn.Module:
        """The module gradients flow through: itself alone (and under ZeRO until prepare()); DDP (via accelerate);
        or with FSDP, each of `blocks` (the student's decoder blocks) a sharded unit and the rest (embeddings, head,
        projections) the root's."""
        if self.accelerator is None or self.zero_stage:
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

    def prepare(self, wrapped: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[torch.nn.Module,
                                                                                         torch.optim.Optimizer]:
        """Under ZeRO, DeepSpeed's engine around `wrapped` and its optimizer (the optimizer's resumed state moved into
        the engine's partitions); else both as they are."""
        if not self.zero_stage:
            return wrapped, optimizer
        self.zero = ZeroState(self.accelerator, wrapped, optimizer)
        if self.zero_stage == 3:
            _gather_with_root(wrapped)
        return self.zero.engine, self.zero.optimizer

    def backward(self, loss: torch.Tensor, last_micro_batch: bool) -> None:
        """Backpropagate one micro-batch's (already scaled) loss; under ZeRO through the engine, which reduces the
        accumulated gradients at the step's last micro-batch."""
        if self.zero is None:
            loss.backward()
            return
        self.zero.engine.set_gradient_accumulation_boundary(is_boundary=last_micro_batch)
        self.zero.engine.backward(loss, scale_wrt_gas=False)  # the loss is already divided by grad_accum

    def clip(self, trainable: Sequence[torch.nn.Parameter], max_norm: Optional[float]) -> float:
        """Clip the gradients to `max_norm` (None: measure only); their total norm. Under ZeRO the engine clips and
        takes the optimizer step here (skipping a non-finite one); the optimizer's own step is then accelerate's
        no-op."""
        if self.zero is not None:
            return self.zero.step()
        # An infinite max norm measures without clipping (the scale factor is clamped to exactly 1).
        return self.grad_norm(torch.nn.utils.clip_grad_norm_(trainable, max_norm or math.inf))

    def whole_weights(self, module: torch.nn.Module) -> dict:
        """`module`'s state dict with sharded tensors gathered whole (every rank must call it, in step)."""
        if self.zero is not None:
            return self.zero.whole_weights(module)
        return self.full_state(module.state_dict())

    def whole_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """optimizer.state_dict() over whole tensors, in torch AdamW's layout (every rank must call it, in step)."""
        if self.zero is not None:
            return self.zero.full_optimizer_state()
        return self.full_optimizer_state(optimizer.state_dict())

    def syncing(self, wrapped: torch.nn.Module, last_micro_batch: bool) -> ContextManager:
        """No gradient reduction until the step's last micro-batch (its backward reduces the accumulated sum)."""
        if self.accelerator is None or last_micro_batch or self.zero is not None:
            return nullcontext()  # DeepSpeed's engine is told the boundary in backward()
        if self.fsdp:
            return _fsdp_no_sync(wrapped)
        return self.accelerator.no_sync(wrapped)

    def full_state(self, state: dict) -> dict:
        """A state dict with every sharded tensor gathered whole on the CPU (every rank must call it, in step)."""
        return {key: _full(value) for key, value in state.items()}

    def kept_copy(self, module: torch.nn.Module) -> Optional[dict[str, torch.Tensor]]:
        """A CPU copy of the module's whole weights (train.keep_best's best step); every rank must call it in step
        under FSDP or ZeRO-3, which gather them, and only rank 0, the one that writes them, keeps the copy there."""
        if self.zero is not None and self.sharded:
            whole = self.zero.whole_weights(module)
            return whole if self.main else None
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
        """Run a no-gradient pass over the student (held-out evaluation, on-policy sampling): with FSDP (ZeRO-3)
        through the root (the engine), which gathers the shards it needs; else directly."""
        if not self.sharded:
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


def _gather_with_root(wrapped: torch.nn.Module) -> None:
    """ZeRO-3: the output head's weight (the chunked loss multiplies by it outside the head's own forward) gathered
    for the whole forward of the wrapper, as DeepSpeed gathers each module's own weights for its forward."""
    import deepspeed

    head = wrapped.student.get_output_embeddings()
    if head is not None:
        deepspeed.zero.register_external_parameter(wrapped, head.weight)


def _full(value):
    return value.full_tensor().cpu() if isinstance(value, DTensor) else value


def _like(value, param: torch.Tensor):
    """A whole tensor of a parameter's shape, sharded as that parameter is; anything else as it is."""
    if isinstance(param, DTensor) and isinstance(value, torch.Tensor) and value.shape == param.shape:
        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
    return value
