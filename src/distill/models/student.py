"""Build a new Llama student on the teacher's tokenizer (or one of its own), optionally seeding its embeddings from
the teacher."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from distill.errors import DistillError
from distill.models.heads import base_model
from distill.models.loading import count_params

if TYPE_CHECKING:
    from distill.recipe import StudentConfig

INIT_EMBEDDINGS = ("random", "slice", "project")

# Student columns the teacher cannot fill (student wider than teacher) get the student's own random init,
# shrunk so they break symmetry without drowning the copied geometry.
PAD_SCALE = 0.1


def build_student(
    config: StudentConfig,
    teacher: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    init_embeddings: str = "project",
    seed: int = 0,
    teacher_rows: Optional[Sequence[int]] = None,
) -> LlamaForCausalLM:
    """A fresh LlamaForCausalLM shaped by `config`, sharing the teacher's vocabulary, ids and rotary settings.

    With `teacher_rows` the student has a tokenizer of its own (`tokenizer`, one row per token): student row i is
    seeded from the teacher's row teacher_rows[i] (the same bytes in both vocabularies), or kept random where -1.
    """
    if init_embeddings not in INIT_EMBEDDINGS:
        choices = ", ".join(INIT_EMBEDDINGS)
        raise DistillError(f"student.init_embeddings: expected one of {choices}, got {init_embeddings!r}")
    teacher = base_model(teacher)
    llama_config = student_llama_config(config, teacher, tokenizer, own_vocabulary=teacher_rows is not None)
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG stream
        torch.manual_seed(seed)
        student = LlamaForCausalLM(llama_config)
    if init_embeddings != "random":
        _seed_embeddings(student, teacher, init_embeddings, teacher_rows)
    teacher_eos = getattr(teacher.generation_config, "eos_token_id", None)
    if teacher_eos is not None and teacher_rows is None:  # chat teachers may stop on several ids; the student too
        student.generation_config.eos_token_id = teacher_eos
    return student


def student_llama_config(
    config: StudentConfig, teacher: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *,
    own_vocabulary: bool = False,
) -> LlamaConfig:
    """The LlamaConfig for `config`, with defaults and token ids taken from the teacher and the tokenizer (the
    teacher's; or with `own_vocabulary`, the student's own, one embedding row per token)."""
    _validate_shape(config)
    teacher_config = teacher.config.get_text_config()
    vocab = len(tokenizer) if own_vocabulary else teacher.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        raise DistillError(f"the tokenizer has {len(tokenizer)} tokens but the teacher's embedding only {vocab} rows")
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size or default_intermediate_size(config.hidden_size),
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads or config.num_heads,
        head_dim=config.hidden_size // config.num_heads,
        max_position_embeddings=config.max_position_embeddings
        or getattr(teacher_config, "max_position_embeddings", None)
        or 2048,
        rope_parameters={"rope_type": "default", "rope_theta": _rope_theta(teacher_config)},
        tie_word_embeddings=config.tie_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def default_intermediate_size(hidden: int) -> int:
    """About 2.75 x hidden (Llama's SwiGLU ratio), rounded to a multiple of 64."""
    return max(64, round(2.75 * hidden / 64) * 64)


def _validate_shape(config: StudentConfig) -> None:
    hidden, heads = config.hidden_size, config.num_heads
    kv_heads = config.num_kv_heads or heads
    if hidden % heads:
        raise DistillError(f"student.config.num_heads: hidden_size {hidden} is not divisible by num_heads {heads}")
    if (hidden // heads) % 2:
        raise DistillError(
            f"student.config.num_heads: head size hidden_size/num_heads = {hidden // heads} must be even (rotary)"
        )
    if heads % kv_heads:
        raise DistillError(
            f"student.config.num_kv_heads: num_heads {heads} is not divisible by num_kv_heads {kv_heads}"
        )


def _rope_theta(teacher_config) -> float:
    """The teacher's rotary base, from transformers v5 rope_parameters (flat or per layer type) or rope_theta."""
    params = getattr(teacher_config, "rope_parameters", None) or {}
    if "rope_theta" in params:
        return float(params["rope_theta"])
    for value in params.values():  # e.g. {"full_attention": {...}, "sliding_attention": {...}}
        if isinstance(value, dict) and "rope_theta" in value:
            return float(value["rope_theta"])
    return float(getattr(teacher_config, "rope_theta", None) or 10000.0)


@torch.no_grad()
def _seed_embeddings(student: LlamaForCausalLM, teacher: PreTrainedModel, how: str,
                     teacher_rows: Optional[Sequence[int]] = None) -> None:
    """Overwrite the student's embedding (and untied head) with a slice or projection of the teacher's."""
    embedding = student.get_input_embeddings().weight
    embedding.copy_(_seed_matrix(teacher.get_input_embeddings().weight, embedding, how, teacher_rows))
    head = student.get_output_embeddings().weight
    if head is not embedding:
        # The teacher's head is its embedding when tied, so this is right for tied and untied teachers.
        head.copy_(_seed_matrix(teacher.get_output_embeddings().weight, head, how, teacher_rows))


def _seed_matrix(source: torch.Tensor, random_init: torch.Tensor, how: str,
                 teacher_rows: Optional[Sequence[int]] = None) -> torch.Tensor:
    """[V, student width] from the teacher's [V, teacher width] matrix; uncovered cells keep small random values.
    With `teacher_rows`, student row i takes teacher row teacher_rows[i]; rows at -1 keep their random init."""
    source = source.detach().float().cpu()
    width = min(source.shape[1], random_init.shape[1])
    init = random_init.detach().float().cpu()
    if how == "slice":
        block = source[:, :width]
    else:
        block = principal_coordinates(source, width)
        # Scale to the student's own init norm, not the teacher's: cosines (the geometry we keep) do not
        # depend on scale, and at init scale a tied head gives near-uniform first logits and the residual
        # stream stays balanced with the freshly initialised layers, so the usual lr and warmup still fit.
        block = block * (init.norm(dim=1).mean() / block.norm(dim=1).mean().clamp_min(1e-12))
    seeded = init * PAD_SCALE
    if teacher_rows is None:
        rows = min(source.shape[0], random_init.shape[0])
        seeded[:rows, :width] = block[:rows]
        return seeded.to(random_init.dtype)
    mapped = torch.tensor(list(teacher_rows), dtype=torch.long)
    present = mapped >= 0
    seeded[~present] = init[~present]  # tokens the teacher has no entry for: an ordinary random row
    seeded[present, :width] = block[mapped[present]]
    return seeded.to(random_init.dtype)


def principal_coordinates(matrix: torch.Tensor, k: int) -> torch.Tensor:
    """Coordinates of the centred rows on their top-k principal directions (PCA), [rows, k]."""
    centred = matrix - matrix.mean(dim=0, keepdim=True)
    covariance = (centred.T @ centred).double()  # [D, D]: small, so an exact eigendecomposition is cheap
    _, vectors = torch.linalg.eigh(covariance)  # ascending eigenvalues
    top = vectors[:, -k:].flip(-1).to(centred.dtype)
    return centred @ top


def student_config_summary(model: torch.nn.Module) -> dict:
    """Shape of a (student) model: layers, hidden, heads, kv heads, intermediate, vocab, tied, params."""
    base = base_model(model)
    config = base.config.get_text_config()
    heads = config.num_attention_heads
    output = base.get_output_embeddings()
    return {
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
        "heads": heads,
        "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "intermediate": getattr(config, "intermediate_size", None),
        "vocab": base.get_input_embeddings().weight.shape[0],
        "tied": output is not None and output.weight is base.get_input_embeddings().weight,
        "params": count_params(model),
    }
