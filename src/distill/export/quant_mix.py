"""Which GGML type each tensor gets under a GGUF quantization scheme: llama.cpp's rules (llama-quant.cpp).

A scheme such as q4_k_m has one default type (q4_k) and gives more bits to the tensors that hurt most:
the output head (q6_k), attn_v and ffn_down in the first and last eighth of the layers and every third one
between (q6_k). The IQ4 schemes (iq4_nl, iq4_xs) raise attn_v to q5_k under grouped-query attention (4+ query
heads per KV head) and, without an importance matrix, the first eighth of ffn_down. A row that is not a multiple
of the chosen type's block falls back to a smaller-block type (iq4_xs to iq4_nl).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

Q = GGMLQuantizationType
F = LlamaFileType

# scheme -> (default type, file type written in general.file_type)
SCHEMES: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "f32": (Q.F32, F.ALL_F32), "f16": (Q.F16, F.MOSTLY_F16), "bf16": (Q.BF16, F.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0), "q5_1": (Q.Q5_1, F.MOSTLY_Q5_1), "q5_0": (Q.Q5_0, F.MOSTLY_Q5_0),
    "q4_1": (Q.Q4_1, F.MOSTLY_Q4_1), "q4_0": (Q.Q4_0, F.MOSTLY_Q4_0),
    "q6_k": (Q.Q6_K, F.MOSTLY_Q6_K), "q5_k_m": (Q.Q5_K, F.MOSTLY_Q5_K_M), "q5_k_s": (Q.Q5_K, F.MOSTLY_Q5_K_S),
    "q4_k_m": (Q.Q4_K, F.MOSTLY_Q4_K_M), "q4_k_s": (Q.Q4_K, F.MOSTLY_Q4_K_S), "q3_k_l": (Q.Q3_K, F.MOSTLY_Q3_K_L),
    "q3_k_m": (Q.Q3_K, F.MOSTLY_Q3_K_M), "q3_k_s": (Q.Q3_K, F.MOSTLY_Q3_K_S), "q2_k": (Q.Q2_K, F.MOSTLY_Q2_K),
    "iq4_xs": (Q.IQ4_XS, F.MOSTLY_IQ4_XS), "iq4_nl": (Q.IQ4_NL, F.MOSTLY_IQ4_NL),
}
UNQUANTIZED = (Q.F32, Q.F16, Q.BF16)
# llama.cpp's tensor_type_fallback: a type whose block does not divide the row -> one with 32-wide blocks
_FALLBACK = {Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0,
             Q.IQ4_XS: Q.IQ4_NL}
IQ4_SCHEMES = ("iq4_nl", "iq4_xs")


@dataclass(frozen=True)
class ModelShape:
    """What the rules look at besides a tensor's name: layer count, query heads per KV head, a tied head."""

    n_layers: int
    n_gqa: int
    tied: bool


def _more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers, and every third one between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def _layer(name: str) -> int:
    match = re.match(r"blk\.(\d+)\.", name)
    return int(match.group(1)) if match else 0


def scheme_type(name: str, scheme: str, shape: ModelShape, has_imatrix: bool) -> GGMLQuantizationType:
    """The type llama.cpp's mix picks for a 2-D tensor (before any fallback for its row length)."""
    base = SCHEMES[scheme][0]
    if base in UNQUANTIZED:
        return base
    layer, n = _layer(name), shape.n_layers
    if name == "output.weight" or (shape.tied and name == "token_embd.weight"):
        return base if base == Q.Q8_0 else Q.Q6_K
    if name.endswith("attn_v.weight"):
        if scheme == "q2_k":
            return Q.Q4_K if shape.n_gqa >= 4 else Q.Q3_K
        if scheme == "q3_k_m":
            return Q.Q5_K if layer < 2 else Q.Q4_K
        if scheme == "q3_k_l":
            return Q.Q5_K
        if scheme in ("q4_k_m", "q5_k_m") and _more_bits(layer, n):
            return Q.Q6_K
        if scheme == "q4_k_s" and layer < 4:
            return Q.Q5_K
        if scheme in IQ4_SCHEMES and shape.n_gqa >= 4:
            return Q.Q5_K
    elif name.endswith("ffn_down.weight"):
        if scheme == "q2_k":
            return Q.Q3_K
        if scheme == "q3_k_m":
            return Q.Q5_K if layer < n // 16 else Q.Q4_K
        if scheme == "q3_k_l":
            return Q.Q5_K
        if scheme in ("q4_k_m", "q5_k_m") and _more_bits(layer, n):
            return Q.Q6_K
        if scheme == "q4_k_s" and layer < n // 8:
            return Q.Q5_K
        if scheme in IQ4_SCHEMES and not has_imatrix and layer < n // 8:
            return Q.Q5_K
        if scheme in ("q4_0", "q5_0") and has_imatrix and layer < n // 8:
            return Q.Q4_1 if scheme == "q4_0" else Q.Q5_1
    elif name.endswith("attn_output.weight"):
        if scheme == "q2_k":
            return Q.Q3_K
        if scheme == "q3_k_m":
            return Q.Q4_K
        if scheme == "q3_k_l":
            return Q.Q5_K
    return base


def tensor_type(name: str, row: int, scheme: str, shape: ModelShape,
                has_imatrix: bool = False) -> tuple[GGMLQuantizationType, Optional[str]]:
    """The type of a 2-D tensor with rows of `row` values, and a note when it is not the scheme's plain choice."""
    base = SCHEMES[scheme][0]
    chosen = scheme_type(name, scheme, shape, has_imatrix)
    is_head = name == "output.weight" or (shape.tied and name == "token_embd.weight")
    note = "output head kept wider" if is_head and chosen != base else None
    block = GGML_QUANT_SIZES[chosen][0]
    if row % block == 0:
        return chosen, note
    fallback = _FALLBACK.get(chosen, Q.F16)
    if row % GGML_QUANT_SIZES[fallback][0]:
        fallback = Q.F16
    return fallback, f"row of {row} is not a multiple of the {chosen.name} block size {block}"


__all__ = ["IQ4_SCHEMES", "SCHEMES", "UNQUANTIZED", "ModelShape", "scheme_type", "tensor_type"]
