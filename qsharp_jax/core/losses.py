"""Return-distribution losses for the guidance model (spec 1.3, 1.4, 2.3).

Every target position of a sequence carries the same label: the sequence's reward-to-go R.
Inputs here are already aligned: ``outputs[b, t]`` is the head's prediction for the pair
(prefix_<t, token_t) (see :func:`qsharp_jax.guidance.train_step.predictions` for the V/Q alignment).

Loss types (the authors' ``--loss_type``):

* ``bce``: Bernoulli, binary cross-entropy on the logit (the paper's default);
* ``mse``: squared error of sigmoid(logit) against R (an ablation);
* ``categorical``: cross-entropy of the softmax over ``num_atoms`` atoms on [v_min, v_max]
  against a target built from R, either by linear interpolation onto the two neighbouring
  atoms (``interpolate``, ours: mass and mean preserved) or by the authors' rounding
  ``clamp(round(R * (A - 1)), 0, A - 1)`` (``round``).

Reduction: mean over each sequence's target positions, then a weighted mean over sequences
(every rollout counts equally whatever its length; weight-0 rows are batch padding).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

LOSS_TYPES = ("bce", "mse", "categorical")
CATEGORICAL_TARGETS = ("interpolate", "round")
# Which head distribution each loss needs.
LOSS_DISTRIBUTION = {"bce": "bernoulli", "mse": "bernoulli", "categorical": "categorical"}


def check_loss_matches_head(loss_type: str, distribution: str) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not one of {LOSS_TYPES}.")
    if LOSS_DISTRIBUTION[loss_type] != distribution:
        raise ValueError(
            f"loss_type={loss_type!r} needs a {LOSS_DISTRIBUTION[loss_type]!r} head, but the guidance "
            f"head is {distribution!r}: set head distribution={LOSS_DISTRIBUTION[loss_type]!r} or "
            f"pick a loss in {[k for k, v in LOSS_DISTRIBUTION.items() if v == distribution]}."
        )


# ---- per-position losses ----------------------------------------------------------


def bernoulli_bce(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """-R ln p - (1 - R) ln(1 - p), p = sigmoid(logit), computed stably from the logit."""
    return optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), labels.astype(jnp.float32))


def sigmoid_mse(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.square(jax.nn.sigmoid(logits.astype(jnp.float32)) - labels.astype(jnp.float32))


def categorical_target(
    rewards: jax.Array, num_atoms: int, v_min: float = 0.0, v_max: float = 1.0, mode: str = "interpolate"
) -> jax.Array:
    """Target pmf [..., num_atoms] for scalar rewards [...].

    ``interpolate``: a reward between atoms i and i+1 puts (1 - f) on i and f on i+1, with f
    its fractional distance from atom i (rewards outside [v_min, v_max] are clipped first);
    this keeps total mass 1 and the mean equal to the (clipped) reward.
    ``round``: the authors' one-hot at clamp(round(R * (A - 1))), which ignores v_min/v_max.
    """
    r = rewards.astype(jnp.float32)
    if mode == "round":
        idx = jnp.clip(jnp.round(r * (num_atoms - 1)), 0, num_atoms - 1).astype(jnp.int32)
        return jax.nn.one_hot(idx, num_atoms, dtype=jnp.float32)
    if mode != "interpolate":
        raise ValueError(f"categorical target mode={mode!r} is not one of {CATEGORICAL_TARGETS}.")
    b = (jnp.clip(r, v_min, v_max) - v_min) / (v_max - v_min) * (num_atoms - 1)  # fractional atom index
    lower = jnp.clip(jnp.floor(b), 0, num_atoms - 1)
    frac = b - lower  # 0 at v_max, where lower is the last atom
    upper = jnp.minimum(lower + 1, num_atoms - 1)
    lo = jax.nn.one_hot(lower.astype(jnp.int32), num_atoms, dtype=jnp.float32)
    hi = jax.nn.one_hot(upper.astype(jnp.int32), num_atoms, dtype=jnp.float32)
    return lo * (1.0 - frac)[..., None] + hi * frac[..., None]


def categorical_ce(logits: jax.Array, target_pmf: jax.Array) -> jax.Array:
    """-sum_i target_i log softmax(logits)_i over the last axis."""
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), target_pmf)


# ---- reduction ----------------------------------------------------------------------


def sequence_losses(per_position: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """[B] mean over each row's masked positions (0 for a row with no target position)."""
    m = loss_mask.astype(jnp.float32)
    return jnp.sum(per_position * m, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)


def weighted_mean(per_sequence: jax.Array, weights: jax.Array) -> jax.Array:
    """sum_b w_b l_b / sum_b w_b. With unit weights this is the authors' plain batch mean;
    weight-0 rows (padding of a short last batch) drop out."""
    w = weights.astype(jnp.float32)
    return jnp.sum(per_sequence * w) / jnp.maximum(jnp.sum(w), 1e-12)


# ---- the loss of one batch ---------------------------------------------------------


def per_position_loss(
    outputs: jax.Array,
    rewards: jax.Array,
    loss_type: str,
    *,
    num_atoms: int = 11,
    v_min: float = 0.0,
    v_max: float = 1.0,
    categorical_mode: str = "interpolate",
) -> jax.Array:
    """outputs: [B, T] logits (bce/mse) or [B, T, A] (categorical); rewards: [B]. -> [B, T]."""
    labels = jnp.broadcast_to(rewards.astype(jnp.float32)[:, None], outputs.shape[:2])
    if loss_type == "bce":
        return bernoulli_bce(outputs, labels)
    if loss_type == "mse":
        return sigmoid_mse(outputs, labels)
    if loss_type == "categorical":
        return categorical_ce(outputs, categorical_target(labels, num_atoms, v_min, v_max, categorical_mode))
    raise ValueError(f"loss_type={loss_type!r} is not one of {LOSS_TYPES}.")


def return_loss(
    outputs: jax.Array, loss_mask: jax.Array, rewards: jax.Array, weights: jax.Array, loss_type: str, **categorical
) -> jax.Array:
    """Scalar training loss: per-position loss, mean per sequence, weighted mean over sequences."""
    per_pos = per_position_loss(outputs, rewards, loss_type, **categorical)
    return weighted_mean(sequence_losses(per_pos, loss_mask), weights)
