"""Multi-host slices run one process per host (launch/worker.sh --hosts N sets
QSHARP_JAX_DISTRIBUTED=1). Emulated here with two CPU processes joined by jax.distributed:
the sampler gathers every host's batch rows, so each process gets the full results, equal
to a one-process run on the same mesh shape."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

SCRIPT = r"""
import json, os, sys
import jax

num_processes, process_id, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
if num_processes > 1:
    jax.distributed.initialize(os.environ["COORDINATOR"], num_processes=num_processes, process_id=process_id)
from flax import nnx

from qsharp_jax.core.sharding import make_mesh
from qsharp_jax.models import decoder
from qsharp_jax.models.config import ModelConfig
from qsharp_jax.rollout.sampler import Sampler
from qsharp_jax.rollout.state import SamplerConfig

cfg = ModelConfig(model_type="llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1,
                  num_heads=2, num_kv_heads=1, head_dim=8, rope_theta=10000.0)
model = decoder.Decoder(cfg, rngs=nnx.Rngs(0))  # the same params on every process
mesh = make_mesh(1, -1, 1)  # all 4 devices (2 per process) on fsdp: the batch spans both processes
sampler = Sampler(model, None, SamplerConfig(max_new_tokens=6, k=2, stop_ids=(3,)), mesh=mesh)
batch = sampler.generate([[1, 2, 5], [4, 5], [7, 8, 9, 10]], key=jax.random.key(0), n=2, temperature=1.0)
with open(out, "w") as f:
    json.dump(dict(devices=jax.device_count(), local=jax.local_device_count(), tokens=batch.tokens.tolist(),
                   lengths=batch.lengths.tolist(), kl=batch.kl_traj.tolist()), f)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(tmp_path, num_processes, devices_per_process):
    script = tmp_path / "sample.py"
    script.write_text(SCRIPT)
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
        COORDINATOR=f"localhost:{free_port()}",
        PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
    )
    outs = [tmp_path / f"out_{num_processes}_{i}.json" for i in range(num_processes)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(num_processes), str(i), str(outs[i])],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(num_processes)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return [json.loads(o.read_text()) for o in outs]


@pytest.mark.slow
def test_sampler_gathers_rows_across_processes(tmp_path):
    two = launch(tmp_path, num_processes=2, devices_per_process=2)
    (one,) = launch(tmp_path, num_processes=1, devices_per_process=4)
    assert [r["devices"] for r in two] == [4, 4] and [r["local"] for r in two] == [2, 2]
    assert one["devices"] == 4
    for r in two:  # every process holds all 6 rows, the same as the one-process run
        assert len(r["tokens"]) == 6 and r["tokens"] == two[0]["tokens"] and r["lengths"] == two[0]["lengths"]
    assert two[0]["tokens"] == one["tokens"] and two[0]["lengths"] == one["lengths"]
    np.testing.assert_allclose(two[0]["kl"], one["kl"], rtol=1e-5, atol=1e-6)


def test_distributed_init_is_opt_in(monkeypatch):
    import jax

    from qsharp_jax.core import sharding

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    monkeypatch.delenv(sharding.DISTRIBUTED_ENV, raising=False)
    assert sharding.maybe_initialize_distributed() is False and calls == []
    monkeypatch.setenv(sharding.DISTRIBUTED_ENV, "0")
    assert sharding.maybe_initialize_distributed() is False and calls == []
    monkeypatch.setenv(sharding.DISTRIBUTED_ENV, "1")
    assert sharding.maybe_initialize_distributed() is True and calls == [((), {})]  # TPU: auto-detected
    monkeypatch.setenv(sharding.DISTRIBUTED_ENV, "yes")
    with pytest.raises(ValueError, match="set it to 1"):
        sharding.maybe_initialize_distributed()
