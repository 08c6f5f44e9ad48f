"""Pruning a student out of the teacher: exact slicing, GQA-consistent heads, importance, errors, recipe glue."""
from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from conftest import STORIES260K, TINYSTORIES_TEXT, require_shared, tiny_recipe
from distill.errors import DistillError
from distill.models import count_params
from distill.models.prune import (
    Importance,
    calibration_batches,
    check_prunable,
    choose_heads,
    measure_importance,
    prune_depth,
    prune_teacher,
    prune_width,
    select_layers,
    skip_loss_importance,
    validate_width,
)
from distill.recipe import FromTeacherSpec, recipe_from_dict


@pytest.fixture(scope="module")
def llama(tiny_teacher_dir):
    """A 2-layer Llama (hidden 64, 4 heads in 2 kv groups, FFN 128)."""
    return AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()


@pytest.fixture(scope="module")
def qwen2():
    """A random 3-layer Qwen2 (q/k/v biases), 6 heads in 2 kv groups."""
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return Qwen2ForCausalLM(config).eval()


def _ids(vocab: int, rows: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids, masks: dict | None = None) -> torch.Tensor:
    """Logits with some FFN neurons / query heads zeroed: what a correct slice must reproduce exactly."""
    handles = []
    for i, block in enumerate(model.model.layers):
        if masks and "ffn" in masks:
            keep = masks["ffn"][i]
            handles.append(block.mlp.down_proj.register_forward_pre_hook(
                lambda m, a, keep=keep: (a[0] * _mask(a[0].shape[-1], keep),)))
        if masks and "heads" in masks:
            keep = masks["heads"][i]
            handles.append(block.self_attn.o_proj.register_forward_pre_hook(
                lambda m, a, keep=keep: (a[0] * _mask(a[0].shape[-1], keep),)))
    try:
        return model(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()


def _mask(size: int, keep: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(size)
    mask[keep] = 1
    return mask


def _importance(model, seed: int = 1) -> Importance:
    """Random importance scores of the right shapes, so tests cut arbitrary (not just leading) units."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    return Importance(hidden=torch.rand(c.hidden_size, generator=g),
                      ffn=[torch.rand(c.intermediate_size, generator=g) for _ in range(c.num_hidden_layers)],
                      heads=[torch.rand(c.num_attention_heads, generator=g) for _ in range(c.num_hidden_layers)])


def test_depth_pruning_equals_skipping_the_dropped_blocks(llama):
    ids = _ids(llama.config.vocab_size)
    student = prune_depth(llama, [1])
    assert student.config.num_hidden_layers == 1
    skip = llama.model.layers[0].register_forward_hook(lambda m, a, k, out: a[0] if a else k["hidden_states"],
                                                       with_kwargs=True)
    try:
        expected = _logits(llama, ids)
    finally:
        skip.remove()
    torch.testing.assert_close(_logits(student, ids), expected)
    torch.testing.assert_close(_logits(prune_depth(llama, [0, 1]), ids), _logits(llama, ids))


def test_pruned_student_does_not_share_storage_with_the_teacher(llama):
    student = prune_depth(llama, [0, 1])
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    assert not torch.equal(student.model.layers[0].mlp.up_proj.weight, llama.model.layers[0].mlp.up_proj.weight)
    assert student.lm_head.weight is student.model.embed_tokens.weight  # still tied


@pytest.mark.parametrize("model_name", ["llama", "qwen2"])
def test_ffn_and_head_pruning_equal_masking_the_dropped_units(model_name, request):
    model = request.getfixturevalue(model_name)
    c = model.config
    importance = _importance(model)
    target = {"hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size // 2,
              "num_heads": c.num_attention_heads - c.num_key_value_heads,  # one head fewer per kv group
              "num_kv_heads": c.num_key_value_heads}
    student, channels = prune_width(model, target, importance)
    assert channels.tolist() == list(range(c.hidden_size))
    head_dim = c.hidden_size // c.num_attention_heads
    masks = {"ffn": [], "heads": []}
    for i in range(c.num_hidden_layers):
        masks["ffn"].append(importance.ffn[i].topk(target["intermediate_size"]).indices)
        q_heads, _ = choose_heads(importance.heads[i], c.num_key_value_heads, target["num_heads"],
                                  target["num_kv_heads"])
        masks["heads"].append((q_heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1))
    ids = _ids(c.vocab_size)
    torch.testing.assert_close(_logits(student, ids), _logits(model, ids, masks), rtol=1e-4, atol=1e-5)
    assert student.config.num_attention_heads == target["num_heads"]
    assert student.model.layers[0].mlp.up_proj.weight.shape == (target["intermediate_size"], c.hidden_size)


def test_dropping_a_kv_group_drops_its_query_heads_exactly(qwen2):
    c = qwen2.config
    importance = _importance(qwen2, seed=5)
    target = {"hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size, "num_heads": 3,
              "num_kv_heads": 1}
    student, _ = prune_width(qwen2, target, importance)
    head_dim = c.hidden_size // c.num_attention_heads
    masks = {"heads": []}
    for i in range(c.num_hidden_layers):
        q_heads, kv_heads = choose_heads(importance.heads[i], 2, 3, 1)
        assert (q_heads // 3 == kv_heads[0]).all()  # all kept query heads come from the one kept group
        masks["heads"].append((q_heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1))
    ids = _ids(c.vocab_size)
    torch.testing.assert_close(_logits(student, ids), _logits(qwen2, ids, masks), rtol=1e-4, atol=1e-5)
    assert student.model.layers[0].self_attn.k_proj.bias.shape == (head_dim,)


def test_choose_heads_keeps_the_best_groups_and_their_best_heads():
    scores = torch.tensor([0.1, 0.9, 0.2, 5.0, 0.1, 0.3, 0.2, 0.2, 0.2])  # 3 groups of 3
    q, kv = choose_heads(scores, num_kv=3, keep_heads=4, keep_kv=2)
    assert kv.tolist() == [0, 1]  # group sums 1.2, 5.4, 0.6
    assert q.tolist() == [1, 2, 3, 5]


def test_hidden_pruning_slices_every_weight_on_the_kept_channels(llama):
    c = llama.config
    importance = _importance(llama)
    target = {"hidden_size": 32, "intermediate_size": c.intermediate_size, "num_heads": c.num_attention_heads,
              "num_kv_heads": c.num_key_value_heads}
    student, channels = prune_width(llama, target, importance)
    assert channels.tolist() == sorted(importance.hidden.topk(32).indices.tolist())
    t, s = llama.model, student.model
    torch.testing.assert_close(s.embed_tokens.weight, t.embed_tokens.weight[:, channels])
    torch.testing.assert_close(s.norm.weight, t.norm.weight[channels])
    torch.testing.assert_close(s.layers[1].self_attn.q_proj.weight, t.layers[1].self_attn.q_proj.weight[:, channels])
    torch.testing.assert_close(s.layers[1].mlp.down_proj.weight, t.layers[1].mlp.down_proj.weight[channels])
    assert student.model(input_ids=_ids(c.vocab_size)).last_hidden_state.shape[-1] == 32


def test_select_layers():
    assert select_layers(3, 9) == [0, 4, 8]
    assert select_layers(1, 5) == [0]
    assert select_layers(2, 4, scores=[0.5, 0.1, 0.9, 0.2]) == [0, 2]
    with pytest.raises(DistillError, match=r"from_teacher\.layers: must be between 1 and the teacher's 4"):
        select_layers(5, 4)


def test_importance_is_measured_on_calibration_text(llama):
    batches = calibration_batches([list(range(40)), list(range(40, 90))], samples=4, max_length=16)
    assert [b.shape for b in batches] == [torch.Size([4, 16])]
    importance = measure_importance(llama, batches)
    assert len(importance.layers) == 2 and all(0 <= s <= 2 for s in importance.layers)
    assert importance.hidden.shape == (64,) and (importance.hidden > 0).all()
    assert importance.heads[0].shape == (4,) and importance.ffn[1].shape == (128,)
    skip = skip_loss_importance(llama, batches)
    assert len(skip) == 2 and all(math.isfinite(s) for s in skip)


def test_prune_teacher_records_what_it_kept(llama):
    batches = calibration_batches([list(range(100))], samples=4, max_length=16)
    spec = FromTeacherSpec(layers=1, hidden_size=32, intermediate_size=64, num_heads=2)
    student, report = prune_teacher(llama, spec, batches)
    pruned_from = student.config.distill_pruned_from
    assert pruned_from["teacher_layers"] == report.keep_layers and len(report.keep_layers) == 1
    assert len(pruned_from["hidden_channels"]) == 32
    assert report.student_params == count_params(student) < report.teacher_params
    assert report.student_shape["kv_heads"] == 1  # 2 heads fit in one of the teacher's groups of 2
    assert set(report.layer_importance) == {"0", "1"} and report.layer_importance_method == "block_influence"
    assert "layers 2 -> 1" in report.summary() and "hidden 64 -> 32" in report.summary()


@pytest.mark.parametrize("spec, message", [
    ({"num_heads": 8}, r"from_teacher\.num_heads: 8 exceeds the teacher's 4"),
    ({"num_heads": 3}, r"from_teacher\.num_heads: 3 cannot be split .* valid choices: \[1, 2, 4\]"),
    ({"num_heads": 4, "num_kv_heads": 1}, r"from_teacher\.num_kv_heads: 1 does not fit .* valid choices: \[2\]"),
    ({"hidden_size": 30}, r"from_teacher\.hidden_size: 30 is not divisible by num_heads 4"),
    ({"hidden_size": 128}, r"from_teacher\.hidden_size: 128 exceeds the teacher's 64"),
    ({"intermediate_size": 512}, r"from_teacher\.intermediate_size: 512 exceeds"),
])
def test_impossible_width_targets_name_the_key_and_choices(llama, spec, message):
    with pytest.raises(DistillError, match=message):
        validate_width(FromTeacherSpec(**spec), llama.config)


def test_keep_layers_out_of_range(llama):
    with pytest.raises(DistillError, match=r"keep_layers: \[5\] out of range; the teacher has layers 0\.\.1"):
        prune_depth(llama, [0, 5])


def test_unsupported_architecture_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(DistillError, match=r"cannot prune a gpt2 model .* Llama-layout"):
        check_prunable(model)


def test_recipe_builds_saves_and_reuses_the_student(tmp_path, tiny_teacher_dir, pairs_jsonl, capsys):
    from distill.cli import main

    raw = tiny_recipe(tmp_path / "run", tiny_teacher_dir, pairs_jsonl)
    raw["student"] = {"from_teacher": {"layers": 1, "hidden_size": 32, "calibration": {"samples": 4,
                                                                                         "max_length": 16}}}
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(raw))
    assert main(["student", str(path)]) == 0
    built = tmp_path / "run" / "student_init"
    assert "student saved to" in capsys.readouterr().out
    report = json.loads((built / "pruning.json").read_text())
    assert report["student_shape"]["layers"] == 1 and report["student_shape"]["hidden"] == 32
    stamp = (built / "model.safetensors").stat().st_mtime_ns
    recipe = recipe_from_dict(raw)
    from distill.stages import train

    result = train(recipe, progress=False)  # reuses the built student
    assert (built / "model.safetensors").stat().st_mtime_ns == stamp
    trained = AutoModelForCausalLM.from_pretrained(result.student_dir)
    assert trained.config.num_hidden_layers == 1 and trained.config.distill_pruned_from["teacher_layers"]
    raw["student"]["from_teacher"]["hidden_size"] = 16  # a different cut is rebuilt, not reused
    (tmp_path / "r2.yaml").write_text(json.dumps(raw))
    assert main(["student", str(tmp_path / "r2.yaml"), "--out", str(tmp_path / "other")]) == 0
    assert json.loads((tmp_path / "other" / "pruning.json").read_text())["student_shape"]["hidden"] == 16


def test_student_command_refuses_an_existing_model(tmp_path, tiny_teacher_dir, tiny_student_dir, pairs_jsonl,
                                                  capsys):
    from distill.cli import main

    raw = tiny_recipe(tmp_path / "run", tiny_teacher_dir, pairs_jsonl)
    raw["student"] = {"model": str(tiny_student_dir)}
    (tmp_path / "r.yaml").write_text(json.dumps(raw))
    assert main(["student", str(tmp_path / "r.yaml")]) == 2
    assert "student.model: this recipe trains an existing model" in capsys.readouterr().err


# ------------------------------------------------------------------------------- evidence on a real model


@torch.no_grad()
def _perplexity(model, held_out: torch.Tensor) -> float:
    return math.exp(float(model(input_ids=held_out, labels=held_out).loss))


@pytest.mark.slow
def test_stories260k_pruned_half_beats_random_init_before_and_after_kd(tmp_path):
    """A student cut to ~half of stories260K starts far better than the same shape at random, and stays ahead."""
    from distill.stages import train

    require_shared(STORIES260K)
    require_shared(TINYSTORIES_TEXT)
    tokenizer = AutoTokenizer.from_pretrained(STORIES260K)
    text = TINYSTORIES_TEXT.read_text()
    held_out = torch.tensor(tokenizer(text[-60_000:])["input_ids"][: 16 * 128]).view(16, 128)
    train_file = tmp_path / "train.txt"
    train_file.write_text(text[:400_000])  # the held-out tail is never seen
    shape = {"layers": 4, "hidden_size": 48, "num_heads": 6, "intermediate_size": 128}
    common = {
        "teacher": {"model": str(STORIES260K)},
        "data": {"train": str(train_file), "max_length": 128, "eval_fraction": 0.05},
        "method": {"kind": "kd", "alpha": 0.0, "chunk_size": 128},
        "train": {"steps": 40, "batch_size": 8, "lr": 3e-3, "warmup_steps": 4, "log_every": 10,
                  "checkpoint_every": 40},
    }
    pruned = recipe_from_dict({**common, "output_dir": str(tmp_path / "pruned"),
                               "student": {"from_teacher": {**shape, "calibration": {"samples": 32}}}})
    random = recipe_from_dict({**common, "output_dir": str(tmp_path / "random"), "student": {"config": {
        "num_layers": 4, "hidden_size": 48, "num_heads": 6, "num_kv_heads": 3, "intermediate_size": 128},
        "init_embeddings": "random"}})

    teacher = AutoModelForCausalLM.from_pretrained(STORIES260K)
    results = {}
    for name, recipe in {"pruned": pruned, "random": random}.items():
        result = train(recipe, progress=False)
        before = AutoModelForCausalLM.from_pretrained(recipe.run_dir / "student_init")
        after = AutoModelForCausalLM.from_pretrained(result.student_dir)
        results[name] = (count_params(before), _perplexity(before, held_out), _perplexity(after, held_out))
    (p_params, p_before, p_after), (r_params, r_before, r_after) = results["pruned"], results["random"]
    assert p_params == r_params and 0.35 < p_params / count_params(teacher) < 0.6
    assert p_before < r_before / 2, results  # much better before any training
    assert p_after < r_after, results  # and still ahead after the same KD budget


def test_calibration_text_falls_back_to_the_prompts_before_the_teacher_answers(tmp_path, tiny_teacher_dir,
                                                                                pairs_jsonl):
    from distill.stages.student import calibration_token_ids

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about {w}."}) + "\n" for w in ("cats", "dogs")))
    raw = tiny_recipe(tmp_path / "run", tiny_teacher_dir, pairs_jsonl)
    raw["data"] = {"prompts": str(prompts)}
    raw["student"] = {"from_teacher": {"layers": 1, "calibration": {"samples": 2, "max_length": 32}}}
    recipe = recipe_from_dict(raw)
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    ids = calibration_token_ids(recipe, tokenizer)
    assert len(ids) == 2
    assert tokenizer.decode(ids[0]).endswith("<|im_start|>assistant\n")  # the prompt as the teacher reads it
    raw["student"]["from_teacher"]["calibration"]["file"] = str(pairs_jsonl)  # an explicit file wins
    ids = calibration_token_ids(recipe_from_dict(raw), tokenizer)
    assert "Question 0" in tokenizer.decode(ids[0])
