"""Predict a recipe's training cost before any run: parameters, FLOPs per token, memory and time on this machine.

shapes: model shapes, parameter and FLOP counts; batches: the trainer's micro-batch shapes; timing: micro-
benchmarks on this machine; cost: the step's FLOPs, seconds and memory; format: the printed table;
from_recipe: the only module that reads the Recipe (`plan_stages`, a `plan_recipe` per training stage: what
`distill plan` runs).
"""
from distill.plan.batches import BatchStats
from distill.plan.cost import STRATEGIES, Plan, Sharding, StepSetup, memory_at_peak
from distill.plan.format import format_plan, format_stage_plans
from distill.plan.from_recipe import (
    MAX_ENCODED_EXAMPLES,
    batch_stats,
    model_config,
    plan_recipe,
    plan_stages,
    processes_from_environment,
    step_flops,
    student_shape,
    teacher_online,
)
from distill.plan.shapes import (
    ModelShape,
    activation_floats_per_token,
    forward_flops_per_token,
    linear_flops_per_token,
    lora_params,
    shape_from_config,
)

__all__ = [
    "MAX_ENCODED_EXAMPLES",
    "BatchStats",
    "ModelShape",
    "Plan",
    "STRATEGIES",
    "Sharding",
    "StepSetup",
    "activation_floats_per_token",
    "batch_stats",
    "format_plan",
    "format_stage_plans",
    "forward_flops_per_token",
    "linear_flops_per_token",
    "lora_params",
    "memory_at_peak",
    "model_config",
    "plan_recipe",
    "plan_stages",
    "processes_from_environment",
    "shape_from_config",
    "step_flops",
    "student_shape",
    "teacher_online",
]
