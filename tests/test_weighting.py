"""Teacher-confidence weighting of the KD term (method.weighting): against float64 references, chunked == naive,
dense == sparse at k = vocab, and equal confidences reduce to the unweighted loss."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distill.errors import DistillError
from distill.losses import SparseTargets, kd_loss, kd_loss_chunked, kd_loss_sparse, kd_loss_sparse_chunked
from distill.losses.weighting import Weighting

KINDS = ["teacher_confidence", "teacher_entropy"]
N, DS, DT, V = 23, 16, 24, 40


def _case(seed: int, teacher_scale: float = 1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(N, DS, generator=g, dtype=dtype).requires_grad_()
    ws = (torch.randn(V, DS, generator=g, dtype=dtype) * 0.5).requires_grad_()
    # Rows of the teacher's hidden states at different scales: some confident, some nearly flat.
    ht = torch.randn(N, DT, generator=g, dtype=dtype) * torch.linspace(0.05, 3.0, N, dtype=dtype)[:, None]
    wt = torch.randn(V, DT, generator=g, dtype=dtype) * teacher_scale
    labels = torch.randint(0, V, (N,), generator=g)
    labels[:4] = -100
    labels[-3:] = -100
    return hs, ws, ht, wt, labels


def _reference(hs, ws, ht, wt, labels, kind, floor, weight_t, temperature, alpha):
    """The weighted objective written out in float64 from its definition (docs and losses/weighting.py)."""
    valid = labels != -100
    s, t = (hs @ ws.t())[valid].double(), (ht @ wt.t())[valid].double()
    p = torch.softmax(t, dim=1)
    if kind == "teacher_confidence":
        confidence = p.max(dim=1).values
    else:
        confidence = 1 + (p * p.log()).sum(dim=1) / math.log(V)
    raw = confidence.clamp(min=floor) ** (1 / weight_t)
    w = raw / raw.mean()
    p_t = torch.softmax(t / temperature, dim=1)
    kl = (p_t * (p_t.log() - torch.log_softmax(s / temperature, dim=1))).sum(dim=1)
    kd = temperature**2 * (w * kl).mean()
    ce = F.cross_entropy(s, labels[valid])
    return alpha * ce + (1 - alpha) * kd, kd, w


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("floor,weight_t,temperature", [(0.1, 1.0, 1.0), (0.05, 2.0, 2.0), (0.3, 0.5, 1.0)])
def test_weighted_loss_matches_float64_reference(kind, floor, weight_t, temperature):
    hs, ws, ht, wt, labels = _case(seed=KINDS.index(kind) * 7 + int(10 * floor))
    keywords = dict(temperature=temperature, alpha=0.3, weighting=kind, weighting_floor=floor,
                    weighting_temperature=weight_t)
    loss, kd, w = _reference(hs, ws, ht, wt, labels, kind, floor, weight_t, temperature, 0.3)
    assert w.std() > 0.05  # the weights really differ between positions
    assert float(w.mean()) == pytest.approx(1.0)
    naive = kd_loss(hs @ ws.t(), ht @ wt.t(), labels, **keywords)
    chunked = kd_loss_chunked(hs, ws, ht, wt, labels, chunk_size=5, **keywords)
    for out in (naive, chunked):
        torch.testing.assert_close(out.loss, loss, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out.kd, kd, rtol=1e-10, atol=1e-12)
    unweighted = kd_loss(hs @ ws.t(), ht @ wt.t(), labels, temperature=temperature, alpha=0.3)
    assert abs(float(naive.kd) - float(unweighted.kd)) > 1e-4  # the weighting changes the loss


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk_size", [1, 4, 64])
def test_chunked_equals_naive_value_and_grads(kind, chunk_size):
    hs, ws, ht, wt, labels = _case(seed=30 + chunk_size)
    keywords = dict(temperature=1.5, alpha=0.5, weighting=kind, weighting_floor=0.05, weighting_temperature=0.7)
    naive = kd_loss(hs @ ws.t(), ht @ wt.t(), labels, **keywords)
    naive_grads = torch.autograd.grad(naive.loss, (hs, ws))
    chunked = kd_loss_chunked(hs, ws, ht, wt, labels, chunk_size=chunk_size, **keywords)
    chunked_grads = torch.autograd.grad(chunked.loss, (hs, ws))
    for a, b in [(naive.loss, chunked.loss), (naive.kd, chunked.kd), *zip(naive_grads, chunked_grads)]:
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-12)
    reference_grads = torch.autograd.grad(_reference(hs, ws, ht, wt, labels, kind, 0.05, 0.7, 1.5, 0.5)[0],
                                          (hs, ws))
    for a, b in zip(reference_grads, chunked_grads):
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_equal_confidences_give_the_unweighted_loss(kind):
    hs, ws, ht, wt, labels = _case(seed=50)
    # Every teacher row the same distribution (a shifted copy of one logit row): equal confidences everywhere.
    teacher_logits = (torch.randn(1, V, dtype=torch.float64) * 2).expand(N, V).clone()
    base = dict(temperature=2.0, alpha=0.4)
    plain = kd_loss(hs @ ws.t(), teacher_logits, labels, **base)
    weighted = kd_loss(hs @ ws.t(), teacher_logits, labels, weighting=kind, weighting_floor=0.01, **base)
    torch.testing.assert_close(weighted.loss, plain.loss, rtol=1e-14, atol=0)
    # The floor also makes them equal: every confidence below it.
    flat = kd_loss_chunked(hs, ws, ht * 1e-3, wt, labels, chunk_size=7, weighting=kind, weighting_floor=1.0, **base)
    plain_flat = kd_loss_chunked(hs, ws, ht * 1e-3, wt, labels, chunk_size=7, **base)
    torch.testing.assert_close(flat.loss, plain_flat.loss, rtol=1e-14, atol=0)
    torch.testing.assert_close(flat.kd, plain_flat.kd, rtol=1e-14, atol=0)


def _sparse(teacher_logits: torch.Tensor, labels: torch.Tensor, k: int) -> SparseTargets:
    lp = torch.log_softmax(teacher_logits[labels != -100], dim=1)
    top, ids = lp.topk(k, dim=1)
    tail = lp.scatter(1, ids, float("-inf")).logsumexp(dim=1)
    return SparseTargets(ids, top, tail, teacher_logits.size(1))


@pytest.mark.parametrize("kind", KINDS)
def test_sparse_at_k_equal_vocab_matches_dense(kind):
    hs, ws, ht, wt, labels = _case(seed=60)
    keywords = dict(temperature=1.0, alpha=0.5, weighting=kind, weighting_floor=0.05, weighting_temperature=1.0)
    dense = kd_loss(hs @ ws.t(), ht @ wt.t(), labels, **keywords)
    dense_grads = torch.autograd.grad(dense.loss, (hs, ws))
    sparse = kd_loss_sparse_chunked(hs, ws, _sparse(ht @ wt.t(), labels, V), labels, chunk_size=6, **keywords)
    sparse_grads = torch.autograd.grad(sparse.loss, (hs, ws))
    for a, b in [(dense.loss, sparse.loss), (dense.kd, sparse.kd), *zip(dense_grads, sparse_grads)]:
        torch.testing.assert_close(b, a, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_sparse_chunked_equals_naive_with_a_tail(kind):
    hs, ws, ht, wt, labels = _case(seed=70)
    targets = _sparse(ht @ wt.t(), labels, 6)
    keywords = dict(temperature=2.0, alpha=0.3, weighting=kind, weighting_floor=0.02, weighting_temperature=0.5)
    naive = kd_loss_sparse(hs @ ws.t(), targets, labels, **keywords)
    naive_grads = torch.autograd.grad(naive.loss, (hs, ws))
    chunked = kd_loss_sparse_chunked(hs, ws, targets, labels, chunk_size=4, **keywords)
    chunked_grads = torch.autograd.grad(chunked.loss, (hs, ws))
    for a, b in [(naive.loss, chunked.loss), (naive.kd, chunked.kd), *zip(naive_grads, chunked_grads)]:
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-12)
    plain = kd_loss_sparse(hs @ ws.t(), targets, labels, temperature=2.0, alpha=0.3)
    assert abs(float(plain.kd) - float(naive.kd)) > 1e-4


def test_sparse_entropy_confidence_spreads_the_tail_evenly():
    """A teacher whose tail is already uniform: the cache's entropy estimate is exact."""
    v, k = 30, 5
    head = torch.tensor([3.0, 2.0, 1.5, 1.0, 0.5], dtype=torch.float64)
    logits = torch.cat([head, torch.zeros(v - k, dtype=torch.float64)])[None]
    lp = torch.log_softmax(logits, dim=1)
    exact = Weighting("teacher_entropy").confidence(lp)
    targets = _sparse(logits, torch.tensor([0]), k)
    estimate = Weighting("teacher_entropy").sparse_confidence(targets.ids, targets.log_probs, targets.tail, v)
    torch.testing.assert_close(estimate, exact, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kwargs,key", [({"weighting": "loud"}, "method.weighting"),
                                        ({"weighting": "teacher_entropy", "weighting_floor": 0.0},
                                         "method.weighting_floor"),
                                        ({"weighting": "teacher_entropy", "weighting_temperature": 0.0},
                                         "method.weighting_temperature")])
def test_bad_settings_are_one_line_naming_the_key(kwargs, key):
    hs, ws, ht, wt, labels = _case(seed=80)
    with pytest.raises(DistillError, match=key):
        kd_loss_chunked(hs, ws, ht, wt, labels, **kwargs)


def _first_kd(run_dir) -> float:
    from conftest import logged_steps

    rows = logged_steps(run_dir)
    assert rows and all(math.isfinite(r["loss"]) for r in rows)
    return rows[0]["kd"]


@pytest.mark.parametrize("cache", [False, True])
def test_a_run_trains_with_weighting_live_and_from_the_cache(tmp_path, tiny_teacher_dir, pairs_jsonl, cache):
    from distill.recipe import recipe_from_dict
    from distill.stages import capture, train
    from conftest import tiny_recipe

    teacher = {"cache": str(tmp_path / "cache"), "cache_k": 16} if cache else {}
    runs = {}
    for weighting in ("none", "teacher_confidence"):
        # The random fixture teacher is nearly uniform: a floor under its confidences would make them all equal.
        method = {"weighting": weighting, "weighting_floor": 1e-6}
        recipe = recipe_from_dict(tiny_recipe(tmp_path / weighting, tiny_teacher_dir, pairs_jsonl, teacher=teacher,
                                              method=method, train={"steps": 2}))
        if cache and weighting == "none":
            capture(recipe, progress=False)
        train(recipe, progress=False)
        runs[weighting] = _first_kd(recipe.run_dir)
    assert runs["none"] != pytest.approx(runs["teacher_confidence"], rel=1e-4)
