"""The teacher-forced trajectory KL of a trained policy to the reference, against a float64
brute force over each unpadded row, and against the sampler's in-loop KL when policy = reference."""

import jax
import numpy as np

from qsharp_jax.models import decoder
from qsharp_jax.models.config import ModelConfig
from qsharp_jax.policy import divergence
from qsharp_jax.rollout.sampler import Sampler
from qsharp_jax.rollout.state import SamplerConfig

VOCAB = 16


def _model(seed):
    cfg = ModelConfig(
        model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
        num_kv_heads=2, head_dim=16,
    )  # fmt: skip
    return decoder.build(cfg, seed=seed)


def _log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _sampling_log_probs(logits, temperature, top_p, top_k):
    """float64 HF-order warpers: temperature, top-k, then the smallest nucleus with mass >= top_p."""
    lp = _log_softmax(logits / temperature)
    order = np.argsort(-lp)
    keep = np.zeros(lp.shape, bool)
    keep[order[:top_k] if top_k else order] = True
    p = np.where(keep, np.exp(lp), 0.0)
    p /= p.sum()
    cum = np.cumsum(p[order])
    nucleus = order[: int(np.searchsorted(cum, top_p * cum[-1])) + 1]
    out = np.full(lp.shape, -np.inf)
    out[nucleus] = np.log(p[nucleus] / p[nucleus].sum())
    return out


def _brute_force(policy, reference, prompt, response, temperature, top_p, top_k):
    tokens = np.asarray([list(prompt) + list(response)], np.int32)
    mask = np.ones(tokens.shape, bool)
    lp = np.asarray(decoder.forward_logits(policy, tokens, mask), np.float64)[0]
    lr = np.asarray(decoder.forward_logits(reference, tokens, mask), np.float64)[0]
    total = 0.0
    for t in range(len(response)):
        i = len(prompt) - 1 + t
        log_pi = _sampling_log_probs(lp[i], temperature, top_p, top_k)
        log_ref = _log_softmax(lr[i] / temperature)
        kept = np.isfinite(log_pi)
        total += np.sum(np.exp(log_pi[kept]) * (log_pi[kept] - log_ref[kept]))
    return total


def test_matches_a_float64_brute_force_on_unpadded_rows():
    policy, reference = _model(0), _model(1)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, VOCAB, size=n).tolist() for n in (3, 7, 1, 5, 4)]
    responses = [rng.integers(0, VOCAB, size=n).tolist() for n in (4, 0, 6, 2, 9)]
    got = divergence.trajectory_kl(
        policy, reference, prompts, responses, temperature=0.7, top_p=0.9, top_k=6, rows_per_call=2, bucket=4
    )
    want = [_brute_force(policy, reference, p, r, 0.7, 0.9, 6) for p, r in zip(prompts, responses)]
    # float32 logits agree with the unpadded float64 recomputation to ~1e-6 relative; the KL is
    # smooth in them away from a nucleus boundary, summed over <= 9 tokens
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert got[1] == 0.0  # an empty response


def test_equals_the_samplers_in_loop_kl_when_the_policy_is_the_reference():
    reference = _model(2)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, VOCAB, size=n).tolist() for n in (2, 5, 3)]
    config = SamplerConfig(max_new_tokens=6, prompt_bucket=8, stop_ids=(3,), pad_id=0, slots=0)
    out = Sampler(reference, None, config).generate(prompts, key=jax.random.key(0), n=2, temperature=0.8, top_p=0.7)
    responses = out.completions()
    assert len({len(r) for r in responses}) > 1  # mixed stop times
    kl = divergence.trajectory_kl(
        reference, reference, [prompts[i] for i in out.prompt_index], responses, temperature=0.8, top_p=0.7
    )
    # the decode loop's KV-cached logits vs a full forward: the same float32 values up to
    # reduction order (~1e-6 relative), so the per-row sums agree to the same order
    np.testing.assert_allclose(kl, out.kl_traj, rtol=1e-4, atol=1e-5)
    assert np.all(out.kl_traj > 0.0)  # top-p 0.7 truncates: the sampled policy is not pi_ref
