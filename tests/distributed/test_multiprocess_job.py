"""The main job (``python -m qsharp_jax.train``, arithmetic quick preset made smaller, on a tiny
random chat model) as 2 processes x 4 fake CPU devices (jax.distributed over loopback) and as
1 process x 8: the same summary, rollouts and graded samples; and a 2-process run killed with
SIGTERM mid-collection and rerun ends as the uninterrupted one, no rollout lost or duplicated.

Layout as on a TPU slice (launch/tpu_vm.sh): each process has its own output directory (a
host's disk) and the guide checkpoints go to a directory both see (an NFS share). Process 0
writes the job's record; process 1's output directory stays empty.

Expected agreement, from how the programs partition on the (data=8) mesh: the reference and the
guide are replicated and each device decodes its own rows, so a decode has no cross-device
float reduction and its tokens and log-probabilities are the same in both layouts as long as
the guide is. The learner sums gradients over the 8 data shards, across processes (gloo) in
one layout and in-process in the other, so the trained guide may differ by the reduction
order: AdamW moves each parameter by at most about steps x lr x 2 x 8 float32 eps more or
less (tests/distributed/test_multiprocess.py), i.e. a relative change of a few eps in the
guide's values. A guided token's logit moves by 1/eta times that value change, so a sampled
token flips only when its uniform draw falls within ~1e-6 of a CDF boundary: the tokens,
answers and accuracies are compared exactly, and a KL (the sum over a response's tokens of
log-ratios, each moved by at most 2 x 1/eta x |value| x that relative change) within
KL_ATOL below. The killed-and-rerun 2-process run repeats the uninterrupted 2-process run's
programs on the same data (the guide of iteration 1 read back from its checkpoint bit for
bit), so everything but wall times must be equal.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, byte_chat_tokenizer, write_tiny_model

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "job_worker.py")
CONFIG = os.path.join(ROOT, "configs", "arithmetic.py") + ":quick"
DEVICES = 8
STEPS, LR, INV_ETA, MAX_NEW = 2, 1e-4, 10.0, 24  # learner.max_steps, learner.lr, eval/roll-in 1/eta, new tokens
EPS = float(np.finfo(np.float32).eps)
# per token: 2 x 1/eta x (|value| <= 1) x relative change of the guide (steps x 2 x 8 shards x eps, the
# AdamW bound above, per unit lr-normalised step) plus float32 rounding of the ~ln(259)-sized
# log-probs; summed over at most MAX_NEW tokens of a response
KL_ATOL = MAX_NEW * (2 * INV_ETA * STEPS * 2 * DEVICES * EPS + 4 * np.log(259) * EPS)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _flags(model_dir: str, run_dir, process: int, nproc: int, port: int) -> list[str]:
    flags = [
        f"--config={CONFIG}",
        f"--config.output_dir={run_dir / f'host{process}'}",  # each host's own disk
        f"--config.learner.checkpoint_dir={run_dir / 'shared' / 'guide'}",  # the share all hosts see
        f"--config.reference.path={model_dir}",
        f"--config.learner.guide.path={model_dir}",
        "--config.learner.guide.num_layers=1",
        # sums of 2..3: a random byte model's last number is the answer now and then, so rewards vary
        "--config.arithmetic.kinds=('add',)",
        "--config.arithmetic.max_operand=3",
        "--config.compilation_cache_dir=off",
        "--config.mesh.data=8",
        "--config.mesh.fsdp=1",
        "--config.sampler.prompt_bucket=192",  # prompts are 154-160 bytes: one bucket with the cut prefixes
        f"--config.sampler.max_new_tokens={MAX_NEW}",
        "--config.learner.batch_size=8",
        f"--config.learner.max_steps={STEPS}",
        f"--config.learner.lr={LR}",
        "--config.learner.buckets=(256,)",
        "--config.learner.progress_bar=False",
        f"--config.eval.inv_eta={INV_ETA}",
        f"--config.collect.rollin_inv_eta={INV_ETA}",
        f"--config.eval.inv_etas=({INV_ETA},)",  # Q# is the headline run; CD at the same 1/eta
        "--config.eval.pass_at_1_rounds=10",
    ]
    if nproc > 1:
        flags += [
            f"--config.distributed.coordinator_address=localhost:{port}",
            f"--config.distributed.num_processes={nproc}",
            f"--config.distributed.process_id={process}",
        ]
    return flags


def _start(model_dir, run_dir, nproc: int, pause_at: str = ""):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    # fast XLA compiles; both layouts use the same flags
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES // nproc} --xla_backend_optimization_level=0"
    if pause_at:
        (run_dir / "markers").mkdir(parents=True, exist_ok=True)
        env.update(QSHARP_TEST_PAUSE_AT=pause_at, QSHARP_TEST_MARKERS=str(run_dir / "markers"))
    port = _free_port()
    return [
        subprocess.Popen(
            [sys.executable, WORKER, *_flags(model_dir, run_dir, i, nproc, port)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(nproc)
    ]


def _finish(procs, expect_rc: int = 0) -> list[tuple[str, str]]:
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=1200))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for i, (p, (out, err)) in enumerate(zip(procs, outputs)):
        tail = "\n".join(line for line in (out + err).splitlines() if "spmd_partitioner" not in line)[-3000:]
        assert p.returncode == expect_rc, f"process {i} of {len(procs)} exited with {p.returncode}:\n{tail}"
    return outputs


def _record(host_dir) -> dict:
    """What a run left in process 0's output directory: summary, graded samples, rollouts per shard."""
    with open(host_dir / "summary.json") as f:
        summary = json.load(f)
    samples = {}
    for name in sorted(os.listdir(host_dir / "eval")):
        if name.endswith("_samples.json"):
            with open(host_dir / "eval" / name) as f:
                samples[name] = json.load(f)
    rollouts = {}
    for it in sorted(os.listdir(host_dir / "rollouts")):
        for shard in sorted(os.listdir(host_dir / "rollouts" / it)):
            with open(host_dir / "rollouts" / it / shard) as f:
                rollouts[f"{it}/{shard}"] = [json.loads(line) for line in f if line.strip()]
    return dict(summary=summary, samples=samples, rollouts=rollouts)


def _without_seconds(tree):
    if isinstance(tree, dict):
        return {k: _without_seconds(v) for k, v in tree.items() if k != "seconds"}
    return tree


def _split_kl(tree, path=""):
    """(everything but the KL values, {path: KL value or list}) of a summary or samples tree."""
    if isinstance(tree, dict):
        rest, kls = {}, {}
        for k, v in tree.items():
            if k.startswith("kl"):
                kls[f"{path}/{k}"] = v
            else:
                rest[k], more = _split_kl(v, f"{path}/{k}")
                kls.update(more)
        return rest, kls
    return tree, {}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"), byte_chat_tokenizer())


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory):
    """The uninterrupted runs: 1 process x 8 devices, then 2 processes x 4 (one job at a time)."""
    out = {}
    for nproc in (1, 2):
        run_dir = tmp_path_factory.mktemp(f"run{nproc}")
        out[nproc] = (run_dir, _finish(_start(model_dir, run_dir, nproc)))
    return out


@pytest.mark.slow
def test_two_processes_end_as_one(runs):
    (one_dir, _), (two_dir, two_logs) = runs[1], runs[2]
    one, two = _record(one_dir / "host0"), _record(two_dir / "host0")

    # process 0 logs and prints the summary; process 1 prints nothing of it and writes no file
    assert "Q# quick on arithmetic: done" in two_logs[0][0] and "iteration 2:" in two_logs[0][1]
    assert "Q# quick on arithmetic" not in two_logs[1][0] and "iteration" not in two_logs[1][1]
    assert not os.path.exists(two_dir / "host1") or [f for _, _, fs in os.walk(two_dir / "host1") for f in fs] == []
    for name in ("summary.json", "config.json", "eval/accuracy_vs_kl.png", "eval/sweep.csv"):
        assert os.path.getsize(two_dir / "host0" / name) > 0, name

    # every rollout once: 7 training problems (8 minus the 1 held for validation) x 2 samples per
    # iteration (a sample with no generated token has no rollout), in two shards of 4 + 3 problems
    assert (
        sorted(one["rollouts"])
        == sorted(two["rollouts"])
        == [f"iteration_{i}/shard_{s:05d}.jsonl" for i in (1, 2) for s in (0, 1)]
    )
    for shards in (one["rollouts"], two["rollouts"]):
        for i in (1, 2):
            rows = [r for name, rs in shards.items() if name.startswith(f"iteration_{i}/") for r in rs]
            keys = [(r["question"], r["sample"]) for r in rows]
            assert len(keys) == len(set(keys)) and len(keys) <= 14 and len({q for q, _ in keys}) == 7
    assert two["rollouts"] == one["rollouts"]  # tokens, cuts, continuations, rewards

    # the summary and the per-problem samples: equal, but KL within the reduction-order bound
    for a, b in ((one["summary"], two["summary"]), (one["samples"], two["samples"])):
        (rest_a, kl_a), (rest_b, kl_b) = _split_kl(_without_seconds(a)), _split_kl(_without_seconds(b))
        assert rest_b == rest_a
        assert sorted(kl_b) == sorted(kl_a) and len(kl_a) > 0
        for key in kl_a:
            np.testing.assert_allclose(np.asarray(kl_b[key], float), np.asarray(kl_a[key], float), rtol=0, atol=KL_ATOL)
    summary = two["summary"]
    assert set(summary["policies"]) == {"pi_ref", "qsharp_iter1", "qsharp_iter2"}
    assert set(summary["sweep"]) == {"pi_ref", "qsharp_inv10", "cd_inv10"} and summary["reward_model"]
    assert all(m["num_problems"] == 4 for m in summary["policies"].values())


@pytest.mark.slow
def test_two_processes_killed_mid_collection_and_rerun_end_as_uninterrupted(runs, model_dir, tmp_path):
    run_dir = tmp_path / "killed"
    procs = _start(model_dir, run_dir, 2, pause_at="2:1")  # at iteration 2's second shard
    markers = [run_dir / "markers" / f"paused_{i}" for i in range(2)]
    while not all(m.exists() for m in markers):  # both processes reached the shard
        assert all(p.poll() is None for p in procs), _finish(procs)
        time.sleep(0.5)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    _finish(procs, expect_rc=-signal.SIGTERM)
    saved = sorted(os.listdir(run_dir / "host0" / "rollouts" / "iteration_2"))
    assert saved == ["shard_00000.jsonl"] and not os.path.exists(run_dir / "host0" / "summary.json")

    logs = _finish(_start(model_dir, run_dir, 2))  # the same command again
    uninterrupted, resumed = _record(runs[2][0] / "host0"), _record(run_dir / "host0")
    assert _without_seconds(resumed["summary"]) == _without_seconds(uninterrupted["summary"])
    assert _without_seconds(resumed["samples"]) == _without_seconds(uninterrupted["samples"])
    assert resumed["rollouts"] == uninterrupted["rollouts"]  # nothing lost or duplicated
    it1 = sum(len(v) for k, v in uninterrupted["rollouts"].items() if k.startswith("iteration_1/"))
    it2_first = len(uninterrupted["rollouts"]["iteration_2/shard_00000.jsonl"])
    err = logs[0][1]
    assert f"iteration 1: {it1} rollouts ({it1} read back)" in err and f"({it2_first} read back)" in err
    assert "eval pi_ref: reusing" in err and "eval qsharp_iter1: reusing" in err
    assert [f for _, _, fs in os.walk(run_dir / "host1") for f in fs] == []
