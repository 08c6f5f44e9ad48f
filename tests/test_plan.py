"""The planner: parameter and FLOP counts against real models, activation and batch accounting, the CLI."""
from __future__ import annotations

import json
import pytest
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from distill.cli import main
from distill.stages.data import recipe_examples
from distill.data.tokenize import batch_indices, collate, encode_all
from distill.models import count_params, decoder_hidden_states, load_model
from distill.plan import (
    activation_floats_per_token,
    batch_stats,
    format_plan,
    forward_flops_per_token,
    linear_flops_per_token,
    lora_params,
    format_stage_plans,
    plan_recipe,
    plan_stages,
    shape_from_config,
    step_flops,
    student_shape,
)
from distill.recipe import LoraSpec, recipe_from_dict
from conftest import STORIES260K, require_shared, tiny_recipe


def _llama(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=320, head_dim=None, tie=True,
           attention="sdpa") -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=head_dim or hidden // heads, tie_word_embeddings=tie, attn_implementation=attention)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def _batch(vocab: int, rows: int = 3, width: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab, (rows, width))
    mask = torch.ones(rows, width, dtype=torch.long)
    mask[0, -7:] = 0  # padding, as in the trainer's batches
    return ids, mask


@pytest.mark.parametrize("kwargs", [
    {},
    {"tie": False},
    {"heads": 4, "kv_heads": 1, "head_dim": 24},  # head size not hidden/heads, as cut-from-teacher students have
    {"heads": 2, "kv_heads": 2, "intermediate": 96, "layers": 3},
])
def test_parameter_count_equals_the_real_models(kwargs):
    model = _llama(**kwargs)
    assert shape_from_config(model.config).params == count_params(model)


def test_parameter_counts_of_the_fixture_teacher_and_a_recipe_student(tmp_path, tiny_teacher_dir, pairs_jsonl):
    from distill.models import build_student

    teacher = load_model(str(tiny_teacher_dir))
    teacher_shape = shape_from_config(teacher.config)
    assert teacher_shape.params == count_params(teacher)
    recipe = recipe_from_dict(tiny_recipe(tmp_path / "run", tiny_teacher_dir, pairs_jsonl))
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    student = build_student(recipe.student.config, teacher, tokenizer)
    assert student_shape(recipe, teacher_shape).params == count_params(student)


def test_a_student_on_its_own_tokenizer_is_planned_with_its_vocabulary(tmp_path, tiny_teacher_dir, sp_tokenizer_dir,
                                                                       pairs_jsonl):
    from distill.stages.student import initial_student
    from distill.stages.facts import teacher_tokenizer

    spec = tiny_recipe(tmp_path / "run", tiny_teacher_dir, pairs_jsonl)
    spec["student"]["tokenizer"] = str(sp_tokenizer_dir)
    recipe = recipe_from_dict(spec)
    teacher = load_model(str(tiny_teacher_dir))
    built = initial_student(recipe, teacher, teacher_tokenizer(recipe))
    shape = student_shape(recipe, shape_from_config(teacher.config))
    assert shape.vocab == len(AutoTokenizer.from_pretrained(sp_tokenizer_dir)) != teacher.config.vocab_size
    assert shape.params == count_params(built)


def test_stories260k_parameter_count():
    model = load_model(str(require_shared(STORIES260K)))
    assert shape_from_config(model.config).params == count_params(model) == 260_032


def test_from_teacher_student_keeps_the_teachers_head_size(tmp_path, tiny_teacher_dir, pairs_jsonl):
    recipe = recipe_from_dict(tiny_recipe(tmp_path / "run", tiny_teacher_dir, pairs_jsonl,
                                          student={"config": None, "from_teacher": {"layers": 1, "num_heads": 2,
                                                                                    "intermediate_size": 96}}))
    teacher = shape_from_config(load_model(str(tiny_teacher_dir)).config)
    shape = student_shape(recipe, teacher)
    # Two of the teacher's 4 query heads fill one of its 2 kv groups, so the pruner keeps 1 kv head.
    assert (shape.layers, shape.heads, shape.kv_heads, shape.head_dim, shape.intermediate) == (1, 2, 1, 16, 96)
    real = _llama(layers=1, hidden=64, heads=2, kv_heads=1, head_dim=16, intermediate=96, vocab=teacher.vocab)
    assert shape.params == count_params(real)


def test_from_teacher_student_matches_the_pruned_model(tmp_path, tiny_teacher_dir, pairs_jsonl):
    from distill.stages.student import prune_from_recipe

    recipe = recipe_from_dict(tiny_recipe(tmp_path / "run", tiny_teacher_dir, pairs_jsonl, student={
        "config": None, "from_teacher": {"layers": 1, "hidden_size": 48, "num_heads": 2, "intermediate_size": 96,
                                         "calibration": {"samples": 4, "max_length": 16}}}))
    teacher = load_model(str(tiny_teacher_dir))
    pruned = prune_from_recipe(recipe, teacher, AutoTokenizer.from_pretrained(tiny_teacher_dir))[0]
    assert student_shape(recipe, shape_from_config(teacher.config)).params == count_params(pruned)


def test_lora_params_equal_peft_trainable_count():
    from peft import LoraConfig, get_peft_model

    model = _llama()
    spec = LoraSpec(r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=spec.target_modules))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert lora_params(shape_from_config(model.config), spec) == trainable


def test_forward_flops_equal_torch_flop_counter():
    # Eager attention runs QK^T and AV as matmuls, so the counter sees every multiply the planner predicts.
    model = _llama(attention="eager")
    ids, mask = _batch(320)
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, attention_mask=mask)
    per_token = forward_flops_per_token(shape_from_config(model.config), ids.shape[1])
    assert per_token * ids.numel() == counter.get_total_flops()


def test_decoder_backward_is_twice_its_forward():
    model = _llama()  # sdpa, which the counter does not see: only the projections are counted
    ids, mask = _batch(320)
    with FlopCounterMode(display=False) as counter:
        decoder_hidden_states(model, ids, mask).sum().backward()
    assert 3 * linear_flops_per_token(shape_from_config(model.config)) * ids.numel() == counter.get_total_flops()


def _addmm_inplace_flops(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]  # the chunked loss accumulates the head's grad with addmm_


@pytest.mark.parametrize("lora", [False, True])
def test_step_flops_equal_the_trainers_counted_flops(tmp_path, tiny_teacher_dir, pairs_jsonl, lora):
    from distill.models import build_student
    from distill.plan import BatchStats
    from distill.signals.teacher_signal import LiveTeacher
    from distill.stages.training import batch_objective
    from distill.training.step import loss_on_batch

    # TVD and alpha's CE add no matmuls of their own, so every counted FLOP is one the planner predicts.
    recipe = recipe_from_dict(tiny_recipe(tmp_path / "run", tiny_teacher_dir, pairs_jsonl,
                                          method={"divergence": "tvd", "temperature": 1.0},
                                          train={"lora": {"r": 4}} if lora else {}))
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    teacher = load_model(str(tiny_teacher_dir))
    student = build_student(recipe.student.config, teacher, tokenizer)
    if lora:
        from peft import LoraConfig, get_peft_model

        student = get_peft_model(student, LoraConfig(r=4, target_modules=list(recipe.train.lora.target_modules)))
    for model in (teacher, student):  # eager attention runs as matmuls the counter sees
        model.set_attn_implementation("eager")
    encoded = encode_all(recipe_examples(recipe)[0], tokenizer, recipe.data.max_length)
    batch = collate(encoded[:3], tokenizer.pad_token_id)
    rows, width = batch["input_ids"].shape
    stats = BatchStats(batch_size=rows, padded_tokens=rows * width, real_tokens=0,
                       loss_rows=int((batch["labels"][:, 1:] != -100).sum()), square_tokens=rows * width**2,
                       max_padded_tokens=rows * width, max_seq_len=width, examples=3, example_tokens=width, source="")
    mapping = {torch.ops.aten.addmm_: _addmm_inplace_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        loss_on_batch(student, LiveTeacher(teacher), batch, batch_objective(recipe.method)).loss.backward()
    teacher_shape = shape_from_config(teacher.config)
    predicted = step_flops(recipe, teacher_shape, student_shape(recipe, teacher_shape), stats)
    assert sum(predicted.values()) == pytest.approx(counter.get_total_flops(), rel=1e-9)


@pytest.mark.parametrize("kwargs", [{}, {"heads": 4, "kv_heads": 1}, {"heads": 4, "kv_heads": 4}])
def test_activation_estimate_matches_the_tensors_autograd_saves(kwargs):
    model = _llama(**kwargs).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    ids, mask = _batch(320, rows=4, width=32)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        decoder_hidden_states(model, ids, mask)
    predicted = activation_floats_per_token(shape_from_config(model.config), ids.shape[1]) * ids.numel() * 4
    assert predicted == pytest.approx(sum(saved.values()), rel=0.02)


def test_batch_stats_are_the_trainers_batches(tmp_path, tiny_teacher_dir, pairs_jsonl):
    recipe = recipe_from_dict(tiny_recipe(tmp_path / "run", tiny_teacher_dir, pairs_jsonl,
                                          train={"steps": 7, "grad_accum": 2, "batch_size": 3}))
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    stats = batch_stats(recipe, tokenizer)
    encoded = encode_all(recipe_examples(recipe)[0], tokenizer, recipe.data.max_length)
    batches = [collate([encoded[i] for i in batch_indices(len(encoded), 3, recipe.seed, k)], 0) for k in range(14)]
    assert stats.padded_tokens == pytest.approx(sum(b["input_ids"].numel() for b in batches) / 14)
    assert stats.real_tokens == pytest.approx(sum(int(b["attention_mask"].sum()) for b in batches) / 14)
    assert stats.loss_rows == pytest.approx(sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches) / 14)
    assert stats.max_padded_tokens == max(b["input_ids"].numel() for b in batches)
    assert stats.source.startswith("measured")


def test_prompts_without_teacher_data_give_an_upper_bound(tmp_path, tiny_teacher_dir):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {i}."}) + "\n" for i in range(6)))
    recipe = tiny_recipe(tmp_path / "run", tiny_teacher_dir, prompts, generate={"max_new_tokens": 10})
    recipe["data"] = {"prompts": str(prompts), "max_length": 48}
    stats = batch_stats(recipe_from_dict(recipe), AutoTokenizer.from_pretrained(tiny_teacher_dir))
    assert stats.source.startswith("estimated")
    assert stats.loss_rows == 11 * stats.batch_size  # every answer as long as max_new_tokens, + end of turn


def _plan(tmp_path, teacher_dir, data, **sections):
    return plan_recipe(recipe_from_dict(tiny_recipe(tmp_path / "run", teacher_dir, data, **sections)))


@pytest.mark.slow  # plans time real layers on this machine (a few seconds)
def test_plan_memory_and_flops_follow_the_recipe(tmp_path, tiny_teacher_dir, pairs_jsonl):
    kd = _plan(tmp_path, tiny_teacher_dir, pairs_jsonl)
    assert kd.memory["student weights (fp32)"] == 4 * kd.student_params
    assert kd.memory["optimizer state (AdamW m, v)"] == 8 * kd.trainable_params == 8 * kd.student_params
    assert kd.memory["teacher weights"] == 4 * kd.teacher_params
    assert kd.peak_bytes == sum(kd.memory.values()) > kd.memory["process baseline (torch, transformers, tokenizer)"]
    assert kd.flops["student backward"] == pytest.approx(2 * kd.flops["student forward"])
    assert kd.step_seconds > 0 and kd.tokens_per_s > 0 and kd.total_seconds == kd.steps * kd.step_seconds
    sft = _plan(tmp_path, tiny_teacher_dir, pairs_jsonl, method={"kind": "sft"})
    assert "teacher forward" not in sft.flops and "teacher weights" not in sft.memory
    lora = _plan(tmp_path, tiny_teacher_dir, pairs_jsonl, train={"lora": {"r": 2}})
    assert lora.trainable_params < kd.student_params / 10
    assert lora.memory["optimizer state (AdamW m, v)"] == 8 * lora.trainable_params
    assert lora.flops["student backward"] < 2 * lora.flops["student forward"]  # no weight grads
    assert not (tmp_path / "run").exists()  # planning writes nothing


def test_teacher_cache_drops_the_teacher_forward(tmp_path, tiny_teacher_dir, pairs_jsonl):
    from distill.recipe import TeacherSpec

    if "cache" not in TeacherSpec.model_fields:
        pytest.skip("this checkout's recipe has no teacher.cache")
    plan = _plan(tmp_path, tiny_teacher_dir, pairs_jsonl, teacher={"cache": str(tmp_path / "teacher.cache")})
    assert not plan.teacher_online
    assert "teacher forward" not in plan.flops and "teacher weights" not in plan.memory
    assert not any(name.startswith("teacher") for name in plan.seconds)
    assert "teacher.cache" in format_plan(plan)


def test_step_flops_scale_with_grad_accum(tmp_path, tiny_teacher_dir, pairs_jsonl):
    one = recipe_from_dict(tiny_recipe(tmp_path / "run", tiny_teacher_dir, pairs_jsonl))
    two = recipe_from_dict(tiny_recipe(tmp_path / "run", tiny_teacher_dir, pairs_jsonl, train={"grad_accum": 2}))
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    teacher = shape_from_config(load_model(str(tiny_teacher_dir)).config)
    student = student_shape(one, teacher)
    stats = batch_stats(one, tokenizer)
    a, b = step_flops(one, teacher, student, stats), step_flops(two, teacher, student, stats)
    assert b == pytest.approx({k: 2 * v for k, v in a.items()})


@pytest.mark.slow  # plans time real layers on this machine (a few seconds)
def test_cli_prints_a_plan(tmp_path, tiny_teacher_dir, pairs_jsonl, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tmp_path / "run", tiny_teacher_dir, pairs_jsonl)))
    assert main(["plan", str(path), "--set", "train.batch_size=2"]) == 0
    out = capsys.readouterr().out
    for words in ("teacher", "student", "FLOPs per step", "Memory at the peak", "tokens/s", "total (6 steps)"):
        assert words in out
    assert "2 sequences" in out  # the override was applied
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # plans time real layers on this machine (a few seconds per stage)
def test_a_stages_recipe_is_planned_stage_by_stage(tmp_path, tiny_teacher_dir, pairs_jsonl, capsys):
    spec = tiny_recipe(tmp_path / "run", tiny_teacher_dir, pairs_jsonl)
    preferences = tmp_path / "preferences.jsonl"
    preferences.write_text("".join(json.dumps({"prompt": f"Count to {i}.", "chosen": " ".join(map(str, range(i))),
                                               "rejected": "no"}) + "\n" for i in range(2, 12)))
    spec["stages"] = [{"name": "kd", "train": {"steps": 3}},
                      {"name": "dpo", "method": {"kind": "dpo"}, "data": {"pairs": str(preferences)},
                       "train": {"steps": 2}}]
    (label_kd, kd), (label_dpo, dpo) = plan_stages(recipe_from_dict(spec))
    assert (label_kd, label_dpo, kd.steps, dpo.steps) == ("stages[0] (kd)", "stages[1] (dpo)", 3, 2)
    # dpo starts from kd's student (not trained yet: planned with the first stage's shape), runs no teacher and
    # two sequences (chosen, rejected) per batch row
    assert dpo.student_params == kd.student_params
    assert kd.teacher_online and not dpo.teacher_online and "teacher weights" not in dpo.memory
    assert dpo.batch.batch_size == 2 * kd.batch.batch_size == 2 * spec["train"]["batch_size"]
    assert any(note.startswith("method.kind dpo: each batch row is two sequences") for note in dpo.notes)
    text = format_stage_plans([(label_kd, kd), (label_dpo, dpo)])
    assert text.index("== stages[0] (kd): 3 steps ==") < text.index("== stages[1] (dpo): 2 steps ==")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "== stages[1] (dpo): 2 steps ==" in out and "All 2 stages: " in out
    assert not (tmp_path / "run").exists()


def test_cli_bad_recipe_is_one_line(tmp_path, tiny_teacher_dir, pairs_jsonl, capsys):
    recipe = tiny_recipe(tmp_path / "run", tiny_teacher_dir, pairs_jsonl)
    recipe["train"]["batch_sise"] = 4
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["plan", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train.batch_sise: unknown key" in err


def test_format_plan_names_every_part(tmp_path, tiny_teacher_dir, pairs_jsonl):
    plan = _plan(tmp_path, tiny_teacher_dir, pairs_jsonl)
    text = format_plan(plan)
    for name in [*plan.flops, *plan.memory, *plan.seconds]:
        assert name in text


def test_only_from_recipe_reads_the_recipe():
    """The planner's building blocks take plain values; distill.plan.from_recipe alone imports Recipe."""
    import ast
    from pathlib import Path

    import distill.plan

    readers = set()
    for path in Path(distill.plan.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "distill.recipe":
                if any(alias.name == "Recipe" for alias in node.names):
                    readers.add(path.stem)
    assert readers == {"from_recipe"}
