"""Learner packing: several examples per row with segment ids. No attention across
segments (brute force: each packed segment's hidden states equal that example's own
forward, and changing one segment leaves the others bit-identical), the same loss and
gradients as the unpacked batch of the same examples (V-type and Q-type), and far fewer
padded tokens.

Tolerances: float32, the same sums in another order (one row of many tokens vs one row per
example): hidden states O(1) -> 1e-5; the loss O(1) -> rtol 1e-5; gradients compared
relative to their global norm, 1e-5.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qsharp_jax.guidance import batching, model as guidance_model, train_step
from qsharp_jax.models import decoder as model
from qsharp_jax.models.config import ModelConfig

CFG = ModelConfig(
    model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=8,
)  # fmt: skip


def examples(n, seed=0, max_in=20, max_tgt=30):
    rng = np.random.default_rng(seed)
    return [
        batching.Example(
            list(rng.integers(3, 64, rng.integers(1, max_in))),
            list(rng.integers(3, 64, rng.integers(1, max_tgt))),
            float(rng.uniform()),
            float(rng.choice([0.5, 1.0, 2.0])),
        )
        for _ in range(n)
    ]


def test_packed_segments_never_attend_across():
    backbone = model.build(CFG, seed=0)
    exs = examples(4, seed=1)
    row = batching.collate_packed([exs], 128)
    arrays = {k: jnp.asarray(v) for k, v in row.items()}
    h, _ = backbone(
        arrays["tokens"], arrays["positions"], token_mask=arrays["token_mask"], segment_ids=arrays["segment_ids"]
    )
    start = 0
    for ex in exs:
        ids = list(ex.input_ids) + list(ex.target_ids)
        alone, _ = backbone(jnp.asarray([ids]), jnp.arange(len(ids))[None])
        np.testing.assert_allclose(np.asarray(h[0, start : start + len(ids)]), np.asarray(alone[0]), atol=1e-5)
        start += len(ids)
    # change every token of segment 2: the other segments' outputs do not move at all
    seg = row["segment_ids"][0]
    tokens = row["tokens"].copy()
    tokens[0, seg == 2] = (tokens[0, seg == 2] + 7) % 64
    h2, _ = backbone(
        jnp.asarray(tokens), arrays["positions"], token_mask=arrays["token_mask"], segment_ids=arrays["segment_ids"]
    )
    others = (seg != 2) & (seg > 0)
    np.testing.assert_array_equal(np.asarray(h2[0])[others], np.asarray(h[0])[others])
    assert not np.allclose(np.asarray(h2[0])[seg == 2], np.asarray(h[0])[seg == 2])


@pytest.mark.parametrize(
    "kind,distribution,loss_type",
    [("v", "bernoulli", "bce"), ("q", "categorical", "categorical"), ("v", "bernoulli", "mse")],
)
def test_packed_and_unpacked_batches_give_the_same_loss_and_gradients(kind, distribution, loss_type):
    guide = guidance_model.build(
        model.build(CFG, seed=0), guidance_model.HeadConfig(kind=kind, distribution=distribution, init="normal"), seed=1
    )
    graphdef, params = nnx.split(guide)
    head = guide.head_cfg
    categorical = dict(num_atoms=head.num_atoms, v_min=head.v_min, v_max=head.v_max, categorical_mode="interpolate")
    exs = examples(7, seed=2)
    unpacked = batching.collate(exs + [None], 64)  # one padding row (weight 0) as in a short last batch
    packed = batching.collate_packed([exs[:3], exs[3:5], exs[5:], []], 100)

    def loss(p, batch):
        m = nnx.merge(graphdef, p)
        out, mask = train_step.predictions(m, batch)
        if "segment_ids" in batch:
            r, w = train_step._per_token(batch["reward"], mask), train_step._per_token(batch["weight"], mask)
            return train_step.packed_loss(out, mask, r, w, loss_type, **categorical)
        from qsharp_jax.core import losses

        return losses.return_loss(out, mask, batch["reward"], batch["weight"], loss_type, **categorical)

    grad = jax.jit(jax.value_and_grad(loss))
    (l_u, g_u), (l_p, g_p) = (grad(params, {k: jnp.asarray(v) for k, v in b.items()}) for b in (unpacked, packed))
    np.testing.assert_allclose(float(l_p), float(l_u), rtol=1e-5)
    flat_u, flat_p = jax.tree.leaves(g_u), jax.tree.leaves(g_p)
    norm = float(jnp.sqrt(sum(jnp.sum(g**2) for g in flat_u)))
    assert norm > 0
    for a, b in zip(flat_u, flat_p):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5 * norm)


def test_packing_fits_rows_and_cuts_the_padded_fraction():
    # prompt + response lengths like the Q# classifier data: inputs 20-120, targets 10-300 tokens
    rng = np.random.default_rng(3)
    exs = [
        batching.Example([5] * int(rng.integers(20, 120)), [6] * int(rng.integers(10, 300)), 1.0) for _ in range(300)
    ]
    data = batching.bucket_examples(exs, (128, 256, 512))
    packed = batching.pack_examples(data, batch_size=16)
    assert packed.row_length == 512 and 16 % packed.rows_per_batch == 0  # longest 419: 2 x 419 > 512
    # about 16 examples per batch: the divisor of 16 nearest to 16 mean-length examples
    target = 16 * np.mean([batching.example_length(e) for e in exs]) / 512
    assert packed.rows_per_batch / np.sqrt(2) <= target <= packed.rows_per_batch * np.sqrt(2)
    assert sorted(i for r in packed.rows for i in r) == list(range(len(exs)))  # each example once
    lengths = [sum(batching.example_length(packed.examples[i]) for i in r) for r in packed.rows]
    assert max(lengths) <= 512
    before, after = batching.bucketed_padded_fraction(data, 16), packed.padded_fraction()
    assert after < 0.1 < before, (before, after)
    stream = batching.PackedStream(packed, seed=0)
    seen = []
    for pos in range(stream.batches_per_epoch):
        b = stream.batch(0, pos)
        assert b["tokens"].shape == (packed.rows_per_batch, 512)
        seen.append(int(b["token_mask"].sum()))
    assert sum(seen) == sum(batching.example_length(e) for e in exs)
    np.testing.assert_array_equal(stream.batch(1, 0)["tokens"], batching.PackedStream(packed, 0).batch(1, 0)["tokens"])
