"""Reading examples and prompts, chat-template tokenisation with prompt masking, batching, and the train/eval split."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from distill.data.examples import (
    Example,
    Prompt,
    example_from_record,
    load_teacher_data,
    prompt_from_record,
    read_examples,
    read_prompts,
    split_train_eval,
)
from distill.data.tokenize import EncodedExample, batch_indices, collate, encode_all, encode_example


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
