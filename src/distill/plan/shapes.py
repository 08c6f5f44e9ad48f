"""What a Llama-family decoder's cost depends on: its shape, parameter counts, FLOPs and saved activations per token."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from distill.errors import DistillError
from distill.recipe import LoraSpec

LAYER_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---------------------------------------------------------------- shapes and parameters


@dataclass(frozen=True)
class ModelShape:
    """What the cost of a Llama-family decoder depends on."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False

    def projections(self) -> dict[str, tuple[int, int]]:
        """(fan_in, fan_out) of each linear layer inside one decoder layer."""
        q, kv, d, f = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
                "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}

    @property
    def layer_matmul_params(self) -> int:
        """Weights of one layer's linear projections (the part every token multiplies)."""
        return sum(i * o for i, o in self.projections().values())

    @property
    def layer_params(self) -> int:
        p = self.projections()
        bias = (p["q_proj"][1] + 2 * p["k_proj"][1]) * self.qkv_bias + self.hidden * self.o_bias
        bias += (2 * self.intermediate + self.hidden) * self.mlp_bias
        return self.layer_matmul_params + bias + 2 * self.hidden  # + the two RMSNorm weights

    @property
    def params(self) -> int:
        """All parameters; a tied head shares the embedding's tensor and counts once."""
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return embeddings + self.layers * self.layer_params + self.hidden  # + the final norm

    @property
    def param_tensors(self) -> int:
        per_layer = 9 + 3 * self.qkv_bias + self.o_bias + 3 * self.mlp_bias
        return self.layers * per_layer + 2 + (0 if self.tied else 1)

    def describe(self) -> str:
        return (f"{self.layers} layers x {self.hidden} hidden, {self.heads}/{self.kv_heads} heads (q/kv) of "
                f"{self.head_dim}, FFN {self.intermediate}, vocab {self.vocab:,}{', tied' if self.tied else ''}")


def shape_from_config(config) -> ModelShape:
    """The shape of a transformers (Llama-family) config."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    try:
        heads = config.num_attention_heads
        hidden = config.hidden_size
        shape = ModelShape(
            layers=config.num_hidden_layers,
            hidden=hidden,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or hidden // heads,
            intermediate=config.intermediate_size,
            vocab=config.vocab_size,
            tied=bool(getattr(config, "tie_word_embeddings", True)),
            # Qwen2 has q/k/v biases without an attention_bias flag; Llama's flag covers o_proj too.
            qkv_bias=bool(getattr(config, "attention_bias", config.model_type == "qwen2")),
            o_bias=bool(getattr(config, "attention_bias", False)),
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
        )
    except AttributeError as err:
        raise DistillError(f"{getattr(config, 'model_type', 'model')} config: not a Llama-family decoder "
                           f"({err})") from None
    return shape


def lora_projections(shape: ModelShape, lora: LoraSpec) -> dict[str, tuple[int, int]]:
    """The layer projections LoRA adapts, with their (fan_in, fan_out); an error if none is there."""
    chosen = {name: io for name, io in shape.projections().items() if name in lora.target_modules}
    if not chosen:
        raise DistillError(f"train.lora.target_modules: none of {lora.target_modules} exist in the student "
                           f"(its layers have {', '.join(LAYER_PROJECTIONS)})")
    return chosen


def lora_params(shape: ModelShape, lora: LoraSpec) -> int:
    """Trainable LoRA parameters: r x (fan_in + fan_out) per adapted projection per layer."""
    return shape.layers * sum(lora.r * (i + o) for i, o in lora_projections(shape, lora).values())


def shared_vocab(teacher: ModelShape, student: ModelShape) -> int:
    """The vocabulary the KD loss scores: only the rows both heads have enter the divergence."""
    return min(teacher.vocab, student.vocab)


# ---------------------------------------------------------------- FLOPs and activations per token


def linear_flops_per_token(shape: ModelShape) -> float:
    """Forward FLOPs of the decoder layers' projections for one token (2 per multiply-add)."""
    return 2.0 * shape.layers * shape.layer_matmul_params


def attention_flops_per_token(shape: ModelShape, seq_len: float) -> float:
    """Forward FLOPs of scores (QK^T) and mixing (AV) for one token attending over a padded row of seq_len.

    A padding mask makes attention run the full square (masked pairs are computed, then discarded).
    """
    return 4.0 * shape.layers * seq_len * shape.heads * shape.head_dim


def head_flops_per_token(shape: ModelShape, vocab: Optional[int] = None) -> float:
    """Forward FLOPs of the output head (hidden @ head.T) for one position."""
    return 2.0 * (vocab or shape.vocab) * shape.hidden


def forward_flops_per_token(shape: ModelShape, seq_len: float) -> float:
    """Forward FLOPs of the whole model for one token of a sequence of seq_len (logits at every position)."""
    return linear_flops_per_token(shape) + attention_flops_per_token(shape, seq_len) + head_flops_per_token(shape)


def _saved_kv_width(shape: ModelShape) -> int:
    # transformers' sdpa path repeats k and v to every query head (a copy) unless there is one kv head
    # (an expanded view) or one per query head (nothing to repeat).
    return shape.head_dim * (1 if shape.kv_heads == 1 else shape.heads)


def activation_floats_per_token(shape: ModelShape, seq_len: float) -> float:
    """Floats autograd keeps per token for backward through the decoder (transformers 5 Llama, sdpa).

    Per layer: each RMSNorm keeps its input, normalised and scaled outputs (3 x hidden) and 1/rms; attention
    keeps q, k, v (k and v repeated to all heads), its output and a logsumexp per head; the MLP keeps gate,
    up, silu(gate) and their product (4 x intermediate); the float padding mask is one row of seq_len.
    Counted with torch.autograd.graph.saved_tensors_hooks on real layers (tests/test_plan.py).
    """
    q = shape.heads * shape.head_dim
    per_layer = (6 * shape.hidden + 2 * q + 2 * _saved_kv_width(shape) + shape.heads + 4 * shape.intermediate
                 + 2 + seq_len)
    # Outside the layers: the final norm's input and normalised output, its 1/rms, the token ids (int64).
    return shape.layers * per_layer + 2 * shape.hidden + 3
