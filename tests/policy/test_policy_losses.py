import math

import jax.numpy as jnp
import numpy as np
import pytest

from qsharp_jax.models import decoder
from qsharp_jax.models.config import ModelConfig
from qsharp_jax.policy import losses, trainer

_sig = lambda x: 1.0 / (1.0 + math.exp(-x))


def test_token_and_sequence_log_probs_by_hand():
    # vocab 2, logits chosen so that log-softmax is easy: [0, 0] -> log 1/2; [ln 3, 0] -> log 3/4, log 1/4
    logits = jnp.array([[[0.0, 0.0], [math.log(3), 0.0], [0.0, 0.0]]])
    tokens = jnp.array([[1, 0, 0]])
    lp = losses.token_log_probs(logits, tokens)
    np.testing.assert_allclose(lp, [[0.0, math.log(0.5), math.log(0.75)]], rtol=1e-6)
    mask = jnp.array([[False, False, True]])
    np.testing.assert_allclose(losses.sequence_log_probs(lp, mask), [math.log(0.75)], rtol=1e-6)
    np.testing.assert_allclose(
        losses.next_token_loss(lp, jnp.array([[False, True, True]])), -(math.log(0.5) + math.log(0.75)) / 2, rtol=1e-6
    )


def test_reinforce_by_hand():
    rewards = jnp.array([1.0, 0.0, 0.0, 1.0])
    np.testing.assert_allclose(losses.reinforce_advantages(rewards, "baseline"), [0.5, -0.5, -0.5, 0.5])
    np.testing.assert_allclose(losses.reinforce_advantages(rewards, "plus_minus"), [1.0, -0.1, -0.1, 1.0], rtol=1e-6)
    seq_lp = jnp.array([-1.0, -2.0, -3.0, -4.0])
    # mean(-lp * A) with A = (1, -0.1, -0.1, 1): (1 - 0.2 - 0.3 + 4) / 4
    np.testing.assert_allclose(
        losses.reinforce_loss(seq_lp, losses.reinforce_advantages(rewards, "plus_minus")), 4.5 / 4, rtol=1e-6
    )
    with pytest.raises(ValueError, match="reinforce reward"):
        losses.reinforce_advantages(rewards, "minus_one")


def test_dpo_and_rpo_by_hand():
    lp_c, lp_r = jnp.array([-1.0, -2.0]), jnp.array([-3.0, -1.0])
    ref_c, ref_r = jnp.array([-2.0, -2.0]), jnp.array([-2.0, -2.0])
    beta = 0.1
    # margins: 0.1 * ((-1 + 3) - 0) = 0.2 ; 0.1 * ((-2 + 1) - 0) = -0.1
    want = -(math.log(_sig(0.2)) + math.log(_sig(-0.1))) / 2
    np.testing.assert_allclose(losses.dpo_loss(lp_c, lp_r, ref_c, ref_r, beta), want, rtol=1e-6)
    np.testing.assert_allclose(losses.rpo_loss(lp_c, lp_r, ref_c, ref_r, beta, 1.0), want + 1.5, rtol=1e-6)
    np.testing.assert_allclose(losses.rpo_loss(lp_c, lp_r, ref_c, ref_r, beta, 0.5), want + 0.75, rtol=1e-6)


def test_registry():
    assert {"next_token", "reinforce", "dpo", "rpo"} <= set(losses.LOSSES)
    with pytest.raises(ValueError, match="not one of"):
        losses.get("ppo")
    with pytest.raises(ValueError, match="already registered"):
        losses.register("dpo", ())(lambda *a: None)


def _tiny():
    cfg = ModelConfig(
        model_type="llama", vocab_size=12, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
        num_kv_heads=2, head_dim=16,
    )  # fmt: skip
    return decoder.build(cfg, seed=0)


def test_trainer_fits_next_token_and_dpo_moves_margin():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 12, size=(8, 6)).astype(np.int32)
    tokens[:, 4:] = tokens[:, :2]  # target = copy of the first two tokens
    batch = dict(tokens=tokens, token_mask=np.ones_like(tokens, bool), loss_mask=np.zeros_like(tokens, bool))
    batch["loss_mask"][:, 4:] = True
    tr = trainer.PolicyTrainer(_tiny(), "next_token", lr=1e-2, total_steps=60, weight_decay=0.0)
    first = tr.step(batch)["loss"]
    for _ in range(59):
        last = tr.step(batch)["loss"]
    assert tr.step_count == 60 and last < 0.5 * first

    ref = _tiny()
    chosen, rejected = tokens.copy(), tokens.copy()
    rejected[:, 4:] = (tokens[:, 4:] + 1) % 12

    def seq_lp(model, t):
        lp = losses.model_token_log_probs(model, jnp.asarray(t), jnp.ones(t.shape, bool))
        return np.asarray(losses.sequence_log_probs(lp, jnp.asarray(batch["loss_mask"])))

    pairs = dict(
        chosen_tokens=chosen, chosen_token_mask=batch["token_mask"], chosen_loss_mask=batch["loss_mask"],
        rejected_tokens=rejected, rejected_token_mask=batch["token_mask"], rejected_loss_mask=batch["loss_mask"],
        ref_chosen_logp=seq_lp(ref, chosen), ref_rejected_logp=seq_lp(ref, rejected),
    )  # fmt: skip
    tr = trainer.PolicyTrainer(ref, "dpo", lr=1e-2, total_steps=20, hparams=dict(beta=0.1), weight_decay=0.0)
    stats = tr.step(pairs)
    np.testing.assert_allclose(stats["loss"], math.log(2), rtol=1e-5)  # policy == reference: margin 0
    for _ in range(19):
        stats = tr.step(pairs)
    assert stats["loss"] < 0.6 and stats["reward_accuracy"] == 1.0
