"""reuse_freed_memory: inside the scope a freed large block is reused (no new page faults),
outside it glibc unmaps it and the next one faults its pages in again.

Each scenario runs in a fresh interpreter: glibc's allocator state depends on the process's
history (its dynamic mmap threshold cannot be restored once ``mallopt`` has set one, and a heap
that an earlier test grew can serve a large block without mapping it), so inside a pytest worker
that already sampled, "outside the scope" would not mean glibc's default."""

import ctypes
import json
import os
import resource
import subprocess
import sys

import pytest

from qsharp_jax.core import host_memory

pytestmark = pytest.mark.skipif(not host_memory.available(), reason="needs glibc (mallopt)")

BLOCK = 64 * 1024 * 1024  # above glibc's largest mmap threshold (32 MiB): always mmap by default
PAGES_AT_LEAST = BLOCK // (2 * 1024 * 1024)  # even with 2 MiB transparent huge pages


def _faults_of_one_block() -> int:
    """Minor page faults of this thread for malloc + touch every byte + free of one block."""
    libc = host_memory._glibc()
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    ptr = libc.malloc(BLOCK)
    assert ptr, "malloc failed"
    ctypes.memset(ptr, 1, BLOCK)
    libc.free(ptr)
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before


def _scope_scenario() -> dict:
    _faults_of_one_block()
    outside = _faults_of_one_block()
    with host_memory.reuse_freed_memory():
        _faults_of_one_block()  # the first block grows the heap: its pages fault once
        inside = _faults_of_one_block()
        with host_memory.reuse_freed_memory():  # nesting keeps the setting
            pass
        after_inner_exit = _faults_of_one_block()
    restored = _faults_of_one_block()
    return dict(outside=outside, inside=inside, after_inner_exit=after_inner_exit, restored=restored)


def _switched_off_scenario() -> dict:
    _faults_of_one_block()
    with host_memory.reuse_freed_memory():
        _faults_of_one_block()
        inside = _faults_of_one_block()
    return dict(available=host_memory.available(), inside=inside)


def _in_fresh_process(scenario: str, **env) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, scenario],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_block_is_reused_inside_the_scope_only():
    r = _in_fresh_process("scope")
    assert r["outside"] >= PAGES_AT_LEAST  # mmap'd fresh and unmapped on free
    assert r["inside"] < r["outside"] / 4
    assert r["after_inner_exit"] < r["outside"] / 4
    assert r["restored"] >= PAGES_AT_LEAST  # back to mmap after the outer scope


def test_switched_off_by_the_environment():
    r = _in_fresh_process("switched_off", **{host_memory.ENV_VAR: "0"})
    assert not r["available"]
    assert r["inside"] >= PAGES_AT_LEAST


if __name__ == "__main__":
    scenarios = {"scope": _scope_scenario, "switched_off": _switched_off_scenario}
    print(json.dumps(scenarios[sys.argv[1]]()))
