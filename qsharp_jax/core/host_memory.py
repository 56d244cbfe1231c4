"""Keep freed host memory for reuse while decoding on the CPU (glibc ``mallopt``).

Why. XLA:CPU runs the attention dots over the KV cache as YNNPACK fusions, which allocate
scratch about the size of a layer's K/V cache in every decode step and free it again (with
``--xla_cpu_experimental_ynn_fusion_type=`` the faults below vanish, but small-batch steps
get ~1.6x slower, so that is no fix). glibc serves blocks above
its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and unmaps them on ``free``, so at
batch 64 with a ~700-column cache (35 MiB per layer's K) every step faults ~1.8 GB of new
pages in: measured on SmolLM2-135M, a decode step took 1.30 s instead of 0.61 s, and the
kernel's page zeroing was a third of the process time (docs/benchmarks.md). With mmap off,
large blocks come from the heap and are reused by the next step.

``reuse_freed_memory()`` turns mmap off for its scope and, on exit, turns it back on (with
glibc's dynamic thresholds pinned at their usual ceilings: 32 MiB mmap, 64 MiB trim) and
hands the heap's free pages back to the OS (``malloc_trim``), so memory retained during
a rollout does not stay resident afterwards. The pinning is for good: glibc has no call that
gives the dynamic thresholds back, so after the first scope the process keeps those ceilings
(where the dynamic heuristic ends up after its first large free anyway). Scopes nest and are thread-safe. Not glibc
(macOS, musl) or ``QSHARP_JAX_REUSE_HOST_MEMORY=0``: a no-op.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
import threading

ENV_VAR = "QSHARP_JAX_REUSE_HOST_MEMORY"

# mallopt parameter numbers (glibc malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
# glibc's defaults and dynamic-threshold ceilings on 64-bit: setting any of these by
# mallopt freezes the dynamic thresholds, so restoring pins them where they usually settle
_DEFAULT_MMAP_MAX = 65536
_MMAP_THRESHOLD_CEILING = 32 * 1024 * 1024
_TRIM_THRESHOLD_CEILING = 2 * _MMAP_THRESHOLD_CEILING
_NEVER_TRIM = 2**31 - 1

_lock = threading.Lock()
_depth = 0
_libc = None


def _glibc():
    """The loaded glibc (``mallopt`` and ``malloc_trim``), or None on other C libraries."""
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c") if platform.libc_ver()[0] == "glibc" else None
        lib = ctypes.CDLL(name) if name else None
        _libc = lib if lib is not None and hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim") else False
    return _libc or None


def available() -> bool:
    """True when the scope below changes anything (glibc, not switched off by the env var)."""
    return os.environ.get(ENV_VAR, "1") != "0" and _glibc() is not None


def _set(param: int, value: int) -> None:
    if _glibc().mallopt(param, value) != 1:
        raise OSError(f"glibc mallopt({param}, {value}) failed; set {ENV_VAR}=0 to run without it.")


@contextlib.contextmanager
def reuse_freed_memory():
    """Within the scope, freed large blocks stay in the heap for reuse (see module doc)."""
    global _depth
    if not available():
        yield
        return
    with _lock:
        if _depth == 0:
            _set(_M_TRIM_THRESHOLD, _NEVER_TRIM)
            _set(_M_MMAP_MAX, 0)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _set(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_CEILING)
                _set(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
                _set(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_CEILING)
                _glibc().malloc_trim(0)
