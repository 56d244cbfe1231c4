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
        assert info == dict(process=i, local_devices=4, steps=STEPS)
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


def test_initialize_checks_its_arguments(monkeypatch):
    from qsharp_jax.core import multihost

    for name in (
        "JAX_COORDINATOR_ADDRESS",
        "JAX_NUM_PROCESSES",
        "JAX_PROCESS_ID",
        "TPU_WORKER_HOSTNAMES",
        "MEGASCALE_COORDINATOR_ADDRESS",
    ):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match=r"distributed.mode='sometimes' is not one of \('auto', 'on', 'off'\)"):
        multihost.initialize("sometimes")
    assert multihost.initialize("auto") is False  # no coordinator and not a TPU slice: one process
    assert multihost.initialize("off", "localhost:1234", 2, 0) is False
    with pytest.raises(ValueError, match=r"set distributed.num_processes and distributed.process_id"):
        multihost.initialize("auto", "localhost:1234")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1k-w-0")  # one host: no jax.distributed needed
    assert multihost.initialize("auto") is False
    assert multihost.share(list(range(7)), index=1, count=3) == [1, 4]
