"""ExecuTorch export: the student as one `.pte` program for phones, on the XNNPACK CPU delegate.

transformers' `TorchExportableModuleForDecoderOnlyLM` gives a static-KV-cache module to `torch.export` (one token
in, the next token's logits out; the cache lives inside the program), and executorch lowers it to XNNPACK and
serialises it. int8/int4 weights come from torchao (8-bit dynamic activations, per-channel int8 or group-32 int4
weights), the scheme XNNPACK runs natively. Needs `pip install -e ".[executorch]"`.
"""
from __future__ import annotations

import importlib.util
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from distill.errors import DistillError
from distill.runtime import atomic_file

log = logging.getLogger("distill")

EXECUTORCH_QUANTS = ("fp32", "int8", "int4")
INSTALL_HINT = 'executorch is not installed (pip install -e ".[executorch]")'
INT4_GROUP = 32
MAX_SEQ_LEN = 512  # the program's KV cache: positions of prompt + answer it can hold (at most the model's context)


def executorch_installed() -> bool:
    """Whether the executorch extra is installed (without importing it)."""
    return importlib.util.find_spec("executorch") is not None


def require_executorch() -> None:
    """One clear line when executorch is missing, before any model is read."""
    if not executorch_installed():
        raise DistillError(f"--format executorch: {INSTALL_HINT}")


def cache_positions(config: Any, max_seq_len: int = MAX_SEQ_LEN) -> int:
    """How many positions the program's static KV cache holds for a model of this config."""
    return min(max_seq_len, getattr(config, "max_position_embeddings", None) or max_seq_len)


def export_executorch(model_dir: Path, out_path: Path, quant: str = "fp32", max_seq_len: int = MAX_SEQ_LEN) -> Path:
    """Write model_dir as `<out>/model-<quant>.pte` (or out_path itself when it ends in .pte); returns the file."""
    if quant not in EXECUTORCH_QUANTS:
        raise DistillError(f"--quant {quant}: unknown for --format executorch (supported: "
                           f"{', '.join(EXECUTORCH_QUANTS)})")
    require_executorch()
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from transformers import AutoModelForCausalLM
    from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

    out_file = Path(out_path) if str(out_path).endswith(".pte") else Path(out_path) / f"model-{quant}.pte"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    max_seq_len = cache_positions(model.config, max_seq_len)
    model.generation_config.cache_implementation = "static"
    if quant != "fp32":
        _quantize_weights(model, quant)
    module = TorchExportableModuleForDecoderOnlyLM(model, batch_size=1, max_cache_len=max_seq_len)
    with torch.no_grad():
        program = module.export(input_ids=torch.tensor([[1]], dtype=torch.long),
                                cache_position=torch.tensor([0], dtype=torch.long))
    lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out_file) as tmp:
        Path(tmp).write_bytes(lowered.buffer)
    log.info("executorch: %s (%s, XNNPACK, KV cache of %d positions), %.1f MB", out_file, quant, max_seq_len,
             out_file.stat().st_size / 1e6)
    return out_file


def _quantize_weights(model: torch.nn.Module, quant: str) -> None:
    """torchao's 8-bit-dynamic-activation, int8/int4-weight scheme on every linear layer (XNNPACK's kernels)."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    if quant == "int8":
        config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
        quantize_(model, config)
        return
    config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(INT4_GROUP))
    kept = [name for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m.in_features % INT4_GROUP]
    if kept:  # a row that groups of 32 do not divide stays fp32, as GGUF falls back for such rows
        log.info("executorch int4: %d linear layers kept fp32 (rows not a multiple of %d), e.g. %s", len(kept),
                 INT4_GROUP, kept[0])
    quantize_(model, config, filter_fn=lambda m, name: isinstance(m, torch.nn.Linear) and name not in kept)


class PteModel:
    """A `.pte` program run token by token through executorch's runtime: the next-token logits at each step."""

    def __init__(self, path: Path) -> None:
        require_executorch()
        from executorch.runtime import Runtime

        self.path = Path(path)
        self.method: Any = Runtime.get().load_program(str(path)).load_method("forward")
        self.position = 0

    def reset(self) -> None:
        """Forget the tokens fed so far (the static cache is overwritten from position 0)."""
        self.position = 0

    def step(self, token: int) -> torch.Tensor:
        """Feed one token; the logits for the next one ([vocab])."""
        inputs = (torch.tensor([[token]], dtype=torch.long), torch.tensor([self.position], dtype=torch.long))
        self.position += 1
        return self.method.execute(inputs)[0][0, -1]

    def logits(self, ids: list[int]) -> torch.Tensor:
        """Every position's next-token logits for ids ([len(ids), vocab]), from a fresh cache."""
        self.reset()
        return torch.stack([self.step(token) for token in ids])

    def greedy(self, prompt: list[int], new_tokens: int) -> list[int]:
        """new_tokens argmax tokens after prompt (no stop at eos)."""
        next_token = int(self.logits(prompt)[-1].argmax())
        out = [next_token]
        while len(out) < new_tokens:
            out.append(int(self.step(out[-1]).argmax()))
        return out


def program_speed(pte: Path, prompt: list[int], new_tokens: int, repeats: int = 3) -> dict:
    """Prefill/decode tokens per second and time to first token of a .pte program in executorch's runtime."""
    # Timed as llama.cpp's GGUF speed is (median of repeats after a warm-up); the program takes one token per call,
    # so its prefill is a loop of one-token steps, as it runs on a phone.
    program = PteModel(pte)

    def timed() -> tuple[float, float]:
        start = time.perf_counter()
        token = int(program.logits(prompt)[-1].argmax())
        prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = int(program.step(token).argmax())
        return prefill_s, time.perf_counter() - start

    timed()
    runs = [timed() for _ in range(max(1, repeats))]
    prefill_s = statistics.median(r[0] for r in runs)
    decode_s = statistics.median(r[1] for r in runs)
    return {"prefill_tokens_per_s": len(prompt) / prefill_s, "decode_tokens_per_s": new_tokens / decode_s,
            "time_to_first_token_s": prefill_s}


def verify_executorch(model_dir: Path, pte: Path, sequences: list[list[int]], prompts: list[list[int]],
                      new_tokens: int = 16) -> dict:
    """The .pte against the source model: mean KL and top-1 agreement on sequences, greedy equality on prompts."""
    from transformers import AutoModelForCausalLM

    source = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    program = PteModel(pte)
    kl_sum, agree, positions = 0.0, 0, 0
    for ids in sequences:
        with torch.no_grad():
            ref = source(input_ids=torch.tensor([ids])).logits[0].double().log_softmax(-1)
        ours = program.logits(ids).double().log_softmax(-1)
        kl_sum += float((ref.exp() * (ref - ours)).sum())
        agree += int((ref.argmax(-1) == ours.argmax(-1)).sum())
        positions += len(ids)
    same = sum(program.greedy(p, new_tokens) == _greedy(source, p, new_tokens) for p in prompts)
    return {"mean_kl": kl_sum / positions, "top1_agreement": agree / positions, "positions": positions,
            "greedy": {"same": same, "prompts": len(prompts), "new_tokens": new_tokens},
            "bytes": Path(pte).stat().st_size, "cache_positions": cache_positions(source.config)}


@torch.no_grad()
def _greedy(model: torch.nn.Module, prompt: list[int], new_tokens: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


__all__ = ["EXECUTORCH_QUANTS", "INSTALL_HINT", "MAX_SEQ_LEN", "PteModel", "cache_positions", "executorch_installed",
           "export_executorch", "program_speed", "require_executorch", "verify_executorch"]
