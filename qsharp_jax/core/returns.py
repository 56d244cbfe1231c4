"""Closed-form statistics of a predicted reward-to-go distribution Z (spec 1.2-1.5).

Two parameterisations come out of a guidance head:

* Bernoulli: one logit l, Z ~ Ber(sigmoid(l)) (binary rewards; the paper's default);
* categorical: ``num_atoms`` logits over fixed atoms on [v_min, v_max].

``inv_eta`` is 1/eta (the authors' ``eta_code``): larger means stronger guidance. All
functions are elementwise over leading axes and safe to use inside jit with traced eta.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def atoms(num_atoms: int, v_min: float = 0.0, v_max: float = 1.0) -> jax.Array:
    """Support of the categorical distribution, both ends included."""
    return jnp.linspace(v_min, v_max, num_atoms, dtype=jnp.float32)


# ---- Bernoulli ----------------------------------------------------------------


def bernoulli_log_mgf(logit: jax.Array, inv_eta) -> jax.Array:
    """ln E[exp(z/eta)] for z ~ Ber(sigmoid(logit)) = softplus(l + 1/eta) - softplus(l)."""
    logit = logit.astype(jnp.float32)
    return jax.nn.softplus(logit + inv_eta) - jax.nn.softplus(logit)


def bernoulli_mean(logit: jax.Array) -> jax.Array:
    return jax.nn.sigmoid(logit.astype(jnp.float32))


def bernoulli_variance(logit: jax.Array) -> jax.Array:
    p = bernoulli_mean(logit)
    return p * (1.0 - p)


# ---- categorical ----------------------------------------------------------------


def categorical_log_mgf(logits: jax.Array, atom_values: jax.Array, inv_eta) -> jax.Array:
    """ln E[exp(z/eta)] = logsumexp(log_pmf + atoms/eta) over the last (atom) axis."""
    log_pmf = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jax.nn.logsumexp(log_pmf + atom_values * inv_eta, axis=-1)


def categorical_mean(logits: jax.Array, atom_values: jax.Array) -> jax.Array:
    return jnp.sum(jax.nn.softmax(logits.astype(jnp.float32), axis=-1) * atom_values, axis=-1)


def categorical_variance(logits: jax.Array, atom_values: jax.Array) -> jax.Array:
    pmf = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    mean = jnp.sum(pmf * atom_values, axis=-1, keepdims=True)
    return jnp.sum(pmf * (atom_values - mean) ** 2, axis=-1)
