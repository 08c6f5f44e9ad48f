"""Loading teachers and students, GGUF conversion, building students, tokenizer checks, hidden states + head."""
from distill.models.compat import check_tokenizers
from distill.models.heads import decoder_hidden_states, output_head
from distill.models.loading import (
    bytes_on_disk,
    convert_gguf,
    count_params,
    load_model,
    load_tokenizer,
    save_model,
)
from distill.models.paths import resolve_model_path
from distill.models.student import build_student, student_config_summary

__all__ = [
    "build_student",
    "bytes_on_disk",
    "check_tokenizers",
    "convert_gguf",
    "count_params",
    "decoder_hidden_states",
    "load_model",
    "load_tokenizer",
    "output_head",
    "resolve_model_path",
    "save_model",
    "student_config_summary",
]
