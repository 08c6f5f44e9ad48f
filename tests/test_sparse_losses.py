"""Sparse (top-k + tail) KD losses against float64 references on fresh random inputs."""
from __future__ import annotations

import pytest
import torch

from distill.errors import DistillError
from distill.losses import SparseTargets, kd_loss, kd_loss_chunked, kd_loss_sparse, kd_loss_sparse_chunked
from distill.losses.sparse import student_buckets, teacher_buckets

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]


def _inputs(n=24, v=40, d=8, seed=0, teacher_vocab=None):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, d, generator=g, dtype=torch.float64, requires_grad=True)
    th = torch.randn(n, d, generator=g, dtype=torch.float64)
    tw = torch.randn(teacher_vocab or v, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[[2, 5, 11]] = -100
    return h, w, th, tw, labels


def _targets(teacher_logits: torch.Tensor, labels: torch.Tensor, k: int) -> SparseTargets:
    """Top-k of log-softmax over the full vocabulary plus the exact log tail mass, at trained rows only."""
    lp = torch.log_softmax(teacher_logits[labels != -100], dim=1)
    top, ids = lp.topk(k, dim=1)
    tail = lp.scatter(1, ids, float("-inf")).logsumexp(dim=1)
    return SparseTargets(ids, top, tail, teacher_logits.size(1))


def _grads(out, *tensors):
    return torch.autograd.grad(out.loss, tensors)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
def test_k_equal_vocab_matches_dense_loss_and_grads(divergence, temperature):
    h, w, th, tw, labels = _inputs(seed=DIVERGENCES.index(divergence) * 10 + int(temperature * 10))
    kw = dict(divergence=divergence, temperature=temperature, alpha=0.3)
    dense = kd_loss_chunked(h, w, th, tw, labels, chunk_size=5, **kw)
    sparse = kd_loss_sparse_chunked(h, w, _targets(th @ tw.t(), labels, tw.size(0)), labels, chunk_size=5, **kw)
    assert sparse.loss.item() == pytest.approx(dense.loss.item(), rel=1e-10, abs=1e-12)
    assert sparse.kd.item() == pytest.approx(dense.kd.item(), rel=1e-10, abs=1e-12)
    for a, b in zip(_grads(dense, h, w), _grads(sparse, h, w)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def _coarse(log_p: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Reference: a full distribution folded into (kept ids, everything else), by explicit summation."""
    p = log_p.exp()
    kept = p.gather(1, ids)
    return torch.cat([kept, (p.sum(1) - kept.sum(1))[:, None]], dim=1)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_top_k_at_t1_is_the_divergence_of_support_plus_tail(divergence):
    h, w, th, tw, labels = _inputs(seed=7)
    valid = labels != -100
    targets = _targets(th @ tw.t(), labels, 6)
    out = kd_loss_sparse(h @ w.t(), targets, labels, divergence=divergence, alpha=0.0)
    p = _coarse(torch.log_softmax((th @ tw.t())[valid], 1), targets.ids)
    q = _coarse(torch.log_softmax((h @ w.t())[valid], 1), targets.ids)
    kl = lambda a, b: (a * (a.log() - b.log())).sum(1)  # noqa: E731
    if divergence == "forward_kl":
        expected = kl(p, q)
    elif divergence == "reverse_kl":
        expected = kl(q, p)
    else:
        m = 0.5 * p + 0.5 * q
        expected = 0.5 * kl(p, m) + 0.5 * kl(q, m)
    assert out.kd.item() == pytest.approx(expected.mean().item(), rel=1e-10)


@pytest.mark.parametrize("temperature", [0.5, 2.0, 3.0])
def test_tempered_tail_is_exact_when_the_tail_is_flat(temperature):
    # Teacher logits whose non-top-k tokens are all equal: the uniform-tail approximation is then exact.
    n, v, k = 10, 30, 5
    g = torch.Generator().manual_seed(3)
    logits = torch.full((n, v), -1.0, dtype=torch.float64)
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    logits.scatter_(1, ids, torch.randn(n, k, generator=g, dtype=torch.float64) + 2.0)
    labels = torch.zeros(n, dtype=torch.long)
    targets = _targets(logits, labels, k)
    got = teacher_buckets(targets, v, temperature, torch.float64)
    exact = _coarse(torch.log_softmax(logits / temperature, 1), targets.ids).log()
    torch.testing.assert_close(got, exact, rtol=1e-10, atol=1e-10)


def test_chunked_matches_full_logits_with_a_tail():
    h, w, th, tw, labels = _inputs(seed=11)
    targets = _targets(th @ tw.t(), labels, 7)
    kw = dict(divergence="jsd", temperature=1.5, alpha=0.4)
    full = kd_loss_sparse(h @ w.t(), targets, labels, **kw)
    chunked = kd_loss_sparse_chunked(h, w, targets, labels, chunk_size=4, **kw)
    assert chunked.loss.item() == pytest.approx(full.loss.item(), rel=1e-10)
    for a, b in zip(_grads(full, h, w), _grads(chunked, h, w)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_ids_beyond_the_student_vocab_get_no_mass_as_in_the_dense_loss():
    # A teacher head padded past the student's vocabulary: the dense loss drops those rows and renormalises.
    h, w, th, tw, labels = _inputs(v=40, teacher_vocab=44, seed=5)
    dense = kd_loss_chunked(h, w, th, tw, labels, divergence="reverse_kl", temperature=1.0)
    sparse = kd_loss_sparse_chunked(h, w, _targets(th @ tw.t(), labels, 44), labels, divergence="reverse_kl")
    assert sparse.loss.item() == pytest.approx(dense.loss.item(), rel=1e-10)


def test_student_buckets_sum_to_one_and_tail_excludes_support():
    lp = torch.log_softmax(torch.randn(4, 12, dtype=torch.float64), 1)
    ids = torch.tensor([[0, 3, 5], [11, 1, 2], [4, 4 + 8, 7], [9, 10, 11]])  # 12 is outside the vocabulary
    buckets = student_buckets(lp, ids)
    torch.testing.assert_close(buckets.exp().sum(1), torch.ones(4, dtype=torch.float64))
    assert buckets[2, 1].exp().item() == 0.0


def test_row_count_and_k_are_checked():
    h, w, th, tw, labels = _inputs()
    targets = _targets(th @ tw.t(), labels, 4)
    with pytest.raises(DistillError, match="positions for this batch"):
        kd_loss_sparse_chunked(h, w, targets.rows(slice(1, None)), labels)
    too_big = SparseTargets(targets.ids, targets.log_probs, targets.tail, vocab_size=3)
    with pytest.raises(DistillError, match="k = 4 is larger than the vocabulary"):
        kd_loss_sparse_chunked(h, w, too_big, labels)


def test_no_trained_position_gives_zero_loss_and_backward_works():
    h, w, _, _, labels = _inputs()
    empty = SparseTargets(torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3), torch.zeros(0), 40)
    out = kd_loss_sparse_chunked(h, w, empty, torch.full_like(labels, -100))
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.n_tokens == 0


def test_float32_k_vocab_matches_dense_kd_loss():
    h, w, th, tw, labels = _inputs(seed=9)
    h32, w32, logits = h.float().detach(), w.float().detach(), (th @ tw.t()).float()
    dense = kd_loss(h32 @ w32.t(), logits, labels, temperature=2.0)
    sparse = kd_loss_sparse(h32 @ w32.t(), _targets(logits, labels, 40), labels, temperature=2.0)
    assert sparse.loss.item() == pytest.approx(dense.loss.item(), rel=1e-5)
