"""A trained guide's predictions outside training, against direct forwards of the model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsharp_jax.guidance import model as guidance_model, scoring
from qsharp_jax.guidance.batching import Example
from qsharp_jax.models import decoder
from qsharp_jax.models.config import ModelConfig

TINY = ModelConfig(
    model_type="llama",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
)


def _direct_last_value(guide, ids):
    """The head's predicted mean after one unpadded forward of ``ids`` (no batching, no cache)."""
    tokens = jnp.asarray([ids], jnp.int32)
    h, _ = guide.hidden(tokens, jnp.arange(len(ids))[None, :], token_mask=jnp.ones_like(tokens, bool))
    if guide.head_cfg.kind == "v":
        out = guide.head_outputs(h)[0, -1]
    else:
        out = guide.q_head_at(h[:, -2], tokens[:, -1:])[0, 0]
    if guide.head_cfg.distribution == "bernoulli":
        return float(jax.nn.sigmoid(out.reshape(())))
    atoms = jnp.asarray(guide.head_cfg.atom_values())
    return float(jnp.sum(jax.nn.softmax(out) * atoms))


@pytest.mark.parametrize("kind, distribution", [("v", "bernoulli"), ("q", "categorical")])
def test_sequence_values_match_a_direct_forward(kind, distribution):
    head = guidance_model.HeadConfig(kind=kind, distribution=distribution, init="normal")
    guide = guidance_model.build(decoder.build(TINY, seed=1), head, seed=2)
    rng = np.random.default_rng(0)
    sequences = [list(rng.integers(1, 64, n)) for n in (3, 9, 17, 70)]  # several buckets, padding
    got = scoring.sequence_values(guide, sequences, batch_size=3, bucket=16)
    want = [_direct_last_value(guide, s) for s in sequences]
    # float32 forwards of <= 70 tokens through 2 layers: reductions of <= 70 terms of O(1)
    np.testing.assert_allclose(got, want, rtol=0, atol=70 * np.finfo(np.float32).eps * 10)


def test_calibration_against_closed_forms():
    head = guidance_model.HeadConfig(kind="v", distribution="bernoulli", init="normal")
    guide = guidance_model.build(decoder.build(TINY, seed=1), head, seed=2)
    rng = np.random.default_rng(1)
    examples = [Example(list(rng.integers(1, 64, 4)), list(rng.integers(1, 64, 3)), float(i % 2)) for i in range(6)]
    means = scoring.predicted_means(guide, examples, batch_size=4, bucket=8)
    assert [len(m) for m in means] == [3] * 6
    p = np.concatenate(means)
    r = np.repeat([e.reward for e in examples], 3)
    got = scoring.calibration(guide, examples, num_bins=10, batch_size=4, bucket=8)
    assert got["positions"] == 18 and got["examples"] == 6
    assert got["bce"] == pytest.approx(-np.mean(r * np.log(p) + (1 - r) * np.log(1 - p)), rel=1e-9)
    bins = np.minimum((p * 10).astype(int), 9)
    ece = sum(abs(p[bins == b].mean() - r[bins == b].mean()) * (bins == b).sum() for b in set(bins)) / len(p)
    assert got["ece"] == pytest.approx(ece, abs=1e-6)
    assert got["explained_variance"] == pytest.approx(1 - np.var(r - p) / np.var(r), abs=1e-6)


def test_scoring_needs_a_last_token():
    guide = guidance_model.build(decoder.build(TINY), guidance_model.HeadConfig(), seed=0)
    with pytest.raises(ValueError, match="context and a last token"):
        scoring.sequence_values(guide, [[5]])
