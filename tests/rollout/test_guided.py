"""Guided decoding inside the loop (spec 1.3-1.6): one-pass candidate scoring, offsets,
whole guided trajectories against brute-force recomputation with separate full forwards,
the guided next-token distribution (statistical test), and the no-op cases."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qsharp_jax.checkpoints import loader
from qsharp_jax.guidance import model as G
from qsharp_jax.models import decoder as M
from qsharp_jax.models.config import ModelConfig
from qsharp_jax.models.decoder import init_cache, positions_from_mask
from qsharp_jax.rollout.engine import candidate_scores, decode_jit, guidance_offsets
from qsharp_jax.rollout.sampler import Sampler
from qsharp_jax.rollout.state import SamplerConfig

from conftest import sorted_nucleus

VOCAB = 256
# One setting shared by the loop tests, so they reuse compiled loops (knobs are traced).
PROMPTS, N, MAX_NEW, K = [[5, 17, 33, 60, 2], [71, 8]], 2, 5, 6


def standard_sampler(ref, guide=None, guidance="qsharp"):
    return Sampler(ref, guide, SamplerConfig(max_new_tokens=MAX_NEW, k=K, guidance=guidance, prompt_bucket=8))


@pytest.fixture(scope="module")
def ref(tiny_hf_models):
    return loader.load(tiny_hf_models("llama"), tokenizer=False).model


def make_guide(backbone, kind, distribution, scale=40.0, seed=0):
    guide = G.build(nnx.clone(backbone), G.HeadConfig(kind=kind, distribution=distribution, init="normal"), seed=seed)
    guide.head.set_value(guide.head.get_value() * scale)  # O(1) head outputs, so offsets vary
    return guide


@pytest.fixture(scope="module")
def guides(tiny_hf_models):
    # same vocabulary, different weights than the reference
    backbone = loader.load(tiny_hf_models("llama_tied"), tokenizer=False).model
    return {(kind, dist): make_guide(backbone, kind, dist) for kind in "vq" for dist in ("bernoulli", "categorical")}


# ---- brute force: separate full forwards, numpy math ------------------------------------------


@functools.cache
def _full_forward(graphdef, head: bool):
    @jax.jit
    def run(state, tokens, mask):
        model = nnx.merge(graphdef, state)
        if head:  # guide head outputs at every position
            return model(tokens, positions_from_mask(mask), token_mask=mask)[0]
        return M.forward_logits(model, tokens, mask)

    return run


def last_outputs(model, seqs, head: bool, width: int = 32) -> np.ndarray:
    """Outputs at the last position of each (unpadded) sequence, via full forwards (no cache)."""
    tokens = np.zeros((len(seqs), width), np.int32)
    mask = np.zeros((len(seqs), width), bool)
    for i, s in enumerate(seqs):
        tokens[i, width - len(s) :], mask[i, width - len(s) :] = s, True
    graphdef, state = nnx.split(model)
    return np.asarray(_full_forward(graphdef, head)(state, tokens, mask))[:, -1]


def np_offsets(out, distribution, guidance, inv_eta, atoms):
    out = out.astype(np.float64)
    if distribution == "bernoulli":
        if guidance == "cd":
            return inv_eta / (1 + np.exp(-out))
        return np.logaddexp(0, out + inv_eta) - np.logaddexp(0, out)
    log_pmf = out - np.logaddexp.reduce(out, axis=-1, keepdims=True)
    if guidance == "cd":
        return inv_eta * np.sum(np.exp(log_pmf) * atoms, axis=-1)
    off = np.logaddexp.reduce(log_pmf + atoms * inv_eta, axis=-1)
    return off - off.min()


def guided_step_distribution(ref, guide, context, k, guidance, inv_eta, temperature, top_p):
    """(log p of the guided sampling distribution, log q reference at T) for one context, with
    every candidate scored by its own full forward."""
    ref_logits = last_outputs(ref, [context], head=False)[0].astype(np.float64)
    cands = np.argsort(-ref_logits, kind="stable")[:k]
    if guide.head_cfg.kind == "v":
        out = last_outputs(guide, [context + [int(c)] for c in cands], head=True)
    else:
        out = last_outputs(guide, [context], head=True)[0][cands]
    atoms = np.asarray(guide.head_cfg.atom_values(), np.float64)
    logits = ref_logits.copy()
    logits[cands] += np_offsets(out, guide.head_cfg.distribution, guidance, inv_eta, atoms)
    keep = sorted_nucleus(logits[None], temperature, top_p)[0]
    x = logits / temperature
    p = np.where(keep, np.exp(x - x.max()), 0.0)
    p /= p.sum()
    xq = ref_logits / temperature
    log_q = xq - xq.max() - np.log(np.exp(xq - xq.max()).sum())
    return np.log(np.where(keep, p, 1.0)) + np.where(keep, 0.0, -np.inf), log_q


@functools.partial(jax.jit, static_argnums=0)
def _jit_candidate_scores(graphdef, state, cache, newest, position, cands):
    return candidate_scores(nnx.merge(graphdef, state), cache, newest, position, cands)


# ---- tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["v", "q"])
def test_one_pass_candidate_scoring_equals_separate_full_forwards(guides, kind):
    guide = guides[(kind, "categorical")]
    rng = np.random.default_rng(0)
    contexts = [rng.integers(3, VOCAB, n).tolist() for n in (6, 3)]
    width = 8  # left-padded context slots; the newest token is fed with the candidates
    tokens = np.zeros((2, width), np.int32)
    mask = np.zeros((2, width), bool)
    for i, c in enumerate(contexts):
        tokens[i, width - len(c) :], mask[i, width - len(c) :] = c, True
    cache = init_cache(guide.cfg, 2, width + 4)
    _, cache = guide.hidden(
        jnp.asarray(tokens[:, :-1]),
        positions_from_mask(jnp.asarray(mask[:, :-1])),
        token_mask=jnp.asarray(mask[:, :-1]),
        cache=cache,
    )
    newest, position = jnp.asarray(tokens[:, -1]), jnp.asarray(mask.sum(1) - 1, jnp.int32)
    graphdef, state = nnx.split(guide)
    for _ in range(2):  # the second step checks that only the newest token entered the cache
        cands = jnp.asarray(rng.integers(0, VOCAB, (2, 7)), jnp.int32)
        scores, cache = _jit_candidate_scores(graphdef, state, cache, newest, position, cands)
        for i in range(2):
            if kind == "v":
                expected = last_outputs(guide, [contexts[i] + [int(c)] for c in cands[i]], head=True)
            else:
                expected = last_outputs(guide, [contexts[i]], head=True)[0][np.asarray(cands[i])]
            # head outputs are O(10) here (scaled head): 1e-5 relative and absolute
            np.testing.assert_allclose(np.asarray(scores[i]), expected, rtol=1e-5, atol=1e-5)
            contexts[i] = contexts[i] + [int(cands[i, 0])]
        newest, position = cands[:, 0], position + 1


@pytest.mark.parametrize("distribution", ["bernoulli", "categorical"])
@pytest.mark.parametrize("guidance", ["qsharp", "cd"])
def test_offsets_equal_closed_forms(guides, distribution, guidance):
    guide = guides[("v", distribution)]
    rng = np.random.default_rng(1)
    shape = (3, 20) if distribution == "bernoulli" else (3, 20, guide.head_cfg.num_atoms)
    out = rng.normal(size=shape).astype(np.float32) * 3
    atoms = np.asarray(guide.head_cfg.atom_values(), np.float64)
    for inv_eta in (0.5, 10.0):
        got = np.asarray(guidance_offsets(guide, jnp.asarray(out), guidance, jnp.float32(inv_eta)))
        expected = np.stack([np_offsets(o, distribution, guidance, inv_eta, atoms) for o in out])
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
        if distribution == "categorical" and guidance == "qsharp":
            np.testing.assert_allclose(got.min(-1), 0.0, atol=1e-6)  # min-shifted over the k


@pytest.mark.parametrize(
    "kind,distribution,guidance",
    [("v", "bernoulli", "qsharp"), ("v", "categorical", "qsharp"), ("q", "bernoulli", "cd")],
)
def test_guided_trajectories_match_brute_force(ref, guides, kind, distribution, guidance):
    """Every step of sampled guided trajectories against separate full forwards + numpy."""
    guide = guides[(kind, distribution)]
    k, inv_eta, temperature, top_p = K, 3.0, 0.8, 0.9
    out = standard_sampler(ref, guide, guidance).generate(
        PROMPTS, key=jax.random.key(11), n=N, temperature=temperature, top_p=top_p, inv_eta=inv_eta
    )
    for r in range(len(out.lengths)):
        context = list(PROMPTS[out.prompt_index[r]])
        kl_sum = 0.0
        for t in range(int(out.lengths[r])):
            log_p, log_q = guided_step_distribution(ref, guide, context, k, guidance, inv_eta, temperature, top_p)
            token = int(out.tokens[r, t])
            assert np.isfinite(log_p[token])
            p = np.exp(log_p)
            kl = np.sum(np.where(p > 0, p * (log_p - log_q), 0.0))
            np.testing.assert_allclose(out.logp_policy[r, t], log_p[token], atol=5e-5)
            np.testing.assert_allclose(out.logp_ref[r, t], log_q[token], atol=5e-5)
            np.testing.assert_allclose(out.kl_token[r, t], kl, rtol=1e-4, atol=5e-5)
            kl_sum += kl
            context.append(token)
        np.testing.assert_allclose(out.kl_traj[r], kl_sum, rtol=1e-4, atol=1e-4)


def test_empirical_guided_frequencies_match_the_closed_form():
    """Tiny vocabulary, one decode step, 4000 samples from one prompt with a fixed key.
    Tolerance: total variation < 0.04 (its expectation here is ~0.015; fixed seed, so the
    test is deterministic)."""
    cfg = ModelConfig(
        model_type="llama",
        vocab_size=16,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
    )
    ref = M.build(cfg, seed=3)
    ref.embed.set_value(ref.embed.get_value() * 15)  # a non-uniform reference distribution (tied head)
    guide = G.build(M.build(cfg, seed=4), G.HeadConfig(kind="v"), seed=5)
    guide.head.set_value(guide.head.get_value() * 100)
    prompt = [3, 9, 1]
    k, inv_eta, temperature, top_p, n = 6, 2.0, 0.8, 0.9, 4000
    log_p, _ = guided_step_distribution(ref, guide, prompt, k, "qsharp", inv_eta, temperature, top_p)
    log_p_ref, _ = guided_step_distribution(ref, guide, prompt, k, "qsharp", 0.0, temperature, top_p)
    expected = np.exp(log_p)
    assert 0.5 * np.abs(expected - np.exp(log_p_ref)).sum() > 0.1  # guidance moves the distribution
    sampler = Sampler(ref, guide, SamplerConfig(max_new_tokens=1, k=k, prompt_bucket=4))
    out = sampler.generate([prompt], key=jax.random.key(0), n=n, temperature=temperature, top_p=top_p, inv_eta=inv_eta)
    freq = np.bincount(out.tokens[:, 0], minlength=16) / n
    assert np.all(freq[expected == 0] == 0)  # nothing outside the nucleus
    assert 0.5 * np.abs(freq - expected).sum() < 0.04


def test_guidance_off_or_a_no_op_head_gives_exactly_reference_sampling(ref, guides):
    knobs = dict(key=jax.random.key(4), n=N, temperature=0.9, top_p=0.95, inv_eta=10.0)
    plain = standard_sampler(ref).generate(PROMPTS, **knobs)
    # a zero categorical head: every candidate gets the same offset, min-shifted to exactly 0
    zero = make_guide(guides[("v", "categorical")].backbone, "v", "categorical", scale=0.0)
    for guided in (True, False):
        out = standard_sampler(ref, zero).generate(PROMPTS, guided=guided, **knobs)
        np.testing.assert_array_equal(out.tokens, plain.tokens)
        np.testing.assert_array_equal(out.logp_policy, plain.logp_policy)
        np.testing.assert_array_equal(out.kl_token, plain.kl_token)


def test_zero_bernoulli_head_lifts_all_candidates_equally(guides):
    """Spec 1.3: no min-shift for Bernoulli, so a zero head adds ln((1 + e^(1/eta)) / 2) to
    each of the k candidates: a no-op only when k covers the vocabulary (documented)."""
    guide = guides[("v", "bernoulli")]
    for guidance, expected in (("qsharp", np.log((1 + np.exp(10.0)) / 2)), ("cd", 5.0)):
        got = np.asarray(guidance_offsets(guide, jnp.zeros((2, K)), guidance, jnp.float32(10.0)))
        np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_changing_eta_temperature_or_top_p_does_not_recompile_the_guided_loop(ref, guides):
    sampler = standard_sampler(ref, guides[("v", "bernoulli")])
    first = sampler.generate(PROMPTS, key=jax.random.key(0), n=N, inv_eta=10.0, temperature=0.8, top_p=0.9)
    size = decode_jit._cache_size()
    runs = [
        sampler.generate(PROMPTS, key=jax.random.key(0), n=N, **kw)
        for kw in (
            dict(inv_eta=1.0, temperature=0.8, top_p=0.9),
            dict(inv_eta=30.0, temperature=1.2, top_p=0.5),
            dict(inv_eta=10.0, temperature=0.8, top_p=0.9),
        )
    ]
    assert decode_jit._cache_size() == size
    np.testing.assert_array_equal(runs[-1].tokens, first.tokens)
    assert not np.array_equal(runs[0].tokens, first.tokens)
