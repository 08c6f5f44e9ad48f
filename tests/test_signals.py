"""The top-k teacher cache: encoding, capture (atomic, resumable), provenance and pairing checks, training from it."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.cli import main
from distill.errors import DistillError
from distill.recipe import Recipe, recipe_from_dict
from distill.signals.cache import HEADER, TopKCache, shard_name
from distill.stages import capture
from distill.signals.encoding import LOG_FLOOR, Codec, TopKRows
from distill.stages.training import open_recipe_cache
from conftest import logged_steps, tiny_recipe

TINY_VOCAB = 320


# ---------------------------------------------------------------- encoding


def _rows(n: int, k: int, vocab: int, seed: int = 0, zipf: float = 0.0, spread: float = 4.0) -> TopKRows:
    """Top-k rows of random peaked distributions, as capture produces them; `zipf` favours low ids like real text."""
    g = torch.Generator().manual_seed(seed)
    prior = -zipf * torch.log(torch.arange(1, vocab + 1, dtype=torch.float64))
    lp = torch.log_softmax(torch.randn(n, vocab, generator=g, dtype=torch.float64) * spread + prior, dim=1)
    top, ids = lp.topk(k, dim=1)
    tail = lp.scatter(1, ids, float("-inf")).logsumexp(dim=1)
    return TopKRows(ids.numpy(), top.float().numpy(), tail.float().numpy())


@pytest.mark.parametrize("vocab", [2, 300, 512, 49152, 70000])
def test_codec_round_trips_ids_exactly_and_log_probs_within_half_a_step(vocab):
    k = min(8, vocab)
    rows = _rows(30, k, vocab, seed=vocab)
    quantized, exact = Codec(vocab, k, 1 / 16), Codec(vocab, k, None)
    back = quantized.decode(quantized.encode(rows), 30)
    assert np.array_equal(back.ids, rows.ids)
    half_step = quantized.grid.half_step(rows.log_probs)  # 1/32 nat where p >= 1/(4k), coarser below
    assert (np.abs(back.log_probs - np.maximum(rows.log_probs, LOG_FLOOR)) <= half_step + 1e-6).all()
    assert np.abs(back.tail - np.maximum(rows.tail, LOG_FLOOR)).max() <= 1 / 32 + 1e-6
    lossless = exact.decode(exact.encode(rows), 30)
    assert np.array_equal(lossless.ids, rows.ids) and np.array_equal(lossless.log_probs, rows.log_probs)


def test_quantization_adds_under_1e3_nats_of_kl_and_packs_under_2_bytes_per_entry():
    k, vocab = 64, 49152
    rows = _rows(200, k, vocab, seed=1, zipf=1.2, spread=2.0)  # ids concentrated on frequent tokens, like a teacher's
    codec = Codec(vocab, k, 1 / 16)
    blob = codec.encode(rows)
    back = codec.decode(blob, 200)
    exact = np.concatenate([rows.log_probs, rows.tail[:, None]], 1).astype(np.float64)
    approx = np.concatenate([back.log_probs, back.tail[:, None]], 1).astype(np.float64)
    renorm = lambda x: x - np.log(np.exp(x).sum(1, keepdims=True))  # noqa: E731
    p, q = renorm(exact), renorm(approx)
    kl = (np.exp(p) * (p - q)).sum(1)
    assert kl.max() < 1e-3
    assert len(blob) / (200 * k) < 2.0  # bytes per kept entry, ids included


def test_codec_refuses_bad_rows():
    codec = Codec(100, 3)
    good = _rows(4, 3, 100)
    with pytest.raises(ValueError, match="sorted"):
        codec.encode(TopKRows(good.ids, good.log_probs[:, ::-1].copy(), good.tail))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        codec.encode(TopKRows(good.ids + 100, good.log_probs, good.tail))
    with pytest.raises(ValueError, match="expected 40 bytes|blob holds"):
        codec.decode(codec.encode(good), 5)


def _peaky_rows(n: int, k: int, vocab: int, seed: int) -> tuple[TopKRows, np.ndarray]:
    """Peaked rows and the token each predicts (its label): at rank 0 in 60% of rows, as under teacher forcing,
    at another rank in 25%, outside the top-k in the rest."""
    rows = _rows(n, k, vocab, seed=seed, zipf=1.0)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, vocab, n)
    place = rng.choice(3, n, p=[0.6, 0.25, 0.15])
    for i in range(n):
        row = rows.ids[i]
        if place[i] == 2:
            while labels[i] in row:
                labels[i] = rng.integers(0, vocab)
            continue
        rank = 0 if place[i] == 0 or k == 1 else rng.integers(1, k)
        if labels[i] in row:  # keep the ids distinct: swap it into place
            row[row == labels[i]] = row[rank]
        row[rank] = labels[i]
    return rows, labels


def _assert_close(codec: Codec, back: TopKRows, rows: TopKRows) -> None:
    assert np.array_equal(back.ids, rows.ids)
    error = np.abs(back.log_probs - np.maximum(rows.log_probs, LOG_FLOOR))
    assert (error <= codec.grid.half_step(rows.log_probs) + 1e-6).all()
    assert (np.abs(back.tail - np.maximum(rows.tail, LOG_FLOOR)) <= codec.step / 2 + 1e-6).all()


@pytest.mark.parametrize("k", [1, 8, 64])
def test_codec_round_trips_groups_of_random_and_label_dominated_rows(k):
    from distill.signals.encoding import IdTable

    vocab = 5000
    peaky = [_peaky_rows(n, k, vocab, seed=n) for n in (40, 0, 25)]
    group = [rows for rows, _ in peaky] + [_rows(30, k, vocab, seed=3, zipf=1.0)]
    tokens = [labels for _, labels in peaky] + [None]  # the last example was written without its next tokens
    ranks = np.concatenate([np.nonzero(r.ids == t[:, None])[1] for r, t in zip(group[:3], tokens[:3])])
    assert (ranks == 0).mean() > 0.5 and (k == 1 or (ranks > 0).any()) and len(ranks) < 65  # 65 rows in all
    codec, table = Codec(vocab, k), IdTable.of([r.ids for r in group])
    sizes = [len(r) for r in group]
    for with_table in (table, None):
        blob = codec.encode(group, with_table, tokens)
        for member, (rows, labels) in enumerate(zip(group, tokens)):
            _assert_close(codec, codec.decode(blob, sizes, with_table, labels, member=member), rows)
    exact = Codec(vocab, k, None)
    blob = exact.encode(group, table, tokens)
    back = exact.decode(blob, sizes, table, tokens[0], member=0)
    assert np.array_equal(back.ids, group[0].ids) and np.array_equal(back.log_probs, group[0].log_probs)
    with pytest.raises(ValueError, match="next tokens"):
        codec.decode(codec.encode(group, table, tokens), sizes, table, None, member=0)
    rows = group[0]
    labels = rows.ids[:, 0]  # every top-1 is the label: the writer's table (labels left out) may be empty
    label_free = IdTable.of([rows.ids[rows.ids != labels[:, None]]])
    _assert_close(codec, codec.decode(codec.encode(rows, label_free, labels), len(rows), label_free, labels), rows)


def test_next_tokens_make_label_dominated_rows_smaller():
    rows, labels = _peaky_rows(400, 8, 8192, seed=5)
    codec = Codec(8192, 8)
    kept = int((rows.ids == labels[:, None]).sum())
    assert kept > 300 and len(codec.encode(rows, None, labels)) < len(codec.encode(rows)) - kept // 2


@pytest.mark.parametrize("k", [8, 32, 128])
def test_coarser_steps_for_rare_tokens_keep_kl_under_1e3_nats(k):
    """The grid doubles its step twice below p = 1/(4k): the worst case is step^2 / 4 = 9.8e-4 nats."""
    rows = _rows(200, k, 8192, seed=k, zipf=1.0, spread=1.0)  # flat rows: many entries in the coarse segments
    codec = Codec(8192, k)
    back = codec.decode(codec.encode(rows), len(rows))
    renorm = lambda x: x - np.logaddexp.reduce(x, axis=1, keepdims=True)  # noqa: E731
    p = renorm(np.concatenate([rows.log_probs, rows.tail[:, None]], 1).astype(np.float64))
    q = renorm(np.concatenate([back.log_probs, back.tail[:, None]], 1).astype(np.float64))
    kl = (np.exp(p) * (p - q)).sum(1)
    coarse = rows.log_probs < -math.log(4 * k)
    assert coarse.mean() > 0.3 and (codec.grid.half_step(rows.log_probs[coarse]) > 1 / 32).all()
    assert kl.max() < 1e-3


def test_the_cache_groups_small_examples_into_blobs_and_reads_each_back(tmp_path):
    from distill.signals.cache import CacheHeader, TopKCacheWriter, blob_groups, example_hash

    k, vocab = 8, 3000
    examples = [_peaky_rows(n, k, vocab, seed=i) for i, n in enumerate([600, 20, 0, 90, 700, 5, 60])]
    labels = [np.concatenate([[-100], t]).tolist() for _, t in examples]  # row i predicts labels[i + 1]
    input_ids = [[0] * len(x) for x in labels]
    hashes = [example_hash(i, x) for i, x in zip(input_ids, labels)]
    header = CacheHeader(teacher="t", teacher_weights="w", tokenizer="-", chat_template="-", vocab_size=vocab, k=k,
                         step=1 / 16, compressor="lzma2", dataset="-", n_examples=len(examples), shard_examples=4)
    writer = TopKCacheWriter(tmp_path, header)
    for i, (rows, _) in enumerate(examples):
        writer.add(i, hashes[i], rows, labels[i])
    assert blob_groups([600, 20, 0, 90], k) == [range(0, 1), range(1, 4)]  # 4800 entries, then the rest
    cache = TopKCache(tmp_path)
    cache.verify(hashes)
    assert [len(set(cache._indexes[s]["offsets"])) for s in (0, 1)] == [2, 2]
    for i, (rows, _) in enumerate(examples):
        _assert_close(cache.codec, cache.rows(i, hashes[i], labels[i]), rows)


def test_a_version_1_cache_is_refused_with_a_clear_line(tmp_path):
    from distill.signals.cache import CacheHeader, TopKCacheWriter, example_hash

    rows, tokens = _peaky_rows(10, 4, 100, seed=0)
    labels = [-100] + tokens.tolist()
    header = CacheHeader(teacher="t", teacher_weights="w", tokenizer="-", chat_template="-", vocab_size=100, k=4,
                         step=1 / 16, compressor="lzma2", dataset="-", n_examples=1, shard_examples=4)
    TopKCacheWriter(tmp_path, header).add(0, example_hash([0] * 11, labels), rows, labels)
    shard = tmp_path / shard_name(0)
    shard.write_bytes(b"DTKC\x01" + shard.read_bytes()[5:])  # a version 1 shard under a current header
    with pytest.raises(DistillError, match=r"shard_00000\.bin: a shard of encoding version 1 \(this distill reads "
                                           r"version 2\); capture the cache again"):
        TopKCache(tmp_path).verify([example_hash([0] * 11, labels)])
    (tmp_path / HEADER).write_text(json.dumps({**header.to_json(), "encoding_version": 1}))
    with pytest.raises(DistillError, match=r"encoding version 1 is not supported \(this distill reads version 2\); "
                                           "capture the cache again"):
        TopKCache(tmp_path)


# ---------------------------------------------------------------- capture + training


def _recipe(tmp_path: Path, teacher_dir: Path, data: Path, name: str = "r", **teacher) -> Recipe:
    spec = tiny_recipe(tmp_path / name, teacher_dir, data, teacher={"cache": str(tmp_path / "cache"), **teacher})
    return recipe_from_dict(spec)


def _encoded(recipe):
    from distill.stages.data import recipe_examples
    from distill.data.tokenize import encode_all
    from distill.stages.facts import teacher_tokenizer

    tok = teacher_tokenizer(recipe)
    return tok, encode_all(recipe_examples(recipe)[0], tok, recipe.data.max_length)


def test_full_vocab_cache_gives_the_online_loss_and_gradients(tmp_path, tiny_teacher_dir, pairs_jsonl):
    from distill.data.tokenize import batch_indices, collate
    from distill.models import load_model
    from distill.signals.teacher_signal import CachedTeacher, LiveTeacher
    from distill.stages.training import batch_objective
    from distill.training.step import loss_on_batch

    recipe = _recipe(tmp_path, tiny_teacher_dir, pairs_jsonl, cache_k=TINY_VOCAB, cache_exact=True)
    capture(recipe, progress=False, shard_examples=5)
    tok, encoded = _encoded(recipe)
    cached = open_recipe_cache(recipe, tok, encoded)
    teacher = load_model(str(tiny_teacher_dir)).eval().requires_grad_(False)
    student = load_model(str(tiny_teacher_dir))  # any student on the same vocabulary
    for m in student.modules():  # move it away from the teacher so the KD term is not ~0
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.05, generator=torch.Generator().manual_seed(2))
    idx = batch_indices(len(encoded), 4, 0, 1)
    batch = collate([encoded[i] for i in idx], tok.pad_token_id)
    online = loss_on_batch(student, LiveTeacher(teacher), batch, batch_objective(recipe.method))
    online_grads = torch.autograd.grad(online.loss, list(student.parameters()))
    sparse = loss_on_batch(student, CachedTeacher(cached), batch, batch_objective(recipe.method), indices=idx)
    sparse_grads = torch.autograd.grad(sparse.loss, list(student.parameters()))
    assert online.kd.item() > 1e-3
    assert sparse.loss.item() == pytest.approx(online.loss.item(), rel=1e-5, abs=1e-6)
    for a, b in zip(online_grads, sparse_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_live_and_cached_signals_take_the_same_loss_call_and_the_cache_runs_no_model(
    cached_recipe, tiny_teacher_dir, tiny_student_dir
):
    from dataclasses import fields

    from distill.data.tokenize import batch_indices, collate
    from distill.models import load_model
    from distill.signals.teacher_signal import CachedTeacher, LiveTeacher
    from distill.stages.training import batch_objective
    from distill.training.step import loss_on_batch

    tok, encoded = _encoded(cached_recipe)
    teacher = load_model(str(tiny_teacher_dir)).eval().requires_grad_(False)
    student = load_model(str(tiny_student_dir))
    teacher_runs: list[int] = []
    teacher.register_forward_pre_hook(lambda *_: teacher_runs.append(1))
    teacher.model.register_forward_pre_hook(lambda *_: teacher_runs.append(1))  # the body alone, as the loss runs it
    cached = CachedTeacher(open_recipe_cache(cached_recipe, tok, encoded))
    # The cached signal holds a reader (cache, hashes, labels) and nothing that could run a teacher.
    assert [f.name for f in fields(cached)] == ["reader"]
    assert not any(isinstance(v, torch.nn.Module) for v in vars(cached.reader).values())
    idx = batch_indices(len(encoded), 4, 0, 0)
    batch = collate([encoded[i] for i in idx], tok.pad_token_id)
    runs, outs = {}, {}
    for signal in (LiveTeacher(teacher), cached):
        teacher_runs.clear()
        objective = batch_objective(cached_recipe.method)
        outs[type(signal).__name__] = out = loss_on_batch(student, signal, batch, objective, indices=idx)
        out.loss.backward()
        runs[type(signal).__name__] = len(teacher_runs)
    assert runs == {"LiveTeacher": 1, "CachedTeacher": 0}
    live, from_cache = outs["LiveTeacher"], outs["CachedTeacher"]
    assert live.n_tokens == from_cache.n_tokens > 0 and live.ce.item() == pytest.approx(from_cache.ce.item())
    # Top-16 of 320 tokens plus a tail bucket coarsens both distributions, which can only lower a KL.
    assert 0 < from_cache.kd.item() < live.kd.item()
    with pytest.raises(DistillError, match="needs the batch's example indices"):
        loss_on_batch(student, cached, batch, batch_objective(cached_recipe.method))


def test_capture_resumes_after_a_kill_and_writes_the_same_cache(tmp_path, tiny_teacher_dir, pairs_jsonl):
    whole = _recipe(tmp_path / "a", tiny_teacher_dir, pairs_jsonl, cache_k=8)
    stats = capture(whole, progress=False, shard_examples=4)
    killed = _recipe(tmp_path / "b", tiny_teacher_dir, pairs_jsonl, cache_k=8)
    partial = capture(killed, progress=False, shard_examples=4, stop_after_shards=2)
    assert partial.new_shards == 2 and len(list((tmp_path / "b" / "cache").glob("shard_*.bin"))) == 2
    resumed = capture(killed, progress=False, shard_examples=4)
    assert resumed.skipped_shards == 2 and resumed.new_shards == stats.new_shards - 2
    for shard in range(stats.new_shards):
        a = (tmp_path / "a" / "cache" / shard_name(shard)).read_bytes()
        assert a == (tmp_path / "b" / "cache" / shard_name(shard)).read_bytes()
    assert not list((tmp_path / "b" / "cache").glob(".*tmp"))  # no temp file left behind
    with pytest.raises(DistillError, match="captured with a different k "):
        capture(_recipe(tmp_path / "b", tiny_teacher_dir, pairs_jsonl, cache_k=9), progress=False, shard_examples=4)


@pytest.fixture()
def cached_recipe(tmp_path, tiny_teacher_dir, pairs_jsonl):
    recipe = _recipe(tmp_path, tiny_teacher_dir, pairs_jsonl, cache_k=16)
    capture(recipe, progress=False, shard_examples=6)
    return recipe


def _refused(recipe, match: str) -> None:
    tok, encoded = _encoded(recipe)
    with pytest.raises(DistillError, match=match):
        open_recipe_cache(recipe, tok, encoded)


def test_corrupted_truncated_and_missing_shards_are_refused(cached_recipe, tmp_path):
    cache = tmp_path / "cache"
    shard = cache / shard_name(1)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x40
    shard.write_bytes(bytes(data))
    _refused(cached_recipe, r"shard_00001\.bin: checksum mismatch")
    shard.write_bytes(bytes(data[: len(data) // 3]))
    _refused(cached_recipe, r"shard_00001\.bin: checksum mismatch")
    shard.unlink()
    _refused(cached_recipe, r"shard_00001\.bin: shard missing")
    (cache / HEADER).unlink()
    _refused(cached_recipe, r"no teacher cache here")


def test_a_blob_corrupted_after_verification_is_refused_on_read(cached_recipe, tmp_path):
    tok, encoded = _encoded(cached_recipe)
    cached = open_recipe_cache(cached_recipe, tok, encoded)
    shard = tmp_path / "cache" / shard_name(0)
    entry = cached.cache._indexes[0]
    data = bytearray(shard.read_bytes())
    data[entry["payload_start"] + entry["offsets"][2] + 3] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(DistillError, match="example 2 is corrupted"):
        cached.targets([2])


def test_cache_from_other_data_teacher_or_tokenizer_is_refused(cached_recipe, tmp_path, tiny_teacher_dir,
                                                                 pairs_jsonl, tiny_student_dir):
    other = tmp_path / "other.jsonl"
    rows = [json.loads(x) for x in pairs_jsonl.read_text().splitlines()]
    rows[7]["response"] = "Something else entirely."
    other.write_text("".join(json.dumps(r) + "\n" for r in rows))
    changed = _recipe(tmp_path, tiny_teacher_dir, other, cache_k=16)
    _refused(changed, r"shard_0000\d\.bin: example \d+'s token ids differ")
    fewer = tmp_path / "fewer.jsonl"
    fewer.write_text("".join(json.dumps(r) + "\n" for r in rows[:10]))
    _refused(_recipe(tmp_path, tiny_teacher_dir, fewer, cache_k=16),
             r"holds \d+ examples but the recipe's training data has \d+")
    _refused(_recipe(tmp_path, tiny_student_dir, pairs_jsonl), "different teacher")
    header = json.loads((tmp_path / "cache" / HEADER).read_text())
    header["tokenizer"] = "0" * 32
    (tmp_path / "cache" / HEADER).write_text(json.dumps(header))
    _refused(cached_recipe, "different tokenizer")
    (tmp_path / "cache" / HEADER).write_text(json.dumps({**header, "encoding_version": 99}))
    _refused(cached_recipe, "encoding version 99 is not supported")
    (tmp_path / "cache" / HEADER).write_text("[1, 2]")
    _refused(cached_recipe, "not a distill teacher-cache header")


def test_training_from_the_cache_never_loads_the_teacher_and_resumes_exactly(
        cached_recipe, tmp_path, tiny_teacher_dir, pairs_jsonl, monkeypatch):
    from distill.stages import facts
    from distill.stages import train

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher's weights were loaded")

    monkeypatch.setattr(facts, "load_model", no_teacher)
    student = {"model": str(tiny_teacher_dir), "config": None}  # an existing student: nothing built from the teacher
    whole = recipe_from_dict(tiny_recipe(tmp_path / "w", tiny_teacher_dir, pairs_jsonl, student=student,
                                         teacher={"cache": str(tmp_path / "cache"), "cache_k": 16}))
    train(whole, progress=False)
    split = recipe_from_dict(tiny_recipe(tmp_path / "s", tiny_teacher_dir, pairs_jsonl, student=student,
                                         teacher={"cache": str(tmp_path / "cache"), "cache_k": 16},
                                         train={"checkpoint_every": 100}))
    assert train(split, progress=False, stop_after=3) is None
    train(split, progress=False)
    losses = lambda d: [r["loss"] for r in logged_steps(d)]  # noqa
    a, b = losses(tmp_path / "w"), losses(tmp_path / "s")
    assert len(a) == 6 and all(math.isfinite(x) for x in a)
    assert b == pytest.approx(a, rel=1e-5)
    assert a[-1] < a[0]


def test_bf16_compute_trains_from_the_cache(cached_recipe, tmp_path, tiny_teacher_dir, pairs_jsonl):
    from distill.stages import train

    recipe = recipe_from_dict(tiny_recipe(tmp_path / "bf16", tiny_teacher_dir, pairs_jsonl,
                                          teacher={"cache": str(tmp_path / "cache"), "cache_k": 16},
                                          train={"dtype": "bfloat16", "steps": 2}))
    train(recipe, progress=False)
    rows = logged_steps(tmp_path / "bf16")
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) and r["kd"] > 0 for r in rows)


def test_hidden_kd_with_a_cache_is_refused(cached_recipe, tmp_path, tiny_teacher_dir, pairs_jsonl):
    from distill.stages import train

    recipe = recipe_from_dict(tiny_recipe(tmp_path / "h", tiny_teacher_dir, pairs_jsonl,
                                          teacher={"cache": str(tmp_path / "cache")}, method={"hidden": {}}))
    with pytest.raises(DistillError, match="method.hidden: .* teacher.cache"):
        train(recipe, progress=False)


@pytest.fixture()
def cli_logging():
    """The CLI points the distill logger at this test's captured stderr; detach it afterwards."""
    yield
    logging.getLogger("distill").handlers.clear()


def test_cli_capture_then_refuses_bad_inputs_with_exit_2(tmp_path, tiny_teacher_dir, pairs_jsonl, capsys,
                                                         cli_logging):
    import yaml

    spec = tiny_recipe(tmp_path / "r", tiny_teacher_dir, pairs_jsonl, teacher={"cache": "cache", "cache_k": 4096})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["capture", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"distill: error: teacher.cache_k: 4096 is larger than the teacher's vocabulary ({TINY_VOCAB})"
    assert not (tmp_path / "cache").exists()
    assert main(["train", str(path), "--no-progress", "--set", "teacher.cache_k=8"]) == 2
    assert "no teacher cache here" in capsys.readouterr().err
    assert not (tmp_path / "r" / "checkpoints").exists()
    assert main(["capture", str(path), "--no-progress", "--set", "teacher.cache_k=8"]) == 0
    assert "teacher cache:" in capsys.readouterr().out
    assert TopKCache(tmp_path / "cache").header.k == 8
    assert main(["train", str(path), "--no-progress", "--set", "teacher.cache_k=8"]) == 0


# ---------------------------------------------------------------- real model


def _eval_kl(student_dir: Path, teacher, batches) -> float:
    """Mean forward KL(teacher || student) per trained token on held-out batches, on full logits."""
    from distill.models import load_model

    student = load_model(str(student_dir)).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            mask = batch["labels"][:, 1:] != -100
            t = torch.log_softmax(teacher(batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1)
            s = torch.log_softmax(student(batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1)
            t, s = t[:, :-1][mask], s[:, :-1][mask]
            total += float((t.exp() * (t - s)).sum())
            count += int(mask.sum())
    return total / count


@pytest.mark.slow
def test_top64_cache_trains_stories260k_as_well_as_online_kd(tmp_path):
    from conftest import STORIES260K, require_shared, tinystories_split
    from distill.data.examples import read_examples
    from distill.data.tokenize import collate, encode_all
    from distill.models import load_model, load_tokenizer
    from distill.stages import train

    require_shared(STORIES260K)
    train_file, held_out_file = tinystories_split(tmp_path, train=96, held_out=32)
    spec = {
        "seed": 0, "teacher": {"model": str(STORIES260K)},
        "student": {"config": {"num_layers": 2, "hidden_size": 32, "num_heads": 4, "num_kv_heads": 2,
                               "intermediate_size": 96}, "init_embeddings": "random"},
        "data": {"train": str(train_file), "max_length": 64, "eval_fraction": 0.0},
        "method": {"kind": "kd", "divergence": "forward_kl", "alpha": 0.1, "temperature": 1.0},
        "train": {"steps": 30, "batch_size": 8, "lr": 1e-2, "warmup_steps": 5, "checkpoint_every": 1000,
                  "log_every": 20, "threads": 2},
    }
    online = recipe_from_dict({**spec, "output_dir": str(tmp_path / "online")})
    cached = recipe_from_dict({**spec, "output_dir": str(tmp_path / "cached"),
                               "teacher": {**spec["teacher"], "cache": str(tmp_path / "cache"), "cache_k": 64}})
    capture(cached, progress=False)
    train(online, progress=False)
    train(cached, progress=False)
    tokenizer = load_tokenizer(str(STORIES260K))
    encoded = encode_all(read_examples(held_out_file), tokenizer, 64, None)
    batches = [collate(encoded[i:i + 16], tokenizer.pad_token_id) for i in range(0, len(encoded), 16)]
    teacher = load_model(str(STORIES260K)).eval()
    kl_online = _eval_kl(tmp_path / "online" / "student", teacher, batches)
    kl_cached = _eval_kl(tmp_path / "cached" / "student", teacher, batches)
    print(f"eval KL to the teacher: online {kl_online:.4f}, top-64 cache {kl_cached:.4f}")
    assert abs(kl_cached - kl_online) <= 0.02 * kl_online, (kl_online, kl_cached)
