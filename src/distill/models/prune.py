"""Cut a student out of the teacher: keep its most important layers (depth) and channels, neurons, heads (width).

Importance is measured on calibration text, Minitron-style for width (mean activation magnitude of each hidden
channel, FFN neuron and attention head) and ShortGPT-style for depth (Block Influence: 1 - cos(input, output) of
each block) or by the loss increase when a block is skipped. Weights are sliced, never re-initialised, so the
student starts with the teacher's knowledge; distillation then repairs what the cut broke.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Iterator, Optional

import torch
from torch import Tensor
from transformers import PreTrainedModel

from distill.errors import DistillError
from distill.models.heads import base_model
from distill.models.loading import count_params
from distill.models.student import student_config_summary

if TYPE_CHECKING:
    from distill.recipe import FromTeacherSpec


# What a decoder block must contain for slicing to be right: Llama, Mistral, Qwen2/3, SmolLM2 layouts.
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_NORMS = ("input_layernorm", "post_attention_layernorm")


@dataclass
class Importance:
    """Calibration measurements of a model: per-layer, per-channel, per-neuron and per-head scores."""

    layers: list[float] = field(default_factory=list)  # higher = the block matters more
    hidden: Optional[Tensor] = None  # [D]
    ffn: list[Tensor] = field(default_factory=list)  # per layer [F]
    heads: list[Tensor] = field(default_factory=list)  # per layer [H]


@dataclass
class PruneReport:
    """What the pruner kept, and why: written next to a pruned student as pruning.json."""

    teacher_params: int
    student_params: int
    teacher_shape: dict
    student_shape: dict
    keep_layers: list[int]
    layer_importance: dict[str, float]
    layer_importance_method: Optional[str]
    calibration_tokens: int

    def to_json(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One paragraph for the console: sizes and what was cut."""
        t, s = self.teacher_shape, self.student_shape
        cut = [f"layers {t['layers']} -> {s['layers']} (kept {self.keep_layers})"] if s["layers"] != t["layers"] else []
        for key in ("hidden", "intermediate", "heads", "kv_heads"):
            if s[key] != t[key]:
                cut.append(f"{key} {t[key]} -> {s[key]}")
        share = 100 * self.student_params / self.teacher_params
        return (f"student: {self.student_params / 1e6:.2f}M parameters ({share:.1f}% of the teacher's "
                f"{self.teacher_params / 1e6:.2f}M); cut: {'; '.join(cut) or 'nothing'}")


# ----------------------------------------------------------------------------------------------- checks


def _decoder(model: PreTrainedModel):
    base = base_model(model)
    return base.get_decoder() if hasattr(base, "get_decoder") else base.model


def check_prunable(model: PreTrainedModel) -> None:
    """Refuse, in one line, architectures whose blocks are not the Llama layout the slicer knows."""
    name = getattr(model.config, "model_type", type(model).__name__)
    decoder = _decoder(model)
    layers = getattr(decoder, "layers", None)
    problem = None
    if layers is None or not hasattr(decoder, "embed_tokens") or not hasattr(decoder, "norm"):
        problem = "no embed_tokens / layers / norm"
    else:
        for part in layers[0].modules():
            if "MoE" in type(part).__name__ or hasattr(part, "experts"):
                problem = "mixture-of-experts blocks"
        block = layers[0]
        missing = [n for n in _NORMS if not hasattr(block, n)]
        missing += [f"self_attn.{n}" for n in _ATTENTION if not hasattr(getattr(block, "self_attn", None), n)]
        missing += [f"mlp.{n}" for n in _MLP if not hasattr(getattr(block, "mlp", None), n)]
        if missing:
            problem = f"its blocks lack {', '.join(missing)}"
    if problem:
        raise DistillError(
            f"student.from_teacher: cannot prune a {name} model ({problem}); pruning supports Llama-layout "
            "decoders (Llama, Mistral, Qwen2, Qwen3, SmolLM2)"
        )


def _shape(model: PreTrainedModel) -> dict:
    return student_config_summary(model)


# ---------------------------------------------------------------------------------------- calibration


def calibration_batches(token_ids: list[list[int]], samples: int, max_length: int) -> list[Tensor]:
    """Concatenate tokenised texts and cut them into up to `samples` rows of `max_length` (no padding)."""
    stream = [t for ids in token_ids for t in ids]
    rows = min(samples, len(stream) // max_length)
    if rows == 0:
        length = len(stream)
        if length < 8:
            raise DistillError("student.from_teacher.calibration: fewer than 8 tokens of calibration text")
        return [torch.tensor([stream])]
    data = torch.tensor(stream[: rows * max_length]).view(rows, max_length)
    return list(data.split(8))  # 8 rows per forward keeps activations small


@contextlib.contextmanager
def _hooks(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _block_input(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


@torch.no_grad()
def measure_importance(model: PreTrainedModel, batches: list[Tensor], *, width: bool = True) -> Importance:
    """Block Influence per layer, and (when `width`) activation magnitudes per channel, neuron and head."""
    decoder = _decoder(model)
    layers = decoder.layers
    heads = model.config.num_attention_heads
    influence = torch.zeros(len(layers), dtype=torch.float64)
    hidden = torch.zeros(model.config.hidden_size, dtype=torch.float64)
    ffn = [torch.zeros(block.mlp.down_proj.in_features, dtype=torch.float64) for block in layers]
    head_scores = [torch.zeros(heads, dtype=torch.float64) for _ in layers]
    tokens = 0

    def on_block(i):
        def hook(module, args, kwargs, output):
            cos = torch.nn.functional.cosine_similarity(_block_input(args, kwargs).double(), output.double(), dim=-1)
            influence[i] += (1 - cos).sum()
        return hook

    def on_norm(module, args, output):
        hidden.add_(output.double().abs().sum(dim=(0, 1)))

    def on_down(i):
        def hook(module, args):
            ffn[i].add_(args[0].double().abs().sum(dim=(0, 1)))
        return hook

    def on_o_proj(i):
        def hook(module, args):
            x = args[0]
            per_head = x.view(*x.shape[:-1], heads, -1).double().norm(dim=-1)  # [B, T, H]
            head_scores[i].add_(per_head.sum(dim=(0, 1)))
        return hook

    handles = [b.register_forward_hook(on_block(i), with_kwargs=True) for i, b in enumerate(layers)]
    if width:
        for i, block in enumerate(layers):
            handles += [block.input_layernorm.register_forward_hook(on_norm),
                        block.post_attention_layernorm.register_forward_hook(on_norm),
                        block.mlp.down_proj.register_forward_pre_hook(on_down(i)),
                        block.self_attn.o_proj.register_forward_pre_hook(on_o_proj(i))]
    device = next(model.parameters()).device
    with _hooks(handles):
        for batch in batches:
            decoder(input_ids=batch.to(device), use_cache=False)
            tokens += batch.numel()
    result = Importance(layers=(influence / tokens).tolist())
    if width:
        result.hidden = hidden / (2 * len(layers) * tokens)
        result.ffn = [f / tokens for f in ffn]
        result.heads = [h / tokens for h in head_scores]
    return result


@torch.no_grad()
def skip_loss_importance(model: PreTrainedModel, batches: list[Tensor]) -> list[float]:
    """Per layer: how much the next-token loss on calibration text rises when that block is skipped."""
    layers = _decoder(model).layers
    base = _calibration_loss(model, batches)
    scores = []
    for block in layers:
        handle = block.register_forward_hook(lambda m, args, kwargs, out: _block_input(args, kwargs),
                                             with_kwargs=True)
        with _hooks([handle]):
            scores.append(_calibration_loss(model, batches) - base)
    return scores


def _calibration_loss(model: PreTrainedModel, batches: list[Tensor]) -> float:
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in batches:
        batch = batch.to(device)
        out = model(input_ids=batch, labels=batch, use_cache=False)
        n = batch.shape[0] * (batch.shape[1] - 1)
        total, count = total + float(out.loss) * n, count + n
    return total / count


# ---------------------------------------------------------------------------------------------- depth


def select_layers(count: int, num_layers: int, scores: Optional[list[float]] = None) -> list[int]:
    """Which `count` of `num_layers` blocks to keep: the highest-scoring ones, or evenly spaced without scores."""
    if not 0 < count <= num_layers:
        raise DistillError(f"student.from_teacher.layers: must be between 1 and the teacher's {num_layers}, got {count}")
    if scores is None:
        if count == 1:
            return [0]
        return sorted({round(i * (num_layers - 1) / (count - 1)) for i in range(count)})
    ranked = sorted(range(num_layers), key=lambda i: scores[i], reverse=True)
    return sorted(ranked[:count])


def prune_depth(model: PreTrainedModel, keep_layers: list[int]) -> PreTrainedModel:
    """A copy of `model` with only the blocks in `keep_layers`, in their original order."""
    total = model.config.num_hidden_layers
    bad = [i for i in keep_layers if not 0 <= i < total]
    if bad:
        raise DistillError(f"student.from_teacher.keep_layers: {bad} out of range; the teacher has layers 0..{total - 1}")
    keep = sorted(keep_layers)
    state = {}
    for key, value in model.state_dict().items():
        index = _layer_index(key)
        if index is None:
            state[key] = value
        elif index in keep:
            state[key.replace(f"layers.{index}.", f"layers.{keep.index(index)}.", 1)] = value
    updates = {"num_hidden_layers": len(keep)}
    layer_types = getattr(model.config, "layer_types", None)
    if layer_types:
        updates["layer_types"] = [layer_types[i] for i in keep]
    return _rebuild(model, updates, state)


def _layer_index(key: str) -> Optional[int]:
    parts = key.split(".")
    if "layers" in parts:
        position = parts.index("layers")
        if position + 1 < len(parts) and parts[position + 1].isdigit():
            return int(parts[position + 1])
    return None


def _rebuild(model: PreTrainedModel, updates: dict, state: dict[str, Tensor]) -> PreTrainedModel:
    """A new model of the same class with config `updates`, holding `state` exactly."""
    config = model.config.__class__.from_dict({**model.config.to_dict(), **updates})
    with torch.device("meta"):
        new = type(model)(config)
    # Copies: the student trains while the teacher it came from must stay frozen and intact.
    new.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=False, assign=True)
    if config.tie_word_embeddings:
        new.tie_weights()
    leftover = [n for n, p in new.named_parameters() if p.is_meta] + [n for n, b in new.named_buffers() if b.is_meta]
    _restore_buffers(new, model, leftover)
    new.generation_config = model.generation_config
    return new


def _restore_buffers(new: PreTrainedModel, old: PreTrainedModel, names: list[str]) -> None:
    """Non-persistent buffers (rotary inverse frequencies) are not in the state dict: recompute them."""
    params = [n for n in names if "rotary_emb" not in n]
    if params:
        raise RuntimeError(f"pruned model is missing weights {params[:3]}")  # a slicer bug, not user input
    for module_name, module in new.named_modules():
        if module_name.endswith("rotary_emb"):
            source = old.get_submodule(module_name) if _has_module(old, module_name) else None
            for buffer_name, buffer in list(module.named_buffers(recurse=False)):
                value = getattr(source, buffer_name, None) if source is not None else None
                if value is None:
                    raise RuntimeError(f"cannot restore buffer {module_name}.{buffer_name}")
                module.register_buffer(buffer_name, value.clone(), persistent=False)


def _has_module(model: torch.nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


# ---------------------------------------------------------------------------------------------- width


def _top(scores: Tensor, k: int) -> Tensor:
    """Indices of the k largest scores, in ascending index order (so kept channels keep their order)."""
    return scores.topk(k).indices.sort().values


def choose_heads(scores: Tensor, num_kv: int, keep_heads: int, keep_kv: int) -> tuple[Tensor, Tensor]:
    """(query heads, kv heads) to keep: the best kv groups, and within each the best query heads."""
    group = scores.numel() // num_kv
    new_group = keep_heads // keep_kv
    groups = scores.view(num_kv, group)
    kept_kv = _top(groups.sum(dim=1), keep_kv)
    kept_q = [g * group + _top(groups[g], new_group) for g in kept_kv.tolist()]
    return torch.cat(kept_q), kept_kv


def validate_width(spec: FromTeacherSpec, config) -> dict:
    """Width targets with the teacher's values filled in; impossible ones fail naming the key and the choices."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    target = {
        "hidden_size": spec.hidden_size or config.hidden_size,
        "intermediate_size": spec.intermediate_size or config.intermediate_size,
        "num_heads": spec.num_heads or heads,
        "num_kv_heads": spec.num_kv_heads or (kv if spec.num_heads is None else None),
    }
    key = "student.from_teacher"
    if target["hidden_size"] > config.hidden_size:
        raise DistillError(f"{key}.hidden_size: {target['hidden_size']} exceeds the teacher's {config.hidden_size}")
    if target["intermediate_size"] > config.intermediate_size:
        raise DistillError(f"{key}.intermediate_size: {target['intermediate_size']} exceeds the teacher's "
                           f"{config.intermediate_size}")
    if target["num_heads"] > heads:
        raise DistillError(f"{key}.num_heads: {target['num_heads']} exceeds the teacher's {heads}")
    group = heads // kv
    if target["num_kv_heads"] is None:  # heads given alone: keep as many kv groups as the heads fill
        target["num_kv_heads"] = _default_kv(target["num_heads"], kv, group)
    new_kv = target["num_kv_heads"]
    valid_kv = [k for k in range(1, kv + 1) if target["num_heads"] % k == 0 and target["num_heads"] // k <= group]
    if new_kv not in valid_kv:
        raise DistillError(
            f"{key}.num_kv_heads: {new_kv} does not fit {target['num_heads']} query heads in the teacher's {kv} "
            f"groups of {group}; valid choices: {valid_kv or 'none (change num_heads)'}"
        )
    if target["hidden_size"] % target["num_heads"]:  # transformers' Llama config insists, whatever head_dim is
        valid = [h for h in range(1, heads + 1) if target["hidden_size"] % h == 0]
        raise DistillError(f"{key}.hidden_size: {target['hidden_size']} is not divisible by num_heads "
                           f"{target['num_heads']}; head counts that divide it: {valid}")
    return target


def _default_kv(num_heads: int, kv: int, group: int) -> int:
    for k in range(1, kv + 1):
        if num_heads % k == 0 and num_heads // k <= group:
            return k
    valid = sorted({k * g for k in range(1, kv + 1) for g in range(1, group + 1)})
    raise DistillError(f"student.from_teacher.num_heads: {num_heads} cannot be split into the teacher's {kv} "
                       f"groups of {group}; valid choices: {valid}")


def prune_width(model: PreTrainedModel, target: dict, importance: Importance) -> tuple[PreTrainedModel, Tensor]:
    """A copy of `model` narrowed to `target` (see validate_width); returns it and the kept hidden channels."""
    config = model.config
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    channels = _top(importance.hidden, target["hidden_size"])
    state = dict(model.state_dict())
    for key in [k for k in state if _layer_index(k) is None]:
        if key.endswith(("embed_tokens.weight", "lm_head.weight")):
            state[key] = state[key][:, channels]
        elif key.endswith("norm.weight"):
            state[key] = state[key][channels]
    for i, _ in enumerate(_decoder(model).layers):
        neurons = _top(importance.ffn[i], target["intermediate_size"])
        q_heads, kv_heads = choose_heads(importance.heads[i], kv, target["num_heads"], target["num_kv_heads"])
        _slice_block(state, i, channels, neurons, _head_rows(q_heads, hd), _head_rows(kv_heads, hd))
    updates = {"hidden_size": target["hidden_size"], "intermediate_size": target["intermediate_size"],
               "num_attention_heads": target["num_heads"], "num_key_value_heads": target["num_kv_heads"],
               "head_dim": hd}
    return _rebuild(model, updates, state), channels


def _head_rows(heads: Tensor, head_dim: int) -> Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def _slice_block(state: dict, i: int, channels: Tensor, neurons: Tensor, q_rows: Tensor, kv_rows: Tensor) -> None:
    """Slice one block's weights in place in `state`: rows are outputs, columns are inputs."""
    rows_of = {"q_proj": q_rows, "k_proj": kv_rows, "v_proj": kv_rows, "gate_proj": neurons, "up_proj": neurons,
               "o_proj": channels, "down_proj": channels}
    cols_of = {"q_proj": channels, "k_proj": channels, "v_proj": channels, "gate_proj": channels,
               "up_proj": channels, "o_proj": q_rows, "down_proj": neurons}
    prefix = f".layers.{i}."
    for key in [k for k in state if prefix in k]:
        name = key.split(prefix, 1)[1]
        parts = name.split(".")
        if parts[0] in _NORMS:
            state[key] = state[key][channels]
        elif len(parts) == 3 and parts[1] in rows_of:  # e.g. self_attn.q_proj.weight / .bias
            proj, kind = parts[1], parts[2]
            value = state[key][rows_of[proj]]
            state[key] = value[:, cols_of[proj]] if kind == "weight" else value
        # q_norm / k_norm (Qwen3) act on head_dim, which is kept whole


# ------------------------------------------------------------------------------------------ together


def prune_teacher(
    teacher: PreTrainedModel, spec: FromTeacherSpec, batches: list[Tensor]
) -> tuple[PreTrainedModel, PruneReport]:
    """Depth first (layers chosen on the whole teacher), then width (importance measured on the kept layers)."""
    teacher = base_model(teacher)
    check_prunable(teacher)
    target = validate_width(spec, teacher.config)
    num_layers = teacher.config.num_hidden_layers
    scores, method = None, None
    keep = spec.keep_layers
    if keep is None and spec.layers is not None and spec.layers < num_layers and spec.layer_selection == "importance":
        method = spec.layer_importance
        scores = (skip_loss_importance(teacher, batches) if method == "skip_loss"
                  else measure_importance(teacher, batches, width=False).layers)
    if keep is None:
        keep = select_layers(spec.layers or num_layers, num_layers, scores)
    student = prune_depth(teacher, keep)  # a copy even when every layer is kept: the teacher stays untouched
    channels = None
    if _narrower(target, student.config):
        student, channels = prune_width(student, target, measure_importance(student, batches))
    student.config.distill_pruned_from = {
        "teacher_layers": list(keep),
        "hidden_channels": channels.tolist() if channels is not None else None,
    }
    report = PruneReport(
        teacher_params=count_params(teacher), student_params=count_params(student),
        teacher_shape=_shape(teacher), student_shape=_shape(student), keep_layers=list(keep),
        layer_importance={str(i): round(s, 6) for i, s in enumerate(scores)} if scores else {},
        layer_importance_method=method, calibration_tokens=sum(b.numel() for b in batches),
    )
    return student, report


def _narrower(target: dict, config) -> bool:
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return (target["hidden_size"], target["intermediate_size"], target["num_heads"], target["num_kv_heads"]) != (
        config.hidden_size, config.intermediate_size, config.num_attention_heads, kv)
