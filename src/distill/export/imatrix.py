"""Importance matrix for GGUF quantization: per input column of every linear weight, the squared activations.

This is what llama.cpp's `llama-imatrix` computes: run calibration tokens through the model and, for every
matrix multiply, add up x_j^2 of each input column j over the tokens. The quantizer then weights the error of
column j by its mean (sum / tokens), so the columns that carry large activations are kept more precisely.
Read and written in llama.cpp's imatrix GGUF format (`<tensor>.in_sum2`, `<tensor>.counts`), so
`llama-quantize --imatrix FILE` can reuse a file distill wrote, and distill can use one llama.cpp wrote.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from gguf import GGUFReader, GGUFWriter, MODEL_ARCH, get_tensor_name_map

from distill.errors import DistillError
from distill.runtime import atomic_file

log = logging.getLogger("distill")

CHUNK_TOKENS = 512  # tokens per forward pass (llama-imatrix's default chunk)
DEFAULT_MAX_TOKENS = 32768


@dataclass
class Imatrix:
    """Sum of squared inputs per column (GGUF tensor name -> float64 vector) and the tokens summed over."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    tokens: int = 0
    chunks: int = 0
    dataset: str = ""

    def weights(self) -> dict[str, np.ndarray]:
        """The per-column weights the quantizer uses: the mean squared activation (llama-quantize's reading)."""
        return {name: (values / max(self.tokens, 1)).astype(np.float32) for name, values in self.sums.items()}


def gguf_names(model: torch.nn.Module, arch: MODEL_ARCH) -> dict[str, str]:
    """HF linear module name -> the GGUF name of its weight; a head tied to the embeddings is token_embd."""
    names = get_tensor_name_map(arch, model.config.num_hidden_layers)
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    out = {}
    for module_name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if module is head and tied:
            out[module_name] = "token_embd.weight"
            continue
        gguf_name = names.get_name(f"{module_name}.weight", try_suffixes=(".weight",))
        if gguf_name is not None:
            out[module_name] = gguf_name
    return out


@torch.no_grad()
def collect_imatrix(model: torch.nn.Module, arch: MODEL_ARCH, sequences: Sequence[Sequence[int]],
                    max_tokens: int = DEFAULT_MAX_TOKENS, dataset: str = "") -> Imatrix:
    """Squared input activations of every linear layer of model over up to max_tokens of the token sequences."""
    chunks = _chunks(sequences, max_tokens)
    if not chunks:
        raise DistillError("imatrix: no calibration tokens (the run has no training examples to calibrate on)")
    result = Imatrix(dataset=dataset)
    hooks = []
    for module_name, gguf_name in gguf_names(model, arch).items():
        module = model.get_submodule(module_name)
        result.sums[gguf_name] = np.zeros(module.in_features, dtype=np.float64)
        hooks.append(module.register_forward_pre_hook(_accumulate(result.sums[gguf_name])))
    try:
        model.eval()
        for chunk in chunks:
            model(input_ids=torch.tensor([chunk], device=model.device))
            result.tokens += len(chunk)
            result.chunks += 1
    finally:
        for hook in hooks:
            hook.remove()
    return result


def _accumulate(total: np.ndarray):
    def hook(_module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
        np.add(total, x.square().sum(0).cpu().numpy(), out=total)  # in place: the dict holds this array
    return hook


def _chunks(sequences: Sequence[Sequence[int]], max_tokens: int) -> list[list[int]]:
    """The sequences cut into pieces of at most CHUNK_TOKENS, up to max_tokens in all."""
    chunks, left = [], max_tokens
    for ids in sequences:
        for start in range(0, len(ids), CHUNK_TOKENS):
            piece = list(ids[start:start + min(CHUNK_TOKENS, left)])
            if len(piece) < 2:
                continue
            chunks.append(piece)
            left -= len(piece)
            if left <= 0:
                return chunks
    return chunks


def write_imatrix(imatrix: Imatrix, path: Path) -> Path:
    """Save imatrix in llama.cpp's imatrix GGUF format (general.type imatrix; in_sum2 and counts per tensor)."""
    path = Path(path)
    with atomic_file(path) as tmp:
        writer = GGUFWriter(tmp, arch="")
        try:
            writer.add_type("imatrix")
            writer.add_array("imatrix.datasets", [imatrix.dataset or "distill"])
            writer.add_uint32("imatrix.chunk_count", imatrix.chunks)
            writer.add_uint32("imatrix.chunk_size", CHUNK_TOKENS)
            for name, values in sorted(imatrix.sums.items()):
                writer.add_tensor(f"{name}.in_sum2", values.astype(np.float32).reshape(1, -1))
                writer.add_tensor(f"{name}.counts", np.array([[float(imatrix.tokens)]], dtype=np.float32))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return path


def read_imatrix(path: Path) -> Imatrix:
    """An imatrix GGUF file (ours or llama-imatrix's), one dense matrix per tensor."""
    path = Path(path)
    try:
        reader = GGUFReader(path)
    except (OSError, ValueError) as err:
        raise DistillError(f"{path}: not an imatrix GGUF file ({err})") from None
    tensors = {t.name: np.asarray(t.data, dtype=np.float64) for t in reader.tensors}
    sums = {name[: -len(".in_sum2")]: values for name, values in tensors.items() if name.endswith(".in_sum2")}
    if not sums:
        raise DistillError(f"{path}: no <tensor>.in_sum2 entries; not an imatrix file")
    result = Imatrix()
    for name, values in sums.items():
        counts = tensors.get(f"{name}.counts")
        if counts is None or values.reshape(-1).size != values.shape[-1] or counts.size != 1:
            raise DistillError(f"{path}: {name} is not one dense matrix with its count (expert tensors unsupported)")
        # store as if every tensor saw the same tokens: weights() divides by one count
        result.sums[name] = values.reshape(-1)
        result.tokens = max(result.tokens, int(counts.reshape(-1)[0]))
    for name, values in sums.items():
        count = float(tensors[f"{name}.counts"].reshape(-1)[0])
        result.sums[name] = values.reshape(-1) * (result.tokens / count if count else 0.0)
    chunk_field = reader.fields.get("imatrix.chunk_count")
    result.chunks = int(chunk_field.contents()) if chunk_field is not None else 0
    return result


__all__ = ["CHUNK_TOKENS", "DEFAULT_MAX_TOKENS", "Imatrix", "collect_imatrix", "gguf_names", "read_imatrix",
           "write_imatrix"]
