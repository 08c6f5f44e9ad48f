"""Divergences against float64 references written from the definitions; chunked KD loss == naive KD loss."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distill.errors import DistillError
from distill.losses import (
    DIVERGENCES,
    LossOutput,
    forward_kl,
    get_divergence,
    jsd,
    kd_loss,
    kd_loss_chunked,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    tvd,
)

NAMES = list(DIVERGENCES)


# ---------------------------------------------------------------- float64 references, straight from the math

def probs(logits: torch.Tensor) -> torch.Tensor:
    x = logits.double()
    e = (x - x.max(-1, keepdim=True).values).exp()
    return e / e.sum(-1, keepdim=True)


def kl_ref(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sum_v p log(p / q), with 0 log 0 = 0."""
    safe_p = torch.where(p > 0, p, torch.ones_like(p))
    return torch.where(p > 0, p * (safe_p.log() - q.log()), torch.zeros_like(p)).sum(-1)


def reference(name: str, student_logits, teacher_logits, beta: float = 0.5, skew: float = 0.1) -> torch.Tensor:
    ps, pt = probs(student_logits), probs(teacher_logits)
    if name == "forward_kl":
        return kl_ref(pt, ps)
    if name == "reverse_kl":
        return kl_ref(ps, pt)
    if name == "jsd":
        m = beta * pt + (1 - beta) * ps
        return beta * kl_ref(pt, m) + (1 - beta) * kl_ref(ps, m)
    if name == "skew_forward_kl":
        return kl_ref(pt, skew * pt + (1 - skew) * ps)
    if name == "skew_reverse_kl":
        return kl_ref(ps, skew * ps + (1 - skew) * pt)
    assert name == "tvd"
    return 0.5 * (pt - ps).abs().sum(-1)


def random_logits(seed: int, n: int = 6, v: int = 50, scale: float = 1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).to(dtype)


# ---------------------------------------------------------------- divergences

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_divergence_matches_float64_reference(name, seed, temperature, scale):
    s = random_logits(seed, scale=scale) / temperature
    t = random_logits(seed + 100, scale=scale) / temperature
    fn = get_divergence(name, beta=0.3, skew=0.2)
    got = fn(s, t)
    want = reference(name, s, t, beta=0.3, skew=0.2)
    assert got.shape == (6,) and got.dtype == torch.float32
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    # float64 inputs stay float64 and agree to near machine precision
    torch.testing.assert_close(fn(s.double(), t.double()), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_divergence_extreme_logits_stay_finite_with_finite_grads(name):
    s = (random_logits(3, scale=1000.0)).requires_grad_()
    t = random_logits(4, scale=1000.0)
    out = get_divergence(name)(s, t)
    assert torch.isfinite(out).all() and (out >= 0).all()
    out.sum().backward()
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed", [0, 1])
def test_divergence_zero_on_equal_and_nonnegative(name, seed):
    fn = get_divergence(name)
    x = random_logits(seed, scale=5.0)
    torch.testing.assert_close(fn(x, x), torch.zeros(6), atol=1e-6, rtol=0)
    # shifting logits by a per-row constant does not change the distribution
    torch.testing.assert_close(fn(x, x + 7.0), torch.zeros(6), atol=1e-5, rtol=0)
    assert (fn(x, random_logits(seed + 50, scale=5.0)) > 1e-3).all()


def test_jsd_symmetric_at_half_and_bounded_by_log2():
    a, b = random_logits(5, scale=4.0), random_logits(6, scale=4.0)
    torch.testing.assert_close(jsd(a, b, beta=0.5), jsd(b, a, beta=0.5))
    assert (jsd(a, b) <= torch.log(torch.tensor(2.0)) + 1e-6).all()
    assert not torch.allclose(jsd(a, b, beta=0.2), jsd(b, a, beta=0.2))


def test_skew_kl_reduces_to_plain_kl_at_zero_skew():
    s, t = random_logits(7, scale=3.0), random_logits(8, scale=3.0)
    torch.testing.assert_close(skew_forward_kl(s, t, skew=0.0), forward_kl(s, t))
    torch.testing.assert_close(skew_reverse_kl(s, t, skew=0.0), reverse_kl(s, t))
    # skewing the target towards the input can only shrink the divergence
    assert (skew_forward_kl(s, t, skew=0.5) < forward_kl(s, t)).all()


def test_tvd_is_at_most_one():
    s, t = random_logits(9, scale=50.0), random_logits(10, scale=50.0)
    assert ((tvd(s, t) >= 0) & (tvd(s, t) <= 1 + 1e-6)).all()


@pytest.mark.parametrize("name", NAMES)
def test_half_precision_inputs_use_float32_math(name):
    s, t = random_logits(11).bfloat16(), random_logits(12).bfloat16()
    fn = get_divergence(name)
    out = fn(s, t)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, fn(s.float(), t.float()))


def test_get_divergence_errors_name_the_choices():
    with pytest.raises(DistillError, match="forward_kl, reverse_kl, jsd, skew_forward_kl, skew_reverse_kl, tvd"):
        get_divergence("kl")
    with pytest.raises(DistillError, match="method.beta"):
        get_divergence("jsd", beta=1.0)
    with pytest.raises(DistillError, match="method.skew"):
        get_divergence("skew_forward_kl", skew=1.0)


# ---------------------------------------------------------------- kd_loss (naive path)

def masked_labels(n: int, v: int, seed: int, prompt: int = 4, padding: int = 3) -> torch.Tensor:
    labels = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(seed))
    labels[:prompt] = -100  # prompt positions
    labels[n - padding:] = -100  # padding
    return labels


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_loss_matches_hand_written_objective(name, alpha, temperature):
    s, t = random_logits(20, n=12, v=40, dtype=torch.float64), random_logits(21, n=12, v=40, dtype=torch.float64)
    labels = masked_labels(12, 40, seed=22)
    out = kd_loss(s, t, labels, divergence=name, temperature=temperature, alpha=alpha, beta=0.3, skew=0.2)
    valid = labels != -100
    ce = F.cross_entropy(s[valid], labels[valid])
    divergence = reference(name, s[valid] / temperature, t[valid] / temperature, beta=0.3, skew=0.2)
    kd = temperature**2 * divergence.mean()
    torch.testing.assert_close(out.ce, ce)
    torch.testing.assert_close(out.kd, kd)
    torch.testing.assert_close(out.loss, alpha * ce + (1 - alpha) * kd)
    assert out.n_tokens == int(valid.sum()) == 5
    assert not out.kd.requires_grad and not out.ce.requires_grad


def test_kd_loss_without_teacher_is_cross_entropy_whatever_alpha():
    s = random_logits(23, n=10, v=30).requires_grad_()
    labels = masked_labels(10, 30, seed=24)
    out = kd_loss(s, None, labels, alpha=0.2)
    valid = labels != -100
    torch.testing.assert_close(out.loss, F.cross_entropy(s[valid], labels[valid]))
    assert out.kd.item() == 0.0
    out.loss.backward()
    assert s.grad[~valid].abs().max() == 0 and s.grad[valid].abs().max() > 0


def test_kd_loss_padded_vocab_uses_the_shared_columns():
    s, t = random_logits(25, n=8, v=64), random_logits(26, n=8, v=48)  # student head padded to 64
    labels = torch.randint(0, 48, (8,), generator=torch.Generator().manual_seed(27))
    out = kd_loss(s, t, labels, alpha=0.5)
    torch.testing.assert_close(out.kd, forward_kl(s[:, :48], t).mean())
    torch.testing.assert_close(out.ce, F.cross_entropy(s, labels))  # CE over all 64 student columns
    # the other way round: teacher padded; CE still uses all of the student's columns
    out2 = kd_loss(t, s, labels, alpha=0.5)
    torch.testing.assert_close(out2.kd, forward_kl(t, s[:, :48]).mean())
    torch.testing.assert_close(out2.ce, F.cross_entropy(t, labels))


def test_kd_loss_all_masked_is_zero_and_backward_works():
    s = random_logits(28, n=5, v=20).requires_grad_()
    out = kd_loss(s, random_logits(29, n=5, v=20), torch.full((5,), -100))
    assert out.loss.item() == 0.0 and out.n_tokens == 0 and out.loss.grad_fn is not None
    out.loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_kd_loss_rejects_labels_outside_the_student_vocab():
    with pytest.raises(DistillError, match="label id 30 is outside the student's vocabulary of 30"):
        kd_loss(random_logits(30, n=3, v=30), None, torch.tensor([1, 30, -100]))


# ---------------------------------------------------------------- chunked == naive

N, DS, DT, V = 23, 16, 24, 40


def make_case(seed: int, student_vocab: int = V, teacher_vocab: int = V, dtype=torch.float64):
    """Student hidden/head that require grad, a frozen teacher, labels masked at prompt and padding."""
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(N, DS, generator=g, dtype=dtype).requires_grad_()
    ws = (torch.randn(student_vocab, DS, generator=g, dtype=dtype) * 0.5).requires_grad_()
    ht = torch.randn(N, DT, generator=g, dtype=dtype)
    wt = torch.randn(teacher_vocab, DT, generator=g, dtype=dtype) * 0.5
    labels = masked_labels(N, min(student_vocab, teacher_vocab), seed=seed)
    return hs, ws, ht, wt, labels


def naive_and_chunked(hs, ws, ht, wt, labels, chunk_size=5, **kwargs):
    """Loss and (d/d hidden, d/d head) from both paths on identical inputs."""
    teacher_logits = None if ht is None else ht @ wt.t()
    naive = kd_loss(hs @ ws.t(), teacher_logits, labels, **kwargs)
    naive_grads = torch.autograd.grad(naive.loss, (hs, ws))
    chunked = kd_loss_chunked(hs, ws, ht, wt, labels, chunk_size=chunk_size, **kwargs)
    chunked_grads = torch.autograd.grad(chunked.loss, (hs, ws))
    return naive, naive_grads, chunked, chunked_grads


def assert_same(naive: LossOutput, naive_grads, chunked: LossOutput, chunked_grads, rtol=1e-5, atol=1e-10):
    pairs = [(naive.loss, chunked.loss), (naive.kd, chunked.kd), (naive.ce, chunked.ce)]
    pairs += list(zip(naive_grads, chunked_grads))
    for a, b in pairs:
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol)
    assert naive.n_tokens == chunked.n_tokens
    assert chunked_grads[1].abs().max() > 0


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_equals_naive_value_and_grads(name, alpha, temperature):
    case = make_case(seed=NAMES.index(name))
    results = naive_and_chunked(*case, divergence=name, temperature=temperature, alpha=alpha, beta=0.3, skew=0.2)
    assert_same(*results)
    assert results[0].n_tokens == N - 7
    # masked rows get exactly zero gradient
    assert results[3][0][case[4] == -100].abs().max() == 0


@pytest.mark.parametrize("chunk_size", [1, 4, 16, 1024])
@pytest.mark.parametrize("masked", [True, False])
def test_chunked_any_chunk_size(chunk_size, masked):
    hs, ws, ht, wt, labels = make_case(seed=40)
    if not masked:
        labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(40))
    results = naive_and_chunked(hs, ws, ht, wt, labels, chunk_size=chunk_size, temperature=1.5)
    assert_same(*results)
    assert results[2].n_tokens == (N - 7 if masked else N)


@pytest.mark.parametrize("student_vocab,teacher_vocab", [(V, V + 24), (V + 24, V)])
@pytest.mark.parametrize("name", ["forward_kl", "jsd"])
def test_chunked_padded_vocab(student_vocab, teacher_vocab, name):
    case = make_case(seed=41, student_vocab=student_vocab, teacher_vocab=teacher_vocab)
    assert_same(*naive_and_chunked(*case, divergence=name, temperature=2.0, alpha=0.5))


def test_chunked_sft_without_teacher():
    hs, ws, _, _, labels = make_case(seed=42)
    naive, naive_grads, chunked, chunked_grads = naive_and_chunked(hs, ws, None, None, labels, alpha=0.3)
    assert_same(naive, naive_grads, chunked, chunked_grads)
    assert chunked.kd.item() == 0.0
    torch.testing.assert_close(chunked.loss.detach(), chunked.ce)


def test_chunked_all_masked_is_zero_and_backward_works():
    hs, ws, ht, wt, _ = make_case(seed=43)
    out = kd_loss_chunked(hs, ws, ht, wt, torch.full((N,), -100))
    assert out.loss.item() == 0.0 and out.n_tokens == 0 and out.loss.grad_fn is not None
    out.loss.backward()
    assert torch.equal(hs.grad, torch.zeros_like(hs)) and torch.equal(ws.grad, torch.zeros_like(ws))


def test_chunked_tied_head_gets_both_gradients():
    """Head tied to the input embedding: its grad is the embedding grad plus the head grad."""
    torch.manual_seed(44)
    embedding = torch.nn.Embedding(V, DS, dtype=torch.float64)
    proj = torch.nn.Linear(DS, DS, dtype=torch.float64)
    ids = torch.randint(0, V, (N,))
    ht, wt = torch.randn(N, DT, dtype=torch.float64), torch.randn(V, DT, dtype=torch.float64)
    labels = masked_labels(N, V, 44)

    def grads(loss_fn):
        embedding.zero_grad(set_to_none=True)
        proj.zero_grad(set_to_none=True)
        hidden = torch.tanh(proj(embedding(ids)))
        loss_fn(hidden).backward()
        return embedding.weight.grad.clone(), proj.weight.grad.clone()

    naive = grads(lambda h: kd_loss(h @ embedding.weight.t(), ht @ wt.t(), labels, temperature=2.0).loss)
    chunked = grads(
        lambda h: kd_loss_chunked(h, embedding.weight, ht, wt, labels, temperature=2.0, chunk_size=3).loss
    )
    for a, b in zip(naive, chunked):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-10)
    # both uses of the tied weight contribute: rows of looked-up ids differ from pure head grads
    frozen_hidden = torch.tanh(proj(embedding(ids))).detach()
    head_only_loss = kd_loss_chunked(frozen_hidden, embedding.weight, ht, wt, labels, temperature=2.0).loss
    head_only = torch.autograd.grad(head_only_loss, embedding.weight)[0]
    assert not torch.allclose(head_only, naive[0])


def test_chunked_scales_by_upstream_gradient():
    hs, ws, ht, wt, labels = make_case(seed=45)
    (3.0 * kd_loss(hs @ ws.t(), ht @ wt.t(), labels, temperature=2.0).loss).backward()
    want = hs.grad.clone(), ws.grad.clone()
    hs.grad, ws.grad = None, None
    (3.0 * kd_loss_chunked(hs, ws, ht, wt, labels, temperature=2.0, chunk_size=4).loss).backward()
    torch.testing.assert_close(hs.grad, want[0])
    torch.testing.assert_close(ws.grad, want[1])


def test_chunked_frozen_head_only_hidden_grad():
    hs, ws, ht, wt, labels = make_case(seed=46)
    ws.requires_grad_(False)
    out = kd_loss_chunked(hs, ws, ht, wt, labels, chunk_size=4)
    out.loss.backward()
    assert ws.grad is None and hs.grad.abs().max() > 0


def test_chunked_never_gives_the_teacher_a_gradient():
    hs, ws, ht, wt, labels = make_case(seed=52)
    ht.requires_grad_()
    wt.requires_grad_()
    kd_loss_chunked(hs, ws, ht, wt, labels, chunk_size=4).loss.backward()
    kd_loss(hs @ ws.t(), ht @ wt.t(), labels).loss.backward()
    assert ht.grad is None and wt.grad is None and hs.grad is not None


def test_chunked_without_grad_returns_plain_values():
    hs, ws, ht, wt, labels = make_case(seed=47)
    with_grad = kd_loss_chunked(hs, ws, ht, wt, labels, chunk_size=4, divergence="reverse_kl")
    with torch.no_grad():
        no_grad = kd_loss_chunked(hs, ws, ht, wt, labels, chunk_size=4, divergence="reverse_kl")
    assert no_grad.loss.grad_fn is None
    torch.testing.assert_close(no_grad.loss, with_grad.loss.detach())
    torch.testing.assert_close(no_grad.kd, with_grad.kd)


def test_chunked_float32_matches_float64_naive():
    hs, ws, ht, wt, labels = make_case(seed=48, dtype=torch.float32)
    chunked = kd_loss_chunked(hs, ws, ht, wt, labels, chunk_size=5, temperature=2.0)
    grads = torch.autograd.grad(chunked.loss, (hs, ws))
    hs64, ws64 = hs.detach().double().requires_grad_(), ws.detach().double().requires_grad_()
    naive = kd_loss(hs64 @ ws64.t(), ht.double() @ wt.double().t(), labels, temperature=2.0)
    want = torch.autograd.grad(naive.loss, (hs64, ws64))
    assert chunked.loss.dtype == torch.float32
    torch.testing.assert_close(chunked.loss.double(), naive.loss, rtol=1e-5, atol=1e-6)
    for got, ref in zip(grads, want):
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-6)


def test_chunked_bfloat16_runs_with_float32_loss():
    hs, ws, ht, wt, labels = make_case(seed=49, dtype=torch.float32)
    bf = [x.detach().bfloat16().requires_grad_(x.requires_grad) for x in (hs, ws, ht, wt)]
    out = kd_loss_chunked(*bf, labels, chunk_size=5)
    out.loss.backward()
    reference_loss = kd_loss_chunked(*(x.float() for x in bf), labels).loss
    assert out.loss.dtype == torch.float32 and bf[1].grad.dtype == torch.bfloat16
    torch.testing.assert_close(out.loss, reference_loss.detach(), rtol=2e-2, atol=2e-2)


def test_chunked_input_errors():
    hs, ws, ht, wt, labels = make_case(seed=50)
    with pytest.raises(DistillError, match="both teacher_hidden and teacher_head"):
        kd_loss_chunked(hs, ws, ht, None, labels)
    with pytest.raises(DistillError, match="method.chunk_size"):
        kd_loss_chunked(hs, ws, ht, wt, labels, chunk_size=0)
    with pytest.raises(DistillError, match="method.divergence"):
        kd_loss_chunked(hs, ws, ht, wt, labels, divergence="kl")
    with pytest.raises(DistillError, match="method.temperature"):
        kd_loss_chunked(hs, ws, ht, wt, labels, temperature=0.0)
    with pytest.raises(DistillError, match="expected student_hidden"):
        kd_loss_chunked(hs, ws, ht, wt, labels[:-1])


def test_chunked_backward_twice_is_refused():
    hs, ws, ht, wt, labels = make_case(seed=51)
    out = kd_loss_chunked(hs, ws, ht, wt, labels)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        out.loss.backward()
