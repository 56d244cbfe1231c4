"""Continuous batching (fixed decode slots refilled between segments) against sampling each
(prompt, sample) row alone with the same per-row key: unguided and V-type guided, mixed stop
times, more rows than slots; no recompilation as slots are refilled; 8 fake devices.

Tolerances: tokens and lengths must be identical. Log-probs and KL are float32 results of
the same computation, but a row's attention runs over a different cache layout (circular
buffer of another length, other rows in the batch), so reductions happen in another
order: a few float32 ulps of values of size <= ~10, hence atol 1e-5 per token.
"""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from qsharp_jax.guidance import model as G
from qsharp_jax.models import decoder as M
from qsharp_jax.models.config import ModelConfig
from qsharp_jax.rollout import continuous
from qsharp_jax.rollout.batched import generate_chunks
from qsharp_jax.rollout.sampler import Sampler, refill_threshold, row_keys, rows_to_start
from qsharp_jax.rollout.state import SamplerConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CFG = ModelConfig(
    model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=8,
)  # fmt: skip
MAX_NEW, STOPS = 10, (3, 4, 5, 6)  # 4 of 64 tokens stop a row: stop times spread over 1..10
PROMPTS = [[7, 8, 9], [10] * 11, [12, 13], [14, 15, 16, 17, 18, 19], [20], [21, 22, 23, 24, 25, 26, 27, 28, 29]]
N = 2  # 12 rows through 4 slots


def config(slots, **kw):
    return SamplerConfig(max_new_tokens=MAX_NEW, k=5, stop_ids=STOPS, prompt_bucket=8, slots=slots, segment=3, **kw)


@pytest.fixture(scope="module")
def models():
    ref = M.build(CFG, seed=0)
    guide = G.build(M.build(CFG, seed=1), G.HeadConfig(kind="v", distribution="categorical", init="normal"), seed=2)
    guide.head.set_value(guide.head.get_value() * 40.0)  # O(1) head outputs, so the offsets matter
    return ref, guide


def assert_row_equal(batch, r, alone, tol=1e-5):
    n = int(alone.lengths[0])
    assert int(batch.lengths[r]) == n, (r, batch.lengths[r], n)
    np.testing.assert_array_equal(batch.tokens[r], alone.tokens[0])
    np.testing.assert_allclose(batch.logp_policy[r], alone.logp_policy[0], atol=tol)
    np.testing.assert_allclose(batch.logp_ref[r], alone.logp_ref[0], atol=tol)
    np.testing.assert_allclose(batch.kl_token[r], alone.kl_token[0], atol=tol)


# block 4: the slots' 25-column circular caches are read in 4-column blocks (the last one
# cut short), skipping blocks no live row has a token in; the rows alone attend densely
def _row(batch, r):
    """Row r of a RolloutBatch as a batch of one."""
    fields = ("tokens", "lengths", "logp_policy", "logp_ref", "kl_token", "kl_traj", "prompt_index")
    return type(batch)(*(getattr(batch, f)[r : r + 1] for f in fields))


@pytest.mark.parametrize("guided,block", [(False, 0), (True, 0), (False, 4), (True, 4)])
def test_every_row_equals_sampling_it_alone_with_its_key(models, guided, block):
    ref, guide = models
    knobs = dict(temperature=1.0, top_p=0.95, inv_eta=5.0, guided=guided)
    key = jax.random.key(7)
    batch = Sampler(ref, guide, config(slots=4, attention_block=block)).generate(PROMPTS, key=key, n=N, **knobs)
    alone_sampler = Sampler(ref, guide, config(slots=0, attention_block=0))  # the static engine, one row per call
    keys = row_keys(key, len(PROMPTS), N)
    for r in range(len(PROMPTS) * N):
        alone = alone_sampler.generate([PROMPTS[r // N]], key=key, keys=keys[r : r + 1], **knobs)
        assert_row_equal(batch, r, alone)
    lengths = batch.lengths
    assert lengths.min() < MAX_NEW // 2 and lengths.max() == MAX_NEW, lengths  # mixed stop times
    np.testing.assert_allclose(batch.kl_traj, batch.kl_token.sum(1))


def test_continuous_equals_static_batch_and_keeps_slots_busy(models):
    ref, guide = models
    key, knobs = jax.random.key(3), dict(temperature=1.0, top_p=0.9, inv_eta=5.0)
    static = Sampler(ref, guide, config(slots=0)).generate(PROMPTS, key=key, n=N, **knobs)
    sampler = Sampler(ref, guide, config(slots=4))
    cont = sampler.generate(PROMPTS, key=key, n=N, **knobs)
    for r in range(len(PROMPTS) * N):
        assert_row_equal(cont, r, _row(static, r))
    stats = sampler.last_stats
    assert stats["slots"] == 4 and stats["refills"] > 1 and stats["useful_tokens"] == cont.lengths.sum()
    # 4 slots did the work of 12 rows in fewer steps than 3 static batches of 4 would
    assert stats["steps"] * 4 >= cont.lengths.sum() and stats["steps"] < 3 * MAX_NEW


@pytest.mark.parametrize("guided", [False, True])
def test_static_engine_with_cache_blocks_equals_dense_attention(models, guided):
    ref, guide = models
    key, knobs = jax.random.key(11), dict(temperature=1.0, top_p=0.95, inv_eta=5.0, guided=guided)
    dense = Sampler(ref, guide, config(slots=0, attention_block=0)).generate(PROMPTS, key=key, n=N, **knobs)
    blocked = Sampler(ref, guide, config(slots=0, attention_block=4)).generate(PROMPTS, key=key, n=N, **knobs)
    for r in range(len(PROMPTS) * N):
        assert_row_equal(blocked, r, _row(dense, r))


def test_refilling_slots_never_recompiles(models):
    ref, guide = models
    sampler = Sampler(ref, guide, config(slots=4))
    sampler.generate(PROMPTS, key=jax.random.key(0), n=N, inv_eta=2.0)  # warm: all shape classes
    jits = (continuous.init_slots_jit, continuous.refill_jit, continuous.segment_jit)
    sizes = [j._cache_size() for j in jits]
    # other prompts (same length buckets), keys, knobs, sample counts: refills at other times
    others = [[30 + i] * (1 + (5 * i) % 9) for i in range(9)]
    sampler.generate(others, key=jax.random.key(1), n=N, temperature=0.7, top_p=0.8, inv_eta=9.0)
    sampler.generate(PROMPTS[::-1], key=jax.random.key(2), n=N, greedy=True, inv_eta=1.0)
    assert sampler.last_stats["refills"] > 1
    assert [j._cache_size() for j in jits] == sizes


def test_refill_rule_starts_whole_prompts_once_enough_slots_are_free():
    # 16 slots, a quarter of the slots: a refill once 4 slots are free
    assert refill_threshold(16, 4, pending=0, total=40, fraction=0.25) == 4
    assert refill_threshold(16, 4, pending=8, total=40, fraction=0.5) == 8
    assert refill_threshold(16, 4, pending=36, total=40, fraction=0.5) == 4  # only 4 rows left
    assert refill_threshold(16, 4, pending=40, total=40, fraction=0.5) == 17  # nothing pending
    assert refill_threshold(16, 4, pending=0, total=40, fraction=0.01) == 1
    assert rows_to_start(7, 4, pending=0, total=40) == 4  # cut back to whole prompts
    assert rows_to_start(7, 4, pending=36, total=40) == 4
    assert rows_to_start(3, 4, pending=0, total=40) == 3  # n > free: a prompt is split
    assert rows_to_start(3, 4, pending=3, total=40) == 1  # ... and its rest starts next
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="refill_fraction"):
            config(slots=4, refill_fraction=bad)


@pytest.mark.parametrize("fraction", [0.5, 1.0])  # fraction x 4 slots >= N samples per prompt
def test_each_prompt_is_prefilled_once_for_all_its_samples(models, fraction):
    ref, guide = models
    prompts = PROMPTS * 2  # 12 prompts x 2 samples = 24 rows through 4 slots
    key, knobs = jax.random.key(5), dict(temperature=1.0, top_p=0.95, inv_eta=5.0)
    sampler = Sampler(ref, guide, config(slots=4, refill_fraction=fraction))
    cont = sampler.generate(prompts, key=key, n=N, **knobs)
    stats = sampler.last_stats
    assert stats["prefills"] == len(prompts) and stats["refills"] <= len(prompts)
    static = Sampler(ref, guide, config(slots=0)).generate(prompts, key=key, n=N, **knobs)
    np.testing.assert_array_equal(cont.tokens, static.tokens)
    np.testing.assert_array_equal(cont.lengths, static.lengths)
    np.testing.assert_allclose(cont.kl_token, static.kl_token, atol=1e-5)


def test_generate_chunks_gives_the_chunked_rows_in_one_continuous_call(models):
    ref, guide = models
    key, knobs = jax.random.key(11), dict(temperature=1.0, top_p=0.9, inv_eta=3.0, guided=True)
    static = Sampler(ref, guide, config(slots=0))
    chunked = list(generate_chunks(static, PROMPTS, key=key, n=N, chunk=2, **knobs))
    assert [start for start, _ in chunked] == [0, 2, 4]
    sampler = Sampler(ref, guide, config(slots=4, refill_fraction=0.5))
    ((start, whole),) = generate_chunks(sampler, PROMPTS, key=key, n=N, chunk=2, **knobs)
    assert start == 0 and sampler.last_stats["prefills"] == len(PROMPTS)
    np.testing.assert_array_equal(whole.prompt_index, np.repeat(np.arange(len(PROMPTS)), N))
    for s, part in chunked:
        rows = slice(s * N, s * N + len(part.lengths))
        np.testing.assert_array_equal(whole.tokens[rows], part.tokens)
        np.testing.assert_array_equal(whole.lengths[rows], part.lengths)
        np.testing.assert_allclose(whole.logp_policy[rows], part.logp_policy, atol=1e-5)
        np.testing.assert_allclose(whole.kl_token[rows], part.kl_token, atol=1e-5)


SHARDED_SCRIPT = textwrap.dedent("""
    import os
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
    guide_rules = tuple((k, None if k in ("vocab", "mlp") else v) for k, v in DEFAULT_RULES)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14], [20], [30, 31], [40] * 9, [50, 51, 52, 53]]
    results = []
    for mesh, slots in ((None, 0), (make_mesh(data=2, fsdp=2, tensor=2), 4)):
        # sharded: the 23-column caches are read in blocks of 4 (unsharded: every column)
        conf = SamplerConfig(max_new_tokens=8, k=5, stop_ids=(3, 4, 5), prompt_bucket=8, slots=slots, segment=3,
                             attention_block=4 if slots else 0)
        ref = M.build(cfg, seed=0)
        guide = G.build(M.build(cfg, seed=1, rules=guide_rules), G.HeadConfig(kind="v"), seed=2)
        sampler = Sampler(ref, guide, conf, mesh=mesh)
        for guided in (False, True):
            results.append(sampler.generate(prompts, key=jax.random.key(3), n=2, temperature=1.0, top_p=0.95,
                                            inv_eta=10.0, guided=guided))
        if slots:
            assert sampler.last_stats["refills"] > 1, sampler.last_stats
    for plain, sharded in zip(results[:2], results[2:]):
        np.testing.assert_array_equal(plain.tokens, sharded.tokens)
        np.testing.assert_array_equal(plain.lengths, sharded.lengths)
        np.testing.assert_allclose(plain.logp_policy, sharded.logp_policy, atol=1e-4)
        np.testing.assert_allclose(plain.kl_traj, sharded.kl_traj, atol=1e-3)
        assert plain.lengths.min() < plain.lengths.max()
    print("SHARDED_CONTINUOUS_OK")
""")


def test_continuous_batching_on_8_fake_devices_equals_static_unsharded():
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    assert "SHARDED_CONTINUOUS_OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]
