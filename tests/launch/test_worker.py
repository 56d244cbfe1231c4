"""launch/worker.sh, run for real on this machine with a fake gcloud: the preemption story.

A detached job under the supervisor gets SIGTERM (as a spot VM's shutdown sends), forwards
it to the job, which saves and exits 143 like the learner's ``Preempted``; worker 0 copies the
output dir to the bucket periodically and at the end; a rerun first restores the output dir
from the bucket, so the job resumes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import ROOT

FAKE_GCLOUD = """#!/usr/bin/env bash
"{python}" -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@" >> "$FAKE_LOG"
case "$1 $2" in
"storage ls") [[ -f $FAKE_BUCKET_HAS_OUTPUT ]] || exit 1 ;;
esac
exit 0
"""

# Stands in for `python -m qsharp_jax.train`: on SIGTERM it "saves" and exits 128 + 15.
JOB = """
import os, signal, sys, time
out = sys.argv[1]
os.makedirs(out, exist_ok=True)
resumed = os.path.exists(os.path.join(out, "restored_marker"))
def on_term(signum, frame):
    with open(os.path.join(out, "saved"), "w") as f:
        f.write("checkpoint")
    print("saved on SIGTERM", flush=True)
    sys.exit(128 + signal.SIGTERM)
signal.signal(signal.SIGTERM, on_term)
print("job started, resumed=%s, distributed=%s" % (resumed, os.environ.get("QSHARP_JAX_DISTRIBUTED")), flush=True)
open(os.path.join(out, "started"), "w").close()
if len(sys.argv) > 2:
    sys.exit(int(sys.argv[2]))
time.sleep(60)
"""


@pytest.fixture
def worker(tmp_path):
    """A checkout-like folder holding launch/worker.sh, a fake gcloud on PATH, and a runner."""
    (tmp_path / "repo" / "launch").mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "launch", "worker.sh"), tmp_path / "repo" / "launch" / "worker.sh")
    (tmp_path / "repo" / "job.py").write_text(JOB)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "gcloud").write_text(FAKE_GCLOUD.format(python=sys.executable))
    (tmp_path / "bin" / "gcloud").chmod(0o755)
    env = dict(
        os.environ,
        PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
        FAKE_LOG=str(tmp_path / "gcloud.log"),
        FAKE_BUCKET_HAS_OUTPUT=str(tmp_path / "bucket_has_output"),
    )

    def sh(*args, check=True, worker_id="0"):
        out = subprocess.run(
            ["bash", "launch/worker.sh", *args], cwd=tmp_path / "repo", env=dict(env, QSHARP_WORKER_ID=worker_id),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if check:
            assert out.returncode == 0, out.stdout + out.stderr
        return out

    def calls():
        path = tmp_path / "gcloud.log"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    sh.calls, sh.repo, sh.tmp = calls, tmp_path / "repo", tmp_path
    return sh


def wait_for(path, seconds=20.0):
    deadline = time.time() + seconds
    while not os.path.exists(path):
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.1)


GCS = "gs://my-bucket/qsharp/job1"
SYNC = ["storage", "rsync", "--recursive", "--exclude=.*orbax-checkpoint-tmp.*", "runs/job1", GCS + "/output"]
RESTORE = ["storage", "rsync", "--recursive", GCS + "/output", "runs/job1"]
LOG_COPY = ["storage", "cp", "logs/job1.log", GCS + "/logs/job1-worker0.log"]


def run_args(*job_args, hosts="1"):
    return ("run", "--job", "job1", "--output-dir", "runs/job1", "--hosts", hosts, "--bucket", GCS, "--sync-every",
            "1", "--", sys.executable, "job.py", "runs/job1", *job_args)  # fmt: skip


def test_sigterm_is_forwarded_saved_and_synced(worker):
    started = worker(*run_args())
    assert "started job job1" in started.stdout
    wait_for(worker.repo / "runs" / "job1" / "started")
    # a second start of the same job is refused while it runs
    again = worker(*run_args(), check=False)
    assert again.returncode == 2 and "job job1 is already running" in again.stderr
    deadline = time.time() + 20
    while SYNC not in worker.calls():  # the periodic copy (every second) while the job runs
        assert time.time() < deadline, worker.calls()
        time.sleep(0.2)
    assert worker("stop", "--job", "job1").stdout.count("sent SIGTERM to job job1") == 1
    logs = worker("logs", "--job", "job1", check=False)
    assert logs.returncode == 143, logs.stdout + logs.stderr  # the job's status (128 + SIGTERM)
    assert "SIGTERM: forwarding it to the job" in logs.stdout and "saved on SIGTERM" in logs.stdout
    assert "job ended with status 143" in logs.stdout
    assert "distributed=None" in logs.stdout  # one host: no multi-host runtime
    assert (worker.repo / "runs" / "job1" / "saved").read_text() == "checkpoint"
    calls = worker.calls()
    # no restore (the bucket was empty), then the final copy of the output and the log after the job ended
    assert calls[0] == ["storage", "ls", GCS + "/output/"] and RESTORE not in calls
    assert calls[-2:] == [SYNC, LOG_COPY]
    assert "job job1 is not running" in worker("stop", "--job", "job1").stdout


def test_rerun_restores_from_the_bucket_first(worker):
    (worker.tmp / "bucket_has_output").touch()
    started = worker(*run_args("0"))  # a job that finishes at once with status 0
    assert f"restoring runs/job1 from {GCS}/output (resuming)" in started.stdout
    logs = worker("logs", "--job", "job1", check=False)
    assert logs.returncode == 0, logs.stdout + logs.stderr
    calls = worker.calls()
    assert calls[:2] == [["storage", "ls", GCS + "/output/"], RESTORE]  # before the job started
    assert calls[-2:] == [SYNC, LOG_COPY]


def test_failing_job_status_and_other_workers_do_not_copy(worker):
    worker(*run_args("3", hosts="2"), worker_id="1")  # fails with status 3 on the second of 2 hosts
    logs = worker("logs", "--job", "job1", check=False)
    assert logs.returncode == 3
    assert "worker 1 of 2" in logs.stdout and "distributed=1" in logs.stdout  # joins the slice's runtime
    assert worker.calls() == [["storage", "ls", GCS + "/output/"]]  # only worker 0 copies to the bucket


def test_worker_errors_name_the_fix(worker):
    out = worker("logs", "--job", "nope", check=False)
    assert out.returncode == 2 and "no log of job nope on this worker: start it with 'run --job nope'" in out.stderr
    out = worker("run", "--job", "job1", "--output-dir", "runs/job1", check=False)
    assert out.returncode == 2 and "pass the command to run after '--'" in out.stderr
    out = worker("frobnicate", check=False)
    assert out.returncode == 2 and "use setup, run, logs, stop or sync" in out.stderr
