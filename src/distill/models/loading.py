"""Load, convert and save models and tokenizers (HF directories, hub ids, GGUF files)."""
from __future__ import annotations

import copy
import hashlib
import os
import struct
from pathlib import Path

import torch
import transformers
from peft import get_peft_model
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from distill.errors import DistillError
from distill.models.heads import is_peft
from distill.models.paths import resolve_model_path
from distill.models.weight_files import check_gguf, check_model_dir
from distill.runtime import SHARED_IDLE_S, atomic_directory, remove_stale_temporaries

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def load_tokenizer(
    model: str, gguf_file: str | None = None, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a pad token (eos when it has none) so batches can be padded."""
    path, gguf_file = _readable_source(model, gguf_file)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, struct.error) as err:
        raise DistillError(f"could not load the tokenizer of {_shown(model, path, gguf_file)!r}: "
                           f"{_first_line(err)}") from None
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise DistillError(f"tokenizer of {model!r} has no pad, eos or unk token to pad batches with")
        tokenizer.pad_token = fallback
    return tokenizer


def load_model(
    model: str,
    gguf_file: str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """A causal LM in eval mode; GGUF weights come back dequantized and saveable."""
    path, gguf_file = _readable_source(model, gguf_file)
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    elif Path(path).is_dir():
        check_model_dir(path)  # config.json and whole safetensors: a clear line instead of a loader traceback
        kwargs["use_safetensors"] = True  # never unpickle .bin files
    try:
        loaded = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError, struct.error) as err:
        raise DistillError(f"could not load model {_shown(model, path, gguf_file)!r}: {_first_line(err)}") from None
    if gguf_file is not None:
        _forget_quantization(loaded)
        _fill_gguf_cache(loaded, path, gguf_file)
    return loaded.to(device).eval()


def gguf_cache_dir(path: str, gguf_file: str) -> Path:
    """Where the dequantized HF copy of a GGUF file is kept ($DISTILL_CACHE, default ~/.cache/distill)."""
    file = (Path(path) / gguf_file).resolve()
    stat = file.stat()
    key = f"{file}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    root = Path(os.environ.get("DISTILL_CACHE") or Path.home() / ".cache" / "distill")
    return root / "gguf" / f"{file.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _readable_source(model: str, gguf_file: str | None) -> tuple[str, str | None]:
    """(directory or hub id, gguf file) to load from: a GGUF's converted copy when there is one, else the GGUF
    itself, checked whole first (a truncated one otherwise fails deep in the GGUF reader)."""
    path, gguf_file = _prefer_gguf_cache(*resolve_model_path(model, gguf_file))
    if gguf_file is not None and Path(path).is_dir():
        check_gguf(Path(path) / gguf_file)
    return path, gguf_file


def _shown(model: str, path: str, gguf_file: str | None) -> str:
    """How errors name what was loaded: the GGUF file itself when there is one on disk."""
    return str(Path(path) / gguf_file) if gguf_file is not None and Path(path).is_dir() else model


def _prefer_gguf_cache(path: str, gguf_file: str | None) -> tuple[str, str | None]:
    """Load a GGUF model from its converted copy when there is one: dequantizing costs ~15 s per load."""
    if gguf_file is None or os.environ.get("DISTILL_NO_CACHE"):
        return path, gguf_file
    cached = gguf_cache_dir(path, gguf_file)
    return (str(cached), None) if (cached / "config.json").is_file() else (path, gguf_file)


def _fill_gguf_cache(model: PreTrainedModel, path: str, gguf_file: str) -> None:
    if os.environ.get("DISTILL_NO_CACHE"):
        return
    try:
        out_dir = gguf_cache_dir(path, gguf_file)
        remove_stale_temporaries(out_dir.parent, name=out_dir.name, idle_s=SHARED_IDLE_S)
        _save_model_atomically(model, load_tokenizer(path, gguf_file), out_dir)
    except OSError:  # a read-only or full cache only costs speed
        pass


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _forget_quantization(model: PreTrainedModel) -> None:
    """Drop the GGUF quantizer bookkeeping: the weights are already dequantized, and save_pretrained refuses it."""
    for name in ("hf_quantizer", "quantization_method"):
        if hasattr(model, name):
            delattr(model, name)
    model.is_quantized = False
    for module in model.modules():
        config = getattr(module, "config", None)
        if isinstance(module, PreTrainedModel) and config is not None:
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            config._is_quantized = False


def save_model(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Save an HF directory (safetensors + tokenizer) atomically; LoRA adapters are merged into the weights.

    `state_dict` (whole tensors, e.g. gathered from FSDP's shards) is saved instead of the model's own weights.

    Copies of out_dir that a killed save left beside it go first: out_dir belongs to one run (the GGUF cache,
    which runs share, saves through _save_model_atomically).
    """
    out_dir = Path(out_dir)
    remove_stale_temporaries(out_dir.parent, name=out_dir.name)
    return _save_model_atomically(model, tokenizer, out_dir, state_dict)


def _save_model_atomically(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, out_dir: Path,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """save_model without the clean-up: out_dir appears whole or not at all."""
    if is_peft(model):
        model, state_dict = _merged_copy(model, state_dict), None  # the merged copy holds those weights
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp, **({} if state_dict is None else {"state_dict": state_dict}))
        tokenizer.save_pretrained(tmp)
    return out_dir


def _merged_copy(model: torch.nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> PreTrainedModel:
    """The PEFT model's base with its adapters merged in; a copy, so training can go on with the adapters.

    With `state_dict` (the whole weights of a model FSDP has sharded, which cannot be deep-copied) the copy is
    rebuilt from the model's config and those weights.
    """
    if state_dict is None:
        return copy.deepcopy(model).merge_and_unload()
    base = model.get_base_model()
    with torch.device("meta"):  # nothing initialised: the state's tensors take every weight's place
        plain = type(base)._from_config(base.config)
    twin = get_peft_model(plain, copy.deepcopy(model.peft_config[model.active_adapter]))
    twin.load_state_dict(state_dict, assign=True)
    twin.get_base_model().tie_weights()  # assign gave tied names their own tensors; tie them again
    return twin.merge_and_unload()


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write a GGUF model as a normal HF directory (safetensors, config, tokenizer, generation config)."""
    path, gguf_file = resolve_model_path(str(gguf_path))
    if gguf_file is None:
        raise DistillError(f"{gguf_path}: not a .gguf file")
    model = load_model(path, gguf_file)
    tokenizer = load_tokenizer(path, gguf_file)
    return save_model(model, tokenizer, out_dir)


def count_params(model: torch.nn.Module) -> int:
    """Number of distinct parameters; tied weights (one tensor, two names) count once."""
    # parameters() yields a Parameter shared by several modules once: that is how HF ties weights.
    return sum(p.numel() for p in model.parameters())


def bytes_on_disk(path: str | Path) -> int:
    """Size of the weight files of a model directory (or of one weight file)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))
