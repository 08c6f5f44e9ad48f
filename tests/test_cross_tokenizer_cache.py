"""The top-k teacher cache across tokenizers: rows on the teacher's own tokenization of each training text (each
keeping its label), made whole by spreading the tail; with k = the teacher's vocabulary the cached loss is the
live teacher's (values and gradients); capture resumes, and a cache aligned to another tokenizer is refused."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import STORIES260K, logged_steps, require_shared, tiny_recipe
from test_cross_tokenizer_losses import make_groups, random_groups

from distill.cli import main
from distill.errors import DistillError
from distill.losses.cross_tokenizer import (
    SparseTeacherRows,
    cross_tokenizer_loss,
    cross_tokenizer_loss_chunked,
    cross_tokenizer_loss_on_rows,
    vocab_split,
)
from distill.recipe import load_recipe
from distill.signals.cache import shard_name
from distill.signals.capture import top_k_rows
from distill.signals.cross_tokenizer import CachedCrossTokenizerTeacher, CrossTokenizerTeacher
from distill.stages import capture
from distill.stages.training import batch_objective, setup, train
from distill.training.step import loss_on_batch

TINY_VOCAB = 320  # the fixture teacher's tokenizer


# ---------------------------------------------------------------- sparse rows in the loss


def random_case(seed: int, mode: str):
    vs, vt, ds, dt = 13, 19, 8, 6
    labels, s_groups, t_groups, rng = random_groups(seed, 36, 50, vs, vt)
    teacher_tokens_of = [rng.randrange(vt) for _ in range(50)]
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(36, ds, generator=g, dtype=torch.float64, requires_grad=True)
    head = torch.randn(vs, ds, generator=g, dtype=torch.float64, requires_grad=True)
    t_hidden = torch.randn(50, dt, generator=g, dtype=torch.float64) * 2
    t_head = torch.randn(vt, dt, generator=g, dtype=torch.float64)
    split = vocab_split(vs, vt, [1, 4, 6], [2, 0, 11]) if mode == "align" else vocab_split(vs, vt)
    return hidden, head, t_hidden, t_head, labels, make_groups(s_groups, t_groups, teacher_tokens_of), split, \
        torch.tensor(teacher_tokens_of)


@pytest.mark.parametrize("mode", ["uld", "align"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_rows_of_the_whole_vocabulary_give_the_live_loss_and_gradients(mode, temperature):
    hidden, head, t_hidden, t_head, labels, groups, split, _ = random_case(7, mode)
    lp = (t_hidden @ t_head.t()).log_softmax(-1)
    values, ids = lp.sort(dim=1, descending=True)
    rows = SparseTeacherRows(ids, values, torch.full((50,), -math.inf, dtype=torch.float64), t_head.size(0))
    settings = dict(divergence="forward_kl", temperature=temperature, alpha=0.3, chunk_size=5, top_k=7)
    live = cross_tokenizer_loss_chunked(hidden, head, t_hidden, t_head, labels, groups, split, **settings)
    cached = cross_tokenizer_loss_on_rows(hidden, head, rows, labels, groups, split, **settings)
    for a, b in [(cached.loss, live.loss), *zip(torch.autograd.grad(cached.loss, (hidden, head)),
                                                torch.autograd.grad(live.loss, (hidden, head)))]:
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert live.kd > 1e-3


def test_whole_rows_spread_the_tail_uniformly_over_the_ids_not_kept():
    g = torch.Generator().manual_seed(1)
    lp = torch.randn(6, 30, generator=g, dtype=torch.float64).mul(2).log_softmax(-1)
    values, ids = lp.topk(4, dim=1)
    tail = lp.scatter(1, ids, -math.inf).logsumexp(1)
    whole = SparseTeacherRows(ids, values, tail, 30).whole()
    for r in range(6):
        kept = set(ids[r].tolist())
        for v in range(30):
            expected = lp[r, v] if v in kept else math.log(tail[r].exp().item() / 26)
            assert whole[r, v].item() == pytest.approx(float(expected), abs=1e-12)
    torch.testing.assert_close(whole.logsumexp(1), torch.zeros(6, dtype=torch.float64))


@pytest.mark.parametrize("mode", ["uld", "align"])
def test_small_k_rows_are_the_loss_on_their_whole_rows(mode):
    """With k < V the cached loss is the naive loss on the whole rows (tail spread), chunked or not."""
    hidden, head, t_hidden, t_head, labels, groups, split, tokens = random_case(3, mode)
    kept = top_k_rows(t_hidden.float(), t_head.float(), 5, chunk_size=7, labels=tokens)
    rows = SparseTeacherRows(*(torch.from_numpy(a).to(torch.float64) if a.dtype.kind == "f" else torch.from_numpy(a)
                               for a in (kept.ids, kept.log_probs, kept.tail)), t_head.size(0))
    settings = {"divergence": "jsd", "temperature": 1.5, "alpha": 0.4, "top_k": 6}
    naive = cross_tokenizer_loss(hidden @ head.t(), rows.whole(), labels, groups, split, **settings)
    cached = cross_tokenizer_loss_on_rows(hidden, head, rows, labels, groups, split, chunk_size=4, **settings)
    torch.testing.assert_close(cached.loss, naive.loss, rtol=1e-10, atol=1e-12)
    live = cross_tokenizer_loss_chunked(hidden, head, t_hidden, t_head, labels, groups, split, **settings)
    assert cached.kd.item() == pytest.approx(live.kd.item(), rel=0.5)  # top-5 of 19: near, not equal


def test_top_k_rows_keep_each_label_and_stay_sorted():
    g = torch.Generator().manual_seed(0)
    hidden, head = torch.randn(40, 8, generator=g), torch.randn(50, 8, generator=g)
    labels = torch.randint(0, 50, (40,), generator=g)
    rows = top_k_rows(hidden, head, 3, chunk_size=9, labels=labels)
    lp = (hidden @ head.t()).log_softmax(-1)
    plain = top_k_rows(hidden, head, 3, chunk_size=9)
    moved = 0
    for r in range(40):
        ids = rows.ids[r].tolist()
        assert int(labels[r]) in ids and list(rows.log_probs[r]) == sorted(rows.log_probs[r], reverse=True)
        assert rows.log_probs[r].tolist() == pytest.approx(lp[r, ids].tolist(), abs=1e-5)
        rest = torch.ones(50, dtype=torch.bool)
        rest[ids] = False
        assert rows.tail[r] == pytest.approx(lp[r, rest].logsumexp(0).item(), abs=1e-5)
        moved += ids != plain.ids[r].tolist()
    assert 0 < moved < 40  # a label outside the top-3 took the third place


# ---------------------------------------------------------------- capture + training on tiny models


def cross_recipe(tmp_path: Path, teacher_dir: Path, student_dir: Path, data: Path, mode: str, name: str = "run",
                 **teacher) -> Path:
    spec = tiny_recipe(tmp_path / name, teacher_dir, data, method={"cross_tokenizer": mode, "uld_top_k": 64},
                       teacher=teacher)
    spec["student"] = {"model": str(student_dir)}
    spec["train"]["steps"] = 2
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("mode", ["uld", "align"])
def test_full_vocab_cache_gives_the_live_loss_and_trains_without_the_teacher(
    tmp_path, tiny_teacher_dir, sp_student_dir, pairs_jsonl, mode, monkeypatch
):
    cache = tmp_path / "cache"
    cached_path = cross_recipe(tmp_path, tiny_teacher_dir, sp_student_dir, pairs_jsonl, mode, cache=str(cache),
                               cache_k=TINY_VOCAB, cache_exact=True)
    live_path = cross_recipe(tmp_path, tiny_teacher_dir, sp_student_dir, pairs_jsonl, mode, name="live")
    stats = capture(load_recipe(cached_path), progress=False, shard_examples=5)
    assert stats.new_shards == 5 and stats.examples == 21 and stats.positions > 100
    live, _ = setup(load_recipe(live_path), None)
    import distill.stages.training as training_stage

    monkeypatch.setattr(training_stage, "load_teacher", lambda *a, **k: pytest.fail("the teacher was loaded"))
    cached_recipe = load_recipe(cached_path)
    cached, _ = setup(cached_recipe, None)
    assert isinstance(cached.signal, CachedCrossTokenizerTeacher) and isinstance(live.signal, CrossTokenizerTeacher)
    objective = batch_objective(cached_recipe.method)
    student = cached.student
    for m in student.modules():  # away from its random init so the KD term is not tiny
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.2, generator=torch.Generator().manual_seed(2))
    params = [p for p in student.parameters() if p.requires_grad]
    indices = [0, 5, 9, 13]
    batch = cached.to_batch([cached.items[i] for i in indices], cached.pad_id)
    outs = {}
    for name, signal in (("cached", cached.signal), ("live", live.signal)):
        loss = loss_on_batch(student, signal, batch, objective, indices=indices)
        outs[name] = loss, torch.autograd.grad(loss.loss, params)
    (c, c_grads), (v, v_grads) = outs["cached"], outs["live"]
    assert v.kd.item() > 1e-3 and c.n_tokens == v.n_tokens
    assert c.loss.item() == pytest.approx(v.loss.item(), rel=1e-5, abs=1e-6)
    assert c.kd.item() == pytest.approx(v.kd.item(), rel=1e-5, abs=1e-6)
    for a, b in zip(c_grads, v_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    result = train(cached_recipe, progress=False)
    assert result.steps == 2 and all(r["kd"] > 0 and math.isfinite(r["loss"]) for r in logged_steps(tmp_path / "run"))


def test_small_k_cache_is_close_to_the_live_loss(tmp_path, tiny_teacher_dir, sp_student_dir, pairs_jsonl):
    cached_path = cross_recipe(tmp_path, tiny_teacher_dir, sp_student_dir, pairs_jsonl, "align",
                               cache=str(tmp_path / "cache"), cache_k=32)
    live_path = cross_recipe(tmp_path, tiny_teacher_dir, sp_student_dir, pairs_jsonl, "align", name="live")
    capture(load_recipe(cached_path), progress=False)
    recipe = load_recipe(cached_path)
    cached, live = setup(recipe, None)[0], setup(load_recipe(live_path), None)[0]
    indices = list(range(8))
    batch = cached.to_batch([cached.items[i] for i in indices], cached.pad_id)
    objective = batch_objective(recipe.method)
    with torch.no_grad():
        c = loss_on_batch(cached.student, cached.signal, batch, objective, indices=indices)
        v = loss_on_batch(cached.student, live.signal, batch, objective, indices=indices)
    assert c.ce.item() == pytest.approx(v.ce.item(), rel=1e-6)
    # top-32 of 320 entries, quantized to 1/16 nat: the KD term within a few percent (docs/cross_tokenizer.md)
    assert c.kd.item() == pytest.approx(v.kd.item(), rel=0.05) and c.kd.item() != v.kd.item()


def test_capture_resumes_and_a_cache_aligned_elsewhere_is_refused(tmp_path, tiny_teacher_dir, sp_student_dir,
                                                                  tiny_student_dir, pairs_jsonl):
    whole = load_recipe(cross_recipe(tmp_path, tiny_teacher_dir, sp_student_dir, pairs_jsonl, "uld",
                                     cache=str(tmp_path / "a"), cache_k=8))
    killed = load_recipe(cross_recipe(tmp_path, tiny_teacher_dir, sp_student_dir, pairs_jsonl, "uld", name="b",
                                      cache=str(tmp_path / "b"), cache_k=8))
    stats = capture(whole, progress=False, shard_examples=4)
    assert capture(killed, progress=False, shard_examples=4, stop_after_shards=2).new_shards == 2
    resumed = capture(killed, progress=False, shard_examples=4)
    assert resumed.skipped_shards == 2 and resumed.new_shards == stats.new_shards - 2
    for shard in range(stats.new_shards):
        assert (tmp_path / "a" / shard_name(shard)).read_bytes() == (tmp_path / "b" / shard_name(shard)).read_bytes()
    # the same cache for a student on the teacher's tokenizer: its rows are aligned to the other tokenizer
    same = tiny_recipe(tmp_path / "same", tiny_teacher_dir, pairs_jsonl, teacher={"cache": str(tmp_path / "a"),
                                                                                  "cache_k": 8})
    same["student"] = {"model": str(tiny_student_dir)}
    (tmp_path / "same.yaml").write_text(yaml.safe_dump(same))
    with pytest.raises(DistillError, match="aligned to a student on another tokenizer"):
        setup(load_recipe(tmp_path / "same.yaml"), None)
    # a plain cache of the teacher's own tokenization, read by a cross-tokenizer recipe
    capture(load_recipe(tmp_path / "same.yaml"), progress=False, out=tmp_path / "plain")
    plain = load_recipe(cross_recipe(tmp_path, tiny_teacher_dir, sp_student_dir, pairs_jsonl, "uld", name="p",
                                     cache=str(tmp_path / "plain"), cache_k=8))
    with pytest.raises(DistillError, match="on the teacher's own tokenization, but the recipe's student has a "
                                           "tokenizer of its own"):
        setup(plain, None)


def test_cli_capture_and_train_across_tokenizers_and_text_with_a_cache_refused(tmp_path, tiny_teacher_dir,
                                                                               pairs_jsonl, capsys):
    """A student on stories260K's SentencePiece tokenizer learns from the fixture teacher's cached rows; a cache
    aligned to it is refused for another tokenizer; `text` with teacher.cache is one line, exit 2."""
    import logging

    stories = require_shared(STORIES260K)
    spec = tiny_recipe(tmp_path / "run", tiny_teacher_dir, pairs_jsonl, method={"cross_tokenizer": "align"},
                       teacher={"cache": "cache", "cache_k": 16})
    spec["student"] = {"model": str(stories)}
    spec["train"]["steps"] = 2
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(spec))
    try:
        assert main(["capture", str(path), "--no-progress"]) == 0
        assert main(["train", str(path), "--no-progress"]) == 0
        assert all(r["kd"] > 0 for r in logged_steps(tmp_path / "run"))
        capsys.readouterr()
        assert main(["train", str(path), "--no-progress", "--set", "method.cross_tokenizer=text",
                     "--set", f"output_dir={tmp_path / 'text'}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("distill: error: method.cross_tokenizer: text trains on the teacher's text alone")
        assert not (tmp_path / "text" / "checkpoints").exists()
        assert main(["capture", str(path), "--no-progress", "--set", "method.cross_tokenizer=text"]) == 2
    finally:
        logging.getLogger("distill").handlers.clear()
