"""DeepSpeed ZeRO (train.parallel: zero2, zero3) through accelerate: the engine around the student, and its state in
distill's own checkpoint files (whole tensors, the torch AdamW layout one process writes), so a ZeRO run resumes on
ZeRO, DDP, FSDP or one process.

ZeRO-2 partitions the gradients and the optimizer's moments across the ranks (every rank keeps the whole weights);
ZeRO-3 the weights too. The frozen teacher is never given to DeepSpeed: it stays whole on every rank.

deepspeed is an optional dependency (`pip install 'distill[deepspeed]'`), imported only here, only when asked for.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from distill.errors import DistillError
from distill.runtime import name_cpu_for_deepspeed

ZERO_STAGES = {"zero2": 2, "zero3": 3}
_MOMENTS = ("exp_avg", "exp_avg_sq")  # torch AdamW's per-parameter state besides its step count
PIP_HINT = "pip install 'distill[deepspeed]' (deepspeed==0.19.8)"


def zero_accelerator(device: torch.device, stage: int, micro_batch: int, grad_accum: int,
                     max_grad_norm: Optional[float]):
    """accelerate's Accelerator with a DeepSpeed ZeRO plugin: `micro_batch` rows per rank, `grad_accum` of them per
    step, gradients clipped to `max_grad_norm` (None: not clipped), nothing offloaded."""
    name_cpu_for_deepspeed(device)
    try:
        import deepspeed  # noqa: F401  (optional: only a ZeRO run needs it)
    except ImportError as error:
        raise DistillError(f"train.parallel: zero{stage} needs deepspeed, which is not installed ({error}); "
                           f"{PIP_HINT}") from error
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DeepSpeedPlugin

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    if device.type == "cpu":
        # With no GPU accelerate finds no backend of its own for DeepSpeed and would record one process of index 0
        # on every rank (each then trains the whole batch); gloo, named here, gives each its rank.
        PartialState(cpu=False, backend="gloo")
    plugin = DeepSpeedPlugin(zero_stage=stage, gradient_accumulation_steps=grad_accum,
                             gradient_clipping=max_grad_norm or 0.0, offload_optimizer_device="none",
                             offload_param_device="none", zero3_init_flag=False, zero3_save_16bit_model=True)
    plugin.deepspeed_config.update(train_micro_batch_size_per_gpu=micro_batch, zero_allow_untested_optimizer=True)
    accelerator = Accelerator(deepspeed_plugin=plugin)
    # accelerate also tells transformers that ZeRO-3 is on (even with zero3_init_flag off), and from_pretrained then
    # partitions every model it loads (the teacher too) as it builds it: only what prepare() gets is to be sharded.
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    return accelerator


class ZeroState:
    """The engine accelerate built, and the torch AdamW layout its partitioned state is saved in and loaded from."""

    def __init__(self, accelerator, wrapped: torch.nn.Module, optimizer: torch.optim.Optimizer):
        """Prepare `wrapped` and `optimizer` (a torch AdamW, perhaps holding a resumed state) as DeepSpeed's engine."""
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        layout = optimizer.state_dict()
        self.groups = layout["param_groups"]
        resumed = layout["state"]
        optimizer.state.clear()  # DeepSpeed keeps its own state, over flat partitions; the resumed one is set below
        self.engine, self.optimizer = accelerator.prepare(wrapped, optimizer)
        if resumed:
            self._load(resumed)

    def step(self) -> float:
        """The step's update (clipped, skipped when the gradients are not finite); the gradients' total norm."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)

    def whole_weights(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """`module`'s state dict, whole, on the CPU (ZeRO-3 gathers each rank's partitions; every rank calls it)."""
        import deepspeed

        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=any(hasattr(p, "ds_id") for p in params)):
            return {key: value.detach().to("cpu", copy=True) for key, value in module.state_dict().items()}

    def full_optimizer_state(self) -> dict:
        """The optimizer's state as torch AdamW's state_dict() over whole tensors (every rank must call it)."""
        from deepspeed.utils import safe_get_full_optimizer_state

        step = self._step_count()
        self._link_moments()
        state = {}
        for index, param in enumerate(self.params):
            moments = {key: safe_get_full_optimizer_state(param, key) for key in _MOMENTS}
            if all(m is not None for m in moments.values()):
                shape = getattr(param, "ds_shape", param.shape)  # ZeRO-3's whole shape of a partitioned parameter
                state[index] = {"step": step.clone(),
                                **{key: m.detach().cpu().reshape(shape) for key, m in moments.items()}}
        live = self._base().param_groups
        groups = [{**group, **{k: v for k, v in now.items() if k != "params"}} for group, now in zip(self.groups, live)]
        return {"state": state, "param_groups": groups}

    def _load(self, resumed: dict) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        step = next(iter(resumed.values()))["step"].detach().cpu()
        base, zero = self._base(), self.engine.optimizer
        # The fp32 partitions AdamW steps (ZeRO-3's, or ZeRO-1/2's); it makes their state at its first step, so the
        # state is made here to be filled.
        flats = getattr(zero, "fp32_partitioned_groups_flat", None) or zero.single_partition_of_fp32_groups
        for flat in flats:
            base.state[flat] = {"step": step.clone(), **{key: torch.zeros_like(flat) for key in _MOMENTS}}
        self._link_moments()
        for index, moments in resumed.items():
            param = self.params[int(index)]
            for key in _MOMENTS:
                safe_set_full_optimizer_state(param, moments[key], key)

    def _link_moments(self) -> None:
        """Point ZeRO-1/2's per-parameter views at the AdamW state of every parameter group: deepspeed 0.19.8 links
        them once, after the first group's first step, when the other groups (no weight decay) have no state yet."""
        zero = self.engine.optimizer
        if hasattr(zero, "_hp_optimizer_states_linked"):
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()

    def _step_count(self) -> torch.Tensor:
        steps = [s["step"] for s in self._base().state.values() if "step" in s]
        return steps[0].detach().cpu().clone() if steps else torch.tensor(0.0)

    def _base(self) -> torch.optim.Optimizer:
        """The torch AdamW inside DeepSpeed's ZeRO optimizer (over the flat partitions)."""
        return self.engine.optimizer.optimizer
