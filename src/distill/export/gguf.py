"""Write a Llama-family HF model directory as one GGUF file for llama.cpp, and check it by loading it back.

The file follows llama.cpp's `convert_hf_to_gguf.py` conventions: its tensor names (from `gguf`'s name map),
Q/K rows of Llama attention permuted from HF's rotate-half rope to llama.cpp's interleaved pairs (transformers'
GGUF loader permutes them back), 1-D tensors kept f32, and the tokenizer as `tokenizer.ggml.*` metadata.
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from gguf import (
    GGML_QUANT_VERSION,
    MODEL_ARCH,
    MODEL_ARCH_NAMES,
    GGMLQuantizationType,
    GGUFWriter,
    TokenType,
    get_tensor_name_map,
    quants,
)

from distill.errors import DistillError
from distill.export.hf import model_dir_of
from distill.export.kquants import quantize as quantize_tensor
from distill.export.quant_mix import IQ4_SCHEMES, SCHEMES, UNQUANTIZED, ModelShape, tensor_type
from distill.runtime import atomic_file, remove_stale_temporaries
from distill.teachers.backend import SamplingParams
from distill.teachers.local import generate_texts

log = logging.getLogger("distill")

Q = GGMLQuantizationType
# --quant name -> its default GGML type; K-quant and IQ4 schemes (q4_k_m, iq4_xs, ...) mix types per tensor as
# llama.cpp does
QTYPES: dict[str, GGMLQuantizationType] = {name: ggml_type for name, (ggml_type, _) in SCHEMES.items()}
# HF class -> (llama.cpp architecture, Q/K need the interleaved-rope permutation). Mistral is llama to llama.cpp.
ARCHITECTURES = {
    "LlamaForCausalLM": (MODEL_ARCH.LLAMA, True),
    "MistralForCausalLM": (MODEL_ARCH.LLAMA, True),
    "Qwen2ForCausalLM": (MODEL_ARCH.QWEN2, False),
}
_SKIPPED_TENSORS = ("rotary_emb.inv_freq",)  # recomputed by every runtime; llama.cpp drops them too
GREEDY_PROMPTS = ("Write one sentence about the sea.", "What is 12 plus 30?", "Name three colours.")
DEFAULT_TEXTS = (
    "Once upon a time there was a little robot who loved to read books.",
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France.",
    "Two plus two is four, and three times three is nine.",
)


# ---------------------------------------------------------------------------------------------- export


def export_gguf(model_dir: Path, out_path: Path, qtype: str = "f16",
                imatrix: Optional[dict[str, np.ndarray]] = None) -> Path:
    """Write model_dir (an HF directory or a run directory) as a GGUF file; returns the file written.

    out_path ending in `.gguf` is the file; anything else is a directory that receives `model-<qtype>.gguf`.
    `imatrix` (GGUF tensor name -> one importance per input column, see export.imatrix) weights the
    quantization error of the tensors it names, as `llama-quantize --imatrix` does.
    """
    scheme = qtype.lower()
    parse_qtype(scheme)  # an unknown type is refused before any work
    model_dir = model_dir_of(Path(model_dir))
    out_file = _out_file(Path(out_path), scheme)
    config = _read_config(model_dir)
    arch, permute_qk = _architecture(model_dir, config)
    plans = _plan_tensors(model_dir, config, arch, scheme, has_imatrix=imatrix is not None)
    if imatrix is not None:
        check_imatrix(imatrix, plans)
    vocab = read_vocab(model_dir, config.vocab_size)
    remove_stale_temporaries(out_file.parent, out_file.name)  # what a killed export of this file left
    with atomic_file(out_file) as tmp:
        writer = GGUFWriter(tmp, MODEL_ARCH_NAMES[arch])
        try:
            _add_hparams(writer, config, _model_name(model_dir), scheme)
            _add_vocab(writer, vocab)
            _write_tensors(writer, plans, config, permute_qk, imatrix or {})
        finally:
            writer.close()
    _log_fallbacks(plans, scheme)
    return out_file


def parse_qtype(qtype: str) -> GGMLQuantizationType:
    """The GGML type for a `--quant` name."""
    try:
        return QTYPES[qtype.lower()]
    except KeyError:
        raise DistillError(f"--quant {qtype}: unknown GGUF type (supported: {', '.join(QTYPES)})") from None


def check_imatrix(imatrix: dict[str, np.ndarray], plans: list["TensorPlan"]) -> None:
    """Refuse an importance matrix whose tensor names or column counts are not this model's."""
    rows = {plan.gguf_name: plan.shape[-1] for plan in plans if len(plan.shape) == 2}
    foreign = sorted(set(imatrix) - set(rows))
    if foreign:
        raise DistillError(f"imatrix: tensor {foreign[0]} is not in this model ({len(foreign)} foreign tensors); "
                           "was it computed for another model?")
    for name, values in imatrix.items():
        if np.asarray(values).shape != (rows[name],):
            raise DistillError(f"imatrix: {name} has {np.asarray(values).size} values but the model's rows have "
                               f"{rows[name]} columns; was it computed for another model?")
    if not imatrix:
        raise DistillError("imatrix: holds no tensors")


def _out_file(out_path: Path, qtype: str) -> Path:
    if out_path.suffix == ".gguf":
        if out_path.is_dir():
            raise DistillError(f"--out {out_path}: is a directory; name a .gguf file or a directory without the suffix")
        return out_path
    if out_path.exists() and not out_path.is_dir():
        raise DistillError(f"--out {out_path}: exists and is not a directory (name the file *.gguf)")
    return out_path / f"model-{qtype}.gguf"


# ---------------------------------------------------------------------------------------------- config


def _read_config(model_dir: Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        raise DistillError(f"{model_dir / 'config.json'}: cannot read the model config ({_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _architecture(model_dir: Path, config: Any) -> tuple[MODEL_ARCH, bool]:
    """The llama.cpp architecture for config, or a DistillError naming what this writer cannot express."""
    where = model_dir / "config.json"
    names = getattr(config, "architectures", None) or []
    supported = [name for name in names if name in ARCHITECTURES]
    if not supported:
        raise DistillError(f"{where}: architectures {names or '(none)'} cannot be written as GGUF "
                           f"(supported: {', '.join(ARCHITECTURES)})")
    rope = _rope_parameters(config)
    problems = {
        f"rope_type {rope.get('rope_type')!r} (only plain rope)": rope.get("rope_type", "default") != "default",
        f"hidden_act {config.hidden_act!r} (only silu)": config.hidden_act != "silu",
        "attention_bias or mlp_bias": bool(getattr(config, "attention_bias", False)
                                           or getattr(config, "mlp_bias", False)),
        "sliding-window attention": bool(getattr(config, "sliding_window", None)
                                         and (supported[0] != "Qwen2ForCausalLM"
                                              or getattr(config, "use_sliding_window", False))),
    }
    refused = [what for what, present in problems.items() if present]
    if refused:
        raise DistillError(f"{where}: {supported[0]} with {', '.join(refused)} cannot be written as GGUF here")
    return ARCHITECTURES[supported[0]]


def llama_arch(model_dir: Path) -> MODEL_ARCH:
    """The llama.cpp architecture model_dir is written as, or a DistillError saying why it cannot be."""
    model_dir = model_dir_of(Path(model_dir))
    return _architecture(model_dir, _read_config(model_dir))[0]


def is_k_quant(qtype: str) -> bool:
    """Is the --quant name one of llama.cpp's K-quant or IQ4 schemes (q4_k_m, q6_k, iq4_xs, ...), the mixes an
    `auto` importance matrix is made for?"""
    name = qtype.lower()
    return name in QTYPES and ("_k" in name or name in IQ4_SCHEMES)


def _rope_parameters(config: Any) -> dict:
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _model_name(model_dir: Path) -> str:
    # transformers' GGUF loader reads a `llama` file whose name holds "mistral" as Mistral, which gguf 0.19
    # cannot map; without sliding windows Mistral is Llama, so the name must not say it.
    return re.sub("mistral", "model", model_dir.resolve().name, flags=re.IGNORECASE)


def _add_hparams(writer: GGUFWriter, config: Any, name: str, scheme: str) -> None:
    head_dim = _head_dim(config)
    writer.add_type("model")
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_rope_freq_base(float(_rope_parameters(config)["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    ggml_type, file_type = SCHEMES[scheme]
    writer.add_file_type(file_type)
    if ggml_type not in UNQUANTIZED:
        writer.add_quantization_version(GGML_QUANT_VERSION)


# ---------------------------------------------------------------------------------------------- tensors


@dataclass
class TensorPlan:
    """One tensor: where it is read from, its GGUF name and type, and why its type differs when it does."""

    hf_name: str
    file: Path
    gguf_name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    note: Optional[str] = None

    @property
    def byte_shape(self) -> tuple[int, ...]:
        return quants.quant_shape_to_byte_shape(self.shape, self.qtype)

    @property
    def nbytes(self) -> int:
        return math.prod(self.byte_shape)


def _plan_tensors(model_dir: Path, config: Any, arch: MODEL_ARCH, scheme: str,
                  has_imatrix: bool = False) -> list[TensorPlan]:
    """The GGUF name and type of every tensor of model_dir's safetensors, read from the headers only."""
    from safetensors import safe_open

    names = get_tensor_name_map(arch, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    shape_info = ModelShape(config.num_hidden_layers, config.num_attention_heads // kv_heads, tied)
    plans = []
    for name, file in _weight_files(model_dir).items():
        if name.endswith(_SKIPPED_TENSORS) or (tied and name == "lm_head.weight"):
            continue
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise DistillError(f"{file}: tensor {name} has no llama.cpp name for {MODEL_ARCH_NAMES[arch]}")
        with safe_open(file, framework="pt") as f:
            shape = tuple(f.get_slice(name).get_shape())
        kind = (Q.F32, None) if len(shape) <= 1 else tensor_type(gguf_name, shape[-1], scheme, shape_info, has_imatrix)
        plans.append(TensorPlan(name, file, gguf_name, shape, *kind))
    return plans


def _weight_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, for a single file or a sharded index."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise DistillError(f"{index}: not a safetensors index ({err})") from None
        return {name: model_dir / shard for name, shard in weight_map.items()}
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise DistillError(f"{model_dir}: no model.safetensors or model.safetensors.index.json to export")
    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


def _write_tensors(writer: GGUFWriter, plans: list[TensorPlan], config: Any, permute_qk: bool,
                   imatrix: dict[str, np.ndarray]) -> None:
    """Header, metadata and tensor table first, then the data one tensor at a time (never all in memory)."""
    for plan in plans:
        writer.add_tensor_info(plan.gguf_name, plan.byte_shape, np.dtype(np.uint8), plan.nbytes, raw_dtype=plan.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for plan in plans:
        data = _load_tensor(plan, config, permute_qk)
        writer.write_tensor_data(_encode(data, plan.qtype, imatrix.get(plan.gguf_name)))


def _load_tensor(plan: TensorPlan, config: Any, permute_qk: bool) -> np.ndarray:
    from safetensors import safe_open

    with safe_open(plan.file, framework="pt") as f:
        data = f.get_tensor(plan.hf_name).to(torch.float32).numpy()
    if permute_qk and plan.gguf_name.endswith((".attn_q.weight", ".attn_k.weight")):
        is_q = plan.gguf_name.endswith(".attn_q.weight")
        data = _interleave_rope_rows(data, config.num_attention_heads if is_q else config.num_key_value_heads)
    return data


def _interleave_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder each head's rows from HF's rotate-half rope (x_i, x_{i+d/2}) to llama.cpp's pairs (x_2i, x_2i+1)."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _encode(data: np.ndarray, qtype: GGMLQuantizationType, importance: Optional[np.ndarray] = None) -> np.ndarray:
    """The tensor's bytes in qtype, as a uint8 array of quants' byte shape (importance: one weight per column)."""
    if qtype == Q.F32:
        return np.ascontiguousarray(data, dtype=np.float32).view(np.uint8)
    if qtype == Q.F16:
        return np.ascontiguousarray(data, dtype=np.float16).view(np.uint8)
    return quantize_tensor(data, qtype, importance)


def _log_fallbacks(plans: list[TensorPlan], scheme: str) -> None:
    noted: dict[tuple[str, str], list[str]] = {}  # one line per (type, reason), not one per tensor
    for plan in plans:
        if plan.note:
            noted.setdefault((plan.qtype.name.lower(), plan.note), []).append(plan.gguf_name)
    for (qtype, note), names in noted.items():
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        log.info("gguf %s: %d tensor%s stored as %s (%s): %s", scheme, len(names), "s" * (len(names) > 1), qtype,
                 note, shown)
    counts: dict[str, int] = {}
    for plan in plans:
        counts[plan.qtype.name.lower()] = counts.get(plan.qtype.name.lower(), 0) + 1
    log.info("gguf %s: tensor types %s", scheme, ", ".join(f"{n} {name}" for name, n in sorted(counts.items())))


# ---------------------------------------------------------------------------------------------- tokenizer


@dataclass
class GGUFVocab:
    """The tokenizer as llama.cpp stores it."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece-style BPE with byte fallback)
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    scores: Optional[list[float]] = None
    pre: Optional[str] = None
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool = False
    chat_template: Optional[str] = None


def read_vocab(model_dir: Path, vocab_size: int) -> GGUFVocab:
    """model_dir's tokenizer as GGUF vocabulary metadata, padded to the model's vocab_size."""
    tokenizer = _load_tokenizer(model_dir)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = _tokenizer_kind(model_dir, spec)
    tokens, types = _tokens_and_types(model_dir, spec, vocab_size, model)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    special_ids = _special_ids(tokenizer, model_dir)
    if model == "llama" and "unk" in special_ids:
        types[special_ids["unk"]] = TokenType.UNKNOWN
    add_bos, add_eos = _added_specials(tokenizer, special_ids)
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    return GGUFVocab(
        model=model, tokens=tokens, token_types=types, merges=merges,
        scores=_merge_scores(tokens, merges) if model == "llama" else None,
        pre=_pre_tokenizer_name(model_dir, spec) if model == "gpt2" else None,
        special_ids=special_ids, add_bos=add_bos, add_eos=add_eos,
        add_space_prefix=_adds_space_prefix(spec), chat_template=template,
    )


def _load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    if not any((model_dir / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        raise DistillError(f"{model_dir}: no tokenizer.json (or tokenizer.model); GGUF export needs the tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError) as err:
        raise DistillError(f"{model_dir}: cannot load the tokenizer ({_first_line(err)})") from None
    if not getattr(tokenizer, "is_fast", False):
        raise DistillError(f"{model_dir}: tokenizer has no tokenizer.json form; GGUF export needs one")
    return tokenizer


def _pieces(spec: dict) -> list[dict]:
    """The pre-tokenizer's and normalizer's steps, flattened out of any Sequence."""
    steps = []
    for part in (spec.get("normalizer"), spec.get("pre_tokenizer")):
        if part:
            steps.extend(part.get("normalizers") or part.get("pretokenizers") or [part])
    return steps


def _tokenizer_kind(model_dir: Path, spec: dict) -> str:
    model = spec["model"]
    steps = _pieces(spec)
    kinds = {step["type"] for step in steps}
    if model["type"] == "BPE" and "ByteLevel" in kinds and not model.get("byte_fallback"):
        return "gpt2"
    metaspace = "Metaspace" in kinds or any(s["type"] == "Replace" and s.get("content") == "\u2581" for s in steps)
    if model["type"] == "BPE" and model.get("byte_fallback") and metaspace:
        return "llama"
    raise DistillError(f"{model_dir}: a {model['type']} tokenizer (steps: {', '.join(sorted(kinds)) or 'none'}) "
                       "has no GGUF form here (supported: byte-level BPE, SentencePiece-style BPE)")


def _tokens_and_types(model_dir: Path, spec: dict, vocab_size: int, model: str) -> tuple[list[str], list[int]]:
    by_id: dict[int, tuple[str, int]] = {}
    for text, index in spec["model"]["vocab"].items():
        is_byte = model == "llama" and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text)
        by_id[index] = (text, TokenType.BYTE if is_byte else TokenType.NORMAL)
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = (added["content"], TokenType.CONTROL if added["special"] else TokenType.USER_DEFINED)
    if max(by_id) >= vocab_size:
        raise DistillError(f"{model_dir}: the tokenizer has ids up to {max(by_id)} but config.json has vocab_size "
                           f"{vocab_size}")
    # Embedding rows beyond the tokenizer (vocab padded to a multiple) get llama.cpp's placeholder names.
    pairs = [by_id.get(i, (f"[PAD{i}]", TokenType.UNUSED)) for i in range(vocab_size)]
    return [text for text, _ in pairs], [int(kind) for _, kind in pairs]


def _merge_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """SentencePiece scores for llama.cpp, which merges the best-scoring pair: earlier merges score higher."""
    rank = {}
    for index, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", ""), index)
    return [-float(rank[token]) if token in rank else 0.0 for token in tokens]


def _pre_tokenizer_name(model_dir: Path, spec: dict) -> str:
    """llama.cpp's name for how a byte-level tokenizer splits text before its merges, or a DistillError."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    steps = [s for s in _pieces({"pre_tokenizer": spec.get("pre_tokenizer")})]
    kinds = [s["type"] for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = steps[0]["pattern"].get("Regex")
        # The names transformers' GGUF loader maps back to this same split; llama.cpp knows them all.
        for name, split in GGUF_PRE_TOKENIZER_SPLITS.items():
            if split == regex:
                return name
    raise DistillError(f"{model_dir}: byte-level tokenizer with pre-tokenizer {kinds} matches no llama.cpp "
                       "pre-tokenizer known here (gpt-2, smollm, llama-bpe, qwen2, ...)")


def _adds_space_prefix(spec: dict) -> bool:
    for step in _pieces(spec):
        if step["type"] == "Prepend" and step.get("prepend") == "\u2581":
            return True
        if step["type"] == "Metaspace":
            return step.get("prepend_scheme", "always") != "never"
        if step["type"] == "ByteLevel":
            return bool(step.get("add_prefix_space"))
    return False


def _special_ids(tokenizer: Any, model_dir: Path) -> dict[str, int]:
    """bos/eos/unk/pad ids from the tokenizer, else from config.json."""
    config = json.loads((model_dir / "config.json").read_text())
    ids = {}
    for key in ("bos", "eos", "unk", "pad"):
        value = getattr(tokenizer, f"{key}_token_id", None)
        if value is None:
            value = config.get(f"{key}_token_id")
            value = value[0] if isinstance(value, list) and value else value
        if isinstance(value, int):
            ids[key] = value
    return ids


def _added_specials(tokenizer: Any, special_ids: dict[str, int]) -> tuple[bool, bool]:
    """Whether encoding adds bos at the start and eos at the end, observed rather than read from flags."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    add_bos = bool(full) and full[0] == special_ids.get("bos") and full[1:len(plain) + 1] == plain
    add_eos = bool(full) and full[-1] == special_ids.get("eos") and len(full) > len(plain) + add_bos
    return add_bos, add_eos


def _add_vocab(writer: GGUFWriter, vocab: GGUFVocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_merges(vocab.merges)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
              "pad": writer.add_pad_token_id}
    for key, token_id in vocab.special_ids.items():
        adders[key](token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


# ---------------------------------------------------------------------------------------------- verify


def verify_gguf(
    model_dir: Path,
    gguf_path: Path,
    texts: Sequence[str] = DEFAULT_TEXTS,
    token_ids: Sequence[Sequence[int]] = (),
) -> dict:
    """Load gguf_path back with transformers and compare it with model_dir on texts (and extra token id lists).

    Logit statistics run over every position of every sequence; perplexities score each next token.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer


    model_dir, gguf_path = model_dir_of(Path(model_dir)), Path(gguf_path)
    source = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                  dtype=torch.float32).eval()
    source_tok = AutoTokenizer.from_pretrained(model_dir)
    gguf_tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    encoded = [source_tok(text)["input_ids"] for text in texts]
    mismatches = [text for text, ids in zip(texts, encoded) if gguf_tok(text)["input_ids"] != ids]
    sequences = [list(ids) for ids in [*encoded, *token_ids] if len(ids) > 0]
    if not sequences:
        raise DistillError("verify_gguf: no texts or token ids to compare on")
    return {
        "gguf": str(gguf_path),
        "loaded_class": type(loaded).__name__,
        "bytes": gguf_path.stat().st_size,
        "tensor_types": gguf_tensor_types(gguf_path),
        **compare_logits(source, loaded, sequences),
        "tokenizer_match": not mismatches,
        "tokenizer_mismatches": mismatches,
        "greedy": compare_greedy(source, source_tok, loaded, gguf_tok, GREEDY_PROMPTS),
    }


def compare_greedy(source, source_tok, other, other_tok, prompts: Sequence[str], new_tokens: int = 24) -> dict:
    """Greedy answers of the source (its tokenizer) and of the loaded file (its own tokenizer) to the same prompts."""
    params = SamplingParams(max_new_tokens=new_tokens)
    rows = []
    for prompt in prompts:
        conversation = [{"role": "user", "content": prompt}]
        [a] = generate_texts(source, source_tok, [conversation], params=params)
        [b] = generate_texts(other, other_tok, [conversation], params=params)
        first = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), None)
        if first is None and len(a.token_ids) != len(b.token_ids):
            first = min(len(a.token_ids), len(b.token_ids))
        rows.append({"prompt": prompt, "source": a.text, "gguf": b.text, "same": first is None,
                     "first_difference": first})
    return {"same": sum(r["same"] for r in rows), "prompts": len(rows), "new_tokens": new_tokens, "rows": rows}


@torch.no_grad()
def compare_logits(source: torch.nn.Module, other: torch.nn.Module, sequences: Sequence[Sequence[int]]) -> dict:
    """Max |logit diff|, mean KL(source || other) per token, top-1 agreement and both perplexities."""
    max_diff, kl_sum, agree, positions = 0.0, 0.0, 0, 0
    nll = {"source": 0.0, "other": 0.0}
    targets = 0
    for ids in sequences:
        input_ids = torch.tensor([list(ids)])
        a = source(input_ids=input_ids).logits[0].double()
        b = other(input_ids=input_ids).logits[0].double()
        log_p, log_q = a.log_softmax(-1), b.log_softmax(-1)
        max_diff = max(max_diff, (a - b).abs().max().item())
        kl_sum += (log_p.exp() * (log_p - log_q)).sum().item()
        agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
        positions += len(ids)
        next_ids = input_ids[0, 1:, None]
        nll["source"] -= log_p[:-1].gather(1, next_ids).sum().item()
        nll["other"] -= log_q[:-1].gather(1, next_ids).sum().item()
        targets += len(ids) - 1
    return {
        "positions": positions,
        "max_abs_logit_diff": max_diff,
        "mean_kl": kl_sum / positions,
        "top1_agreement": agree / positions,
        "ppl_source": math.exp(nll["source"] / targets) if targets else float("nan"),
        "ppl_gguf": math.exp(nll["other"] / targets) if targets else float("nan"),
    }


def gguf_tensor_types(gguf_path: Path) -> dict[str, int]:
    """How many tensors of each GGML type the file holds."""
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for tensor in GGUFReader(gguf_path).tensors:
        counts[tensor.tensor_type.name.lower()] = counts.get(tensor.tensor_type.name.lower(), 0) + 1
    return counts
