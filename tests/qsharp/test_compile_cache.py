"""The main job's persistent XLA compilation cache is on by default (under the user cache
dir) and a second process loads its programs from it instead of compiling: counted with
JAX's cache-hit / cache-miss events and the cache directory's files, not with timings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from conftest import ROOT

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import jax, jax.numpy as jnp, ml_collections
    from qsharp_jax.qsharp import loop
    cache_dir = loop.enable_compilation_cache(ml_collections.ConfigDict(dict(compilation_cache_dir=sys.argv[1])))
    # the job keeps JAX's default (programs compiling in >= 1 s); this tiny program compiles faster
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(axis=0) * 3.0 + 1.0)
    f(jnp.ones((48, 48))).block_until_ready()
    files = sum(len(names) for _, _, names in os.walk(cache_dir)) if cache_dir else 0
    stats = {k.rsplit("_", 1)[-1]: v for k, v in loop.COMPILE_STATS.items() if "cache" in k}
    print("RESULT", json.dumps(dict(dir=cache_dir, files=files, **stats)))
""")


def _run(tmp_path, setting: str) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT, XDG_CACHE_HOME=str(tmp_path / "home_cache"), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, setting], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return json.loads(out.stdout.split("RESULT", 1)[1])


def test_cache_is_on_by_default_and_used_by_a_second_run(tmp_path):
    first = _run(tmp_path, "")
    assert first["dir"] == str(tmp_path / "home_cache" / "qsharp_jax" / "xla")
    assert first["hits"] == 0 and first["misses"] >= 1 and first["files"] >= 1, first
    second = _run(tmp_path, "")
    assert second["hits"] >= 1 and second["misses"] == 0, second
    assert second["files"] == first["files"]  # nothing new had to be compiled and stored


def test_cache_can_be_turned_off_or_moved(tmp_path):
    off = _run(tmp_path, "off")
    assert off["dir"] == "" and off["hits"] == 0 and not (tmp_path / "home_cache").exists()
    moved = _run(tmp_path, str(tmp_path / "elsewhere"))
    assert moved["dir"] == str(tmp_path / "elsewhere") and moved["files"] >= 1
