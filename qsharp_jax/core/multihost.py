"""Multi-host runtime: start ``jax.distributed`` from config + environment, and the few
helpers a multi-process job needs (who logs, who writes which file, host copies of
arrays spread over processes).

On a multi-host TPU slice every host runs the same program; JAX's cluster detection finds
the coordinator, process count and id from the TPU VM metadata, so ``initialize()`` needs no
arguments there. Elsewhere (CPU clusters, tests) they come from the ``distributed`` config
section or from ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``.

Rules the rest of the code follows:

* every process runs every jitted program on the one global mesh (SPMD): host loops must
  take the same branches on all processes, so decisions come from data all processes see
  (the shared output directory, the config), never from process-local state;
* a global batch is built with ``jax.make_array_from_callback`` from the host batch: each
  process materialises only the rows of its own devices;
* results spread over processes are gathered with :func:`to_host` before host code reads them;
* files: process 0 writes what exists once (config, summaries, plots); a rollout shard is
  written by the process that :func:`owns` it; Orbax checkpoints are written by all processes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

MODES = ("auto", "on", "off")
_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _on_multihost_tpu_vm() -> bool:
    """A TPU VM that is one host of a larger slice (its metadata lists several workers)."""
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or bool(os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


def initialize(
    mode: str = "auto",
    coordinator_address: str = "",
    num_processes: int = -1,
    process_id: int = -1,
) -> bool:
    """Start ``jax.distributed`` once, before any other JAX call; returns whether it did.

    mode: "off" never; "on" always (arguments not given are detected by JAX: TPU VMs, SLURM,
    ...); "auto" when a coordinator is configured (argument or ``JAX_COORDINATOR_ADDRESS``) or
    this is one host of a multi-host TPU slice. Explicit arguments win over the environment.
    """
    if mode not in MODES:
        raise ValueError(f"distributed.mode={mode!r} is not one of {MODES}.")
    if jax.distributed.is_initialized():
        return True
    address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    if mode == "off" or (mode == "auto" and not address and not _on_multihost_tpu_vm()):
        return False
    kwargs: dict[str, Any] = {}
    if address:
        kwargs["coordinator_address"] = address
    n = num_processes if num_processes > 0 else int(os.environ.get("JAX_NUM_PROCESSES", -1))
    i = process_id if process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", -1))
    if n > 0:
        kwargs["num_processes"] = n
    if i >= 0:
        kwargs["process_id"] = i
    if address and (n <= 0 or i < 0) and not _on_multihost_tpu_vm():
        raise ValueError(
            f"distributed coordinator {address!r} given without the process count and id: set "
            "distributed.num_processes and distributed.process_id (or JAX_NUM_PROCESSES / JAX_PROCESS_ID)."
        )
    jax.distributed.initialize(**kwargs)
    return True


def initialize_from_config(cfg) -> bool:
    """:func:`initialize` from a config's ``distributed`` section (absent: "auto")."""
    d = cfg.get("distributed") if hasattr(cfg, "get") else None
    if d is None:
        return initialize("auto")
    return initialize(d.mode, d.coordinator_address, int(d.num_processes), int(d.process_id))


def process_index() -> int:
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def is_main() -> bool:
    """Process 0: the one that logs, shows progress bars and writes summaries."""
    return jax.process_index() == 0


def owns(item: int) -> bool:
    """Whether this process writes item ``item`` of a list split round-robin over processes."""
    return item % jax.process_count() == jax.process_index()


def share(items: Sequence, index: int | None = None, count: int | None = None) -> list:
    """This process's round-robin share of ``items`` (index i goes to process i % count)."""
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    return list(items[index::count])


def to_host(tree):
    """numpy copies of (possibly process-spanning) arrays, identical on every process."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)


def sync(name: str) -> None:
    """Barrier across processes (no-op with one process), e.g. before reading files others wrote."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
