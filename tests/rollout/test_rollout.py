"""The unguided rollout engine: parity with transformers `generate`, log-probs and KL against
brute-force recomputation, n samples per prompt, early exit, no recompiles, sharding."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx

from qsharp_jax.checkpoints import loader
from qsharp_jax.models.decoder import forward_logits
from qsharp_jax.rollout.engine import decode_jit, prefill_jit
from qsharp_jax.rollout.sampler import Sampler
from qsharp_jax.rollout.state import SamplerConfig

from conftest import ROOT, left_padded_batch, sorted_nucleus

# One prompt shape (3 prompts, bucket 8), n = 2 and 10 new tokens everywhere: the tests share
# compiled loops (stop ids, pad id and every sampling knob are traced).
LENGTHS, N, MAX_NEW, BUCKET = (7, 4, 1), 2, 10, 8


def _prompts(seed=0):
    tokens, mask = left_padded_batch(256, LENGTHS, seed)
    return [row[m].tolist() for row, m in zip(tokens, mask)], tokens, mask


def _sampler(model, stop_ids=()):
    return Sampler(
        model, config=SamplerConfig(max_new_tokens=MAX_NEW, stop_ids=stop_ids, pad_id=0, prompt_bucket=BUCKET)
    )


@pytest.fixture(scope="module")
def llama_folder(tiny_hf_models):
    return tiny_hf_models("llama")


@pytest.fixture(scope="module")
def llama(llama_folder):
    return loader.load(llama_folder, tokenizer=False).model


@jax.jit
def _full_logits(state, tokens, mask):
    return forward_logits(nnx.merge(_GRAPH[0], state), tokens, mask)


_GRAPH = []


def brute_force_logits(model, seqs, width=32):
    """Logits [len(seqs), width, V] of right-aligned sequences by one full forward (no cache)."""
    graphdef, state = nnx.split(model)
    _GRAPH[:] = [graphdef]
    tokens = np.zeros((len(seqs), width), np.int32)
    mask = np.zeros((len(seqs), width), bool)
    for i, seq in enumerate(seqs):
        tokens[i, width - len(seq) :], mask[i, width - len(seq) :] = seq, True
    return np.asarray(_full_logits(state, tokens, mask))


def test_greedy_equals_transformers_generate_with_eos_stops(llama_folder, llama):
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(llama_folder, dtype=torch.float32).eval()
    prompts, tokens, mask = _prompts()

    def hf_greedy(eos):
        with torch.no_grad():
            out = hf.generate(
                input_ids=torch.as_tensor(tokens, dtype=torch.long),
                attention_mask=torch.as_tensor(mask, dtype=torch.long),
                do_sample=False,
                max_new_tokens=MAX_NEW,
                eos_token_id=list(eos),
                pad_token_id=0,
            )
        new = out[:, tokens.shape[1] :].numpy()
        return np.pad(new, ((0, 0), (0, MAX_NEW - new.shape[1])))  # HF stops early when all rows end

    free = hf_greedy(eos=[255**2])  # an id that never occurs: no stops
    stops = (int(free[0, 3]), int(free[1, 6]))  # two stop ids that occur mid-row (EOS stops)
    expected = hf_greedy(eos=stops)

    out = _sampler(llama, stops).generate(prompts, key=jax.random.key(0), n=N, greedy=True)
    np.testing.assert_array_equal(out.tokens[::N], expected)  # row 2i is prompt i's first copy
    np.testing.assert_array_equal(out.tokens[1::N], expected)  # the n copies agree under greedy
    for row, n in zip(expected, out.lengths[::N]):  # lengths count the stop token
        hits = [i for i, t in enumerate(row) if t in stops]
        assert n == (hits[0] + 1 if hits else MAX_NEW)
    assert out.lengths[0] <= 4 and out.lengths[2] <= 7


def test_logprobs_and_kl_match_brute_force_recomputation(llama):
    prompts, _, _ = _prompts(seed=1)
    temperature, top_p, stop = 0.8, 0.9, 7
    out = _sampler(llama, (stop,)).generate(prompts, key=jax.random.key(5), n=N, temperature=temperature, top_p=top_p)
    assert out.tokens.shape == (len(prompts) * N, MAX_NEW)
    np.testing.assert_array_equal(out.prompt_index, np.repeat(np.arange(len(prompts)), N))
    seqs = [prompts[out.prompt_index[r]] + out.tokens[r, : out.lengths[r]].tolist() for r in range(len(out.lengths))]
    all_logits = brute_force_logits(llama, seqs)
    for r, seq in enumerate(seqs):
        prompt, length = prompts[out.prompt_index[r]], int(out.lengths[r])
        response = out.tokens[r, :length]
        assert stop not in response[:-1] and (length == MAX_NEW or response[-1] == stop)
        assert np.all(out.tokens[r, length:] == 0) and np.all(out.kl_token[r, length:] == 0)
        # the positions predicting the response tokens (sequences are right-aligned)
        step_logits = all_logits[r, all_logits.shape[1] - len(seq) + len(prompt) - 1 :][:length]
        keep = sorted_nucleus(step_logits, temperature, top_p)
        x = step_logits.astype(np.float64) / temperature
        log_q = x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)
        p = np.where(keep, np.exp(log_q), 0.0)
        p /= p.sum(-1, keepdims=True)
        log_p = np.log(np.where(keep, p, 1.0))
        kl = np.sum(np.where(keep, p * (log_p - log_q), 0.0), axis=-1)
        steps = np.arange(length)
        assert np.all(keep[steps, response])
        np.testing.assert_allclose(out.logp_policy[r, :length], log_p[steps, response], atol=2e-5)
        np.testing.assert_allclose(out.logp_ref[r, :length], log_q[steps, response], atol=2e-5)
        np.testing.assert_allclose(out.kl_token[r, :length], kl, atol=2e-5)
        np.testing.assert_allclose(out.kl_traj[r], kl.sum(), atol=1e-4)


def test_early_exit_when_every_row_stopped_and_sampled_copies_differ(llama):
    prompts, _, _ = _prompts(seed=2)
    greedy = _sampler(llama).generate(prompts, key=jax.random.key(0), n=N, greedy=True)
    assert greedy.steps == MAX_NEW and np.all(greedy.lengths == MAX_NEW)
    # every row stops at its first token -> the loop exits after one step
    first = tuple(sorted(set(greedy.tokens[:, 0].tolist())))
    out = _sampler(llama, first).generate(prompts, key=jax.random.key(0), n=N, greedy=True)
    assert out.steps == 1 and np.all(out.lengths == 1) and np.all(out.tokens[:, 1:] == 0)
    sampled = _sampler(llama).generate(prompts, key=jax.random.key(1), n=N, temperature=1.0)
    assert len({tuple(t) for t in sampled.tokens}) == len(sampled.tokens)


def test_changing_knobs_or_prompt_lengths_within_a_bucket_does_not_recompile(llama):
    sampler = _sampler(llama, (9,))
    prompts, _, _ = _prompts(seed=3)
    first = sampler.generate(prompts, key=jax.random.key(0), n=N, temperature=0.8, top_p=0.9)
    sizes = decode_jit._cache_size(), prefill_jit._cache_size()
    others = [[11, 12], [13] * 8, [14, 15, 16]]
    for prompts_, knobs in [
        (prompts, dict(temperature=0.5, top_p=0.3)),
        (others, dict(temperature=1.3, top_p=1.0, top_k=5)),
        (prompts, dict(greedy=True, inv_eta=3.0)),
    ]:
        sampler.generate(prompts_, key=jax.random.key(1), n=N, **knobs)
    _sampler(llama, (4, 5, 6)).generate(prompts, key=jax.random.key(1), n=N)  # other stop ids
    assert (decode_jit._cache_size(), prefill_jit._cache_size()) == sizes
    again = sampler.generate(prompts, key=jax.random.key(0), n=N, temperature=0.8, top_p=0.9)
    np.testing.assert_array_equal(first.tokens, again.tokens)  # same key, same tokens


SHARDED_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, numpy as np
    from qsharp_jax.models import decoder as M
    from qsharp_jax.guidance import model as G
    from qsharp_jax.models.config import ModelConfig
    from qsharp_jax.rollout.sampler import Sampler
    from qsharp_jax.rollout.state import SamplerConfig
    from qsharp_jax.core.sharding import DEFAULT_RULES, make_mesh
    assert jax.device_count() == 8
    cfg = ModelConfig(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8)
    # the guide uses its own rules: vocab and mlp replicated
    guide_rules = tuple((k, None if k in ("vocab", "mlp") else v) for k, v in DEFAULT_RULES)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14], [20]]
    conf = SamplerConfig(max_new_tokens=6, k=5, stop_ids=(3,), prompt_bucket=8)
    results = []
    for mesh in (None, make_mesh(data=2, fsdp=2, tensor=2)):
        ref = M.build(cfg, seed=0)
        guide = G.build(M.build(cfg, seed=1, rules=guide_rules), G.HeadConfig(kind="v"), seed=2)
        sampler = Sampler(ref, guide, conf, mesh=mesh)
        # guided: the reference path plus the guide (the unguided loop is the same minus the guide)
        results.append(sampler.generate(prompts, key=jax.random.key(3), n=2, temperature=0.9, top_p=0.95,
                                        inv_eta=10.0))
    plain, sharded = results
    np.testing.assert_array_equal(plain.tokens, sharded.tokens)
    np.testing.assert_array_equal(plain.lengths, sharded.lengths)
    np.testing.assert_allclose(plain.logp_policy, sharded.logp_policy, atol=1e-4)
    np.testing.assert_allclose(plain.kl_traj, sharded.kl_traj, atol=1e-3)
    assert sharded.lengths.shape == (6,) and plain.kl_traj.max() > 0
    print("SHARDED_OK")
""")


def test_sharded_sampling_on_8_fake_devices_equals_unsharded():
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert "SHARDED_OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]
