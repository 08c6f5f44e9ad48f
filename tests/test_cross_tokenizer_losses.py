"""Cross-tokenizer losses: ULD and the merged-group objective against float64 references written from the
definitions; chunked == naive (values and grads); `align` on identical tokenizers == ordinary KD exactly."""
from __future__ import annotations

import random

import pytest
import torch

from distill.errors import DistillError
from distill.losses import kd_loss, kd_loss_chunked
from distill.losses.cross_tokenizer import (
    AlignedGroups,
    cross_tokenizer_loss,
    cross_tokenizer_loss_chunked,
    uld_distance,
    vocab_split,
)

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "tvd"]


def uld_reference(p: torch.Tensor, q: torch.Tensor, top_k=None) -> torch.Tensor:
    """Plain Python: sort each row's probabilities, keep the top k, pad with zeros, sum |differences|."""
    out = []
    for a, b in zip(p.double().tolist(), q.double().tolist()):
        width = max(len(a), len(b))
        k = width if top_k is None else min(top_k, width)
        a = (sorted(a, reverse=True)[:k] + [0.0] * k)[:k]
        b = (sorted(b, reverse=True)[:k] + [0.0] * k)[:k]
        out.append(sum(abs(x - y) for x, y in zip(a, b)))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("top_k", [None, 1, 5, 40])
@pytest.mark.parametrize("seed", [0, 1])
def test_uld_distance_matches_float64_reference(top_k, seed):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(7, 30, generator=g, dtype=torch.float64).softmax(-1)
    q = torch.randn(7, 45, generator=g, dtype=torch.float64).mul(3).softmax(-1)
    torch.testing.assert_close(uld_distance(p, q, top_k), uld_reference(p, q, top_k), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(uld_distance(q, p, top_k), uld_reference(q, p, top_k), rtol=1e-12, atol=1e-12)


def test_uld_distance_zero_for_permuted_vocab_and_two_for_disjoint_mass():
    p = torch.tensor([[0.7, 0.2, 0.1]], dtype=torch.float64)
    assert float(uld_distance(p, p[:, [2, 0, 1]])) == pytest.approx(0.0)
    assert float(uld_distance(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5, 0.0]]))) == pytest.approx(1.0)


# ---------------------------------------------------------------- random aligned batches


def random_groups(seed: int, n_student: int, n_teacher: int, vocab_s: int, vocab_t: int):
    """Labels with masked stretches and groups of 1-3 consecutive rows per side, in order."""
    rng = random.Random(seed)
    labels = torch.tensor([rng.randrange(vocab_s) if rng.random() > 0.2 else -100 for _ in range(n_student)])
    s_groups, t_groups, t = [], [], 0
    i = 0
    while i < n_student and t < n_teacher:
        length = rng.randint(1, 3)
        rows = list(range(i, min(i + length, n_student)))
        i += length
        if any(int(labels[r]) == -100 for r in rows) or rng.random() < 0.15:
            continue
        t_len = rng.randint(1, 3)
        t_rows = list(range(t, min(t + t_len, n_teacher)))
        t += t_len
        s_groups.append(rows)
        t_groups.append(t_rows)
    return labels, s_groups, t_groups, rng


def padded(rows_list, fill=-1):
    width = max((len(r) for r in rows_list), default=1)
    return torch.tensor([r + [fill] * (width - len(r)) for r in rows_list] or [[fill]][:0], dtype=torch.long
                        ).reshape(len(rows_list), width)


def make_groups(s_groups, t_groups, teacher_tokens_of):
    t_tokens = [[teacher_tokens_of[r] for r in rows] for rows in t_groups]
    return AlignedGroups(padded(s_groups), padded(t_groups), padded(t_tokens))


def merged_reference(log_p, rows, tokens):
    total = log_p[rows[0]].clone()
    for r, tok in zip(rows[1:], tokens[1:]):
        total = total + log_p[r, tok]
    return total


def objective_reference(student_logits, teacher_logits, labels, s_groups, t_groups, teacher_tokens_of, shared,
                        divergence, temperature, alpha):
    """The objective group by group in float64, with the divergences from their definitions."""
    s, t = student_logits.double(), teacher_logits.double()
    valid = labels != -100
    ce = torch.nn.functional.cross_entropy(s[valid], labels[valid], reduction="sum")
    s_lp, t_lp = (s / temperature).log_softmax(-1), (t / temperature).log_softmax(-1)
    shared_s = [a for a, _ in shared]
    shared_t = [b for _, b in shared]
    rest_s = [i for i in range(s.size(1)) if i not in shared_s]
    rest_t = [i for i in range(t.size(1)) if i not in shared_t]
    kd = torch.zeros((), dtype=torch.float64)
    for rows, t_rows in zip(s_groups, t_groups):
        ms = merged_reference(s_lp, rows, [int(labels[r]) for r in rows])
        mt = merged_reference(t_lp, t_rows, [teacher_tokens_of[r] for r in t_rows])
        if shared_s:
            ps, pt = ms[shared_s].softmax(-1), mt[shared_t].softmax(-1)
            if divergence == "forward_kl":
                kd = kd + (pt * (pt.log() - ps.log())).sum()
            elif divergence == "reverse_kl":
                kd = kd + (ps * (ps.log() - pt.log())).sum()
            else:
                kd = kd + 0.5 * (pt - ps).abs().sum()
        if rest_s or rest_t:
            kd = kd + uld_reference(ms[rest_s].exp()[None], mt[rest_t].exp()[None])[0]
    kd = temperature ** 2 * kd
    n, g = int(valid.sum()), max(len(s_groups), 1)
    return alpha * ce / n + (1 - alpha) * kd / g


@pytest.mark.parametrize("mode", ["uld", "align"])
@pytest.mark.parametrize("divergence,temperature,alpha", [("forward_kl", 1.0, 0.5), ("reverse_kl", 2.0, 0.3),
                                                          ("tvd", 1.5, 0.0)])
def test_naive_matches_float64_reference(mode, divergence, temperature, alpha):
    vs, vt = 11, 17
    labels, s_groups, t_groups, rng = random_groups(3, 30, 40, vs, vt)
    teacher_tokens_of = [rng.randrange(vt) for _ in range(40)]
    g = torch.Generator().manual_seed(5)
    student = torch.randn(30, vs, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(40, vt, generator=g, dtype=torch.float64) * 2
    shared = [(0, 3), (2, 1), (5, 9), (7, 7)] if mode == "align" else []
    split = vocab_split(vs, vt, [a for a, _ in shared], [b for _, b in shared])
    groups = make_groups(s_groups, t_groups, teacher_tokens_of)
    out = cross_tokenizer_loss(student, teacher, labels, groups, split, divergence=divergence,
                               temperature=temperature, alpha=alpha)
    expected = objective_reference(student, teacher, labels, s_groups, t_groups, teacher_tokens_of, shared,
                                   divergence, temperature, alpha)
    torch.testing.assert_close(out.loss, expected, rtol=1e-10, atol=1e-10)
    assert len(s_groups) > 3 and out.n_tokens == int((labels != -100).sum())


@pytest.mark.parametrize("mode", ["uld", "align"])
@pytest.mark.parametrize("chunk_size", [1, 4, 7, 1000])
def test_chunked_equals_naive_values_and_grads(mode, chunk_size):
    vs, vt, ds, dt = 13, 19, 8, 6
    labels, s_groups, t_groups, rng = random_groups(11, 36, 50, vs, vt)
    teacher_tokens_of = [rng.randrange(vt) for _ in range(50)]
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(36, ds, generator=g, dtype=torch.float64, requires_grad=True)
    head = torch.randn(vs, ds, generator=g, dtype=torch.float64, requires_grad=True)
    t_hidden = torch.randn(50, dt, generator=g, dtype=torch.float64)
    t_head = torch.randn(vt, dt, generator=g, dtype=torch.float64)
    split = vocab_split(vs, vt, [1, 4, 6], [2, 0, 11]) if mode == "align" else vocab_split(vs, vt)
    groups = make_groups(s_groups, t_groups, teacher_tokens_of)
    settings = dict(divergence="jsd", temperature=1.7, alpha=0.4)
    naive = cross_tokenizer_loss(hidden @ head.t(), t_hidden @ t_head.t(), labels, groups, split, **settings)
    naive_grads = torch.autograd.grad(naive.loss, (hidden, head))
    chunked = cross_tokenizer_loss_chunked(hidden, head, t_hidden, t_head, labels, groups, split,
                                           chunk_size=chunk_size, **settings)
    chunked_grads = torch.autograd.grad(chunked.loss, (hidden, head))
    for a, b in [(chunked.loss, naive.loss), (chunked.kd, naive.kd), (chunked.ce, naive.ce),
                 *zip(chunked_grads, naive_grads)]:
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert naive_grads[1].abs().sum() > 0


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.5), (2.0, 0.0), (0.7, 0.9)])
def test_align_on_identical_tokenizers_is_ordinary_kd(divergence, temperature, alpha):
    """Same tokens on both sides: one-token groups at every trained row, every vocabulary entry shared."""
    n, v, d = 24, 15, 8
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    head = torch.randn(v, d, generator=g, dtype=torch.float64, requires_grad=True)
    t_hidden, t_head = torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randn(v, 5, generator=g,
                                                                                        dtype=torch.float64)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[[0, 5, 6, 20]] = -100
    rows = [[i] for i in range(n) if int(labels[i]) != -100]
    groups = AlignedGroups(padded(rows), padded(rows), padded([[int(labels[r[0]])] for r in rows]))
    split = vocab_split(v, v, list(range(v)), list(range(v)))
    settings = dict(divergence=divergence, temperature=temperature, alpha=alpha)
    ours = cross_tokenizer_loss(hidden @ head.t(), t_hidden @ t_head.t(), labels, groups, split, **settings)
    theirs = kd_loss(hidden @ head.t(), t_hidden @ t_head.t(), labels, **settings)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-12, atol=1e-14)
    chunked = cross_tokenizer_loss_chunked(hidden, head, t_hidden, t_head, labels, groups, split, chunk_size=5,
                                           **settings)
    reference = kd_loss_chunked(hidden, head, t_hidden, t_head, labels, chunk_size=5, **settings)
    torch.testing.assert_close(chunked.loss, reference.loss, rtol=1e-12, atol=1e-14)
    ours_grads = torch.autograd.grad(chunked.loss, (hidden, head))
    kd_grads = torch.autograd.grad(reference.loss, (hidden, head))
    for a, b in zip(ours_grads, kd_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_no_groups_is_alpha_weighted_cross_entropy_and_masked_is_zero():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(6, 9, generator=g, dtype=torch.float64), torch.randint(0, 9, (6,), generator=g)
    none = AlignedGroups(*(torch.zeros(0, 1, dtype=torch.long) for _ in range(3)))
    out = cross_tokenizer_loss(logits, torch.randn(3, 4, dtype=torch.float64), labels, none, vocab_split(9, 4),
                               alpha=0.25)
    ce = torch.nn.functional.cross_entropy(logits, labels)
    torch.testing.assert_close(out.loss, 0.25 * ce)
    masked = cross_tokenizer_loss(logits, torch.randn(3, 4), torch.full((6,), -100), none, vocab_split(9, 4))
    assert masked.n_tokens == 0 and float(masked.loss) == 0.0


def test_group_on_an_untrained_row_is_refused():
    labels = torch.tensor([3, -100, 2])
    groups = AlignedGroups(torch.tensor([[1]]), torch.tensor([[0]]), torch.tensor([[1]]))
    with pytest.raises(DistillError, match="no label"):
        cross_tokenizer_loss(torch.randn(3, 5), torch.randn(2, 4), labels, groups, vocab_split(5, 4))
