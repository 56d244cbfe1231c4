"""Policy losses for training the decoder itself (spec 5.4, 5.6), registered by name.

Pure math on log-probs (tested against hand-computed values):

* :func:`next_token_loss`: cross-entropy on the target tokens only (pretraining pi_ref),
  averaged over every target token of the batch (torch ``ignore_index`` semantics);
* :func:`reinforce_loss`: mean over the batch of ``-(sum_target log pi) * A``, with A from
  :func:`reinforce_advantages` (``"baseline"``: c - mean(c); ``"plus_minus"``: +1 / -0.1);
* :func:`dpo_loss`: ``-log sigmoid(beta [(lp_c - lp_r) - (ref_c - ref_r)])``, sequence
  log-probs summed over target tokens; :func:`rpo_loss` adds ``alpha * mean(-lp_c)``;
* :func:`grpo_loss` (Shao et al. 2024): group-normalised advantages (:func:`grpo_advantages`),
  the clipped importance ratio and the k3 estimate of KL(pi || pi_ref) (:func:`k3_kl`), per
  token, aggregated per sequence (GRPO) or as a token sum over a constant (Dr. GRPO).

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

from qsharp_jax.models.decoder import Decoder, forward_logits, positions_from_mask

REINFORCE_REWARDS = ("baseline", "plus_minus")
GRPO_AGGREGATIONS = ("sequence_mean", "token_sum")


# ---- log-probs ------------------------------------------------------------------------------


def token_log_probs(logits: jax.Array, tokens: jax.Array, temperature: float = 1.0) -> jax.Array:
    """[B, T] log pi(token_t | tokens_<t) with pi = softmax(logits / temperature); column 0
    (no context) is 0. logits: [B, T, V]."""
    lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32) / temperature, axis=-1)
    picked = jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.pad(picked, ((0, 0), (1, 0)))


def model_token_log_probs(
    model: Decoder, tokens: jax.Array, token_mask: jax.Array, temperature: float = 1.0, last: int | None = None
) -> jax.Array:
    """[B, T] log-probs of ``tokens`` under ``model``. With ``last``, only the last ``last``
    tokens get one (the rest are 0): the [B, last, vocab] logits are all that is materialised,
    which is what makes full-vocabulary RL losses fit in memory (rows end with the response)."""
    if last is None:
        return token_log_probs(forward_logits(model, tokens, token_mask), tokens, temperature)
    h, _ = model(tokens, positions_from_mask(token_mask), token_mask=token_mask)
    logits = model.logits(h[:, -(last + 1) :])  # position t predicts token t + 1
    lp = token_log_probs(logits, tokens[:, -(last + 1) :], temperature)[:, 1:]
    return jnp.pad(lp, ((0, 0), (tokens.shape[1] - last, 0)))


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


def grpo_advantages(rewards: jax.Array, group_size: int, eps: float = 1e-4, std_normalize: bool = True) -> jax.Array:
    """[B] advantages of rewards [B] laid out as consecutive groups of ``group_size`` samples of
    one prompt: (r - mean_group) / (std_group + eps), std with Bessel's correction (as TRL);
    exactly zero for a group whose rewards are all equal. ``std_normalize=False`` keeps
    r - mean_group (Dr. GRPO)."""
    if group_size < 2 or rewards.shape[0] % group_size:
        raise ValueError(f"GRPO needs groups of >= 2 samples; {rewards.shape[0]} rewards, group_size={group_size}.")
    r = rewards.astype(jnp.float32).reshape(-1, group_size)
    centred = r - jnp.mean(r, axis=1, keepdims=True)
    if std_normalize:
        centred = centred / (jnp.std(r, axis=1, ddof=1, keepdims=True) + eps)
    all_equal = jnp.max(r, axis=1, keepdims=True) == jnp.min(r, axis=1, keepdims=True)
    return jnp.where(all_equal, 0.0, centred).reshape(-1)


def k3_kl(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """Per-token k3 estimate of KL(pi || pi_ref) at tokens sampled from pi (Schulman 2020):
    exp(ref - lp) - (ref - lp) - 1 >= 0; unbiased, its expectation under pi is the KL."""
    d = ref_logp - logp
    return jnp.exp(d) - d - 1.0


def grpo_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    ref_logp: jax.Array,
    advantages: jax.Array,
    loss_mask: jax.Array,
    *,
    clip_eps: float = 0.2,
    beta: float = 0.04,
    aggregation: str = "sequence_mean",
    max_response_tokens: int | None = None,
) -> tuple[jax.Array, dict]:
    """GRPO objective, negated. Per response token t of row i (``loss_mask``):

    ``-[min(rho A_i, clip(rho, 1 - clip_eps, 1 + clip_eps) A_i) - beta k3_t]``, rho = exp(lp - old_lp);

    aggregated as ``"sequence_mean"`` (mean over rows of each row's token mean, the GRPO paper)
    or ``"token_sum"`` (sum over every token / (rows x max_response_tokens), Dr. GRPO's
    constant normaliser, so long responses are not down-weighted)."""
    m = loss_mask.astype(jnp.float32)
    ratio = jnp.exp(logp - old_logp)
    adv = jax.lax.stop_gradient(advantages)[:, None]
    surrogate = jnp.minimum(ratio * adv, jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv)
    kl = k3_kl(logp, ref_logp)
    per_token = -(surrogate - beta * kl)
    if aggregation == "sequence_mean":
        loss = jnp.mean(jnp.sum(per_token * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0))
    elif aggregation == "token_sum":
        if not max_response_tokens:
            raise ValueError("aggregation='token_sum' needs max_response_tokens (the normaliser).")
        loss = jnp.sum(per_token * m) / (m.shape[0] * max_response_tokens)
    else:
        raise ValueError(f"GRPO aggregation={aggregation!r} is not one of {GRPO_AGGREGATIONS}.")
    tokens = jnp.maximum(jnp.sum(m), 1.0)
    clipped = (jnp.abs(ratio - 1.0) > clip_eps) & (loss_mask > 0)
    stats = dict(
        kl=jnp.sum(kl * m) / tokens,
        clip_fraction=jnp.sum(clipped) / tokens,
        ratio=jnp.sum(ratio * m) / tokens,
    )
    return loss, stats


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


@register("grpo", _SEQ + ("advantage", "old_logp", "ref_logp"))
def _grpo(model, batch, hp: Mapping):
    """``hp``: temperature, clip_eps, beta, aggregation, max_response_tokens, response_window
    (rows end with their response, at most this long: log-probs of the last tokens only),
    on_policy (one update per batch: the old policy is the current one, ``old_logp`` unread)."""
    lp = model_token_log_probs(model, batch["tokens"], batch["token_mask"], hp["temperature"], hp["response_window"])
    old = jax.lax.stop_gradient(lp) if hp["on_policy"] else batch["old_logp"]
    loss, stats = grpo_loss(
        lp, old, batch["ref_logp"], batch["advantage"], batch["loss_mask"], clip_eps=hp["clip_eps"],
        beta=hp["beta"], aggregation=hp["aggregation"], max_response_tokens=hp["max_response_tokens"],
    )  # fmt: skip
    return loss, dict(stats, mean_advantage_abs=jnp.mean(jnp.abs(batch["advantage"])))


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
