"""One process of the multi-host test (run by test_multiprocess.py, never collected by pytest).

argv: process_id num_processes devices_per_process coordinator_port out_dir

Builds a tiny reference and V-type guide from fixed seeds on a (data=2, fsdp=2, tensor=2)
mesh over all 8 devices (spanning processes when num_processes > 1), runs a guided sampled
decode, then a few learner steps with Orbax checkpoints, and writes what it saw (from
process 0, plus a per-process marker) to out_dir.
"""

from __future__ import annotations

import json
import os
import sys

pid, nproc, ndev, port, out_dir = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
# fast XLA compiles; both layouts of the comparison use the same flags
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ndev} --xla_backend_optimization_level=0"

import jax  # noqa: E402

from qsharp_jax.core import multihost  # noqa: E402

address = f"localhost:{port}" if nproc > 1 else ""
started = multihost.initialize(dict(coordinator_address=address, num_processes=nproc, process_id=pid))
assert started == (nproc > 1) and jax.process_count() == nproc and jax.device_count() == 8

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from qsharp_jax.config import learner_defaults  # noqa: E402
from qsharp_jax.core.sharding import make_mesh  # noqa: E402
from qsharp_jax.guidance import batching, learner, model as guidance_model  # noqa: E402
from qsharp_jax.models import decoder  # noqa: E402
from qsharp_jax.models.config import ModelConfig  # noqa: E402
from qsharp_jax.rollout.sampler import Sampler  # noqa: E402
from qsharp_jax.rollout.state import SamplerConfig  # noqa: E402

cfg = ModelConfig(
    model_type="llama",
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
)
mesh = make_mesh(data=2, fsdp=2, tensor=2)
ref = decoder.build(cfg, seed=0)
guide = guidance_model.build(decoder.build(cfg.replace(num_layers=1), seed=1), guidance_model.HeadConfig(), seed=2)

# -- sharded guided decode: 4 prompts x 2 samples, rows split over data x fsdp = 4 shards
sampler = Sampler(ref, guide, SamplerConfig(max_new_tokens=10, k=5, prompt_bucket=8, stop_ids=(95,)), mesh=mesh)
prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13], [14, 15, 16, 17]]
rollout = sampler.generate(prompts, key=jax.random.key(3), n=2, temperature=1.0, top_p=0.95, inv_eta=4.0)

# -- learner: 4 steps of batch 8 over data x fsdp, Orbax checkpoints from every process
rng = np.random.default_rng(0)
examples = []
for _ in range(32):
    r = float(rng.integers(0, 2))
    examples.append(
        batching.Example(
            [10 + int(r)] + list(rng.integers(20, 90, rng.integers(1, 6))), list(rng.integers(20, 90, 4)), r
        )
    )
lc = learner_defaults()
lc.update(
    dict(
        lr=1e-3,
        batch_size=8,
        epochs=1,
        max_steps=4,
        buckets=(16,),
        seed=3,
        compute_dtype="float32",
        checkpoint_dir=os.path.join(out_dir, "ckpt"),
        save_every=2,
        keep=2,
        log_every=1,
        async_checkpointing=False,
        progress_bar=False,
    )
)
train_guide = guidance_model.build(
    decoder.build(cfg.replace(num_layers=1), dtype=jnp.float32, param_dtype=jnp.float32, seed=1),
    guidance_model.HeadConfig(),
    seed=2,
)
result = learner.fit(train_guide, examples, lc, mesh=mesh)
params = multihost.to_host(result.state.params)
flat = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}

if multihost.is_main():
    np.savez(
        os.path.join(out_dir, "result.npz"),
        tokens=rollout.tokens,
        lengths=rollout.lengths,
        logp_policy=rollout.logp_policy,
        logp_ref=rollout.logp_ref,
        kl_token=rollout.kl_token,
        losses=np.asarray([h["loss"] for h in result.history]),
        **{"param" + k: v for k, v in flat.items()},
    )
# process 0's resume decisions and files reach every process; a flag set on one process is seen by all
own_file = os.path.join(out_dir, f"only_on_{pid}.txt")  # stands for a file on this host's own disk
with open(own_file, "w") as f:
    f.write(f"written by process {pid} \u00e9" * 300)  # > 1024 bytes, not ASCII
helpers = dict(
    agree=multihost.agree(pid == 0),
    any=multihost.any_process(pid == nproc - 1),
    none=multihost.any_process(False),
    text=multihost.read_text(os.path.join(out_dir, "only_on_0.txt") if pid == 0 else "/nonexistent"),
)
with open(os.path.join(out_dir, f"process_{pid}.json"), "w") as f:
    json.dump(
        dict(process=jax.process_index(), local_devices=jax.local_device_count(), steps=result.steps_run, **helpers), f
    )
multihost.sync("worker done")
