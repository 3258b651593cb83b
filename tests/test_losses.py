"""Tests for mlx_student.losses against independent float64 numpy references."""

import math

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_student import losses

RTOL, ATOL = 1e-5, 1e-6
TAILS = ["renorm", "zero", "bucket"]


# ----------------------------------------------------------------------------
# numpy float64 references, written from the definitions, one position at a time


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def np_kl(log_p, log_q):
    p = np.exp(log_p)
    keep = p > 0
    return float(np.sum(p[keep] * (log_p[keep] - log_q[keep])))


def ref_mean(per_token, mask):
    """Mean of per_token(b, l) over positions with nonzero mask (weighted)."""
    mask = np.asarray(mask, np.float64)
    total = sum(mask[b, l] * per_token(b, l) for b, l in zip(*np.nonzero(mask)))
    return total / max(mask.sum(), 1.0)


def ref_ce(logits, targets, mask):
    return ref_mean(lambda b, l: -np_log_softmax(logits[b, l])[targets[b, l]], mask)


def ref_forward_kl(logits, teacher, mask, T=1.0):
    def per_token(b, l):
        log_p = np_log_softmax(teacher[b, l] / T)
        return np_kl(log_p, np_log_softmax(logits[b, l] / T))

    return T**2 * ref_mean(per_token, mask)


def ref_reverse_kl(logits, teacher, mask, T=1.0):
    return ref_forward_kl(teacher, logits, mask, T)


def ref_jsd(logits, teacher, mask, beta=0.5, T=1.0):
    def per_token(b, l):
        p = np.exp(np_log_softmax(teacher[b, l] / T))
        q = np.exp(np_log_softmax(logits[b, l] / T))
        m = beta * p + (1 - beta) * q
        kl_pm = sum(pi * math.log(pi / mi) for pi, mi in zip(p, m) if pi > 0)
        kl_qm = sum(qi * math.log(qi / mi) for qi, mi in zip(q, m) if qi > 0)
        return beta * kl_pm + (1 - beta) * kl_qm

    return T**2 * ref_mean(per_token, mask)


def ref_topk_kd(logits, ids, logprobs, mask, T=1.0, tail="bucket"):
    def per_token(b, l):
        keep = np.isfinite(logprobs[b, l])
        if not keep.any():
            return 0.0
        lp = logprobs[b, l][keep].astype(np.float64)
        idx = ids[b, l][keep]
        x = logits[b, l].astype(np.float64)
        if tail == "renorm":
            return T**2 * np_kl(np_log_softmax(lp / T), np_log_softmax(x[idx] / T))
        q = np.exp(np_log_softmax(x))[idx]
        if tail == "zero":  # the teacher renormalized over its top-k
            lp = lp - np.log(np.exp(lp).sum())
        p = np.exp(lp)
        loss = np.sum(p * (lp - np.log(q)))
        if tail == "bucket":
            p_tail = max(1.0 - p.sum(), 0.0)
            q_tail = max(1.0 - q.sum(), 1e-12)
            if p_tail > 0:
                loss += p_tail * (math.log(p_tail) - math.log(q_tail))
        return loss

    return ref_mean(per_token, mask)


# ----------------------------------------------------------------------------
# data


def make_batch(seed, B=3, L=5, V=11, K=4, scale=3.0):
    """Random float32 batch; masked positions hold extreme logits (+-1e4).

    Row 0 is fully masked; top-k entries are randomly padded (-inf, id 0),
    sometimes entirely.
    """
    rng = np.random.default_rng(seed)
    mask = rng.random((B, L)) < 0.6
    mask[0] = False
    mask[-1, 0] = True
    extreme = rng.choice([-1e4, 1e4], size=(B, L, V))
    logits = np.where(mask[..., None], rng.normal(size=(B, L, V)) * scale, extreme)
    teacher = np.where(mask[..., None], rng.normal(size=(B, L, V)) * scale, -extreme)
    targets = rng.integers(0, V, size=(B, L))

    ids = np.argsort(-teacher, axis=-1)[..., :K]
    logprobs = np.take_along_axis(np_log_softmax(teacher), ids, axis=-1)
    n_pad = rng.integers(0, K + 1, size=(B, L))
    padded = np.arange(K) >= (K - n_pad[..., None])
    ids = np.where(padded, 0, ids)
    logprobs = np.where(padded, -np.inf, logprobs)
    logprobs = np.where(mask[..., None], logprobs, rng.choice([-1e4, 1e4], (B, L, K)))
    return {
        "logits": logits.astype(np.float32),
        "teacher_logits": teacher.astype(np.float32),
        "targets": targets.astype(np.int32),
        "mask": mask,
        "topk_ids": ids.astype(np.int32),
        "topk_logprobs": logprobs.astype(np.float32),
    }


def to_mx(batch):
    return {k: mx.array(v) for k, v in batch.items()}


def close(actual, expected, rtol=RTOL, atol=ATOL):
    assert actual.shape == () and actual.dtype == mx.float32
    np.testing.assert_allclose(actual.item(), expected, rtol=rtol, atol=atol)


def all_losses(m):
    """Every loss on an mx batch, as name -> scalar."""
    out = {
        "ce": losses.cross_entropy(m["logits"], m["targets"], m["mask"]),
        "forward_kl": losses.forward_kl(m["logits"], m["teacher_logits"], m["mask"]),
        "reverse_kl": losses.reverse_kl(m["logits"], m["teacher_logits"], m["mask"]),
        "jsd": losses.jsd(m["logits"], m["teacher_logits"], m["mask"], beta=0.3),
    }
    for tail in TAILS:
        out[f"topk_{tail}"] = losses.topk_kd(
            m["logits"], m["topk_ids"], m["topk_logprobs"], m["mask"], tail=tail
        )
    return out


seeds = st.integers(0, 2**32 - 1)


# ----------------------------------------------------------------------------
# agreement with the references


@settings(max_examples=25, deadline=None)
@given(seed=seeds, float_mask=st.booleans())
def test_cross_entropy_matches_reference(seed, float_mask):
    b = make_batch(seed)
    mask = b["mask"].astype(np.float32) if float_mask else b["mask"]
    m = to_mx(b)
    loss = losses.cross_entropy(m["logits"], m["targets"], mx.array(mask))
    close(loss, ref_ce(b["logits"], b["targets"], mask))


@settings(max_examples=25, deadline=None)
@given(
    seed=seeds,
    T=st.sampled_from([0.5, 1.0, 2.0]),
    beta=st.floats(0.05, 0.95),
)
def test_dense_kd_matches_reference(seed, T, beta):
    b = make_batch(seed)
    m = to_mx(b)
    args = (m["logits"], m["teacher_logits"], m["mask"])
    ref_args = (b["logits"], b["teacher_logits"], b["mask"])
    close(losses.forward_kl(*args, temperature=T), ref_forward_kl(*ref_args, T))
    close(losses.reverse_kl(*args, temperature=T), ref_reverse_kl(*ref_args, T))
    close(losses.jsd(*args, beta=beta, temperature=T), ref_jsd(*ref_args, beta, T))


@settings(max_examples=30, deadline=None)
@given(seed=seeds, tail=st.sampled_from(TAILS), T=st.sampled_from([0.5, 1.0, 3.0]))
def test_topk_kd_matches_reference(seed, tail, T):
    T = T if tail == "renorm" else 1.0
    b = make_batch(seed)
    m = to_mx(b)
    loss = losses.topk_kd(
        m["logits"], m["topk_ids"], m["topk_logprobs"], m["mask"], T, tail
    )
    close(
        loss,
        ref_topk_kd(b["logits"], b["topk_ids"], b["topk_logprobs"], b["mask"], T, tail),
    )


# ----------------------------------------------------------------------------
# masking


def test_masked_positions_have_no_effect():
    b = make_batch(0)
    expected = all_losses(to_mx(b))
    for key in ("logits", "teacher_logits", "topk_logprobs"):
        b[key] = np.where(b["mask"][..., None], b[key], 0.0).astype(np.float32)
    for name, loss in all_losses(to_mx(b)).items():
        assert loss.item() == expected[name].item(), name


def test_teacher_logits_may_be_minus_inf():
    """-inf teacher logits (e.g. padded vocab) are fine, and give no NaN when
    masked even where the per-token loss is infinite (reverse KL)."""
    b = make_batch(12)
    b["teacher_logits"][..., :3] = -np.inf
    m = to_mx(b)
    args = (m["logits"], m["teacher_logits"], m["mask"])
    ref_args = (b["logits"], b["teacher_logits"], b["mask"])
    close(losses.forward_kl(*args), ref_forward_kl(*ref_args))
    close(losses.jsd(*args), ref_jsd(*ref_args))
    # Teacher == student where unmasked; masked positions have KL(q || p) = inf.
    teacher = np.where(b["mask"][..., None], b["logits"], b["teacher_logits"])
    loss = losses.reverse_kl(m["logits"], mx.array(teacher), m["mask"])
    assert abs(loss.item()) < 1e-6


def test_fully_masked_batch_is_zero():
    b = make_batch(1)
    b["mask"][:] = False
    for name, loss in all_losses(to_mx(b)).items():
        assert loss.item() == 0.0, name


# ----------------------------------------------------------------------------
# sanity identities


def test_cross_entropy_of_uniform_logits_is_log_v():
    V = 37
    logits = mx.full((2, 3, V), 5.0)
    targets = mx.array(np.random.default_rng(0).integers(0, V, (2, 3)))
    close(losses.cross_entropy(logits, targets, mx.ones((2, 3))), math.log(V))


def test_divergences_of_identical_distributions_are_zero():
    m = to_mx(make_batch(2))
    x = m["logits"]
    for fn in (losses.forward_kl, losses.reverse_kl, losses.jsd):
        assert abs(fn(x, x, m["mask"], temperature=2.0).item()) < 1e-6


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.8])
def test_jsd_swapping_roles_equals_one_minus_beta(beta):
    m = to_mx(make_batch(3))
    a, b, mask = m["logits"], m["teacher_logits"], m["mask"]
    swapped = losses.jsd(b, a, mask, beta=1 - beta)
    close(losses.jsd(a, b, mask, beta=beta), swapped.item())


def test_temperature_scaling():
    b = make_batch(4)
    m = to_mx(b)
    T = 2.5
    loss = losses.forward_kl(m["logits"], m["teacher_logits"], m["mask"], T)
    close(loss, ref_forward_kl(b["logits"], b["teacher_logits"], b["mask"], T))
    unscaled = losses.forward_kl(m["logits"] / T, m["teacher_logits"] / T, m["mask"])
    close(loss, T**2 * unscaled.item())


@pytest.mark.parametrize("tail,T", [("zero", 1.0), ("bucket", 1.0), ("renorm", 2.0)])
def test_topk_with_full_vocab_equals_forward_kl(tail, T):
    """With K = V the top-k is the whole teacher distribution (tail mass 0)."""
    b = make_batch(5, V=16)
    m = to_mx(b)
    ids = mx.argsort(-m["teacher_logits"], axis=-1).astype(mx.int32)
    log_p = m["teacher_logits"] - mx.logsumexp(m["teacher_logits"], -1, keepdims=True)
    logprobs = mx.take_along_axis(log_p, ids, axis=-1)
    loss = losses.topk_kd(m["logits"], ids, logprobs, m["mask"], T, tail)
    expected = losses.forward_kl(m["logits"], m["teacher_logits"], m["mask"], T)
    close(loss, expected.item(), rtol=1e-5, atol=1e-5)


def test_topk_tails_on_a_truncated_teacher_are_divergences():
    """Teacher top-2 [ln 0.5, ln 0.3] (tail mass 0.2) vs student [0.6, 0.35, 0.05]: every tail
    is a KL divergence (>= 0), against numpy on the formulas of the topk_kd docstring."""
    p, q = np.array([0.5, 0.3]), np.array([0.6, 0.35, 0.05])
    p_hat, q_hat = p / p.sum(), q[:2] / q[:2].sum()
    want = {"bucket": np.sum(p * np.log(p / q[:2])) + 0.2 * np.log(0.2 / 0.05),
            "zero": np.sum(p_hat * np.log(p_hat / q[:2])),
            "renorm": np.sum(p_hat * np.log(p_hat / q_hat))}
    assert want["bucket"] == pytest.approx(0.139853, abs=5e-7)
    assert want["renorm"] == pytest.approx(9.28e-5, abs=5e-7)
    args = (mx.array(np.log(q)[None, None]), mx.array([[[0, 1]]]),
            mx.array(np.log(p)[None, None].astype(np.float32)), mx.ones((1, 1)))
    for tail in TAILS:
        got = losses.topk_kd(*args, tail=tail)
        close(got, want[tail])
        assert got.item() >= 0, tail


@pytest.mark.parametrize("tail", TAILS)
def test_topk_padding_is_ignored(tail):
    b = make_batch(6)
    B, L, K = b["topk_ids"].shape
    ids = np.argsort(-b["teacher_logits"], axis=-1)[..., :K].astype(np.int32)
    lps = np.take_along_axis(np_log_softmax(b["teacher_logits"]), ids, -1)
    lps = lps.astype(np.float32)  # K real entries everywhere, no padding
    logits, mask = mx.array(b["logits"]), mx.array(b["mask"])
    base = losses.topk_kd(logits, mx.array(ids), mx.array(lps), mask, tail=tail)

    pad_ids = np.concatenate([ids, np.zeros((B, L, 2), np.int32)], axis=-1)
    pad_lps = np.concatenate([lps, np.full((B, L, 2), -np.inf, np.float32)], axis=-1)
    padded = losses.topk_kd(
        logits, mx.array(pad_ids), mx.array(pad_lps), mask, tail=tail
    )
    assert math.isfinite(padded.item())
    close(padded, base.item())
    close(padded, ref_topk_kd(b["logits"], ids, lps, b["mask"], tail=tail))


# ----------------------------------------------------------------------------
# gradients


@pytest.mark.parametrize(
    "name", ["ce", "forward_kl", "reverse_kl", "jsd", "renorm", "zero", "bucket"]
)
def test_gradients_finite_and_zero_at_masked_positions(name):
    b = make_batch(7)
    b["topk_logprobs"][-1, 0] = -np.inf  # an unmasked position with no teacher entry
    m = to_mx(b)

    def loss_fn(logits):
        if name == "ce":
            return losses.cross_entropy(logits, m["targets"], m["mask"])
        if name in TAILS:
            return losses.topk_kd(
                logits, m["topk_ids"], m["topk_logprobs"], m["mask"], tail=name
            )
        return getattr(losses, name)(logits, m["teacher_logits"], m["mask"])

    grad = np.array(mx.grad(loss_fn)(m["logits"]))
    assert np.isfinite(grad).all()
    assert (grad[~b["mask"]] == 0).all()
    assert np.abs(grad[b["mask"]]).max() > 0


# ----------------------------------------------------------------------------
# dtypes


def test_bf16_logits_are_upcast():
    b = make_batch(8)
    m = to_mx(b)
    low = dict(
        m,
        logits=m["logits"].astype(mx.bfloat16),
        teacher_logits=m["teacher_logits"].astype(mx.bfloat16),
    )
    rounded = dict(
        low,
        logits=low["logits"].astype(mx.float32),
        teacher_logits=low["teacher_logits"].astype(mx.float32),
    )
    exact, from_bf16, from_rounded = all_losses(m), all_losses(low), all_losses(rounded)
    for name in exact:
        assert from_bf16[name].dtype == mx.float32, name
        # bf16 input computes exactly like fp32 on the same (rounded) values...
        close(from_bf16[name], from_rounded[name].item())
        # ...and stays close to the fp32 result on the unrounded values.
        close(from_bf16[name], exact[name].item(), rtol=3e-2, atol=3e-2)


# ----------------------------------------------------------------------------
# loss_mix


def test_loss_mix_combines_weighted_parts():
    b = make_batch(9)
    m = to_mx(b)
    kd_mask = mx.array(b["mask"] & (np.arange(b["mask"].shape[1]) % 2 == 0))
    batch = dict(m, kd_mask=kd_mask)
    weights = {"ce": 1.0, "forward_kl": 0.5, "jsd": 0.0, "topk_kd": 2.0}
    total, parts = losses.loss_mix(m["logits"], batch, weights, beta=0.3, tail="zero")

    assert set(parts) == {"ce", "forward_kl", "topk_kd"}
    close(parts["ce"], ref_ce(b["logits"], b["targets"], b["mask"]))
    kd = np.array(kd_mask)
    close(parts["forward_kl"], ref_forward_kl(b["logits"], b["teacher_logits"], kd))
    close(
        parts["topk_kd"],
        ref_topk_kd(b["logits"], b["topk_ids"], b["topk_logprobs"], kd, tail="zero"),
    )
    expected = sum(weights[k] * parts[k].item() for k in parts)
    close(total, expected)


def test_loss_mix_kd_mask_defaults_to_mask():
    m = to_mx(make_batch(10))
    weights = {"reverse_kl": 1.0, "jsd": 1.0}
    _, parts = losses.loss_mix(m["logits"], m, weights, temperature=2.0, beta=0.7)
    args = (m["logits"], m["teacher_logits"], m["mask"])
    close(parts["reverse_kl"], losses.reverse_kl(*args, temperature=2.0).item())
    close(parts["jsd"], losses.jsd(*args, beta=0.7, temperature=2.0).item())


def test_loss_mix_errors():
    m = to_mx(make_batch(11))
    logits = m["logits"]
    with pytest.raises(ValueError, match=r"Unknown loss name\(s\) \['kl'\]; valid"):
        losses.loss_mix(logits, m, {"kl": 1.0})
    no_topk = {k: v for k, v in m.items() if k != "topk_logprobs"}
    missing = r"'topk_kd' needs batch key\(s\) \['topk_logprobs'\]"
    with pytest.raises(ValueError, match=missing):
        losses.loss_mix(logits, no_topk, {"topk_kd": 1.0})
    with pytest.raises(ValueError, match=r"Unknown tail 'full'; valid values are"):
        losses.loss_mix(logits, m, {"topk_kd": 1.0}, tail="full")
    for tail in ("zero", "bucket"):
        with pytest.raises(ValueError, match=r"needs temperature=1 .*top-k is unknown"):
            losses.loss_mix(logits, m, {"topk_kd": 1.0}, temperature=2.0, tail=tail)
    for beta in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"beta must be in \(0, 1\) exclusive"):
            losses.loss_mix(logits, m, {"jsd": 1.0}, beta=beta)
    with pytest.raises(ValueError, match=r"temperature must be > 0"):
        losses.loss_mix(logits, m, {"forward_kl": 1.0}, temperature=0.0)
    # Missing but zero-weighted terms are skipped entirely.
    total, parts = losses.loss_mix(logits, no_topk, {"ce": 1.0, "topk_kd": 0.0})
    assert set(parts) == {"ce"}
