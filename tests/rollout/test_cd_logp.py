"""The star-graph CD variant (guidance="cd_logp", spec 1.5 / 8.5): the next-token distribution
is softmax over the reference's top-k candidates of (reference logit + ln p), zero elsewhere."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qsharp_jax.guidance import model as G
from qsharp_jax.models import decoder as M
from qsharp_jax.models.config import ModelConfig
from qsharp_jax.rollout.sampler import Sampler
from qsharp_jax.rollout.state import SamplerConfig

CFG = ModelConfig(
    model_type="llama", vocab_size=24, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
    num_kv_heads=2, head_dim=16,
)  # fmt: skip


def test_cd_logp_first_step_distribution_matches_brute_force():
    ref = M.build(CFG, seed=1)
    guide = G.build(M.build(CFG, seed=2), G.HeadConfig(kind="v", distribution="bernoulli", init="normal"), seed=3)
    guide.head.set_value(guide.head.get_value() * 60.0)  # O(1) logits, so ln p varies
    prompts = [[3, 9, 4, 11, 7], [5, 6, 2, 8, 1]]
    k = 5
    sampler = Sampler(ref, guide, SamplerConfig(max_new_tokens=1, k=k, guidance="cd_logp", prompt_bucket=8))
    out = sampler.generate(prompts, key=jax.random.key(0), n=64, temperature=1.0, top_k=k, inv_eta=10.0)
    seen = set()
    for row in range(out.tokens.shape[0]):
        prompt = prompts[out.prompt_index[row]]
        tokens = jnp.asarray([prompt])
        ref_logits = np.asarray(M.forward_logits(ref, tokens, jnp.ones_like(tokens, bool)))[0, -1]
        cands = np.argsort(-ref_logits)[:k]
        seqs = jnp.asarray([[*prompt, int(c)] for c in cands])
        head, _ = guide(seqs, M.positions_from_mask(jnp.ones_like(seqs, bool)))
        logits = ref_logits[cands] + np.asarray(jax.nn.log_sigmoid(head[:, -1]))
        logp = logits - np.logaddexp.reduce(logits)
        tok = int(out.tokens[row, 0])
        assert tok in cands.tolist()  # never a token outside the candidates
        np.testing.assert_allclose(out.logp_policy[row, 0], logp[cands.tolist().index(tok)], atol=2e-4)
        # KL(policy || reference) of the step, from the closed form
        ref_lp = ref_logits - np.logaddexp.reduce(ref_logits)
        kl = np.sum(np.exp(logp) * (logp - ref_lp[cands]))
        np.testing.assert_allclose(out.kl_token[row, 0], kl, rtol=1e-3, atol=1e-5)
        seen.add(tok)
    assert len(seen) > 2  # several candidates were sampled: the check covered more than the argmax


def test_cd_logp_with_a_sure_head_is_the_truncated_reference():
    """p = 1 everywhere (ln p = 0): sampling is the reference restricted to its top-k."""
    ref = M.build(CFG, seed=1)
    guide = G.build(nnx.clone(ref), G.HeadConfig(kind="v", distribution="bernoulli", init="zero"), seed=0)
    guide.head.set_value(jnp.full_like(guide.head.get_value(), 0.0))
    # a bias-free head outputs 0 -> p = 1/2 -> ln p = -ln 2 for every candidate: a constant shift
    sampler = Sampler(ref, guide, SamplerConfig(max_new_tokens=3, k=4, guidance="cd_logp", prompt_bucket=8))
    plain = Sampler(ref, None, SamplerConfig(max_new_tokens=3, k=4, prompt_bucket=8))
    key = jax.random.key(5)
    a = sampler.generate([[1, 2, 3]], key=key, n=16, temperature=1.0, top_k=4)
    b = plain.generate([[1, 2, 3]], key=key, n=16, temperature=1.0, top_k=4)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logp_policy, b.logp_policy, atol=1e-5)
