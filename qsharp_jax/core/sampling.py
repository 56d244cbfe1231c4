"""Next-token sampling: temperature, top-k, exact top-p, greedy, and the log-probs of the
distribution actually sampled. Every knob is a traced value, so changing it never recompiles.

Why no sort: an XLA:CPU sort of [16, 49152] costs more than a whole decoder step. Top-k
and top-p are both "keep every token whose probability is at least a per-row threshold".
The threshold is read off the 128 largest probabilities (``lax.top_k``, a cheap partial
sort) when the nucleus fits in them, which is the common case; otherwise it is found by
bisection over the bit pattern of a float32 probability (non-negative floats order like
their int32 bits), 30 masked reductions, exact. Either way the kept set is exactly the
sorted nucleus; when several tokens tie at the boundary probability all of them are kept
(a sort would keep an arbitrary subset).

Sampling draws one uniform per row and inverts the CDF in two levels (block sums, then
inside one block), which avoids a full-vocab cumsum and a full-vocab Gumbel draw.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_ONE_BITS = 0x3F800000  # int32 bits of 1.0f: the largest probability
_CDF_BLOCK = 256  # vocabulary block size of the two-level inverse CDF
_TOP_CANDIDATES = 128  # nuclei up to this size are read off lax.top_k; wider ones bisect


def _largest_threshold(probs: jax.Array, is_enough) -> jax.Array:
    """Per row, the largest float32 t in [0, 1] with ``is_enough(t)`` true, where
    ``is_enough(t[N])`` looks at ``probs >= t`` and is monotone (true for small t).
    Bisection on the int32 bits of t, so the answer is exact (a value of probs)."""
    n = probs.shape[0]
    lo = jnp.zeros((n,), jnp.int32)  # is_enough(0) holds by contract
    hi = jnp.full((n,), _ONE_BITS + 1, jnp.int32)  # exclusive

    def body(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        ok = is_enough(jax.lax.bitcast_convert_type(mid, jnp.float32))
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 30, body, (lo, hi))  # hi - lo <= 2^30 -> 1
    return jax.lax.bitcast_convert_type(lo, jnp.float32)


def top_k_threshold(probs: jax.Array, top_k) -> jax.Array:
    """[N] threshold keeping the top_k most likely tokens (ties at the boundary kept);
    0 (keep all) when top_k <= 0. probs: [N, V] (need not be normalised). Bisection."""

    def search(p):
        return _largest_threshold(p, lambda t: jnp.sum(p >= t[:, None], axis=-1) >= top_k)

    return jax.lax.cond(top_k > 0, search, lambda p: jnp.zeros(p.shape[:1], p.dtype), probs)


def top_p_threshold(probs: jax.Array, top_p) -> jax.Array:
    """[N] threshold of the exact nucleus: the largest probability t such that the tokens
    with p >= t hold at least top_p of the mass. probs: [N, V], zeros for filtered tokens,
    need not be normalised (top_p is relative to the row's total). Bisection."""

    def search(p):
        target = top_p * jnp.sum(p, axis=-1)
        return _largest_threshold(p, lambda t: jnp.sum(jnp.where(p >= t[:, None], p, 0.0), axis=-1) >= target)

    return jax.lax.cond(top_p < 1.0, search, lambda p: jnp.zeros(p.shape[:1], p.dtype), probs)


def _thresholds_by_bisection(log_p: jax.Array, top_p, top_k):
    """(keep-threshold [N], kept mass [N]) in probability space, by bisection."""
    p = jnp.exp(log_p)
    p = jnp.where(p >= top_k_threshold(p, top_k)[:, None], p, 0.0)
    threshold = jnp.maximum(top_p_threshold(p, top_p), jnp.finfo(p.dtype).tiny)
    threshold = jnp.maximum(threshold, jnp.min(jnp.where(p > 0, p, jnp.inf), axis=-1))  # the top-k cut
    return threshold, jnp.sum(jnp.where(p >= threshold[:, None], p, 0.0), axis=-1)


def _thresholds_from_top(top_lp: jax.Array, top_p, top_k, vocab: int):
    """(keep-threshold [N], kept mass [N], exact [N]) read off the K largest log-probs
    ``top_lp`` (descending): the nucleus threshold is the first of them whose cumulative
    mass reaches top_p, since all larger ones come before it. ``exact`` is false where
    the nucleus does not fit in the K (or ties run past them)."""
    k_count = top_lp.shape[-1]
    top = jnp.exp(top_lp)
    k_on = top_k > 0
    lp_k = jnp.where(k_on, jnp.take(top_lp, jnp.clip(top_k - 1, 0, k_count - 1), axis=-1), -jnp.inf)
    top = jnp.where(top_lp >= lp_k[:, None], top, 0.0)
    cum = jnp.cumsum(top, axis=-1)
    total = jnp.where(k_on, cum[:, -1], 1.0)  # log_p is normalised; after top-k, the kept mass
    target = jnp.minimum(top_p, 1.0) * total
    boundary = jnp.minimum(jnp.sum(cum < target[:, None], axis=-1), k_count - 1)
    threshold = jnp.take_along_axis(top, boundary[:, None], axis=-1)[:, 0]
    mass = jnp.sum(jnp.where(top >= threshold[:, None], top, 0.0), axis=-1)
    exact = (cum[:, -1] >= target) & (top_k <= k_count)
    if k_count < vocab:
        exact &= top[:, -1] < threshold  # no tie with the threshold beyond the K
    return threshold, mass, exact


def filter_log_probs(log_p: jax.Array, top_p=1.0, top_k=0) -> jax.Array:
    """Top-k then exact top-p on normalised log-probs [N, V]; filtered tokens get -inf and
    the kept ones are renormalised. Reads the thresholds off ``lax.top_k`` when every
    row's nucleus fits in the 128 largest; otherwise bisection for the whole batch."""

    def filtered(log_p):
        top_lp = jax.lax.top_k(log_p, min(_TOP_CANDIDATES, log_p.shape[-1]))[0]
        threshold, mass, exact = _thresholds_from_top(top_lp, top_p, top_k, log_p.shape[-1])
        # the branches return [N] thresholds only: the [N, V] work stays outside the cond
        threshold, mass = jax.lax.cond(
            jnp.all(exact), lambda lp: (threshold, mass), lambda lp: _thresholds_by_bisection(lp, top_p, top_k), log_p
        )
        keep = jnp.exp(log_p) >= threshold[:, None]
        return jnp.where(keep, log_p - jnp.log(mass)[:, None], -jnp.inf)

    return jax.lax.cond((top_p < 1.0) | (top_k > 0), filtered, lambda x: x, log_p)


def sampling_log_probs(logits: jax.Array, temperature, top_p=1.0, top_k=0, greedy=False) -> jax.Array:
    """log-probs [N, V] (float32) of the final sampling distribution: logits / temperature,
    then top-k, then top-p (HF warper order); filtered tokens get -inf. Greedy (or
    temperature <= 0) is a point mass on the argmax."""
    return policy_log_probs(logits, reference_log_probs(logits, temperature), temperature, top_p, top_k, greedy)


def policy_log_probs(
    logits: jax.Array, tempered: jax.Array, temperature, top_p=1.0, top_k=0, greedy=False
) -> jax.Array:
    """:func:`sampling_log_probs` given ``tempered = reference_log_probs(logits, temperature)``
    (shared with the KL's reference side when the logits are the reference's own)."""
    greedy = jnp.logical_or(greedy, temperature <= 0)
    point_mass = jnp.where(jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=bool), 0.0, -jnp.inf)
    return jax.lax.cond(greedy, lambda lp: point_mass, lambda lp: filter_log_probs(lp, top_p, top_k), tempered)


def reference_log_probs(logits: jax.Array, temperature) -> jax.Array:
    """log softmax(logits / temperature) (temperature <= 0 counts as 1): the untruncated
    reference policy the KL is measured against (spec 4.5)."""
    t = jnp.where(temperature <= 0, 1.0, temperature)
    return jax.nn.log_softmax(logits.astype(jnp.float32) / t, axis=-1)


def sample(key: jax.Array, log_probs: jax.Array) -> jax.Array:
    """One token per row from log-probs [N, V] (-inf allowed) by inverse CDF with a single
    uniform per row. Never returns a zero-probability token."""
    n, v = log_probs.shape
    probs = jnp.exp(log_probs)
    nb = -(-v // _CDF_BLOCK)
    probs = jnp.pad(probs, ((0, 0), (0, nb * _CDF_BLOCK - v)))
    blocks = probs.reshape(n, nb, _CDF_BLOCK)
    block_mass = jnp.sum(blocks, axis=-1)  # [N, nb]
    block_cdf = jnp.cumsum(block_mass, axis=-1)
    target = jax.random.uniform(key, (n,), jnp.float32) * block_cdf[:, -1]
    block = _first_above(block_cdf, target, block_mass > 0)
    before = jnp.take_along_axis(block_cdf - block_mass, block[:, None], axis=-1)[:, 0]
    inner = jnp.take_along_axis(blocks, block[:, None, None], axis=1)[:, 0]  # [N, block]
    offset = _first_above(jnp.cumsum(inner, axis=-1), target - before, inner > 0)
    return (block * _CDF_BLOCK + offset).astype(jnp.int32)


def _first_above(cdf: jax.Array, target: jax.Array, positive: jax.Array) -> jax.Array:
    """Index of the first cdf entry > target, clamped to the last positive entry (float
    rounding can push target to the very end)."""
    idx = jnp.sum(cdf <= target[:, None], axis=-1)
    width = cdf.shape[-1]
    last_positive = width - 1 - jnp.argmax(positive[:, ::-1], axis=-1)
    return jnp.minimum(idx, last_positive)


def kl_divergence(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """[N] KL(p || q) = sum_v p (log p - log q) over the last axis; p = 0 terms dropped."""
    p = jnp.exp(log_p)
    terms = jnp.where(p > 0, p * (log_p - log_q), 0.0)
    return jnp.sum(terms, axis=-1)
