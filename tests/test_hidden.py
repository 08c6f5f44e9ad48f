"""Hidden-state KD: the matcher's losses and init, layer maps, block outputs, trainer integration and resume."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import safetensors.torch
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import logged_steps, tiny_recipe
from distill.errors import DistillError
from distill.losses import HiddenStateMatcher, check_layer_map, default_layer_map
from distill.models import load_model
from distill.models.heads import decoder_hidden_states, decoder_layer_outputs
from distill.recipe import recipe_from_dict
from distill.training.checkpoint import MATCHER_FILE, list_checkpoints
from distill.signals.teacher_signal import LiveTeacher
from distill.stages.training import hidden_matcher
from distill.stages.training import batch_objective
from distill.training.step import loss_on_batch
from distill.stages import train

# ---------------------------------------------------------------- losses against a float64 reference


def _reference_loss(weights, layer_map, student, teacher, mask, loss):
    """Per-position loops: mse = sum ||P s - t||^2 / sum ||t||^2 per layer; cosine = mean (1 - cos); mean of layers."""
    per_layer = []
    for w, (s, t) in zip(weights, layer_map):
        errors, energies, cosines = [], [], []
        for b, i in mask.nonzero().tolist():
            p, y = w @ student[s][b, i], teacher[t][b, i]
            errors.append(((p - y) ** 2).sum())
            energies.append((y ** 2).sum())
            cosines.append(1 - (p @ y) / (p.norm() * y.norm()))
        per_layer.append(sum(errors) / sum(energies) if loss == "mse" else sum(cosines) / len(cosines))
    return sum(per_layer) / len(per_layer)


@pytest.mark.parametrize("loss", ["mse", "cosine"])
def test_matcher_loss_and_grads_match_reference(loss):
    torch.manual_seed(11)
    layer_map = [(0, 1), (1, 1), (1, 0)]  # one student layer may feed two teacher layers
    matcher = HiddenStateMatcher(layer_map, 5, 7, loss).double()
    with torch.no_grad():
        for projection in matcher.projections:
            projection.weight.normal_()
    student = {i: torch.randn(3, 6, 5, dtype=torch.float64) for i in range(2)}
    teacher = {i: torch.randn(3, 6, 7, dtype=torch.float64) * (i + 2) for i in range(2)}
    mask = torch.rand(3, 6) > 0.4
    mask[2] = False  # a row that is all padding
    mask[0, 0] = True
    got = matcher(student, teacher, mask)
    weights = [p.weight for p in matcher.projections]
    expected = _reference_loss(weights, layer_map, student, teacher, mask, loss)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    got_grads = torch.autograd.grad(got, weights, retain_graph=True)
    expected_grads = torch.autograd.grad(expected, weights)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_masked_positions_do_not_count():
    torch.manual_seed(12)
    matcher = HiddenStateMatcher([(0, 0)], 4, 4, "mse").double()
    student = {0: torch.randn(2, 5, 4, dtype=torch.float64)}
    teacher = {0: torch.randn(2, 5, 4, dtype=torch.float64)}
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    before = matcher(student, teacher, mask)
    student[0][mask == 0] = 1e6  # garbage at padding
    teacher[0][mask == 0] = -1e6
    assert matcher(student, teacher, mask) == before


def test_no_valid_position_gives_zero_and_backward_works():
    matcher = HiddenStateMatcher([(0, 0)], 3, 4, "mse")
    loss = matcher({0: torch.randn(1, 2, 3)}, {0: torch.randn(1, 2, 4)}, torch.zeros(1, 2))
    loss.backward()
    assert loss.item() == 0.0 and matcher.projections[0].weight.grad is not None


# ---------------------------------------------------------------- initialisation


def test_scatter_init_puts_kept_channels_back():
    torch.manual_seed(13)
    channels = [6, 0, 3, 5]
    matcher = HiddenStateMatcher([(0, 0)], 4, 8, "mse", hidden_channels=channels).double()
    teacher = torch.randn(2, 3, 8, dtype=torch.float64)
    kept_only = torch.zeros_like(teacher)
    kept_only[..., channels] = teacher[..., channels]
    student = {0: teacher[..., channels]}
    mask = torch.ones(2, 3)
    assert matcher(student, {0: kept_only}, mask).item() == 0.0
    # Against the full teacher state the loss is the share of its energy in the dropped channels.
    dropped = [c for c in range(8) if c not in channels]
    share = teacher[..., dropped].square().sum() / teacher.square().sum()
    torch.testing.assert_close(matcher(student, {0: teacher}, mask), share)
    cosine = HiddenStateMatcher([(0, 0)], 4, 8, "cosine", hidden_channels=channels).double()
    torch.testing.assert_close(cosine(student, {0: kept_only}, mask), torch.zeros((), dtype=torch.float64))


def test_equal_widths_start_at_identity_and_others_at_an_isometry():
    same = HiddenStateMatcher([(0, 0), (1, 1)], 6, 6)
    assert all(torch.equal(p.weight, torch.eye(6)) for p in same.projections)
    wide = HiddenStateMatcher([(0, 0)], 4, 9, seed=5)
    w = wide.projections[0].weight
    torch.testing.assert_close(w.T @ w, torch.eye(4), atol=1e-5, rtol=0)  # norms preserved
    assert torch.equal(w, HiddenStateMatcher([(0, 0)], 4, 9, seed=5).projections[0].weight)  # seeded


@pytest.mark.parametrize("channels, message", [([0, 1, 2], "3 channels for a student of width 4"),
                                               ([0, 1, 2, 8], "distinct and in 0..7"),
                                               ([0, 1, 1, 2], "distinct and in 0..7")])
def test_bad_hidden_channels_are_reported(channels, message):
    with pytest.raises(DistillError, match=rf"distill_pruned_from\.hidden_channels: .*{message}"):
        HiddenStateMatcher([(0, 0)], 4, 8, hidden_channels=channels)


# ---------------------------------------------------------------- layer maps


@pytest.mark.parametrize("student_layers, teacher_layers, expected", [
    (2, 4, [(0, 1), (1, 3)]),
    (3, 30, [(0, 9), (1, 19), (2, 29)]),
    (4, 6, [(0, 1), (1, 2), (2, 4), (3, 5)]),  # 1.5 and 4.5 round up
    (3, 3, [(0, 0), (1, 1), (2, 2)]),
    (4, 2, [(0, 0), (1, 0), (2, 1), (3, 1)]),
])
def test_uniform_layer_map_ends_on_the_last_teacher_block(student_layers, teacher_layers, expected):
    assert default_layer_map(student_layers, teacher_layers) == expected


def test_pruned_student_maps_to_the_blocks_it_was_copied_from():
    assert default_layer_map(3, 8, [0, 4, 7]) == [(0, 0), (1, 4), (2, 7)]
    with pytest.raises(DistillError, match=r"teacher_layers: 2 entries for a student of 3 layers"):
        default_layer_map(3, 8, [0, 4])
    with pytest.raises(DistillError, match=r"distill_pruned_from\.teacher_layers: \[1, 9\] is out of range"):
        default_layer_map(2, 8, [0, 9])


@pytest.mark.parametrize("layer_map", [[[2, 0]], [[0, 4]], [[-1, 0]], [[0, 1], [1, -2]]])
def test_layer_map_out_of_range_names_the_key_and_ranges(layer_map):
    with pytest.raises(DistillError, match=r"method\.hidden\.layer_map: .* student layers are 0\.\.1, "
                                           r"teacher layers 0\.\.3"):
        check_layer_map(layer_map, 2, 4)


def test_layer_map_must_not_be_empty():
    with pytest.raises(DistillError, match=r"method\.hidden\.layer_map: empty"):
        check_layer_map([], 2, 4)
    assert check_layer_map([[1, 3], [0, 0]], 2, 4) == [(1, 3), (0, 0)]


# ---------------------------------------------------------------- block outputs


def _llama(layers: int = 3) -> LlamaForCausalLM:
    torch.manual_seed(14)
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return LlamaForCausalLM(config).eval()


def _raw_block_output(model: LlamaForCausalLM, layer: int, ids, mask) -> torch.Tensor:
    """Reference: a copy cut after block `layer` with the final norm removed, so its last state is the raw output."""
    cut = copy.deepcopy(model)
    cut.model.layers = cut.model.layers[: layer + 1]
    cut.model.norm = torch.nn.Identity()
    cut.config.num_hidden_layers = layer + 1
    return cut.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state


def _probe():
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(15))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0  # right padding
    return ids, mask


def test_layer_outputs_are_raw_block_outputs_and_final_is_post_norm():
    model, (ids, mask) = _llama(), _probe()
    with torch.no_grad():
        final, states = decoder_layer_outputs(model, ids, mask, [2, 0, 2])
        assert sorted(states) == [0, 2]
        for layer in (0, 2):
            torch.testing.assert_close(states[layer], _raw_block_output(model, layer, ids, mask))
        torch.testing.assert_close(final, decoder_hidden_states(model, ids, mask))
        torch.testing.assert_close(final, model.model.norm(states[2]))
        assert not torch.allclose(final, states[2])  # the last block's output is pre-norm
    assert not any(block._forward_hooks for block in model.model.layers)  # hooks removed


def test_layer_outputs_through_lora_match_the_merged_model():
    from peft import LoraConfig, get_peft_model

    model, (ids, mask) = _llama(), _probe()
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    peft_model = get_peft_model(copy.deepcopy(model), lora)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # B starts at zero; make the adapters matter
        _, states = decoder_layer_outputs(peft_model, ids, mask, [1])
        merged = copy.deepcopy(peft_model).merge_and_unload()
        expected = _raw_block_output(merged, 1, ids, mask)
        plain = _raw_block_output(model, 1, ids, mask)
    torch.testing.assert_close(states[1], expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(states[1], plain, atol=1e-4)


def test_layer_outside_the_model_is_reported():
    model, (ids, mask) = _llama(2), _probe()
    with pytest.raises(DistillError, match=r"layers 0\.\.1"):
        decoder_layer_outputs(model, ids, mask, [2])


# ---------------------------------------------------------------- trainer


def _hidden_recipe(run_dir: Path, teacher_dir: Path, data: Path, hidden: dict | None = None, **sections):
    method = {"hidden": {"weight": 0.5, **(hidden or {})}, **sections.pop("method", {})}
    return recipe_from_dict(tiny_recipe(run_dir, teacher_dir, data, method=method, **sections))


def _metrics(run_dir: Path) -> list[dict]:
    return logged_steps(run_dir)


def test_depth_pruned_student_starts_with_zero_hidden_loss(tmp_path, tiny_teacher_dir, pairs_jsonl):
    from distill.stages.data import recipe_examples
    from distill.data.tokenize import collate, encode_all
    from distill.models import load_tokenizer

    recipe = _hidden_recipe(tmp_path / "r", tiny_teacher_dir, pairs_jsonl)
    teacher, tok = load_model(str(tiny_teacher_dir)).eval(), load_tokenizer(str(tiny_teacher_dir))
    student = copy.deepcopy(teacher)  # block 0 of the teacher, alone: a depth-pruned student
    student.model.layers = student.model.layers[:1]
    student.config.num_hidden_layers = 1
    student.config.distill_pruned_from = {"teacher_layers": [0], "hidden_channels": None}
    matcher = hidden_matcher(recipe, student, teacher)
    assert matcher.layer_map == [(0, 0)]  # not the uniform map's (0, 1)
    examples, _ = recipe_examples(recipe)
    batch = collate(encode_all(examples[:3], tok, 48, None), tok.pad_token_id)
    with torch.no_grad():
        out = loss_on_batch(student, LiveTeacher(teacher), batch, batch_objective(recipe.method), matcher=matcher)
        plain = loss_on_batch(student, LiveTeacher(teacher), batch, batch_objective(recipe.method))
    assert out.hidden.item() == pytest.approx(0.0, abs=1e-6)
    assert plain.hidden is None and out.loss.item() == pytest.approx(plain.loss.item(), abs=1e-6)


def test_width_pruned_student_gets_scatter_projections(tmp_path, tiny_teacher_dir, tiny_student_dir, pairs_jsonl):
    recipe = _hidden_recipe(tmp_path / "r", tiny_teacher_dir, pairs_jsonl, hidden={"loss": "cosine"})
    teacher, student = load_model(str(tiny_teacher_dir)), load_model(str(tiny_student_dir))
    channels = list(range(63, -1, -2))  # 32 of the teacher's 64
    student.config.distill_pruned_from = {"teacher_layers": [1], "hidden_channels": channels}
    matcher = hidden_matcher(recipe, student, teacher)
    weight = matcher.projections[0].weight
    assert matcher.layer_map == [(0, 1)] and matcher.loss == "cosine"
    assert weight.shape == (64, 32) and weight.sum() == 32
    assert all(weight[c, k] == 1 for k, c in enumerate(channels))


def test_training_logs_the_hidden_term_and_resumes_exactly(tmp_path, tiny_teacher_dir, pairs_jsonl):
    whole = _hidden_recipe(tmp_path / "a", tiny_teacher_dir, pairs_jsonl)
    train(whole, progress=False)
    split = _hidden_recipe(tmp_path / "b", tiny_teacher_dir, pairs_jsonl, train={"checkpoint_every": 100})
    assert train(split, progress=False, stop_after=3) is None
    assert (list_checkpoints(tmp_path / "b" / "checkpoints")[-1] / MATCHER_FILE).is_file()
    train(split, progress=False)

    rows = _metrics(tmp_path / "a")
    assert len(rows) == 6 and all(math.isfinite(r["hidden"]) and r["hidden"] > 0 for r in rows)
    for r in rows:  # the logged loss is the logit objective plus weight * hidden
        assert r["loss"] == pytest.approx(0.5 * r["ce"] + 0.5 * r["kd"] + 0.5 * r["hidden"], rel=1e-5)
    assert rows[-1]["hidden"] < rows[0]["hidden"]
    resumed = _metrics(tmp_path / "b")
    for key in ("loss", "hidden"):
        assert [r[key] for r in resumed] == pytest.approx([r[key] for r in rows], rel=1e-5)

    a_student = safetensors.torch.load_file(tmp_path / "a" / "student" / "model.safetensors")
    b_student = safetensors.torch.load_file(tmp_path / "b" / "student" / "model.safetensors")
    assert not any("projection" in k for k in a_student)  # the projections stay out of the saved student
    for key in a_student:
        torch.testing.assert_close(b_student[key], a_student[key], rtol=1e-5, atol=1e-6)
    a_matcher, b_matcher = (safetensors.torch.load_file(tmp_path / run / "checkpoints" / "step_6" / MATCHER_FILE)
                            for run in ("a", "b"))
    assert list(a_matcher) == ["projections.0.weight"]
    torch.testing.assert_close(b_matcher["projections.0.weight"], a_matcher["projections.0.weight"],
                               rtol=1e-5, atol=1e-6)


def test_hidden_needs_kd(tmp_path, tiny_teacher_dir, pairs_jsonl):
    recipe = _hidden_recipe(tmp_path / "r", tiny_teacher_dir, pairs_jsonl, method={"kind": "sft"})
    with pytest.raises(DistillError, match=r"method\.hidden: .*method\.kind: kd.*got method\.kind: sft"):
        train(recipe, progress=False)


def test_bad_layer_map_fails_the_run(tmp_path, tiny_teacher_dir, pairs_jsonl):
    recipe = _hidden_recipe(tmp_path / "r", tiny_teacher_dir, pairs_jsonl, hidden={"layer_map": [[0, 2]]})
    with pytest.raises(DistillError, match=r"method\.hidden\.layer_map: \[0, 2\] is out of range: student layers "
                                           r"are 0\.\.0, teacher layers 0\.\.1"):
        train(recipe, progress=False)


def test_resume_refuses_a_checkpoint_without_the_projections(tmp_path, tiny_teacher_dir, pairs_jsonl):
    plain = recipe_from_dict(tiny_recipe(tmp_path / "r", tiny_teacher_dir, pairs_jsonl))
    train(plain, progress=False, stop_after=2)
    with pytest.raises(DistillError, match=r"has no hidden-state projections .* recipe sets method\.hidden"):
        train(_hidden_recipe(tmp_path / "r", tiny_teacher_dir, pairs_jsonl), progress=False)
