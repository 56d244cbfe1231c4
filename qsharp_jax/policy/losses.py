"""Policy losses for training the decoder itself (spec 5.4, 5.6), registered by name.

Pure math on log-probs (tested against hand-computed values):

* :func:`next_token_loss`: cross-entropy on the target tokens only (pretraining pi_ref),
  averaged over every target token of the batch (torch ``ignore_index`` semantics);
* :func:`reinforce_loss`: mean over the batch of ``-(sum_target log pi) * A``, with A from
  :func:`reinforce_advantages` (``"baseline"``: c - mean(c); ``"plus_minus"``: +1 / -0.1);
* :func:`dpo_loss`: ``-log sigmoid(beta [(lp_c - lp_r) - (ref_c - ref_r)])``, sequence
  log-probs summed over target tokens; :func:`rpo_loss` adds ``alpha * mean(-lp_c)``.

Each registered loss (:data:`LOSSES`) maps ``(model, batch, hparams) -> (loss, stats)``, so
the train step is one function for all of them; a new loss (e.g. GRPO) is one more entry.
Batch rows are ``[pad | prompt | target]`` with ``token_mask`` (False on pads) and
``loss_mask`` (True on target tokens); pair losses take ``chosen_*`` and ``rejected_*`` rows
and the frozen reference's sequence log-probs ``ref_chosen_logp`` / ``ref_rejected_logp``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from qsharp_jax.models.decoder import Decoder, forward_logits

REINFORCE_REWARDS = ("baseline", "plus_minus")


# ---- log-probs ------------------------------------------------------------------------------


def token_log_probs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """[B, T] log pi(token_t | tokens_<t); column 0 (no context) is 0. logits: [B, T, V]."""
    lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.pad(picked, ((0, 0), (1, 0)))


def model_token_log_probs(model: Decoder, tokens: jax.Array, token_mask: jax.Array) -> jax.Array:
    return token_log_probs(forward_logits(model, tokens, token_mask), tokens)


def sequence_log_probs(token_lp: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """[B] sum of log-probs over each row's target tokens."""
    return jnp.sum(jnp.where(loss_mask, token_lp, 0.0), axis=-1)


# ---- losses on log-probs --------------------------------------------------------------------


def next_token_loss(token_lp: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Mean negative log-likelihood over all target tokens of the batch."""
    m = loss_mask.astype(jnp.float32)
    return -jnp.sum(token_lp * m) / jnp.maximum(jnp.sum(m), 1.0)


def reinforce_advantages(rewards: jax.Array, kind: str) -> jax.Array:
    """rewards: [B] in {0, 1} (correct or not). "baseline": c - mean_batch(c) (authors' README);
    "plus_minus": +1 if correct, -0.1 otherwise (the paper's description)."""
    c = rewards.astype(jnp.float32)
    if kind == "baseline":
        return c - jnp.mean(c)
    if kind == "plus_minus":
        return 1.1 * c - 0.1
    raise ValueError(f"reinforce reward={kind!r} is not one of {REINFORCE_REWARDS}.")


def reinforce_loss(seq_lp: jax.Array, advantages: jax.Array) -> jax.Array:
    return jnp.mean(-seq_lp * jax.lax.stop_gradient(advantages))


def dpo_margin(lp_c, lp_r, ref_c, ref_r, beta) -> jax.Array:
    return beta * ((lp_c - lp_r) - (ref_c - ref_r))


def dpo_loss(lp_c, lp_r, ref_c, ref_r, beta: float) -> jax.Array:
    return jnp.mean(-jax.nn.log_sigmoid(dpo_margin(lp_c, lp_r, ref_c, ref_r, beta)))


def rpo_loss(lp_c, lp_r, ref_c, ref_r, beta: float, alpha: float = 1.0) -> jax.Array:
    """DPO plus ``alpha`` times the chosen sequences' mean negative log-likelihood."""
    return dpo_loss(lp_c, lp_r, ref_c, ref_r, beta) + alpha * jnp.mean(-lp_c)


# ---- registry --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PolicyLoss:
    fn: Callable  # (model, batch, hparams) -> (scalar loss, dict of scalar stats)
    batch_keys: tuple  # the batch arrays it reads (their first axis is the batch)


LOSSES: dict[str, PolicyLoss] = {}


def register(name: str, batch_keys: tuple):
    def wrap(fn):
        if name in LOSSES:
            raise ValueError(f"policy loss {name!r} is already registered.")
        LOSSES[name] = PolicyLoss(fn, tuple(batch_keys))
        return fn

    return wrap


def get(name: str) -> PolicyLoss:
    if name not in LOSSES:
        raise ValueError(f"policy loss {name!r} is not one of {sorted(LOSSES)}.")
    return LOSSES[name]


_SEQ = ("tokens", "token_mask", "loss_mask")
_PAIR = tuple(f"{side}_{k}" for side in ("chosen", "rejected") for k in _SEQ) + ("ref_chosen_logp", "ref_rejected_logp")


@register("next_token", _SEQ)
def _next_token(model, batch, hp: Mapping):
    lp = model_token_log_probs(model, batch["tokens"], batch["token_mask"])
    loss = next_token_loss(lp, batch["loss_mask"])
    return loss, dict(nll=loss)


@register("reinforce", _SEQ + ("reward",))
def _reinforce(model, batch, hp: Mapping):
    lp = model_token_log_probs(model, batch["tokens"], batch["token_mask"])
    seq_lp = sequence_log_probs(lp, batch["loss_mask"])
    adv = reinforce_advantages(batch["reward"], hp["reward"])
    return reinforce_loss(seq_lp, adv), dict(mean_reward=jnp.mean(batch["reward"]), seq_logp=jnp.mean(seq_lp))


def _pair_log_probs(model, batch):
    tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]])
    token_mask = jnp.concatenate([batch["chosen_token_mask"], batch["rejected_token_mask"]])
    loss_mask = jnp.concatenate([batch["chosen_loss_mask"], batch["rejected_loss_mask"]])
    seq = sequence_log_probs(model_token_log_probs(model, tokens, token_mask), loss_mask)
    b = batch["chosen_tokens"].shape[0]
    return seq[:b], seq[b:]


def _pair_stats(lp_c, lp_r, batch, beta):
    margin = dpo_margin(lp_c, lp_r, batch["ref_chosen_logp"], batch["ref_rejected_logp"], beta)
    return dict(chosen_logp=jnp.mean(lp_c), rejected_logp=jnp.mean(lp_r), reward_accuracy=jnp.mean(margin > 0))


@register("dpo", _PAIR)
def _dpo(model, batch, hp: Mapping):
    lp_c, lp_r = _pair_log_probs(model, batch)
    loss = dpo_loss(lp_c, lp_r, batch["ref_chosen_logp"], batch["ref_rejected_logp"], hp["beta"])
    return loss, _pair_stats(lp_c, lp_r, batch, hp["beta"])


@register("rpo", _PAIR)
def _rpo(model, batch, hp: Mapping):
    lp_c, lp_r = _pair_log_probs(model, batch)
    loss = rpo_loss(lp_c, lp_r, batch["ref_chosen_logp"], batch["ref_rejected_logp"], hp["beta"], hp["alpha"])
    return loss, _pair_stats(lp_c, lp_r, batch, hp["beta"])
