"""Decoder invariants that need no reference implementation: cached decoding equals one
full forward, probe tokens equal separate forwards, sharded equals unsharded."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsharp_jax.core import sharding
from qsharp_jax.models import decoder as M
from qsharp_jax.models.config import ConfigError, ModelConfig, from_hf_dict

from conftest import ROOT

TINY = dict(
    model_type="qwen3",
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    qkv_bias=True,
    qk_norm=True,
    rope_theta=1e4,
)


def _batch(b=3, t=14, vocab=97, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (b, t))
    mask = np.ones((b, t), bool)
    for row in range(1, b):  # left padding of different lengths
        mask[row, : 3 * row] = False
    return jnp.asarray(tokens), jnp.asarray(mask)


@pytest.mark.parametrize("dtype", [jnp.float32])
def test_prefill_then_decode_equals_full_forward(dtype):
    cfg = ModelConfig(**TINY)
    model = M.build(cfg, dtype=dtype, seed=1)
    tokens, mask = _batch()
    full = M.forward_logits(model, tokens, mask)
    pos = M.positions_from_mask(mask)
    prefill = 6
    cache = M.init_cache(cfg, tokens.shape[0], 32)
    h, cache = model(tokens[:, :prefill], pos[:, :prefill], token_mask=mask[:, :prefill], cache=cache)
    steps = [model.logits(h)]
    for t in range(prefill, tokens.shape[1]):
        h, cache = model(tokens[:, t : t + 1], pos[:, t : t + 1], token_mask=mask[:, t : t + 1], cache=cache, n_write=1)
        steps.append(model.logits(h))
    inc = jnp.concatenate(steps, axis=1)
    assert int(cache.index) == tokens.shape[1]
    err = float(jnp.max(jnp.abs(jnp.where(mask[..., None], inc - full, 0.0))))
    assert err < 1e-5, err


def test_probe_tokens_equal_separate_forwards():
    cfg = ModelConfig(**TINY)
    model = M.build(cfg, seed=2)
    tokens, mask = _batch()
    pos = M.positions_from_mask(mask)
    b, t = tokens.shape
    cache = M.init_cache(cfg, b, 32)
    _, cache = model(tokens[:, :-1], pos[:, :-1], token_mask=mask[:, :-1], cache=cache)
    cands = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (b, 5)))
    # one pass: [newest context token | 5 candidates], candidates all at the next position
    block = jnp.concatenate([tokens[:, -1:], cands], axis=1)
    block_pos = jnp.concatenate([pos[:, -1:], jnp.broadcast_to(pos[:, -1:] + 1, (b, 5))], axis=1)
    h, new_cache = model(block, block_pos, token_mask=jnp.ones((b, 6), bool), cache=cache, n_write=1)
    assert int(new_cache.index) == t  # only the context token was written
    for j in range(5):
        seq = jnp.concatenate([tokens, cands[:, j : j + 1]], axis=1)
        smask = jnp.concatenate([mask, jnp.ones((b, 1), bool)], axis=1)
        ref, _ = model(seq, M.positions_from_mask(smask), token_mask=smask)
        np.testing.assert_allclose(np.asarray(h[:, 1 + j]), np.asarray(ref[:, -1]), atol=1e-5)
    # the context token's hidden state is unaffected by the probes
    ref, _ = model(tokens, pos, token_mask=mask)
    np.testing.assert_allclose(np.asarray(h[:, 0]), np.asarray(ref[:, -1]), atol=1e-5)


def _cache_with_holes(cfg, b, length, live_cols, nan_cols, seed):
    """A cache of random K/V whose visible columns per row are ``live_cols[row]``; columns
    ``nan_cols`` (visible to no row) hold NaN: reading them would poison the output."""
    cache = M.init_cache(cfg, b, length)
    rng = np.random.default_rng(seed)
    mask = np.zeros((b, length), bool)
    for row, cols in enumerate(live_cols):
        mask[row, cols] = True

    def fill(x):
        x = rng.normal(0, 1, x.shape).astype(np.float32)
        x[:, :, nan_cols] = np.nan
        return jnp.asarray(x)

    return M.KVCache(k=[fill(x) for x in cache.k], v=[fill(x) for x in cache.v], mask=jnp.asarray(mask), index=0)


@pytest.mark.parametrize("n_probes", [0, 4])
def test_blocked_cache_attention_equals_dense_and_skips_empty_blocks(n_probes):
    cfg = ModelConfig(**TINY)
    model = M.build(cfg, seed=4)
    length, block = 37, 8  # five blocks, the last one cut short (read as columns 29..36)
    # row 0: a prompt wrapping around the circular buffer (columns 33..36 and 0..5);
    # row 1: columns 24..30 (two blocks, one of them partly read twice by the short last block);
    # row 2: nothing visible (a free slot). Blocks 1 and 2 (columns 8..23) hold no token of any
    # row: NaN there, so any read of them shows up in the output.
    live_cols = [list(range(33, 37)) + list(range(0, 6)), list(range(24, 31)), []]
    b, t = len(live_cols), 1 + n_probes
    dead = list(range(8, 24))
    dense = _cache_with_holes(cfg, b, length, live_cols, dead, seed=5)
    dense.k = [jnp.nan_to_num(x) for x in dense.k]  # the dense path reads every column:
    dense.v = [jnp.nan_to_num(x) for x in dense.v]  # give it zeros where the blocked one sees NaN
    blocked = _cache_with_holes(cfg, b, length, live_cols, dead, seed=5)
    blocked.block = block
    index = jnp.int32(6)  # the next column of row 0's wrapped prompt
    dense.index = blocked.index = index
    rng = np.random.default_rng(6)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t)))
    positions = jnp.asarray(np.array([10, 7, 0])[:, None] + (np.arange(t) > 0))
    h_dense, c_dense = model(tokens, positions, cache=dense, n_write=1)
    h_blocked, c_blocked = model(tokens, positions, cache=blocked, n_write=1)
    assert c_blocked.block == block and int(c_blocked.index) == 7
    assert np.all(np.isfinite(np.asarray(h_blocked)))
    # both are softmax averages over the same <= 12 visible columns, summed in another order:
    # float32 rounding (eps 1.2e-7) of O(1) terms through two layers and the final norm
    np.testing.assert_allclose(np.asarray(h_blocked), np.asarray(h_dense), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(c_blocked.mask), np.asarray(c_dense.mask))


def test_negative_cache_block_is_rejected():
    with pytest.raises(ValueError, match="block=-1"):
        M.init_cache(ModelConfig(**TINY), 1, 8, block=-1)


def test_param_logical_axes_cover_every_parameter():
    model = M.abstract(ModelConfig(**TINY))
    from flax import nnx

    specs = jax.tree.leaves(
        nnx.get_partition_spec(nnx.state(model)), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
    )
    n_params = len(jax.tree.leaves(nnx.state(model)))
    assert len(specs) == n_params and all(len(s) > 0 for s in specs)


def test_mesh_that_does_not_divide_heads_is_rejected():
    cfg = ModelConfig(**{**TINY, "num_kv_heads": 1, "num_heads": 3})
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    sharding.check_model_fits(cfg, mesh)  # fine on one device
    fake = type("FakeMesh", (), {"shape": {"data": 1, "fsdp": 1, "tensor": 2}})()
    with pytest.raises(sharding.MeshError, match=r"num_attention_heads=3 .*'tensor'"):
        sharding.check_model_fits(cfg, fake)
    with pytest.raises(sharding.MeshError, match="batch size=3"):
        sharding.check_model_fits(
            ModelConfig(**TINY), type("M", (), {"shape": {"data": 2, "fsdp": 1, "tensor": 1}})(), batch=3
        )


def test_mesh_sizes_must_match_devices():
    with pytest.raises(sharding.MeshError, match="devices"):
        sharding.make_mesh(2, 2, 2, devices=jax.devices()[:1])


def test_unknown_architecture_and_rope_type_are_named():
    with pytest.raises(ConfigError, match="model_type='gpt2'"):
        from_hf_dict({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    base = {
        "model_type": "llama",
        "vocab_size": 10,
        "hidden_size": 8,
        "intermediate_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
    }
    with pytest.raises(ConfigError, match="'yarn'"):
        from_hf_dict({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


_SHARDED = textwrap.dedent("""
    import json, jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from qsharp_jax.models import decoder as M
    from qsharp_jax.core import sharding
    from qsharp_jax.models.config import ModelConfig
    cfg = ModelConfig(**json.loads(%r))
    model = M.build(cfg, seed=4)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (4, 12)))
    mask = np.ones((4, 12), bool); mask[1, :4] = False; mask[3, :9] = False
    mask = jnp.asarray(mask)
    graphdef, state = nnx.split(model)

    @jax.jit
    def fwd(state, tokens, mask):
        return M.forward_logits(nnx.merge(graphdef, state), tokens, mask)

    plain = np.asarray(fwd(state, tokens, mask))
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    sharding.check_model_fits(cfg, mesh, batch=4)
    with jax.set_mesh(mesh):
        sh_state = jax.device_put(state, sharding.state_shardings(state, mesh))
        batch_sh = sharding.named_sharding(mesh, ("batch", "length"))
        out = fwd(sh_state, jax.device_put(tokens, batch_sh), jax.device_put(mask, batch_sh))
        n_shards = len(sh_state["layers"][0]["attn"]["wq"].get_value().sharding.device_set)
    print(json.dumps({"devices": jax.device_count(), "err": float(np.abs(np.asarray(out) - plain).max()),
                      "wq_devices": n_shards}))
""")


def test_sharded_forward_on_8_fake_devices_equals_unsharded():
    cfg = {**TINY, "vocab_size": 96}
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    root = ROOT
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run(
        [sys.executable, "-c", _SHARDED % json.dumps(cfg)], env=env, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["devices"] == 8 and out["wq_devices"] == 8
    assert out["err"] < 1e-5, out


def test_bfloat16_params_and_compute_track_float32():
    cfg = ModelConfig(**TINY)
    tokens, mask = _batch()
    f32 = M.forward_logits(M.build(cfg, seed=5), tokens, mask)
    bf16 = M.forward_logits(M.build(cfg, seed=5, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16), tokens, mask)
    assert bf16.dtype == jnp.float32  # logits are always float32
    rel = float(jnp.max(jnp.abs(jnp.where(mask[..., None], bf16 - f32, 0.0))) / jnp.max(jnp.abs(f32)))
    assert rel < 0.05, rel


def test_remat_gives_the_same_gradients():
    from flax import nnx

    cfg = ModelConfig(**TINY)
    tokens, mask = _batch()
    grads = []
    for remat in (False, True):
        graphdef, state = nnx.split(M.Decoder(cfg, remat=remat, rngs=nnx.Rngs(6)))

        def loss(state):
            return jnp.mean(M.forward_logits(nnx.merge(graphdef, state), tokens, mask) ** 2)

        grads.append(jax.jit(jax.grad(loss))(state))
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
