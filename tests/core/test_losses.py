"""Return-distribution losses and the statistics of the predicted Z, against hand-computed values."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from qsharp_jax.core import losses, metrics, returns


def test_bce_hand_computed():
    # p = sigmoid(0) = 0.5: -ln 0.5 for either label; logit 2, R=1: ln(1 + e^-2); logit 2, R=0: ln(1 + e^2).
    got = losses.bernoulli_bce(jnp.array([0.0, 0.0, 2.0, 2.0]), jnp.array([1.0, 0.0, 1.0, 0.0]))
    want = [math.log(2), math.log(2), math.log1p(math.exp(-2)), math.log1p(math.exp(2))]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # Fractional labels (e.g. shifted rewards) are the cross-entropy against Ber(R).
    p = 1 / (1 + math.exp(-1.0))
    np.testing.assert_allclose(
        losses.bernoulli_bce(jnp.array(1.0), jnp.array(0.3)), -(0.3 * math.log(p) + 0.7 * math.log(1 - p)), rtol=1e-6
    )


def test_sigmoid_mse_hand_computed():
    got = losses.sigmoid_mse(jnp.array([0.0, math.log(3.0)]), jnp.array([1.0, 0.0]))
    np.testing.assert_allclose(got, [0.25, 0.75**2], rtol=1e-6)  # sigmoid(ln 3) = 3/4


def test_categorical_target_interpolates_between_neighbours():
    # 11 atoms on [0, 1] (spacing 0.1): 0.25 lies between atoms 2 and 3, halfway.
    t = np.asarray(losses.categorical_target(jnp.array([0.25, 1.0, 0.0, 0.7]), 11))
    want = np.zeros((4, 11))
    want[0, 2] = want[0, 3] = 0.5
    want[1, 10] = 1.0
    want[2, 0] = 1.0
    want[3, 7] = 1.0
    np.testing.assert_allclose(t, want, atol=1e-6)
    # v_min / v_max are honoured: 5 atoms on [-1, 1] (spacing 0.5); 0.1 -> atoms 2 (0.0) and 3 (0.5), 0.8 / 0.2.
    t = np.asarray(losses.categorical_target(jnp.array(0.1), 5, -1.0, 1.0))
    np.testing.assert_allclose(t, [0, 0, 0.8, 0.2, 0], atol=1e-6)


def test_categorical_target_rounding_is_the_authors():
    # clamp(round(R * (A - 1))): 0.25 * 10 = 2.5 rounds half to even -> 2; 0.26 -> 3; 1.7 -> clamped to 10.
    t = np.asarray(losses.categorical_target(jnp.array([0.25, 0.26, 1.7, -0.4]), 11, mode="round"))
    np.testing.assert_array_equal(t.argmax(-1), [2, 3, 10, 0])
    np.testing.assert_array_equal(t.sum(-1), 1.0)


@pytest.mark.parametrize("num_atoms,v_min,v_max", [(11, 0.0, 1.0), (7, -2.0, 3.0), (2, 0.0, 1.0)])
def test_categorical_projection_conserves_mass_and_mean(num_atoms, v_min, v_max):
    r = np.random.default_rng(0).uniform(v_min, v_max, 1000).astype(np.float32)
    r[:3] = [v_min, v_max, (v_min + v_max) / 2]
    t = np.asarray(losses.categorical_target(jnp.asarray(r), num_atoms, v_min, v_max))
    atoms = np.asarray(returns.atoms(num_atoms, v_min, v_max))
    np.testing.assert_allclose(t.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(t @ atoms, r, atol=1e-5)
    assert (t >= 0).all() and ((t > 0).sum(-1) <= 2).all()  # at most the two neighbours


def test_categorical_ce_hand_computed():
    logits = jnp.log(jnp.array([0.2, 0.3, 0.5]))
    got = losses.categorical_ce(logits, jnp.array([0.0, 0.5, 0.5]))
    np.testing.assert_allclose(got, -(0.5 * math.log(0.3) + 0.5 * math.log(0.5)), rtol=1e-6)


def test_reduction_mean_per_sequence_then_weighted_mean():
    per_pos = jnp.array([[9.0, 1.0, 3.0, 0.0], [9.0, 9.0, 2.0, 4.0], [5.0, 5.0, 5.0, 5.0]])
    mask = jnp.array([[0, 1, 1, 0], [0, 0, 1, 1], [0, 0, 0, 0]], bool)
    seq = losses.sequence_losses(per_pos, mask)
    np.testing.assert_allclose(seq, [2.0, 3.0, 0.0])
    # Row 3 is batch padding (weight 0); row 1 counts twice.
    np.testing.assert_allclose(losses.weighted_mean(seq, jnp.array([2.0, 1.0, 0.0])), (2 * 2.0 + 3.0) / 3)


def test_return_loss_every_target_position_is_labelled_r():
    logits = jnp.array([[0.0, 1.0, -1.0], [2.0, 0.0, 0.0]])
    mask = jnp.array([[0, 1, 1], [1, 0, 0]], bool)
    reward = jnp.array([1.0, 0.0])
    got = losses.return_loss(logits, mask, reward, jnp.ones(2), "bce")
    row0 = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.0))) / 2
    row1 = math.log1p(math.exp(2.0))
    np.testing.assert_allclose(got, (row0 + row1) / 2, rtol=1e-6)
    cat = jnp.zeros((2, 3, 3))  # uniform pmf over 3 atoms: CE = ln 3 whatever the target
    np.testing.assert_allclose(
        losses.return_loss(cat, mask, reward, jnp.ones(2), "categorical", num_atoms=3), math.log(3), rtol=1e-6
    )


def test_loss_head_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="needs a 'categorical' head"):
        losses.check_loss_matches_head("categorical", "bernoulli")
    with pytest.raises(ValueError, match="not one of"):
        losses.check_loss_matches_head("hinge", "bernoulli")


@pytest.mark.parametrize("inv_eta", [0.1, 1.0, 10.0])
def test_log_mgf_matches_brute_force(inv_eta):
    rng = np.random.default_rng(1)
    # Bernoulli: ln(p e^{1/eta} + 1 - p).
    logit = rng.normal(size=20).astype(np.float32) * 3
    p = 1 / (1 + np.exp(-logit.astype(np.float64)))
    np.testing.assert_allclose(
        returns.bernoulli_log_mgf(jnp.asarray(logit), inv_eta),
        np.log(p * np.exp(inv_eta) + 1 - p),
        rtol=1e-5,
        atol=1e-6,
    )
    # Categorical: sampling-free brute force over the atoms, and a Monte Carlo estimate.
    logits = rng.normal(size=(20, 11)).astype(np.float32)
    atoms = np.linspace(0, 1, 11)
    pmf = np.exp(logits.astype(np.float64)) / np.exp(logits.astype(np.float64)).sum(-1, keepdims=True)
    want = np.log((pmf * np.exp(atoms * inv_eta)).sum(-1))
    np.testing.assert_allclose(
        returns.categorical_log_mgf(jnp.asarray(logits), returns.atoms(11), inv_eta), want, rtol=1e-5, atol=1e-6
    )
    z = np.array([rng.choice(atoms, size=200_000, p=pmf[0])])
    np.testing.assert_allclose(np.log(np.mean(np.exp(z * inv_eta))), want[0], rtol=2e-2)


def test_calibration_summary_hand_computed():
    pred = jnp.array([[0.05, 0.15, 0.95], [0.1, 0.9, 0.5]])
    rewards = jnp.array([0.0, 1.0])
    mask = jnp.array([[1, 1, 1], [0, 1, 1]], bool)
    s = metrics.summarize_calibration(metrics.add_sums(None, metrics.calibration_sums(pred, rewards, mask, 2)))
    # bin 0 ([0, .5)): preds .05, .15 (label 0) -> mean .1 vs 0; bin 1: .95 (0), .9 (1), .5 (1) -> .7833 vs .6667
    assert [r["count"] for r in s["reliability"]] == [2, 3]
    np.testing.assert_allclose(s["reliability"][1]["mean_pred"], (0.95 + 0.9 + 0.5) / 3, rtol=1e-6)
    np.testing.assert_allclose(s["ece"], (2 * 0.1 + 3 * abs(2.35 / 3 - 2 / 3)) / 5, rtol=1e-5)
    labels, preds = np.array([0, 0, 0, 1, 1]), np.array([0.05, 0.15, 0.95, 0.9, 0.5])
    np.testing.assert_allclose(s["explained_variance"], 1 - np.var(labels - preds) / np.var(labels), rtol=1e-5)


def test_mean_and_variance_of_the_predicted_distribution():
    logits = np.random.default_rng(2).normal(size=(4, 5)).astype(np.float32)
    atoms = np.linspace(-1, 1, 5)
    pmf = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    mean = pmf @ atoms
    np.testing.assert_allclose(returns.categorical_mean(jnp.asarray(logits), returns.atoms(5, -1, 1)), mean, rtol=1e-5)
    np.testing.assert_allclose(
        returns.categorical_variance(jnp.asarray(logits), returns.atoms(5, -1, 1)),
        pmf @ atoms**2 - mean**2,
        rtol=1e-4,
        atol=1e-6,
    )
    np.testing.assert_allclose(returns.bernoulli_variance(jnp.array(0.0)), 0.25)
