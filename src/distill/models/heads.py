"""Final hidden states and output head, so the chunked loss can form logits a slice at a time; block outputs."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import PreTrainedModel

from distill.errors import DistillError

# Words that, next to "logit" in a config attribute, mean the head's output is transformed after the matmul
# (Gemma2 final_logit_softcapping, Granite logits_scaling, Cohere logit_scale, ...).
_TRANSFORM_WORDS = ("softcap", "scal", "multiplier", "temperature")
# Logit-named attributes about something else: attention scores, MoE routers.
_UNRELATED_WORDS = ("attn", "attention", "router")


def is_peft(model: torch.nn.Module) -> bool:
    """Whether the model is a PEFT wrapper (LoRA) around a transformers model."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def base_model(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model inside a PEFT wrapper (LoRA layers stay injected in it), or the model itself."""
    return model.get_base_model() if is_peft(model) else model


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack (embeddings, blocks, final norm) without the output head."""
    base = base_model(model)
    return base.get_decoder() if hasattr(base, "get_decoder") else base.model


def decoder_hidden_states(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B, T, D] hidden states after the final norm: what the output head turns into logits.

    Packed rows (distill.data.packing) pass position_ids that restart per example and no attention_mask.
    """
    # Passed only when given: not every decoder's forward takes position_ids.
    positions = {} if position_ids is None else {"position_ids": position_ids}
    out = _decoder(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **positions)
    return out.last_hidden_state


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder blocks, in order (through a PEFT wrapper too)."""
    layers = getattr(_decoder(model), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        name = getattr(base_model(model).config, "name_or_path", "") or type(base_model(model)).__name__
        raise DistillError(f"{name}: cannot find the decoder blocks (no decoder.layers), which hidden-state KD "
                           "and train.parallel: fsdp need")
    return layers


def decoder_layer_outputs(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, layers: Iterable[int],
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """One forward: ([B, T, D] post-norm hidden states, {i: [B, T, D] raw output of block i} for i in layers).

    Forward hooks, not `output_hidden_states`: transformers 5 replaces the last entry of that tuple with the
    post-norm state, so the raw output of the last block is not in it.
    """
    blocks = decoder_layers(model)
    wanted = sorted(set(layers))
    if wanted and not 0 <= wanted[0] <= wanted[-1] < len(blocks):
        raise DistillError(f"decoder layers {wanted} requested from a model with layers 0..{len(blocks) - 1}")
    captured: dict[int, torch.Tensor] = {}

    def keep(index: int):
        def hook(_module, _args, output):
            captured[index] = output[0] if isinstance(output, tuple) else output
        return hook

    handles = [blocks[i].register_forward_hook(keep(i)) for i in wanted]
    try:
        final = decoder_hidden_states(model, input_ids, attention_mask, position_ids)
    finally:
        for handle in handles:
            handle.remove()
    return final, captured


def output_head(model: torch.nn.Module) -> torch.Tensor:
    """[V, D] weight of the output head; refuses heads whose logits are more than hidden @ weight.T."""
    base = base_model(model)
    head = base.get_output_embeddings()
    name = getattr(base.config, "name_or_path", "") or type(base).__name__
    if head is None:
        raise DistillError(f"{name}: the model has no output head (not a causal LM?)")
    if getattr(head, "bias", None) is not None:
        raise DistillError(f"{name}: the output head has a bias, which the chunked KD loss does not support")
    if hasattr(head, "lora_A"):
        raise DistillError(
            f"{name}: LoRA on the output head is not supported; drop lm_head from train.lora.target_modules"
        )
    transforms = logit_transforms(base.config)
    if transforms:
        raise DistillError(
            f"{name}: unsupported logit transform {', '.join(transforms)} (the KD loss needs logits = hidden @ head.T)"
        )
    return head.weight


def logit_transforms(config) -> list[str]:
    """Config attributes (`name=value`) that soft-cap or scale the final logits; empty when there are none."""
    configs = [config]
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text_config is not config:
        configs.append(text_config)
    found = []
    for cfg in configs:
        for name, value in vars(cfg).items():
            lowered = name.lower()
            if "logit" not in lowered or any(word in lowered for word in _UNRELATED_WORDS):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # None or a flag: nothing is applied
            if any(word in lowered for word in _TRANSFORM_WORDS) and ("softcap" in lowered or value != 1):
                found.append(f"{name}={value}")
    return found
