"""Multi-host runtime: start ``jax.distributed`` from config + environment, and the few
helpers a multi-process job needs (who logs, who writes which file, host copies of
arrays spread over processes).

On a multi-host TPU slice every host runs the same program; JAX's cluster detection finds
the coordinator, process count and id from the TPU VM metadata, so :func:`initialize` needs no
settings there (``launch/worker.sh`` also sets ``QSHARP_JAX_DISTRIBUTED=1``). Elsewhere (CPU
clusters, tests) they come from the ``distributed`` config section or from
``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``. :func:`initialize` is
the one start-up path: ``python -m qsharp_jax.train`` and :func:`qsharp_jax.qsharp.loop.run`
both call it.

Rules the rest of the code follows:

* every process runs every jitted program on the one global mesh (SPMD): host loops must
  take the same branches on all processes, so decisions come from data all processes see
  (the shared output directory, the config), never from process-local state;
* a global batch is built with ``jax.make_array_from_callback`` from the host batch: each
  process materialises only the rows of its own devices;
* results spread over processes are gathered with :func:`to_host` before host code reads them;
* files: process 0 writes the job's record (config, rollout shards, evaluations, summaries,
  plots) into its output directory, which need not be shared (on TPU VMs it is each host's
  disk, synced to a bucket from worker 0); whether a saved piece exists, and its content, are
  process 0's, sent to the others (:func:`agree`, :func:`read_text`), so a resumed run takes
  the same branches everywhere. Orbax checkpoints are written by all processes into a
  directory they all see.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

MODES = ("auto", "on", "off")
ENV = "QSHARP_JAX_DISTRIBUTED"  # launch/worker.sh sets "1" on every host of a multi-host slice
_ENV_ADDRESS, _ENV_COUNT, _ENV_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
_DEFAULTS = dict(mode="auto", coordinator_address="", num_processes=-1, process_id=-1)


class DistributedConfigError(ValueError):
    """A bad multi-host setting; the message names the key or variable and the fix."""


def _on_multihost_tpu_vm() -> bool:
    """A TPU VM that is one host of a larger slice (its metadata lists several workers)."""
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or bool(os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


def _settings(config) -> dict:
    """The four settings from a job config (its ``distributed`` section), the section itself,
    a mapping, or None; absent keys take the defaults, unknown keys of a section are refused."""
    section = None
    if config is not None and "distributed" in config:
        section = config["distributed"]
    elif config is not None and set(config) & set(_DEFAULTS):
        section = config  # else a job config without the section (star-graph): the defaults
    out = dict(_DEFAULTS)
    if section is not None:
        unknown = sorted(set(section) - set(_DEFAULTS))
        if unknown:
            raise DistributedConfigError(
                f"distributed.{unknown[0]} is not a setting: use {', '.join('distributed.' + k for k in _DEFAULTS)}."
            )
        out.update({k: section[k] for k in section})
    return out


def _env_int(name: str) -> int:
    value = os.environ.get(name, "")
    if value == "":
        return -1
    try:
        return int(value)
    except ValueError:
        raise DistributedConfigError(f"{name}={value!r} is not an integer: set it to a number or unset it.") from None


def initialize(config=None) -> bool:
    """Start ``jax.distributed`` if this is one process of a multi-process job; returns whether
    it runs (also when it was started before). Call it before any other JAX call.

    ``config``: a job config (its ``distributed`` section is read), that section, a mapping
    with any of ``mode``, ``coordinator_address``, ``num_processes``, ``process_id``, or None.
    Empty / -1 values come from ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
    ``JAX_PROCESS_ID``, and on a TPU VM from JAX's own cluster detection.

    Whether to start: ``mode`` "on" always, "off" never; "auto" (the default) follows
    ``QSHARP_JAX_DISTRIBUTED`` when it is set ("1": start, "0": do not; launch/worker.sh sets
    "1" with ``--hosts`` > 1), else starts when a coordinator is configured or this VM is one
    host of a multi-host TPU slice.
    """
    s = _settings(config)
    mode = s["mode"]
    if mode not in MODES:
        raise DistributedConfigError(
            f"distributed.mode={mode!r} is not one of {MODES}: set --config.distributed.mode=auto "
            "(start when a coordinator or a multi-host TPU slice is found), on or off."
        )
    env = os.environ.get(ENV, "")
    if env not in ("", "0", "1"):
        raise DistributedConfigError(
            f"{ENV}={env!r}: set it to 1 (one process per host of a multi-host slice), 0 (one process) or unset it."
        )
    address = str(s["coordinator_address"] or os.environ.get(_ENV_ADDRESS, ""))
    count_key, id_key = "distributed.num_processes", "distributed.process_id"
    try:
        count, index = int(s["num_processes"]), int(s["process_id"])
    except (TypeError, ValueError):
        raise DistributedConfigError(
            f"{count_key}={s['num_processes']!r} / {id_key}={s['process_id']!r}: both must be integers "
            "(-1 = from the environment)."
        ) from None
    if count < 0:
        count, count_key = _env_int(_ENV_COUNT), _ENV_COUNT
    if index < 0:
        index, id_key = _env_int(_ENV_ID), _ENV_ID
    if count == 0 or count < -1:
        raise DistributedConfigError(f"{count_key}={count}: set it to the number of processes (1 or more), or -1.")
    if index < -1 or (count > 0 and index >= count):
        raise DistributedConfigError(
            f"{id_key}={index}: set it to this process's index, 0 to {count - 1} ({count_key}={count})."
            if count > 0
            else f"{id_key}={index}: set it to this process's index (0 or more), or -1."
        )
    if address and (":" not in address or not address.rsplit(":", 1)[1].isdigit()):
        raise DistributedConfigError(
            f"distributed.coordinator_address={address!r} is not HOST:PORT: set it to process 0's host and a free "
            "port, e.g. 10.0.0.2:8476."
        )
    if jax.distributed.is_initialized():
        return True
    if mode == "off" or (mode == "auto" and env == "0"):
        return False
    tpu = _on_multihost_tpu_vm()
    if mode == "auto" and env != "1" and not address and not tpu:
        if count > 1:
            raise DistributedConfigError(
                f"{count_key}={count} without a coordinator: set --config.distributed.coordinator_address=HOST:PORT "
                f"(process 0's host) or {_ENV_ADDRESS}, or {count_key}=-1 for one process."
            )
        return False
    if address and (count < 0 or index < 0) and not tpu:
        raise DistributedConfigError(
            f"distributed coordinator {address!r} given without the process count and id: set "
            "distributed.num_processes and distributed.process_id (or JAX_NUM_PROCESSES / JAX_PROCESS_ID)."
        )
    kwargs: dict[str, Any] = {}
    if address:
        kwargs["coordinator_address"] = address
    if count > 0:
        kwargs["num_processes"] = count
    if index >= 0:
        kwargs["process_id"] = index
    jax.distributed.initialize(**kwargs)  # no arguments: JAX detects them (TPU VM metadata, SLURM, ...)
    return True


def process_index() -> int:
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def is_main() -> bool:
    """Process 0: the one that logs, shows progress bars and writes summaries."""
    return jax.process_index() == 0


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


def agree(flag: bool) -> bool:
    """Process 0's ``flag`` on every process (a resume decision all must take alike)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(int(bool(flag)), np.int32)))


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is set on any process (e.g. a SIGTERM that reached one host first)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(int(bool(flag)), np.int32))))


def read_text(path: str) -> str:
    """The text of ``path`` as process 0 reads it, on every process (the others need not see
    the file: each host may have its own output directory)."""
    if jax.process_count() == 1:
        with open(path, encoding="utf-8") as f:
            return f.read()
    from jax.experimental import multihost_utils

    data = b""
    if is_main():
        with open(path, "rb") as f:
            data = f.read()
    size = int(multihost_utils.broadcast_one_to_all(np.asarray(len(data), np.int32)))
    # int32 words (the CPU collectives reduce no uint8), power-of-two counts: few compiled broadcasts
    words = max(256, 1 << (-(-size // 4) - 1).bit_length())
    buffer = np.zeros(words * 4, np.uint8)
    buffer[: len(data)] = np.frombuffer(data, np.uint8)  # the others send zeros
    received = np.asarray(multihost_utils.broadcast_one_to_all(buffer.view(np.int32)), np.int32)
    return received.view(np.uint8)[:size].tobytes().decode("utf-8")
