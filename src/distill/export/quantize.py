"""int8 / int4 weight-only quantization of a student with optimum-quanto, and what it costs in quality and speed.

The decoder's linear layers are quantized (int8: symmetric, one scale per output row; int4: asymmetric min/max per
group of input columns, packed two to a byte). Embeddings and the output head stay in float: quanto does not
quantize embeddings, and a tied head shares their weights. The directory holds `model.quanto.safetensors` (not
`model.safetensors`: plain `from_pretrained` would silently load it as a broken float model), the config, the
tokenizer and `distill_quantization.json`; `load_quantized` reads it back.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.data.layouts import Example
from distill.data.tokenize import collate, encode_all, padding_id
from distill.errors import DistillError
from distill.eval import metrics
from distill.models import bytes_on_disk, load_model, load_tokenizer
from distill.runtime import atomic_directory, atomic_write_json, remove_stale_temporaries
from distill.version import __version__

BITS = (8, 4)
LIBRARY = "optimum-quanto"
INSTALL = "pip install 'distill[quantize]'"
WEIGHTS_FILE = "model.quanto.safetensors"
INFO_FILE = "distill_quantization.json"
EVAL_MAX_TOKENS = 256  # per text: enough positions for a stable perplexity, short enough for a 2-core CPU
SPEED_PROMPT_TOKENS, SPEED_NEW_TOKENS, SPEED_ROUNDS = 32, 32, 3
DEFAULT_TEXT = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her dog, "
    "Max. One day, the sun was shining and the birds were singing. Lily saw a big red ball under a tree. She ran "
    "to get it, but Max got there first. They played together until it was time to go home for dinner."
)


@dataclass
class QuantizeReport:
    """What quantizing cost: size on disk, batch-1 decode speed on this CPU, and quality against the fp32 source."""

    bits: int
    group_size: Optional[int]  # None for int8 (one scale per output row)
    library: str
    quantized_modules: int
    source_bytes: int
    quantized_bytes: int
    source_decode_tokens_per_s: Optional[float]  # None when measure_speed=False
    quantized_decode_tokens_per_s: Optional[float]
    source_perplexity: Optional[float]
    quantized_perplexity: Optional[float]
    top1_agreement: Optional[float]  # quantized vs source argmax, per scored position
    kl_to_source: Optional[float]  # mean KL(source || quantized) per scored position
    eval_tokens: int

    @property
    def size_ratio(self) -> float:
        return self.quantized_bytes / self.source_bytes

    @property
    def speedup(self) -> Optional[float]:
        """Quantized decode tokens/s over the source's: below 1 means the quantized model is slower."""
        if self.source_decode_tokens_per_s is None or self.quantized_decode_tokens_per_s is None:
            return None
        return self.quantized_decode_tokens_per_s / self.source_decode_tokens_per_s

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "size_ratio": self.size_ratio, "speedup": self.speedup}


# ---------------------------------------------------------------- quantizing


def quantize_model(
    model_dir: Path,
    out_dir: Path,
    bits: int,
    *,
    group_size: int = 128,
    calibration: list[str] | None = None,
    measure_speed: bool = True,
) -> QuantizeReport:
    """Write model_dir's weight-only int8/int4 version to out_dir (atomically) and measure it against the source.

    `calibration` is the text the report's perplexity and agreement are measured on (a built-in story when None):
    quanto's weight-only schemes need no calibration data. `group_size` applies to int4 only. Measuring decode
    speed takes a few seconds per model on a small student; `measure_speed=False` leaves it out of the report.
    """
    check_bits(bits)
    if group_size < 1:
        raise DistillError(f"group_size {group_size}: must be a positive number of input columns")
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    _check_model_dir(model_dir)
    _check_out_dir(model_dir, out_dir)
    _quanto()
    tokenizer = load_tokenizer(str(model_dir))
    source = load_model(str(model_dir))
    quantized = load_model(str(model_dir))
    groups = quantize_in_place(quantized, bits, group_size)
    quality = measure_quality(source, quantized, tokenizer, calibration or [DEFAULT_TEXT])
    speeds = decode_tokens_per_s([source, quantized], tokenizer, rounds=SPEED_ROUNDS) if measure_speed else [None] * 2
    remove_stale_temporaries(Path(out_dir).parent, Path(out_dir).name)  # what a killed export left
    with atomic_directory(out_dir) as tmp:
        _save(quantized, tokenizer, tmp)
        report = QuantizeReport(
            bits=bits, group_size=group_size if bits == 4 else None, library=LIBRARY, quantized_modules=len(groups),
            source_bytes=bytes_on_disk(model_dir), quantized_bytes=(tmp / WEIGHTS_FILE).stat().st_size,
            source_decode_tokens_per_s=speeds[0], quantized_decode_tokens_per_s=speeds[1], **quality)
        atomic_write_json(tmp / INFO_FILE, _info(quantized, model_dir, groups, report))
    return report


def check_bits(bits: int) -> None:
    if bits not in BITS:
        raise DistillError(f"bits {bits!r}: not supported (choose one of: {', '.join(map(str, BITS))})")


def _check_model_dir(model_dir: Path) -> None:
    if (model_dir / INFO_FILE).is_file():
        raise DistillError(f"{model_dir}: already quantized ({INFO_FILE}); quantize the float model instead")
    if not (model_dir / "config.json").is_file():
        raise DistillError(f"{model_dir}: no model here (expected an HF model directory with config.json)")
    if not any(model_dir.glob("*.safetensors")) and not any(model_dir.glob("*.bin")):
        raise DistillError(f"{model_dir}: config.json but no weights (*.safetensors or *.bin)")


def _check_out_dir(model_dir: Path, out_dir: Path) -> None:
    # Writing replaces out_dir: it must not be the source or hold it.
    if out_dir.resolve() == model_dir.resolve() or out_dir.resolve() in model_dir.resolve().parents:
        raise DistillError(f"{out_dir}: would replace the source model {model_dir}; choose another directory")


def _quanto():
    """The optimum.quanto module, or one DistillError line saying how to install it."""
    try:
        import optimum.quanto as quanto
    except ImportError:
        raise DistillError(f"int8/int4 quantization needs {LIBRARY}: run `{INSTALL}`") from None
    return quanto


def _qtype(bits: int):
    quanto = _quanto()
    return quanto.qint8 if bits == 8 else quanto.qint4


def quantizable_linears(model: PreTrainedModel) -> list[str]:
    """Names of the linear layers to quantize: all but the output head (tied to the float embeddings)."""
    head = model.get_output_embeddings()
    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not head]


def group_for(in_features: int, group_size: int) -> Optional[int]:
    """The int4 group of a layer: the largest divisor of in_features up to group_size; None for a whole row."""
    group = next(g for g in range(min(group_size, in_features), 0, -1) if in_features % g == 0)
    return None if group == in_features else group


def quantize_in_place(model: PreTrainedModel, bits: int, group_size: int = 128) -> dict[str, Optional[int]]:
    """Swap the decoder's linear layers for frozen quanto ones; returns each layer's group (None: per row)."""
    quanto = _quanto()
    names = quantizable_linears(model)
    groups = {name: None if bits == 8 else group_for(model.get_submodule(name).in_features, group_size)
              for name in names}
    quanto.quantize(model, weights=_qtype(bits), include=names)
    _set_groups(model, groups)
    quanto.freeze(model)
    return groups


def _set_groups(model: torch.nn.Module, groups: dict[str, Optional[int]]) -> None:
    # quanto picks its own int4 group (128, 96, 64 or 32, else per row) when it swaps a layer; ours replaces it
    # before the weights are packed (freeze) or read back (load_state_dict), which both use weight_group_size.
    for name, group in groups.items():
        model.get_submodule(name).weight_group_size = group


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    from safetensors.torch import save_file

    model.config.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    save_file(_unshared_state(model), str(out / WEIGHTS_FILE), metadata={"format": "pt"})


def _unshared_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each storage once: a tied head is the embedding matrix under a second name."""
    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            state[name] = tensor.contiguous()
    return state


def _info(model: PreTrainedModel, model_dir: Path, groups: dict, report: QuantizeReport) -> dict:
    float_modules = [name for name, module in model.named_modules()
                     if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) and name not in groups]
    return {
        "library": LIBRARY,
        "library_version": metadata.version(LIBRARY),
        "bits": report.bits,
        "weights": _qtype(report.bits).name,
        "group_size": report.group_size,
        "scheme": "weight-only; int8: symmetric, one scale per output row; "
                  "int4: asymmetric min/max per group of input columns (null group: the whole row)",
        "quantized_modules": groups,
        "float_modules": float_modules,  # and every norm
        "source": str(model_dir.resolve()),
        "distill_version": __version__,
        "report": report.to_dict(),
    }


# ---------------------------------------------------------------- loading


def load_quantized(model_dir: Path) -> PreTrainedModel:
    """A directory written by quantize_model, as a causal LM in eval mode on the CPU."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    model_dir = Path(model_dir)
    info = read_info(model_dir)
    quanto = _quanto()
    with init_empty_weights():  # weights come from the file; buffers (rotary tables) are still computed
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    groups = info["quantized_modules"]
    quanto.quantize(model, weights=_qtype(info["bits"]), include=list(groups))
    _set_groups(model, groups)
    _materialize(model)
    state = load_file(str(model_dir / WEIGHTS_FILE))
    result = model.load_state_dict(state, strict=False)
    model.tie_weights()
    _check_loaded(model, model_dir, result.missing_keys, result.unexpected_keys)
    if (model_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    return model.eval()


def read_info(model_dir: Path) -> dict:
    """distill_quantization.json of a quantized directory, checked enough to load it."""
    path = Path(model_dir) / INFO_FILE
    if not path.is_file() or not (Path(model_dir) / WEIGHTS_FILE).is_file():
        raise DistillError(f"{model_dir}: not a quantized model (no {INFO_FILE} and {WEIGHTS_FILE}); "
                           "write one with quantize_model")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DistillError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(info.get("quantized_modules"), dict) or "bits" not in info:
        raise DistillError(f"{path}: needs `bits` and a `quantized_modules` object (module name -> int4 group)")
    check_bits(info["bits"])
    return info


def _materialize(model: torch.nn.Module) -> None:
    """Give the tensors left on the meta device real (empty) CPU storage for load_state_dict to fill."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.device.type == "meta":
                setattr(module, name, torch.nn.Parameter(torch.empty_like(param, device="cpu"), requires_grad=False))
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.device.type == "meta":  # quanto makes its layers' (unused) activation scales on meta
                setattr(module, name, torch.empty_like(buffer, device="cpu"))


def _check_loaded(model: torch.nn.Module, model_dir: Path, missing: list, unexpected: list) -> None:
    # quanto's layers read their part of the file with strict=False: a missing or foreign tensor is caught here
    problems = sorted(set(missing) - _tied_names(model)) + sorted(unexpected)
    if problems:
        raise DistillError(f"{model_dir / WEIGHTS_FILE}: does not match the model's config "
                           f"({len(problems)} tensors missing or unexpected, first: {problems[0]})")


def _tied_names(model: torch.nn.Module) -> set[str]:
    """Names under which an earlier parameter appears again (a tied output head): the file holds them once."""
    seen, tied = set(), set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        seen.add(id(param))
    return tied


# ---------------------------------------------------------------- measuring


def measure_quality(source: PreTrainedModel, quantized: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                    texts: list[str]) -> dict[str, Any]:
    """Perplexity of both models on texts, and the quantized model's top-1 agreement and KL against the source."""
    batches = eval_batches(tokenizer, texts)
    source_ppl, quantized_ppl = (_no_inference_mode(metrics.perplexity)(m, batches()) for m in (source, quantized))
    agree = _no_inference_mode(metrics.agreement)(quantized, source, batches(), source.config.vocab_size)
    return {"source_perplexity": source_ppl["perplexity"], "quantized_perplexity": quantized_ppl["perplexity"],
            "top1_agreement": agree["top1_agreement"], "kl_to_source": agree["kl_to_teacher"],
            "eval_tokens": agree["tokens"]}


def _no_inference_mode(metric: Callable) -> Callable:
    """The metric under no_grad instead of its inference_mode: quanto's int4 weights fail there (optimum-quanto#304)."""
    # metrics wraps these functions in torch.inference_mode(), which keeps the undecorated one as __wrapped__
    def run(*args, **kwargs):
        with torch.no_grad():
            return metric.__wrapped__(*args, **kwargs)
    return run


def eval_batches(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> Callable[[], list[dict]]:
    """Each text as plain text (every token scored), cut to EVAL_MAX_TOKENS, one text per batch."""
    examples = [Example(id=str(i), text=text) for i, text in enumerate(texts)]
    encoded = encode_all(examples, tokenizer, EVAL_MAX_TOKENS, source="the quantization eval text")
    pad = padding_id(tokenizer)
    return lambda: [collate([e], pad) for e in encoded]


def decode_tokens_per_s(
    models: list[PreTrainedModel], tokenizer: PreTrainedTokenizerBase, rounds: int = SPEED_ROUNDS
) -> list[float]:
    """Batch-1 greedy KV-cached decode tokens/s of each model: rounds alternate models, each keeps its best round.

    Alternating and keeping the best makes the comparison fair on a shared CPU, where other work slows
    whichever model happens to run at the time.
    """
    decode_speed = _no_inference_mode(metrics.decode_speed)
    limit = getattr(models[0].config, "max_position_embeddings", None) or SPEED_PROMPT_TOKENS + SPEED_NEW_TOKENS
    prompt, new = min(SPEED_PROMPT_TOKENS, limit // 2), min(SPEED_NEW_TOKENS, limit // 2)
    runs = [[decode_speed(m, tokenizer, prompt_tokens=prompt, new_tokens=new, repeats=1)["decode_tokens_per_s"]
             for m in models] for _ in range(rounds)]
    return [max(column) for column in zip(*runs)]


__all__ = ["BITS", "QuantizeReport", "check_bits", "decode_tokens_per_s", "group_for", "load_quantized",
           "measure_quality", "quantize_in_place", "quantize_model", "read_info"]
