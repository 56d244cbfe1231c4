"""Golden sharding: the PartitionSpec of every parameter and KV-cache leaf of a tiny Llama
and a tiny Qwen3 (plus a V-type guide on the Llama) on a (data 2, fsdp 2, tensor 2) mesh,
compared with ``golden_sharding.json``, so an edit of the rules table cannot reshard silently.

After an intended change of the rules, regenerate the file from the repository root with

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/models/test_golden_sharding.py --write

and review the diff.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden_sharding.json")


def _tiny_configs():
    from qsharp_jax.models.config import ModelConfig

    base = dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8
    )
    return {
        "llama": ModelConfig(model_type="llama", tie_word_embeddings=False, **base),
        "qwen3": ModelConfig(model_type="qwen3", qk_norm=True, tie_word_embeddings=True, **base),
    }


def _spec_text(sharding) -> str:
    return str(tuple(sharding.spec))


def sharding_table() -> dict:
    """{model: {"params": {path: spec}, "cache": {leaf: spec}}} on a (2, 2, 2) mesh."""
    import jax
    from flax import nnx

    from qsharp_jax.core.sharding import DEFAULT_RULES, make_mesh, named_sharding, state_shardings
    from qsharp_jax.guidance import model as guidance_model
    from qsharp_jax.models import decoder

    mesh = make_mesh(2, 2, 2)
    table = {}
    for name, cfg in _tiny_configs().items():
        model = decoder.abstract(cfg)
        params = nnx.state(model, nnx.Param)
        shardings = state_shardings(params, mesh, DEFAULT_RULES)
        flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
        entry = {"params": {jax.tree_util.keystr(path): _spec_text(s) for path, s in flat}}
        cache = jax.eval_shape(lambda cfg=cfg: decoder.init_cache(cfg, 8, 16))
        axes = decoder.cache_logical_axes(cache)
        leaves = jax.tree_util.tree_flatten_with_path(cache)[0]
        axes_leaves = jax.tree.leaves(axes, is_leaf=lambda a: isinstance(a, tuple))
        entry["cache"] = {
            jax.tree_util.keystr(path): _spec_text(named_sharding(mesh, a, DEFAULT_RULES, shape=leaf.shape))
            for (path, leaf), a in zip(leaves, axes_leaves)
        }
        table[name] = entry
    guide = nnx.eval_shape(
        lambda: guidance_model.build(
            decoder.Decoder(_tiny_configs()["llama"], rngs=nnx.Rngs(0)),
            guidance_model.HeadConfig(kind="v", distribution="bernoulli"),
            seed=0,
        )
    )
    flat = jax.tree_util.tree_flatten_with_path(state_shardings(nnx.state(guide, nnx.Param), mesh, DEFAULT_RULES))[0]
    table["llama_v_head"] = {
        "params": {jax.tree_util.keystr(p): _spec_text(s) for p, s in flat if "backbone" not in jax.tree_util.keystr(p)}
    }
    return table


def _computed() -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.dirname(GOLDEN)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--print"], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_param_and_cache_shardings_match_the_golden_file():
    with open(GOLDEN) as f:
        golden = json.load(f)
    computed = _computed()
    assert set(computed) == set(golden)
    for model in golden:
        for part in golden[model]:
            want, got = golden[model][part], computed[model][part]
            changed = {k: (want.get(k), got.get(k)) for k in set(want) | set(got) if want.get(k) != got.get(k)}
            assert not changed, f"{model} {part}: (golden, now) differ for {changed}; see this file's docstring"
    # the file is not vacuous: every family shards something on each mesh axis
    for model in ("llama", "qwen3"):
        specs = " ".join(golden[model]["params"].values())
        assert all(f"'{axis}'" in specs for axis in ("fsdp", "tensor")), specs


if __name__ == "__main__":
    table = sharding_table()
    if "--write" in sys.argv:
        with open(GOLDEN, "w") as f:
            json.dump(table, f, indent=1, sort_keys=True)
            f.write("\n")
        print(f"wrote {GOLDEN}")
    else:
        json.dump(table, sys.stdout, sort_keys=True)
