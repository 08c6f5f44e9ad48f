"""Reading examples and prompts, chat-template tokenisation with prompt masking, batching, and the train/eval split."""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from distill.data.examples import load_teacher_data, read_examples, read_prompts, split_train_eval
from distill.data.layouts import Example, Prompt, example_from_record, prompt_from_record

# Tokenisation imports torch and transformers, which reading files and records does not need: its names are
# loaded from distill.data.tokenize on first use.
_TOKENIZE_NAMES = ("EncodedExample", "batch_indices", "collate", "encode_all", "encode_example")


def __getattr__(name: str) -> Any:
    if name in _TOKENIZE_NAMES:
        from distill.data import tokenize

        return getattr(tokenize, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def quickstart_prompts_path() -> Path:
    """The packaged quickstart prompt set (about 300 short, varied instructions)."""
    return Path(str(resources.files("distill.data") / "prompts" / "quickstart.jsonl"))


__all__ = [
    "EncodedExample",
    "Example",
    "Prompt",
    "batch_indices",
    "collate",
    "encode_all",
    "encode_example",
    "example_from_record",
    "load_teacher_data",
    "prompt_from_record",
    "quickstart_prompts_path",
    "read_examples",
    "read_prompts",
    "split_train_eval",
]
