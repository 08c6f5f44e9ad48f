"""Real-model integration: distil karpathy's stories260K; KD must beat CE-only at the same budget."""
from __future__ import annotations

import pytest
import torch

from conftest import STORIES260K, require_shared, tinystories_split
from distill.recipe import recipe_from_dict
from distill.stages import train

pytestmark = pytest.mark.slow


def _recipe(run_dir, text_file, kind: str) -> dict:
    return {
        "output_dir": str(run_dir),
        "seed": 0,
        "teacher": {"model": str(STORIES260K)},
        "student": {
            "config": {"num_layers": 2, "hidden_size": 32, "num_heads": 4, "num_kv_heads": 2,
                       "intermediate_size": 96},
            "init_embeddings": "random",  # same start for both: the difference is the training signal only
        },
        "data": {"train": str(text_file), "max_length": 128, "eval_fraction": 0.0},
        "method": {"kind": kind, "divergence": "forward_kl", "alpha": 0.1, "temperature": 1.0},
        "train": {"steps": 120, "batch_size": 16, "lr": 1e-2, "warmup_steps": 10, "schedule": "cosine",
                  "checkpoint_every": 1000, "log_every": 20},
    }


def test_kd_student_beats_ce_only_student(tmp_path):
    from distill.data.examples import read_examples
    from distill.data.tokenize import collate, encode_all
    from distill.eval.metrics import perplexity
    from distill.models import load_model, load_tokenizer

    require_shared(STORIES260K)
    train_file, held_out_file = tinystories_split(tmp_path, train=600, held_out=100)

    results = {}
    for kind in ("kd", "sft"):
        recipe = recipe_from_dict(_recipe(tmp_path / kind, train_file, kind))
        train(recipe, progress=False)
        tokenizer = load_tokenizer(str(tmp_path / kind / "student"))
        student = load_model(str(tmp_path / kind / "student"))
        encoded = encode_all(read_examples(held_out_file), tokenizer, 128, None)
        batches = [collate(encoded[i:i + 16], tokenizer.pad_token_id) for i in range(0, len(encoded), 16)]
        results[kind] = perplexity(student, batches)["perplexity"]
    teacher = load_model(str(STORIES260K))
    teacher_ppl = perplexity(teacher, batches)["perplexity"]
    assert teacher_ppl < results["kd"] < results["sft"], (teacher_ppl, results)
    assert torch.isfinite(torch.tensor(list(results.values()))).all()
