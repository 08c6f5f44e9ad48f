"""An Ollama Modelfile beside a GGUF export, so `ollama create NAME -f model-TYPE.Modelfile` works.

Ollama renders prompts with Go templates, not the Jinja chat template in the GGUF. The Modelfile's TEMPLATE is
derived here for the chat-template families recognised by rendering a probe conversation (its user turn and the
generation prompt): ChatML (SmolLM2, Qwen), Llama 3 (header ids and <|eot_id|>) and Gemma 2/3 (<start_of_turn>, the
assistant role renamed "model", a leading system message folded into the first user turn followed by a blank line,
as Gemma 3's template does; Gemma 2's refuses a system message). A template of another family, or none, gets no
TEMPLATE (Ollama then falls back to what it detects in the GGUF) and a log line says so. A default system prompt
the Jinja template inserts as a system turn when a conversation has none becomes Ollama's SYSTEM. The bos token the
Jinja templates write is left out: llama.cpp adds it when tokenizing. Message content is rendered as is (Go
templates have no trim; the Jinja templates strip it).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
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
LLAMA3_TEMPLATE = (
    "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
    "{{ .Content }}<|eot_id|>"
    "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
)
LLAMA3_STOPS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
# Ollama puts the system prompt (a system message, or the Modelfile's SYSTEM) first in .Messages and in .System.
GEMMA_TEMPLATE = (
    "{{- range $i, $_ := .Messages }}\n"
    "{{- if ne .Role \"system\" }}<start_of_turn>{{ if eq .Role \"assistant\" }}model{{ else }}{{ .Role }}{{ end }}\n"
    "{{ if and $.System (eq $i 1) }}{{ $.System }}\n\n{{ end }}{{ .Content }}<end_of_turn>\n"
    "{{ end }}\n"
    "{{- end }}<start_of_turn>model\n"
)
GEMMA_STOPS = ("<end_of_turn>", "<start_of_turn>")


@dataclass(frozen=True)
class ChatFamily:
    """A chat-template family: how one turn renders, its Ollama template and stop strings."""

    name: str
    turn_head: str  # the text before a turn's content, {role} for the role
    turn_end: str
    template: str
    stops: tuple[str, ...]
    assistant_role: str = "assistant"

    def turn(self, role: str, content: str) -> str:
        return self.turn_head.format(role=role) + content + self.turn_end

    @property
    def generation_prompt(self) -> str:
        return self.turn_head.format(role=self.assistant_role)


FAMILIES = (
    ChatFamily("chatml", "<|im_start|>{role}\n", "<|im_end|>\n", CHATML_TEMPLATE, CHATML_STOPS),
    ChatFamily("llama3", "<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>", LLAMA3_TEMPLATE,
               LLAMA3_STOPS),
    ChatFamily("gemma", "<start_of_turn>{role}\n", "<end_of_turn>\n", GEMMA_TEMPLATE, GEMMA_STOPS,
               assistant_role="model"),
)
MAX_CONTEXT = 8192  # num_ctx default: the model's context, capped so a small device is not asked for more
_PROBE = "distill-probe-7f3a"


def chat_family(tokenizer: Any) -> Optional[ChatFamily]:
    """The family whose turns the chat template renders (a probe user turn, then the generation prompt), else None."""
    template = tokenizer.chat_template if isinstance(getattr(tokenizer, "chat_template", None), str) else None
    if not template:
        return None
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": _PROBE}], tokenize=False,
                                             add_generation_prompt=True)
    return next((f for f in FAMILIES if f.turn("user", _PROBE) in rendered and rendered.endswith(f.generation_prompt)),
                None)


def default_system(tokenizer: Any, family: Optional[ChatFamily] = None) -> Optional[str]:
    """The system prompt the chat template adds to a conversation without one (SmolLM2's "You are ..."), if any."""
    family = family or chat_family(tokenizer)
    if family is None:
        return None
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": _PROBE}], tokenize=False,
                                             add_generation_prompt=False)
    head = family.turn_head.format(role="system")
    start = rendered.find(head)
    if start < 0 or start > rendered.find(family.turn("user", _PROBE)):
        return None
    return rendered[start + len(head): rendered.index(family.turn_end, start)]


def modelfile_text(model_dir: Path, gguf_name: str) -> tuple[str, Optional[str]]:
    """The Modelfile for gguf_name (beside it) made from model_dir's tokenizer and configs, and its family."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    family = chat_family(tokenizer)
    lines = [f"FROM ./{gguf_name}", ""]
    stops: list[str] = []
    if family is not None:
        lines += [f'TEMPLATE """{family.template}"""', ""]
        system = default_system(tokenizer, family)
        if system:
            lines += [f'SYSTEM """{system}"""', ""]
        stops = list(family.stops)
    eos = getattr(tokenizer, "eos_token", None)
    if isinstance(eos, str) and eos not in stops:
        stops.append(eos)
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    lines += [f"PARAMETER {key} {value}" for key, value in _parameters(model_dir).items()]
    return "\n".join(lines) + "\n", family.name if family else None


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
        log.info("ollama: %s: the tokenizer has no chat template, or one of none of the families ChatML, Llama 3 and "
                 "Gemma; the Modelfile has no TEMPLATE (Ollama will use what it detects in the GGUF)", gguf_path.name)
    out = gguf_path.with_name(gguf_path.stem + ".Modelfile")
    with atomic_file(out) as tmp:
        Path(tmp).write_text(text)
    return out


__all__ = ["CHATML_TEMPLATE", "FAMILIES", "GEMMA_TEMPLATE", "LLAMA3_TEMPLATE", "ChatFamily", "chat_family", "default_system", "modelfile_text", "write_modelfile"]
