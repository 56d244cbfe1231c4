"""reuse_freed_memory: inside the scope a freed large block is reused (no new page faults),
outside it glibc unmaps it and the next one faults its pages in again."""

import ctypes
import resource

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


def test_freed_block_is_reused_inside_the_scope_only():
    _faults_of_one_block()
    outside = _faults_of_one_block()
    assert outside >= PAGES_AT_LEAST  # mmap'd fresh and unmapped on free
    with host_memory.reuse_freed_memory():
        _faults_of_one_block()  # the first block grows the heap: its pages fault once
        inside = _faults_of_one_block()
        with host_memory.reuse_freed_memory():  # nesting keeps the setting
            pass
        after_inner_exit = _faults_of_one_block()
    restored = _faults_of_one_block()
    assert inside < outside / 4
    assert after_inner_exit < outside / 4
    assert restored >= PAGES_AT_LEAST  # back to mmap after the outer scope


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(host_memory.ENV_VAR, "0")
    assert not host_memory.available()
    _faults_of_one_block()
    with host_memory.reuse_freed_memory():
        _faults_of_one_block()
        assert _faults_of_one_block() >= PAGES_AT_LEAST
