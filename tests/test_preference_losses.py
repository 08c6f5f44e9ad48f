"""Preference losses against float64 references written from the papers' formulas (values and gradients), the chunked
sequence log-probs against full logits, and DPO against TRL's own function when TRL is installed."""
from __future__ import annotations

import inspect
import math

import pytest
import torch

from distill.errors import DistillError
from distill.losses.preference import PAIR_LOSSES, PreferenceSettings, kto_loss, pair_loss, sequence_log_probs


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def reference_pair_loss(c, r, rc, rr, nc, nr, s: PreferenceSettings) -> torch.Tensor:
    """The mean loss over pairs in float64, one pair at a time, straight from each method's definition."""
    total = torch.zeros((), dtype=torch.float64)
    for i in range(len(c)):
        if s.loss == "sigmoid":
            h = s.beta * ((c[i] - rc[i]) - (r[i] - rr[i]))
            term = -(1 - s.label_smoothing) * torch.nn.functional.logsigmoid(h) \
                - s.label_smoothing * torch.nn.functional.logsigmoid(-h)
        elif s.loss == "ipo":  # Azar et al.: (h - 1/(2 tau))^2 on per-token log-ratios
            h = (c[i] / nc[i] - rc[i] / nc[i]) - (r[i] / nr[i] - rr[i] / nr[i])
            term = (h - 1 / (2 * s.beta)) ** 2
        elif s.loss == "hinge":  # SLiC: max(0, 1 - beta h)
            h = (c[i] - rc[i]) - (r[i] - rr[i])
            term = torch.clamp(1 - s.beta * h, min=0)
        else:  # SimPO: -log s(beta/|y_w| log p_w - beta/|y_l| log p_l - gamma), label smoothing as in TRL's CPO
            h = s.beta * c[i] / nc[i] - s.beta * r[i] / nr[i] - s.simpo_gamma
            term = -(1 - s.label_smoothing) * torch.nn.functional.logsigmoid(h) \
                - s.label_smoothing * torch.nn.functional.logsigmoid(-h)
        total = total + term
    mean = total / len(c)
    if s.sft_weight:
        mean = mean + s.sft_weight * (-c.sum() / nc.sum())
    return mean


def random_pairs(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 40, (2, n), generator=g)
    logps = -torch.rand(4, n, generator=g, dtype=torch.float64) * lengths.repeat(2, 1) * 3
    return logps, lengths


SMOOTHED = ("sigmoid", "simpo")  # label smoothing applies to the sigmoid forms
CASES = [(loss, ls, sft) for loss in PAIR_LOSSES for ls, sft in [(0.0, 0.0), (0.2, 0.0), (0.1, 0.5), (0.0, 0.5)]
         if loss in SMOOTHED or ls == 0.0]


@pytest.mark.parametrize("loss, label_smoothing, sft_weight", CASES)
def test_pair_losses_match_float64_references_in_value_and_gradient(loss, label_smoothing, sft_weight):
    settings = PreferenceSettings(loss=loss, beta=0.3, label_smoothing=label_smoothing, sft_weight=sft_weight)
    for seed in range(3):
        logps, (nc, nr) = random_pairs(7, seed)
        ours_in = logps.float().clone().requires_grad_()
        ref_in = logps.clone().requires_grad_()
        ours = pair_loss(*ours_in, nc, nr, settings)
        ref = reference_pair_loss(*ref_in, nc.double(), nr.double(), settings)
        ours.loss.backward()
        ref.backward()
        assert ours.loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
        torch.testing.assert_close(ours_in.grad.double(), ref_in.grad, rtol=1e-4, atol=1e-6)


def test_rewards_margin_and_accuracy_are_what_they_say():
    chosen, rejected = torch.tensor([-5.0, -9.0, -3.0]), torch.tensor([-7.0, -4.0, -3.5])
    ref_c, ref_r = torch.tensor([-6.0, -6.0, -6.0]), torch.tensor([-6.0, -6.0, -6.0])
    n = torch.tensor([4, 4, 4])
    out = pair_loss(chosen, rejected, ref_c, ref_r, n, n, PreferenceSettings(beta=0.5))
    margins = 0.5 * ((chosen - ref_c) - (rejected - ref_r))
    assert out.margin.item() == pytest.approx(margins.mean().item())
    assert out.accuracy.item() == pytest.approx(2 / 3)
    assert out.chosen_logp.item() == pytest.approx(chosen.mean().item())
    assert out.rejected_logp.item() == pytest.approx(rejected.mean().item())


def test_simpo_ignores_the_reference_and_an_unknown_loss_is_refused():
    logps, (nc, nr) = random_pairs(5, 11)
    s = PreferenceSettings(loss="simpo", beta=2.0)
    a = pair_loss(logps[0], logps[1], logps[2], logps[3], nc, nr, s).loss
    b = pair_loss(logps[0], logps[1], torch.zeros(5, dtype=torch.float64), logps[2], nc, nr, s).loss
    assert a.item() == b.item()
    with pytest.raises(DistillError, match="method.loss"):
        pair_loss(logps[0], logps[1], logps[2], logps[3], nc, nr, PreferenceSettings(loss="orpo"))


def test_kto_matches_a_float64_reference():
    g = torch.Generator().manual_seed(5)
    logp, ref = -torch.rand(2, 9, generator=g, dtype=torch.float64) * 30
    desirable = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1])
    kl = torch.tensor(0.7, dtype=torch.float64)
    ours_in = logp.float().clone().requires_grad_()
    ref_in = logp.clone().requires_grad_()
    ours = kto_loss(ours_in, ref.float(), desirable, kl.float(), beta=0.2, desirable_weight=1.0,
                    undesirable_weight=1.5)
    terms, weights = [], []
    for i in range(9):
        r = ref_in[i] - ref[i]
        if desirable[i]:
            terms.append(1.0 * (1 - torch.sigmoid(0.2 * (r - kl))))
            weights.append(1.0)
        else:
            terms.append(1.5 * (1 - torch.sigmoid(0.2 * (kl - r))))
            weights.append(1.5)
    expected = torch.stack(terms).sum() / sum(weights)
    ours.backward()
    expected.backward()
    assert ours.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(ours_in.grad.double(), ref_in.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_sequence_log_probs_equal_full_logits(chunk):
    g = torch.Generator().manual_seed(chunk)
    hidden = torch.randn(3, 11, 16, generator=g)
    head = torch.randn(50, 16, generator=g)
    labels = torch.randint(0, 50, (3, 11), generator=g)
    labels[0, :4] = -100
    labels[2, 7:] = -100
    h, w = hidden.clone().requires_grad_(), head.clone().requires_grad_()
    sums, counts = sequence_log_probs(h, w, labels, chunk_size=chunk)
    (sums * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
    h64, w64 = hidden.double().requires_grad_(), head.double().requires_grad_()
    logp = torch.log_softmax(h64 @ w64.t(), dim=-1)  # the simple path: full [B, T, V] logits
    valid = labels != -100
    picked = logp.gather(2, labels.clamp(min=0).unsqueeze(2)).squeeze(2) * valid
    expected = picked.sum(1)
    (expected * torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(sums.double(), expected.detach(), rtol=1e-5, atol=1e-4)
    assert counts.tolist() == valid.sum(1).tolist()
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-4)


def test_sequence_log_probs_refuses_wrong_shapes():
    with pytest.raises(DistillError, match="sequence_log_probs"):
        sequence_log_probs(torch.zeros(4, 8), torch.zeros(10, 8), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_sigmoid_loss_equals_trls_dpo_loss(label_smoothing):
    trl = pytest.importorskip("trl", reason="TRL is an optional test dependency (pip install trl)")
    logps, (nc, nr) = random_pairs(6, 3)
    logps = logps.float()
    ours = pair_loss(*logps, nc, nr, PreferenceSettings(beta=0.1, label_smoothing=label_smoothing))
    trainer = object.__new__(trl.DPOTrainer)  # only dpo_loss is called: no model, no data
    for name, value in {"beta": 0.1, "label_smoothing": label_smoothing, "loss_type": "sigmoid",
                        "reference_free": False, "f_divergence_type": "reverse_kl", "use_weighting": False,
                        "ld_alpha": None, "aux_loss_enabled": False}.items():
        setattr(trainer, name, value)
    trainer.args = type("Args", (), {"use_weighting": False, "ld_alpha": None, "loss_type": ["sigmoid"],
                                     "label_smoothing": label_smoothing, "beta": 0.1})()
    params = inspect.signature(trainer.dpo_loss).parameters
    extra = {"loss_type": "sigmoid"} if "loss_type" in params else {}
    losses, chosen_rewards, rejected_rewards = trainer.dpo_loss(*logps, **extra)[:3]
    assert ours.loss.item() == pytest.approx(losses.mean().item(), rel=1e-5)
    assert ours.margin.item() == pytest.approx((chosen_rewards - rejected_rewards).mean().item(), rel=1e-5)
