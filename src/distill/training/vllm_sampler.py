"""The student's on-policy samples from vLLM's engine (method.sampling.engine: vllm), in this process.

The engine is built once from the student's config and tokenizer with dummy weights; before the first sampling call
after each optimizer step the trainer's current weights (LoRA adapters added in, the model itself unchanged) are
reloaded into it in place (vLLM's worker `reload_weights`), as TRL's colocate mode does. Each row is sampled with a
seed of its own drawn from the micro-batch's, so a resumed run draws what an uninterrupted one would: after a resume
the engine gets the checkpoint's weights, the same the uninterrupted run had at that step.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Iterator

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.errors import DistillError
from distill.runtime import atomic_directory
from distill.teachers.vllm_backend import first_line, import_vllm

ENGINE_KEY = "method.sampling.engine"
NOT_INSTALLED = (f"{ENGINE_KEY}: vllm is not installed (pip install vllm, in an environment whose transformers "
                 "vLLM accepts; or use engine: transformers)")


def merged_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The student's weights under Hugging Face's names, LoRA adapters added in (the model itself is unchanged)."""
    if not isinstance(model, PeftModel):
        yield from model.state_dict().items()
        return
    base = model.get_base_model()
    adapted = {f"{name}.weight": module for name, module in base.named_modules() if isinstance(module, LoraLayer)}
    for name, tensor in base.state_dict().items():
        if "lora_" in name:
            continue
        plain = name.replace(".base_layer.", ".")  # a wrapped layer's own weight, under its Hugging Face name
        layer = adapted.get(plain)
        if layer is not None:
            tensor = tensor + sum(layer.get_delta_weight(a) for a in layer.active_adapters)
        yield plain, tensor.detach()


def write_engine_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> Path:
    """The config and tokenizer vLLM builds its engine from (the weights come from the trainer)."""
    with atomic_directory(out_dir) as tmp:
        model.config.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir


class VLLMStudentSampler:
    """The student's samples from an in-process vLLM engine that holds the trainer's current weights."""

    def __init__(self, model_dir: Path, *, dtype: str, seed: int, max_model_len: int,
                 gpu_memory_utilization: float):
        vllm = import_vllm(ENGINE_KEY, NOT_INSTALLED)
        # The engine in this process (not vLLM's worker processes), so weights are handed over, not sent.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self._params = vllm.SamplingParams
        try:
            self.llm = vllm.LLM(model=str(model_dir), load_format="dummy", dtype=dtype, seed=seed,
                                max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization,
                                enable_prefix_caching=False)
        except Exception as err:  # no GPU, unknown architecture, out of memory...: one line, not a vLLM traceback
            raise DistillError(f"{ENGINE_KEY}: vllm could not build the student's engine ({first_line(err)})") from None
        self.synced_step: int | None = None

    def sync(self, model: torch.nn.Module, step: int) -> None:
        """Give the engine the trainer's weights of `step`, unless it has them already."""
        if step == self.synced_step:
            return
        with torch.no_grad():
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": merged_weights(model)})
        self.synced_step = step

    def generate(self, prompts: list[list[int]], budget: int, seed: int, *, temperature: float, top_p: float,
                 stop_ids: list[int], stop: tuple[str, ...]) -> list[list[int]]:
        """New tokens for each prompt, ending with the stop token or stop string that ended it, if any."""
        row_seeds = random.Random(seed)
        params = [self._params(max_tokens=budget, temperature=temperature, top_p=top_p, seed=row_seeds.getrandbits(31),
                               stop_token_ids=stop_ids, stop=list(stop), include_stop_str_in_output=True)
                  for _ in prompts]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [list(out.outputs[0].token_ids) for out in outputs]


__all__ = ["NOT_INSTALLED", "VLLMStudentSampler", "merged_weights", "write_engine_model"]
