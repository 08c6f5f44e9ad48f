"""An Ollama Modelfile beside a GGUF export, so `ollama create NAME -f model-TYPE.Modelfile` works.

Ollama renders prompts with Go templates, not the Jinja chat template in the GGUF. The Modelfile's TEMPLATE is
derived here for the chat-template families recognised (ChatML, as SmolLM2 and Qwen use); a template of another
family gets no TEMPLATE (Ollama then falls back to what it detects in the GGUF) and a log line says so.
A default system prompt the Jinja template inserts when a conversation has none becomes Ollama's SYSTEM.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

from distill.runtime import atomic_file

log = logging.getLogger("distill")

CHATML_TEMPLATE = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n"
    "{{ .Content }}<|im_end|>\n"
    "{{ end }}<|im_start|>assistant\n"
)
CHATML_STOPS = ("<|im_start|>", "<|im_end|>")
MAX_CONTEXT = 8192  # num_ctx default: the model's context, capped so a small device is not asked for more
_PROBE = "distill-probe-7f3a"


def chat_family(tokenizer: Any) -> Optional[str]:
    """'chatml' when the tokenizer's chat template renders ChatML turns, else None."""
    template = tokenizer.chat_template if isinstance(getattr(tokenizer, "chat_template", None), str) else None
    if not template or "<|im_start|>" not in template:
        return None
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": _PROBE}], tokenize=False,
                                             add_generation_prompt=True)
    return "chatml" if f"<|im_start|>user\n{_PROBE}<|im_end|>\n" in rendered else None


def default_system(tokenizer: Any) -> Optional[str]:
    """The system prompt a ChatML template adds to a conversation without one (SmolLM2's "You are ..."), if any."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": _PROBE}], tokenize=False,
                                             add_generation_prompt=False)
    head = "<|im_start|>system\n"
    start = rendered.find(head)
    if start < 0 or start > rendered.find(f"<|im_start|>user\n{_PROBE}"):
        return None
    return rendered[start + len(head): rendered.index("<|im_end|>", start)]


def modelfile_text(model_dir: Path, gguf_name: str) -> tuple[str, Optional[str]]:
    """The Modelfile for gguf_name (beside it) made from model_dir's tokenizer and configs, and its family."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    family = chat_family(tokenizer)
    lines = [f"FROM ./{gguf_name}", ""]
    if family == "chatml":
        lines += [f'TEMPLATE """{CHATML_TEMPLATE}"""', ""]
        system = default_system(tokenizer)
        if system:
            lines += [f'SYSTEM """{system}"""', ""]
        stops = list(CHATML_STOPS)
    else:
        stops = []
    eos = getattr(tokenizer, "eos_token", None)
    if isinstance(eos, str) and eos not in stops:
        stops.append(eos)
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    lines += [f"PARAMETER {key} {value}" for key, value in _parameters(model_dir).items()]
    return "\n".join(lines) + "\n", family


def _parameters(model_dir: Path) -> dict[str, Any]:
    """num_ctx from config.json; the sampling defaults of generation_config.json when it samples."""
    config = json.loads((model_dir / "config.json").read_text())
    params: dict[str, Any] = {"num_ctx": min(int(config.get("max_position_embeddings") or 2048), MAX_CONTEXT)}
    generation = model_dir / "generation_config.json"
    settings = json.loads(generation.read_text()) if generation.is_file() else {}
    if settings.get("do_sample"):
        for key in ("temperature", "top_p", "top_k"):
            if settings.get(key) is not None:
                params[key] = settings[key]
    else:
        params["temperature"] = 0  # the model's own default is greedy decoding
    return params


def write_modelfile(model_dir: Path, gguf_path: Path) -> Path:
    """Write `<gguf stem>.Modelfile` beside gguf_path; returns its path."""
    text, family = modelfile_text(Path(model_dir), gguf_path.name)
    if family is None:
        log.info("ollama: %s: the chat template is not ChatML; the Modelfile has no TEMPLATE (Ollama will use what "
                 "it detects in the GGUF)", gguf_path.name)
    out = gguf_path.with_name(gguf_path.stem + ".Modelfile")
    with atomic_file(out) as tmp:
        Path(tmp).write_text(text)
    return out


__all__ = ["CHATML_TEMPLATE", "chat_family", "default_system", "modelfile_text", "write_modelfile"]
