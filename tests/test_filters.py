"""distill.data.filters, minhash and contamination: each filter rejects and keeps what it should, MinHash/LSH
statistics, answer verification on real GSM8K lines, the report's arithmetic, and errors naming file:line."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
from conftest import SHARED, require_shared
from pydantic import ValidationError

from distill.answers import extract_answer
from distill.data import contamination
from distill.data.contamination import NgramIndex, load_eval_texts, read_eval_texts
from distill.data.filters import (
    FILTER_ORDER,
    filter_file,
    filter_records,
    format_filter_report,
    parse_score,
    report_path,
)
from distill.data.minhash import MinHasher, concat_ngrams, estimated_jaccard, hash_words, near_duplicates, words
from distill.errors import DistillError
from distill.recipe import FilterSpec

GSM8K = SHARED / "data" / "gsm8k" / "train.jsonl"
WORDS = [f"w{i}" for i in range(3000)]
NORMAL = ("Photosynthesis lets plants turn sunlight, water and carbon dioxide into sugar and oxygen. "
          "It happens in the chloroplasts of leaf cells.")


def rec(response: str, id: str = "r", **fields) -> dict:
    """A teacher record with an answered status (fields override)."""
    prompt = fields.pop("prompt", "Explain something.")
    record = {"id": id, "prompt": prompt, "response": response,
              "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
              "finish_reason": "stop", "reference": None, "status": "ok"}
    return {**record, **fields}


def only(name: str, **settings) -> FilterSpec:
    """A spec with just one filter on (with settings)."""
    spec = {n: False for n in FILTER_ORDER}
    spec[name] = settings or True
    return FilterSpec.model_validate(spec)


def rejected_ids(records: list[dict], spec: FilterSpec, **kwargs) -> list[str]:
    kept = {r["id"] for r in filter_records(records, spec, **kwargs).kept}
    return [r["id"] for r in records if r["id"] not in kept]


def random_text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


# ---------------------------------------------------------------- settings


def test_spec_defaults_switches_and_errors():
    spec = FilterSpec()
    assert [n for n in FILTER_ORDER if getattr(spec, n).enabled] == [n for n in FILTER_ORDER if n != "judge"]
    spec = FilterSpec.model_validate({"near_dedup": False, "judge": True, "refusal": {"extra_patterns": ["foo"]}})
    assert not spec.near_dedup.enabled and spec.judge.enabled and spec.refusal.enabled
    with pytest.raises(ValidationError, match="extra_forbidden|Extra inputs"):
        FilterSpec.model_validate({"near_dedup": {"thresh": 0.5}})
    with pytest.raises(ValidationError, match="not a regular expression"):
        FilterSpec.model_validate({"refusal": {"extra_patterns": ["(unclosed"]}})
    with pytest.raises(ValidationError, match="max_words"):
        FilterSpec.model_validate({"length": {"min_words": 10, "max_words": 5}})


# ---------------------------------------------------------------- cheap per-record filters


def test_truncated():
    records = [rec(NORMAL, "cut", finish_reason="length"), rec(NORMAL + " Done.", "whole")]
    assert rejected_ids(records, only("truncated")) == ["cut"]


def test_garbled():
    records = [
        rec("", "empty"), rec("  \n\t ", "blank"), rec("Caf\ufffd au lait " + NORMAL, "replacement"),
        rec("#@%&*()[]{}<>|\\/^~ " * 10 + "ok", "symbols"), rec("Code:\n```python\nprint(1)\n", "open_fence"),
        rec(NORMAL, "prose"), rec("Code:\n```python\nfor i in range(3):\n    print(i)\n```\nDone.", "code"),
        rec("Η φωτοσύνθεση μετατρέπει το φως σε χημική ενέργεια. 光合作用。", "greek_chinese"),
        rec("x = {a: [1, 2], b: (3, 4)}; y = x['a'][0] * 2", "symbol_heavy_code"),
    ]
    assert rejected_ids(records, only("garbled")) == ["empty", "blank", "replacement", "symbols", "open_fence"]
    loose = only("garbled", max_replacement_chars=1, code_fences=False)
    assert rejected_ids(records, loose) == ["empty", "blank", "symbols"]


def test_length_bounds():
    records = [rec("Yes.", "short"), rec(NORMAL, "mid"), rec(" ".join(["word"] * 400), "long")]
    assert rejected_ids(records, only("length", min_words=3, max_words=300)) == ["short", "long"]
    assert rejected_ids(records, only("length", max_chars=100)) == ["mid", "long"]
    assert rejected_ids(records, only("length")) == []


def test_refusals_and_boilerplate():
    records = [
        rec("As an AI language model, I do not have opinions. " + NORMAL, "ai_model"),
        rec("I’m sorry, but I cannot help with that request.", "sorry_curly"),
        rec("I can't assist with creating malware.", "cant_assist"),
        rec("Sadly I'm unable to provide medical advice.", "unable"),
        rec("I can't help but smile when the sun comes out. " + NORMAL, "idiom"),
        rec("Per the POLICY of ACME corp, returns take 30 days.", "policy"),
        rec(NORMAL, "plain"),
    ]
    assert rejected_ids(records, only("refusal")) == ["ai_model", "sorry_curly", "cant_assist", "unable"]
    extra = only("refusal", default_patterns=False, extra_patterns=[r"policy of acme"])
    assert rejected_ids(records, extra) == ["policy"]  # extra patterns are case-insensitive


def test_repetition():
    rng = random.Random(0)
    loop = random_text(rng, 30) + " " + " ".join(["the cat sat on the mat"] * 10)
    lines = "Steps:\n" + "\n".join(["Add the flour."] * 5) + "\nBake."
    code = "def f():\n    if x:\n        if y:\n            return 1\n        }\n    }\n}\n}\n"
    records = [rec(loop, "loop"), rec(lines, "lines"), rec(random_text(rng, 120), "varied"),
               rec(code, "closers"), rec("Add the flour.\nAdd the flour.\nStir.", "twice")]
    assert rejected_ids(records, only("repetition")) == ["loop", "lines"]
    assert rejected_ids(records, only("repetition", max_line_repeats=1)) == ["loop", "lines", "twice"]


# ---------------------------------------------------------------- answer verification


@pytest.mark.parametrize("text, answer", [
    ("She sold 48 + 24 = 72 clips.\n#### 72", "72"),
    ("Total: #### $1,000.00", "1000"),
    ("The answer is 2.50 dollars.", "2.5"),
    ("So x = -3.", "-3"),
    ("Pages 10-12 are left.", None),  # a range is ambiguous: no answer (distill.answers)
    ("We get \\boxed{42} after 7 steps.", "42"),
    ("It costs $5.", "5"),
    ("No numbers here.", None),
    ("#### none", None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_verify_rejection_sampling():
    reference = "Half of 48 is 24; 48 + 24 = 72.\n#### 72"
    records = [
        rec("48 + 24 = 72, so she sold 72 clips.", "right", reference=reference),
        rec("She sold 48 + 24 = 71 clips.", "wrong", reference=reference),
        rec("She sold many clips.", "no_number", reference=reference),
        rec("The capital is Paris.", "text_reference", reference="Paris"),
        rec("There were 3 cats.", "no_reference"),
    ]
    result = filter_records(records, only("verify"))
    assert [r["id"] for r in result.kept] == ["right", "text_reference", "no_reference"]
    stat = result.filters[FILTER_ORDER.index("verify")]
    assert (stat.records_in, stat.checked, stat.rejected) == (5, 3, 2)
    assert "without a number" in stat.note


def test_verify_on_real_gsm8k_lines():
    rows = [json.loads(line) for line in require_shared(GSM8K).read_text().splitlines()[:20]]
    records = []
    for i, row in enumerate(rows):
        gold = row["answer"].rsplit("####", 1)[1].strip()
        records.append(rec(row["answer"], f"self{i}", prompt=row["question"], reference=row["answer"]))
        wrong = row["answer"].rsplit("####", 1)[0] + f"#### {int(gold.replace(',', '')) + 1}"
        records.append(rec(wrong, f"wrong{i}", prompt=row["question"], reference=row["answer"]))
    result = filter_records(records, only("verify"))
    assert [r["id"] for r in result.kept] == [f"self{i}" for i in range(20)]
    assert result.filters[FILTER_ORDER.index("verify")].checked == 40


# ---------------------------------------------------------------- duplicates and MinHash


def test_exact_duplicates_keep_the_first_and_respect_scope():
    records = [rec(NORMAL, "a", prompt="Q1"), rec(NORMAL.upper().replace(" ", "  "), "b", prompt="Q1"),
               rec(NORMAL, "c", prompt="Q2"), rec(NORMAL + " More.", "d", prompt="Q1")]
    result = filter_records(records, only("exact_dedup"))
    assert [r["id"] for r in result.kept] == ["a", "c", "d"]
    assert "same text as a" in result.filters[FILTER_ORDER.index("exact_dedup")].examples[0]["reason"]
    by_response = FilterSpec.model_validate({**only("exact_dedup").model_dump(), "dedup_scope": "response"})
    assert rejected_ids(records, by_response) == ["b", "c"]


def _shingles(text: str, n: int = 5) -> set:
    tokens = text.split()
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def _plain_word_hash(word: bytes) -> int:
    """The word hash of distill.data.minhash, one byte at a time: polynomial, then splitmix64."""
    mask, z = 2**64 - 1, 0
    for byte in word:
        z = (z * 0x100000001B3 + byte) & mask
    z ^= z >> 30
    z = (z * 0xBF58476D1CE4E5B9) & mask
    z ^= z >> 27
    z = (z * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_word_and_ngram_hashes_match_plain_python():
    texts = ["A b, c-d e f g!", "x y", "", "one two three four five six", "q", "Ünïcode café, naïve_x 3.5",
             "tabs\tand\nnew lines"]
    assert words(texts[0]) == [b"a", b"b", b"c", b"d", b"e", b"f", b"g"]
    assert words(texts[5]) == ["ünïcode".encode(), "café".encode(), "naïve_x".encode(), b"3", b"5"]
    flat, lengths = hash_words(texts)
    blocked = hash_words(texts, block=2)  # blocks are joined back in order
    assert np.array_equal(blocked[0], flat) and np.array_equal(blocked[1], lengths)
    per_text = [[_plain_word_hash(w) for w in words(t)] for t in texts]
    assert lengths.tolist() == [len(h) for h in per_text]
    assert flat.tolist() == [h for hs in per_text for h in hs]
    grams, owner = concat_ngrams(flat, lengths, 5)
    expected, owners = [], []
    for index, hashes in enumerate(per_text):
        n = min(5, len(hashes))
        for start in range(len(hashes) - n + 1 if hashes else 0):
            value = 0
            for h in hashes[start:start + n]:
                value = (value * 0x9E3779B97F4A7C15 + h) % 2**64
            expected.append(value)
            owners.append(index)
    assert grams.tolist() == expected and owner.tolist() == owners


def test_minhash_estimates_jaccard_within_its_statistical_error():
    rng = random.Random(1)
    hasher = MinHasher(num_perm=128, shingle=5, seed=0)
    errors = []
    for keep in np.linspace(0.5, 1.0, 30):  # shingle Jaccard ~keep^5: spans 0.03..1
        base = random_text(rng, 120).split()
        other = [w if rng.random() < keep else rng.choice(WORDS) for w in base]
        a, b = " ".join(base), " ".join(other)
        true = len(_shingles(a) & _shingles(b)) / len(_shingles(a) | _shingles(b))
        sig = hasher.signatures([a, b])
        sd = max((true * (1 - true) / 128) ** 0.5, 0.01)
        error = float(estimated_jaccard(sig[0], sig[1])) - true
        assert abs(error) < 5 * sd, (true, error)
        errors.append(error)
    assert abs(np.mean(errors)) < 0.025  # unbiased on average


def test_lsh_finds_planted_near_duplicates_only():
    rng = random.Random(2)
    texts = [random_text(rng, 100) for _ in range(300)]
    planted = {}
    for source in rng.sample(range(300), 20):
        tokens = texts[source].split()
        tokens[rng.randrange(100)] = "changed"
        planted[len(texts)] = source
        texts.append(" ".join(tokens))
    half = texts[0].split()  # Jaccard ~0.3 with texts[0]: a candidate at most, never a duplicate
    texts.append(" ".join(half[:50] + random_text(rng, 50).split()))
    texts.append("")  # no words: nobody's duplicate
    texts.append("")
    signatures = MinHasher().signatures(texts)
    assert np.array_equal(signatures, MinHasher().signatures(texts, chunk=7))
    dropped = near_duplicates(signatures, 0.8)
    assert {j: i for j, (i, _) in dropped.items()} == planted
    assert all(s >= 0.8 for _, s in dropped.values())


def test_near_dedup_filter_keeps_the_first_of_each_cluster():
    rng = random.Random(3)
    base = random_text(rng, 100)
    variant = base.replace(base.split()[50], "different", 1)
    records = [rec(random_text(rng, 100), "other"), rec(base, "first"), rec(variant, "second"),
               rec(variant + " extra", "third")]
    result = filter_records(records, only("near_dedup"))
    assert [r["id"] for r in result.kept] == ["other", "first"]
    reasons = [e["reason"] for e in result.filters[FILTER_ORDER.index("near_dedup")].examples]
    assert all(r.startswith("near-duplicate of first") for r in reasons)


# ---------------------------------------------------------------- contamination


def test_ngram_index_finds_a_planted_eval_item(monkeypatch):
    rng = random.Random(4)
    items = [random_text(rng, 40) for _ in range(50)]
    monkeypatch.setattr(contamination, "CHUNK", 3)  # item and text indices must survive chunking
    index = NgramIndex.from_texts(items, 13)
    quoted = " ".join(items[7].split()[10:23])  # exactly one 13-gram of item 7
    texts = [f"Intro words here. {quoted} and then more.", random_text(rng, 60), " ".join(items[7].split()[10:22]),
             "", items[48].upper() + " " + items[2]]
    assert index.overlaps(texts[0]) == [7]
    assert index.overlaps(texts[1]) == [] and index.overlaps(texts[2]) == []  # 12 words are not a 13-gram
    assert index.overlaps(texts[4]) == [2, 48]
    assert index.overlaps_many(texts) == [index.overlaps(t) for t in texts]
    assert NgramIndex.from_texts(["Too short to index"], 13).overlaps("too short to index") == [0]


def test_contamination_filter_and_eval_files(tmp_path):
    rng = random.Random(5)
    items = [random_text(rng, 30) for _ in range(5)]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps({"question": t, "meta": {"n": 1}}) + "\n"
                                                 for t in items))
    (tmp_path / "eval.txt").write_text("\n\n".join(items[:2]))
    (tmp_path / "eval.json").write_text(json.dumps([{"q": "x", "a": [items[0]]}]))
    texts = load_eval_texts([tmp_path / "eval.jsonl", tmp_path / "eval.txt"])
    assert texts[str(tmp_path / "eval.jsonl")] == items and texts[str(tmp_path / "eval.txt")] == items[:2]
    assert read_eval_texts(tmp_path / "eval.json") == ["x\n" + items[0]]
    records = [rec("Here: " + items[3], "leak_response"), rec(NORMAL, "leak_prompt", prompt=items[4]),
               rec(NORMAL, "clean")]
    result = filter_records(records, only("contamination"), eval_texts=texts)
    assert [r["id"] for r in result.kept] == ["clean"]
    assert "eval.jsonl[3]" in result.filters[FILTER_ORDER.index("contamination")].examples[0]["reason"]
    no_eval = filter_records(records, only("contamination"))
    assert len(no_eval.kept) == 3 and no_eval.filters[FILTER_ORDER.index("contamination")].checked == 0


# ---------------------------------------------------------------- LLM judge


@pytest.mark.parametrize("reply, score", [
    ("Score: 8", 8.0), ("**Score**: 7.5\nGood answer.", 7.5), ("I would give it 9/10.", 9.0),
    ("6 out of 10", 6.0), ("3", 3.0), ("The answer is fine. Score: 11", None), ("No idea.", None),
])
def test_parse_score(reply, score):
    assert parse_score(reply) == score


def test_judge_filter_with_a_scripted_judge():
    replies = {"good": "Score: 9", "bad": "Score: 2", "mumble": "hmm", "edge": "7/10"}
    seen = []

    def judge(conversations):
        seen.append(len(conversations))
        return [replies[c[1]["content"].split("[Answer]\n")[1].split("\n")[0]] for c in conversations]

    records = [rec(key, key) for key in replies]
    spec = only("judge", enabled=True, batch_size=3)
    assert rejected_ids(records, spec, judge=judge) == ["bad", "mumble"]
    assert seen == [3, 1]
    assert rejected_ids(records, only("judge", enabled=True, keep_unparsed=True), judge=judge) == ["bad"]
    with pytest.raises(DistillError, match="no judge model"):
        filter_records(records, spec)
    with pytest.raises(DistillError, match="returned 1 replies for 3"):
        filter_records(records, spec, judge=lambda conversations: ["Score: 9"])


# ---------------------------------------------------------------- the whole pipeline and files


def _mixed_records() -> list[dict]:
    rng = random.Random(6)
    varied = [rec(random_text(rng, 80), f"ok{i}") for i in range(6)]
    return varied + [
        rec(NORMAL, "cut", finish_reason="length"), rec("", "empty"),
        rec("I'm sorry, but I cannot help with that.", "refuse"),
        rec(" ".join(["again and again"] * 20), "loop"),
        rec("It is 5.", "wrong", reference="#### 6"),
        rec(varied[0]["response"], "dup", prompt=varied[0]["prompt"]),
        {"id": "failed1", "status": "failed", "error": "timeout", "prompt": "x"},
    ]


def test_report_counts_add_up():
    records = _mixed_records()
    result = filter_records(records, FilterSpec())
    assert result.total_in == len(records) and result.failed == 1
    assert "failed1" not in {r["id"] for r in result.kept} and result.total_out == 6
    enabled = [s for s in result.filters if s.enabled]
    assert result.total_in - result.failed - sum(s.rejected for s in enabled) == result.total_out
    for before, after in zip(enabled, enabled[1:]):
        assert after.records_in == before.records_in - before.rejected
    assert [s.name for s in result.filters] == list(FILTER_ORDER)
    assert all(len(s.examples) == min(s.rejected, 3) for s in result.filters)
    text = format_filter_report(result)
    assert "refusal" in text and "1 failed" in text and "judge" in text and "off" in text


def test_filter_file_writes_records_and_report(tmp_path):
    src, out = tmp_path / "teacher_data.jsonl", tmp_path / "out" / "filtered.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in _mixed_records()))
    (tmp_path / "eval.txt").write_text(_mixed_records()[1]["response"])
    spec = FilterSpec.model_validate({"contamination": {"eval_files": ["eval.txt"]}})
    result = filter_file(src, out, spec, base_dir=tmp_path)
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in kept] == [r["id"] for r in result.kept] == ["ok0", "ok2", "ok3", "ok4", "ok5"]
    report = json.loads(report_path(out).read_text())
    assert report["total_out"] == 5 and report["failed"] == 1 and report["spec"]["dedup_scope"] == "prompt_response"
    assert report["filters"][FILTER_ORDER.index("contamination")]["rejected"] == 1


def test_bad_input_errors_name_the_line(tmp_path):
    good = json.dumps(rec(NORMAL, "a"))
    cases = {"bad.jsonl": f"{good}\n{{not json\n", "noresp.jsonl": f"{good}\n{json.dumps({'id': 'b'})}\n",
             "list.jsonl": f"{good}\n[1, 2]\n"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DistillError, match=rf"{name}:2"):
            filter_file(tmp_path / name, tmp_path / "out.jsonl", FilterSpec())
        assert not (tmp_path / "out.jsonl").exists()
    with pytest.raises(DistillError, match="file not found"):
        filter_file(tmp_path / "missing.jsonl", tmp_path / "out.jsonl", FilterSpec())
    (tmp_path / "in.jsonl").write_text(good + "\n")
    with pytest.raises(DistillError, match="overwrite the input"):
        filter_file(tmp_path / "in.jsonl", tmp_path / "in.jsonl", FilterSpec())
    with pytest.raises(DistillError, match="record 2: 'response' must be a string"):
        filter_records([rec(NORMAL), {"id": "x", "response": 3}], FilterSpec())


def test_cli_filters_a_records_file_with_set_overrides(tmp_path, capsys):
    from distill.cli import main

    records = [{"id": f"r{i}", "status": "ok", "prompt": f"Question {i}?", "finish_reason": "stop",
                "response": "I'm sorry, but I cannot help with that." if i == 0 else f"Answer number {i} is here."}
               for i in range(4)]
    src = tmp_path / "records.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "kept.jsonl"
    assert main(["filter", str(src), "--out", str(out), "--set", "filter.near_dedup=false"]) == 0
    kept = [json.loads(x)["id"] for x in out.read_text().splitlines()]
    assert kept == ["r1", "r2", "r3"]  # the refusal is gone
    assert "kept 3 of 4 records" in capsys.readouterr().out
    assert main(["filter", str(src), "--out", str(out), "--set", "filter.length.min_words=x"]) == 2
    assert "filter.length.min_words" in capsys.readouterr().err
    assert main(["filter", str(src)]) == 2  # no --out


def test_judge_best_per_prompt_keeps_the_top_answer_of_each_prompt():
    from distill.data.filters import filter_records
    from distill.recipe import FilterSpec

    records = [{"id": f"{p}{k}", "prompt_id": p, "status": "ok", "prompt": f"question {p}", "finish_reason": "stop",
                "response": f"answer {p} {k} with score {score}"}
               for p, ks in (("a", (5, 9, 7)), ("b", (8, 8))) for k, score in enumerate(ks)]
    judge = lambda convs: [f"Score: {c[-1]['content'].split('score ')[-1].split()[0]}" for c in convs]  # noqa: E731
    spec = FilterSpec.model_validate({"near_dedup": False, "exact_dedup": False, "repetition": False,
                                      "judge": {"enabled": True, "threshold": 6, "best_per_prompt": True}})
    kept = filter_records(records, spec, judge=judge).kept
    assert [r["id"] for r in kept] == ["a1", "b0"]  # a: 9 beats 7 (5 is under the threshold); b: first of equals
