"""Named student shapes that follow small-model practice: deep and thin, GQA, tied embeddings, FFN ~2.7x.

Parameter counts (docs/student.md) depend on the vocabulary; the layer counts here do not. Head size stays 64,
as in SmolLM2, Llama and Qwen2, so rotary settings carry over from the teacher.
"""
from __future__ import annotations

from distill.errors import DistillError
from distill.recipe import StudentConfig

PRESETS: dict[str, StudentConfig] = {
    "micro": StudentConfig(num_layers=6, hidden_size=192, num_heads=3, num_kv_heads=1, intermediate_size=512),
    "tiny": StudentConfig(num_layers=8, hidden_size=256, num_heads=4, num_kv_heads=2, intermediate_size=704),
    "small": StudentConfig(num_layers=12, hidden_size=384, num_heads=6, num_kv_heads=2, intermediate_size=1024),
    "base": StudentConfig(num_layers=24, hidden_size=512, num_heads=8, num_kv_heads=4, intermediate_size=1408),
    "large": StudentConfig(num_layers=30, hidden_size=576, num_heads=9, num_kv_heads=3, intermediate_size=1536),
}


def preset_config(name: str) -> StudentConfig:
    """The StudentConfig of a named preset."""
    if name not in PRESETS:
        raise DistillError(f"student.preset: unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name].model_copy()
