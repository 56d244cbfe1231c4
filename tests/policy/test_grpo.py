"""GRPO: the loss against hand-computed values, and the trainer on a tiny task (the mean reward
rises; a run interrupted mid-batch and rerun ends identical to an uninterrupted one)."""

import math
import os
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from qsharp_jax.baselines import grpo
from qsharp_jax.checkpoints import training as checkpointing
from qsharp_jax.config import grpo_defaults
from qsharp_jax.models import decoder
from qsharp_jax.models.config import ModelConfig
from qsharp_jax.policy import losses
from qsharp_jax.rollout.sampler import Sampler
from qsharp_jax.rollout.state import SamplerConfig

F32 = np.finfo(np.float32).eps


def test_group_advantages_by_hand():
    rewards = jnp.array([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.1, 0.1, 0.1, 0.1])
    adv = np.asarray(losses.grpo_advantages(rewards, 4, eps=1e-4))
    # group 1: mean 1/4, Bessel std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 1/2
    np.testing.assert_allclose(adv[:4], np.array([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-4), rtol=4 * F32)
    assert np.all(adv[4:] == 0.0)  # all-equal groups (also at a value float32 cannot hold): exactly zero
    centred = np.asarray(losses.grpo_advantages(rewards, 4, std_normalize=False))
    np.testing.assert_allclose(centred[:4], [0.75, -0.25, -0.25, -0.25], rtol=4 * F32)
    # an affine reward (REINFORCE's +1 / -0.1) gives the same advantages up to eps
    affine = np.asarray(losses.grpo_advantages(1.1 * rewards[:4] - 0.1, 4, eps=0.0))
    np.testing.assert_allclose(affine, np.asarray(losses.grpo_advantages(rewards[:4], 4, eps=0.0)), rtol=16 * F32)
    with pytest.raises(ValueError, match="groups of >= 2"):
        losses.grpo_advantages(rewards, 5)


def test_k3_is_nonnegative_and_its_mean_under_pi_is_the_kl():
    rng = np.random.default_rng(0)
    lp = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(5, 7)), jnp.float32))
    lq = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(5, 7)), jnp.float32))
    k3 = np.asarray(losses.k3_kl(lp, lq))
    assert np.all(k3 >= 0.0)
    # E_{x ~ p}[k3(x)] = sum_x p (q/p - log q/p - 1) = KL(p || q), enumerated over the vocabulary
    p = np.exp(np.asarray(lp, np.float64))
    kl = np.sum(p * (np.asarray(lp, np.float64) - np.asarray(lq, np.float64)), axis=1)
    np.testing.assert_allclose(np.sum(p * k3, axis=1), kl, rtol=1e-5, atol=64 * F32)
    assert np.all(np.asarray(losses.k3_kl(lp, lp)) == 0.0)


def test_clipped_objective_and_aggregations_by_hand():
    # one row, four response tokens (column 0 is prompt), ratios 1.5, 0.5, 1.1, 1.0
    old = jnp.zeros((1, 5))
    logp = jnp.log(jnp.array([[1.0, 1.5, 0.5, 1.1, 1.0]]))
    ref = jnp.zeros((1, 5))
    mask = jnp.array([[False, True, True, True, True]])
    for a in (2.0, -2.0):
        adv = jnp.array([a])
        loss, stats = losses.grpo_loss(logp, old, ref, adv, mask, clip_eps=0.2, beta=0.0)
        # min(rho A, clip(rho) A): A > 0 -> 1.2, 0.5, 1.1, 1.0 times A; A < 0 -> 1.5, 0.8, 1.1, 1.0 times A
        per_token = [1.2, 0.5, 1.1, 1.0] if a > 0 else [1.5, 0.8, 1.1, 1.0]
        np.testing.assert_allclose(loss, -a * np.mean(per_token), rtol=8 * F32)
        assert float(stats["clip_fraction"]) == 0.5
        # where the clip binds the token has no gradient; elsewhere d/dlp (-rho A) = -rho A
        g = np.asarray(jax.grad(lambda lp: losses.grpo_loss(lp, old, ref, adv, mask, beta=0.0)[0])(logp))[0, 1:]
        rho = np.array([1.5, 0.5, 1.1, 1.0])
        bound = np.array([a > 0, a < 0, False, False])
        np.testing.assert_allclose(g, np.where(bound, 0.0, -rho * a / 4), rtol=8 * F32, atol=1e-7)

    # the KL term and both aggregations, two rows of 1 and 3 response tokens, ratio 1
    logp = jnp.log(jnp.array([[1.0, 0.5, 1.0, 1.0], [1.0, 0.5, 0.25, 0.5]]))
    ref = jnp.log(jnp.array([[1.0, 0.25, 1.0, 1.0], [1.0, 0.5, 0.5, 0.25]]))
    mask = jnp.array([[False, True, False, False], [False, True, True, True]])
    adv = jnp.array([1.0, -1.0])
    k3 = lambda p, q: q / p - math.log(q / p) - 1
    row2 = ((0.5, 0.5), (0.25, 0.5), (0.5, 0.25))
    tok = [[-(1.0 - 0.1 * k3(0.5, 0.25))], [-(-1.0 - 0.1 * k3(a, b)) for a, b in row2]]
    # the terms are O(1) and cancel to ~0.02: an absolute bound of a few float32 roundings of 1
    seq, _ = losses.grpo_loss(logp, logp, ref, adv, mask, beta=0.1, aggregation="sequence_mean")
    np.testing.assert_allclose(seq, (np.mean(tok[0]) + np.mean(tok[1])) / 2, rtol=0, atol=16 * F32)
    tsum, stats = losses.grpo_loss(logp, logp, ref, adv, mask, beta=0.1, aggregation="token_sum", max_response_tokens=8)
    np.testing.assert_allclose(tsum, (sum(tok[0]) + sum(tok[1])) / (2 * 8), rtol=0, atol=16 * F32)
    np.testing.assert_allclose(
        stats["kl"], (k3(0.5, 0.25) + k3(0.5, 0.5) + k3(0.25, 0.5) + k3(0.5, 0.25)) / 4, rtol=8 * F32
    )
    with pytest.raises(ValueError, match="max_response_tokens"):
        losses.grpo_loss(logp, logp, ref, adv, mask, aggregation="token_sum")
    with pytest.raises(ValueError, match="aggregation"):
        losses.grpo_loss(logp, logp, ref, adv, mask, aggregation="mean")


def test_config_ranges_are_validated():
    c = grpo_defaults()
    grpo.validate_grpo_config(c)
    c.group_size, c.clip_eps, c.aggregation = 1, 1.5, "sum"
    with pytest.raises(ValueError) as e:
        grpo.validate_grpo_config(c)
    for key in ("grpo.group_size=1", "grpo.clip_eps=1.5", "grpo.aggregation='sum'"):
        assert key in str(e.value)


# ---- the trainer on a tiny task ------------------------------------------------------------

VOCAB, PROMPT, NEW = 12, 3, 4
GOOD = np.arange(6)  # reward 1 when the first response token is one of these (half the vocabulary)


def _tiny():
    cfg = ModelConfig(
        model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
        num_kv_heads=2, head_dim=16,
    )  # fmt: skip
    return decoder.build(cfg, seed=0)


def _prompts():
    rng = np.random.default_rng(1)
    return rng.integers(6, VOCAB, size=(16, PROMPT)).tolist()


def _reward(idx, out):
    return np.isin(out.tokens[:, 0], GOOD).astype(np.float32)


def _sampler_config():
    return SamplerConfig(max_new_tokens=NEW, slots=16, prompt_bucket=PROMPT, stop_ids=(), pad_id=0)


def _config(steps, **kw) -> ml_collections.ConfigDict:
    c = grpo_defaults()
    c.update(dict(steps=steps, prompts_per_step=4, group_size=4, lr=3e-2, beta=0.04, save_every=2, log_every=1))
    c.update(kw)
    return c


def _mean_reward(model) -> float:
    out = Sampler(model, None, _sampler_config()).generate(_prompts(), key=jax.random.key(123), n=16)
    return float(_reward(None, out).mean())


def test_a_few_grpo_steps_raise_the_mean_reward(tmp_path):
    reference = _tiny()
    before = _mean_reward(reference)
    ckpt = str(tmp_path / "ckpt")
    policy, record = grpo.train(_tiny(), reference, _prompts(), _reward, _config(8), _sampler_config(), ckpt, log=print)
    after = _mean_reward(policy)
    # 256 samples: the standard error of a mean reward near 1/2 is 0.03;
    # measured 0.49 -> 0.91 (rollout reward 0.50 -> 0.94 over the 8 batches)
    assert after > before + 0.25, (before, after)
    assert record["batches"] == 8 and record["optimizer_steps"] == 8
    assert record["sampled_tokens"] == 8 * 16 * NEW  # no stop ids: every row runs to the cap
    assert [h["batch"] for h in record["history"]] == list(range(1, 9))
    assert record["history"][-1]["kl"] > 0.0  # the policy has left the reference


def test_token_budget_and_mu(tmp_path):
    c = _config(50, token_budget=3 * 16 * NEW, mu=2)
    _, record = grpo.train(
        _tiny(), _tiny(), _prompts(), _reward, c, _sampler_config(), str(tmp_path / "ckpt"), log=lambda m: None
    )
    assert record["batches"] == 3 and record["optimizer_steps"] == 6 and record["sampled_tokens"] == 3 * 16 * NEW


class _Interrupt(Exception):
    pass


def test_interrupted_run_resumes_identical_to_an_uninterrupted_one(tmp_path):
    c = _config(5, save_every=1)
    whole, whole_record = grpo.train(
        _tiny(), _tiny(), _prompts(), _reward, c, _sampler_config(), str(tmp_path / "whole"), log=lambda m: None
    )
    calls = []

    def dies_in_batch_4(idx, out):  # a kill in the middle of batch 4 (after 3 checkpointed batches)
        calls.append(1)
        if len(calls) == 4:
            raise _Interrupt
        return _reward(idx, out)

    with pytest.raises(_Interrupt):
        grpo.train(_tiny(), _tiny(), _prompts(), dies_in_batch_4, c, _sampler_config(), str(tmp_path / "cut"))
    resumed, record = grpo.train(
        _tiny(), _tiny(), _prompts(), _reward, c, _sampler_config(), str(tmp_path / "cut"), log=lambda m: None
    )
    assert record["batches"] == 5 and record["sampled_tokens"] == whole_record["sampled_tokens"]
    strip = lambda h: [{k: v for k, v in p.items() if k != "seconds"} for p in h]
    assert strip(record["history"]) == strip(whole_record["history"])
    for a, b in zip(jax.tree.leaves(nnx.state(whole)), jax.tree.leaves(nnx.state(resumed))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sigterm_right_after_a_periodic_save_stops_cleanly_and_resumes(tmp_path):
    """SIGTERM during batch 2 of save_every=2: batch 2 is saved once (no second save of the same
    step), the run stops with Preempted, and a rerun continues from batch 3."""
    c, ckpt, calls = _config(3, save_every=2), str(tmp_path / "ckpt"), []

    def sigterm_in_batch_2(idx, out):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return _reward(idx, out)

    with pytest.raises(checkpointing.Preempted) as stop:
        grpo.train(_tiny(), _tiny(), _prompts(), sigterm_in_batch_2, c, _sampler_config(), ckpt, log=lambda m: None)
    assert stop.value.step == 2 and sorted(os.listdir(ckpt)) == ["2"]
    _, record = grpo.train(_tiny(), _tiny(), _prompts(), _reward, c, _sampler_config(), ckpt, log=lambda m: None)
    assert record["batches"] == 3 and [h["batch"] for h in record["history"]] == [1, 2, 3]


def test_log_probs_of_the_last_tokens_equal_the_full_ones_there():
    model = _tiny()
    rng = np.random.default_rng(3)
    tokens = jnp.asarray(rng.integers(0, VOCAB, size=(3, 9)), jnp.int32)
    mask = jnp.asarray(np.arange(9)[None, :] >= np.array([[0], [2], [5]]))  # left-padded rows
    full = np.asarray(losses.model_token_log_probs(model, tokens, mask, 0.7))
    last = np.asarray(losses.model_token_log_probs(model, tokens, mask, 0.7, last=4))
    assert np.all(last[:, :5] == 0.0)
    # the same float32 ops on a slice of the hidden states: equal up to the matmul's reduction order
    np.testing.assert_allclose(last[:, 5:], full[:, 5:], rtol=0, atol=64 * F32)


def test_batch_length_rounds_up_within_the_window_and_the_cap():
    b = grpo.LENGTH_BUCKET
    assert grpo.batch_length(b + 1, window=4, cap=10 * b) == 2 * b
    assert grpo.batch_length(2 * b, window=4, cap=10 * b) == 2 * b
    assert grpo.batch_length(3, window=2 * b, cap=10 * b) == 2 * b + 1  # the log-prob window fits
    assert grpo.batch_length(9 * b + 1, window=4, cap=9 * b + 3) == 9 * b + 3  # never above the cap


def test_the_grpo_loss_of_a_trimmed_batch_equals_the_full_length_one():
    """Extra left padding changes nothing but the reduction order of the masked attention."""
    model, reference = _tiny(), _tiny()
    rng = np.random.default_rng(5)
    prompts = [rng.integers(6, VOCAB, size=n).tolist() for n in (3, 5, 4, 5)]
    completions = [rng.integers(0, VOCAB, size=n).tolist() for n in (2, 6, 1, 3)]
    hp = dict(temperature=1.0, clip_eps=0.2, beta=0.04, aggregation="sequence_mean", max_response_tokens=6,
              response_window=6, on_policy=True)  # fmt: skip
    results = []
    for length in (11, 24):  # the longest row, and the cap-length batch of before
        batch = grpo.sequence_batch(prompts, completions, length)
        batch["ref_logp"] = grpo.token_log_probs(reference, batch, 1.0, 6)
        batch["old_logp"] = np.zeros_like(batch["ref_logp"])
        batch["advantage"] = np.array([1.0, -0.5, 0.25, -0.75], np.float32)
        loss, _ = losses.get("grpo").fn(model, {k: jnp.asarray(v) for k, v in batch.items()}, hp)
        results.append(float(loss))
    np.testing.assert_allclose(results[0], results[1], rtol=0, atol=64 * F32)
