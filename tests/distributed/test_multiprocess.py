"""Multi-host on CPU: 2 processes x 4 fake devices (jax.distributed over loopback) run the same
sharded guided decode and learner steps (with Orbax checkpoints from both processes) as
1 process x 8 fake devices, on the same (data=2, fsdp=2, tensor=2) mesh.

Expected agreement, from how the programs partition: the tensor axis pairs devices (2i, 2i+1),
which sit in one process in both layouts, and the decode's rows are independent across the
data x fsdp shards, so the decode has no cross-process float reduction: its tokens and
log-probabilities must be bit-identical. The train step sums gradients over data x fsdp,
which spans the two processes (gloo) in one layout and not in the other, so the order of
that sum may differ: each AdamW update m/(sqrt(v)+eps) then moves by at most about twice the
sum's relative error (8 shards x float32 eps) times lr, per step, plus one rounding of the
parameter itself.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")
STEPS, LR, SHARDS = 4, 1e-3, 8  # as in multihost_worker.py


def _env():
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # the worker sets its own device count
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run(nproc: int, out_dir) -> None:
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, str(i), str(nproc), str(8 // nproc), port, str(out_dir)],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(nproc)
    ]
    outputs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outputs.append(out)
    for i, (p, out) in enumerate(zip(procs, outputs)):
        tail = "\n".join(line for line in out.splitlines() if "spmd_partitioner" not in line)[-3000:]
        assert p.returncode == 0, f"process {i} of {nproc} failed:\n{tail}"
    return outputs


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    _run(1, one)
    outputs = _run(2, two)

    # every process took part: 4 local devices each, all learner steps, a checkpoint from both
    for i in range(2):
        with open(two / f"process_{i}.json") as f:
            info = json.load(f)
        text = "written by process 0 \u00e9" * 300  # process 0's file, read by process 0 only
        assert info == dict(process=i, local_devices=4, steps=STEPS, agree=True, any=True, none=False, text=text)
    assert sorted(d for d in os.listdir(two / "ckpt") if d.isdigit()) == ["2", "4"]
    # logs come from process 0 only
    assert "step 1:" in outputs[0] and "step 1:" not in outputs[1]

    a, b = np.load(one / "result.npz"), np.load(two / "result.npz")
    assert a.files == b.files
    for key in ("tokens", "lengths", "logp_policy", "logp_ref", "kl_token"):
        np.testing.assert_array_equal(b[key], a[key], err_msg=key)
    assert (a["lengths"] > 0).all()
    params = [k for k in a.files if k.startswith("param")]
    assert len(params) >= 10
    eps = np.finfo(np.float32).eps
    for k in params:
        tol = STEPS * LR * 2 * SHARDS * eps + np.spacing(np.abs(a[k]).max())
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=tol, err_msg=k)
    np.testing.assert_allclose(b["losses"], a["losses"], rtol=4 * SHARDS * eps)


_ENV = (
    "QSHARP_JAX_DISTRIBUTED",
    "JAX_COORDINATOR_ADDRESS",
    "JAX_NUM_PROCESSES",
    "JAX_PROCESS_ID",
    "TPU_WORKER_HOSTNAMES",
    "MEGASCALE_COORDINATOR_ADDRESS",
)


@pytest.fixture
def fake_initialize(monkeypatch):
    """multihost.initialize with jax.distributed.initialize recorded instead of run; a clean environment."""
    import jax

    for name in _ENV:
        monkeypatch.delenv(name, raising=False)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append(k))
    return calls


def test_initialize_checks_its_settings(fake_initialize, monkeypatch):
    from qsharp_jax.config import job_defaults
    from qsharp_jax.core import multihost

    def refused(settings, message):
        with pytest.raises(multihost.DistributedConfigError, match=message):
            multihost.initialize(settings)

    refused(dict(mode="sometimes"), r"distributed.mode='sometimes' is not one of \('auto', 'on', 'off'\): set ")
    refused(dict(coordinator_address="localhost:1234"), r"set distributed.num_processes and distributed.process_id")
    refused(dict(coordinator_address="localhost"), r"'localhost' is not HOST:PORT")
    refused(dict(num_processes=2), r"distributed.num_processes=2 without a coordinator: set --config.distributed")
    refused(dict(num_processes=0), r"distributed.num_processes=0: set it to the number of processes")
    refused(dict(num_processes=2, process_id=2), r"distributed.process_id=2: set it to this process's index, 0 to 1")
    refused(dict(mode="on", proces_id=1), r"distributed.proces_id is not a setting: use distributed.mode, ")
    monkeypatch.setenv("JAX_PROCESS_ID", "one")
    refused(None, r"JAX_PROCESS_ID='one' is not an integer")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "1")
    refused(None, r"JAX_PROCESS_ID=1: set it to this process's index, 0 to 0 \(JAX_NUM_PROCESSES=1\)")
    monkeypatch.delenv("JAX_PROCESS_ID")
    monkeypatch.delenv("JAX_NUM_PROCESSES")
    monkeypatch.setenv("QSHARP_JAX_DISTRIBUTED", "yes")
    refused(job_defaults(), r"QSHARP_JAX_DISTRIBUTED='yes': set it to 1 \(one process per host")
    assert fake_initialize == []
    assert multihost.share(list(range(7)), index=1, count=3) == [1, 4]


def test_initialize_single_and_multi_process_paths(fake_initialize, monkeypatch):
    """Which settings start jax.distributed, and with which arguments (the call is recorded)."""
    from qsharp_jax.config import job_defaults
    from qsharp_jax.core import multihost

    cfg = job_defaults()
    assert multihost.initialize(cfg) is False and multihost.initialize(None) is False  # one process
    assert multihost.initialize({"experiment": "star_graph"}) is False  # a config without the section
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1k-w-0")  # a single-host slice: no jax.distributed
    assert multihost.initialize(cfg) is False
    assert multihost.initialize(dict(mode="off", coordinator_address="h:1", num_processes=2, process_id=0)) is False
    assert fake_initialize == []

    cfg.distributed.update(dict(coordinator_address="10.0.0.2:8476", num_processes=4, process_id=3))
    assert multihost.initialize(cfg) is True  # explicit settings (a CPU cluster)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "h:2")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert multihost.initialize(None) is True  # from the environment
    monkeypatch.setenv("QSHARP_JAX_DISTRIBUTED", "0")
    assert multihost.initialize(None) is False  # the environment says one process
    assert multihost.initialize(dict(mode="on")) is True  # the config's explicit mode wins
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("QSHARP_JAX_DISTRIBUTED", "1")  # launch/worker.sh --hosts N: JAX detects the rest
    assert multihost.initialize(job_defaults()) is True
    monkeypatch.delenv("QSHARP_JAX_DISTRIBUTED")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1k-w-0,t1k-w-1")  # one host of a 2-host slice
    assert multihost.initialize(job_defaults()) is True
    assert fake_initialize == [
        dict(coordinator_address="10.0.0.2:8476", num_processes=4, process_id=3),
        dict(coordinator_address="h:2", num_processes=2, process_id=1),
        dict(coordinator_address="h:2", num_processes=2, process_id=1),
        {},
        {},
    ]
