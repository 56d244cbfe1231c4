"""Sampling pieces: exact sort-free top-p / top-k against sort-based references, greedy,
the inverse-CDF sampler, KL, and no recompilation when knobs change."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsharp_jax.core import sampling

from conftest import sorted_nucleus

log_probs_jit = jax.jit(sampling.sampling_log_probs)


@pytest.mark.parametrize("seed", range(6))
def test_top_p_equals_sorted_nucleus(seed):
    rng = np.random.default_rng(seed)
    # rows from flat (nucleus of thousands: bisection) to peaked (nucleus within the top 128)
    logits = (rng.normal(size=(8, 3000)) * rng.uniform(0.3, 8, size=(8, 1))).astype(np.float32)
    sizes = set()
    for temperature, top_p in [(0.8, 0.9), (1.0, 0.5), (0.3, 0.99), (1.7, 0.05)]:
        log_p = np.asarray(log_probs_jit(jnp.asarray(logits), temperature, top_p))
        keep = sorted_nucleus(logits, temperature, top_p)
        np.testing.assert_array_equal(np.isfinite(log_p), keep)
        sizes.update(keep.sum(-1).tolist())
        # kept probabilities are the renormalised tempered softmax
        x = logits / temperature
        p = np.exp(x - x.max(-1, keepdims=True))
        p = np.where(np.isfinite(log_p), p, 0)
        np.testing.assert_allclose(np.exp(log_p), p / p.sum(-1, keepdims=True), atol=1e-6)
    assert min(sizes) <= 128 < max(sizes)  # both the top-128 path and the bisection path ran


def test_top_k_then_top_p_equals_sorted_reference():
    rng = np.random.default_rng(7)
    logits = (rng.normal(size=(6, 500)) * 3).astype(np.float32)
    for top_k, top_p in [(1, 1.0), (5, 1.0), (40, 0.8), (499, 0.95), (300, 0.5), (200, 0.999)]:
        log_p = np.asarray(log_probs_jit(jnp.asarray(logits), 0.9, top_p, top_k))
        np.testing.assert_array_equal(np.isfinite(log_p), sorted_nucleus(logits, 0.9, top_p, top_k))


def test_ties_at_the_nucleus_boundary_are_all_kept():
    # probabilities 0.4, 0.2, 0.2, 0.2 (log-space): top_p 0.5 needs one of the tied 0.2s;
    # a sort keeps an arbitrary one of them, we keep all three (documented behaviour)
    logits = jnp.log(jnp.asarray([[0.2, 0.4, 0.2, 0.2]]))
    keep = np.isfinite(np.asarray(log_probs_jit(logits, 1.0, 0.5)))
    np.testing.assert_array_equal(keep, [[True, True, True, True]])
    keep = np.isfinite(np.asarray(log_probs_jit(logits, 1.0, 0.35)))
    np.testing.assert_array_equal(keep, [[False, True, False, False]])


def test_greedy_is_a_point_mass_on_the_argmax():
    logits = jnp.asarray([[0.1, 3.0, -1.0], [2.0, 0.0, 1.0]])
    for temperature, greedy in [(0.7, True), (0.0, False)]:
        log_p = np.asarray(log_probs_jit(logits, temperature, 0.9, 0, greedy))
        np.testing.assert_array_equal(np.exp(log_p), [[0, 1, 0], [1, 0, 0]])
        assert list(np.asarray(sampling.sample(jax.random.key(0), jnp.asarray(log_p)))) == [1, 0]


def test_sample_frequencies_match_probabilities_and_skip_filtered_tokens():
    # 600 tokens spans three CDF blocks; every other token filtered out
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.full(600, 0.3)) * (np.arange(600) % 2 == 0)
    probs /= probs.sum()
    n = 40000
    log_p = jnp.log(jnp.broadcast_to(jnp.asarray(probs, jnp.float32), (n, 600)))
    tokens = np.asarray(sampling.sample(jax.random.key(2), log_p))
    assert np.all(probs[tokens] > 0)
    freq = np.bincount(tokens, minlength=600) / n
    # total variation: E ~ 0.5 * sum sqrt(p/n) ~ 0.05 here; fixed seed, bound 0.08
    assert 0.5 * np.abs(freq - probs).sum() < 0.08


def test_kl_matches_numpy_and_drops_zero_terms():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(4, 50)).astype(np.float32) * 2
    log_p = np.asarray(log_probs_jit(jnp.asarray(logits), 0.8, 0.7))
    log_q = np.asarray(sampling.reference_log_probs(jnp.asarray(logits), 0.8))
    p = np.exp(log_p)
    expected = [
        sum(pi * (lpi - lqi) for pi, lpi, lqi in zip(pr, lpr, lqr) if pi > 0) for pr, lpr, lqr in zip(p, log_p, log_q)
    ]
    np.testing.assert_allclose(
        np.asarray(sampling.kl_divergence(jnp.asarray(log_p), jnp.asarray(log_q))), expected, rtol=1e-5
    )


def test_changing_knobs_does_not_recompile():
    logits = jnp.zeros((2, 101))
    log_probs_jit(logits, 0.8, 0.9, 0, False)
    compiled = log_probs_jit._cache_size()  # jit caches are shared per function: compare counts
    for knobs in [(1.2, 0.5, 0, False), (0.5, 1.0, 7, False), (1.0, 0.3, 3, True)]:
        log_probs_jit(logits, *knobs)
    assert log_probs_jit._cache_size() == compiled
